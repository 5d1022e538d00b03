"""
Text to speech with Coqui TTS (C{coqui-tts}, PyTorch models such as VITS).

A model is found at the C{=PATH} given on the command line (a directory
holding a checkpoint, C{model.pth} or another C{*.pth}, and its
C{config.json}; or the checkpoint file itself with C{config.json} beside it),
or else by its Coqui name (C{tts_models/en/vctk/vits}) through Coqui's model
manager, which uses a copy it downloaded before or downloads one when the
machine is online. Offline, a name that is not already downloaded is a
L{ModelNotFound} at start-up, raised quickly.

Coqui and torch are heavy (seconds to import, hundreds of MB): they are
imported in L{CoquiEngine.load}, never when this module is imported. Install
them with C{tools/install-coqui.sh}.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
from twisted.logger import Logger

from privox.engines.audio import encodeWav, toInt16
from privox.engines.base import (
    EngineError,
    ModelNotFound,
    Stop,
    TTSJob,
    Unsupported,
    checkText,
)
from privox.messages import ErrorCode

if TYPE_CHECKING:
    from TTS.api import TTS

log = Logger()

#: Longest text one job may ask for, in characters: synthesis time and memory
#: grow with it, and a paragraph or two is what a job is for.

#: Threads torch may use for one synthesis. torch's default is one per core,
#: which is wrong for a node: it runs several slots (and maybe other engines:
#: whisper, piper) on an old laptop's 2-4 cores, and every job's torch
#: threads would fight the others' and the reactor thread. Synthesis of one
#: job is serialized (see L{CoquiEngine._lock}), so 2 threads keep one core
#: free for everything else while still using a second core for the
#: convolutions. (torch.set_num_threads is process-wide.)
TORCH_THREADS = 2

#: How long to wait, at start-up, to find out whether the host a model would be
#: downloaded from is reachable at all. Coqui's own download has no timeout, so
#: an unreachable (firewalled) host would otherwise hang start-up for minutes.
DOWNLOAD_PROBE_TIMEOUT = 5.0

#: Checkpoint names Coqui uses, in the order we prefer them.
CHECKPOINT_NAMES = (
    "model.pth",
    "model_file.pth",
    "best_model.pth",
    "checkpoint.pth",
    "model_file.pth.tar",
)

#: Spoken once at load, to warm torch up. A character-based model drops the
#: letters it lacks (the stop remains); a phoneme-based one phonemizes it.
WARM_UP_TEXT = "Hello."

#: Voice names that mean "the model's default speaker".
DEFAULT_VOICES = frozenset(["", "default"])


def _resolvePath(name: str, path: str) -> tuple[Path, Path]:
    """
    The (checkpoint, config.json) of a model on disk.

    @raise ModelNotFound: not there, or not a Coqui model.
    """
    given = Path(path).expanduser()
    if given.is_dir():
        checkpoint = next((given / n for n in CHECKPOINT_NAMES if (given / n).is_file()), None)
        if checkpoint is None:
            found = sorted(p for p in given.iterdir() if p.name.endswith((".pth", ".pth.tar")))
            if len(found) != 1:
                what = (
                    "no checkpoint (*.pth)"
                    if not found
                    else f"several checkpoints ({', '.join(p.name for p in found)}); name one"
                )
                raise ModelNotFound(f"{name}: {str(given)!r} holds {what}")
            checkpoint = found[0]
    elif given.is_file():
        checkpoint = given
    else:
        raise ModelNotFound(f"{name}: no Coqui model at {str(given)!r}")
    config = checkpoint.parent / "config.json"
    if not config.is_file():
        raise ModelNotFound(f"{name}: no config.json beside {str(checkpoint)!r}")
    return checkpoint, config


def _languageOfName(model: str) -> tuple[str, ...]:
    """
    C{("en",)} for a Coqui model name C{tts_models/en/vctk/vits}; () for a
    multilingual model (its languages come from the model) or another name.
    """
    parts = model.split("/")
    if len(parts) == 4 and parts[0] == "tts_models" and parts[1] != "multilingual":
        return (parts[1],)
    return ()


def _languagesOfConfig(config: Path) -> tuple[str, ...]:
    """
    The languages a model's C{config.json} names (its datasets', else its
    phonemizer's), the primary language first (C{("en", "en-us")}); () if
    it names none.
    """
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    named = [d.get("language") for d in data.get("datasets") or () if isinstance(d, dict)]
    if not any(named) and data.get("use_phonemes"):
        named = [data.get("phoneme_language")]
    found: list[str] = []
    for language in named:
        if isinstance(language, str) and language.strip():
            code = _norm(language)
            found += [code.split("-")[0], code]
    return tuple(dict.fromkeys(found))


def _norm(language: str) -> str:
    return language.strip().replace("_", "-").lower()


def _matchLanguage(wanted: str, languages: tuple[str, ...]) -> str | None:
    """
    The model's name for the language a job asks for: an exact match
    (C{en-US} ~ C{en_us}), else the same primary language (C{en} ~ C{en-us}).
    """
    target = _norm(wanted)
    for language in languages:
        if _norm(language) == target:
            return language
    primary = target.split("-")[0]
    for language in languages:
        if _norm(language).split("-")[0] == primary:
            return language
    return None


def _reachable(url: str, timeout: float) -> bool:
    host = urlsplit(url).hostname
    if not host:
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


class CoquiEngine:
    """
    A L{TTSEngine} running one Coqui TTS model on the CPU.

    torch inference on one model is not safe from several threads at once
    (the model's modules hold per-call state, and parallel runs would only
    fight over the same cores): L{synthesize} takes a lock.
    """

    def __init__(self, model: str, path: str | None = None, language: str | None = None) -> None:
        """
        @param model: the model's name, advertised as C{coqui:MODEL}: a Coqui
            name such as C{tts_models/en/vctk/vits}, or any name for a model
            given by C{path}.
        @param path: the model on disk (a directory, or its C{.pth}).
        @param language: the language a single-language model speaks, where
            neither its name nor its config says (a model trained here).

        @raise ModelNotFound: C{path} holds no Coqui model.
        """
        self.name = "coqui:" + model
        self.model = model
        self._files = _resolvePath(self.name, path) if path is not None else None
        #: The languages it speaks, () meaning any (unknown). A multilingual
        #: model's own list replaces this in L{load}.
        self.languages: tuple[str, ...] = (
            (language,)
            if language
            else _languageOfName(model)
            or (_languagesOfConfig(self._files[1]) if self._files else ())
        )
        #: Filled in by L{load} for a multi-speaker model.
        self.voices: tuple[str, ...] = ()
        self.rate = 0
        self._tts: TTS | None = None
        self._multilingual = False
        self._speakers: dict[str, str] = {}
        self._lock = threading.Lock()

    # Loading

    def load(self) -> None:
        """
        Load the model once (blocking).

        @raise ModelNotFound: Coqui is not installed, or the model is missing,
            cannot be downloaded, or is broken.
        """
        with self._lock:
            if self._tts is not None:
                return
            started = time.monotonic()
            try:
                import torch
                from TTS.api import TTS
            except ImportError as e:
                raise ModelNotFound(
                    f"{self.name}: Coqui TTS is not installed ({e}); run tools/install-coqui.sh VENV"
                ) from e
            imported = time.monotonic()
            torch.set_num_threads(TORCH_THREADS)
            # Coqui's own warnings are worth seeing while a model loads, but
            # while it synthesizes it logs the consumer's text (at INFO, and
            # at WARNING with any character its model lacks). Text is
            # private: keep it out of every log, whatever the process does
            # with stdlib logging. (Process-wide, like Coqui's loggers.)
            coquiLog = logging.getLogger("TTS")
            coquiLog.setLevel(logging.WARNING)
            try:
                if self._files is not None:
                    tts = self._loadLocal(TTS, *self._files)
                    where = str(self._files[0])
                else:
                    tts = self._loadNamed(TTS)
                    where = "Coqui's model manager"
            finally:
                coquiLog.setLevel(logging.ERROR)
            self._adopt(tts)
            loaded = time.monotonic()
            try:
                # Prove the model speaks (its phonemizer, such as espeak-ng,
                # may be missing) before the node advertises it, and let
                # torch set itself up here rather than in the first job.
                self._speak(WARM_UP_TEXT, self._speaker(None), self._language(None), Stop())
            except Exception as e:
                self._tts = None
                raise ModelNotFound(f"{self.name}: loaded, but cannot speak: {e}") from e
            log.info(
                "loaded {name} from {where} in {seconds:.2f} s (importing torch and Coqui: "
                "{importSeconds:.2f} s, warming up: {warmUpSeconds:.2f} s): {rate} Hz, "
                "{voices} voice(s), languages {languages}",
                name=self.name,
                where=where,
                seconds=loaded - imported,
                importSeconds=imported - started,
                warmUpSeconds=time.monotonic() - loaded,
                rate=self.rate,
                voices=len(self.voices),
                languages=",".join(self.languages) or "any",
            )

    def _loadLocal(self, TTS: Any, checkpoint: Path, config: Path) -> TTS:
        # A model unpacked from Coqui's release archives names its speaker,
        # language and stats files by the paths they had where it was
        # trained. Coqui's model manager rewrites those to the files lying
        # beside the checkpoint after a download; do the same, on a copy of
        # the config, so that the model's own directory is never written to.
        workdir = Path(tempfile.mkdtemp(prefix="privox-coqui-"))
        try:
            fixed = workdir / "config.json"
            shutil.copyfile(config, fixed)
            try:
                from TTS.utils.manage import ModelManager

                ModelManager()._update_paths(checkpoint.parent, fixed)
            except Exception as e:  # a private API of Coqui's: best effort
                log.warn(
                    "{name}: could not relocate paths in {config}: {error}",
                    name=self.name,
                    config=str(config),
                    error=str(e),
                )
                shutil.copyfile(config, fixed)
            try:
                return TTS(model_path=str(checkpoint), config_path=str(fixed), progress_bar=False)
            except Exception as e:
                # torch, the config parser and the model raise many types.
                raise ModelNotFound(f"{self.name}: cannot load {str(checkpoint)!r}: {e}") from e
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _loadNamed(self, TTS: Any) -> TTS:
        from TTS.utils.manage import ModelManager

        manager = ModelManager(progress_bar=False)
        hint = f"give a downloaded copy as coqui:{self.model}=/path/to/dir (holding model.pth and config.json)"
        parts = self.model.split("/")
        if (
            len(parts) != 4
            or parts[0] != "tts_models"
            or (self.model not in manager.list_models() and parts[2] != "fairseq")
        ):
            raise ModelNotFound(
                f"{self.name}: not a Coqui TTS model name (they look like tts_models/en/vctk/vits; "
                f"`tts --list_models` lists them); for a model of your own, {hint}"
            )
        items = [manager._set_model_item(self.model)[0]]
        vocoder = items[0].get("default_vocoder")
        if vocoder:
            items.append(manager._set_model_item(vocoder)[0])
        if items[0].get("tos_required") and os.environ.get("COQUI_TOS_AGREED") != "1":
            # Coqui would ask on stdin and wait; a node has nobody to answer.
            raise ModelNotFound(
                f"{self.name}: this model's licence must be accepted first "
                "(set COQUI_TOS_AGREED=1 if you agree to it)"
            )
        for item, name in zip(items, [self.model, vocoder]):
            url = self._missingDownload(manager, item, name)
            if url is not None and not _reachable(url, DOWNLOAD_PROBE_TIMEOUT):
                raise ModelNotFound(
                    f"{self.name}: not downloaded yet (looked in {str(manager.output_prefix)!r}) "
                    f"and {urlsplit(url).hostname} cannot be reached to download it; {hint}"
                )
        try:
            return TTS(model_name=self.model, progress_bar=False)
        except Exception as e:
            raise ModelNotFound(f"{self.name}: cannot download or load it ({e}); {hint}") from e

    @staticmethod
    def _missingDownload(manager: Any, item: dict[str, Any], name: str) -> str | None:
        """
        Where C{item} would be downloaded from, or None if it is already here.
        """
        if "repo_id" in item:
            from huggingface_hub import snapshot_download

            try:
                snapshot_download(item["repo_id"], local_files_only=True)
            except Exception:
                endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
                return f"{endpoint}/{item['repo_id']}"
            return None
        model_type, lang, dataset, model = name.split("/")
        if (Path(manager.output_prefix) / f"{model_type}--{lang}--{dataset}--{model}").is_dir():
            return None
        if "fairseq" in name:
            return "https://dl.fbaipublicfiles.com/mms/tts/"
        url = item.get("github_rls_url") or ""
        return url[0] if isinstance(url, list) else url

    def _adopt(self, tts: TTS) -> None:
        self.rate = int(tts.synthesizer.output_sample_rate)
        self._multilingual = bool(tts.is_multi_lingual)
        if self._multilingual:
            self.languages = tuple(tts.languages or ())
        if tts.is_multi_speaker:
            # Names as the consumer would type them (VCTK's list has "ED\n").
            self._speakers = {str(s).strip(): s for s in tts.speakers or () if str(s).strip()}
        self.voices = tuple(self._speakers)
        self._tts = tts

    # Synthesis

    def _speak(
        self, text: str, speaker: str | None, language: str | None, stop: Stop
    ) -> np.ndarray:
        """
        Float samples of C{text}, a sentence at a time as Coqui would split
        it (each followed by its pause), so a cancelled job stops between
        two; the caller holds L{_lock}.
        """
        import torch

        assert self._tts is not None
        pieces = []
        with torch.inference_mode():
            for sentence in self._tts.synthesizer.split_into_sentences(text, language):
                stop.check()
                pieces.append(
                    self._tts.tts(
                        text=sentence, speaker=speaker, language=language, split_sentences=False
                    )
                )
        if not pieces:
            return np.zeros(0, np.float32)
        return np.concatenate([np.asarray(p, dtype=np.float32).reshape(-1) for p in pieces])

    def _speaker(self, voice: str | None) -> str | None:
        if voice is None or voice.strip().lower() in DEFAULT_VOICES:
            # A multi-speaker model must be given one: its first is the default.
            return next(iter(self._speakers.values()), None)
        if voice in self._speakers:
            return self._speakers[voice]
        known = ", ".join(self.voices) if self.voices else "only its default voice"
        raise Unsupported(f"{self.name} has no voice {voice!r} (it has {known})")

    def _language(self, language: str | None) -> str | None:
        """
        The language to pass to Coqui (multilingual models only).

        @raise Unsupported: the model does not speak C{language}.
        """
        if language and self.languages:
            matched = _matchLanguage(language, self.languages)
            if matched is None:
                raise Unsupported(
                    f"{self.name} speaks {'/'.join(self.languages)}, not {language!r}"
                )
        else:
            matched = self.languages[0] if self.languages else None
        return matched if self._multilingual else None

    def synthesize(self, job: TTSJob) -> bytes:
        """
        Speak C{job.text}; return a mono s16le WAV at the model's rate.

        @raise EngineError: empty or too long text (C{bad_request},
            C{too_large}); L{Unsupported} for an unknown voice or language.
        """
        if self._tts is None:
            raise EngineError(f"{self.name} is not loaded")
        speaker = self._speaker(job.voice)
        language = self._language(job.language)
        checkText(self.name, job.text)
        with self._lock:
            try:
                audio = self._speak(job.text, speaker, language, job.stop)
            except EngineError:
                raise
            except Exception as e:
                raise EngineError(f"{self.name} failed: {e}") from e
        if audio.size == 0:
            raise EngineError("the text has nothing to speak", ErrorCode.BAD_REQUEST)
        return encodeWav(toInt16(audio), self.rate)
