"""
Does Piper synthesise faster with onnxruntime threads that wait instead of
spin, when the machine has other work?

One voice (the bundled ``en_US-joe-medium``), two ONNX sessions side by
side in one process: the one ``PiperVoice.load`` makes (onnxruntime's
defaults: idle intra-op threads spin) and the one ``PiperEngine.load`` makes
(spinning off). Each synthesises the same sentence, deterministically, in
turns: on a quiet machine; with a busy process (a pure-Python loop) on one
core, as the node's farm or the volunteer's own programs would be; and two
syntheses at once, as a node with two slots runs them (the time is per
pair).

    PYTHONPATH=. .venv/bin/python bench/piper_threads.py [--runs N]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from privox.engines.base import TTSJob  # noqa: E402
from privox.engines.piper import PiperEngine  # noqa: E402

SENTENCE = "The weather today is sunny with a light breeze and a few clouds."


def busy(stop: Any) -> None:
    while not stop.is_set():
        pass


def timeOnce(engine: PiperEngine, session: Any, together: int = 1) -> float:
    assert engine._voice is not None
    engine._voice.session = session
    job = TTSJob(engine.name, None, None, SENTENCE)
    started = time.perf_counter()
    if together == 1:
        engine.synthesize(job)
    else:
        with ThreadPoolExecutor(together) as pool:
            list(pool.map(lambda _: engine.synthesize(job), range(together)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="syntheses per session and condition")
    args = parser.parse_args()

    from piper import PiperVoice

    engine = PiperEngine("en_US-joe-medium", deterministic=True)
    engine.load()
    onnx = engine.onnx
    assert engine._voice is not None
    sessions = {
        "PiperVoice.load (spinning)": PiperVoice.load(str(onnx), use_cuda=False).session,
        "PiperEngine.load (waiting)": engine._voice.session,
    }
    print(f"{os.cpu_count()} cores; {args.runs} syntheses of a {len(SENTENCE)}-character sentence each")
    print(f"{'condition':<16} {'session':<28} {'p50 s':>7} {'min s':>7}")
    for condition in ("quiet", "one busy core", "two at once"):
        together = 2 if condition == "two at once" else 1
        stop = multiprocessing.Event()
        hog = None
        if condition == "one busy core":
            hog = multiprocessing.Process(target=busy, args=(stop,))
            hog.start()
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for name, session in sessions.items():
            timeOnce(engine, session, together)  # warm-up
        for i in range(args.runs):
            order = list(sessions) if i % 2 == 0 else list(reversed(sessions))
            for name in order:
                times[name].append(timeOnce(engine, sessions[name], together))
        stop.set()
        if hog is not None:
            hog.join()
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, t in times.items():
            print(f"{condition:<16} {name:<28} {medians[name]:7.3f} {min(t):7.3f}")
        spinning, waiting = medians.values()
        print(f"{condition:<16} {'spinning / waiting':<28} {spinning / waiting:7.2f}")


if __name__ == "__main__":
    main()
