"""
The contribution ledger: one record per finished job, for crediting the
producers that did the work and accounting for the consumers that asked.

A record (built by the farm: L{privox.farm.farm.transaction}) says when,
which service and model, how many bytes
went in and out, how many seconds of audio, how long it took, how it ended,
and the account ids (L{privox.keys.accountId}: SHA-256 of the key) of the
producer and the consumer. Never a key, text or audio.

Where records go is a L{Sink}:

  - L{NoLedger}: nowhere (the default);
  - L{JsonLinesLedger}: appended to a JSON-lines file, for a farm that runs
    alone;
  - L{HTTPLedger}: appended to a spool file first (durable), then POSTed in
    batches to an API's C{/v1/ledger}, with C{Authorization: Bearer} and the
    farm's key. The API stores records idempotently by C{job_id}, so the farm
    re-sends whatever it cannot prove was stored: after an outage, after a
    restart, after a crash between a POST and the note that it was sent.

Disk I/O runs through a I{runner} (C{runner(f, *args) -> Deferred}), in the
farm a thread pool, never on the reactor thread; tests pass L{runInline}.

Nothing is lost on a crash: L{Sink.record} fires once the record is on disk
(appended and fsynced), and the farm holds the end of each job's answer
until then (L{privox.farm.job}), so a consumer never has an answer whose
record a SIGKILL could still take away. Records are written as soon as the
disk is free: those taken in one turn of the reactor, or while the previous
write was under way, go in one append and one fsync (group commit), so a
busy farm does not sync once per job.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Protocol

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from privox.keys import webReason, withoutSecrets

log = Logger()

Transaction = dict[str, Any]
#: Runs C{f(*args)} somewhere (a thread) and fires with its result.
Runner = Callable[..., "Deferred[Any]"]

#: The most records one POST carries.
BATCH_SIZE = 500
#: Seconds to wait for the API's whole answer to one POST.
POST_TIMEOUT = 30.0
#: Retry delays after a failed POST: this, doubling up to L{MAX_BACKOFF}.
MIN_BACKOFF = 1.0
MAX_BACKOFF = 60.0
_backoff = backoffPolicy(
    initialDelay=MIN_BACKOFF, maxDelay=MAX_BACKOFF, factor=2.0, jitter=lambda: 0.0
)
#: Records arriving within this many seconds (and while a write is under
#: way) are written together; 0: those of one turn of the reactor.
FLUSH_INTERVAL = 0.0
#: How long a failed file write waits before it is tried again.
WRITE_RETRY = 5.0


def runInline(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    A runner that runs C{f} at once, on the calling thread (tests).
    """
    return maybeDeferred(f, *args)


# Records


def encode(record: Transaction) -> bytes:
    "One JSON-lines line (with its newline) for C{record}."
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


# Sinks


class Sink(Protocol):
    #: Where records go, for a log line (never a key).
    description: str
    #: Whether records reach a disk (and answers are worth holding for them).
    durable: bool

    def record(self, transaction: Transaction) -> Deferred[None]:
        """
        Take one record (never blocks, never fails); fires once it is on
        disk, or once writing it has failed (it is then retried, and the
        failure logged).
        """

    def start(self) -> None:
        "Begin (an HTTP ledger re-sends what an earlier run left unsent)."

    def stop(self) -> Deferred[None]:
        "Fires once every record taken so far is on disk (not necessarily sent)."


class NoLedger:
    """
    Records nothing.
    """

    description = "none"
    durable = False

    def record(self, transaction: Transaction) -> Deferred[None]:
        return succeed(None)

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return succeed(None)


def _appendLines(path: str, lines: list[bytes]) -> None:
    """
    Append C{lines} to C{path} in one write, first ending a line that a
    crash left unfinished (so that line alone is lost, not the next one).
    """
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        prefix = b""
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                prefix = b"\n"
            f.seek(0, os.SEEK_END)
        f.write(prefix + b"".join(lines))
        f.flush()
        os.fsync(f.fileno())


class _Batcher:
    """
    Collects encoded records and appends them to a file through a serial
    runner, at most every C{interval} seconds, one write at a time.
    """

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        run: Runner,
        interval: float,
        written: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = path
        self._clock = clock
        self._run = run
        self._interval = interval
        self._written = written
        self._pending: list[bytes] = []
        #: Fired once the pending records' write has been tried.
        self._waiting: list[Deferred[None]] = []
        self._timer: IDelayedCall | None = None
        self._writing = False
        self._idle: list[Deferred[None]] = []
        self._now = False  # stopping: write at once, no waiting
        #: The last write failed: answers are not held back for records
        #: that may not be written for a while (they are retried).
        self._failing = False

    def add(self, line: bytes) -> Deferred[None]:
        """
        Write C{line} with the next batch; fires once that write is done
        (or has failed).
        """
        self._pending.append(line)
        self._schedule(self._interval)
        if self._failing:
            return succeed(None)
        written: Deferred[None] = Deferred()
        self._waiting.append(written)
        return written

    def _schedule(self, delay: float) -> None:
        if self._now and not self._writing:
            self._flush()
        elif self._timer is None and not self._writing:
            self._timer = self._clock.callLater(delay, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._writing:
            return
        if not self._pending:
            self._fireIdle()
            return
        batch, self._pending = self._pending, []
        waiting, self._waiting = self._waiting, []
        self._writing = True
        self._run(_appendLines, self.path, batch).addBoth(self._done, batch, waiting)

    def _done(self, result: Any, batch: list[bytes], waiting: list[Deferred[None]]) -> None:
        try:
            self._afterWrite(result, batch)
        finally:
            for written in waiting:
                written.callback(None)

    def _afterWrite(self, result: Any, batch: list[bytes]) -> None:
        self._writing = False
        self._failing = isinstance(result, Failure)
        if isinstance(result, Failure):
            log.error(
                "ledger: cannot write {n} records to {path}: {why}; will retry"
                " (their answers were not held back for it)",
                n=len(batch),
                path=self.path,
                why=result.getErrorMessage(),
            )
            self._pending[:0] = batch
            if self._now:
                # Stopping: one attempt only; what is left is lost.
                log.error(
                    "ledger: {n} records not written at stop", n=len(self._pending)
                )
                self._pending = []
                abandoned, self._waiting = self._waiting, []
                for written in abandoned:
                    written.callback(None)
                self._fireIdle()
                return
            self._timer = self._clock.callLater(WRITE_RETRY, self._flush)
            return
        self._written()
        if self._pending:
            if self._now:
                self._flush()
            else:
                self._schedule(self._interval)
        else:
            self._fireIdle()

    def _fireIdle(self) -> None:
        if self._writing or self._pending:
            return
        idle, self._idle = self._idle, []
        for d in idle:
            d.callback(None)

    def drain(self) -> Deferred[None]:
        """
        Write everything pending now; fire when it is on disk.
        """
        self._now = True
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        self._flush()
        return d


class _Serial:
    """
    A runner that runs one thing at a time, in the order asked: every file
    operation on a spool goes through one, so an append never races a
    truncation.
    """

    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        self._lock = DeferredLock()

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self._lock.run(self._runner, f, *args)

    def idle(self) -> Deferred[None]:
        "Fires once everything asked so far has run."
        return self._lock.run(succeed, None)


class JsonLinesLedger:
    """
    Appends each record as one JSON line to C{path}.
    """

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        runner: Runner,
        flushInterval: float = FLUSH_INTERVAL,
    ) -> None:
        self.path = path
        self.description = f"JSON-lines file {path}"
        self._batcher = _Batcher(path, clock, _Serial(runner), flushInterval)

    durable = True

    def record(self, transaction: Transaction) -> Deferred[None]:
        return self._batcher.add(encode(transaction))

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return self._batcher.drain()


# The spool's file operations (run in a thread).


def _readOffset(spool: str) -> int:
    """
    The confirmed-sent offset of C{spool}; 0 if unknown, garbled, or past
    the spool's end (a crash between truncating the spool and resetting the
    offset).
    """
    try:
        with open(spool + ".sent", "rb") as f:
            offset = int(f.read().strip() or b"0")
    except (OSError, ValueError):
        offset = 0
    try:
        size = os.path.getsize(spool)
    except OSError:
        size = 0
    return offset if 0 <= offset <= size else 0


def _writeOffset(spool: str, offset: int) -> None:
    tmp = spool + ".sent.tmp"
    with open(tmp, "wb") as f:
        f.write(b"%d\n" % offset)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, spool + ".sent")


def _nextBatch(spool: str, offset: int, limit: int) -> tuple[list[bytes], list[bytes], int]:
    """
    Up to C{limit} complete records after C{offset}: (records, unreadable
    lines, offset after them). When nothing is left, the spool is truncated
    and the offset reset: ([], [], 0).
    """
    try:
        f = open(spool, "rb")
    except FileNotFoundError:
        return [], [], 0
    with f:
        size = os.fstat(f.fileno()).st_size
        if offset > size:
            offset = 0
        if offset == size:
            if size:
                # Truncate first: a crash before the offset is reset leaves
                # an offset past the end, which reads as 0.
                os.truncate(spool, 0)
                _writeOffset(spool, 0)
            return [], [], 0
        f.seek(offset)
        records: list[bytes] = []
        bad: list[bytes] = []
        while len(records) < limit:
            line = f.readline()
            if not line.endswith(b"\n"):
                break  # the end, or a line still being written
            offset += len(line)
            body = line.strip()
            if not body:
                continue
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict) and isinstance(parsed.get("job_id"), str):
                records.append(body)
            else:
                bad.append(line)
        return records, bad, offset


class HTTPLedger:
    """
    Spools records to a file, and ships them in batches to the API's ledger
    endpoint until it confirms each batch.

    The spool is an append-only JSON-lines file; C{SPOOL.sent} holds the
    byte offset up to which the API confirmed the records. Once all is sent
    the spool is truncated. Batches the API refuses as malformed (400) go
    to C{SPOOL.rejected}; any other failure is retried with backoff.
    """

    def __init__(
        self,
        url: str,
        key: str,
        spool: str,
        clock: IReactorTime,
        runner: Runner,
        httpClient: Any,
        flushInterval: float = FLUSH_INTERVAL,
        batchSize: int = BATCH_SIZE,
        timeout: float = POST_TIMEOUT,
    ) -> None:
        self.url = url
        self.spool = spool
        self._safeURL = withoutSecrets(url)
        self.description = f"ledger URL {self._safeURL} (spool {spool})"
        self._headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {key}",
        }
        self._clock = clock
        self._run = _Serial(runner)
        self._http = httpClient
        self._batchSize = batchSize
        self._timeout = timeout
        self._batcher = _Batcher(spool, clock, self._run, flushInterval, written=self._kick)
        self._offset = 0
        self._started = False
        self._stopped = False
        self._shipping = False
        self._again = False
        #: Failed POSTs in a row.
        self._failures = 0
        self._retry: IDelayedCall | None = None
        self._request: Deferred[Any] | None = None

    durable = True

    def record(self, transaction: Transaction) -> Deferred[None]:
        return self._batcher.add(encode(transaction))

    def start(self) -> None:
        self._stopped = False

        def started(offset: int) -> None:
            self._offset = offset
            self._started = True
            self._kick()

        self._run(_readOffset, self.spool).addCallback(started).addErrback(
            lambda f: log.failure("ledger: cannot read the spool {path}", f, path=self.spool)
        )

    def stop(self) -> Deferred[None]:
        """
        Stop sending (an unanswered POST is abandoned: its records are re-sent
        on the next start) and fire once every record taken is in the spool.
        """
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._request is not None:
            self._request.cancel()
        d = self._batcher.drain()
        d.addCallback(lambda _: self._run.idle())
        return d

    # Shipping: one batch in flight at a time.

    def _kick(self) -> None:
        self._again = True
        if self._shipping or self._stopped or not self._started:
            return
        self._shipping = True
        self._next()

    def _next(self) -> None:
        self._retry = None
        if self._stopped:
            self._shipping = False
            return
        self._again = False
        self._run(_nextBatch, self.spool, self._offset, self._batchSize).addCallbacks(
            self._gotBatch, self._spoolFailed
        )

    def _spoolFailed(self, failure: Failure) -> None:
        log.failure("ledger: cannot read the spool {path}", failure, path=self.spool)
        self._later()

    def _gotBatch(self, batch: tuple[list[bytes], list[bytes], int]) -> None:
        records, bad, offset = batch
        if bad:
            log.error(
                "ledger: {n} unreadable lines in the spool {path}, moved to {path}.rejected",
                n=len(bad),
                path=self.spool,
            )
            self._run(_appendLines, self.spool + ".rejected", bad)
        if not records:
            self._offset = offset
            if self._stopped:
                self._shipping = False
            elif bad or self._again:
                self._next()
            else:
                self._shipping = False
            return
        if self._stopped:
            self._shipping = False
            return
        body = b'{"transactions":[' + b",".join(records) + b"]}"
        self._request = Deferred.fromCoroutine(self._post(body))
        self._request.addTimeout(self._timeout, self._clock)
        self._request.addBoth(self._posted, records, offset)

    async def _post(self, body: bytes) -> tuple[int, bytes]:
        import treq

        response = await self._http.post(self.url, data=body, headers=self._headers)
        content = await treq.content(response)
        return response.code, content

    def _posted(self, result: Any, records: list[bytes], offset: int) -> None:
        self._request = None
        if isinstance(result, Failure):
            if self._stopped:
                self._shipping = False
                return
            self._failed(len(records), webReason(result.value))
            return
        code, content = result
        if code == 200:
            try:
                answer = json.loads(content)
                recorded = answer["recorded"]
                duplicates = answer.get("duplicates", 0)
                if not isinstance(recorded, int):
                    raise TypeError
            except (ValueError, TypeError, KeyError):
                self._failed(len(records), "HTTP 200 without a {\"recorded\": N} answer")
                return
            log.debug(
                "ledger: {n} records sent ({recorded} recorded, {duplicates} duplicates)",
                n=len(records),
                recorded=recorded,
                duplicates=duplicates,
            )
            self._confirmed(offset)
        elif code == 400:
            log.error(
                "ledger: {url} refused a batch of {n} records as malformed (HTTP 400); "
                "moved to {path}.rejected",
                url=self._safeURL,
                n=len(records),
                path=self.spool,
            )
            self._run(_appendLines, self.spool + ".rejected", [r + b"\n" for r in records])
            self._confirmed(offset)
        else:
            self._failed(len(records), f"HTTP status {code}")

    def _confirmed(self, offset: int) -> None:
        self._failures = 0
        self._offset = offset
        d = self._run(_writeOffset, self.spool, offset)
        d.addErrback(
            lambda f: log.failure("ledger: cannot write {path}.sent", f, path=self.spool)
        )
        # The next batch is read after the offset is written (serial runner).
        self._next()

    def _failed(self, n: int, why: str) -> None:
        log.warn(
            "ledger: sending {n} records to {url} failed ({why}); retrying in {delay:g} s",
            n=n,
            url=self._safeURL,
            why=why,
            delay=_backoff(self._failures),
        )
        self._later()

    def _later(self) -> None:
        if self._stopped:
            self._shipping = False
            return
        delay = _backoff(self._failures)
        self._failures += 1
        self._retry = self._clock.callLater(delay, self._next)


def ledgerTarget(settings: Any) -> str:
    """
    What C{settings.ledger} names, C{exchange} resolved: the joined
    exchange's C{/v1/ledger}, or C{none} for a farm that joins none.
    """
    if settings.ledger != "exchange":
        return str(settings.ledger)
    if settings.exchange == "none":
        return "none"
    return str(settings.exchange).rstrip("/") + "/v1/ledger"


def ledgerFromSettings(
    settings: Any,
    clock: IReactorTime,
    runner: Runner,
    httpClient: Any = None,
) -> Sink:
    """
    The sink C{settings.ledger} names: C{"none"}, an http(s) URL (spooled
    at C{settings.ledger_spool}, sent with C{settings.api_key}), or the path
    of a JSON-lines file.
    """
    spec = ledgerTarget(settings)
    if spec == "none":
        return NoLedger()
    if spec.lower().startswith(("http://", "https://")):
        if httpClient is None:
            import treq

            httpClient = treq
        return HTTPLedger(spec, settings.api_key, settings.ledger_spool, clock, runner, httpClient)
    return JsonLinesLedger(spec, clock, runner)
