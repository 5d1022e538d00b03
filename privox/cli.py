"""
The C{privox} command: a client of the exchange's HTTP API.

  - C{privox stt FILE} prints what the file says (a long recording, which
    the API cuts into pieces transcribed at once, with a progress bar of
    pieces done on stderr where that is a terminal);
  - C{privox tts "TEXT" -o out.wav} writes speech to a WAV file;
  - C{privox caption} reads 16 kHz mono s16le PCM from stdin (e.g.
    C{arecord -f S16_LE -r 16000 -c 1 | privox caption}), streams it to the
    API's live transcription WebSocket and prints a line per utterance once
    it is final (on a terminal, its hypothesis in place until then; with
    C{--whole}, or from an API without the WebSocket, utterances cut here
    with webrtcvad, each transcribed whole);
  - C{privox status} prints the exchange's farms and their load (C{GET
    /status}) as a table;
  - C{privox account} prints the key's allowance, use and credit in the
    rolling hour (C{GET /v1/account});
  - C{privox keys ...} manages the keys of an account store directly (see
    L{privox.accounts.admin}; no API involved).

Every API command takes C{--api URL} (default C{$PRIVOX_API}, else
C{http://127.0.0.1:8080}), C{--key KEY} (default C{$PRIVOX_KEY}; without one,
requests go without a key, which an API with anonymous use on accepts) and
C{--timeout SECONDS} (for each request).

HTTP goes through treq, the WebSocket through autobahn, both on the
reactor (L{react}); stdin is read with L{StandardIO}, so reading never
blocks the reactor and transcriptions run while capture goes on.

Exit status: 0 on success; 1 with one line on stderr when something goes
wrong (the API cannot be reached, refuses the key, answers with another
error; a file cannot be read or written); 2 for usage errors. In
C{caption}, the first Ctrl-C ends capture as end of input would (the last
utterance is still transcribed and printed); a second one quits at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.fdesc import setBlocking
from twisted.internet.stdio import StandardIO
from twisted.internet.task import react

from privox.accounts.admin import addKeysParser, runKeys
from privox.accounts.store import StoreError
from privox.api.models import QUALITIES
from privox.caption import (
    EXIT_INTERRUPTED,
    FRAME_MS,
    CaptionProtocol,
    Captioner,
    NoRealtime,
    Screen,
    Segmenter,
    Utterance,
    UtteranceCaptioner,
    openLive,
)
from privox.client import CliError, PrivoxClient, oneLine
from privox.utterances import webrtcvadClassifier
from privox.wav import BadWav, readWavHeader, wavSeconds

#: Where the API is when neither C{--api} nor C{$PRIVOX_API} says.
DEFAULT_API = "http://127.0.0.1:8080"
#: Files longer than this many seconds are transcribed with a progress bar
#: on a terminal (the API's default C{--fanout-above}).
PROGRESS_ABOVE = 60.0
#: Seconds a request may take (C{--timeout}).
DEFAULT_TIMEOUT = 120.0

_EXIT_ERROR = 1
_EXIT_USAGE = 2


# -- the commands -------------------------------------------------------------


async def runStt(reactor: Any, args: argparse.Namespace) -> None:
    audio = readFile(args.file)
    client = PrivoxClient(reactor, args.api, args.key, args.timeout)
    name = os.path.basename(args.file) or "audio"
    width = None if args.json else barWidth()
    try:
        if width is not None and (audioSeconds(audio) or 0) > PROGRESS_ABOVE:
            bar = ProgressBar(sys.stderr, width)
            try:
                text = await client.sttProgress(
                    audio, name, args.quality, args.language, bar.show
                )
            finally:
                bar.clear()
        else:
            text = await client.stt(audio, name, args.quality, args.language, args.json)
    finally:
        await client.close()
    sys.stdout.write(text.strip() + "\n")
    sys.stdout.flush()


def audioSeconds(audio: bytes) -> float | None:
    """
    How long a file is, from its header (a WAV's, or a container's as PyAV
    reads it), without decoding it; L{None} where that does not say.
    """
    seconds = wavSeconds(audio)
    if seconds is not None:
        return seconds
    try:
        import io

        import av

        with av.open(io.BytesIO(audio)) as container:
            duration = container.duration
    except Exception:
        return None
    return duration / 1_000_000 if duration else None


def barWidth() -> int | None:
    """
    The columns of stderr, where it is a terminal that can draw a bar.
    """
    if not sys.stderr.isatty() or os.environ.get("TERM") == "dumb":
        return None
    return shutil.get_terminal_size().columns


def progressLine(done: int, total: int, width: int) -> str:
    """
    C{[#####     ] 5/10 pieces} in at most C{width - 1} columns.
    """
    label = f" {done}/{total} pieces"
    room = max(width - 1 - len(label) - 2, 0)
    filled = room * done // total if total else 0
    bar = f"[{'#' * filled}{' ' * (room - filled)}]" if room >= 4 else ""
    return (bar + label)[: max(width - 1, 0)]


class ProgressBar:
    """
    Pieces done of a long transcription, redrawn in place on a terminal.
    """

    def __init__(self, out: Any, width: int) -> None:
        self.out = out
        self.width = width
        self.shown = False

    def show(self, done: int, total: int) -> None:
        self.out.write("\r\x1b[K" + progressLine(done, total, self.width))
        self.out.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.shown = False


async def runTts(reactor: Any, args: argparse.Namespace) -> None:
    toStdout = args.output == "-"
    if not toStdout:
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            raise CliError(f"cannot write {args.output}: no folder {folder}")
    client = PrivoxClient(reactor, args.api, args.key, args.timeout)
    try:
        audio = await client.tts(args.text, args.voice, args.language)
    finally:
        await client.close()
    try:
        header = readWavHeader(audio)
    except BadWav as e:
        raise CliError(str(e)) from None
    seconds = wavSeconds(audio) or 0.0
    rate = header.rate if header is not None else 0
    where = "the WAV to stdout" if toStdout else args.output
    report = f"wrote {where}: {seconds:.2f} s of audio at {rate} Hz\n"
    if toStdout:
        sys.stdout.buffer.write(audio)
        sys.stdout.flush()
        sys.stderr.write(report)
    else:
        writeFile(args.output, audio)
        sys.stdout.write(report)
        sys.stdout.flush()


async def runCaption(reactor: Any, args: argparse.Namespace) -> None:
    protocol: CaptionProtocol | None = None
    opening = Deferred.fromCoroutine(openCaptioner(reactor, args))

    def interrupt() -> None:
        if protocol is None:
            opening.cancel()
        else:
            protocol.interrupt()

    def onInterrupt(signum: int, frame: Any) -> None:
        reactor.callFromThread(interrupt)

    # After the reactor's own handlers are in place (reactor.run installs them).
    reactor.callWhenRunning(signal.signal, signal.SIGINT, onInterrupt)
    try:
        captioner = await opening
    except CancelledError:
        raise SystemExit(EXIT_INTERRUPTED) from None
    protocol = CaptionProtocol(captioner, Screen(terminalWidth()))
    StandardIO(protocol, reactor=reactor)
    try:
        await protocol.done
    finally:
        await captioner.close()
        try:
            setBlocking(0)  # StandardIO made stdin non-blocking; leave it as found
        except OSError:
            pass


async def openCaptioner(reactor: Any, args: argparse.Namespace) -> Captioner:
    """
    The API's live session; utterances cut here, each transcribed whole,
    with C{--whole} or where the API has no live session.
    """
    if not args.whole:
        try:
            return await openLive(
                reactor, args.api, args.key, args.timeout, args.quality, args.language
            )
        except NoRealtime:
            pass  # an API from before /v1/realtime
    segmenter = Segmenter(
        webrtcvadClassifier(args.aggressiveness),
        frameMs=args.frame_ms,
        silenceMs=args.silence_ms,
        maxSeconds=args.max_seconds,
        paddingMs=args.padding_ms,
    )
    client = PrivoxClient(reactor, args.api, args.key, args.timeout)

    async def transcribe(utterance: Utterance) -> str:
        return await client.stt(utterance.wav(), "utterance.wav", args.quality, args.language)

    return UtteranceCaptioner(segmenter, transcribe, client.close)


def terminalWidth() -> int | None:
    """
    The columns of stdout, where it is a terminal that can draw in place.
    """
    if not sys.stdout.isatty() or os.environ.get("TERM") == "dumb":
        return None
    return shutil.get_terminal_size().columns


async def runStatus(reactor: Any, args: argparse.Namespace) -> None:
    client = PrivoxClient(reactor, args.api, args.key, args.timeout)
    try:
        status = await client.status()
    finally:
        await client.close()
    if args.json:
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
    else:
        sys.stdout.write(statusTable(status))


async def runAccount(reactor: Any, args: argparse.Namespace) -> None:
    client = PrivoxClient(reactor, args.api, args.key, args.timeout)
    try:
        account = await client.account()
    finally:
        await client.close()
    if args.json:
        sys.stdout.write(json.dumps(account, indent=2) + "\n")
        return
    window = account.get("window_seconds", 3600)
    sys.stdout.write(
        f"key {account.get('key_id', '?')}: {account['used']:g} of {account['allowance']:g} "
        f"audio seconds used in the last {window:g} s; {account['remaining']:g} left\n"
        f"allowance = {account['hourly_seconds']:g} of its own + {account['earned']:g} "
        "earned by producing (QSS)\n"
    )


def statusTable(status: dict[str, Any]) -> str:
    """
    The API's C{/status} as a table: a row per farm, service and model.
    """
    header = ["FARM", "STATE", "SERVICE", "MODEL", "PRODUCERS", "IDLE", "BUSY", "SEALING", "QUEUE"]
    rows: list[list[str]] = []
    for farm in status.get("farms", []):
        name = str(farm.get("name", "?")) + (" (fallback)" if farm.get("fallback") else "")
        state = "up" if farm.get("up") else "down"
        load = farm.get("load")
        if not load:
            services = ",".join(farm.get("services", [])) or "-"
            rows.append([name, state, services, "(no load figures)", "", "", "", "", ""])
            continue
        for service, figures in sorted(load.get("services", {}).items()):
            queue = str(figures.get("queue", 0))
            models = figures.get("models") or {}
            if not models:
                rows.append([name, state, service, "-", "0", "0", "0", "0", queue])
            for model, counts in sorted(models.items()):
                rows.append([
                    name, state, service, model, str(counts.get("connected", 0)),
                    str(counts.get("idle", 0)), str(counts.get("busy", 0)),
                    str(counts.get("sealing", 0)), queue,
                ])
    if not rows:
        return "no farms\n"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n"
        for row in [header, *rows]
    )


COMMANDS = {
    "stt": runStt, "tts": runTts, "caption": runCaption, "status": runStatus,
    "account": runAccount, "keys": runKeys,
}


def readFile(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None


def writeFile(path: str, data: bytes) -> None:
    """
    Write C{data} to C{path} whole or not at all (through a temporary file
    beside it).
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(prefix=".privox-", suffix=".part", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(temporary, 0o666 & ~_umask())
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- the command line ---------------------------------------------------------


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0 or math.isinf(number):
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive number")
    return number


def _positiveInt(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be positive")
    return number


def _notNegativeInt(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must not be negative")
    return number


def buildParser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """
    The C{privox} command line; defaults for C{--api} and C{--key} come from
    C{environ} (default L{os.environ}).
    """
    env = os.environ if environ is None else environ
    # --api, --key and --timeout go before the command or after it; given
    # after it (defaults suppressed there), they win.
    common = argparse.ArgumentParser(add_help=False)
    _addConnectionOptions(common, env, afterCommand=True)
    quality = argparse.ArgumentParser(add_help=False)
    quality.add_argument(
        "--quality", choices=QUALITIES, help="transcription quality (the API's default: fast)"
    )
    quality.add_argument(
        "--language", metavar="LANG",
        help="the language spoken, a name or code: English, en, de (the API's default: en)",
    )

    parser = argparse.ArgumentParser(
        prog="privox", description="Speech to text and text to speech through a Privox exchange."
    )
    _addConnectionOptions(parser, env, afterCommand=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stt = commands.add_parser(
        "stt", parents=[common, quality], help="print what an audio file says",
        description="Transcribe an audio file (WAV, or anything FFmpeg reads).",
    )
    stt.add_argument("file", metavar="FILE", help="the audio file")
    stt.add_argument(
        "--json",
        action="store_true",
        help="print the API's JSON (text, model, language, duration)",
    )

    tts = commands.add_parser(
        "tts", parents=[common], help="speak text into a WAV file",
        description="Turn text into speech, written as a WAV file.",
    )
    tts.add_argument("text", metavar="TEXT", help="what to say")
    tts.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="the WAV file to write (- for stdout)",
    )
    tts.add_argument("--voice", help="the voice, e.g. voice1 (the API's default otherwise)")
    tts.add_argument(
        "--language", metavar="LANG", help="the text's language, a name or code: English, en"
    )

    caption = commands.add_parser(
        "caption", parents=[common, quality], help="live captions of 16 kHz PCM on stdin",
        description=(
            "Read 16 kHz mono signed 16-bit little-endian PCM from stdin (e.g. "
            "arecord -f S16_LE -r 16000 -c 1 | privox caption), stream it to the API's live "
            "transcription (/v1/realtime) and print a line per utterance once it is final; on a "
            "terminal, what is being said is shown in place, dim, until then. Ctrl-C ends "
            "capture and prints what is left; a second Ctrl-C quits at once."
        ),
    )
    caption.add_argument(
        "--whole", action="store_true",
        help=(
            "cut utterances here, on silence, and send each whole (no partials): what an API "
            "without /v1/realtime gets anyway; the options below are for this"
        ),
    )
    caption.add_argument(
        "--aggressiveness", type=int, choices=range(4), default=2, metavar="{0,1,2,3}",
        help="how readily webrtcvad calls a frame non-speech (default: %(default)s)",
    )
    caption.add_argument(
        "--frame-ms", type=int, choices=FRAME_MS, default=30,
        help="the length of the frames webrtcvad judges (default: %(default)s)",
    )
    caption.add_argument(
        "--silence-ms", type=_positiveInt, default=600, metavar="MS",
        help="non-speech that ends an utterance (default: %(default)s)",
    )
    caption.add_argument(
        "--padding-ms", type=_notNegativeInt, default=200, metavar="MS",
        help="audio kept before and after the speech (default: %(default)s)",
    )
    caption.add_argument(
        "--max-seconds", type=_positive, default=30.0, metavar="SECONDS",
        help="cut utterances longer than this (default: %(default)g)",
    )
    status = commands.add_parser(
        "status", parents=[common], help="show the farms and their load",
        description=(
            "Show the exchange's farms, the producers per model (connected, idle, "
            "busy) and the queues, from the API's /status. No key is needed."
        ),
    )
    status.add_argument("--json", action="store_true", help="print the API's JSON")
    account = commands.add_parser(
        "account", parents=[common], help="your key's allowance, use and credit this hour",
        description=(
            "Show how many audio seconds your key may use in the rolling hour, how many it "
            "used, and the quality speech seconds (QSS) its producers earned."
        ),
    )
    account.add_argument("--json", action="store_true", help="print the API's JSON")
    addKeysParser(commands, env)
    return parser


def _addConnectionOptions(
    parser: argparse.ArgumentParser, env: Mapping[str, str], afterCommand: bool
) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if afterCommand else value

    parser.add_argument(
        "--api",
        default=default(env.get("PRIVOX_API") or DEFAULT_API),
        metavar="URL",
        help=f"the Privox API (default: $PRIVOX_API, else {DEFAULT_API})",
    )
    parser.add_argument(
        "--key",
        default=default(env.get("PRIVOX_KEY") or None),
        help="your key (default: $PRIVOX_KEY; none: anonymous use, where the API allows it)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=default(DEFAULT_TIMEOUT),
        metavar="SECONDS",
        help=f"give up on a request after this long (default: {DEFAULT_TIMEOUT:g})",
    )


def parseArguments(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """
    The parsed command line, checked.

    @raise SystemExit: (2) a usage error, after saying what it is.
    """
    parser = buildParser(environ)
    args = parser.parse_args(argv)
    if args.command == "keys":
        return args
    api = args.api.strip().rstrip("/")
    parts = urlsplit(api)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        _usage(f"--api must be an http:// or https:// URL, not {args.api!r}")
    args.api = api
    # No key: requests go without one (anonymous use, where the API allows
    # it; it answers 401 where it does not).
    args.key = (args.key or "").strip() or None
    if args.command == "tts" and not args.text.strip():
        _usage("the text to speak is empty")
    if args.command == "caption" and sys.stdin is not None and sys.stdin.isatty():
        _usage(
            "privox caption reads raw 16 kHz PCM from stdin: pipe audio into it, "
            "e.g. arecord -f S16_LE -r 16000 -c 1 | privox caption"
        )
    return args


def _usage(message: str) -> None:
    sys.stderr.write(f"privox: {message}\n")
    raise SystemExit(_EXIT_USAGE)


async def _main(reactor: Any, args: argparse.Namespace) -> None:
    try:
        await COMMANDS[args.command](reactor, args)
    except (CliError, StoreError) as e:
        _fatal(str(e))
    except Exception as e:  # a bug: still one line, and exit 1
        _fatal(f"unexpected error: {type(e).__name__}: {oneLine(str(e))}")


def _fatal(message: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"privox: {message}\n")
    sys.stderr.flush()
    raise SystemExit(_EXIT_ERROR)


def main(argv: Sequence[str] | None = None) -> None:
    """
    The C{privox} console script.
    """
    react(_main, (parseArguments(argv),))


if __name__ == "__main__":
    main()
