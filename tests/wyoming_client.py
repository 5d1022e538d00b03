"""
A Wyoming client as Home Assistant is one: the C{wyoming} package's
C{AsyncTcpClient}, run by tests/test_wyoming.py against a real
privox-local as a separate process (the server under test is Twisted; this
is asyncio, as Home Assistant is).

    python tests/wyoming_client.py HOST PORT

Prints one JSON report: the info; speech plain and streamed (as Home
Assistant streams an LLM's answer: text while audio comes back); that
speech transcribed back, streamed; and a refused request (its error, then
the end of its connection) followed by another connection.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from wyoming.asr import Transcribe, Transcript, TranscriptChunk
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

SENTENCE = "The kitchen lights are on. Please turn them off before you leave."
TIMEOUT = 120.0
SAMPLES_PER_CHUNK = 1024


def client(host: str, port: int) -> AsyncTcpClient:
    return AsyncTcpClient(host, port, connect_timeout=10, read_timeout=TIMEOUT)


async def read(c: AsyncTcpClient) -> Event:
    event = await c.read_event()
    if event is None:
        raise SystemExit("the server closed the connection")
    return event


async def describe(host: str, port: int) -> dict[str, Any]:
    async with client(host, port) as c:
        await c.write_event(Describe().event())
        event = await read(c)
        assert Info.is_type(event.type), event
        Info.from_event(event)  # what Home Assistant does with it
        return event.data


def audioOf(events: list[Event]) -> tuple[bytes, list[int]]:
    audio = b"".join(AudioChunk.from_event(e).audio for e in events if AudioChunk.is_type(e.type))
    rates = [AudioStart.from_event(e).rate for e in events if AudioStart.is_type(e.type)]
    return audio, rates


async def speakPlain(host: str, port: int) -> tuple[dict[str, Any], bytes]:
    async with client(host, port) as c:
        await c.write_event(Synthesize(SENTENCE, voice=SynthesizeVoice(name="voice1")).event())
        events = []
        while True:
            event = await read(c)
            if Error.is_type(event.type):
                raise SystemExit(f"synthesize: {event.data}")
            events.append(event)
            if AudioStop.is_type(event.type):
                break
    audio, rates = audioOf(events)
    return {"seconds": len(audio) / 2 / rates[0], "rates": rates}, audio


async def speakStreamed(host: str, port: int) -> dict[str, Any]:
    """
    As Home Assistant's Wyoming TTS streams: one task writes the text as
    it comes (with the whole text again, for servers that cannot stream),
    another reads audio until synthesize-stopped.
    """
    async with client(host, port) as c:
        voice = SynthesizeVoice(name="voice1")

        async def write() -> None:
            await c.write_event(SynthesizeStart(voice=voice).event())
            for word in SENTENCE.split(" "):
                await c.write_event(SynthesizeChunk(text=word + " ").event())
                await asyncio.sleep(0.02)
            await c.write_event(Synthesize(text=SENTENCE, voice=voice).event())
            await c.write_event(SynthesizeStop().event())

        writer = asyncio.ensure_future(write())
        events = []
        while True:
            event = await read(c)
            if Error.is_type(event.type):
                raise SystemExit(f"synthesize stream: {event.data}")
            events.append(event)
            if SynthesizeStopped.is_type(event.type):
                break
        await writer
    audio, rates = audioOf(events)
    return {
        "seconds": len(audio) / 2 / rates[0],
        "rates": rates,
        "segments": len(rates),
        "last": events[-1].type,
    }


async def transcribe(host: str, port: int, audio: bytes, rate: int) -> dict[str, Any]:
    """
    The speech sent back as a satellite's microphone would send it (at the
    speech's own rate: the server converts), with a second of silence
    after it; the transcript read as it streams.
    """
    audio += bytes(rate * 2)
    async with client(host, port) as c:
        await c.write_event(Transcribe(language="en").event())
        await c.write_event(AudioStart(rate=rate, width=2, channels=1).event())
        step = SAMPLES_PER_CHUNK * 2
        for offset in range(0, len(audio), step):
            piece = audio[offset : offset + step]
            await c.write_event(AudioChunk(rate=rate, width=2, channels=1, audio=piece).event())
        await c.write_event(AudioStop().event())
        order, chunks, text = [], [], None
        while True:
            event = await read(c)
            order.append(event.type)
            if Error.is_type(event.type):
                raise SystemExit(f"transcribe: {event.data}")
            if TranscriptChunk.is_type(event.type):
                chunks.append(TranscriptChunk.from_event(event).text)
            elif Transcript.is_type(event.type):
                text = Transcript.from_event(event).text
            elif event.type == "transcript-stop":
                break
    return {"order": order, "chunks": chunks, "text": text}


async def refused(host: str, port: int) -> dict[str, Any]:
    """
    A request that fails: its error, then the end of the connection (as
    Home Assistant needs: it reads past errors); the next connection is
    served.
    """
    async with client(host, port) as c:
        await c.write_event(Transcribe(name="no-such-model").event())
        await c.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        # The server has ended its side by now, and reads past the rest.
        await c.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=bytes(3200)).event())
        await c.write_event(AudioStop().event())
        error = await read(c)
        assert Error.is_type(error.type), error
        then = await c.read_event()
    return {
        "code": Error.from_event(error).code,
        "then": "closed" if then is None else then.type,
        "next": (await describe(host, port))["asr"][0]["name"],
    }


async def main(host: str, port: int) -> None:
    report: dict[str, Any] = {"sentence": SENTENCE}
    report["info"] = await describe(host, port)
    report["plain"], audio = await speakPlain(host, port)
    report["streamed"] = await speakStreamed(host, port)
    report["heard"] = await transcribe(host, port, audio, report["plain"]["rates"][0])
    report["refused"] = await refused(host, port)
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
