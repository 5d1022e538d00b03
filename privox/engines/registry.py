"""
From a model spec on the command line to a loaded engine.

A spec is C{ENGINE:MODEL} or C{ENGINE:MODEL=PATH}. C{MODEL} is the name the
node advertises and the API asks for; C{PATH}, when given, is where the model
lies on disk. Without a path the engine looks for a model of that name shipped
in an installed package (offline), then, where the engine can, downloads it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

#: engine -> (module, class, service). Engines are imported only when used:
#: some pull in torch.
ENGINES: dict[str, tuple[str, str, str]] = {
    "whisper": ("privox.engines.whisper", "WhisperEngine", "stt"),
    "vosk": ("privox.engines.vosk", "VoskEngine", "stt"),
    "piper": ("privox.engines.piper", "PiperEngine", "tts"),
    "coqui": ("privox.engines.coqui", "CoquiEngine", "tts"),
    "digest": ("privox.engines.digest", "DigestEngine", "stt"),
    "tone": ("privox.engines.digest", "ToneEngine", "tts"),
    # sleep:RTF: sleeps RTF seconds per second of audio (tests, benchmarks).
    "sleep": ("privox.engines.digest", "SleepEngine", "stt"),
}


class SpecError(ValueError):
    """
    A model spec that names no known engine or is malformed.
    """


@dataclass(frozen=True)
class ModelSpec:
    engine: str
    model: str
    path: str | None = None

    @property
    def name(self) -> str:
        return f"{self.engine}:{self.model}"

    @property
    def service(self) -> str:
        return ENGINES[self.engine][2]

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        engine, sep, rest = spec.partition(":")
        if not sep or not rest:
            raise SpecError(f"model spec {spec!r} is not ENGINE:MODEL[=PATH]")
        if engine not in ENGINES:
            raise SpecError(
                f"unknown engine {engine!r} in {spec!r}; known: {', '.join(sorted(ENGINES))}"
            )
        model, _, path = rest.partition("=")
        if not model:
            raise SpecError(f"model spec {spec!r} names no model")
        return cls(engine, model, path or None)


def createEngine(spec: ModelSpec) -> Any:
    """
    Build (but do not load) the engine for C{spec}.
    """
    module, className, _ = ENGINES[spec.engine]
    return getattr(importlib.import_module(module), className)(spec.model, spec.path)
