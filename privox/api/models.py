"""
Which model serves a request: the original API's qualities, languages and
voices, and OpenAI's model and voice names, mapped onto the models farms
serve. Pure data and lookups; the tables come from configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from privox.api.errors import BadInput, Unprocessable
from privox.languages import UnknownLanguage, languageCode

QUALITIES = ("fast", "normal", "better", "best", "xcribe", "xcribe2")

#: The original exchange: quality -> (any-language model, English model).
DEFAULT_STT = (
    "fast whisper:tiny whisper:tiny.en",
    "normal whisper:base whisper:base.en",
    "better whisper:small whisper:small.en",
    "best whisper:medium whisper:medium.en",
    "xcribe whisper:large whisper:large",
    "xcribe2 whisper:large-v2 whisper:large-v2",
)
#: voice name -> model and the model's own voice (speaker).
DEFAULT_VOICES = (
    "voice1 coqui:tts_models/en/vctk/vits p236",
    "voice2 coqui:tts_models/en/vctk/vits p270",
)
#: OpenAI's voices, spread over ours; unknown names get the default voice.
OPENAI_VOICES = {
    "alloy": "voice1", "ash": "voice2", "ballad": "voice2", "coral": "voice1",
    "echo": "voice2", "fable": "voice1", "nova": "voice1", "onyx": "voice2",
    "sage": "voice1", "shimmer": "voice1", "verse": "voice2",
}
OPENAI_STT_MODELS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")
OPENAI_TTS_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")


@dataclass(frozen=True)
class Voice:
    model: str
    speaker: str | None


def isEnglish(language: str | None) -> bool:
    """
    Whether C{language} (a name or code; L{None}: the API's default) is
    English, so that C{English}, C{en} and C{en-US} pick the same model.
    """
    return language is None or _code(language) == "en"


def _code(language: str) -> str | None:
    try:
        return languageCode(language)
    except UnknownLanguage:
        return None


@dataclass(frozen=True)
class ModelTable:
    """
    @ivar stt: quality -> (any-language model, English model).
    @ivar voices: voice name -> L{Voice}; the first is the default.
    """

    stt: dict[str, tuple[str, str]]
    voices: dict[str, Voice]
    defaultQuality: str = "fast"
    defaultLanguage: str = "en"
    sttLanguages: dict[str, str] = field(default_factory=dict)
    #: STT model -> the model its jobs go to instead while no producer
    #: serves it (only where the configuration says so).
    sttFallbacks: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(
        cls,
        stt: tuple[str, ...],
        voices: tuple[str, ...],
        sttLanguages: tuple[str, ...] = (),
        sttFallbacks: tuple[str, ...] = (),
    ) -> ModelTable:
        """
        From configuration lines: C{"QUALITY MODEL ENGLISH-MODEL"} and
        C{"VOICE MODEL [SPEAKER]"}; C{"LANGUAGE MODEL"} pins a language (a
        code or name) to a model whatever the quality (e.g. C{"ko vosk:ko"}).

        @raise ValueError: a malformed line.
        """
        sttTable: dict[str, tuple[str, str]] = {}
        for line in stt:
            parts = line.split()
            if len(parts) not in (2, 3):
                raise ValueError(f"STT model line {line!r} is not 'QUALITY MODEL [ENGLISH-MODEL]'")
            sttTable[parts[0]] = (parts[1], parts[-1])
        voiceTable: dict[str, Voice] = {}
        for line in voices:
            parts = line.split()
            if len(parts) not in (2, 3):
                raise ValueError(f"voice line {line!r} is not 'VOICE MODEL [SPEAKER]'")
            voiceTable[parts[0]] = Voice(parts[1], parts[2] if len(parts) == 3 else None)
        pinned: dict[str, str] = {}
        for line in sttLanguages:
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"language line {line!r} is not 'LANGUAGE MODEL'")
            try:
                # Keyed by code, as requests arrive: "Korean" pins what "ko" asks for.
                pinned[languageCode(parts[0])] = parts[1]
            except UnknownLanguage as e:
                raise ValueError(f"language line {line!r}: {e}") from None
        fallbacks: dict[str, str] = {}
        for line in sttFallbacks:
            parts = line.split()
            if len(parts) != 2 or parts[0] == parts[1]:
                raise ValueError(f"fallback line {line!r} is not 'MODEL OTHER-MODEL'")
            fallbacks[parts[0]] = parts[1]
        if not sttTable or not voiceTable:
            raise ValueError("the STT and voice tables must not be empty")
        default = "fast" if "fast" in sttTable else next(iter(sttTable))
        return cls(sttTable, voiceTable, default, "en", pinned, fallbacks)

    def sttModel(self, quality: str | None, language: str | None) -> str:
        """
        @raise BadInput: an unknown quality.
        """
        quality = quality or self.defaultQuality
        if quality not in self.stt:
            raise BadInput(f"quality must be one of {', '.join(self.stt)}")
        code = _code(language) if language else None
        if code in self.sttLanguages:
            return self.sttLanguages[code]
        anyLanguage, english = self.stt[quality]
        return english if isEnglish(language) else anyLanguage

    def openaiSttModel(self, model: str | None, language: str | None) -> str:
        """
        OpenAI's names map to the default quality; a Privox model name
        (C{ENGINE:MODEL}) is taken as it is.
        """
        if model and ":" in model:
            return model
        if model and model not in OPENAI_STT_MODELS and model not in self.stt:
            raise Unprocessable(f"unknown model {model!r}")
        return self.sttModel(model if model in self.stt else None, language)

    def translationModel(self, model: str | None) -> str:
        """
        The model that translates for OpenAI's C{/v1/audio/translations}: a
        Privox model name (C{ENGINE:MODEL}) as it is; OpenAI's names and
        the qualities, that quality's any-language model (English-only
        models cannot translate).

        @raise Unprocessable: an unknown model.
        """
        if model and ":" in model:
            return model
        if model and model not in OPENAI_STT_MODELS and model not in self.stt:
            raise Unprocessable(f"unknown model {model!r}")
        quality = model if model in self.stt else self.defaultQuality
        return self.stt[quality][0]

    @property
    def defaultVoice(self) -> str:
        return next(iter(self.voices))

    def voice(self, name: str | None, strict: bool = True) -> Voice:
        """
        @param strict: an unknown name is an error (the original API) rather
            than the default voice (OpenAI clients).
        @raise Unprocessable: an unknown voice, when C{strict}.
        """
        if not name:
            return self.voices[self.defaultVoice]
        if name in self.voices:
            return self.voices[name]
        if name in OPENAI_VOICES and OPENAI_VOICES[name] in self.voices:
            return self.voices[OPENAI_VOICES[name]]
        if strict:
            raise Unprocessable(f"unknown voice {name!r}; voices: {', '.join(self.voices)}")
        return self.voices[self.defaultVoice]

    def openaiTtsVoice(self, model: str | None, voice: str | None) -> Voice:
        chosen = self.voice(voice, strict=False)
        if model and ":" in model:
            return Voice(model, chosen.speaker)
        if model and model not in OPENAI_TTS_MODELS:
            raise Unprocessable(f"unknown model {model!r}")
        return chosen

    def byService(self) -> dict[str, set[str]]:
        """
        The farm models this table sends jobs to, by service.
        """
        stt = {m for pair in self.stt.values() for m in pair} | set(self.sttLanguages.values())
        return {"stt": stt, "tts": {v.model for v in self.voices.values()}}

    def farmModel(self, name: str) -> tuple[str, str]:
        """
        The service and the farm model a client's model name sends its job
        to (OpenAI's names: the default quality, in English; the default
        voice).
        """
        if name in OPENAI_TTS_MODELS:
            return "tts", self.voice(None).model
        if name in OPENAI_STT_MODELS:
            return "stt", self.sttModel(None, None)
        service = "tts" if name in self.byService()["tts"] else "stt"
        return service, name

    def models(self) -> list[str]:
        """
        Every model name a client may ask for, for GET /v1/models.
        """
        names = list(OPENAI_STT_MODELS + OPENAI_TTS_MODELS)
        for pair in self.stt.values():
            names.extend(pair)
        names.extend(v.model for v in self.voices.values())
        names.extend(self.sttLanguages.values())
        return sorted(set(names), key=names.index)
