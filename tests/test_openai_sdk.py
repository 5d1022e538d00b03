"""
The stock OpenAI Python SDK against a real privox-local (its bundled models,
sealed jobs): speech in every format OpenAI offers, and at another speed,
decoded back with PyAV; that speech transcribed back, with timed segments
(verbose_json, srt, vtt) and words (timestamp_granularities). The SDK is blocking: its calls run in a thread
while the exchange runs on the reactor.
"""

from __future__ import annotations

import base64
import io
import json
import time

import av
import openai
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from privox.local import LocalExchange, LocalSettings
from tests.wer import wer

SENTENCE = "Please remember to water the garden before the evening storm."


class OpenAISDKTests(TestCase):
    timeout = 180

    async def client(self) -> openai.OpenAI:
        """
        The SDK, with a key, on a privox-local of its own.
        """
        store = FilePath(self.mktemp())
        local = LocalExchange(LocalSettings(port=0, accounts=f"sqlite:{store.path}"), reactor)
        local.startService()
        self.addCleanup(local.stopService)
        await local.ready
        assert local.store is not None
        key, _ = await local.store.createKey(reactor.seconds())
        return openai.OpenAI(base_url=local.url + "/v1", api_key=key, max_retries=0, timeout=60)

    async def test_speechFormatsAndTranscription(self) -> None:
        client = await self.client()

        def speak(**kwargs: object) -> tuple[bytes, str]:
            response = client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE, **kwargs)
            return response.content, response.response.headers["content-type"]

        # The SDK's default (no format named): mp3, as OpenAI answers.
        formats = {
            None: ("audio/mpeg", "mp3"),
            "mp3": ("audio/mpeg", "mp3"),
            "opus": ("audio/ogg", "opus"),
            "aac": ("audio/aac", "aac"),
            "flac": ("audio/flac", "flac"),
            "wav": ("audio/wav", "pcm_s16le"),
        }
        lengths = {}
        for format, (contentType, codec) in formats.items():
            kwargs = {} if format is None else {"response_format": format}
            body, served = await deferToThread(speak, **kwargs)
            self.assertEqual(served, contentType, format)
            with av.open(io.BytesIO(body)) as decoded:
                stream = decoded.streams.audio[0]
                self.assertEqual(stream.codec_context.name.replace("float", ""), codec, format)
                self.assertEqual(stream.codec_context.channels, 1, format)
                lengths[format] = sum(f.samples for f in decoded.decode(audio=0)) / stream.rate
        self.assertGreater(lengths["wav"], 1.5)
        for format, seconds in lengths.items():
            # The same sentence, whatever its encoding (Piper's timing varies
            # a little from one synthesis to the next; codecs pad a little).
            self.assertLess(abs(seconds / lengths["wav"] - 1), 0.15, format)
        # speed: the same sentence twice as fast lasts about half as long.
        # Piper paces it (to about 2x), a time stretch does the rest.
        for speed in (0.5, 2.0, 4.0):
            paced, _ = await deferToThread(speak, response_format="wav", speed=speed)
            with av.open(io.BytesIO(paced)) as decoded:
                rate = decoded.streams.audio[0].rate
                seconds = sum(f.samples for f in decoded.decode(audio=0)) / rate
            self.assertLess(abs(seconds * speed / lengths["wav"] - 1), 0.15, (speed, seconds))
        pcm, served = await deferToThread(speak, response_format="pcm")
        self.assertEqual(served, "audio/pcm")
        self.assertEqual(len(pcm) % 2, 0)
        self.assertLess(abs(len(pcm) / 2 / 24000 / lengths["wav"] - 1), 0.15)

        # That speech back through the SDK's transcription, from the mp3.
        mp3, _ = await deferToThread(speak)
        transcript = await deferToThread(
            client.audio.transcriptions.create, model="whisper-1", file=("speech.mp3", mp3)
        )
        self.assertLessEqual(wer(SENTENCE, transcript.text), 0.25, transcript.text)

        # Timed segments: verbose_json, SubRip, WebVTT.
        def transcribe(format: str) -> object:
            return client.audio.transcriptions.create(
                model="whisper-1", file=("speech.mp3", mp3), response_format=format
            )

        verbose = await deferToThread(transcribe, "verbose_json")
        self.assertEqual(verbose.text, transcript.text)
        self.assertGreaterEqual(len(verbose.segments), 1)
        starts = [s.start for s in verbose.segments]
        self.assertEqual(starts, sorted(starts))
        self.assertTrue(all(s.start < s.end <= verbose.duration + 0.01 for s in verbose.segments))
        self.assertEqual(" ".join(s.text for s in verbose.segments), verbose.text)
        srt = await deferToThread(transcribe, "srt")
        vtt = await deferToThread(transcribe, "vtt")
        self.assertTrue(srt.startswith("1\n00:00:0"), srt)
        self.assertTrue(vtt.startswith("WEBVTT\n\n00:00:0"), vtt)
        self.assertEqual(srt.count(" --> "), len(verbose.segments))
        self.assertEqual(vtt.count(" --> "), len(verbose.segments))

    async def test_wordTimestamps(self) -> None:
        """
        C{timestamp_granularities=["word"]} with verbose_json, as the SDK
        sends it (C{timestamp_granularities[]}), on Piper's speech: the
        words in order, covering the audio, making up the text; the
        segments too when asked for both.
        """
        client = await self.client()
        text = " ".join([SENTENCE, "The forecast says heavy rain."])

        def speak() -> bytes:
            return client.audio.speech.create(
                model="tts-1", voice="alloy", input=text, response_format="wav"
            ).content

        def transcribe(wav: bytes, granularities: list[str]) -> object:
            return client.audio.transcriptions.create(
                model="whisper-1", file=("speech.wav", wav), response_format="verbose_json",
                timestamp_granularities=granularities,
            )

        wav = await deferToThread(speak)
        verbose = await deferToThread(transcribe, wav, ["word"])
        self.assertLessEqual(wer(text, verbose.text), 0.25, verbose.text)
        self.assertIsNone(verbose.segments)
        words = verbose.words
        self.assertGreaterEqual(len(words), 10, words)
        last = 0.0
        for word in words:
            self.assertTrue(last <= word.start <= word.end <= verbose.duration, (word, words))
            last = word.end
        # Covering the speech: Piper leaves little silence at either end.
        self.assertLess(words[0].start, 0.6, words)
        self.assertGreater(words[-1].end, verbose.duration * 0.8, (words[-1], verbose.duration))
        joined = " ".join(w.word for w in words)
        self.assertEqual(wer(verbose.text, joined), 0.0, joined)
        self.assertLessEqual(wer(text, joined), 0.25, joined)

        both = await deferToThread(transcribe, wav, ["segment", "word"])
        self.assertEqual([(w.word, w.start, w.end) for w in both.words],
                         [(w.word, w.start, w.end) for w in words])
        self.assertGreaterEqual(len(both.segments), 1)
        self.assertEqual(" ".join(s.text for s in both.segments), both.text)

        def refused() -> Exception:
            try:
                client.audio.transcriptions.create(
                    model="whisper-1", file=("speech.wav", wav), timestamp_granularities=["word"]
                )
            except openai.BadRequestError as e:
                return e
            raise AssertionError("word timestamps without verbose_json were accepted")

        error = await deferToThread(refused)
        self.assertIn("verbose_json", str(error))

    async def test_streaming(self) -> None:
        """
        The SDK's streaming calls: speech read as it comes (its first bytes
        before the last sentence is spoken), as server-sent events, and a
        transcription streamed as events (deltas, then the whole text).
        """
        client = await self.client()
        text = " ".join([SENTENCE, "The forecast says heavy rain.", "Close the windows too."])

        def streamed() -> tuple[float, float, bytes]:
            started = time.monotonic()
            first, chunks = None, []
            with client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="alloy", input=text, response_format="pcm"
            ) as response:
                for chunk in response.iter_bytes():
                    if first is None:
                        first = time.monotonic() - started
                    chunks.append(chunk)
            return first or 0.0, time.monotonic() - started, b"".join(chunks)

        first, total, pcm = await deferToThread(streamed)
        self.assertGreater(len(pcm) / 2 / 24000, 4.0)
        # Three sentences, spoken one after another: the first is out well
        # before the last.
        self.assertLess(first, total * 0.75, (first, total))

        def sse() -> list[dict]:
            response = client.audio.speech.create(
                model="tts-1", voice="alloy", input=text, response_format="mp3",
                stream_format="sse",
            )
            self.assertEqual(response.response.headers["content-type"],
                             "text/event-stream; charset=utf-8")
            chunks = response.content.decode().split("\n\n")[:-1]
            return [json.loads(c[len("data: "):]) for c in chunks]

        events = await deferToThread(sse)
        self.assertEqual(events[-1]["type"], "speech.audio.done")
        self.assertGreaterEqual(len(events), 3)
        mp3 = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
        with av.open(io.BytesIO(mp3)) as decoded:
            rate = decoded.streams.audio[0].rate
            self.assertGreater(sum(f.samples for f in decoded.decode(audio=0)) / rate, 4.0)

        def transcribed() -> list:
            return list(client.audio.transcriptions.create(
                model="whisper-1", file=("speech.mp3", mp3), stream=True
            ))

        stream = await deferToThread(transcribed)
        types = [e.type for e in stream]
        self.assertEqual(types[-1], "transcript.text.done")
        self.assertIn("transcript.text.delta", types)
        deltas = "".join(e.delta for e in stream if e.type == "transcript.text.delta")
        self.assertEqual(deltas.split(), stream[-1].text.split())
        self.assertLessEqual(wer(text, stream[-1].text), 0.25, stream[-1].text)
