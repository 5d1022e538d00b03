"""
The account store: keys (as hashes), usage and the ledger, in SQLite or
PostgreSQL behind one interface.

Every query runs in Twisted's C{adbapi} thread pool, never on the reactor
thread. The two databases differ in three small ways, kept in L{_Dialect}:
parameter markers, how a write transaction starts, and how one account is
locked so that concurrent requests from one key queue up instead of
overspending it (SQLite: one connection and C{BEGIN IMMEDIATE}; PostgreSQL:
C{SELECT ... FOR UPDATE} on the account's row).

Quota checks read a window's worth of per-minute sums and the holds in
flight (L{privox.accounts.quota}), never a row per request: a key's history
does not slow anyone's check.

Schema migrations are the numbered C{.sql} files in
C{privox/accounts/migrations}, applied in order by L{AccountStore.migrate}
and remembered in C{schema_version}.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Iterable, Sequence

from twisted.enterprise import adbapi

from privox.accounts import quota
from privox.keys import accountId

#: The account id of requests without a key.
ANONYMOUS = "anonymous"

#: Roles a key can have: a person or program using the API (and maybe
#: producing), or a farm posting its ledger and checking keys.
ROLES = ("user", "farm")

#: The default DSN: a SQLite file in the working directory.
DEFAULT_DSN = "sqlite:privox-accounts.sqlite3"

#: Seconds of per-minute sums kept (past the quota's window, which is all a
#: check reads): the account page charts the last day of them.
HISTORY = 24 * 3600.0

_COLUMNS = "account, key_id, role, label, hourly_seconds, created, revoked"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class StoreError(ValueError):
    """
    A DSN, a key reference or a stored value is not usable.
    """


@dataclass(frozen=True)
class Account:
    #: The SHA-256 hex of the key (L{privox.keys.accountId}).
    account: str
    #: Its first 12 digits, as log lines and people see it.
    keyId: str
    role: str
    label: str
    #: Seconds per window; L{None} for the API's default.
    hourlySeconds: float | None
    created: float
    revoked: float | None

    @property
    def active(self) -> bool:
        return self.revoked is None


@dataclass(frozen=True)
class Reservation:
    """
    Seconds held against an account by a request in flight.
    """

    id: str
    account: str
    held: float


@dataclass(frozen=True)
class _Dialect:
    name: str
    module: str

    def sql(self, text: str) -> str:
        # The code writes qmark (?) parameters; psycopg2 wants %s.
        if self.module == "sqlite3":
            return text
        return text.replace("%", "%%").replace("?", "%s")

    def begin(self, cursor: Any, write: bool) -> None:
        # sqlite3 runs in autocommit mode here (isolation_level=None) so the
        # transaction, and when it takes the write lock, are ours to say.
        if self.module == "sqlite3":
            cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def lockAccount(self, cursor: Any, account: str) -> None:
        if self.module != "sqlite3":
            cursor.execute("SELECT 1 FROM accounts WHERE account = %s FOR UPDATE", (account,))

    def lockMigrations(self, cursor: Any) -> None:
        if self.module != "sqlite3":
            # Two API servers starting at once must not both migrate.
            cursor.execute("SELECT pg_advisory_xact_lock(1776)")


def parseDSN(dsn: str) -> tuple[_Dialect, tuple[Any, ...], dict[str, Any], str]:
    """
    @return: the dialect, the DB-API C{connect} arguments, and a description
        of the database without any password in it.
    @raise StoreError: not C{sqlite:PATH} or C{postgresql://...}.
    """
    if dsn.startswith("sqlite:"):
        path = dsn[len("sqlite:"):]
        if not path:
            raise StoreError("sqlite: needs a path, e.g. sqlite:privox-accounts.sqlite3")
        kwargs = {"isolation_level": None, "check_same_thread": False, "timeout": 30.0}
        return _Dialect("sqlite", "sqlite3"), (path,), kwargs, f"SQLite {path}"
    if dsn.startswith(("postgresql://", "postgres://")):
        shown = re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", dsn)
        return _Dialect("postgresql", "psycopg2"), (dsn,), {}, f"PostgreSQL {shown}"
    raise StoreError(
        f"unknown accounts DSN {dsn.split(':', 1)[0]!r}: use sqlite:PATH or postgresql://..."
    )


def _sqliteOpened(connection: Any) -> None:
    # A write-ahead log: readers (privox keys, a second API) don't block the
    # writer, and a commit costs an append rather than an fsync of the
    # database (synchronous=NORMAL keeps it consistent across crashes).
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")


def newKey() -> str:
    """
    A fresh key: 256 random bits, URL-safe, recognisable by its prefix.
    """
    return "pvx_" + secrets.token_urlsafe(32)


def _account(row: Sequence[Any]) -> Account:
    account, keyId, role, label, hourly, created, revoked = row
    return Account(
        account, keyId, role, label,
        None if hourly is None else float(hourly),
        float(created),
        None if revoked is None else float(revoked),
    )


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("privox.accounts") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_\w+\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text("utf-8")))
    return sorted(found)


def _statements(script: str) -> list[str]:
    without = re.sub(r"--[^\n]*", "", script)
    return [s.strip() for s in without.split(";") if s.strip()]


class AccountStore:
    """
    Keys, usage and the ledger. Open with L{AccountStore.open}, then
    L{migrate} once before use; L{close} when done.
    """

    def __init__(self, pool: adbapi.ConnectionPool, dialect: _Dialect, description: str) -> None:
        self._pool = pool
        self._dialect = dialect
        #: Names the database for log lines (no password).
        self.description = description

    @classmethod
    def open(cls, dsn: str, reactor: Any) -> AccountStore:
        """
        A store for C{dsn} (C{sqlite:PATH} or C{postgresql://...}). Connects
        lazily, in the pool's threads, once the reactor runs.

        @raise StoreError: a malformed DSN, or no driver for it installed.
        """
        dialect, args, kwargs, description = parseDSN(dsn)
        try:
            __import__(dialect.module)
        except ImportError:
            raise StoreError(
                f"{description} needs the {dialect.module} module: pip install 'privox[postgresql]'"
            ) from None
        if dialect.module == "sqlite3":
            # One connection: SQLite has one writer anyway, and ":memory:"
            # must stay one database.
            kwargs.update(cp_min=1, cp_max=1, cp_openfun=_sqliteOpened)
        else:
            kwargs.update(cp_min=1, cp_max=8, cp_reconnect=True)
        pool = adbapi.ConnectionPool(
            dialect.module, *args, cp_reactor=reactor, cp_noisy=False, **kwargs
        )
        return cls(pool, dialect, description)

    def _run(self, interaction: Callable[..., Any], *args: Any) -> Any:
        return self._pool.runInteraction(interaction, *args)

    def _execute(self, cursor: Any, sql: str, params: Sequence[Any] = ()) -> None:
        cursor.execute(self._dialect.sql(sql), tuple(params))

    # Schema

    async def migrate(self) -> int:
        """
        Apply the migrations this database has not had yet.

        @return: the schema version now.
        """
        return await self._run(self._migrate)  # type: ignore[no-any-return]

    def _migrate(self, cursor: Any) -> int:
        self._dialect.begin(cursor, write=True)
        self._dialect.lockMigrations(cursor)
        cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        cursor.execute("SELECT MAX(version) FROM schema_version")
        current = cursor.fetchone()[0] or 0
        for version, script in _migrations():
            if version > current:
                for statement in _statements(script):
                    cursor.execute(statement)
                self._execute(cursor, "INSERT INTO schema_version (version) VALUES (?)", (version,))
                current = version
        return int(current)

    # Keys

    async def createKey(
        self, now: float, role: str = "user", label: str = "", hourlySeconds: float | None = None
    ) -> tuple[str, Account]:
        """
        Make a new key. The key itself is returned here and nowhere else:
        the store keeps its hash.
        """
        if role not in ROLES:
            raise StoreError(f"role must be one of {', '.join(ROLES)}")
        if hourlySeconds is not None and hourlySeconds < 0:
            raise StoreError("hourly seconds must not be negative")
        key = newKey()
        account = Account(accountId(key), accountId(key)[:12], role, label, hourlySeconds, now, None)

        def insert(cursor: Any) -> None:
            self._execute(
                cursor,
                f"INSERT INTO accounts ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (account.account, account.keyId, role, label, hourlySeconds, now, None),
            )

        await self._run(insert)
        return key, account

    async def importKeys(
        self, keys: Sequence[tuple[str, float | None, str]], now: float
    ) -> tuple[int, int]:
        """
        Take over existing keys (another exchange's users keep theirs) as
        user keys, each C{(key, hourly seconds or None, label)}, in one
        transaction: all or nothing. A key the store already has is left as
        it is (its allowance, label and whether it is revoked), and counted.

        @return: how many were new, and how many were already here.
        @raise StoreError: an empty key, or negative hourly seconds.
        """
        rows = []
        for key, hourlySeconds, label in keys:
            if not key:
                raise StoreError("a key must not be empty")
            if hourlySeconds is not None and hourlySeconds < 0:
                raise StoreError("hourly seconds must not be negative")
            account = accountId(key)
            rows.append((account, account[:12], "user", label, hourlySeconds, now, None))

        def insert(cursor: Any) -> tuple[int, int]:
            self._dialect.begin(cursor, write=True)
            new = 0
            for row in rows:
                self._execute(
                    cursor,
                    f"INSERT INTO accounts ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (account) DO NOTHING",
                    row,
                )
                new += cursor.rowcount > 0
            return new, len(rows) - new

        return await self._run(insert)  # type: ignore[no-any-return]

    async def authenticate(self, key: str) -> Account | None:
        """
        The account of C{key} (revoked or not), or L{None} if it has none.
        """
        if not key:
            return None
        return await self.account(accountId(key))

    async def account(self, account: str) -> Account | None:
        def select(cursor: Any) -> Account | None:
            self._execute(cursor, f"SELECT {_COLUMNS} FROM accounts WHERE account = ?", (account,))
            row = cursor.fetchone()
            return None if row is None else _account(row)

        return await self._run(select)  # type: ignore[no-any-return]

    async def accounts(self) -> list[Account]:
        """
        Every key's account, oldest first (not the anonymous bucket).
        """
        def select(cursor: Any) -> list[Account]:
            self._execute(
                cursor,
                f"SELECT {_COLUMNS} FROM accounts WHERE role <> ? ORDER BY created, key_id",
                (ANONYMOUS,),
            )
            return [_account(row) for row in cursor.fetchall()]

        return await self._run(select)  # type: ignore[no-any-return]

    async def find(self, reference: str) -> Account:
        """
        The account a person means: a key (made here or imported), its
        64-digit account id, or a unique prefix (at least 6 digits) of its
        key id.

        @raise StoreError: none, or more than one, matches.
        """
        reference = reference.strip()
        if reference.startswith("pvx_"):
            reference = accountId(reference)
        if _HEX64.fullmatch(reference):
            found = await self.account(reference)
            if found is not None:
                return found
        # An imported key (L{importKeys}) has no prefix that says it is one.
        found = await self.account(accountId(reference))
        if found is not None:
            return found
        if _HEX64.fullmatch(reference):
            raise StoreError("no such key")
        if not re.fullmatch(r"[0-9a-f]{6,12}", reference):
            raise StoreError("give a key, or at least 6 hex digits of its key id")
        matches = [a for a in await self.accounts() if a.keyId.startswith(reference)]
        if not matches:
            raise StoreError(f"no key id starts with {reference}")
        if len(matches) > 1:
            raise StoreError(f"{len(matches)} key ids start with {reference}: give more digits")
        return matches[0]

    async def revoke(self, account: str, now: float) -> bool:
        """
        @return: whether the key was good until now.
        """
        def update(cursor: Any) -> bool:
            self._execute(
                cursor,
                "UPDATE accounts SET revoked = ? WHERE account = ? AND revoked IS NULL",
                (now, account),
            )
            return bool(cursor.rowcount)

        return await self._run(update)  # type: ignore[no-any-return]

    # Quotas

    def _rows(self, cursor: Any, account: str, now: float, window: float) -> tuple[list, list]:
        """
        The account's use (settled, and held by requests in flight) and
        credit as L{quota} rows: at most a window's buckets and the holds
        in flight, whatever the account's history.
        """
        first = quota.bucketOf(now - window)
        self._execute(
            cursor,
            "SELECT bucket, used, earned FROM quota_buckets WHERE account = ? AND bucket >= ?",
            (account, first),
        )
        used, earned = [], []
        for bucket, u, e in cursor.fetchall():
            if u:
                used.append(quota.usedRow(int(bucket), float(u)))
            if e:
                earned.append(quota.earnedRow(int(bucket), float(e)))
        self._execute(
            cursor, "SELECT expires, seconds FROM holds WHERE account = ? AND expires > ?",
            (account, now),
        )
        used += [quota.holdRow(float(x), float(s), window) for x, s in cursor.fetchall()]
        return used, earned

    def _add(self, cursor: Any, account: str, at: float, used: float, earned: float) -> None:
        self._execute(
            cursor,
            "INSERT INTO quota_buckets (account, bucket, used, earned) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (account, bucket) DO UPDATE SET"
            " used = quota_buckets.used + excluded.used,"
            " earned = quota_buckets.earned + excluded.earned",
            (account, quota.bucketOf(at), used, earned),
        )

    async def standing(
        self, account: str, base: float, now: float, window: float = quota.WINDOW
    ) -> quota.Standing:
        def select(cursor: Any) -> quota.Standing:
            used, earned = self._rows(cursor, account, now, window)
            return quota.standing(base, used, earned, now, window)

        return await self._run(select)  # type: ignore[no-any-return]

    async def check(
        self, account: str, base: float, need: float, now: float, window: float = quota.WINDOW
    ) -> None:
        """
        Whether C{need} seconds would fit now, holding nothing (a read).

        @raise quota.QuotaExceeded: they would not.
        """
        def check(cursor: Any) -> None:
            used, earned = self._rows(cursor, account, now, window)
            quota.admit(base, used, earned, need, now, window)

        await self._run(check)

    async def reserve(
        self, account: str, base: float, need: float, now: float, expires: float,
        window: float = quota.WINDOW,
    ) -> Reservation:
        """
        Hold C{need} seconds for a request until it settles, is released, or
        C{expires} passes (a crashed API's holds free themselves), atomically:
        concurrent requests from one account wait for each other here, so
        together they cannot overspend.

        @raise quota.QuotaExceeded: it does not fit now.
        """
        def reserve(cursor: Any) -> Reservation:
            self._dialect.begin(cursor, write=True)
            self._dialect.lockAccount(cursor, account)
            # Expired holds, and sums older than the page's chart (L{HISTORY}),
            # are done with; drop them as we pass.
            self._execute(
                cursor, "DELETE FROM holds WHERE account = ? AND expires <= ?", (account, now)
            )
            self._execute(
                cursor, "DELETE FROM quota_buckets WHERE account = ? AND bucket < ?",
                (account, quota.bucketOf(now - max(window, HISTORY))),
            )
            used, earned = self._rows(cursor, account, now, window)
            held = quota.admit(base, used, earned, need, now, window)
            reservation = Reservation(secrets.token_hex(8), account, held)
            self._execute(
                cursor,
                "INSERT INTO holds (id, account, at, seconds, expires) VALUES (?, ?, ?, ?, ?)",
                (reservation.id, account, now, held, expires),
            )
            return reservation

        return await self._run(reserve)  # type: ignore[no-any-return]

    async def settle(self, reservation: Reservation, seconds: float, now: float) -> float:
        """
        Charge what the request really used, at most what it held (so what
        a producer reports, or a clock that ran past the hold's expiry,
        can never charge more than was admitted), in place of the hold.

        @return: the seconds charged.
        """
        charged = min(max(0.0, seconds), reservation.held)

        def update(cursor: Any) -> None:
            self._dialect.begin(cursor, write=True)
            # Taken with the account's lock, so that a reserve reading the
            # sums and then the holds never misses this request in between.
            self._dialect.lockAccount(cursor, reservation.account)
            self._execute(cursor, "DELETE FROM holds WHERE id = ?", (reservation.id,))
            self._add(cursor, reservation.account, now, charged, 0.0)

        await self._run(update)
        return charged

    async def release(self, reservation: Reservation) -> None:
        """
        The request failed: it costs nothing.
        """
        def delete(cursor: Any) -> None:
            self._execute(cursor, "DELETE FROM holds WHERE id = ?", (reservation.id,))

        await self._run(delete)

    # The ledger

    async def record(
        self, farmAccount: str, transactions: Sequence[dict[str, Any]], now: float,
        costOf: Callable[[str], float],
    ) -> tuple[int, int]:
        """
        Store a farm's transaction records (already checked: see
        L{privox.api.ledger}), crediting each successful job's producer with
        its audio seconds times its model's cost. A record already stored
        (same farm key and job id) is skipped, so a farm may re-send.

        @return: how many were new, and how many were duplicates.
        """
        def insert(cursor: Any) -> tuple[int, int]:
            self._dialect.begin(cursor, write=True)
            new = 0
            credit: dict[str, float] = {}
            for t in transactions:
                seconds = t["audio_seconds"]
                earned = (
                    seconds * costOf(t["model"])
                    if t["status"] == "ok" and seconds and t["producer"]
                    else 0.0
                )
                self._execute(
                    cursor,
                    "INSERT INTO transactions (farm_account, job_id, farm, at, service, model,"
                    " input_bytes, output_bytes, audio_seconds, processing_ms, status, producer,"
                    " consumer, qss, credited) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (farm_account, job_id) DO NOTHING",
                    (
                        farmAccount, t["job_id"], t["farm"], t["time"], t["service"], t["model"],
                        t["input_bytes"], t["output_bytes"], seconds, t["processing_ms"],
                        t["status"], t["producer"], t["consumer"], earned, now,
                    ),
                )
                if cursor.rowcount > 0:
                    new += 1
                    if earned:
                        credit[t["producer"]] = credit.get(t["producer"], 0.0) + earned
            # One sum per producer, in one order for every batch (two
            # batches at once then never wait for each other crosswise); a
            # producer that never spends is pruned here.
            for producer in sorted(credit):
                self._add(cursor, producer, now, 0.0, credit[producer])
                self._execute(
                    cursor, "DELETE FROM quota_buckets WHERE account = ? AND bucket < ?",
                    (producer, quota.bucketOf(now - max(quota.WINDOW, HISTORY))),
                )
            return new, len(transactions) - new

        return await self._run(insert)  # type: ignore[no-any-return]

    async def transactions(self, limit: int = 1000) -> list[dict[str, Any]]:
        """
        The latest records, newest first (for operators and tests).
        """
        names = (
            "job_id", "farm", "at", "service", "model", "input_bytes", "output_bytes",
            "audio_seconds", "processing_ms", "status", "producer", "consumer", "qss", "credited",
        )

        def select(cursor: Any) -> list[dict[str, Any]]:
            self._execute(
                cursor,
                f"SELECT {', '.join(names)} FROM transactions ORDER BY credited DESC, at DESC LIMIT ?",
                (limit,),
            )
            return [dict(zip(names, row)) for row in cursor.fetchall()]

        return await self._run(select)  # type: ignore[no-any-return]

    # Nodes enrolled with the exchange (L{privox.api.enrolment})

    async def recordEnrolment(self, node: str, keyId: str, now: float, expires: float) -> None:
        """
        The node C{node} (its identity's fingerprint) got a certificate for
        the key C{keyId}, good until C{expires}.
        """

        def upsert(cursor: Any) -> None:
            self._execute(
                cursor,
                "INSERT INTO enrolments (node, key_id, first, last, expires) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (node) DO UPDATE SET key_id = excluded.key_id,"
                " last = excluded.last, expires = excluded.expires",
                (node, keyId, now, now, expires),
            )

        await self._run(upsert)

    async def enrolments(self, keyId: str, onlineSince: float) -> list[dict[str, Any]]:
        """
        The nodes enrolled under C{keyId}, latest first: C{node},
        C{first}, C{last}, C{expires}, and where it is online (as farms
        said since C{onlineSince}): C{farms}, C{connections}.
        """

        def select(cursor: Any) -> list[dict[str, Any]]:
            self._execute(
                cursor,
                "SELECT e.node, e.first, e.last, e.expires, COUNT(o.farm),"
                " COALESCE(SUM(o.connections), 0)"
                " FROM enrolments e LEFT JOIN online_nodes o"
                " ON o.node = e.node AND o.key_id = e.key_id AND o.seen >= ?"
                " WHERE e.key_id = ? GROUP BY e.node, e.first, e.last, e.expires"
                " ORDER BY e.last DESC",
                (onlineSince, keyId),
            )
            names = ("node", "first", "last", "expires", "farms", "connections")
            return [dict(zip(names, row)) for row in cursor.fetchall()]

        return await self._run(select)  # type: ignore[no-any-return]

    async def noteOnline(
        self, farm: str, nodes: Iterable[tuple[str, str, int]], now: float
    ) -> None:
        """
        The farm C{farm} has these nodes connected now (fingerprint, the key
        id its certificate names, connections), and no other.
        """
        rows = [(farm, node, keyId, connections, now) for node, keyId, connections in nodes]

        def replace(cursor: Any) -> None:
            self._dialect.begin(cursor, write=True)
            self._execute(cursor, "DELETE FROM online_nodes WHERE farm = ?", (farm,))
            if rows:
                cursor.executemany(
                    self._dialect.sql(
                        "INSERT INTO online_nodes (farm, node, key_id, connections, seen)"
                        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (farm, node, key_id) DO UPDATE"
                        " SET connections = excluded.connections, seen = excluded.seen"
                    ),
                    rows,
                )

        await self._run(replace)

    # Farms that joined by themselves (L{privox.api.farmdirectory})

    async def listFarm(
        self, name: str, stt: str | None, tts: str | None, account: str, seen: float,
        producers: str = "{}",
    ) -> bool:
        """
        List the farm C{name} (or note that it registered again), unless
        another farm key holds that name.

        @return: whether it is listed for C{account} now.
        """

        def upsert(cursor: Any) -> bool:
            self._dialect.begin(cursor, write=True)
            self._execute(
                cursor,
                "INSERT INTO farm_directory (name, stt, tts, account, seen, producers)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET stt = excluded.stt, tts = excluded.tts,"
                " seen = excluded.seen, producers = excluded.producers"
                " WHERE farm_directory.account = excluded.account",
                (name, stt, tts, account, seen, producers),
            )
            self._execute(cursor, "SELECT account FROM farm_directory WHERE name = ?", (name,))
            return bool(cursor.fetchone()[0] == account)

        return await self._run(upsert)  # type: ignore[no-any-return]

    async def unlistFarm(self, name: str, account: str, seen: float) -> None:
        """
        Unlist the farm C{name} of C{account}, unless it registered again
        since C{seen}.
        """

        def delete(cursor: Any) -> None:
            self._dialect.begin(cursor, write=True)
            self._execute(
                cursor,
                "DELETE FROM farm_directory WHERE name = ? AND account = ? AND seen <= ?",
                (name, account, seen),
            )
            if cursor.rowcount > 0:
                self._execute(cursor, "DELETE FROM online_nodes WHERE farm = ?", (name,))

        await self._run(delete)

    async def unlistStaleFarms(self, before: float) -> None:
        """
        Unlist the farms that have not registered since C{before}.
        """

        def delete(cursor: Any) -> None:
            self._dialect.begin(cursor, write=True)
            self._execute(cursor, "DELETE FROM farm_directory WHERE seen < ?", (before,))
            self._execute(cursor, "DELETE FROM online_nodes WHERE seen < ?", (before,))

        await self._run(delete)

    async def listedFarms(self) -> list[dict[str, Any]]:
        """
        Every listed farm: C{name}, C{stt}, C{tts}, C{account}, C{seen},
        C{producers} (JSON).
        """

        def select(cursor: Any) -> list[dict[str, Any]]:
            self._execute(
                cursor, "SELECT name, stt, tts, account, seen, producers FROM farm_directory"
            )
            names = ("name", "stt", "tts", "account", "seen", "producers")
            return [dict(zip(names, row)) for row in cursor.fetchall()]

        return await self._run(select)  # type: ignore[no-any-return]

    # What the account pages show (L{privox.api.accountpages})

    async def hourly(
        self, account: str, now: float, hours: int = 24
    ) -> list[tuple[float, float, float]]:
        """
        The account's settled use and earned credit per hour, from its
        per-minute sums (kept for L{HISTORY}), oldest first.

        @return: C{hours} rows C{(start of the hour, used, earned)}, the
            last one the hour C{now} is in.
        """
        last = int(now // 3600)
        first = last - hours + 1

        def select(cursor: Any) -> list[tuple[float, float, float]]:
            self._execute(
                cursor,
                "SELECT bucket, used, earned FROM quota_buckets WHERE account = ? AND bucket >= ?",
                (account, quota.bucketOf(first * 3600.0)),
            )
            sums = {hour: [0.0, 0.0] for hour in range(first, last + 1)}
            for bucket, used, earned in cursor.fetchall():
                hour = int(bucket * quota.BUCKET // 3600)
                if hour in sums:
                    sums[hour][0] += float(used or 0)
                    sums[hour][1] += float(earned or 0)
            return [(hour * 3600.0, u, e) for hour, (u, e) in sorted(sums.items())]

        return await self._run(select)  # type: ignore[no-any-return]

    async def accountLedger(
        self, account: str, role: str | None = None, service: str | None = None,
        offset: int = 0, limit: int = 20,
    ) -> tuple[list[dict[str, Any]], int]:
        """
        The ledger records an account took part in (as C{role}: "consumer",
        "producer", or either), newest first: one page of them, and how
        many there are in all. Each has C{role} added; no other account.
        """
        if role == "consumer":
            where, params = "consumer = ?", [account]
        elif role == "producer":
            where, params = "producer = ?", [account]
        else:
            where, params = "(producer = ? OR consumer = ?)", [account, account]
        if service:
            where += " AND service = ?"
            params.append(service)
        names = (
            "job_id", "at", "service", "model", "audio_seconds", "processing_ms", "status",
            "qss", "producer",
        )

        def select(cursor: Any) -> tuple[list[dict[str, Any]], int]:
            self._execute(cursor, f"SELECT COUNT(*) FROM transactions WHERE {where}", params)
            total = int(cursor.fetchone()[0])
            self._execute(
                cursor,
                f"SELECT {', '.join(names)} FROM transactions WHERE {where}"
                " ORDER BY at DESC, job_id LIMIT ? OFFSET ?",
                (*params, limit, offset),
            )
            rows = []
            for row in cursor.fetchall():
                record = dict(zip(names, row))
                record["role"] = "producer" if record.pop("producer") == account else "consumer"
                rows.append(record)
            return rows, total

        return await self._run(select)  # type: ignore[no-any-return]

    async def producing(self, account: str) -> list[dict[str, Any]]:
        """
        What an account's nodes served, per farm, service and model: jobs,
        jobs that succeeded, audio seconds, QSS earned, the first and the
        latest job.
        """
        def select(cursor: Any) -> list[dict[str, Any]]:
            self._execute(
                cursor,
                "SELECT farm, service, model, COUNT(*),"
                " SUM(CASE WHEN status = 'ok' THEN 1 ELSE 0 END),"
                " SUM(COALESCE(audio_seconds, 0)), SUM(qss), MIN(at), MAX(at)"
                " FROM transactions WHERE producer = ?"
                " GROUP BY farm, service, model ORDER BY MAX(at) DESC",
                (account,),
            )
            names = ("farm", "service", "model", "jobs", "ok", "audio_seconds", "qss", "first", "last")
            return [
                {k: (v if k in ("farm", "service", "model") else float(v or 0)) for k, v in zip(names, row)}
                for row in cursor.fetchall()
            ]

        return await self._run(select)  # type: ignore[no-any-return]

    async def jobsPerHour(self, now: float, hours: int = 24) -> list[tuple[float, int]]:
        """
        Jobs in the ledger per hour (by when they ended), over all
        accounts, oldest first: C{hours} rows C{(start of the hour, jobs)}.
        """
        last = int(now // 3600)
        first = last - hours + 1

        def select(cursor: Any) -> list[tuple[float, int]]:
            # floor() written so that SQLite's CAST (truncates) and
            # PostgreSQL's (rounds) agree, as in migration 0002.
            self._execute(
                cursor,
                "SELECT h, COUNT(*) FROM (SELECT CAST(at / 3600 AS BIGINT) - CASE WHEN"
                " CAST(at / 3600 AS BIGINT) > at / 3600 THEN 1 ELSE 0 END AS h"
                " FROM transactions WHERE at >= ?) AS t GROUP BY h",
                (first * 3600.0,),
            )
            counts = {int(h): int(n) for h, n in cursor.fetchall()}
            return [(hour * 3600.0, counts.get(hour, 0)) for hour in range(first, last + 1)]

        return await self._run(select)  # type: ignore[no-any-return]

    async def jobsSince(self, since: float) -> int:
        """
        How many jobs the ledger has that ended at or after C{since}.
        """
        def select(cursor: Any) -> int:
            self._execute(cursor, "SELECT COUNT(*) FROM transactions WHERE at >= ?", (since,))
            return int(cursor.fetchone()[0])

        return await self._run(select)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._pool.close()
