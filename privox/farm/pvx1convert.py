"""
What original PriVox nodes can read, made from what a job carries.

An original node reads its job header with one C{recv(1024)} and splits it
on C{&} and C{=}; it reads an STT upload as raw 16 kHz mono 16-bit PCM (the
original API converted every upload with FFmpeg first). So a job for a
PVX/1 node is translated here: its text in pieces that fit one read, with
no C{&} or C{=} in them; its audio as a 16 kHz mono WAV. Pure functions;
L{readableAudio} blocks (decoding), so the farm runs it in a thread.
"""

from __future__ import annotations

import re

from privox.audiofile import sniff
from privox.engines.audio import PCM_RATE, decodeAudio, encodeWav, toInt16
from privox.engines.errors import BadAudio
from privox.wav import BadWav, WavFormat, readWavHeader

#: The longest header sent to an original node: it reads one C{recv(1024)},
#: and a header cut there loses its last fields (or dies on a character cut
#: in two).
MAX_HEADER = 1000

#: What an original node reads without conversion.
_READABLE = WavFormat(PCM_RATE, 1, 2, "int")

# The header's separators, in a text, said as words an engine speaks.
_WORDS = {
    "en": {"&": " and ", "=": " equals "},
    "fr": {"&": " et ", "=": " égale "},
    "de": {"&": " und ", "=": " gleich "},
    "es": {"&": " y ", "=": " igual a "},
}
_SEPARATORS = re.compile(r"\s*([&=])\s*")
# Where a long text is best cut: after a sentence, then after a clause,
# then between words.
_BREAKS = (re.compile(r"(?<=[.!?\n])\s+"), re.compile(r"(?<=[,;:])\s+"), re.compile(r"\s+"))


def speakable(text: str, language: str | None) -> str:
    """
    C{text} with the header's separators (C{&}, C{=}) spelled out in
    C{language} (else left as a space): an original node would cut the text
    at them, or die.
    """
    words = _WORDS.get(language or "en", {})
    return _SEPARATORS.sub(lambda m: words.get(m.group(1), " "), text)


def textPieces(text: str, room: int) -> list[str]:
    """
    C{text} cut into pieces of at most C{room} UTF-8 bytes each: at sentence
    ends where it can, else at clauses or spaces, else between characters
    (never inside one).
    """
    pieces: list[str] = []
    rest = text.strip()
    while len(rest.encode("utf-8")) > room:
        head = _fit(rest, room)
        cut = len(head)
        for breaks in _BREAKS:
            ends = [m.start() for m in breaks.finditer(rest, 0, cut + 1) if m.start() > 0]
            if ends:
                cut = ends[-1]
                break
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return [p for p in pieces if p]


def _fit(text: str, room: int) -> str:
    # The longest prefix of whole characters within room bytes.
    return text.encode("utf-8")[:room].decode("utf-8", "ignore")


def readableAudio(data: bytes, format: str, fromOriginal: bool) -> bytes:
    """
    An upload as an original node reads it: a 16 kHz mono 16-bit WAV (its
    44-byte header read as 22 samples of near silence, as the original's
    own API sent it). What it already reads is sent as it is: such a WAV,
    raw PCM, a zip (it unpacks C{sample.wav} itself), and, C{fromOriginal}
    (an original consumer, whose uploads carry no format), anything that is
    not a WAV or a zip: raw PCM, as the original's clients sent it.

    @raise BadAudio: an upload that does not decode.
    """
    kind = sniff(data) if format == "auto" else format
    if kind in ("pcm_s16le", "zip") or (kind == "container" and fromOriginal):
        return data
    if kind == "wav":
        try:
            header = readWavHeader(data)
        except BadWav as e:
            raise BadAudio(str(e)) from None
        if header is not None and header.format == _READABLE:
            return data
    audio = decodeAudio(data, format, PCM_RATE)
    return encodeWav(toInt16(audio.samples), PCM_RATE)
