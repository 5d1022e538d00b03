"""
Everything a farm can be told (the command line, or a TOML file), and the
PVX/1 model aliases it starts with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from privox.config import setting

#: The original's Whisper model names; a PVX/1 node that knows one serves
#: the Privox model of the same name.
WHISPER_NAMES = (
    "tiny", "tiny.en", "base", "base.en", "small", "small.en",
    "medium", "medium.en", "large", "large-v2",
)
DEFAULT_STT_ALIASES = tuple(f"{name}=whisper:{name}" for name in WHISPER_NAMES)
DEFAULT_TTS_ALIASES = ("tts_models/en/vctk/vits=coqui:tts_models/en/vctk/vits",)


@dataclass(frozen=True)
class FarmSettings:
    """
    Everything a farm can be told (command line, or the TOML file).
    """

    name: str = setting("privox-farm", "Name the farm gives itself in OKAY.")
    stt_listen: str = setting(
        "tcp:1776", "Endpoint string for STT peers, or 'none'."
    )
    tts_listen: str = setting(
        "tcp:1777", "Endpoint string for TTS peers, or 'none'."
    )
    queue_timeout: float = setting(
        5.0, "Seconds a job may wait for a free producer before FAIL no_producer."
    )
    ping_interval: float = setting(
        10.0, "Seconds between PINGs to idle producers; PONG is due in half that."
    )
    handshake_timeout: float = setting(
        10.0, "Seconds a new peer has to complete HELO."
    )
    job_timeout: float = setting(
        60.0,
        "Timeout of a job whose consumer names none (PVX/1 peers), counted from JOB_.",
    )
    max_job_timeout: float = setting(
        7200.0,
        "Upper bound of the timeout a consumer may name, counted from JOB_ (the API"
        " names one that grows with the audio's length).",
    )
    max_stream_s: float = setting(
        600.0,
        "Longest a streaming job may last, counted from JOB_ (announced in OKAY; 0:"
        " the farm takes no streaming job).",
    )
    stream_idle_s: float = setting(
        15.0,
        "Longest gap between two pieces of a stream's upload before the job times"
        " out (announced in OKAY).",
    )
    cancel_grace: float = setting(
        10.0, "Seconds a producer has to end a cancelled job before it is dropped."
    )
    shutdown_grace: float = setting(
        30.0, "Seconds running jobs may take to finish when the farm stops."
    )
    max_frame: int = setting(
        1024 * 1024, "Largest frame payload in bytes (announced in OKAY)."
    )
    max_job_bytes: int = setting(
        200 * 1024 * 1024,
        "Largest upload or result of one job in bytes (the API's --max-upload).",
    )
    early_upload: int = setting(
        64 * 1024,
        "Largest upload a consumer may send with its JOB_, before ASGN (announced "
        "in OKAY; 0: always after ASGN). A queued job holds at most this much.",
    )
    splice_min: int = setting(
        128 * 1024,
        "Relay uploads and results with at least this many bytes still to come "
        "inside the kernel (Linux splice(2), both peers on plain TCP) instead of "
        "through the farm's memory; 0 turns it off.",
    )
    producer_keys: str = setting(
        "exchange",
        "Producer key policy: 'open', an allow-list file, a validation URL, or 'exchange': "
        "with --exchange only the nodes it certified (they name no key), else open.",
    )
    consumer_keys: str = setting(
        "exchange",
        "Consumer key policy: 'open', an allow-list file, a validation URL, or 'exchange': "
        "with --exchange only its API (by the pass it signs for this farm), else open.",
    )
    stats_interval: float = setting(
        60.0, "Seconds between stats log lines (0 turns them off)."
    )
    pvx1_quiet: float = setting(
        0.05, "PVX/1: seconds of silence that end a header or a node's transcript."
    )
    pvx1_stt_models: tuple[str, ...] = setting(
        DEFAULT_STT_ALIASES, "PVX/1 STT model alias, PVX1NAME=PVX2NAME."
    )
    pvx1_tts_models: tuple[str, ...] = setting(
        DEFAULT_TTS_ALIASES, "PVX/1 TTS model alias, PVX1NAME=PVX2NAME."
    )
    pvx1_tts_fallback: tuple[str, ...] = setting(
        ("*",),
        "PVX/1: TTS models an original consumer's job goes to, in this order, when no "
        "producer serves the model it names (its speaker is then the model's default); "
        "'*' is any connected TTS model in its language. Empty: none.",
    )
    pvx1_pong_timeout: float = setting(
        30.0,
        "PVX/1: seconds a node may take to answer a ping (the original farm waited "
        "for ever; original nodes stall while they load a model).",
    )
    metrics_listen: str = setting(
        "none", "Endpoint string serving /metrics (Prometheus) and /status over HTTP, or 'none'."
    )
    blur_usage: bool = setting(
        False, "Round sizes and times in log lines (privacy)."
    )
    log_jobs: bool = setting(
        False,
        "Log a line for every job (its id, model, outcome, time and sizes). Off: a "
        "farm's log then says nothing about any one user's job, and each line costs "
        "about 40 us of CPU, a fifth of a small job; the stats line and /metrics "
        "count jobs either way.",
    )
    ledger: str = setting(
        "exchange",
        "Where the farm records one transaction per job: 'none', a JSON-lines "
        "file path, the http(s) URL of an API's /v1/ledger, or 'exchange': the "
        "/v1/ledger of the --exchange it joins (none if it joins none).",
    )
    ledger_spool: str = setting(
        "privox-farm-ledger.spool",
        "File where records for an http(s) ledger wait until the API confirms them.",
    )
    exchange: str = setting(
        "none",
        "The http(s) base URL of an exchange's API this farm joins by itself (it "
        "registers there with --api-key and --public, and again while it runs), or 'none'.",
    )
    public: str = setting(
        "",
        "With --exchange: 'STT-ENDPOINT TTS-ENDPOINT', the client endpoints API servers "
        "and nodes dial to reach this farm (tcp:host=HOST:port=PORT or tls:...; 'none' "
        "for a service it does not offer).",
    )
    exchange_key: str = setting(
        "",
        "With --exchange: the exchange's public key (GET EXCHANGE/v1/exchange), pinned; "
        "empty: read from the exchange before registering (its fingerprint is logged). "
        "Nodes that name no key are let in by its certificate.",
    )
    api_key: str = dataclasses.field(
        default="",
        repr=False,  # a secret: never in a repr or a log line
        metadata={
            "help": "This farm's key, sent as Authorization: Bearer to the ledger URL, "
            "to key-validation URLs and to the --exchange it joins."
        },
    )
