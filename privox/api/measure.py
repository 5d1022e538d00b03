"""
What a request will cost, before it runs: the seconds of audio it is
admitted for and holds while it runs (L{privox.api.access}).

  - STT: the upload's real length (L{privox.audiofile.uploadSeconds}: WAV
    data at its true sample format, anything else decoded and counted),
    measured in a thread. Exact: that is also what the request pays.
  - TTS: L{spokenSeconds}, a conservative estimate of how long the text
    takes to say. The request then pays the length of the audio it got, and
    is never given more than it held (L{privox.api.app} cuts a longer
    answer short), so the estimate must not fall short of what an engine
    really says. Measured with Piper (en_US-joe-medium): plain sentences
    take 0.06-0.08 s a character, but a digit 0.27-0.54 s (30 digits are
    read as one number of 16 s), an ASCII letter spelled out (an acronym, a
    word without vowels) up to 0.42 s ("W"), a symbol up to 0.7 s, and a
    character beyond Latin-1 up to 1.55 s (a letter with an unusual accent
    is spelled with its accent's name, "w circumflex"; an emoji is read by
    its name). Each kind of character is weighted by its worst case below;
    ordinary text comes out at about twice its real length.
"""

from __future__ import annotations

import re
import unicodedata

#: Seconds per character of each kind (worst cases measured, rounded up).
DIGIT = 0.65
SPELLED_LETTER = 0.45
WORD_LETTER = 0.15
#: Anything beyond ASCII and Latin-1: other scripts, rarer accents, symbols, emoji.
BEYOND_LATIN1 = 1.6
SYMBOL = 0.75
PUNCTUATION = 0.3
#: Added once: the silence engines put around speech.
LEAD = 0.5

# Words of ASCII and Latin-1 letters; then one character at a time.
_TOKEN = re.compile(r"[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u00ff]+|\s+|.", re.S)
_VOWELS = frozenset("aeiouyAEIOUYæøÆØ")
_QUIET_PUNCTUATION = frozenset(",.;:!?'\"()-")


def spokenSeconds(text: str) -> float:
    """
    An upper bound on the seconds of speech C{text} makes.
    """
    seconds = LEAD
    for token in _TOKEN.findall(unicodedata.normalize("NFC", text)):
        first = token[0]
        if first.isspace():
            continue
        if first.isalpha() and first <= "\u00ff":
            seconds += len(token) * (SPELLED_LETTER if _spelled(token) else WORD_LETTER)
        elif first.isascii() and first.isdigit():
            seconds += DIGIT
        elif not first.isascii() and first > "\u00ff" or first.isalnum():
            seconds += BEYOND_LATIN1
        elif first in _QUIET_PUNCTUATION:
            seconds += PUNCTUATION
        else:
            seconds += SYMBOL
    return seconds


def _spelled(word: str) -> bool:
    """
    Whether an engine is likely to spell C{word} out letter by letter: one
    letter, no vowel, or all capitals (an acronym).
    """
    if len(word) == 1 or word.isupper():
        return True
    return not any(_base(c) in _VOWELS for c in word)


def _base(letter: str) -> str:
    """
    A Latin-1 letter without its accent (é: e).
    """
    return unicodedata.normalize("NFD", letter)[0]
