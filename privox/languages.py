"""
Language names and codes: the one place that says what a language a client
or a node gives means.

The original PriVox clients send names (C{language=English}, C{French},
C{german}); OpenAI clients and Privox's own send ISO codes (C{en}, C{de}),
sometimes with a region (C{en-US}, C{pt_BR}); nodes advertise what their
engines say (C{en}, C{en_US}). L{languageCode} turns each into the one
lowercase code that models, farms and engines compare: the languages
Whisper knows, by Whisper's code (two letters, or three where ISO 639-1
has none: C{haw}, C{yue}) or English name.
"""

from __future__ import annotations

import re

#: Any language: passed through unchanged (PVX/2's C{"*"}).
ANY = "*"

#: Whisper's languages: code -> English name (its C{tokenizer.LANGUAGES}).
LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish",
    "ru": "russian", "ko": "korean", "fr": "french", "ja": "japanese",
    "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian",
    "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian",
    "ta": "tamil", "no": "norwegian", "th": "thai", "ur": "urdu",
    "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali",
    "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque",
    "is": "icelandic", "hy": "armenian", "ne": "nepali", "mn": "mongolian",
    "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala",
    "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali",
    "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic",
    "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese",
    "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar",
    "bo": "tibetan", "tl": "tagalog", "mg": "malagasy", "as": "assamese",
    "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa",
    "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}

#: Other names Whisper takes (its C{TO_LANGUAGE_CODE}), and C{jv}: ISO
#: 639-1's code for Javanese, which Whisper spells C{jw}.
ALIASES: dict[str, str] = {
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht",
    "letzeburgesch": "lb", "pushto": "ps", "panjabi": "pa", "moldavian": "ro",
    "moldovan": "ro", "sinhalese": "si", "castilian": "es", "mandarin": "zh",
    "jv": "jw",
}

_CODES: dict[str, str] = {
    **{code: code for code in LANGUAGES},
    **{name: code for code, name in LANGUAGES.items()},
    **ALIASES,
}

#: The most characters of an unknown language its error message repeats.
MAX_SHOWN = 40

# A region or script after the language: "en-US", "en_us", "zh-Hans".
_TAGGED = re.compile(r"([a-z]{2,3})(?:[-_][a-z0-9]{1,8})+")


class UnknownLanguage(ValueError):
    """
    A language that is neither a code nor a name of one Whisper knows.
    """

    def __init__(self, value: str) -> None:
        # A client may send anything: say enough of it to recognise.
        shown = value if len(value) <= MAX_SHOWN else value[:MAX_SHOWN] + "..."
        super().__init__(
            f"unknown language {shown!r}: give a language name or code, "
            "such as English, en, German or de"
        )
        self.value = value


def languageCode(value: str) -> str:
    """
    The lowercase code for a language given by code (C{en}, C{haw}), English
    name (C{English}, C{french}), or code with a region (C{en-US}, C{pt_BR}:
    the region is dropped), whatever its case and surrounding whitespace.
    C{*} (any language) is returned as it is.

    @raise UnknownLanguage: no language Whisper knows.
    """
    wanted = value.strip().lower()
    if wanted == ANY:
        return ANY
    code = _CODES.get(wanted)
    if code is None:
        # Only a code takes a region: "english-us" is no language.
        tagged = _TAGGED.fullmatch(wanted)
        code = _CODES.get(tagged.group(1)) if tagged else None
    if code is None:
        raise UnknownLanguage(value)
    return code

