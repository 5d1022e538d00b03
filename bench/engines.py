"""
How fast and how big are the node's speech engines, and what does the node
add to each job?

Two parts:

  1. Per engine and model available offline here (``whisper:tiny.en``,
     ``vosk:ko``, ``piper:en_US-joe-medium``, and ``coqui:`` with a tiny
     random VITS built on the fly when Coqui TTS is installed), each in a
     subprocess of its own so that its peak memory is its own: load time
     (import + load, as at a node's start-up), real-time factor (processing
     seconds / audio seconds) of the first job and the median of the next
     N, and peak RSS (``ru_maxrss``) after loading and after the jobs.
     STT engines transcribe about 10 s of English speech that Piper makes
     (``vosk:ko`` is a Korean model: only its speed means something); TTS
     engines speak the same text.
  2. The node's per-job overhead: a farm on loopback ports
     (``tests/loopbackfarm.LoopbackFarm``), a ``NodeService`` with the real
     ``whisper:tiny.en`` and ``piper:en_US-joe-medium`` engines plus the
     model-free ``digest:x`` and ``tone:x``, and a PVX/2 consumer, all in
     this process. Each real model runs the same job K times through farm
     and node and K times directly on the same engine object (the calls the
     node makes: ``transcription``/``feed``/``finish``, or ``synthesize``),
     alternately. Overhead = job wall time p50 - engine time p50: relaying,
     framing, the thread hand-offs, the consumer's own work. For digest and
     tone the whole job time is overhead.

    PYTHONPATH=. .venv/bin/python bench/engines.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

#: About 10.5 s of speech with Piper's joe-medium voice.
TEXT = (
    "The quick brown fox jumps over the lazy dog. A volunteer runs this node on an old "
    "laptop, and it turns speech into text for people who need it. Every job travels "
    "through the farm and back."
)

#: (spec, service) measured in part 1, in this order: Piper first, as it
#: makes the speech the STT engines transcribe.
ENGINES = [
    ("piper:en_US-joe-medium", "tts"),
    ("whisper:tiny.en", "stt"),
    ("vosk:ko", "stt"),
    ("coqui:tiny-vits", "tts"),  # =PATH added once the model is built
]

#: Seconds a child may take before it is killed.
CHILD_TIMEOUT = 300


# --------------------------------------------------------------------------
# Part 1, in the child processes.


def _wavSeconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate()


def _peakRssMB() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _makeEngine(spec: str) -> Any:
    from privox.engines.registry import ModelSpec, createEngine

    parsed = ModelSpec.parse(spec)
    if parsed.engine == "piper":
        # Piper's noise off: the same text always gives the same audio, so
        # runs (and the STT input made from it) are comparable.
        from privox.engines.piper import PiperEngine

        return PiperEngine(parsed.model, parsed.path, deterministic=True)
    return createEngine(parsed)


def transcribeWhole(engine: Any, job: Any, audio: bytes) -> Any:
    """
    A whole upload through an STT engine, streaming (Vosk) or not (Whisper).
    """
    if hasattr(engine, "transcribe"):
        return engine.transcribe(job, audio)
    transcription = engine.transcription(job)
    transcription.feed(audio)
    return transcription.finish()


def childMeasure(spec: str, reps: int, audioPath: str | None, saveWav: str | None) -> dict[str, Any]:
    """
    Load one engine, then run it 1 + C{reps} times.
    """
    from privox.engines.base import STTJob, TTSJob

    started = time.perf_counter()
    engine = _makeEngine(spec)
    engine.load()
    loadSeconds = time.perf_counter() - started
    rssLoad = _peakRssMB()

    stt = not hasattr(engine, "synthesize")
    audio = b""
    if stt:
        assert audioPath is not None
        with open(audioPath, "rb") as f:
            audio = f.read()
    rtfs: list[float] = []
    seconds: list[float] = []
    output: str | bytes = b""
    for _ in range(1 + reps):
        if stt:
            t0 = time.perf_counter()
            transcript = transcribeWhole(engine, STTJob(engine.name, None, "wav", len(audio)), audio)
            elapsed = time.perf_counter() - t0
            audioSeconds = _wavSeconds(audio)
            output = transcript.text
        else:
            t0 = time.perf_counter()
            wav = engine.synthesize(TTSJob(engine.name, None, None, TEXT))
            elapsed = time.perf_counter() - t0
            audioSeconds = _wavSeconds(wav)
            output = wav
        seconds.append(elapsed)
        rtfs.append(elapsed / audioSeconds)
    result: dict[str, Any] = {
        "load_s": loadSeconds,
        "first_rtf": rtfs[0],
        "median_rtf": statistics.median(rtfs[1:]) if reps else rtfs[0],
        "median_s": statistics.median(seconds[1:]) if reps else seconds[0],
        "audio_s": audioSeconds,
        "reps": reps,
        "rss_load_mb": rssLoad,
        "rss_peak_mb": _peakRssMB(),
    }
    if stt:
        from tests.wer import wer

        result["text"] = output
        result["wer"] = wer(TEXT, str(output))
    elif saveWav:
        with open(saveWav, "wb") as f:
            f.write(output)  # type: ignore[arg-type]
    return result


def childBuildVits(directory: str) -> dict[str, Any]:
    """
    Save a tiny random single-speaker VITS in C{directory}. Reports
    C{missing} when Coqui TTS cannot be imported.
    """
    import importlib.util

    if importlib.util.find_spec("TTS") is None:
        return {"missing": "Coqui TTS is not installed"}
    from privox.engines.tinyvits import buildTinyVits

    buildTinyVits(Path(directory))
    return {"built": directory}


def childMain(args: argparse.Namespace) -> None:
    """
    Run one child job. Engines print to stdout (Coqui does), so the JSON
    result goes to the original stdout and everything else to stderr.
    """
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if args.build_vits:
        result = childBuildVits(args.build_vits)
    else:
        result = childMeasure(args.child, args.reps, args.audio, args.save_wav)
    out.write(json.dumps(result) + "\n")
    out.close()


# --------------------------------------------------------------------------
# Part 1, in the parent.


class ChildFailed(Exception):
    pass


def runChild(childArgs: list[str]) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *childArgs],
        cwd=_REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=CHILD_TIMEOUT,
    )
    lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.decode("utf-8", "replace")[-3000:]
        raise ChildFailed(f"exit status {proc.returncode}; its stderr ends with:\n{tail}")
    return json.loads(lines[-1])


Row = tuple[str, dict[str, Any] | str]


def measureEngines(args: argparse.Namespace, workdir: str) -> tuple[list[Row], str | None]:
    """
    Part 1. Returns the rows (model, result or why not) and the path of the
    speech WAV Piper made (None if it failed).
    """
    speech = os.path.join(workdir, "speech.wav")
    rows: list[Row] = []
    haveSpeech = False
    for spec, service in ENGINES:
        name = spec
        childArgs = ["--child", spec, "--reps", str(args.reps)]
        if spec.startswith("coqui:"):
            vits = os.path.join(workdir, "tiny-vits")
            os.mkdir(vits)
            print("building a tiny random VITS for coqui...", flush=True)
            try:
                built = runChild(["--build-vits", vits])
            except ChildFailed as e:
                rows.append((name, f"could not build the model: {e}"))
                continue
            if "missing" in built:
                rows.append((name, f"not installed ({built['missing']})"))
                continue
            childArgs[1] = f"{spec}={vits}"
        if service == "stt":
            if not haveSpeech:
                rows.append((name, "no speech to transcribe (Piper failed)"))
                continue
            childArgs += ["--audio", speech]
        elif spec.startswith("piper:"):
            childArgs += ["--save-wav", speech]
        print(f"measuring {name} ({1 + args.reps} runs)...", flush=True)
        try:
            result = runChild(childArgs)
        except (ChildFailed, subprocess.TimeoutExpired) as e:
            rows.append((name, f"failed: {e}"))
            continue
        if spec.startswith("piper:"):
            haveSpeech = True
        rows.append((name, result))
    return rows, speech if haveSpeech else None


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """
    Columns aligned: the first to the left, the others to the right. A row
    of two cells is a name and a message that spans the other columns.
    """
    full = [r for r in rows if len(r) == len(header)]
    widths = [max(len(r[i]) for r in [header, *full]) for i in range(len(header))]
    widths[0] = max(widths[0], *(len(r[0]) for r in rows)) if rows else widths[0]

    def line(cells: tuple[str, ...]) -> str:
        if len(cells) == 2 and len(header) > 2:
            return f"{cells[0].ljust(widths[0])}  {cells[1]}"
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def engineTable(rows: list[Row]) -> str:
    header = ("engine:model", "load s", "RTF 1st", "RTF p50", "audio s",
              "RSS MB load", "RSS MB peak", "check")
    out: list[tuple[str, ...]] = []
    notes: list[str] = []
    for name, r in rows:
        if isinstance(r, str):
            out.append((name, r.splitlines()[0]))
            if "\n" in r:
                notes.append(f"{name}: {r}")
            continue
        check = f"WER {r['wer']:.0%}" if "wer" in r else "WAV ok"
        out.append((
            name,
            f"{r['load_s']:.2f}",
            f"{r['first_rtf']:.3f}",
            f"{r['median_rtf']:.3f}",
            f"{r['audio_s']:.1f}",
            f"{r['rss_load_mb']:.0f}",
            f"{r['rss_peak_mb']:.0f}",
            check,
        ))
    text = table(header, out)
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text


# --------------------------------------------------------------------------
# Part 2: the node's per-job overhead, in this process.


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def waitForProducers(
    reactor: Any, farm: Any, counts: dict[str, int], seconds: float = 30
) -> None:
    from twisted.internet.task import deferLater

    def connected(service: str) -> int:
        byModel = farm.farm.dispatchers[service].producersByModel()
        return max((n for n, _ in byModel.values()), default=0)

    deadline = time.monotonic() + seconds
    while any(connected(s) < n for s, n in counts.items()):
        if time.monotonic() > deadline:
            raise RuntimeError("the node's slots did not reach the farm")
        await deferLater(reactor, 0.02, lambda: None)


async def nodeOverhead(reactor: Any, args: argparse.Namespace, speech: bytes) -> list[tuple[str, ...]]:
    from privox.consumer import connectConsumer
    from privox.engines.audio import decodeAudio
    from privox.engines.base import STTJob, TTSJob
    from privox.engines.digest import DigestEngine, ToneEngine
    from privox.engines.piper import PiperEngine
    from privox.engines.whisper import WhisperEngine
    from privox.node.service import NodeService, NodeSettings
    from tests.loopbackfarm import LoopbackFarm

    whisper = WhisperEngine("tiny.en")
    piper = PiperEngine("en_US-joe-medium", deterministic=True)
    engines = [whisper, DigestEngine("x"), piper, ToneEngine("x")]

    farm = LoopbackFarm()
    await farm.listen()
    settings = NodeSettings(
        stt_farm=(farm.endpoint("stt"),),
        tts_farm=(farm.endpoint("tts"),),
        key="bench",
        stt=(whisper.name, "digest:x"),
        tts=(piper.name, "tone:x"),
        slots=1,
    )
    node = NodeService(settings, engines, reactor, stopOnFailure=False)
    consumers: list[Any] = []
    try:
        print("node: loading whisper:tiny.en and piper:en_US-joe-medium...", flush=True)
        node.startService()
        await node.ready
        await waitForProducers(reactor, farm, {"stt": 1, "tts": 1})
        stt = await connectConsumer(reactor, farm.endpoint("stt"), "stt")
        tts = await connectConsumer(reactor, farm.endpoint("tts"), "tts")
        consumers = [stt, tts]

        def sttDirect(engine: Any) -> str:
            job = STTJob(engine.name, None, "wav", len(speech))
            return str(transcribeWhole(engine, job, speech).text)

        def ttsDirect(engine: Any) -> bytes:
            return bytes(engine.synthesize(TTSJob(engine.name, None, None, TEXT)))

        async def sttJob(model: str) -> str:
            return str((await stt.stt(model, speech, format="wav")).text)

        async def ttsJob(model: str) -> bytes:
            return (await tts.tts(model, TEXT)).data

        rows: list[tuple[str, ...]] = []
        cases = [
            (whisper.name, sttJob, lambda: sttDirect(whisper)),
            (piper.name, ttsJob, lambda: ttsDirect(piper)),
            ("digest:x", sttJob, None),
            ("tone:x", ttsJob, None),
        ]
        for model, job, direct in cases:
            print(f"node: {model}, {args.jobs} jobs through the farm"
                  + (" and on the engine directly" if direct else "") + "...", flush=True)
            jobTimes: list[float] = []
            engineTimes: list[float] = []
            same = True
            # One of each first, not counted (first-call warm-up).
            viaNode = await job(model)
            if direct is not None:
                same = direct() == viaNode
            for i in range(args.jobs):
                # Alternate which goes first (ABBA...), so that neither side
                # always runs just after the other.
                if direct is None:
                    order: tuple[str, ...] = ("node",)
                else:
                    order = ("node", "engine") if i % 2 == 0 else ("engine", "node")
                for side in order:
                    t0 = time.perf_counter()
                    if side == "node":
                        viaNode = await job(model)
                        jobTimes.append(time.perf_counter() - t0)
                    else:
                        # Blocking the reactor here is fine: nothing else is
                        # going on, and the farm's PINGs are 10 s apart.
                        answer = direct()
                        engineTimes.append(time.perf_counter() - t0)
                        same = same and answer == viaNode
            jobP50 = pct(jobTimes, 50) * 1000
            if engineTimes:
                engineP50 = pct(engineTimes, 50) * 1000
                paired = pct([j - e for j, e in zip(jobTimes, engineTimes)], 50) * 1000
                spread = (pct(engineTimes, 90) - pct(engineTimes, 10)) * 1000
                rows.append((
                    model, f"{jobP50:.1f}", f"{engineP50:.1f}", f"{jobP50 - engineP50:.1f}",
                    f"{paired:.1f}", f"{spread:.1f}", "yes" if same else "NO",
                ))
            else:
                spread = (pct(jobTimes, 90) - pct(jobTimes, 10)) * 1000
                rows.append((model, f"{jobP50:.2f}", "-", f"{jobP50:.2f}", "-", f"{spread:.2f}", "-"))

        # What the STT engines' own decode (WAV parse + resample to 16 kHz)
        # costs: part of the engine time above, on both sides.
        decodes = []
        for _ in range(max(args.jobs, 5)):
            t0 = time.perf_counter()
            decodeAudio(speech, "wav", rate=16000)
            decodes.append(time.perf_counter() - t0)
        rows.append(("(decode of that WAV to 16 kHz)", "", f"{pct(decodes, 50) * 1000:.1f}", "", "", "", ""))
        return rows
    finally:
        for c in consumers:
            c.transport.loseConnection()
        if node.running:
            await node.stopService()
        # (The node's thread pool stops with the reactor.)
        await farm.stop()


def overheadTable(rows: list[tuple[str, ...]]) -> str:
    header = ("model", "job p50 ms", "engine p50 ms", "overhead ms",
              "paired diff p50 ms", "spread p10-p90 ms", "same answer")
    return table(header, rows)


# --------------------------------------------------------------------------


def busySeconds() -> tuple[float, float]:
    """
    CPU seconds used so far by the whole machine (from /proc/stat) and by
    this process and its finished children.
    """
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: all but idle/iowait.
    machine = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return machine, t.user + t.system + t.children_user + t.children_system


async def benchmark(reactor: Any, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    busyBefore = busySeconds()
    print(f"load average before: {os.getloadavg()[0]:.2f} (anything else running skews every number)",
          flush=True)
    workdir = tempfile.mkdtemp(prefix="privox-bench-")
    try:
        # Part 1 runs children one at a time and only waits for them; doing
        # it before the farm and node exist keeps this process quiet then.
        rows, speechPath = measureEngines(args, workdir)
        print()
        print(f"engines: {args.reps} timed runs after a first one, each engine in its own process; "
              f"{os.cpu_count()} cores")
        print(engineTable(rows))
        print()
        if speechPath is None:
            raise SystemExit("no speech from Piper: cannot measure the node's overhead")
        with open(speechPath, "rb") as f:
            speech = f.read()
        overhead = await nodeOverhead(reactor, args, speech)
        print()
        print(f"node per-job overhead: {args.jobs} jobs each (p50), farm + node + consumer over "
              f"loopback in this process, slots=1; overhead = job p50 - engine p50; "
              f"upload {len(speech) / 1000:.0f} KB WAV ({_wavSeconds(speech):.1f} s), "
              f"text {len(TEXT)} chars")
        print(overheadTable(overhead))
        print(
            "engine = the same calls the node makes, on the same engine object, in this thread "
            "(for STT that includes\nthe decode shown last). paired diff = median of (job - engine) "
            "over adjacent pairs. spread = p90 - p10 of\nthe engine times (digest/tone: of the job "
            "times): an overhead smaller than the spread is noise. digest/tone\nrun the same "
            "upload/text through the same path with no model: their job time is the node's, farm's "
            "and\nconsumer's whole cost (relay, framing, thread hand-offs)."
        )
        print()
        elapsed = time.perf_counter() - started
        machine, own = (after - before for after, before in zip(busySeconds(), busyBefore))
        print(f"total {elapsed:.0f} s; other processes used {max(machine - own, 0) / elapsed:.0%} "
              "of a core meanwhile (more than a few % makes these numbers suspect)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def parseArgs(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Load time, real-time factor and peak memory of each speech engine, "
        "and the node's per-job overhead."
    )
    p.add_argument("--quick", action="store_true", help="fewer repetitions (under 90 s)")
    p.add_argument("--reps", type=int, help="timed runs per engine after the first [5; quick 1]")
    p.add_argument("--jobs", type=int, help="jobs per model for the overhead [20; quick 5]")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--build-vits", help=argparse.SUPPRESS)
    p.add_argument("--audio", help=argparse.SUPPRESS)
    p.add_argument("--save-wav", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.quick else 5
    if args.jobs is None:
        args.jobs = 5 if args.quick else 20
    if args.reps < 0 or args.jobs < 1:
        p.error("--reps must be at least 0 and --jobs at least 1")
    return args


def main(argv: list[str]) -> None:
    args = parseArgs(argv)
    if args.child or args.build_vits:
        childMain(args)
        return
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    task.react(lambda reactor: Deferred.fromCoroutine(benchmark(reactor, args)))


if __name__ == "__main__":
    main(sys.argv[1:])
