"""
What does formatting a log line cost the daemons?

The farm logs a line per job and the API one per request, formatted on the
reactor thread. This times, side by side in one run, Twisted's
C{formatEventAsClassicLogText} (what C{twistd --logfile} writes) and
L{privox.logs.ClassicText} (what C{privox.logs.textStdout}, the systemd
units' logger, writes; the text is the same) on the events they log most.
The two take turns, in an order that flips each round, and each figure is
the median round.

    PYTHONPATH=. .venv/bin/python bench/log_format.py [--events N] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from twisted.logger import Logger, formatEventAsClassicLogText  # noqa: E402

from privox.logs import ClassicText  # noqa: E402


def events() -> dict[str, dict[str, Any]]:
    """
    One event like each of the lines the daemons log most.
    """
    caught: list[dict[str, Any]] = []
    farm = Logger(namespace="privox.farm.farm", observer=caught.append)
    farm.info(
        "job {job_id} {service} {model} {outcome} in {ms} ms "
        "({bytes_in} bytes in, {bytes_out} bytes out)",
        job_id="3f9a1c0b7d2e", service="stt", model="whisper:tiny.en", outcome="ok",
        ms=41.73828125, bytes_in=32044, bytes_out=0,
    )
    api = Logger(namespace="privox.api.app", observer=caught.append)
    api.info(
        "{route} {status}: {received} bytes in, {bytes} out, {ms} ms"
        " (model {model}, key {keyId})",
        route="/stt", status=200, model="whisper:tiny.en", ms=252.5,
        received=32044, bytes=61, keyId="9c41d2aa07be",
    )
    return {"farm job line": caught[0], "API request line": caught[1]}


def perEvent(format: Callable[[dict[str, Any]], Any], event: dict[str, Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        format(event)
    return (time.perf_counter() - start) / n


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--events", type=int, default=20_000, help="events per round [20000]")
    p.add_argument("--rounds", type=int, default=7, help="rounds [7]")
    args = p.parse_args(argv)

    classic = ClassicText()
    print(f"{'event':<18} {'Twisted (us)':>13} {'ClassicText (us)':>17} {'ratio':>6}")
    for name, event in events().items():
        if classic(event) != formatEventAsClassicLogText(event):
            raise SystemExit(f"{name}: the two formatters disagree")
        times: dict[str, list[float]] = {"twisted": [], "privox": []}
        for r in range(args.rounds):
            order = [("twisted", formatEventAsClassicLogText), ("privox", classic)]
            for label, format in order if r % 2 == 0 else reversed(order):
                times[label].append(perEvent(format, event, args.events))
        twisted = statistics.median(times["twisted"]) * 1e6
        privox = statistics.median(times["privox"]) * 1e6
        print(f"{name:<18} {twisted:>13.2f} {privox:>17.2f} {twisted / privox:>5.1f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
