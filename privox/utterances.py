"""
Cutting a stream of speech into utterances on silence, with webrtcvad:
L{Segmenter} says when one has ended (C{privox caption} sends each to be
transcribed) and what the one under way holds so far (the Whisper engine
re-decodes it for live partial transcripts).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import webrtcvad

from privox.wav import pcmToWav

#: The rate utterances are cut at: mono signed 16-bit little-endian PCM.
RATE = 16000
#: Frame lengths webrtcvad accepts, in milliseconds.
FRAME_MS = (10, 20, 30)
#: An utterance with less speech than this (a click, a cough) is dropped.
MIN_SPEECH_MS = 120


@dataclass(frozen=True)
class Utterance:
    """
    A stretch of speech cut from the stream, with its padding.

    @ivar pcm: its mono s16le samples.
    @ivar start: where it starts in the stream, in seconds.
    """

    pcm: bytes = field(repr=False)
    start: float
    rate: int = RATE

    @property
    def duration(self) -> float:
        return len(self.pcm) / 2 / self.rate

    @property
    def end(self) -> float:
        return self.start + self.duration

    def wav(self) -> bytes:
        return pcmToWav(self.pcm, self.rate)


class Segmenter:
    """
    Cuts a stream of mono s16le PCM into utterances, frame by frame.

    A speech frame starts an utterance, which takes along up to
    C{paddingMs} of the audio before it. The utterance ends once
    C{silenceMs} of non-speech follow its last speech frame, keeping
    C{paddingMs} of that silence; the rest becomes the next one's leading
    padding. An utterance reaching C{maxSeconds} is cut there, and speech
    going on starts another. Utterances with less than C{minSpeechMs} of
    speech in them are dropped. The result does not depend on how the bytes
    are split between L{feed} calls.

    @param isSpeech: the classifier, given one frame's bytes (see
        L{webrtcvadClassifier}).
    """

    def __init__(
        self,
        isSpeech: Callable[[bytes], bool],
        rate: int = RATE,
        frameMs: int = 30,
        silenceMs: int = 600,
        maxSeconds: float = 30.0,
        paddingMs: int = 200,
        minSpeechMs: int = MIN_SPEECH_MS,
    ) -> None:
        if frameMs not in FRAME_MS:
            raise ValueError(f"frames must be 10, 20 or 30 ms, not {frameMs}")
        if silenceMs <= 0 or maxSeconds <= 0 or paddingMs < 0:
            raise ValueError("silenceMs and maxSeconds must be positive, paddingMs not negative")
        self.isSpeech = isSpeech
        self.rate = rate
        self.frameMs = frameMs
        self.frameBytes = rate * frameMs // 1000 * 2
        self.silenceFrames = math.ceil(silenceMs / frameMs)
        self.paddingFrames = paddingMs // frameMs
        self.maxFrames = max(1, int(maxSeconds * 1000 // frameMs))
        self.minSpeechFrames = math.ceil(minSpeechMs / frameMs)
        self._partial = bytearray()
        self._before: deque[bytes] = deque(maxlen=self.paddingFrames or None)
        self._frames: list[bytes] | None = None
        self._start = 0  # frame index of the utterance's first frame
        self._lastSpeech = 0  # index in _frames of its last speech frame
        self._voiced = 0
        self._position = 0  # frames seen
        self._finished = False

    @property
    def current(self) -> Utterance | None:
        """
        The utterance under way, as far as the stream has come (the silence
        after its last speech included), or None: there is none, or it has
        too little speech yet to be kept if it ended now.
        """
        if self._frames is None or self._voiced < self.minSpeechFrames:
            return None
        return self._utterance(self._frames)

    @property
    def quietMs(self) -> int:
        """
        The non-speech since the last speech of the utterance under way, in
        milliseconds (0 while there is none).
        """
        if self._frames is None:
            return 0
        return (len(self._frames) - 1 - self._lastSpeech) * self.frameMs

    def feed(self, data: bytes) -> list[Utterance]:
        """
        Take the next bytes of the stream.

        @return: the utterances they complete, in order.
        """
        if self._finished:
            raise ValueError("feed() after finish()")
        self._partial += data
        done: list[Utterance] = []
        whole = len(self._partial) - len(self._partial) % self.frameBytes
        for offset in range(0, whole, self.frameBytes):
            frame = bytes(self._partial[offset : offset + self.frameBytes])
            utterance = self._frame(frame)
            if utterance is not None:
                done.append(utterance)
        del self._partial[:whole]
        return done

    def finish(self) -> list[Utterance]:
        """
        The stream has ended: the utterance under way, if any. A last frame
        too short to classify is dropped.
        """
        if self._finished:
            raise ValueError("finish() called twice")
        self._finished = True
        self._partial.clear()
        if self._frames is None:
            return []
        utterance = self._end(trim=True)
        return [] if utterance is None else [utterance]

    def _frame(self, frame: bytes) -> Utterance | None:
        speech = self.isSpeech(frame)
        self._position += 1
        if self._frames is None:
            if not speech:
                if self.paddingFrames:
                    self._before.append(frame)
                return None
            self._frames = [*self._before, frame]
            self._start = self._position - len(self._frames)
            self._before.clear()
            self._lastSpeech = len(self._frames) - 1
            self._voiced = 1
            return None
        self._frames.append(frame)
        if speech:
            self._lastSpeech = len(self._frames) - 1
            self._voiced += 1
        if len(self._frames) - 1 - self._lastSpeech >= self.silenceFrames:
            return self._end(trim=True)
        if len(self._frames) >= self.maxFrames:
            return self._end(trim=False)
        return None

    def _end(self, trim: bool) -> Utterance | None:
        frames = self._frames
        assert frames is not None
        self._frames = None
        if trim:
            keep = self._lastSpeech + 1 + self.paddingFrames
            if self.paddingFrames:
                self._before.extend(frames[keep:])
            frames = frames[:keep]
        if self._voiced < self.minSpeechFrames:
            return None
        return self._utterance(frames)

    def _utterance(self, frames: list[bytes]) -> Utterance:
        return Utterance(b"".join(frames), self._start * self.frameMs / 1000, self.rate)


def webrtcvadClassifier(aggressiveness: int, rate: int = RATE) -> Callable[[bytes], bool]:
    """
    webrtcvad's speech/non-speech decision for one frame.

    @param aggressiveness: 0 to 3, how readily a frame is called non-speech.
    """
    vad = webrtcvad.Vad(aggressiveness)

    def isSpeech(frame: bytes) -> bool:
        return bool(vad.is_speech(frame, rate))

    return isSpeech
