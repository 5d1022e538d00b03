"""
What does the quota check add to a request?

One process, one reactor, three copies of the same Klein app on loopback
ports, each in front of an instant in-process exchange (a transcript comes
back at once, so only the API's own work is timed):

  - C{none}: C{--accounts none} (an open key policy, nothing counted);
  - C{sqlite}: C{--accounts sqlite:...} (a fresh file in a temporary
    directory), the key authenticated, the seconds held and then settled;
  - C{sqlite-100k}: the same store, a key that has already made 100,000
    requests in the hour (made through the store's own reserve and settle):
    the check reads per-minute sums, so its cost must not grow with them;
  - C{postgresql}: the same on a throwaway PostgreSQL cluster (Debian's
    binaries, as the tests use; skipped with a note if they are missing,
    or with C{--no-postgresql}).

A client in the same process posts a 1 s WAV to C{/stt} over a persistent
connection, one request at a time, so each figure is a whole request's
latency. The setups take turns, in an order that flips each round, after a
warm-up of each; the added latency is the setup's median minus C{none}'s.

    PYTHONPATH=. .venv/bin/python bench/quota.py [--requests N] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from treq.client import HTTPClient  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.task import react  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402
from twisted.logger import globalLogBeginner  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402

from privox.accounts.store import AccountStore  # noqa: E402
from privox.api.access import AccountAccess, PolicyAccess  # noqa: E402
from privox.api.app import PrivoxAPI  # noqa: E402
from privox.api.exchange import Spoken, Transcribed  # noqa: E402
from privox.api.models import DEFAULT_STT, DEFAULT_VOICES, ModelTable  # noqa: E402
from privox.keys import OpenPolicy  # noqa: E402
from privox.wav import pcmToWav  # noqa: E402

BOUNDARY = "privox-bench"


class InstantExchange:
    async def transcribe(
        self, model: str, language: str | None, audio: bytes, format: str, deadline: float,
        task: str | None = None, prompt: str | None = None, temperature: float | None = None,
        words: bool = False,
    ) -> Transcribed:
        return Transcribed("hello", model, language, 1.0)

    async def synthesize(
        self, model: str, language: str | None, voice: str | None, text: str, deadline: float,
        speed: float = 1.0,
    ) -> Spoken:
        return Spoken(b"")

    def health(self) -> dict[str, Any]:
        return {"farms": []}


def body(key: str) -> bytes:
    wav = pcmToWav(b"\0\0" * 16000, 16000)
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="key"\r\n\r\n{key}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    ).encode() + wav + f"\r\n--{BOUNDARY}--\r\n".encode()


async def serve(reactor: Any, access: Any) -> str:
    api = PrivoxAPI(InstantExchange(), ModelTable.parse(DEFAULT_STT, DEFAULT_VOICES), access, clock=reactor)
    port = reactor.listenTCP(0, api.site(), interface="127.0.0.1")
    return f"http://127.0.0.1:{port.getHost().port}/stt"


async def accounts(reactor: Any, dsn: str) -> tuple[AccountAccess, str]:
    store = AccountStore.open(dsn, reactor)
    await store.migrate()
    key, _ = await store.createKey(reactor.seconds(), hourlySeconds=1e12)
    return AccountAccess(store, reactor), key


async def busyKey(reactor: Any, access: AccountAccess, requests: int) -> str:
    """
    A key of C{access}'s store that has made C{requests} requests of a
    second each in the last hour.
    """
    store = access.store
    key, account = await store.createKey(reactor.seconds(), hourlySeconds=1e12)
    started = reactor.seconds() - 3000
    for i in range(requests):
        at = started + i * 2900 / requests
        held = await store.reserve(account.account, 1e12, 1.0, at, at + 60)
        await store.settle(held, 1.0, at)
    return key


async def timeRequests(http: HTTPClient, url: str, payload: bytes, n: int) -> list[float]:
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    times = []
    for _ in range(n):
        started = time.perf_counter()
        response = await http.post(url, data=payload, headers=headers)
        await response.content()
        if response.code != 200:
            raise SystemExit(f"{url}: HTTP {response.code}")
        times.append(time.perf_counter() - started)
    return times


async def main(reactor: Any, args: argparse.Namespace) -> None:
    setups: dict[str, tuple[str, bytes]] = {}
    setups["none"] = (await serve(reactor, PolicyAccess(OpenPolicy())), body("any-key"))
    work = tempfile.mkdtemp(prefix="privox-quota-bench-")
    access, key = await accounts(reactor, f"sqlite:{work}/accounts.sqlite3")
    setups["sqlite"] = (await serve(reactor, access), body(key))
    made = time.perf_counter()
    busy = await busyKey(reactor, access, args.history)
    made = time.perf_counter() - made
    setups[f"sqlite-{args.history // 1000}k"] = (setups["sqlite"][0], body(busy))
    note = ""
    if args.postgresql:
        try:
            from tests.pgcluster import freshDatabase

            dsn = await deferToThread(freshDatabase)
        except Exception as e:  # no PostgreSQL here: say so, measure the rest
            note = f"postgresql: not measured ({' '.join(str(e).split())[:120]})"
        else:
            access, key = await accounts(reactor, dsn)
            setups["postgresql"] = (await serve(reactor, access), body(key))

    http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=True)))
    samples: dict[str, list[float]] = {name: [] for name in setups}
    for name, (url, payload) in setups.items():
        await timeRequests(http, url, payload, 50)  # warm-up
    order = list(setups)
    for round in range(args.rounds):
        for name in order if round % 2 == 0 else reversed(order):
            url, payload = setups[name]
            samples[name] += await timeRequests(http, url, payload, args.requests)

    base = statistics.median(samples["none"]) * 1000
    print(f"POST /stt with a 1 s WAV, {args.rounds} x {args.requests} requests per setup, one at a time")
    print(f"{'accounts':<12} {'p50 ms':>8} {'p90 ms':>8} {'added ms':>9} {'ratio':>6}")
    for name, times in samples.items():
        p50 = statistics.median(times) * 1000
        p90 = statistics.quantiles(times, n=10)[-1] * 1000
        print(f"{name:<12} {p50:8.2f} {p90:8.2f} {p50 - base:9.2f} {p50 / base:6.2f}")
    print(f"(the key of sqlite-{args.history // 1000}k made {args.history:,} requests of 1 s"
          f" in the hour before, in {made:.0f} s through the store)")
    if note:
        print(note)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per setup per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--history", type=int, default=100_000,
                        help="requests the busy key made in the hour before")
    parser.add_argument("--no-postgresql", dest="postgresql", action="store_false")
    args = parser.parse_args()
    # The API logs a line per request; keep the figures readable.
    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)

    def start(reactor: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(main(reactor, args))

    react(start)


if __name__ == "__main__":
    run()
