"""
How much does relaying through a producer farm cost?

Runs, in one go and side by side:

  1. Small STT jobs (1 KB by default) through a farm: several persistent
     consumers in parallel, each submitting its next job as soon as the
     previous result arrives, served by as many DigestHandler producers.
     Baseline: the same consumer code talking straight to a minimal PVX/2
     server that is its own producer (no relaying).
  2. Large STT uploads (10 MB) through the farm, in MB/s. Baseline: the same
     bytes written to a plain TCP socket on loopback and counted by a reader.
  3. The farm against a lean relay doing the same work: C{bench/asyncio_farm.py},
     a compact PVX/2 farm on asyncio, under the same load (64 consumers on
     reused connections, 8 producers; 32 KB jobs, then 1 MB jobs): the CPU
     each spends per job and per MB (issue 17: privox-farm must spend no
     more than it). The same compact farm also runs on Twisted's reactor
     (C{--reactor twisted}): the part of the difference that is the event
     loop's, not the farm's.

Every party has a process of its own: the farm, started as its systemd unit
starts it (``twistd -n --pidfile= --logger privox.logs.textStdout privox-farm
...``, its stdout into a file, with the
checkout on PYTHONPATH so the plugin comes from its twisted/plugins), the
baseline servers, and the load: consumers and producers spread over
C{--load-procs} processes each (this script with C{--load}). This process
only coordinates. It reads each process's CPU time (/proc/PID/stat) at the
start and end of every measured window, so besides wall-clock rates it
prints what the farm itself spent per job and per GB: jobs/s and MB/s per
farm core, which other work on the machine does not change. Every result's
digest is checked against its input: sha256 for small jobs; for large ones
xxh3-128 by default (C{--large-check}), as sha256 alone would cost the
producers more CPU per GB than the farm spends relaying it, on the cores the
farm shares with them. The pipe's reader checks nothing.

The farm and the clients tune their sockets in the library
(L{privox.framing.tuneTransport}); the baseline servers and the raw pipe,
which are not library code, call the same function, so both sides are tuned
alike.

With C{--pvx1} the small-job measurement through the farm is driven by
PVX/1 peers instead (docs/protocol.rst §14): PVX/1 consumers (one connection
per job, as PVX/1 has it) and PVX/1 digest nodes. PVX/1 marks no ends, so
each job waits out the farm's C{pvx1_quiet} twice (header and transcript);
C{--pvx1-quiet} sets it. The baselines and the large jobs are unchanged.

With C{--tls} every connection is TLS (the farm on an C{ssl:} endpoint, as
a public farm runs; the baselines too), with a throwaway CA.

    PYTHONPATH=. .venv/bin/python bench/farm_relay.py [--quick] [--pvx1] [--tls]
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import signal
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, gatherResults  # noqa: E402
from twisted.internet.endpoints import (  # noqa: E402
    clientFromString,
    connectProtocol,
    serverFromString,
)
from twisted.internet.protocol import Factory, Protocol  # noqa: E402

from privox.framing import tuneTransport  # noqa: E402
from privox.engines.digest import fingerprint  # noqa: E402

from processes import (  # noqa: E402
    TWISTD_CODE,
    Children,
    cpuSeconds,
    cpuTimes,
    freePort,
    machineCpuSeconds,
)

MODEL = "bench:digest"
#: The PVX/1 name small jobs use with --pvx1 (the farm's default alias table
#: routes it as whisper:tiny.en, which PVX/1 nodes serve).
PVX1_MODEL = "tiny.en"
PVX1_KEY = b"bench-pvx1-key-0"
MB = 1_000_000
DATA_CHUNK = 1024 * 1024  # what the farm announces as max_frame by default


# --------------------------------------------------------------------------
# The servers: the farm (twistd) and the baselines (this script).

# The farm runs what the C{twistd} console script runs (processes.TWISTD_CODE),
# not C{python -m twisted}: that is C{twist}, which has no C{-n} or C{--pidfile}.

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
    is in, RSLT with the digest DigestHandler would give. No relaying, no
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
                    "text": fingerprint(job[4], job[3]),
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


def serveBaseline(jobsPort: int, pipePort: int, jobBytes: int, tlsDir: str | None) -> None:
    from twisted.internet import reactor

    serverFromString(reactor, serverEndpoint(jobsPort, tlsDir)).listen(
        Factory.forProtocol(DirectProducer)
    )
    serverFromString(reactor, serverEndpoint(pipePort, tlsDir)).listen(
        Factory.forProtocol(lambda: CountingSink(jobBytes))
    )
    reactor.run()


# --------------------------------------------------------------------------
# Endpoints: plain TCP on loopback, or with --tls every connection (to the
# farm, the direct server and the pipe's sink) is TLS, as on a public farm.


def makeTLS(folder: str) -> str:
    """
    A throwaway CA and a certificate for localhost in C{folder}; returns it.
    """
    from tests.test_tls import Authority

    ca = Authority("privox bench CA")
    cert, key = ca.issue()
    os.makedirs(os.path.join(folder, "ca"))
    for name, content in (("ca/ca.pem", ca.pem()), ("farm.pem", cert), ("farm.key", key)):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
    return folder


def serverEndpoint(port: int, tlsDir: str | None) -> str:
    if tlsDir is None:
        return f"tcp:{port}:interface=127.0.0.1"
    return (f"ssl:{port}:interface=127.0.0.1:privateKey={tlsDir}/farm.key"
            f":certKey={tlsDir}/farm.pem")


def clientEndpoint(port: int, tlsDir: str | None) -> str:
    if tlsDir is None:
        return f"tcp:127.0.0.1:{port}"
    return f"tls:host=localhost:port={port}:trustRoots={tlsDir}/ca"



# --------------------------------------------------------------------------
# The load: consumers and producers (this script with --load, one process
# per share of them).


#: How a producer fingerprints what it received, by --check name. Small jobs
#: always use sha256; large ones use --large-check.
CHECKS = ("sha256", "xxh3_128")


def newHash(check: str) -> Any:
    if check == "sha256":
        return hashlib.sha256()
    import xxhash

    return xxhash.xxh3_128()


def expectedText(data: bytes, check: str = "sha256") -> str:
    h = newHash(check)
    h.update(data)
    return fingerprint(h, len(data))


@dataclass
class Run:
    """
    What one measurement saw (one load process's share, or all of them).
    """

    seconds: float = 0.0
    jobs: int = 0
    bytes: int = 0
    latencies: list[float] = field(default_factory=list)
    verified: int = 0
    mismatched: int = 0
    #: CPU seconds used in the window: "server", "load" (all load
    #: processes) and "others" (everything else on the machine).
    cpu: dict[str, float] = field(default_factory=dict)

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

    def add(self, other: Run) -> None:
        self.jobs += other.jobs
        self.bytes += other.bytes
        self.latencies += other.latencies
        self.verified += other.verified
        self.mismatched += other.mismatched


async def connectProducers(
    reactor: Any, endpoint: str, count: int, check: str = "sha256"
) -> list[Any]:
    from privox.node.echo import DigestHandler
    from privox.node.worker import ProducerProtocol

    producers = []
    for _ in range(count):
        p = ProducerProtocol("stt", "", DigestHandler(newHash=lambda: newHash(check)))
        await connectProtocol(clientFromString(reactor, endpoint), p)
        await p.ready
        producers.append(p)
    return producers


class Pvx1DigestNode(Protocol):
    """
    A PVX/1 producer node: answers each STT job with the text DigestHandler
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
                self.transport.write(fingerprint(self._digest, self._size).encode())
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

    def __init__(self, reactor: Any, endpoint: str) -> None:
        self.reactor = reactor
        self.endpoint = endpoint

    async def stt(self, model: str, audio: bytes) -> _Text:
        job = _Pvx1Job(f"model={model}&len={len(audio)}&lang=en".encode(), audio)
        await connectProtocol(clientFromString(self.reactor, self.endpoint), job)
        return _Text((await job.done).decode("utf-8", "replace"))


async def connectPvx1Producers(reactor: Any, endpoint: str, count: int) -> list[Any]:
    producers = []
    for _ in range(count):
        p = Pvx1DigestNode()
        await connectProtocol(clientFromString(reactor, endpoint), p)
        await p.ready
        producers.append(p)
    return producers



async def connectConsumers(reactor: Any, endpoint: str, count: int) -> list[Any]:
    from privox.consumer import connectConsumer

    return [await connectConsumer(reactor, endpoint, "stt") for _ in range(count)]


async def connectPipes(reactor: Any, endpoint: str, count: int) -> list[Any]:
    writers = []
    for _ in range(count):
        w = PipeWriter()
        await connectProtocol(clientFromString(reactor, endpoint), w)
        writers.append(w)
    return writers


def disconnect(protocols: list[Any]) -> None:
    for p in protocols:
        transport = getattr(p, "transport", None)
        if transport is not None:
            transport.loseConnection()


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

    def stt(self, model: str, audio: bytes) -> Deferred[None]:
        # The job loop's call: the pipe has no result to check.
        return self.send(audio)

    def dataReceived(self, data: bytes) -> None:
        for _ in range(len(data)):
            d, self._waiting = self._waiting, None
            assert d is not None, "acknowledgement with nothing in flight"
            d.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(reason)




async def jobLoop(
    clients: list[Any], nextJob: Any, model: str, begin: float, end: float
) -> Run:
    """
    Every client submits job after job until C{end} (a C{time.time()}).
    Jobs that complete inside [begin, end] count.
    """
    run = Run(seconds=end - begin)

    async def loop(index: int, client: Any) -> None:
        seq = 0
        while time.time() < end:
            audio, expected = nextJob(index, seq)
            t0 = time.time()
            result = await client.stt(model, audio)
            t1 = time.time()
            run.check(result, expected)
            if begin <= t1 <= end:
                run.jobs += 1
                run.bytes += len(audio)
                run.latencies.append(t1 - t0)
            seq += 1

    await gatherResults(
        [Deferred.fromCoroutine(loop(i, c)) for i, c in enumerate(clients)],
        consumeErrors=True,
    )
    return run


def _tell(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def loadProcess(reactor: Any, args: argparse.Namespace) -> None:
    """
    One share of the load. Connects, says C{ready}; producers then serve
    until stdin closes. Consumers read C{BEGIN END} (C{time.time()} values)
    from stdin, run jobs until END and write their L{Run} as one JSON line.
    """
    from twisted.internet.threads import deferToThread

    kind, count, first = args.kind, args.count, args.first
    endpoint = clientEndpoint(args.port, args.tls_dir)
    if args.load == "producers":
        if kind == "pvx1":
            peers = await connectPvx1Producers(reactor, endpoint, count)
        else:
            peers = await connectProducers(reactor, endpoint, count, args.check)
        _tell("ready")
        await deferToThread(sys.stdin.read)
        disconnect(peers)
        return

    model = MODEL
    if kind == "small":
        clients = await connectConsumers(reactor, endpoint, count)
    elif kind == "pvx1":
        clients = [Pvx1Consumer(reactor, endpoint) for _ in range(count)]
        model = PVX1_MODEL
    elif kind == "large":
        clients = await connectConsumers(reactor, endpoint, count)
    else:  # "pipe"
        clients = await connectPipes(reactor, endpoint, count)

    if kind in ("small", "pvx1"):
        filler = os.urandom(args.bytes - 16)

        def nextJob(index: int, seq: int) -> tuple[bytes, str]:
            # Unique audio per job (across processes too): a result relayed
            # to the wrong consumer, or for the wrong job, cannot match.
            audio = struct.pack(">QQ", first + index, seq) + filler
            return audio, expectedText(audio)
    else:
        # Two distinct payloads per client, alternating: every upload in
        # flight differs from the others.
        base = os.urandom(args.bytes)
        payloads: dict[int, list[tuple[bytes, str]]] = {}
        for index in range(count):
            payloads[index] = []
            for n in range(2):
                audio = struct.pack(">QQ", first + index, n) + base[16:]
                payloads[index].append((audio, expectedText(audio, args.check)))

        def nextJob(index: int, seq: int) -> tuple[bytes, str]:
            return payloads[index][seq % 2]

    _tell("ready")
    begin, end = map(float, (await deferToThread(sys.stdin.readline)).split())
    run = await jobLoop(clients, nextJob, model, begin, end)
    _tell(json.dumps(asdict(run)))
    disconnect(clients)


# --------------------------------------------------------------------------
# The coordinator (this process): starts everything, times the windows and
# reads everyone's CPU time.


def shares(count: int, procs: int) -> list[int]:
    """
    C{count} clients over at most C{procs} processes, as evenly as can be.
    """
    procs = max(1, min(procs, count))
    return [count // procs + (i < count % procs) for i in range(procs)]


def sleepUntil(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)


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

    def __init__(self, children: Children, paths: dict[str, str] | None) -> None:
        self.children = children
        self.paths = paths

    def start(self) -> None:
        if self.paths:
            self.children.procs["farm"].send_signal(signal.SIGUSR2)

    def stop(self, phase: str) -> None:
        if not self.paths:
            return
        proc = self.children.procs["farm"]
        proc.send_signal(signal.SIGUSR2)
        deadline = time.time() + 30
        while not os.path.exists(self.paths[phase]):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the farm did not save its {phase}-job profile")
            time.sleep(0.05)


@dataclass
class Phase:
    """
    One measured window: C{server} (a child's name) serves on C{port};
    C{producers} clients of kind C{producerKind} (none for the baselines,
    which answer themselves) and C{consumers} clients of kind C{kind}.
    """

    name: str
    server: str
    port: int
    kind: str  # small, pvx1, large or pipe
    consumers: int
    bytes: int
    seconds: float
    warmup: float
    producers: int = 0
    producerKind: str = "pvx2"
    check: str = "sha256"  # how producers fingerprint uploads
    profile: str | None = None  # the farm profile's phase, if profiled


def measure(children: Children, phase: Phase, args: argparse.Namespace,
            profile: FarmProfile) -> Run:
    """
    Start the load processes, run the window, read everyone's CPU time at its
    edges, and gather the consumers' runs.
    """
    me = [sys.executable, os.path.abspath(__file__)]
    if args.tls_dir:
        me += ["--tls-dir", args.tls_dir]
    loads: list[str] = []
    first = 0
    for i, n in enumerate(shares(phase.producers, args.load_procs) if phase.producers else []):
        name = f"{phase.name}-producers-{i}"
        children.start(name, [*me, "--load", "producers", "--kind", phase.producerKind,
                              "--port", str(phase.port), "--count", str(n),
                              "--check", phase.check], piped=True)
        loads.append(name)
    consumers = []
    for i, n in enumerate(shares(phase.consumers, args.load_procs)):
        name = f"{phase.name}-consumers-{i}"
        children.start(name, [*me, "--load", "consumers", "--kind", phase.kind,
                              "--port", str(phase.port), "--count", str(n),
                              "--first", str(first), "--bytes", str(phase.bytes),
                              "--check", phase.check], piped=True)
        first += n
        consumers.append(name)
    loads += consumers
    # Producers first: they must have joined before the first job.
    for name in loads:
        if children.readLine(name).strip() != "ready":
            raise RuntimeError(f"{name} did not start:\n{children.tail(name)}")

    begin = time.time() + phase.warmup
    end = begin + phase.seconds
    for name in consumers:
        stdin = children.procs[name].stdin
        assert stdin is not None
        stdin.write(f"{begin!r} {end!r}\n".encode())
        stdin.flush()

    def cpu() -> dict[str, float]:
        user, system = cpuTimes(children.pid(phase.server))
        return {
            "server": user + system,
            "serverUser": user,
            "serverSys": system,
            "load": sum(cpuSeconds(children.pid(n)) for n in loads),
            "consumers": sum(cpuSeconds(children.pid(n)) for n in consumers),
            "machine": machineCpuSeconds(),
            "self": sum(os.times()[:2]),
        }

    sleepUntil(begin)
    if phase.profile:
        profile.start()
    before = cpu()
    sleepUntil(end)
    after = cpu()
    if phase.profile:
        profile.stop(phase.profile)

    run = Run(seconds=phase.seconds)
    for name in consumers:
        share = Run(**json.loads(children.readLine(name)))
        run.add(share)
    for name in loads:
        proc = children.procs[name]
        if proc.stdin is not None:
            proc.stdin.close()  # producers: stop serving
        proc.wait(30)
        del children.procs[name]
    used = {k: after[k] - before[k] for k in before}
    run.cpu = {
        "server": used["server"],
        "serverUser": used["serverUser"],
        "serverSys": used["serverSys"],
        "load": used["load"],
        "consumers": used["consumers"],
        "others": max(0.0, used["machine"] - used["server"] - used["load"] - used["self"]),
    }
    return run


def table(
    rows: list[tuple[str, ...]],
    header: tuple[str, ...] = ("measurement", "farm", "baseline", "ratio"),
) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
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


def perJob(r: Run) -> float:
    "The server's CPU per job, in microseconds."
    return r.cpu["server"] / r.jobs * 1e6 if r.jobs else float("nan")


def perMB(r: Run) -> float:
    "The server's CPU per MB relayed, in milliseconds."
    return r.cpu["server"] / (r.bytes / MB) * 1e3 if r.bytes else float("nan")


def merged(parts: list[Run]) -> Run:
    """
    Several windows of one server under one load, as one run.
    """
    run = Run()
    for part in parts:
        run.add(part)
        run.seconds += part.seconds
        for key, value in part.cpu.items():
            run.cpu[key] = run.cpu.get(key, 0.0) + value
    return run


def compareTable(runs: dict[tuple[str, str], Run]) -> str:
    """
    privox-farm against the asyncio farm on the same loads: the CPU each
    server spent per job and per MB, and the work per wall-clock second.
    """
    def split(r: Run) -> str:
        return (f"{r.cpu['serverUser'] / r.jobs * 1e6:.0f} + {r.cpu['serverSys'] / r.jobs * 1e6:.0f}"
                if r.jobs else "-")

    f32, a32, t32, f1, a1, t1 = (runs["farm", "32k"], runs["asyncio", "32k"], runs["twisted", "32k"],
                                 runs["farm", "1mb"], runs["asyncio", "1mb"], runs["twisted", "1mb"])

    def row(label: str, f: float, a: float, t: float, fmt: str) -> tuple[str, ...]:
        return (label, format(f, fmt), format(a, fmt), ratio(f, a), format(t, fmt), ratio(t, a))

    rows = [
        row("32 KB jobs/s (64c x 8p)", f32.jobs / f32.seconds, a32.jobs / a32.seconds,
            t32.jobs / t32.seconds, ",.0f"),
        row("32 KB: server CPU per job (us)", perJob(f32), perJob(a32), perJob(t32), ".0f"),
        ("  of which user + system (us)", split(f32), split(a32), "", split(t32), ""),
        row("1 MB jobs: MB/s (64c x 8p)", f1.bytes / MB / f1.seconds, a1.bytes / MB / a1.seconds,
            t1.bytes / MB / t1.seconds, ",.0f"),
        row("1 MB jobs: server CPU per MB (ms)", perMB(f1), perMB(a1), perMB(t1), ".2f"),
        row("1 MB jobs: server CPU per job (us)", perJob(f1), perJob(a1), perJob(t1), ".0f"),
    ]
    return ("privox-farm against bench/asyncio_farm.py, same load, same run (CPU ratios "
            "below 1: the farm spends less); the last two columns: the asyncio farm's "
            "code on Twisted's reactor, and its ratio to the asyncio farm:\n"
            + table(rows, ("measurement", "privox-farm", "asyncio farm", "ratio",
                           "same on Twisted", "ratio")))


def ratio(farm: float, base: float) -> str:
    return f"{farm / base:.2f}" if base else "-"


def benchmark(args: argparse.Namespace) -> None:
    logDir = tempfile.mkdtemp(prefix="privox-bench-")
    children = Children(logDir)
    # Also on Ctrl-C, which skips the finally below.
    atexit.register(children.stopAll)
    failed = True
    paths = profilePaths(args.profile_farm) if args.profile_farm else None
    try:
        farmPort, jobsPort, pipePort = freePort(), freePort(), freePort()
        if args.tls:
            args.tls_dir = makeTLS(os.path.join(logDir, "tls"))
        # --farm-log none: twistd logs to its stdout, which goes to /dev/null.
        # (Not --logfile /dev/null: twistd rotates a log file at 1 MB, and as
        # root that would rename /dev/null.)
        if args.farm_log == "journal":
            # As the systemd unit runs it: text lines on stdout (to a file
            # here, to journald there), written by privox.logs' own thread.
            logging = ["--logger", "privox.logs.textStdout"]
        else:
            farmLog = "-" if args.farm_log == "none" else os.path.join(logDir, "farm.log")
            logging = ["--logfile", farmLog]
        twistd = ["-n", "--pidfile=", "--reactor", args.farm_reactor, *logging, "privox-farm",
                  "--stt-listen", serverEndpoint(farmPort, args.tls_dir),
                  "--tts-listen", "none",
                  "--stats-interval", "0",
                  "--max-job-bytes", str(max(20_000_000, 2 * args.large_bytes))]
        if args.early_upload is not None:
            twistd += ["--early-upload", str(args.early_upload)]
        if args.splice_min is not None:
            twistd += ["--splice-min", str(args.splice_min)]
        if args.pvx1:
            twistd += ["--pvx1-quiet", str(args.pvx1_quiet)]
        if paths:
            for path in paths.values():
                if os.path.exists(path):
                    os.remove(path)
            # The farm saves its profiles in this order, one per phase run.
            phases = [phase for phase in ("small", "large") if args.only in (None, phase)]
            code = [TWISTD_PROFILED_CODE, json.dumps([paths[phase] for phase in phases])]
        else:
            code = [TWISTD_CODE]
        children.start("farm", [sys.executable, "-c", *code, *twistd],
                       discardStdout=args.farm_log == "none")
        profile = FarmProfile(children, paths)
        children.start("baseline", [
            sys.executable, os.path.abspath(__file__), "--serve-baseline",
            str(jobsPort), str(pipePort), str(args.large_bytes),
            *(["--tls-dir", args.tls_dir] if args.tls_dir else []),
        ])
        compare = not (args.tls or args.pvx1) and args.only in (None, "compare")
        if compare:
            asyncioPort = freePort()
            lean = os.path.join(os.path.dirname(os.path.abspath(__file__)), "asyncio_farm.py")
            leanJobBytes = str(max(20_000_000, 2 * args.large_bytes))
            children.start("asyncio", [sys.executable, lean, str(asyncioPort), "--max-job-bytes", leanJobBytes])
            twistedPort = freePort()
            children.start("twisted", [sys.executable, lean, str(twistedPort), "--max-job-bytes", leanJobBytes,
                                       "--reactor", "twisted", "--twisted-reactor", args.farm_reactor])
            children.waitForPort("asyncio", asyncioPort)
            children.waitForPort("twisted", twistedPort)
        children.waitForPort("farm", farmPort)
        children.waitForPort("baseline", jobsPort)
        children.waitForPort("baseline", pipePort)
        print(
            f"farm pid {children.pid('farm')} on port {farmPort}, "
            f"baseline pid {children.pid('baseline')}; {os.cpu_count()} cores; "
            f"load in up to {args.load_procs} consumer + {args.load_procs} producer processes; "
            f"farm log: {args.farm_log}"
            + ("; every connection TLS" if args.tls else "")
            + ("; farm profiled (slower)" if paths else ""),
            flush=True,
        )
        load0 = os.getloadavg()[0]

        small = dict(bytes=args.small_bytes, seconds=args.duration, warmup=args.warmup)
        large = dict(bytes=args.large_bytes, seconds=args.large_duration, warmup=args.warmup)
        fs = bs = fl = bl = Run()  # what --only skips
        if args.only in (None, "small"):
            print(f"small jobs through the farm{' (PVX/1 peers)' if args.pvx1 else ''} "
                  f"({args.duration:g} s)...", flush=True)
            fs = measure(children, Phase(
                "farm-small", "farm", farmPort, "pvx1" if args.pvx1 else "small", args.consumers,
                producers=args.producers, producerKind="pvx1" if args.pvx1 else "pvx2",
                profile="small", **small), args, profile)
            print(f"small jobs, direct baseline ({args.duration:g} s)...", flush=True)
            bs = measure(children, Phase(
                "direct-small", "baseline", jobsPort, "small", args.consumers, **small),
                args, profile)
        if args.only in (None, "large"):
            print(f"large jobs through the farm ({args.large_bytes / MB:g} MB, "
                  f"{args.large_duration:g} s)...", flush=True)
            fl = measure(children, Phase(
                "farm-large", "farm", farmPort, "large", args.large_consumers,
                producers=args.large_producers, check=args.large_check, profile="large", **large),
                args, profile)
            print(f"large jobs, plain TCP pipe baseline ({args.large_bytes / MB:g} MB, "
                  f"{args.large_duration:g} s)...", flush=True)
            bl = measure(children, Phase(
                "pipe-large", "baseline", pipePort, "pipe", args.large_consumers, **large),
                args, profile)

        tls = ", TLS" if args.tls else ""
        smallLabel = f"{args.consumers}c x {args.producers}p, {args.small_bytes} B{tls}"
        if args.pvx1:
            smallLabel = f"PVX/1 peers, quiet {args.pvx1_quiet:g} s, {smallLabel}"
        largeLabel = (f"{args.large_consumers}c x {args.large_producers}p, "
                      f"{args.large_bytes / MB:g} MB, {args.large_check}{tls}")
        ms = 1000.0

        def pct(r: Run, who: str) -> str:
            return f"{100 * r.cpu[who] / r.seconds:.0f}"

        def perCore(r: Run, amount: float) -> float:
            return amount / r.cpu["server"] if r.cpu["server"] else float("nan")

        def split(r: Run, per: float, unit: float) -> str:
            # The server's CPU per unit of work, as user + system time.
            return f"{r.cpu['serverUser'] * unit / per:.0f} + {r.cpu['serverSys'] * unit / per:.0f}"

        def loadSplit(r: Run, gb: float) -> str:
            # For the pipe, the consumers are its writers and there are no producers.
            consumers = r.cpu["consumers"]
            return f"{1000 * consumers / gb:.0f} + {1000 * (r.cpu['load'] - consumers) / gb:.0f}"

        rows = []
        summary = []
        if args.only in (None, "small"):
            fsRate, bsRate = fs.jobs / fs.seconds, bs.jobs / bs.seconds
            fsCore, bsCore = perCore(fs, fs.jobs), perCore(bs, bs.jobs)
            rows += [
                (f"small jobs/s ({smallLabel})", f"{fsRate:,.0f}", f"{bsRate:,.0f}", ratio(fsRate, bsRate)),
                ("small latency p50 (ms)", f"{fs.percentile(50) * ms:.2f}", f"{bs.percentile(50) * ms:.2f}",
                 ratio(fs.percentile(50), bs.percentile(50))),
                ("small latency p99 (ms)", f"{fs.percentile(99) * ms:.2f}", f"{bs.percentile(99) * ms:.2f}",
                 ratio(fs.percentile(99), bs.percentile(99))),
                ("small: server CPU (% of a core)", pct(fs, "server"), pct(bs, "server"), ""),
                ("small: load CPU (% of a core)", pct(fs, "load"), pct(bs, "load"), ""),
                ("small: other CPU (% of a core)", pct(fs, "others"), pct(bs, "others"), ""),
                ("small: server CPU per job (us)", f"{1e6 / fsCore:.0f}", f"{1e6 / bsCore:.0f}",
                 ratio(bsCore, fsCore)),
                ("  of which user + system (us)", split(fs, fs.jobs, 1e6), split(bs, bs.jobs, 1e6), ""),
                ("small jobs/s per server core", f"{fsCore:,.0f}", f"{bsCore:,.0f}", ratio(fsCore, bsCore)),
            ]
            summary.append(f"small jobs/s per farm core {fsCore:,.0f} (target 3,000)")
        if args.only in (None, "large"):
            flRate, blRate = fl.bytes / MB / fl.seconds, bl.bytes / MB / bl.seconds
            flCore, blCore = perCore(fl, fl.bytes / MB), perCore(bl, bl.bytes / MB)
            pipeCore = bl.bytes / MB / (bl.cpu["server"] + bl.cpu["load"])
            rows += [
                (f"large MB/s ({largeLabel})", f"{flRate:,.0f}", f"{blRate:,.0f}", ratio(flRate, blRate)),
                ("large job time p50 (ms)", f"{fl.percentile(50) * ms:.1f}", f"{bl.percentile(50) * ms:.1f}",
                 ratio(fl.percentile(50), bl.percentile(50))),
                ("large: server CPU (% of a core)", pct(fl, "server"), pct(bl, "server"), ""),
                ("large: load CPU (% of a core)", pct(fl, "load"), pct(bl, "load"), ""),
                ("large: other CPU (% of a core)", pct(fl, "others"), pct(bl, "others"), ""),
                ("large: load CPU ms per GB, consumers + producers",
                 loadSplit(fl, fl.bytes / MB / 1000), loadSplit(bl, bl.bytes / MB / 1000), ""),
                ("large: server CPU ms per GB", f"{1e6 / flCore:.0f}", f"{1e6 / blCore:.0f}",
                 ratio(blCore, flCore)),
                ("  of which user + system (ms)", split(fl, fl.bytes / MB / 1000, 1000),
                 split(bl, bl.bytes / MB / 1000, 1000), ""),
                ("large MB/s per server core", f"{flCore:,.0f}", f"{blCore:,.0f}", ratio(flCore, blCore)),
                # What a core buys: the farm alone against the pipe's writer
                # and reader together (the load, for the pipe, is its writers).
                ("large MB/s per core: farm | pipe ends", f"{flCore:,.0f}", f"{pipeCore:,.0f}",
                 ratio(flCore, pipeCore)),
            ]
            summary.append(
                f"large MB/s farm / pipe {flRate / blRate:.2f} (target 0.50), "
                f"per core {flCore / pipeCore:.2f}"
            )
        print()
        if rows:
            print(table(rows))
        print()
        verified = fs.verified + bs.verified + fl.verified
        mismatched = fs.mismatched + bs.mismatched + fl.mismatched
        if compare:
            # The servers take turns, a short window each, several rounds,
            # each round starting with the next server: the machine's drift
            # (its other tenants) then weighs on all of them alike.
            rounds = args.compare_rounds
            lean = dict(seconds=args.duration / rounds, warmup=args.warmup)
            servers = [("farm", farmPort, "privox-farm"),
                       ("asyncio", asyncioPort, "the asyncio farm"),
                       ("twisted", twistedPort, "the asyncio farm's code on Twisted")]
            runs = {}
            windows: dict[tuple[str, str], list[Run]] = {}
            for label, kind, size, check in (("32k", "small", 32 * 1024, "sha256"),
                                             ("1mb", "large", MB, args.large_check)):
                print(f"{size // 1024} KB jobs through privox-farm, the asyncio farm and its code"
                      f" on Twisted (64c x 8p), {rounds} rounds of"
                      f" {args.duration / rounds:g} s each...", flush=True)
                for r in range(rounds):
                    for server, port, name in servers[r % 3:] + servers[:r % 3]:
                        windows.setdefault((server, label), []).append(measure(children, Phase(
                            f"{server}-{label}", server, port, kind, 64, bytes=size,
                            producers=8, check=check, **lean), args, profile))
            runs = {key: merged(parts) for key, parts in windows.items()}
            print()
            print("privox-farm / asyncio farm, CPU per 32 KB job, each round: "
                  + ", ".join(ratio(perJob(f), perJob(a)) for f, a in
                              zip(windows["farm", "32k"], windows["asyncio", "32k"])))
            print()
            print(compareTable(runs))
            print()
            for r in runs.values():
                verified += r.verified
                mismatched += r.mismatched
        print(
            f"digests verified: {verified} results matched their input, {mismatched} mixed up "
            f"(farm: {fs.verified} small, sha256, + {fl.verified} large, {args.large_check}; "
            f"direct baseline: {bs.verified} small)"
        )
        print(
            "server = the farm (farm column), the direct PVX/2 server or the pipe's reader "
            "(baseline column); load = the consumer and producer processes; other = the rest "
            "of the machine. Per server core = work done / the server's own CPU seconds."
        )
        print(
            f"issue 9{' (every connection TLS)' if args.tls else ''}: {'; '.join(summary)}. "
            f"Load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end."
        )
        failed = mismatched > 0
    finally:
        children.finish(failed)
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
    p.add_argument("--quick", action="store_true", help="a short run (about 20 s)")
    p.add_argument("--consumers", type=int, default=8, help="parallel consumers, small jobs [8]")
    p.add_argument("--producers", type=int, default=8, help="DigestHandler producers [8]")
    p.add_argument("--small-bytes", type=int, default=1024, help="small job upload size [1024]")
    p.add_argument("--duration", type=float, help="seconds each small-job run is measured [10; quick 3]")
    p.add_argument("--warmup", type=float, help="seconds before measuring starts [1; quick 0.5]")
    p.add_argument("--large-bytes", type=int, default=10 * MB, help="large upload size [10 MB]")
    p.add_argument("--large-duration", type=float,
                   help="seconds each large-job run is measured [10; quick 3]")
    p.add_argument("--large-consumers", type=int, default=2, help="parallel large uploads [2]")
    p.add_argument("--large-producers", type=int, help="producers for large jobs [= --large-consumers]")
    p.add_argument("--large-check", choices=CHECKS, default="xxh3_128",
                   help="how producers fingerprint each large upload, checked by its consumer: "
                   "xxh3_128 (the xxhash package; about 0.02 CPU-s per GB) or sha256 (about "
                   "0.6 CPU-s per GB, a third of what the load may use) [xxh3_128]")
    p.add_argument("--load-procs", type=int, default=2,
                   help="processes the consumers are spread over, and as many for the producers [2]")
    p.add_argument("--compare-rounds", type=int, default=5,
                   help="the servers compared take turns this many times, each for"
                        " --duration / rounds seconds a turn [5]")
    p.add_argument("--only", choices=["small", "large", "compare"],
                   help="measure only the small jobs, the large jobs or the comparison with "
                   "the asyncio farm (all three by default)")
    p.add_argument("--farm-reactor", default="privox", metavar="NAME",
                   help="twistd's --reactor for the farm [privox, as its systemd unit runs it]")
    p.add_argument("--farm-log", choices=["journal", "file", "none"], default="journal",
                   help="the farm logs as its systemd unit does, text on stdout through "
                   "privox.logs.textStdout, here into a file (journal); through twistd's "
                   "--logfile into a file (file), a write per line; or to /dev/null (none) "
                   "[journal]")
    p.add_argument("--splice-min", type=int, metavar="BYTES",
                   help="the farm's --splice-min (its default: 131072); 0 relays every "
                   "byte through the farm's memory")
    p.add_argument("--early-upload", type=int, metavar="BYTES",
                   help="the farm's --early-upload (its default: 65536); 0 makes every "
                   "consumer wait for ASGN before it uploads")
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
    p.add_argument("--tls", action="store_true",
                   help="every connection TLS (the farm on an ssl: endpoint, as docs/operating.rst "
                   "sets up a public farm; the direct server and the pipe's sink too), with a "
                   "throwaway CA; the farm then relays through its memory, never splicing")
    p.add_argument("--tls-dir", help=argparse.SUPPRESS)
    p.add_argument("--serve-baseline", nargs=3, type=int, metavar=("JOBS_PORT", "PIPE_PORT", "JOB_BYTES"),
                   help=argparse.SUPPRESS)
    # A load process (started by the benchmark itself).
    p.add_argument("--load", choices=["consumers", "producers"], help=argparse.SUPPRESS)
    p.add_argument("--kind", default="small", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--check", choices=CHECKS, default="sha256", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.large_duration is None:
        args.large_duration = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.0
    if args.large_producers is None:
        args.large_producers = args.large_consumers
    if args.small_bytes < 16 or args.large_bytes < 16:
        p.error("--small-bytes and --large-bytes must be at least 16")
    if args.large_check != "sha256" and not args.load:
        try:
            newHash(args.large_check)
        except ImportError:
            p.error("--large-check xxh3_128 needs the xxhash package "
                    "(make bench installs it; or pass --large-check sha256)")
    if args.tls and args.pvx1:
        p.error("--tls and --pvx1 are not measured together")
    if args.load_procs < 1:
        p.error("--load-procs must be at least 1")
    if args.profile_farm:
        args.profile_farm = os.path.abspath(args.profile_farm)
        if not os.path.isdir(os.path.dirname(args.profile_farm)):
            p.error(f"--profile-farm: no folder {os.path.dirname(args.profile_farm)}")
    return args


def main(argv: list[str]) -> None:
    args = parseArgs(argv)
    if args.serve_baseline:
        serveBaseline(*args.serve_baseline, args.tls_dir)
    elif args.load:
        task.react(lambda reactor: Deferred.fromCoroutine(loadProcess(reactor, args)))
    else:
        benchmark(args)


if __name__ == "__main__":
    main(sys.argv[1:])
