"""
How much memory does a farm hold?

Two measurements, each with its own farm process (started as farm_relay.py
starts one: C{twistd -n ... privox-farm}, the checkout on PYTHONPATH), whose
resident memory is read from C{/proc/PID/status} (VmRSS now, VmHWM the peak):

  1. Idle producers: 10,000 PVX/2 producer connections (minimal raw-socket
     clients: read C{who}, send HELO with models ["*"], read OKAY, then stay
     idle), connected in batches. Reported: the farm's RSS before and with
     them, in MB and in KB per connection.
  2. Jobs in flight: 100 concurrent STT uploads through the farm to slow
     producers (each reads at a limited rate), once with 10 MB jobs and once
     with 20 MB jobs, each run in a fresh farm. Reported: the farm's peak RSS.
     Backpressure should bound it by the number of jobs times a few frames,
     so doubling the payloads should not double it.

    PYTHONPATH=. .venv/bin/python bench/farm_memory.py [--quick]

The descriptor limit (RLIMIT_NOFILE) is raised for this process and, by
inheritance, the farm; as root the hard limit is raised too if needed.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import select
import socket
import sys
import tempfile
import time
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
_BENCH = os.path.dirname(os.path.abspath(__file__))
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, gatherResults  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol  # noqa: E402

from farm_relay import expectedText  # noqa: E402
from processes import TWISTD_CODE, Children, freePort  # noqa: E402

MB = 1_000_000
MODEL = "bench:digest"


def raiseFileLimit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed
        except (ValueError, OSError):
            needed = hard
    target = needed if hard == resource.RLIM_INFINITY else min(max(soft, needed), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def memory(pid: int) -> dict[str, float]:
    """
    VmRSS and VmHWM of C{pid}, in MB.
    """
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024 / MB
    return found


def startFarm(
    children: Children, name: str, port: int, maxJobBytes: int, extra: tuple[str, ...] = ()
) -> int:
    log = os.path.join(children.logDir, f"{name}.log")
    children.start(name, [
        sys.executable, "-c", TWISTD_CODE,
        "-n", "--reactor=privox", "--pidfile=", "--logfile", log, "privox-farm",
        "--stt-listen", f"tcp:{port}:interface=127.0.0.1",
        "--tts-listen", "none",
        "--stats-interval", "0",
        "--max-job-bytes", str(maxJobBytes),
        *extra,
    ])
    return children.pid(name)


def _frame(verb: bytes, payload: bytes = b"") -> bytes:
    return b"%s%08d" % (verb, len(payload)) + payload


HELO = _frame(b"HELO", json.dumps({
    "protocol": 2, "role": "producer", "service": "stt", "key": "", "models": ["*"],
}).encode())


def _recvExactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            raise ConnectionError("the farm closed a producer connection")
        data += piece
    return data


def _recvFrame(sock: socket.socket) -> tuple[bytes, bytes]:
    header = _recvExactly(sock, 12)
    return header[:4], _recvExactly(sock, int(header[4:]))


class IdleProducers:
    """
    Producers that said HELO and got OKAY and then only answer PING, so the
    farm keeps them.
    """

    def __init__(self) -> None:
        self.sockets: dict[int, socket.socket] = {}
        self._poller = select.epoll()

    def connect(self, port: int, count: int, batch: int) -> None:
        """
        Add C{count} producers, C{batch} at a time (the farm's listen backlog
        is small), answering PINGs between batches.
        """
        added = 0
        while added < count:
            group = [
                socket.create_connection(("127.0.0.1", port), timeout=30)
                for _ in range(min(batch, count - added))
            ]
            for s in group:
                if _recvExactly(s, 3) != b"who":
                    raise RuntimeError("the farm did not greet with 'who'")
                s.sendall(HELO)
            for s in group:
                verb, payload = _recvFrame(s)
                if verb != b"OKAY":
                    raise RuntimeError(f"HELO answered with {verb!r}: {payload[:200]!r}")
                s.setblocking(False)
                self.sockets[s.fileno()] = s
                self._poller.register(s.fileno(), select.EPOLLIN)
            added += len(group)
            self.answerPings(0)

    def answerPings(self, seconds: float) -> None:
        """
        Answer every PING that arrives within C{seconds}.
        """
        deadline = time.perf_counter() + seconds
        while True:
            for fd, _ in self._poller.poll(max(0.0, deadline - time.perf_counter())):
                s = self.sockets[fd]
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("the farm closed an idle producer")
                s.sendall(_frame(b"PONG") * data.count(b"PING"))
            if time.perf_counter() >= deadline:
                return

    def close(self) -> None:
        self._poller.close()
        for s in self.sockets.values():
            s.close()


def measureIdle(children: Children, count: int, batch: int, settle: float) -> dict[str, Any]:
    port = freePort()
    pid = startFarm(children, "farm-idle", port, 20 * MB)
    children.waitForPort("farm-idle", port)
    time.sleep(0.5)
    before = memory(pid)
    started = time.perf_counter()
    producers = IdleProducers()
    producers.connect(port, count, batch)
    took = time.perf_counter() - started
    # Long enough for every producer to be pinged once, at the default
    # ping_interval of the farm.
    producers.answerPings(settle)
    after = memory(pid)
    producers.close()
    children.stop("farm-idle")
    return {
        "connections": count,
        "connect_s": took,
        "rss_before_mb": before["VmRSS"],
        "rss_mb": after["VmRSS"],
        "hwm_mb": after["VmHWM"],
        "kb_per_connection": (after["VmRSS"] - before["VmRSS"]) * MB / 1000 / count,
    }


# --------------------------------------------------------------------------
# Jobs in flight (Twisted clients in this process).


def slowProducer(reactor: Any, rate: float) -> Any:
    """
    A DigestHandler producer that reads at most C{rate} bytes/s: it pauses
    its transport when it is ahead and resumes when the clock catches up,
    so the farm's writes to it back up and backpressure has to hold.
    """
    from privox.node.echo import DigestHandler
    from privox.node.worker import ProducerProtocol

    class SlowProducer(ProducerProtocol):  # type: ignore[misc,valid-type]
        _start = 0.0
        _read = 0
        _resume: Any = None

        def dataReceived(self, data: bytes) -> None:
            now = reactor.seconds()
            if not self._read:
                self._start = now
            self._read += len(data)
            super().dataReceived(data)
            ahead = self._read / rate - (now - self._start)
            if ahead > 0.01 and self._resume is None and self.transport.connected:
                self.transport.pauseProducing()
                self._resume = reactor.callLater(ahead, self._go)

        def _go(self) -> None:
            self._resume = None
            if self.transport.connected:
                self.transport.resumeProducing()

        def connectionLost(self, reason: Any = None) -> None:
            if self._resume is not None and self._resume.active():
                self._resume.cancel()
            super().connectionLost(reason)

    return SlowProducer("stt", "", DigestHandler())


async def measureInFlight(
    reactor: Any,
    children: Children,
    jobs: int,
    jobBytes: int,
    rate: float,
    farmArgs: tuple[str, ...],
) -> dict[str, Any]:
    from privox.consumer import connectConsumer

    name = f"farm-{jobBytes // MB}mb"
    port = freePort()
    pid = startFarm(children, name, port, 2 * jobBytes, farmArgs)
    children.waitForPort(name, port)  # nothing else is running yet
    producers = []
    for _ in range(jobs):
        p = slowProducer(reactor, rate)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), p)
        await p.ready
        producers.append(p)
    consumers = [
        await connectConsumer(reactor, f"tcp:127.0.0.1:{port}", "stt") for _ in range(jobs)
    ]
    before = memory(pid)
    payload = os.urandom(1024 * 1024) * (jobBytes // (1024 * 1024)) + os.urandom(
        jobBytes % (1024 * 1024)
    )
    expected = expectedText(payload)
    peak = [before["VmRSS"]]

    def sample() -> None:
        peak[0] = max(peak[0], memory(pid)["VmRSS"])

    sampler = task.LoopingCall(sample)
    sampler.start(0.05)
    started = time.perf_counter()
    results = await gatherResults([c.stt(MODEL, payload) for c in consumers])
    took = time.perf_counter() - started
    sampler.stop()
    wrong = sum(1 for r in results if r.fields.get("text") != expected)
    after = memory(pid)
    for p in producers + consumers:
        p.transport.loseConnection()
    children.stop(name)
    return {
        "jobs": jobs,
        "job_mb": jobBytes / MB,
        "seconds": took,
        "rss_before_mb": before["VmRSS"],
        "peak_sampled_mb": peak[0],
        "hwm_mb": after["VmHWM"],
        "wrong": wrong,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2,000 idle producers; 20 jobs of 4 and 8 MB")
    parser.add_argument("--idle", type=int, default=10_000, help="idle producer connections")
    parser.add_argument("--batch", type=int, default=50, help="connections per batch")
    parser.add_argument("--settle", type=float, default=12.0,
                        help="seconds to keep the idle producers (answering PING) before reading RSS")
    parser.add_argument("--jobs", type=int, default=100, help="jobs in flight at once")
    parser.add_argument("--job-mb", type=float, nargs="+", default=[10, 20],
                        help="payload sizes to compare, in MB")
    parser.add_argument("--rate", type=float, default=4.0,
                        help="how fast each slow producer reads, MB/s")
    parser.add_argument("--splice-min", type=int, metavar="BYTES",
                        help="the farm's --splice-min for the jobs in flight (its default: "
                        "131072); 0 relays through the farm's memory")
    args = parser.parse_args()
    if args.quick:
        args.idle, args.jobs, args.job_mb = 2000, 20, [4, 8]
    limit = raiseFileLimit(args.idle + 2 * args.jobs + 1000)
    if limit < args.idle + 100:
        sys.exit(f"RLIMIT_NOFILE is {limit}; {args.idle} connections need more")

    children = Children(tempfile.mkdtemp(prefix="privox-bench-memory-"))
    atexit.register(children.stopAll)

    print(f"{args.idle} idle producers...", flush=True)
    idle = measureIdle(children, args.idle, args.batch, args.settle)

    from twisted.internet import reactor

    inFlight: list[dict[str, Any]] = []

    async def jobsInFlight() -> None:
        for mb in args.job_mb:
            print(f"{args.jobs} jobs of {mb:g} MB in flight, producers reading "
                  f"{args.rate:g} MB/s each...", flush=True)
            inFlight.append(await measureInFlight(
                reactor, children, args.jobs, int(mb * MB), args.rate * MB,
                () if args.splice_min is None else ("--splice-min", str(args.splice_min)),
            ))

    failure: list[Any] = []
    d = Deferred.fromCoroutine(jobsInFlight())
    d.addErrback(failure.append)
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    if failure:
        failure[0].raiseException()

    print()
    print(f"farm RSS, {idle['connections']:,} idle producers: {idle['rss_mb']:.1f} MB "
          f"(before: {idle['rss_before_mb']:.1f} MB; "
          f"{idle['kb_per_connection']:.1f} KB per connection; "
          f"connected in {idle['connect_s']:.1f} s)")
    for r in inFlight:
        print(f"farm RSS, {r['jobs']} jobs of {r['job_mb']:g} MB in flight: "
              f"peak {r['hwm_mb']:.1f} MB (sampled peak {r['peak_sampled_mb']:.1f} MB; "
              f"before: {r['rss_before_mb']:.1f} MB; {r['seconds']:.1f} s; "
              f"{r['wrong']} wrong results)")
    if len(inFlight) >= 2:
        a, b = inFlight[0], inFlight[-1]
        print(f"peak growth from {a['job_mb']:g} MB to {b['job_mb']:g} MB jobs: "
              f"{b['hwm_mb'] / a['hwm_mb']:.2f}x (payloads {b['job_mb'] / a['job_mb']:.2f}x)")
    children.stopAll()
    if any(r["wrong"] for r in inFlight):
        sys.exit(1)


if __name__ == "__main__":
    main()
