"""
Reading the transaction records farms post to C{POST /v1/ledger}.

The body is C{{"transactions": [RECORD, ...]}}; each record describes one
job and nothing of its content (see docs/operating.rst, "The ledger").
L{readLedger} checks every field before anything is stored, so a batch is
either stored whole or refused whole with a 400 naming the bad record.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from privox.api.errors import BadInput

#: Most records in one post; farms send at most 500.
MAX_RECORDS = 1000

_ACCOUNT = re.compile(r"[0-9a-f]{64}")
_SERVICES = ("stt", "tts")


def _text(record: dict[str, Any], name: str, limit: int) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise ValueError(f"{name} must be a string of 1 to {limit} characters")
    return value


def _number(record: dict[str, Any], name: str, optional: bool = False) -> float | None:
    value = record.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0")
    return float(value)


def _count(record: dict[str, Any], name: str) -> int:
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0")
    return value


def _accountId(record: dict[str, Any], name: str) -> str | None:
    value = record.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not _ACCOUNT.fullmatch(value):
        raise ValueError(f"{name} must be null or a 64-digit hex account id")
    return value


def readRecord(record: Any) -> dict[str, Any]:
    """
    @raise ValueError: a field is missing or malformed.
    """
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    service = _text(record, "service", 8)
    if service not in _SERVICES:
        raise ValueError("service must be stt or tts")
    return {
        "job_id": _text(record, "job_id", 64),
        "farm": _text(record, "farm", 200),
        "time": _number(record, "time"),
        "service": service,
        "model": _text(record, "model", 200),
        "input_bytes": _count(record, "input_bytes"),
        "output_bytes": _count(record, "output_bytes"),
        "audio_seconds": _number(record, "audio_seconds", optional=True),
        "processing_ms": _number(record, "processing_ms"),
        "status": _text(record, "status", 64),
        "producer": _accountId(record, "producer"),
        "consumer": _accountId(record, "consumer"),
    }


def readLedger(body: bytes) -> list[dict[str, Any]]:
    """
    The records in a C{POST /v1/ledger} body, checked.

    @raise BadInput: the body, or any record in it, is malformed.
    """
    try:
        decoded = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadInput("the body must be a JSON object") from None
    records = decoded.get("transactions") if isinstance(decoded, dict) else None
    if not isinstance(records, list):
        raise BadInput('the body must be {"transactions": [...]}')
    if len(records) > MAX_RECORDS:
        raise BadInput(f"at most {MAX_RECORDS} records per post")
    checked = []
    for index, record in enumerate(records):
        try:
            checked.append(readRecord(record))
        except ValueError as e:
            raise BadInput(f"record {index}: {e}") from None
    return checked
