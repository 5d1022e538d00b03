"""
How much does relaying through a producer farm cost?

Runs, in one go and side by side:

  1. Small STT jobs (1 KB by default) through a farm: several persistent
     consumers in parallel, each submitting its next job as soon as the
     previous result arrives, served by as many DigestEngine producers.
     Baseline: the same consumer code talking straight to a minimal PVX/2
     server that is its own producer (no relaying).
  2. Large STT uploads (10 MB) through the farm, in MB/s. Baseline: the same
     bytes written to a plain TCP socket on loopback and counted by a reader.

The farm runs in its own process, started as an operator would start it
(``twistd -n --pidfile= --logfile FILE privox-farm ...``, with the checkout
on PYTHONPATH so the plugin comes from its twisted/plugins), and so do the
baseline servers; the consumers and producers run here. Every result's
digest is checked against its input.

The farm and the clients tune their sockets in the library
(L{privox.framing.tuneTransport}: TCP_NODELAY and a write buffer that holds
a whole frame); the baseline servers and the raw pipe, which are not library
code, call the same function, so both sides are tuned alike.

With C{--pvx1} the small-job measurement through the farm is driven by
PVX/1 peers instead (docs/protocol.rst §14): PVX/1 consumers (one connection
per job, as PVX/1 has it) and PVX/1 digest nodes. PVX/1 marks no ends, so
each job waits out the farm's C{pvx1_quiet} twice (header and transcript);
C{--pvx1-quiet} sets it. The baselines and the large jobs are unchanged.

    PYTHONPATH=. .venv/bin/python bench/farm_relay.py [--quick] [--pvx1]
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, gatherResults  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402

from privox.framing import tuneTransport  # noqa: E402

MODEL = "bench:digest"
#: The PVX/1 name small jobs use with --pvx1 (the farm's default alias table
#: routes it as whisper:tiny.en, which PVX/1 nodes serve).
PVX1_MODEL = "tiny.en"
PVX1_KEY = b"bench-pvx1-key-0"
MB = 1_000_000
DATA_CHUNK = 1024 * 1024  # what the farm announces as max_frame by default


# --------------------------------------------------------------------------
# The child processes.

#: The farm: what the C{twistd} console script runs, under this interpreter.
#: argv: twistd's own (C{-n --pidfile= --logfile ... privox-farm ...}). Not
#: C{python -m twisted}: that is C{twist}, which has no C{-n} or C{--pidfile}.
TWISTD_CODE = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"

#: The same, profiled. argv: a JSON list of paths, then twistd's. Each
#: SIGUSR2 toggles cProfile: the first starts it, the second saves what it saw
#: to the first path and stops it, and so on. (SIGUSR1 is twistd's: it
#: rotates the log file.)
TWISTD_PROFILED_CODE = r"""
import cProfile, json, os, signal, sys
paths = json.loads(sys.argv.pop(1))
sys.argv[0] = "twistd"
state = {"profiler": None}
def toggle(signum, frame):
    profiler = state["profiler"]
    if profiler is None:
        if paths:
            state["profiler"] = profiler = cProfile.Profile()
            profiler.enable()
    else:
        profiler.disable()
        state["profiler"] = None
        path = paths.pop(0)
        profiler.dump_stats(path + ".part")
        os.replace(path + ".part", path)
signal.signal(signal.SIGUSR2, toggle)
from twisted.scripts.twistd import run
run()
"""


def _frame(verb: bytes, payload: bytes = b"") -> bytes:
    return b"%s%08d" % (verb, len(payload)) + payload


def _control(verb: bytes, fields: dict[str, Any]) -> bytes:
    return _frame(verb, json.dumps(fields, separators=(",", ":")).encode())


class DirectProducer(Protocol):
    """
    Baseline for small jobs: a "farm" that is its own producer. Greets
    C{who}, answers HELO with OKAY, each JOB_ with ASGN and, once the upload
    is in, RSLT with the digest DigestEngine would give. No relaying, no
    job machine, no timers.
    """

    def connectionMade(self) -> None:
        self._buffer = bytearray()
        self._job: list[Any] | None = None  # [id, model, remaining, size, sha256]
        self._ids = 0
        tuneTransport(self.transport, DATA_CHUNK)
        self.transport.write(b"who")

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= 12:
            end = offset + 12 + int(buffer[offset + 4 : offset + 12])
            if len(buffer) < end:
                break
            self._frameReceived(bytes(buffer[offset : offset + 4]), buffer[offset + 12 : end])
            offset = end
        if offset:
            del buffer[:offset]

    def _frameReceived(self, verb: bytes, payload: bytearray) -> None:
        if verb == b"DATA":
            job = self._job
            assert job is not None
            job[4].update(payload)
            job[2] -= len(payload)
            if job[2] == 0:
                self._job = None
                self.transport.write(_control(b"RSLT", {
                    "text": f"sha256:{job[4].hexdigest()} bytes:{job[3]}",
                    "model": job[1],
                    "id": job[0],
                }))
        elif verb == b"JOB_":
            fields = json.loads(payload)
            self._ids += 1
            jobId = "%016x" % self._ids
            self._job = [jobId, fields["model"], fields["size"], fields["size"], hashlib.sha256()]
            self.transport.write(_control(b"ASGN", {"id": jobId}))
        elif verb == b"HELO":
            self.transport.write(_control(b"OKAY", {
                "protocol": 2, "farm": "direct", "ping_interval": 10.0,
                "max_frame": DATA_CHUNK, "max_job_bytes": 50 * MB,
            }))
        elif verb == b"PING":
            self.transport.write(_frame(b"PONG"))


class CountingSink(Protocol):
    """
    Baseline for large jobs: reads a plain TCP stream, counts the bytes and
    answers one byte each time another C{jobBytes} have arrived.
    """

    def __init__(self, jobBytes: int) -> None:
        self.jobBytes = jobBytes
        self.count = 0

    def connectionMade(self) -> None:
        tuneTransport(self.transport, DATA_CHUNK)

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        while self.count >= self.jobBytes:
            self.count -= self.jobBytes
            self.transport.write(b"k")


def serveBaseline(jobsPort: int, pipePort: int, jobBytes: int) -> None:
    from twisted.internet import reactor

    reactor.listenTCP(jobsPort, Factory.forProtocol(DirectProducer), interface="127.0.0.1")
    reactor.listenTCP(
        pipePort, Factory.forProtocol(lambda: CountingSink(jobBytes)), interface="127.0.0.1"
    )
    reactor.run()


class Children:
    """
    The subprocesses this run started; all of them are stopped by L{stop}.
    """

    def __init__(self, logDir: str) -> None:
        self.logDir = logDir
        self.procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}

    def start(
        self, name: str, argv: list[str], discardStdout: bool = False
    ) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_REPO, env.get("PYTHONPATH", "")) if p
        )
        out = os.path.join(self.logDir, f"{name}.out")
        with open(out, "wb") as f:
            proc = subprocess.Popen(
                argv, cwd=_REPO, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if discardStdout else f, stderr=f,
            )
        self.procs[name] = (proc, out)
        return proc

    def cpuSeconds(self, name: str) -> float:
        """
        User + system CPU seconds the child has used so far.
        """
        proc, _ = self.procs[name]
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self, name: str, lines: int = 30) -> str:
        _, out = self.procs[name]
        text = []
        # twistd sends its log (and, once logging has begun, stdout and
        # stderr) to its log file.
        for path in (out, os.path.join(self.logDir, f"{name}.log")):
            if os.path.exists(path):
                with open(path, "rb") as f:
                    text.append(f"[{os.path.basename(path)}]\n"
                                + b"".join(f.readlines()[-lines:]).decode("utf-8", "replace"))
        return "\n".join(text)

    def stop(self, name: str, grace: float = 3.0) -> None:
        """
        SIGTERM (the farm drains and, if profiled, saves its profile), then
        SIGKILL after C{grace} seconds: a farm stopped with jobs in flight
        would otherwise wait out its shutdown_grace.
        """
        proc, _ = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stopAll(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def waitForPort(reactor: Any, children: Children, name: str, port: int) -> None:
    proc, _ = children.procs[name]
    deadline = time.perf_counter() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {proc.returncode}:\n{children.tail(name)}"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{name} is not listening on port {port}")
        await task.deferLater(reactor, 0.05, lambda: None)


# --------------------------------------------------------------------------
# The clients (this process).


def expectedText(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()} bytes:{len(data)}"


@dataclass
class Run:
    """
    What one measurement saw.
    """

    seconds: float = 0.0
    jobs: int = 0
    bytes: int = 0
    latencies: list[float] = field(default_factory=list)
    verified: int = 0
    mismatched: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # process -> % of a core

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        rank = max(1, -(-len(ordered) * p // 100))  # nearest rank
        return ordered[int(rank) - 1]

    def check(self, result: Any, expected: str) -> None:
        if result is None:  # the raw pipe baseline has no result to check
            return
        if result.text == expected:
            self.verified += 1
        else:
            self.mismatched += 1


class CpuMeter:
    def __init__(self, children: Children, names: list[str]) -> None:
        self.children = children
        self.names = names

    def __enter__(self) -> CpuMeter:
        self._t = time.perf_counter()
        self._self = sum(os.times()[:2])
        self._kids = {n: self.children.cpuSeconds(n) for n in self.names}
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = time.perf_counter() - self._t
        self.usage = {"bench": 100 * (sum(os.times()[:2]) - self._self) / wall}
        for n in self.names:
            self.usage[n] = 100 * (self.children.cpuSeconds(n) - self._kids[n]) / wall


async def connectProducers(reactor: Any, port: int, count: int) -> list[Any]:
    from privox.node.echo import DigestEngine
    from privox.node.worker import ProducerProtocol

    producers = []
    for _ in range(count):
        p = ProducerProtocol("stt", "", DigestEngine())
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), p)
        await p.ready
        producers.append(p)
    return producers


class Pvx1DigestNode(Protocol):
    """
    A PVX/1 producer node: answers each STT job with the text DigestEngine
    would give. The farm writes each job header in one piece and holds the
    audio until the node's C{ack}, so a read while idle is one header.
    """

    def connectionMade(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self._greeted = False
        self._remaining = 0
        self._size = 0
        self._digest = hashlib.sha256()
        tuneTransport(self.transport, DATA_CHUNK)

    def dataReceived(self, data: bytes) -> None:
        if not self._greeted:
            self._greeted = True
            self.transport.write(b"c" + PVX1_KEY)
            self.ready.callback(None)
            return
        if self._remaining:
            self._digest.update(data)
            self._remaining -= len(data)
            if self._remaining <= 0:
                self.transport.write(
                    f"sha256:{self._digest.hexdigest()} bytes:{self._size}".encode()
                )
            return
        while data.startswith(b"ping"):
            self.transport.write(b"pong")
            data = data[4:]
        if data:
            fields = dict(part.split(b"=", 1) for part in data.split(b"&"))
            self._size = self._remaining = int(fields[b"len"])
            self._digest = hashlib.sha256()
            self.transport.write(b"ack")


class _Pvx1Job(Protocol):
    def __init__(self, header: bytes, audio: bytes) -> None:
        self.header = header
        self.audio = audio
        self.state = "who"
        self.received = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        tuneTransport(self.transport, DATA_CHUNK)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.state == "who" and len(self.received) >= 3:
            del self.received[:3]
            self.state = "ack"
            self.transport.write(b"s" + PVX1_KEY + self.header)
        if self.state == "ack" and len(self.received) >= 3:
            answer = bytes(self.received[:3])
            del self.received[:3]
            self.state = "text"
            if answer == b"ack":
                self.transport.write(self.audio)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(bytes(self.received) if self.state == "text" else b"")


@dataclass
class _Text:
    text: str


class Pvx1Consumer:
    """
    A PVX/1 consumer with the C{stt} call L{smallJobs} uses: one connection
    per job, the transcript read until the farm closes.
    """

    def __init__(self, reactor: Any, port: int) -> None:
        self.reactor = reactor
        self.port = port

    async def stt(self, model: str, audio: bytes) -> _Text:
        job = _Pvx1Job(f"model={model}&len={len(audio)}&lang=en".encode(), audio)
        await connectProtocol(TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port), job)
        return _Text((await job.done).decode("utf-8", "replace"))


async def connectPvx1Producers(reactor: Any, port: int, count: int) -> list[Any]:
    producers = []
    for _ in range(count):
        p = Pvx1DigestNode()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), p)
        await p.ready
        producers.append(p)
    return producers


async def connectConsumers(reactor: Any, port: int, count: int) -> list[Any]:
    from privox.consumer import connectConsumer

    return [
        await connectConsumer(reactor, f"tcp:127.0.0.1:{port}", "stt") for _ in range(count)
    ]


def disconnect(protocols: list[Any]) -> None:
    for p in protocols:
        p.transport.loseConnection()


async def smallJobs(
    reactor: Any, consumers: list[Any], size: int, warmup: float, duration: float,
    model: str = MODEL,
) -> Run:
    """
    Every consumer submits job after job until the window closes. Jobs that
    complete inside [start + warmup, start + warmup + duration] count.
    """
    run = Run(seconds=duration)
    begin = time.perf_counter() + warmup
    end = begin + duration

    async def loop(index: int, consumer: Any) -> None:
        filler = os.urandom(size - 16)
        seq = 0
        while time.perf_counter() < end:
            # Every job's audio is unique, so a result relayed to the wrong
            # consumer (or for the wrong job) cannot match.
            audio = struct.pack(">QQ", index, seq) + filler
            expected = expectedText(audio)
            t0 = time.perf_counter()
            result = await consumer.stt(model, audio)
            t1 = time.perf_counter()
            run.check(result, expected)
            if begin <= t1 <= end:
                run.jobs += 1
                run.bytes += size
                run.latencies.append(t1 - t0)
            seq += 1

    await gatherResults(
        [Deferred.fromCoroutine(loop(i, c)) for i, c in enumerate(consumers)],
        consumeErrors=True,
    )
    return run


async def largeJobs(consumers: list[Any], payloads: list[tuple[bytes, str]], jobs: int) -> Run:
    """
    C{jobs} uploads spread over the consumers, each consumer going through
    its own slice of the payloads, so every concurrent upload is different.
    """
    run = Run()
    perConsumer = [jobs // len(consumers) + (i < jobs % len(consumers)) for i in range(len(consumers))]

    async def loop(index: int, consumer: Any) -> None:
        for n in range(perConsumer[index]):
            audio, expected = payloads[(index + n * len(consumers)) % len(payloads)]
            t0 = time.perf_counter()
            result = await consumer.stt(MODEL, audio)
            run.latencies.append(time.perf_counter() - t0)
            run.check(result, expected)
            run.jobs += 1
            run.bytes += len(audio)

    t0 = time.perf_counter()
    await gatherResults(
        [Deferred.fromCoroutine(loop(i, c)) for i, c in enumerate(consumers)],
        consumeErrors=True,
    )
    run.seconds = time.perf_counter() - t0
    return run


class PipeWriter(Protocol):
    """
    Writes a payload (in the same 1 MiB pieces the consumer sends) and waits
    for the sink's one-byte acknowledgement.
    """

    def connectionMade(self) -> None:
        # As the library tunes its peers: Nagle off (or the last partial
        # segment of an upload can wait for a delayed ACK, 40 ms on Linux),
        # and a frame-sized write buffer.
        tuneTransport(self.transport, DATA_CHUNK)
        self._waiting: Deferred[None] | None = None

    def send(self, payload: bytes) -> Deferred[None]:
        self._waiting = Deferred()
        for start in range(0, len(payload), DATA_CHUNK):
            self.transport.write(payload[start : start + DATA_CHUNK])
        return self._waiting

    def dataReceived(self, data: bytes) -> None:
        for _ in range(len(data)):
            d, self._waiting = self._waiting, None
            assert d is not None, "acknowledgement with nothing in flight"
            d.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(reason)


async def pipeBaseline(
    reactor: Any, port: int, connections: int, payloads: list[tuple[bytes, str]], jobs: int,
    warmup: bool = True,
) -> Run:
    writers = []
    for _ in range(connections):
        w = PipeWriter()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), w)
        writers.append(w)

    class _Stub:
        def __init__(self, writer: PipeWriter) -> None:
            self.writer = writer

        async def stt(self, model: str, audio: bytes) -> Any:
            await self.writer.send(audio)
            return None

    try:
        if warmup:
            await largeJobs([_Stub(w) for w in writers], payloads, len(writers))
        run = await largeJobs([_Stub(w) for w in writers], payloads, jobs)
    finally:
        disconnect(writers)
    return run


# --------------------------------------------------------------------------
# Putting it together.


def table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("measurement", "farm", "baseline", "ratio")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    out = [
        "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))),
        line,
    ]
    for r in rows:
        out.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        )
    return "\n".join(out)


def ratio(farm: float, base: float) -> str:
    return f"{farm / base:.2f}" if base else "-"


def profilePaths(path: str) -> dict[str, str]:
    """
    Where C{--profile-farm PATH} saves each phase: C{farm.prof} gives
    C{farm-small.prof} and C{farm-large.prof}.
    """
    root, ext = os.path.splitext(path)
    return {phase: f"{root}-{phase}{ext}" for phase in ("small", "large")}


class FarmProfile:
    """
    Starts and stops the profiled farm's cProfile around one phase (see
    L{TWISTD_PROFILED_CODE}); does nothing when the farm is not profiled.
    """

    def __init__(self, reactor: Any, children: Children, paths: dict[str, str] | None) -> None:
        self.reactor = reactor
        self.children = children
        self.paths = paths

    def start(self) -> None:
        if self.paths:
            self.children.procs["farm"][0].send_signal(signal.SIGUSR2)

    async def stop(self, phase: str) -> None:
        if not self.paths:
            return
        proc = self.children.procs["farm"][0]
        proc.send_signal(signal.SIGUSR2)
        deadline = time.perf_counter() + 30
        while not os.path.exists(self.paths[phase]):
            if proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"the farm did not save its {phase}-job profile")
            await task.deferLater(self.reactor, 0.05, lambda: None)


async def benchmark(reactor: Any, args: argparse.Namespace) -> None:
    logDir = tempfile.mkdtemp(prefix="privox-bench-")
    children = Children(logDir)
    # Also on Ctrl-C or SIGTERM, which stop the reactor without finishing this
    # coroutine (its finally never runs).
    atexit.register(children.stopAll)
    failed = True
    try:
        farmPort, jobsPort, pipePort = freePort(), freePort(), freePort()
        # --farm-log none: twistd logs to its stdout, which goes to /dev/null.
        # (Not --logfile /dev/null: twistd rotates a log file at 1 MB, and as
        # root that would rename /dev/null.)
        farmLog = "-" if args.farm_log == "none" else os.path.join(logDir, "farm.log")
        twistd = ["-n", "--pidfile=", "--logfile", farmLog, "privox-farm",
                  "--stt-listen", f"tcp:{farmPort}:interface=127.0.0.1",
                  "--tts-listen", "none",
                  "--stats-interval", "0",
                  "--max-job-bytes", str(max(20_000_000, 2 * args.large_bytes))]
        if args.pvx1:
            twistd += ["--pvx1-quiet", str(args.pvx1_quiet)]
        paths = profilePaths(args.profile_farm) if args.profile_farm else None
        if paths:
            for path in paths.values():
                if os.path.exists(path):
                    os.remove(path)
            code = [TWISTD_PROFILED_CODE, json.dumps([paths["small"], paths["large"]])]
        else:
            code = [TWISTD_CODE]
        children.start("farm", [sys.executable, "-c", *code, *twistd],
                       discardStdout=args.farm_log == "none")
        profile = FarmProfile(reactor, children, paths)
        children.start("baseline", [
            sys.executable, os.path.abspath(__file__), "--serve-baseline",
            str(jobsPort), str(pipePort), str(args.large_bytes),
        ])
        await waitForPort(reactor, children, "farm", farmPort)
        await waitForPort(reactor, children, "baseline", jobsPort)
        await waitForPort(reactor, children, "baseline", pipePort)
        print(
            f"farm pid {children.procs['farm'][0].pid} on port {farmPort}, "
            f"baseline pid {children.procs['baseline'][0].pid}; {os.cpu_count()} cores; "
            f"farm log: {args.farm_log}"
            + ("; farm profiled (slower)" if paths else ""),
            flush=True,
        )

        # 1. Small jobs.
        if args.pvx1:
            producers = await connectPvx1Producers(reactor, farmPort, args.producers)
            consumers = [Pvx1Consumer(reactor, farmPort) for _ in range(args.consumers)]
        else:
            producers = await connectProducers(reactor, farmPort, args.producers)
            consumers = await connectConsumers(reactor, farmPort, args.consumers)
        print(f"small jobs through the farm{' (PVX/1 peers)' if args.pvx1 else ''} "
              f"({args.duration:g} s)...", flush=True)
        profile.start()
        with CpuMeter(children, ["farm"]) as cpu:
            farmSmall = await smallJobs(reactor, consumers, args.small_bytes, args.warmup, args.duration,
                                        PVX1_MODEL if args.pvx1 else MODEL)
        farmSmall.cpu = cpu.usage
        await profile.stop("small")
        if args.pvx1:
            # The large jobs run on PVX/2 peers, as without --pvx1.
            disconnect(producers)
            producers = await connectProducers(reactor, farmPort, args.large_producers)
        else:
            disconnect(consumers)

        consumers = await connectConsumers(reactor, jobsPort, args.consumers)
        print(f"small jobs, direct baseline ({args.duration:g} s)...", flush=True)
        with CpuMeter(children, ["baseline"]) as cpu:
            baseSmall = await smallJobs(reactor, consumers, args.small_bytes, args.warmup, args.duration)
        baseSmall.cpu = cpu.usage
        disconnect(consumers)

        # 2. Large jobs. Distinct payloads, twice as many as uploads in flight.
        disconnect(producers[args.large_producers:])
        producers = producers[: args.large_producers]
        payloads = []
        base = os.urandom(args.large_bytes)
        for i in range(2 * args.large_consumers):
            audio = struct.pack(">Q", i) + base[8:]
            payloads.append((audio, expectedText(audio)))
        consumers = await connectConsumers(reactor, farmPort, args.large_consumers)
        print(f"large jobs through the farm ({args.large_jobs} x {args.large_bytes / MB:g} MB)...", flush=True)
        await largeJobs(consumers, payloads, len(consumers))  # warm-up, not counted
        profile.start()
        with CpuMeter(children, ["farm"]) as cpu:
            farmLarge = await largeJobs(consumers, payloads, args.large_jobs)
        farmLarge.cpu = cpu.usage
        await profile.stop("large")
        disconnect(consumers)
        disconnect(producers)

        print(f"large jobs, plain TCP pipe baseline ({args.large_jobs} x {args.large_bytes / MB:g} MB)...", flush=True)
        with CpuMeter(children, ["baseline"]) as cpu:
            baseLarge = await pipeBaseline(reactor, pipePort, args.large_consumers, payloads, args.large_jobs)
        baseLarge.cpu = cpu.usage

        fs, bs = farmSmall, baseSmall
        fl, bl = farmLarge, baseLarge
        small = f"{args.consumers}c x {args.producers}p, {args.small_bytes} B"
        if args.pvx1:
            small = f"PVX/1 peers, quiet {args.pvx1_quiet:g} s, {small}"
        large = f"{args.large_consumers}c x {args.large_producers}p, {args.large_bytes / MB:g} MB"
        ms = 1000.0
        rows = [
            (f"small jobs/s ({small})", f"{fs.jobs / fs.seconds:,.0f}", f"{bs.jobs / bs.seconds:,.0f}",
             ratio(fs.jobs / fs.seconds, bs.jobs / bs.seconds)),
            ("small latency p50 (ms)", f"{fs.percentile(50) * ms:.2f}", f"{bs.percentile(50) * ms:.2f}",
             ratio(fs.percentile(50), bs.percentile(50))),
            ("small latency p99 (ms)", f"{fs.percentile(99) * ms:.2f}", f"{bs.percentile(99) * ms:.2f}",
             ratio(fs.percentile(99), bs.percentile(99))),
            ("small: server CPU (% of a core)", f"{fs.cpu['farm']:.0f}", f"{bs.cpu['baseline']:.0f}", ""),
            ("small: bench CPU (% of a core)", f"{fs.cpu['bench']:.0f}", f"{bs.cpu['bench']:.0f}", ""),
            (f"large MB/s ({large})", f"{fl.bytes / MB / fl.seconds:,.0f}", f"{bl.bytes / MB / bl.seconds:,.0f}",
             ratio(fl.bytes / fl.seconds, bl.bytes / bl.seconds)),
            ("large job time p50 (ms)", f"{fl.percentile(50) * ms:.1f}", f"{bl.percentile(50) * ms:.1f}",
             ratio(fl.percentile(50), bl.percentile(50))),
            ("large: server CPU (% of a core)", f"{fl.cpu['farm']:.0f}", f"{bl.cpu['baseline']:.0f}", ""),
            ("large: bench CPU (% of a core)", f"{fl.cpu['bench']:.0f}", f"{bl.cpu['bench']:.0f}", ""),
        ]
        print()
        print(table(rows))
        print()
        verified = fs.verified + bs.verified + fl.verified
        mismatched = fs.mismatched + bs.mismatched + fl.mismatched
        print(
            f"digests verified: {verified} results matched their input, {mismatched} mixed up "
            f"(farm: {fs.verified} small + {fl.verified} large; direct baseline: {bs.verified} small)"
        )
        print(
            "server = the farm process (farm column) or the baseline server process "
            "(baseline column); bench = this process (consumers and producers)."
        )
        failed = mismatched > 0
    finally:
        children.stopAll()
        if failed:
            for name in children.procs:
                print(f"--- {name} output ({children.procs[name][1]}):\n{children.tail(name)}", file=sys.stderr)
        else:
            shutil.rmtree(logDir, ignore_errors=True)
    if paths:
        import pstats

        for phase, path in paths.items():
            if os.path.exists(path):
                print(f"\nfarm profile, {phase} jobs through the farm ({path}), top functions by own time:")
                pstats.Stats(path).sort_stats("tottime").print_stats(args.profile_top)
    if failed:
        raise SystemExit(1)


def parseArgs(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Throughput and latency through a Privox farm, beside direct-socket baselines."
    )
    p.add_argument("--quick", action="store_true", help="a short run (well under 30 s)")
    p.add_argument("--consumers", type=int, default=8, help="parallel consumers, small jobs [8]")
    p.add_argument("--producers", type=int, default=8, help="DigestEngine producers [8]")
    p.add_argument("--small-bytes", type=int, default=1024, help="small job upload size [1024]")
    p.add_argument("--duration", type=float, help="seconds each small-job run is measured [10; quick 3]")
    p.add_argument("--warmup", type=float, help="seconds before measuring starts [1; quick 0.5]")
    p.add_argument("--large-bytes", type=int, default=10 * MB, help="large upload size [10 MB]")
    p.add_argument("--large-jobs", type=int, help="large uploads per measurement [150; quick 24]")
    p.add_argument("--large-consumers", type=int, default=2, help="parallel large uploads [2]")
    p.add_argument("--large-producers", type=int, help="producers for large jobs [= --large-consumers]")
    p.add_argument("--farm-log", choices=["file", "none"], default="file",
                   help="twistd logs the farm to a file in a temporary folder (file), "
                   "or to /dev/null (none) [file]")
    p.add_argument("--profile-farm", metavar="FILE",
                   help="profile the farm (cProfile) during its two measured phases; saves "
                   "FILE's name with -small and -large added (farm.prof: farm-small.prof, "
                   "farm-large.prof) and prints each one's top")
    p.add_argument("--profile-top", type=int, default=25, metavar="N", help="profile lines to print [25]")
    p.add_argument("--pvx1", action="store_true",
                   help="small jobs through the farm from PVX/1 consumers to PVX/1 nodes "
                   "(the baseline stays PVX/2 direct)")
    p.add_argument("--pvx1-quiet", type=float, default=0.05,
                   help="the farm's pvx1_quiet with --pvx1, seconds [0.05]")
    p.add_argument("--serve-baseline", nargs=3, type=int, metavar=("JOBS_PORT", "PIPE_PORT", "JOB_BYTES"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.0
    if args.large_jobs is None:
        args.large_jobs = 24 if args.quick else 150
    if args.large_producers is None:
        args.large_producers = args.large_consumers
    if args.small_bytes < 16 or args.large_bytes < 8:
        p.error("--small-bytes must be at least 16 and --large-bytes at least 8")
    if args.large_producers > args.producers:
        p.error("--large-producers cannot exceed --producers")
    if args.profile_farm:
        args.profile_farm = os.path.abspath(args.profile_farm)
        if not os.path.isdir(os.path.dirname(args.profile_farm)):
            p.error(f"--profile-farm: no folder {os.path.dirname(args.profile_farm)}")
    return args


def main(argv: list[str]) -> None:
    args = parseArgs(argv)
    if args.serve_baseline:
        serveBaseline(*args.serve_baseline)
        return
    task.react(lambda reactor: Deferred.fromCoroutine(benchmark(reactor, args)))


if __name__ == "__main__":
    main(sys.argv[1:])
