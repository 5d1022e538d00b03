"""
C{privox keys create|import|list|revoke|show --accounts DSN}: managing keys
in an account store from the command line.

A new key is printed once, alone on the last line of C{create}'s output, so
scripts can take it with C{tail -n 1}; the store keeps only its hash. Keys
are named afterwards by their key id (the first 12 hex digits of that hash)
or a unique prefix of it, as C{list} shows them.

C{import} takes over keys another exchange gave out (the original's users
keep their keys and allowances): a file of C{KEY [HOURLY-SECONDS|-]
[LABEL...]} lines, all stored or none. It never prints a key.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import tomllib
from datetime import datetime, timezone
from typing import Any, BinaryIO, Mapping, TextIO

from privox.accounts import quota
from privox.accounts.store import DEFAULT_DSN, ROLES, Account, AccountStore, StoreError

#: The longest key C{import} takes, in characters.
MAX_KEY = 256


def addKeysParser(commands: Any, environ: Mapping[str, str]) -> None:
    """
    Add C{keys} and its subcommands to the C{privox} command's subparsers.
    """
    store = argparse.ArgumentParser(add_help=False)
    where = store.add_mutually_exclusive_group()
    where.add_argument(
        "--accounts",
        default=environ.get("PRIVOX_ACCOUNTS") or DEFAULT_DSN,
        metavar="DSN",
        help="the account store: sqlite:PATH or postgresql://... "
        "(default: $PRIVOX_ACCOUNTS, else %(default)s)",
    )
    where.add_argument(
        "--config",
        metavar="FILE",
        help="the API's TOML file (e.g. /etc/privox/api.toml): the store its accounts"
        " setting names, and its hourly-seconds for show",
    )
    keys = commands.add_parser(
        "keys", help="create, import, list, revoke and show keys in an account store",
        description="Manage the keys of an account store (what privox-api --accounts uses).",
    )
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create", parents=[store], help="make a new key and print it (once)",
        description="Make a new key. It is printed alone on the last line, and never again.",
    )
    create.add_argument(
        "--hourly-seconds", type=_notNegative, metavar="N",
        help="audio seconds this key may use per rolling hour (default: the API's)",
    )
    create.add_argument("--label", default="", help="a note for operators, e.g. who has it")
    create.add_argument(
        "--role", choices=ROLES, default="user",
        help="user: calls the API and produces; farm: posts its ledger and checks keys "
        "(default: %(default)s)",
    )
    imports = actions.add_parser(
        "import", parents=[store], help="take over existing keys, e.g. the original exchange's",
        description="Store existing keys as user keys, all or none. FILE has a line per key,"
        " 'KEY [HOURLY-SECONDS|-] [LABEL...]' (- or nothing: the API's default allowance);"
        " blank lines and # comments are skipped, as are keys already in the store.",
    )
    imports.add_argument("file", metavar="FILE", help="the keys; - reads them from stdin")
    listing = actions.add_parser("list", parents=[store], help="list the keys (ids, not keys)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = actions.add_parser("revoke", parents=[store], help="revoke a key")
    revoke.add_argument("key", metavar="KEY-ID", help="the key id (or a unique prefix), or the key")
    show = actions.add_parser(
        "show", parents=[store], help="a key's details and its quota in the last hour"
    )
    show.add_argument("key", metavar="KEY-ID", help="the key id (or a unique prefix), or the key")
    show.add_argument(
        "--default-hourly-seconds", type=_notNegative, default=quota.DEFAULT_HOURLY_SECONDS,
        metavar="N", help="the API's --hourly-seconds, for keys without their own "
        "(default: %(default)g)",
    )
    show.add_argument("--json", action="store_true", help="print JSON")


def _notNegative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be a number >= 0")
    return value


async def runKeys(
    reactor: Any, args: argparse.Namespace, out: TextIO | None = None,
    stdin: BinaryIO | None = None,
) -> None:
    """
    Run one C{privox keys} action.

    @param stdin: what C{import -} reads (default: the process's stdin).
    @raise StoreError: a user error (bad DSN, unknown key, a malformed
        import file), said in one line.
    """
    out = out or sys.stdout
    if args.action == "import":
        # Read and checked before the store is opened: a bad line writes nothing.
        args.keys = readImport(args.file, stdin or sys.stdin.buffer)
    if args.config:
        args.accounts, hourly = apiStore(args.config)
        if args.action == "show" and hourly is not None:
            args.default_hourly_seconds = hourly
    store = AccountStore.open(args.accounts, reactor)
    try:
        try:
            await store.migrate()
        except Exception as e:
            raise StoreError(f"cannot open {store.description}: {_oneLine(e)}") from None
        await _ACTIONS[args.action](store, args, out)
    finally:
        store.close()


def apiStore(path: str) -> tuple[str, float | None]:
    """
    The account store and hourly seconds an API's TOML file names.

    @raise StoreError: the file cannot be read, keeps no accounts, or names
        a SQLite file by a relative path (relative to the API's working
        directory, which this command cannot know).
    """
    try:
        with open(path, "rb") as f:
            settings = tomllib.load(f)
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise StoreError(f"{path} is not valid TOML: {e}") from None
    dsn = str(settings.get("accounts", DEFAULT_DSN))
    if dsn == "none":
        raise StoreError(f"{path} says accounts = \"none\": that API keeps no keys")
    if dsn.startswith("sqlite:") and not os.path.isabs(dsn[len("sqlite:"):]):
        raise StoreError(
            f"{path} names the SQLite store {dsn!r} relative to the API's working directory;"
            " give an absolute path there, or --accounts"
        )
    hourly = settings.get("hourly-seconds")
    return dsn, float(hourly) if isinstance(hourly, (int, float)) else None


async def _create(store: AccountStore, args: argparse.Namespace, out: TextIO) -> None:
    key, account = await store.createKey(
        time.time(), role=args.role, label=args.label, hourlySeconds=args.hourly_seconds
    )
    hourly = "the API's default" if account.hourlySeconds is None else f"{account.hourlySeconds:g}"
    out.write(f"created {account.role} key {account.keyId} (hourly seconds: {hourly})\n")
    out.write("the key is shown once; the store keeps only its hash:\n")
    out.write(key + "\n")


def readImport(path: str, stdin: BinaryIO) -> list[tuple[str, float | None, str]]:
    """
    The keys of an import file (C{-}: C{stdin}), as L{parseImport} reads them.

    @raise StoreError: the file cannot be read, is not UTF-8, or has a
        malformed line.
    """
    try:
        if path == "-":
            raw = stdin.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        # utf-8-sig: a BOM some editors write would otherwise join the first key.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise StoreError(f"{path} is not UTF-8 (byte {e.start})") from None
    return parseImport(text, "stdin" if path == "-" else path)


def parseImport(text: str, name: str) -> list[tuple[str, float | None, str]]:
    """
    C{(key, hourly seconds or None, label)} for each line C{KEY
    [HOURLY-SECONDS|-] [LABEL...]} of C{text}; blank lines and C{#}
    comments are skipped. A key is 1 to L{MAX_KEY} characters other than
    whitespace.

    @param name: what to call C{text} in an error.
    @raise StoreError: a malformed line, by its number (never its text,
        which holds a key).
    """
    keys = []
    # Lines end at \n only, so that numbers are the ones an editor shows.
    for number, line in enumerate(text.split("\n"), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields[0]) > MAX_KEY:
            raise StoreError(f"{name} line {number}: a key is at most {MAX_KEY} characters")
        hourly: float | None = None
        if len(fields) > 1 and fields[1] != "-":
            try:
                hourly = float(fields[1])
            except ValueError:
                hourly = -1.0
            if not (math.isfinite(hourly) and hourly >= 0):
                raise StoreError(
                    f"{name} line {number}: the hourly seconds after the key must be"
                    " a number >= 0, or - for the API's default"
                )
        keys.append((fields[0], hourly, " ".join(fields[2:])))
    return keys


async def _import(store: AccountStore, args: argparse.Namespace, out: TextIO) -> None:
    new, present = await store.importKeys(args.keys, time.time())
    out.write(f"imported {new} keys ({present} already present)\n")


async def _list(store: AccountStore, args: argparse.Namespace, out: TextIO) -> None:
    accounts = await store.accounts()
    if args.json:
        out.write(json.dumps([_describe(a) for a in accounts], indent=2) + "\n")
        return
    rows = [("KEY ID", "ROLE", "HOURLY", "CREATED", "STATUS", "LABEL")]
    for a in accounts:
        rows.append((
            a.keyId, a.role, "default" if a.hourlySeconds is None else f"{a.hourlySeconds:g}",
            _when(a.created), "active" if a.active else f"revoked {_when(a.revoked)}", a.label,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] + "\n")
    if not accounts:
        out.write("(no keys yet: privox keys create)\n")


async def _revoke(store: AccountStore, args: argparse.Namespace, out: TextIO) -> None:
    account = await store.find(args.key)
    if await store.revoke(account.account, time.time()):
        out.write(f"revoked key {account.keyId}\n")
    else:
        out.write(f"key {account.keyId} was already revoked\n")


async def _show(store: AccountStore, args: argparse.Namespace, out: TextIO) -> None:
    account = await store.find(args.key)
    base = args.default_hourly_seconds if account.hourlySeconds is None else account.hourlySeconds
    state = await store.standing(account.account, base, time.time())
    details = dict(
        _describe(account),
        allowance=round(state.allowance, 3),
        used=round(state.used, 3),
        earned=round(state.earned, 3),
        remaining=round(state.remaining, 3),
    )
    if args.json:
        out.write(json.dumps(details, indent=2) + "\n")
        return
    if account.hourlySeconds is None:
        details["hourly_seconds"] = f"{base:g} (the API's default)"
    for name, value in details.items():
        # Nothing said of what a key has not got (no label, not revoked).
        if value not in (None, ""):
            out.write(f"{name.replace('_', ' ')}: {value}\n")


def _describe(a: Account) -> dict[str, Any]:
    return {
        "key_id": a.keyId,
        "role": a.role,
        "label": a.label,
        "hourly_seconds": a.hourlySeconds,
        "created": _when(a.created),
        "revoked": _when(a.revoked) if a.revoked is not None else None,
    }


def _when(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _oneLine(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


_ACTIONS = {
    "create": _create, "import": _import, "list": _list, "revoke": _revoke, "show": _show,
}
