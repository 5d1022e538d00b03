"""
What do the API, the farm and the node add to a transcription, and how many
requests per second does the API serve?

Runs, in one go and side by side:

  1. Latency of ``POST /stt`` (multipart, ``key=demo``) for a ~3 s English
     clip that Piper speaks (the bundled ``en_US-joe-medium`` voice, a WAV),
     through a L{privox.local.LocalExchange} with the bundled models
     (``whisper:tiny.en``) in this process: HTTP, Klein, the farm, the node,
     its thread pool and back. Baseline: the engine's own time on the same
     WAV in the same process (C{decodeAudio} + C{WhisperEngine.transcribeAudio},
     the engine loaded once), never while an API request runs. The two
     alternate, in an order that flips each round, after one warm-up of
     each. Overhead = API p50 - engine p50.
  2. Requests/s through the API with a model-free engine: ``twistd -n
     privox-local --stt digest:bench --tts tone:bench --slots 4`` in a
     subprocess, hammered from this process by C clients over persistent
     HTTP connections, each posting its next small ``/stt`` upload (a 1 KB
     WAV) as soon as the last answer arrives. Baseline: a bare
     ``twisted.web`` server in a subprocess of its own that parses the same
     multipart upload and answers the same digest (no key check, no Klein,
     no farm, no node, no logging). Every answer is checked against the
     sha256 of its own upload.

    PYTHONPATH=. .venv/bin/python bench/api.py [--quick]
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import io
import os
import signal
import struct
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, gatherResults  # noqa: E402

from processes import TWISTD_CODE, Children, freePort  # noqa: E402

#: About 3 s of speech with Piper's joe-medium voice.
TEXT = "Privacy matters to everyone who uses the internet."

#: The same, profiled: argv is the stats path, then twistd's. The first
#: SIGUSR2 starts cProfile, the second saves its stats to the path. (SIGUSR1
#: is twistd's: it rotates the log file.)
TWISTD_PROFILED_CODE = r"""
import cProfile, os, signal, sys
path = sys.argv.pop(1)
sys.argv[0] = "twistd"
state = {"profiler": None, "done": False}
def toggle(signum, frame):
    if state["done"]:
        return
    if state["profiler"] is None:
        state["profiler"] = cProfile.Profile()
        state["profiler"].enable()
    else:
        state["profiler"].disable()
        state["profiler"].dump_stats(path + ".part")
        os.replace(path + ".part", path)
        state["done"] = True
signal.signal(signal.SIGUSR2, toggle)
from twisted.scripts.twistd import run
run()
"""


# --------------------------------------------------------------------------
# Shared pieces.


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, -(-len(ordered) * p // 100))  # nearest rank
    return ordered[int(rank) - 1]


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


BOUNDARY = "privoxbenchboundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(fields: dict[str, str], wav: bytes) -> bytes:
    """
    A C{multipart/form-data} body with C{fields} and C{wav} as C{file}, as
    C{curl -F} sends it.
    """
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="speech.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n".encode() + wav + b"\r\n"
    )
    parts.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(parts)


def expectedText(data: bytes) -> str:
    """
    What C{digest:} answers for C{data}.
    """
    return f"sha256:{hashlib.sha256(data).hexdigest()} bytes:{len(data)}"


class CpuMeter:
    """
    CPU use, as % of one core, of this process and of one child, over a
    C{with} block.
    """

    def __init__(self, children: Children, name: str) -> None:
        self.children = children
        self.name = name

    def __enter__(self) -> CpuMeter:
        self._t = time.perf_counter()
        self._self = sum(os.times()[:2])
        self._child = self.children.cpuSeconds(self.name)
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = time.perf_counter() - self._t
        self.bench = 100 * (sum(os.times()[:2]) - self._self) / wall
        self.server = 100 * (self.children.cpuSeconds(self.name) - self._child) / wall


async def sleep(reactor: Any, seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


# --------------------------------------------------------------------------
# Part 1: a real transcription through the API, beside the engine alone.


@dataclass
class Latency:
    api: list[float] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)
    pairs: list[float] = field(default_factory=list)  # api - engine, same round
    clipSeconds: float = 0.0
    apiText: str = ""
    engineText: str = ""
    apiWer: float = 0.0


async def latency(reactor: Any, args: argparse.Namespace) -> Latency:
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    from privox.engines.audio import decodeAudio
    from privox.engines.whisper import WhisperEngine
    from privox.local import LocalExchange, LocalSettings
    from tests.test_roundtrip import speak
    from tests.wer import wer

    result = Latency()
    print("making the clip with Piper...", flush=True)
    clip = speak(TEXT)
    with wave.open(io.BytesIO(clip)) as w:
        result.clipSeconds = w.getnframes() / w.getframerate()

    engine = WhisperEngine("tiny.en")
    engine.load()

    print("starting the local exchange (whisper:tiny.en, piper:en_US-joe-medium)...", flush=True)
    # No account store: its cost per request is bench/quota.py's to measure.
    local = LocalExchange(LocalSettings(port=0, accounts="none"), reactor)
    local.startService()
    try:
        await local.ready
        # A new connection per request, as curl makes.
        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        body = multipart({"key": "demo", "quality": "fast"}, clip)

        async def viaApi() -> float:
            t0 = time.perf_counter()
            response = await http.post(
                f"{local.url}/stt", data=body, headers={"Content-Type": CONTENT_TYPE}
            )
            text = await response.text()
            t1 = time.perf_counter()
            if response.code != 200:
                raise RuntimeError(f"/stt answered {response.code}: {text}")
            result.apiText = text
            return t1 - t0

        def direct() -> float:
            t0 = time.perf_counter()
            audio = decodeAudio(clip, "wav", rate=16000)
            transcript = engine.transcribeAudio(audio, "en")
            t1 = time.perf_counter()
            result.engineText = transcript.text
            return t1 - t0

        print(f"/stt through the API and the engine alone, {args.runs} runs each...", flush=True)
        await viaApi()  # warm-up, not counted
        direct()
        for round in range(args.runs):
            # Alternate, flipping the order each round, so that drift in the
            # machine's load falls on both alike. Never both at once.
            if round % 2:
                e = direct()
                a = await viaApi()
            else:
                a = await viaApi()
                e = direct()
            result.api.append(a)
            result.engine.append(e)
            result.pairs.append(a - e)
        result.apiWer = wer(TEXT, result.apiText)
    finally:
        await local.stopService()
    return result


# --------------------------------------------------------------------------
# Part 2: requests/s with a model-free engine.


def smallWav(size: int) -> tuple[bytes, int]:
    """
    A 16 kHz mono 16-bit WAV of C{size} bytes in all (header included), and
    the offset of its first sample.
    """
    frames = (size - 44) // 2
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(os.urandom(frames * 2))
    data = out.getvalue()
    return data, len(data) - frames * 2


@dataclass
class Throughput:
    seconds: float
    requests: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    firstError: str = ""
    verified: int = 0
    server: float = 0.0
    bench: float = 0.0


async def hammer(reactor: Any, url: str, args: argparse.Namespace) -> Throughput:
    """
    C{args.clients} loops over one persistent pool, each posting its next
    upload once the last answer is in. Answers that arrive inside [start +
    warmup, start + warmup + duration] count.
    """
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = args.clients
    pool.retryAutomatically = False
    http = HTTPClient(Agent(reactor, pool=pool))
    template, first = smallWav(args.small_bytes)
    run = Throughput(seconds=args.duration)
    begin = time.perf_counter() + args.warmup
    end = begin + args.duration

    async def loop(index: int) -> None:
        seq = 0
        while time.perf_counter() < end:
            # Every upload is unique, so an answer given to the wrong
            # request cannot match.
            wav = template[:first] + struct.pack(">QQ", index, seq) + template[first + 16 :]
            seq += 1
            t0 = time.perf_counter()
            try:
                response = await http.post(
                    url, data=multipart({"key": "demo"}, wav),
                    headers={"Content-Type": CONTENT_TYPE},
                )
                text = await response.text()
                ok = response.code == 200 and text == expectedText(wav)
                why = f"{response.code}: {text[:200]}"
            except Exception as e:
                ok, why = False, repr(e)
            t1 = time.perf_counter()
            if not ok:
                run.errors += 1
                run.firstError = run.firstError or why
                await sleep(reactor, 0.01)
                continue
            run.verified += 1
            if begin <= t1 <= end:
                run.requests += 1
                run.latencies.append(t1 - t0)

    try:
        await gatherResults(
            [Deferred.fromCoroutine(loop(i)) for i in range(args.clients)], consumeErrors=True
        )
    finally:
        await pool.closeCachedConnections()
    return run


async def waitForLog(reactor: Any, children: Children, name: str, marker: bytes) -> None:
    proc = children.procs[name]
    path = children.path(name, "log")
    deadline = time.perf_counter() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{children.tail(name)}")
        if os.path.exists(path):
            with open(path, "rb") as f:
                if marker in f.read():
                    return
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{name} did not log {marker!r}:\n{children.tail(name)}")
        await sleep(reactor, 0.05)


def serveBaseline(port: int) -> None:
    """
    The bare baseline: C{twisted.web} parses the multipart body into
    C{request.args}; the answer is the digest of C{file}.
    """
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Digest(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            data = request.args[b"file"][0]
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return expectedText(data).encode()

    site = Site(Digest())
    site.log = lambda request: None  # no access log
    reactor.listenTCP(port, site, interface="127.0.0.1")
    reactor.run()


async def throughput(
    reactor: Any, args: argparse.Namespace, children: Children
) -> tuple[Throughput, Throughput]:
    apiPort, basePort = freePort(), freePort()
    twistd = ["-n", "--reactor=privox", "--pidfile=", f"--logfile={children.path('api', 'log')}", "privox-local",
              "--port", str(apiPort), "--stt", "digest:bench", "--tts", "tone:bench",
              "--slots", str(args.slots), "--accounts", "none"]
    if args.profile_server:
        if os.path.exists(args.profile_server):
            os.remove(args.profile_server)
        code = [TWISTD_PROFILED_CODE, args.profile_server]
    else:
        code = [TWISTD_CODE]
    children.start("api", [sys.executable, "-c", *code, *twistd])
    children.start("baseline", [sys.executable, os.path.abspath(__file__),
                                "--serve-baseline", str(basePort)])
    await waitForLog(reactor, children, "api", b"serving on")
    children.waitForPort("baseline", basePort)
    print(f"privox-local pid {children.procs['api'].pid} on port {apiPort}, baseline pid "
          f"{children.procs['baseline'].pid} on port {basePort}; {os.cpu_count()} cores"
          + ("; privox-local profiled (slower)" if args.profile_server else ""), flush=True)

    print(f"/stt through privox-local, digest:bench, {args.clients} clients "
          f"({args.duration:g} s)...", flush=True)
    proc = children.procs["api"]
    if args.profile_server:
        reactor.callLater(args.warmup, proc.send_signal, signal.SIGUSR2)
    with CpuMeter(children, "api") as cpu:
        api = await hammer(reactor, f"http://127.0.0.1:{apiPort}/stt", args)
    api.server, api.bench = cpu.server, cpu.bench
    if args.profile_server:
        proc.send_signal(signal.SIGUSR2)
        deadline = time.perf_counter() + 30
        while not os.path.exists(args.profile_server):
            if proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError("privox-local did not save its profile")
            await sleep(reactor, 0.05)

    print(f"the same, bare twisted.web baseline ({args.duration:g} s)...", flush=True)
    with CpuMeter(children, "baseline") as cpu:
        base = await hammer(reactor, f"http://127.0.0.1:{basePort}/", args)
    base.server, base.bench = cpu.server, cpu.bench
    return api, base


# --------------------------------------------------------------------------
# Putting it together.


async def benchmark(reactor: Any, args: argparse.Namespace) -> None:
    logDir = tempfile.mkdtemp(prefix="privox-bench-api-")
    children = Children(logDir)
    # Also on Ctrl-C or SIGTERM, which stop the reactor without finishing
    # this coroutine.
    atexit.register(children.stopAll)
    print(f"load average before: {os.getloadavg()[0]:.2f} "
          "(anything else running skews every number)", flush=True)
    failed = True
    try:
        lat = await latency(reactor, args)
        api, base = await throughput(reactor, args, children)
        failed = api.errors > 0 or base.errors > 0
    finally:
        children.finish(failed)

    ms = 1000.0
    a50, e50 = percentile(lat.api, 50), percentile(lat.engine, 50)
    rows = [
        ("p50 (ms)", f"{a50 * ms:.1f}", f"{e50 * ms:.1f}", ratio(a50, e50)),
        ("min (ms)", f"{min(lat.api) * ms:.1f}", f"{min(lat.engine) * ms:.1f}",
         ratio(min(lat.api), min(lat.engine))),
        ("p90 (ms)", f"{percentile(lat.api, 90) * ms:.1f}", f"{percentile(lat.engine, 90) * ms:.1f}",
         ratio(percentile(lat.api, 90), percentile(lat.engine, 90))),
    ]
    print()
    print(table((f"/stt, {lat.clipSeconds:.1f} s clip, whisper:tiny.en, {args.runs} runs",
                 "API", "engine", "ratio"), rows))
    print()
    overhead = a50 - e50
    print(f"overhead of API + farm + node (API p50 - engine p50): {overhead * ms:.1f} ms "
          f"({100 * overhead / e50:.1f} % of the engine's p50)")
    print(f"median of the paired differences: {percentile(lat.pairs, 50) * ms:.1f} ms; "
          f"engine spread (p90 - p10): "
          f"{(percentile(lat.engine, 90) - percentile(lat.engine, 10)) * ms:.1f} ms")
    print(f"API transcript (WER {lat.apiWer:.2f}): {lat.apiText!r}; "
          f"same as the engine's: {'yes' if lat.apiText == lat.engineText else 'no'}")
    print("API = POST /stt to an in-process LocalExchange, a new connection each time, "
          "until the body is read; engine = decodeAudio + transcribeAudio, this process.")

    rows = [
        ("requests/s", f"{api.requests / api.seconds:,.0f}", f"{base.requests / base.seconds:,.0f}",
         ratio(api.requests, base.requests)),
        ("latency p50 (ms)", f"{percentile(api.latencies, 50) * ms:.2f}",
         f"{percentile(base.latencies, 50) * ms:.2f}",
         ratio(percentile(api.latencies, 50), percentile(base.latencies, 50))),
        ("latency p99 (ms)", f"{percentile(api.latencies, 99) * ms:.2f}",
         f"{percentile(base.latencies, 99) * ms:.2f}",
         ratio(percentile(api.latencies, 99), percentile(base.latencies, 99))),
        ("server CPU (% of a core)", f"{api.server:.0f}", f"{base.server:.0f}", ""),
        ("bench CPU (% of a core)", f"{api.bench:.0f}", f"{base.bench:.0f}", ""),
        ("errors", f"{api.errors}", f"{base.errors}", ""),
    ]
    print()
    print(table((f"/stt, digest:bench, {args.clients} clients, {args.small_bytes} B, "
                 f"{args.duration:g} s", "API", "bare web", "ratio"), rows))
    print()
    print(f"answers checked against their upload's sha256: {api.verified + base.verified}; "
          f"errors: {api.errors + base.errors}"
          + (f" (first: {api.firstError or base.firstError})" if failed else ""))
    print(f"API = twistd privox-local --slots {args.slots} (farm, node, API; logging to a file) "
          "in a subprocess; bare web = twisted.web parsing the same multipart body in a "
          "subprocess; clients = this process (bench), one persistent pool.")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.profile_server and os.path.exists(args.profile_server):
        import pstats

        print(f"\nprivox-local profile during the measured window ({args.profile_server}), "
              "top functions by own time:")
        pstats.Stats(args.profile_server).sort_stats("tottime").print_stats(args.profile_top)
    if failed:
        raise SystemExit(1)


def parseArgs(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="/stt latency through the API beside the engine alone, and requests/s "
        "through the API with a model-free engine beside a bare twisted.web server."
    )
    p.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    p.add_argument("--runs", type=int, help="timed /stt runs, and as many engine runs [10; quick 3]")
    p.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients [8]")
    p.add_argument("--slots", type=int, default=4, help="privox-local --slots [4]")
    p.add_argument("--small-bytes", type=int, default=1024, help="WAV size per request [1024]")
    p.add_argument("--duration", type=float, help="seconds each throughput run counts [10; quick 3]")
    p.add_argument("--warmup", type=float, help="seconds before counting starts [1; quick 0.5]")
    p.add_argument("--profile-server", metavar="FILE",
                   help="profile privox-local (cProfile) during the measured window of part 2, "
                   "save the stats to FILE and print the top")
    p.add_argument("--profile-top", type=int, default=25, metavar="N", help="profile lines [25]")
    p.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 3 if args.quick else 10
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.0
    if args.small_bytes < 44 + 16 or args.runs < 1 or args.clients < 1:
        p.error("--small-bytes must be at least 60, --runs and --clients at least 1")
    if args.profile_server:
        args.profile_server = os.path.abspath(args.profile_server)
    return args


def main(argv: list[str]) -> None:
    args = parseArgs(argv)
    if args.serve_baseline:
        serveBaseline(args.serve_baseline)
        return
    task.react(lambda reactor: Deferred.fromCoroutine(benchmark(reactor, args)))


if __name__ == "__main__":
    main(sys.argv[1:])
