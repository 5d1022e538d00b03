"""
A transcript's timed segments in OpenAI's transcription formats: the
segments and words of C{verbose_json}, SubRip (C{srt}) and WebVTT (C{vtt}).
Every engine gets every format: where a producer gave no segments, the
whole transcript is one (with no words: none is invented).
"""

from __future__ import annotations

from typing import Any

from privox.api.exchange import TimedText, TimedWord, Transcribed


def segmentsOf(result: Transcribed) -> tuple[TimedText, ...]:
    """
    C{result}'s segments, none past the audio's measured length; one of the
    whole transcript where it has none (and there is text).
    """
    duration = result.duration_s
    if not result.segments:
        if not result.text.strip():
            return ()
        return (TimedText(0.0, round(duration or 0.0, 3), result.text.strip()),)
    if duration is None:
        return result.segments
    return tuple(
        TimedText(
            min(s.start, duration), min(s.end, duration), s.text, s.avg_logprob, s.no_speech_prob,
            tuple(
                TimedWord(min(w.start, duration), min(w.end, duration), w.word, w.probability)
                for w in s.words
            ),
        )
        for s in result.segments
    )


def verboseWords(segments: tuple[TimedText, ...]) -> list[dict[str, Any]]:
    """
    The C{words} of OpenAI's C{verbose_json} (C{timestamp_granularities[]}
    C{word}): every segment's, in order.
    """
    return [{"word": w.word, "start": w.start, "end": w.end} for s in segments for w in s.words]


def verboseSegments(segments: tuple[TimedText, ...]) -> list[dict[str, Any]]:
    """
    The C{segments} of OpenAI's C{verbose_json}.
    """
    return [
        {
            "id": index,
            "seek": 0,
            "start": s.start,
            "end": s.end,
            "text": s.text,
            "tokens": [],
            "temperature": 0.0,
            "avg_logprob": s.avg_logprob if s.avg_logprob is not None else 0.0,
            "compression_ratio": 0.0,
            "no_speech_prob": s.no_speech_prob if s.no_speech_prob is not None else 0.0,
        }
        for index, s in enumerate(segments)
    ]


def srt(segments: tuple[TimedText, ...]) -> str:
    """
    SubRip: numbered cues, C{HH:MM:SS,mmm --> HH:MM:SS,mmm}, a blank line
    after each.
    """
    return "".join(
        f"{index}\n{_time(s.start, ',')} --> {_time(s.end, ',')}\n{_oneLine(s.text)}\n\n"
        for index, s in enumerate(segments, 1)
    )


def vtt(segments: tuple[TimedText, ...]) -> str:
    """
    WebVTT: the C{WEBVTT} header, then cues C{HH:MM:SS.mmm --> HH:MM:SS.mmm}.
    """
    return "WEBVTT\n\n" + "".join(
        f"{_time(s.start, '.')} --> {_time(s.end, '.')}\n{_oneLine(s.text)}\n\n"
        for s in segments
    )


def _time(seconds: float, decimal: str) -> str:
    milliseconds = round(seconds * 1000)
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, milli = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{whole:02d}{decimal}{milli:03d}"


def _oneLine(text: str) -> str:
    # A blank line ends a cue, and "-->" starts a timing line.
    return " ".join(text.split()).replace("-->", "->")
