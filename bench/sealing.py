"""
What does sealing jobs end to end cost (privox.sealing, privox.identity)?

Runs, in one go, sealed jobs beside the same jobs in the clear:

  1. Through a real farm (C{twistd privox-farm}, started as
     C{bench/farm_relay.py} starts it), with the load in processes of its
     own: persistent consumers (the API's side) and DigestHandler producers
     (the node's side), 32 KiB STT uploads, then 1 MB ones. Sealed, the
     producers offer a seal (an identity key, and a certificate of it that
     the bench's own exchange key signed) and the consumers send every job
     with C{SealPolicy("required", exchange)}: a job not sealed end to end
     fails, so every result counted was sealed (and the producers count the
     sealed jobs they ran). In the clear, the producers have no sealer and
     the consumers no policy. Both modes start as many jobs a second
     (C{--small-rate}, C{--large-rate}): a farm's CPU per job depends on how
     busy it is (the busier, the more each read and write carries). The
     coordinator reads each process's CPU time (/proc/PID/stat) at the
     edges of each window: the farm's per job and per MB (sealing should
     not change it: the farm relays as many bytes), the consumers' and the
     producers' (what sealing adds there). Sealed and clear windows take
     turns, in an order that flips each round, so that a machine getting
     busier or quieter weighs on both.
  2. In this process, the CPU time (C{time.thread_time}: other work on the
     machine does not count) of each piece of sealing work, to explain
     part 1: per job on the consumer a fresh X25519 key, the node's offer
     checked (its certificate and its key's signature: two Ed25519
     verifies), X25519 and HKDF; on the node X25519 and HKDF; per MB the
     sealing of an upload and its opening; and the page faults of each.

Every result is checked against its input: sha256 for 32 KiB jobs, xxh3-128
for 1 MB jobs (sha256 without the xxhash package), as in farm_relay.py.

    PYTHONPATH=. .venv/bin/python bench/sealing.py [--quick] [--rounds N] [--duration S]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import statistics
import struct
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict
from typing import Any, Callable, Iterator, NamedTuple

_BENCH = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_BENCH)
for _path in (_REPO, _BENCH):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305  # noqa: E402
from cryptography.hazmat.primitives.hashes import SHA256  # noqa: E402
from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, gatherResults  # noqa: E402
from twisted.internet.endpoints import clientFromString, connectProtocol  # noqa: E402

from privox.identity import (  # noqa: E402
    Certificate,
    ConnectionOffer,
    decodeKey,
    encodeKey,
    exchangePublicKey,
    publicBytes,
)
from privox.sealing import (  # noqa: E402
    REQUIRED,
    RESULT,
    UPLOAD,
    Ephemeral,
    Opener,
    SealPolicy,
    Unpacker,
    nodeKeys,
    packed,
    seal,
)

from farm_relay import (  # noqa: E402
    MODEL,
    Run,
    disconnect,
    expectedText,
    jobLoop,
    merged,
    newHash,
    ratio,
    shares,
    sleepUntil,
)
from api import CONTENT_TYPE, multipart, smallWav  # noqa: E402
from processes import (  # noqa: E402
    TWISTD_CODE,
    Children,
    cpuTimes,
    freePort,
    machineCpuSeconds,
)

MB = 1_000_000
KB = 1024
MODES = ("clear", "sealed")
#: Part 4's keys (an allow-list: no quotas to run out of) and the API's
#: quality whose model is the node's model-free STT engine.
DAEMON_USER_KEY = "bench-user-key-0123456789"
DAEMON_NODE_KEY = "bench-node-key-0123456789"
DAEMON_QUALITY = "bench"


# --------------------------------------------------------------------------
# The load (this script with --load): consumers or producers, sealed or not.


class NodeSealer:
    """
    A node's sealer as privox.node.enrolment's gives it: each connection
    gets a fresh X25519 key, offered with the node's certificate.
    """

    def __init__(self, identity: Ed25519PrivateKey, certificate: Certificate) -> None:
        self.identity = identity
        self.certificate = certificate

    def offer(self) -> tuple[X25519PrivateKey, ConnectionOffer]:
        return ConnectionOffer.make(self.identity, self.certificate)


def _tell(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def runProducers(reactor: Any, args: argparse.Namespace, endpoint: str) -> None:
    from twisted.internet.threads import deferToThread

    from privox.node.echo import DigestHandler
    from privox.node.worker import ProducerProtocol

    seen: Counter[str] = Counter()

    class CountingHandler(DigestHandler):
        # Which jobs came sealed: the JOB_ of a sealed job names the
        # consumer's ephemeral key, and ours if it came sealed early.
        def start(self, job: dict[str, Any]) -> Any:
            seen["sealed" if "seal" in job else "clear"] += 1
            seen["early"] += "for" in job.get("seal", {})
            return super().start(job)

    sealer = None
    if args.node:
        identityText, certificateText = args.node.split(":", 1)
        exchange = exchangePublicKey(args.exchange)
        certificate = Certificate.verify(certificateText, exchange, time.time())
        identity = Ed25519PrivateKey.from_private_bytes(decodeKey(identityText))
        if certificate.identity != publicBytes(identity.public_key()):
            raise SystemExit("the certificate is not this node's")
        sealer = NodeSealer(identity, certificate)
    check = args.check
    producers = []
    for _ in range(args.count):
        handler = CountingHandler(newHash=lambda: newHash(check))
        p = ProducerProtocol("stt", "", handler, sealer)
        await connectProtocol(clientFromString(reactor, endpoint), p)
        await p.ready
        producers.append(p)
    _tell("ready")
    await deferToThread(sys.stdin.read)
    disconnect(producers)
    _tell(json.dumps(dict(seen)))


class SealingClient:
    """
    A consumer whose every job is sealed with C{policy} (what jobLoop calls).
    """

    def __init__(self, consumer: Any, policy: SealPolicy) -> None:
        self.consumer = consumer
        self.policy = policy

    def stt(self, model: str, audio: bytes) -> Deferred[Any]:
        return self.consumer.stt(model, audio, seal=self.policy)


async def runConsumers(reactor: Any, args: argparse.Namespace, endpoint: str) -> None:
    from twisted.internet.threads import deferToThread

    from privox.consumer import connectConsumer

    consumers = [await connectConsumer(reactor, endpoint, "stt") for _ in range(args.count)]
    clients: list[Any] = consumers
    if args.exchange:
        policy = SealPolicy(REQUIRED, exchangePublicKey(args.exchange))
        clients = [SealingClient(c, policy) for c in consumers]
    first, check = args.first, args.check
    if args.bytes < 64 * KB:
        filler = os.urandom(args.bytes - 16)

        def nextJob(index: int, seq: int) -> tuple[bytes, str]:
            # Unique audio per job (across processes too): a result relayed
            # to the wrong consumer, or for the wrong job, cannot match.
            audio = struct.pack(">QQ", first + index, seq) + filler
            return audio, expectedText(audio, check)
    else:
        # Two payloads per client, alternating, each unlike every other.
        base = os.urandom(args.bytes)
        payloads = {}
        for index in range(args.count):
            payloads[index] = []
            for n in range(2):
                audio = struct.pack(">QQ", first + index, n) + base[16:]
                payloads[index].append((audio, expectedText(audio, check)))

        def nextJob(index: int, seq: int) -> tuple[bytes, str]:
            return payloads[index][seq % 2]

    _tell("ready")
    begin, end = map(float, (await deferToThread(sys.stdin.readline)).split())
    if args.rate:
        run = await pacedLoop(reactor, clients, nextJob, begin, end, args.rate, first, args.total)
    else:
        run = await jobLoop(clients, nextJob, MODEL, begin, end)
    _tell(json.dumps(asdict(run)))
    disconnect(consumers)


async def pacedLoop(reactor: Any, clients: list[Any], nextJob: Any, begin: float, end: float,
                    rate: float, first: int, total: int) -> Run:
    """
    As L{farm_relay.jobLoop}, but all C{total} consumers (of every load
    process) together start C{rate} jobs a second, evenly spread: consumer
    C{first + index} starts one every C{total / rate} seconds; one that
    ends late is followed at once by the next, but it catches up by at most
    one job.
    """
    run = Run(seconds=end - begin)
    interval = total / rate
    start = time.time()

    async def loop(index: int, client: Any) -> None:
        seq = 0
        due = start + (first + index) / rate
        while due < end:
            delay = due - time.time()
            if delay > 0:
                await task.deferLater(reactor, delay)
            audio, expected = nextJob(index, seq)
            t0 = time.time()
            result = await client.stt(MODEL, audio)
            t1 = time.time()
            run.check(result, expected)
            if begin <= t1 <= end:
                run.jobs += 1
                run.bytes += len(audio)
                run.latencies.append(t1 - t0)
            seq += 1
            due = max(due + interval, t1 - interval)

    await gatherResults(
        [Deferred.fromCoroutine(loop(i, c)) for i, c in enumerate(clients)],
        consumeErrors=True,
    )
    return run


class Answer(NamedTuple):
    text: str


class HttpSTT:
    """
    A user of the API, as L{pacedLoop} calls its clients: C{POST /stt},
    multipart, as C{curl -F} sends it, over a pool of persistent
    connections. The answer is the digest engine's text (or the error).
    """

    def __init__(self, http: Any, url: str, key: str) -> None:
        self.http = http
        self.url = url
        self.key = key

    def stt(self, model: str, audio: bytes) -> Deferred[Answer]:
        return Deferred.fromCoroutine(self._post(audio))

    async def _post(self, audio: bytes) -> Answer:
        response = await self.http.post(
            self.url, data=multipart({"key": self.key, "quality": DAEMON_QUALITY}, audio),
            headers={"Content-Type": CONTENT_TYPE},
        )
        text = await response.text()
        return Answer(text.rstrip("\n") if response.code == 200 else f"{response.code}: {text}")


async def runHttpClients(reactor: Any, args: argparse.Namespace) -> None:
    from treq.client import HTTPClient
    from twisted.internet.threads import deferToThread
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = args.count
    pool.retryAutomatically = False
    http = HTTPClient(Agent(reactor, pool=pool))
    clients = [HttpSTT(http, args.api + "/stt", DAEMON_USER_KEY) for _ in range(args.count)]
    template, offset = smallWav(args.bytes)
    first = args.first

    def nextJob(index: int, seq: int) -> tuple[bytes, str]:
        # A WAV unlike every other (across processes too): an answer given
        # to the wrong request cannot match.
        wav = template[:offset] + struct.pack(">QQ", first + index, seq) + template[offset + 16:]
        return wav, expectedText(wav, "sha256")

    _tell("ready")
    begin, end = map(float, (await deferToThread(sys.stdin.readline)).split())
    run = await pacedLoop(reactor, clients, nextJob, begin, end, args.rate, first, args.total)
    _tell(json.dumps(asdict(run)))
    await pool.closeCachedConnections()


async def loadProcess(reactor: Any, args: argparse.Namespace) -> None:
    endpoint = f"tcp:127.0.0.1:{args.port}"
    if args.load == "producers":
        await runProducers(reactor, args, endpoint)
    elif args.load == "http":
        await runHttpClients(reactor, args)
    else:
        await runConsumers(reactor, args, endpoint)


# --------------------------------------------------------------------------
# The coordinator: the farm, and one measured window per size and mode.


class Exchange:
    """
    The bench's exchange: its signing key, and a certificate for each node.
    """

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public = encodeKey(publicBytes(self.key.public_key()))

    def node(self) -> str:
        """
        A new node's identity key and certificate, as --node takes them.
        """
        identity = Ed25519PrivateKey.generate()
        certificate = Certificate.issue(
            self.key, publicBytes(identity.public_key()), "bench", time.time()
        )
        return f"{encodeKey(identity.private_bytes_raw())}:{certificate.text}"


def startFarm(children: Children, args: argparse.Namespace, name: str = "farm") -> int:
    port = freePort()
    twistd = ["-n", "--reactor=privox", "--pidfile=", "--logger", "privox.logs.textStdout", "privox-farm",
              "--stt-listen", f"tcp:{port}:interface=127.0.0.1",
              "--tts-listen", "none",
              "--stats-interval", "0",
              "--max-job-bytes", str(max(20_000_000, 2 * args.large_bytes))]
    if args.early_upload is not None:
        twistd += ["--early-upload", str(args.early_upload)]
    children.start(name, [sys.executable, "-c", TWISTD_CODE, *twistd])
    children.waitForPort(name, port)
    return port


def measure(children: Children, args: argparse.Namespace, exchange: Exchange, port: int,
            name: str, size: int, rate: float, sealed: bool) -> Run:
    """
    One window: start the load processes, let them run, read everyone's CPU
    time at the window's edges and gather the consumers' runs.
    """
    me = [sys.executable, os.path.abspath(__file__), "--port", str(port)]
    check = "sha256" if size < 64 * KB else args.large_check
    producers, consumers = [], []
    for i, n in enumerate(shares(args.producers, args.load_procs)):
        label = f"{name}-producers-{i}"
        sealing = [f"--exchange={exchange.public}", f"--node={exchange.node()}"] if sealed else []
        children.start(label, [*me, "--load", "producers", "--count", str(n),
                               "--check", check, *sealing], piped=True)
        producers.append(label)
    first = 0
    for i, n in enumerate(shares(args.consumers, args.load_procs)):
        label = f"{name}-consumers-{i}"
        sealing = [f"--exchange={exchange.public}"] if sealed else []
        children.start(label, [*me, "--load", "consumers", "--count", str(n),
                               "--first", str(first), "--bytes", str(size),
                               "--rate", repr(rate), "--total", str(args.consumers),
                               "--check", check, *sealing], piped=True)
        first += n
        consumers.append(label)
    for label in producers + consumers:  # producers first: they join before any job
        if children.readLine(label).strip() != "ready":
            raise RuntimeError(f"{label} did not start:\n{children.tail(label)}")

    begin = time.time() + args.warmup
    end = begin + args.duration
    for label in consumers:
        stdin = children.procs[label].stdin
        assert stdin is not None
        stdin.write(f"{begin!r} {end!r}\n".encode())
        stdin.flush()

    def cpu() -> dict[str, float]:
        return {
            "farm": sum(cpuTimes(children.pid("farm"))),
            **contextSwitches(children.pid("farm"), "farm"),
            "consumers": sum(sum(cpuTimes(children.pid(n))) for n in consumers),
            "producers": sum(sum(cpuTimes(children.pid(n))) for n in producers),
            "consumersSystem": sum(cpuTimes(children.pid(n))[1] for n in consumers),
            "producersSystem": sum(cpuTimes(children.pid(n))[1] for n in producers),
            "consumersFaults": sum(minorFaults(children.pid(n)) for n in consumers),
            "producersFaults": sum(minorFaults(children.pid(n)) for n in producers),
            "machine": machineCpuSeconds(),
            "self": sum(os.times()[:2]),
        }

    sleepUntil(begin)
    before = cpu()
    sleepUntil(end)
    after = cpu()

    run = Run(seconds=args.duration)
    for label in consumers:
        run.add(Run(**json.loads(children.readLine(label))))
    seen: Counter[str] = Counter()
    for label in producers:
        stdin = children.procs[label].stdin
        assert stdin is not None
        stdin.close()  # stop serving, then say what was served
        seen.update(json.loads(children.readLine(label)))
    for label in producers + consumers:
        children.procs[label].wait(30)
        del children.procs[label]
    used = {k: after[k] - before[k] for k in before}
    used["others"] = max(0.0, used["machine"] - used["farm"] - used["consumers"]
                         - used["producers"] - used["self"])
    run.cpu = used
    # Every job a producer ran: sealed ones in the sealed window, none else.
    run.cpu["sealedJobs"] = float(seen["sealed"])
    run.cpu["clearJobs"] = float(seen["clear"])
    run.cpu["earlyJobs"] = float(seen["early"])
    return run


class Daemons(NamedTuple):
    #: The API's base URL for each mode: one API seals (--e2e required),
    #: the other does not (--e2e off); the same node serves both.
    urls: dict[str, str]


def waitForText(children: Children, name: str, marker: bytes, timeout: float = 60.0) -> None:
    proc = children.procs[name]
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{children.tail(name)}")
        with open(children.path(name, "out"), "rb") as f:
            if marker in f.read():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not say {marker!r}:\n{children.tail(name)}")
        time.sleep(0.05)


def startDaemons(children: Children, args: argparse.Namespace) -> Daemons:
    """
    Part 4's exchange, each daemon a process of its own, as an operator
    runs them: C{twistd privox-farm}, two C{privox-api} (sealing required,
    and off) and a C{privox-node} with the model-free C{digest} engine,
    enrolled with the first API. Keys come from an allow-list.
    """
    farmPort = startFarm(children, args, "dfarm")
    keys = children.path("keys", "txt")
    with open(keys, "w") as f:
        f.write(f"{DAEMON_USER_KEY}\n{DAEMON_NODE_KEY}\n")
    farm = f"bench tcp:host=127.0.0.1:port={farmPort} none"
    urls = {}
    for mode, e2e in (("sealed", "required"), ("clear", "off")):
        port = freePort()
        name = f"api-{mode}"
        children.start(name, [sys.executable, "-c", TWISTD_CODE, "-n", "--reactor=privox", "--pidfile=",
                              "privox-api", "--listen", f"tcp:{port}:interface=127.0.0.1",
                              "--accounts", "none", "--keys", keys, "--farm", farm,
                              "--exchange-key", children.path("exchange", "key"),
                              "--e2e", e2e, "--stt-model", f"{DAEMON_QUALITY} digest:bench"])
        waitForText(children, name, b"starting on %d" % port)
        urls[mode] = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(urls["sealed"] + "/v1/exchange") as response:
        exchangeKey = json.load(response)["key"]
    children.start("node", [sys.executable, "-c", TWISTD_CODE, "-n", "--reactor=privox", "--pidfile=",
                            "privox-node", "--stt", "digest:bench",
                            "--stt-farm", f"tcp:host=127.0.0.1:port={farmPort}",
                            "--slots", str(args.node_slots), "--key", DAEMON_NODE_KEY,
                            "--exchange", urls["sealed"], "--exchange-key", exchangeKey,
                            "--state-dir", children.path("node", "state")])
    waitForText(children, "node", b"enrolled with")
    waitForText(children, "node", b"serving stt through")
    return Daemons(urls)


def measureDaemons(children: Children, args: argparse.Namespace, daemons: Daemons,
                   name: str, size: int, rate: float, mode: str) -> Run:
    """
    One window of part 4: HTTP users post WAVs to the API of C{mode}; the
    CPU time of that API, the node and the farm is read at its edges.
    """
    label = f"{name}-users"
    children.start(label, [sys.executable, os.path.abspath(__file__), "--load", "http",
                           "--api", daemons.urls[mode], "--count", str(args.users),
                           "--bytes", str(size), "--rate", repr(rate),
                           "--total", str(args.users)], piped=True)
    if children.readLine(label).strip() != "ready":
        raise RuntimeError(f"{label} did not start:\n{children.tail(label)}")
    begin = time.time() + args.warmup
    end = begin + args.duration
    stdin = children.procs[label].stdin
    assert stdin is not None
    stdin.write(f"{begin!r} {end!r}\n".encode())
    stdin.flush()
    watched = {"api": f"api-{mode}", "node": "node", "farm": "dfarm"}

    def cpu() -> dict[str, float]:
        out = {who: sum(cpuTimes(children.pid(n))) for who, n in watched.items()}
        out.update({who + "System": cpuTimes(children.pid(n))[1] for who, n in watched.items()})
        out.update({who + "Faults": minorFaults(children.pid(n)) for who, n in watched.items()})
        return out

    sleepUntil(begin)
    before = cpu()
    sleepUntil(end)
    after = cpu()
    run = Run(**json.loads(children.readLine(label)))
    run.seconds = args.duration
    children.procs[label].wait(30)
    del children.procs[label]
    run.cpu = {k: after[k] - before[k] for k in before}
    return run


def contextSwitches(pid: int, who: str) -> dict[str, float]:
    """
    How often process C{pid} has waited (voluntary: nothing to do until an
    event, so a wake-up each) and been preempted (involuntary: another
    process took its core), from /proc/PID/status.
    """
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                name, value = line.split(":")
                out[who + ("Waits" if name.startswith("vol") else "Preempted")] = float(value)
    return out


def minorFaults(pid: int) -> int:
    """
    The page faults process C{pid} has taken so far that read no disk: each
    page of fresh memory it touched (/proc/PID/stat).
    """
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def perJob(r: Run, who: str) -> float:
    """
    CPU µs per job.
    """
    return r.cpu[who] / r.jobs * 1e6 if r.jobs else float("nan")


def perMB(r: Run, who: str) -> float:
    """
    CPU ms per MB of upload.
    """
    return r.cpu[who] / (r.bytes / MB) * 1e3 if r.bytes else float("nan")


# --------------------------------------------------------------------------
# The microcosts: this process's CPU time for each piece of the work.


def cpuPerCall(fn: Callable[[], Any], minTime: float, repeats: int) -> tuple[float, float]:
    """
    The median CPU seconds (of this thread: user and system) per call of
    C{fn}, and the page faults per call (a fresh buffer of 128 KiB or more
    comes from the kernel, page by page).
    """
    def sample(number: int) -> tuple[float, float]:
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        t0 = time.thread_time()
        for _ in range(number):
            fn()
        spent = time.thread_time() - t0
        return spent, resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults

    number = 1
    while True:
        spent, faults = sample(number)
        if spent >= minTime:
            break
        number *= 2 if spent <= 0 else max(2, min(100, int(1.2 * minTime / spent) + 1))
    samples = [(spent / number, faults / number)]
    for _ in range(repeats - 1):
        spent, faults = sample(number)
        samples.append((spent / number, faults / number))
    return statistics.median(t for t, _ in samples), statistics.median(f for _, f in samples)


def microcosts(quick: bool) -> dict[str, tuple[float, float]]:
    """
    CPU µs of each piece of sealing work, per job and per MB (the keys say
    which), each checked to do what it should first; and its page faults.
    """
    minTime, repeats = (0.02, 3) if quick else (0.05, 5)
    exchange = Ed25519PrivateKey.generate()
    exchangePublic = exchange.public_key()
    identity = Ed25519PrivateKey.generate()
    identityPublic = identity.public_key()
    now = time.time()
    certificate = Certificate.issue(exchange, publicBytes(identityPublic), "bench", now)
    connection, offer = ConnectionOffer.make(identity, certificate)
    # As the consumer sees it: decoded from ASGN's JSON.
    offerFields = json.loads(json.dumps(offer.fields()))
    jobId = "0123456789abcdef"
    ephemeral = Ephemeral()
    ephemeralText = encodeKey(ephemeral.public)
    nodePublic = connection.public_key()
    consumerKeys = ephemeral.keys(jobId, nodePublic)
    assert nodeKeys(connection, jobId, decodeKey(ephemeralText)) == consumerKeys
    assert offer.verify(exchangePublic, now)[1].public_bytes_raw() == offer.key

    def consumerJob() -> None:
        e = Ephemeral()
        encodeKey(e.public)
        _, key = ConnectionOffer.parse(offerFields).verify(exchangePublic, now)
        e.keys(jobId, key)

    body = os.urandom(MB)
    head = packed({})
    sealed = b"".join(seal(consumerKeys.upload, UPLOAD, head, body))
    transcript = {"text": expectedText(body), "model": MODEL}
    sealedAnswer = b"".join(seal(consumerKeys.result, RESULT, packed(transcript)))

    def sealUpload() -> list[bytes]:
        # The consumer: its fields and its upload sealed as records, the
        # upload not copied first; sendData joins them into frames, as it
        # joins a clear upload (privox.consumer).
        return seal(consumerKeys.upload, UPLOAD, packed({}), body)

    def openUpload() -> bytes:
        # The node: the upload opened as it arrives, one DATA frame here
        # (a 1 MB upload fits in one), then unpacked (SealedRun).
        opener, unpacker = Opener(consumerKeys.upload, UPLOAD, len(sealed)), Unpacker()
        out = [unpacker.feed(p) for p in opener.feed(sealed)]
        opener.finish()
        return b"".join(out)

    def sealAnswer() -> list[bytes]:
        return seal(consumerKeys.result, RESULT, packed(transcript))

    def openAnswer() -> None:
        opener = Opener(consumerKeys.result, RESULT, len(sealedAnswer))
        b"".join(opener.feed(sealedAnswer))
        opener.finish()

    assert openUpload() == body and b"".join(sealUpload()) == sealed
    aead = ChaCha20Poly1305(consumerKeys.upload)
    nonce = bytes(12)
    peer = X25519PrivateKey.generate().public_key()
    signature = identity.sign(b"x" * 57)
    shared = connection.exchange(peer)

    pieces: dict[str, Callable[[], Any]] = {
        # Per job, the consumer (the API).
        "consumer: fresh ephemeral key (X25519)": Ephemeral,
        "consumer: offer checked (parse + 2 Ed25519 verifies)":
            lambda: ConnectionOffer.parse(offerFields).verify(exchangePublic, now),
        "consumer: job keys (X25519 + HKDF)": lambda: ephemeral.keys(jobId, nodePublic),
        "consumer: answer opened (small)": openAnswer,
        "consumer: all per job (key, offer, keys)": consumerJob,
        # Per job, the node.
        "node: job keys (X25519 + HKDF)": lambda: nodeKeys(connection, jobId, decodeKey(ephemeralText)),
        "node: answer sealed (small)": sealAnswer,
        # Per connection, the node.
        "node, per connection: offer made (X25519 key + Ed25519 sign)":
            lambda: ConnectionOffer.make(identity, certificate),
        # The primitives.
        "primitive: X25519 key generated": X25519PrivateKey.generate,
        "primitive: X25519 exchange": lambda: connection.exchange(peer),
        "primitive: HKDF-SHA256, 64 bytes": lambda: HKDF(SHA256(), 64, salt=b"s", info=b"i").derive(shared),
        "primitive: Ed25519 verify": lambda: identityPublic.verify(signature, b"x" * 57),
        # Per MB.
        "per MB: consumer packs + seals the upload": sealUpload,
        "per MB: node opens + unpacks the upload": openUpload,
        "per MB: ChaCha20-Poly1305 alone, one call": lambda: aead.encrypt(nonce, body, None),
    }
    out = {}
    for name, fn in pieces.items():
        seconds, faults = cpuPerCall(fn, minTime, repeats)
        out[name] = (seconds * 1e6, faults)
    return out


# --------------------------------------------------------------------------
# The report.


def report(args: argparse.Namespace, runs: dict[tuple[str, str], list[Run]],
           micro: dict[str, tuple[float, float]], load0: float) -> bool:
    """
    Print the three tables and the summary; whether every check held.
    """
    small = f"{args.small_bytes / KB:g} KiB"
    large = f"{args.large_bytes / MB:g} MB"
    ok = True
    verified = mismatched = sealedJobs = earlyJobs = 0
    for (size, mode), rs in runs.items():
        for r in rs:
            verified += r.verified
            mismatched += r.mismatched
            sealedJobs += int(r.cpu["sealedJobs"])
            earlyJobs += int(r.cpu["earlyJobs"])
            # Sealed windows: every job a producer ran came sealed; clear
            # windows: none did.
            wrong = r.cpu["clearJobs"] if mode == "sealed" else r.cpu["sealedJobs"]
            if wrong or not r.jobs:
                ok = False
                print(f"!! {size} {mode}: {r.jobs} jobs; the producers ran {wrong:.0f} "
                      f"{'in the clear' if mode == 'sealed' else 'sealed'}")
    ok = ok and mismatched == 0
    total = {key: merged(rs) for key, rs in runs.items()}
    short = False

    def rounds(size: str, fn: Callable[[Run, Run], float], form: str) -> str:
        return ", ".join(format(fn(c, s), form) for c, s in zip(runs[size, "clear"], runs[size, "sealed"]))

    def pace(size: str, r: Run, perSecond: float, target: float) -> str:
        nonlocal short
        if target and perSecond < 0.95 * target:
            short = True
            return f"{perSecond:,.0f}!"
        return f"{perSecond:,.0f}"

    def cpuShares(r: Run) -> str:
        return " | ".join(f"{100 * r.cpu[w] / r.seconds:.0f}"
                          for w in ("farm", "consumers", "producers", "others"))

    lines = []
    rows: list[tuple[str, ...]] = []
    summary = []
    added: dict[str, float] = {}
    load = f"{args.consumers}c x {args.producers}p"
    if ("small", "clear") in total:
        c, s = total["small", "clear"], total["small", "sealed"]
        target = args.small_rate
        farm = (perJob(c, "farm"), perJob(s, "farm"))
        each = rounds("small", lambda c, s: perJob(s, "farm") / perJob(c, "farm"), ".2f")
        rows += [
            (f"{small} jobs/s ({load}, " + (f"paced at {target:g})" if target else "flat out)"),
             pace("small", c, c.jobs / c.seconds, target), pace("small", s, s.jobs / s.seconds, target),
             ratio(s.jobs / s.seconds, c.jobs / c.seconds), ""),
            (f"{small}: latency p50 (ms)", f"{c.percentile(50) * 1e3:.2f}",
             f"{s.percentile(50) * 1e3:.2f}", ratio(s.percentile(50), c.percentile(50)), ""),
            (f"{small}: farm CPU per job (us)", f"{farm[0]:.0f}", f"{farm[1]:.0f}",
             ratio(farm[1], farm[0]), each),
            (f"{small}: farm wake-ups | preemptions per job",
             f"{c.cpu['farmWaits'] / c.jobs:.2f} | {c.cpu['farmPreempted'] / c.jobs:.2f}",
             f"{s.cpu['farmWaits'] / s.jobs:.2f} | {s.cpu['farmPreempted'] / s.jobs:.2f}", "", ""),
            (f"{small}: CPU % of a core, farm | consumers | producers | others",
             cpuShares(c), cpuShares(s), "", ""),
        ]
        summary.append(f"farm CPU per {small} job x{farm[1] / farm[0]:.2f} (rounds {each})")
    if ("large", "clear") in total:
        c, s = total["large", "clear"], total["large", "sealed"]
        target = args.large_rate
        farm = (perMB(c, "farm"), perMB(s, "farm"))
        each = rounds("large", lambda c, s: perMB(s, "farm") / perMB(c, "farm"), ".2f")
        rows += [
            (f"{large} jobs: MB/s ({load}, " + (f"paced at {target:g})" if target else "flat out)"),
             pace("large", c, c.bytes / MB / c.seconds, target),
             pace("large", s, s.bytes / MB / s.seconds, target),
             ratio(s.bytes / s.seconds, c.bytes / c.seconds), ""),
            (f"{large} jobs: job time p50 (ms)", f"{c.percentile(50) * 1e3:.1f}",
             f"{s.percentile(50) * 1e3:.1f}", ratio(s.percentile(50), c.percentile(50)), ""),
            (f"{large} jobs: farm CPU per MB (ms)", f"{farm[0]:.3f}", f"{farm[1]:.3f}",
             ratio(farm[1], farm[0]), each),
            (f"{large} jobs: farm wake-ups | preemptions per job",
             f"{c.cpu['farmWaits'] / c.jobs:.2f} | {c.cpu['farmPreempted'] / c.jobs:.2f}",
             f"{s.cpu['farmWaits'] / s.jobs:.2f} | {s.cpu['farmPreempted'] / s.jobs:.2f}", "", ""),
            (f"{large} jobs: CPU % of a core, farm | consumers | producers | others",
             cpuShares(c), cpuShares(s), "", ""),
        ]
        summary.append(f"farm CPU per MB x{farm[1] / farm[0]:.2f} (rounds {each})")
    if rows:
        lines.append("1. The farm, sealed against in the clear (sealing should leave its CPU "
                     "per job and per MB within noise):")
        lines.append(tableN(rows, ("measurement", "clear", "sealed", "ratio", "each round")))
        if short:
            lines.append("   ! short of its pace by over 5 %: the machine could not keep up.")

    # What sealing adds on each side.
    rows = []
    sides = (("consumers", "consumer (API)"), ("producers", "producer (node)"))
    if ("small", "clear") in total:
        c, s = total["small", "clear"], total["small", "sealed"]
        for who, side in sides:
            plus = added[f"{who} job"] = perJob(s, who) - perJob(c, who)
            rows.append((f"{small}: {side} CPU per job (us)", f"{perJob(c, who):.0f}",
                         f"{perJob(s, who):.0f}", f"{plus:+.0f}",
                         f"{100 * plus / perJob(c, who):+.0f} %",
                         rounds("small", lambda c, s: perJob(s, who) - perJob(c, who), "+.0f")))
    if ("large", "clear") in total:
        c, s = total["large", "clear"], total["large", "sealed"]
        for who, side in sides:
            plus = added[f"{who} MB"] = perMB(s, who) - perMB(c, who)
            added[f"{who} MB %"] = 100 * plus / perMB(c, who)
            rows.append((f"{large} jobs: {side} CPU per MB (ms)", f"{perMB(c, who):.2f}",
                         f"{perMB(s, who):.2f}", f"{plus:+.2f}",
                         f"{100 * plus / perMB(c, who):+.0f} %",
                         rounds("large", lambda c, s: perMB(s, who) - perMB(c, who), "+.2f")))
        for who, side in sides:
            rows += systemAndFaults(c, s, who, side)
        if ("small", "clear") in total:
            # Per MB beyond the per-job cost: what a large job adds over a
            # small one, per MB of the difference in their sizes.
            for who, side in sides:
                rows.append((f"  {side}: per MB beyond the per-job cost (ms)", "", "",
                             f"{beyondPerJob(args, added, who):+.2f}", "", ""))
    if rows:
        lines.append("")
        lines.append("2. What sealing adds to the load processes' CPU (sealed - clear, and as "
                     "a % of clear):")
        lines.append(tableN(rows, ("measurement", "clear", "sealed", "added", "added %", "each round")))

    if micro:
        lines.append("")
        lines.append("3. The sealing work itself, in this process (median CPU per call, user + "
                     "system, and page faults per call):")
        microRows = []
        for name, (us, faults) in micro.items():
            cost = f"{us / 1e3:.3f} ms" if name.startswith("per MB") else f"{us:.1f} us"
            microRows.append((name, cost, f"{faults:.0f}"))
        lines.append(tableN(microRows, ("piece", "CPU", "faults")))

        def us(name: str) -> float:
            return micro[name][0]

        consumerJob = us("consumer: all per job (key, offer, keys)") + us("consumer: answer opened (small)")
        nodeJob = us("node: job keys (X25519 + HKDF)") + us("node: answer sealed (small)")
        lines.append(
            f"   so per job about {consumerJob:.0f} us on the consumer and {nodeJob:.0f} us on "
            f"the node; per MB {us('per MB: consumer packs + seals the upload') / 1e3:.2f} ms on "
            f"the consumer and {us('per MB: node opens + unpacks the upload') / 1e3:.2f} ms on the "
            f"node, of which ChaCha20-Poly1305 itself "
            f"{us('per MB: ChaCha20-Poly1305 alone, one call') / 1e3:.2f} ms.")

    lines.append("")
    if runs:
        lines.append(f"digests verified: {verified} results matched their input, {mismatched} "
                     f"mixed up ({small}: sha256; {large}: {args.large_check}). The sealed windows "
                     f"ran with e2e required: the producers ran {sealedJobs} jobs sealed, none in "
                     f"the clear (and none sealed in the clear windows); {earlyJobs} of them "
                     f"came sealed early, with their JOB_ (docs/protocol.rst §5.7).")
    targets = []

    def verdict(held: bool) -> str:
        return "met" if held else "NOT met"

    if "consumers job" in added:
        worst = max(added["consumers job"], added["producers job"]) / 1e3
        targets.append(f"added CPU per job: consumer {added['consumers job'] / 1e3:+.2f} ms, node "
                       f"{added['producers job'] / 1e3:+.2f} ms (target <= 2 ms: {verdict(worst <= 2)})")
    if "consumers MB" in added:
        worst = max(added["consumers MB %"], added["producers MB %"])
        targets.append(
            f"added CPU per MB: consumer {added['consumers MB']:+.2f} ms "
            f"({added['consumers MB %']:+.0f} % of its CPU per MB in the clear), node "
            f"{added['producers MB']:+.2f} ms ({added['producers MB %']:+.0f} %) "
            f"(target <= 5 %: {verdict(worst <= 5)})")
    if summary or targets:
        lines.append("sealing: " + "; ".join(summary + targets) + ".")
    lines.append(f"Load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
                 f"{os.cpu_count()} cores.")
    print("\n".join(lines))
    return ok


def beyondPerJob(args: argparse.Namespace, added: dict[str, float], who: str) -> float:
    """
    What sealing adds to C{who} per MB beyond its per-job cost, in ms: what
    a large job adds over a small one, per MB of the difference in their
    sizes (C{added}: ms per MB of large jobs, us per small job).
    """
    perLargeJob = added[f"{who} MB"] * args.large_bytes / MB  # ms per large job
    return (perLargeJob - added[f"{who} job"] / 1e3) / ((args.large_bytes - args.small_bytes) / MB)


def systemAndFaults(c: Run, s: Run, who: str, name: str) -> list[tuple[str, ...]]:
    """
    Two rows of a table of large jobs: C{who}'s system CPU and page faults
    per MB, clear (C{c}) and sealed (C{s}).
    """
    system = (perMB(c, who + "System"), perMB(s, who + "System"))
    faults = (c.cpu[who + "Faults"] / (c.bytes / MB), s.cpu[who + "Faults"] / (s.bytes / MB))
    return [
        (f"  {name}: of which system (ms)", f"{system[0]:.2f}", f"{system[1]:.2f}",
         f"{system[1] - system[0]:+.2f}", "", ""),
        (f"  {name}: page faults per MB", f"{faults[0]:.0f}", f"{faults[1]:.0f}",
         f"{faults[1] - faults[0]:+.0f}", "", ""),
    ]


def reportDaemons(args: argparse.Namespace, runs: dict[tuple[str, str], list[Run]]) -> bool:
    """
    Part 4's table and verdict: what sealing adds to privox-api and
    privox-node themselves; whether every answer matched its upload.
    """
    total = {key: merged(rs) for key, rs in runs.items()}
    small = f"{args.small_bytes / KB:g} KiB"
    large = f"{args.large_bytes / MB:g} MB"
    rows: list[tuple[str, ...]] = []
    added: dict[str, float] = {}
    sides = (("api", "privox-api"), ("node", "privox-node"), ("farm", "privox-farm"))

    def rounds(size: str, fn: Callable[[Run, Run], float], form: str) -> str:
        return ", ".join(format(fn(c, s), form) for c, s in zip(runs[size, "clear"], runs[size, "sealed"]))

    c, s = total["small", "clear"], total["small", "sealed"]
    rows.append((f"{small} WAVs: requests/s (paced at {args.daemon_small_rate:g})",
                 f"{c.jobs / c.seconds:,.0f}", f"{s.jobs / s.seconds:,.0f}", "", "", ""))
    rows.append((f"{small} WAVs: latency p50 (ms)", f"{c.percentile(50) * 1e3:.1f}",
                 f"{s.percentile(50) * 1e3:.1f}", f"{(s.percentile(50) - c.percentile(50)) * 1e3:+.1f}",
                 "", ""))
    for who, name in sides:
        plus = added[f"{who} job"] = perJob(s, who) - perJob(c, who)
        rows.append((f"{small} WAVs: {name} CPU per request (us)", f"{perJob(c, who):.0f}",
                     f"{perJob(s, who):.0f}", f"{plus:+.0f}", f"{100 * plus / perJob(c, who):+.0f} %",
                     rounds("small", lambda c, s: perJob(s, who) - perJob(c, who), "+.0f")))
    c, s = total["large", "clear"], total["large", "sealed"]
    rows.append((f"{large} WAVs: MB/s (paced at {args.daemon_large_rate:g})",
                 f"{c.bytes / MB / c.seconds:,.1f}", f"{s.bytes / MB / s.seconds:,.1f}", "", "", ""))
    for who, name in sides:
        plus = added[f"{who} MB"] = perMB(s, who) - perMB(c, who)
        added[f"{who} MB %"] = 100 * plus / perMB(c, who)
        rows.append((f"{large} WAVs: {name} CPU per MB (ms)", f"{perMB(c, who):.2f}",
                     f"{perMB(s, who):.2f}", f"{plus:+.2f}", f"{added[f'{who} MB %']:+.1f} %",
                     rounds("large", lambda c, s: perMB(s, who) - perMB(c, who), "+.2f")))
    for who, name in sides[:2]:
        rows += systemAndFaults(c, s, who, name)
    for who, name in sides[:2]:
        beyond = added[f"{who} beyond"] = beyondPerJob(args, added, who)
        added[f"{who} beyond %"] = 100 * beyond / perMB(c, who)
        rows.append((f"  {name}: per MB beyond the per-request cost (ms)", "", "",
                     f"{beyond:+.2f}", f"{added[f'{who} beyond %']:+.1f} %", ""))
    print("4. The daemons themselves: privox-api (sealing required, and off) and privox-node, "
          "HTTP users posting WAVs, answered by the digest engine (sealed - clear):")
    print(tableN(rows, ("measurement", "clear", "sealed", "added", "added %", "each round")))
    verified = sum(r.verified for rs in runs.values() for r in rs)
    mismatched = sum(r.mismatched for rs in runs.values() for r in rs)
    worstJob = max(added["api job"], added["node job"]) / 1e3
    worstMB = max(added["api beyond %"], added["node beyond %"])
    print(f"answers checked: {verified} matched their upload's sha256, {mismatched} did not. "
          f"sealing, the daemons: added CPU per request: API {added['api job'] / 1e3:+.2f} ms, "
          f"node {added['node job'] / 1e3:+.2f} ms (target <= 2 ms: "
          f"{'met' if worstJob <= 2 else 'NOT met'}); added CPU per MB beyond the per-request "
          f"cost: API {added['api beyond']:+.2f} ms ({added['api beyond %']:+.1f} % of its CPU per "
          f"MB in the clear), node {added['node beyond']:+.2f} ms ({added['node beyond %']:+.1f} %) "
          f"(target <= 5 %: {'met' if worstMB <= 5 else 'NOT met'}); "
          f"farm CPU per MB x{perMB(s, 'farm') / perMB(c, 'farm'):.2f}.")
    return mismatched == 0 and all(r.jobs for rs in runs.values() for r in rs)


def tableN(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def windows(
    args: argparse.Namespace, smallRate: float, largeRate: float
) -> Iterator[tuple[int, str, int, float, str]]:
    """
    Each window's round, size, bytes, rate (jobs a second; C{largeRate} is
    in MB a second) and mode: sealed and clear take turns, in an order that
    flips each round. C{--only small} or C{large}: that size alone.
    """
    sizes = [("small", args.small_bytes, smallRate),
             ("large", args.large_bytes, largeRate * MB / args.large_bytes)]
    sizes = [size for size in sizes if args.only in (None, "farm", "daemons", size[0])]
    for n in range(args.rounds):
        for size, nbytes, rate in sizes:
            for mode in MODES if n % 2 == 0 else MODES[::-1]:
                yield n, size, nbytes, rate, mode


def benchmark(args: argparse.Namespace) -> None:
    started = time.time()
    logDir = tempfile.mkdtemp(prefix="privox-bench-sealing-")
    children = Children(logDir)
    atexit.register(children.stopAll)  # also on Ctrl-C
    failed = True
    try:
        micro = {}
        if args.only in (None, "micro"):
            print("timing the sealing work in this process...", flush=True)
            micro = microcosts(args.quick)
        runs: dict[tuple[str, str], list[Run]] = {}
        load0 = os.getloadavg()[0]
        if args.only not in ("micro", "daemons"):
            exchange = Exchange()
            port = startFarm(children, args)
            print(f"farm pid {children.pid('farm')} on port {port}; {os.cpu_count()} cores; "
                  f"{args.consumers} consumers and {args.producers} producers in up to "
                  f"{args.load_procs} processes each; {args.rounds} round(s) of "
                  f"{args.duration:g} s windows", flush=True)
            for n, size, nbytes, rate, mode in windows(args, args.small_rate, args.large_rate):
                pace = f"{rate:g} jobs/s" if rate else "flat out"
                label = f"{nbytes / KB:g} KiB" if size == "small" else f"{nbytes / MB:g} MB"
                print(f"round {n + 1}/{args.rounds}: {label} jobs, {pace}, {mode}...", flush=True)
                run = measure(children, args, exchange, port, f"{size}-{mode}-{n}",
                              nbytes, rate, mode == "sealed")
                runs.setdefault((size, mode), []).append(run)
        daemonRuns: dict[tuple[str, str], list[Run]] = {}
        if args.only in (None, "daemons"):
            daemons = startDaemons(children, args)
            print(f"part 4: privox-api pids {children.pid('api-sealed')} (sealing required) and "
                  f"{children.pid('api-clear')} (off), privox-node pid {children.pid('node')} "
                  f"({args.node_slots} slots, digest:bench), farm pid {children.pid('dfarm')}; "
                  f"{args.users} HTTP users", flush=True)
            for n, size, nbytes, rate, mode in windows(args, args.daemon_small_rate,
                                                        args.daemon_large_rate):
                print(f"round {n + 1}/{args.rounds}: POST /stt of {nbytes / KB:g} KiB WAVs, "
                      f"{rate:g}/s, {mode}...", flush=True)
                run = measureDaemons(children, args, daemons, f"d{size}-{mode}-{n}", nbytes, rate, mode)
                daemonRuns.setdefault((size, mode), []).append(run)
        print()
        failed = not report(args, runs, micro, load0)
        if daemonRuns:
            print()
            failed = not reportDaemons(args, daemonRuns) or failed
        print(f"({time.time() - started:.0f} s)")
    finally:
        children.finish(failed)
    if failed:
        raise SystemExit(1)


def parseArgs(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="What sealing jobs end to end costs the farm, the consumer and the node."
    )
    p.add_argument("--quick", action="store_true", help="a short run (about 20 s; the default: about 85 s)")
    p.add_argument("--rounds", type=int, help="rounds of the four windows [3; quick 1]")
    p.add_argument("--duration", type=float, help="seconds each window is measured [4; quick 2]")
    p.add_argument("--warmup", type=float, help="seconds before measuring starts [0.75; quick 0.5]")
    p.add_argument("--consumers", type=int, default=32, help="parallel consumers [32]")
    p.add_argument("--producers", type=int, default=8, help="DigestHandler producers [8]")
    p.add_argument("--small-bytes", type=int, default=32 * KB, help="small job upload [32 KiB]")
    p.add_argument("--large-bytes", type=int, default=MB, help="large job upload [1 MB]")
    p.add_argument("--small-rate", type=float, default=300.0, metavar="JOBS/S",
                   help="small jobs started per second, sealed or not, so that both put the "
                   "same load on the farm; 0: each consumer sends its next job as soon as "
                   "its last one is answered (then sealed jobs go slower) [300]")
    p.add_argument("--large-rate", type=float, default=80.0, metavar="MB/S",
                   help="the same for large jobs, in MB of upload a second [80]")
    p.add_argument("--large-check", choices=("sha256", "xxh3_128"),
                   help="how producers fingerprint large uploads [xxh3_128 if xxhash is "
                   "installed, else sha256]")
    p.add_argument("--load-procs", type=int, default=2,
                   help="processes the consumers are spread over, and as many for the producers [2]")
    p.add_argument("--early-upload", type=int, metavar="BYTES",
                   help="the farm's --early-upload (its default: 65536). A sealed job always "
                   "waits for ASGN (its keys need the node); 0 makes clear jobs wait too")
    p.add_argument("--only", choices=["farm", "small", "large", "micro", "daemons"],
                   help="only the runs through the farm (of both sizes, small or large "
                   "jobs), only the in-process timings, or only part 4 (the daemons)")
    p.add_argument("--users", type=int, default=8, help="part 4: HTTP users in flight [8]")
    p.add_argument("--node-slots", type=int, default=4, help="part 4: the node's --slots [4]")
    p.add_argument("--daemon-small-rate", type=float, default=100.0, metavar="REQUESTS/S",
                   help="part 4: small WAVs posted per second [100]")
    p.add_argument("--daemon-large-rate", type=float, default=20.0, metavar="MB/S",
                   help="part 4: MB of large WAVs posted per second [20]")
    # A load process (started by the benchmark itself).
    p.add_argument("--load", choices=["consumers", "producers", "http"], help=argparse.SUPPRESS)
    p.add_argument("--api", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, default=32 * KB, help=argparse.SUPPRESS)
    p.add_argument("--check", default="sha256", help=argparse.SUPPRESS)
    p.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--total", type=int, default=1, help=argparse.SUPPRESS)
    # The exchange's public key; a node's IDENTITY:CERTIFICATE. Both are
    # passed as --name=VALUE: base64url may start with "-".
    p.add_argument("--exchange", help=argparse.SUPPRESS)
    p.add_argument("--node", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 2.0 if args.quick else 4.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 0.75
    if args.large_check is None:
        try:
            newHash("xxh3_128")
            args.large_check = "xxh3_128"
        except ImportError:
            args.large_check = "sha256"
    if not args.load and args.small_bytes >= 64 * KB:
        p.error("--small-bytes must be below 64 KiB (larger uploads are the large jobs)")
    if not args.load and args.large_bytes < 64 * KB:
        p.error("--large-bytes must be at least 64 KiB")
    if args.small_bytes < 16 or args.rounds < 1 or args.load_procs < 1:
        p.error("--small-bytes must be at least 16, --rounds and --load-procs at least 1")
    return args


def main(argv: list[str]) -> None:
    args = parseArgs(argv)
    if args.load:
        task.react(lambda reactor: Deferred.fromCoroutine(loadProcess(reactor, args)))
    else:
        benchmark(args)


if __name__ == "__main__":
    main(sys.argv[1:])
