"""
Farms that join the exchange by themselves (C{POST /v1/farms}), and the
signed directory of them that nodes read (C{GET /v1/farms},
L{privox.directory}).

A volunteer's farm registers with its farm key and the client endpoints
API servers and nodes should dial (C{privox-farm --exchange URL --public
'STT TTS'}), and registers again every L{privox.directory.REFRESH} seconds
while it runs. Before it is listed, the API probes it: the handshake on
each port, then a canary job for a model no producer serves, which a farm
that works refuses at once (C{no_producer}). A listed farm takes the API's
jobs as its configured ones do (L{FarmExchange.join}); it is probed again
on every refresh and dropped when a probe fails or when it stops
registering, and only a new registration, probed again, lists it back.
Reserved (fallback) farms stay in the API's own configuration, out of the
directory.

Several API servers of one exchange share the directory through their
account store (table C{farm_directory}): the one a farm registers with
lists it there, and on every refresh each takes the farms listed there,
probing them itself first, and lets go of those no longer listed. A name
belongs to the farm key that first listed it.

Who runs a farm is not published: the directory holds names and endpoints
only, and the API logs a registering farm's key id, never its key.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable

from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from privox.api.errors import (
    BadInput, Conflict, NotServed, OverQuota, Unavailable, Unprocessable,
)
from privox.api.farmlist import FarmEntry
from privox.api.farms import FarmExchange
from privox.api.farmpool import NotPublic, publicEndpoint
from privox.consumer import ConsumerProtocol, JobFailed
from privox.directory import (
    MAX_FIELD, MAX_NODES, MEMBER, PLAIN_ENDPOINT, REFRESH, Directory, ListedFarm,
    readProducers,
)
from privox.messages import SERVICES, ErrorCode, JobRequest
from privox.periodic import Periodic
from privox.tls import TrustRoot, clientEndpoint

log = Logger()

#: A farm's name: a few plain characters (no control or look-alike ones in
#: logs and pages).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Farm names one farm key may list, and farms the directory holds in all.
NAMES_PER_KEY = 1
MAX_LISTED = 500

#: The model a probe's canary job names: no producer serves it.
CANARY_MODEL = "privox:canary"
#: A farm not heard from in this many refresh periods leaves the directory.
MISSED_REFRESHES = 3
#: Longest a probe of one port may take, its handshake and canary together.
PROBE_TIMEOUT = 10.0
#: Probes of listed farms run at once, at most.
PROBES_AT_ONCE = 8
#: Seconds between two probes a farm key's registrations may ask for.
PROBE_SPACING = 10.0
#: Seconds between two notes of a farm's online nodes in the store.
ONLINE_SPACING = 10.0
#: The largest registration body (its producers' models and online nodes).
REGISTRATION_LIMIT = 64 * 1024
#: A node's fingerprint (privox.identity.fingerprint): 16 base64 characters.
FINGERPRINT = re.compile(r"[A-Za-z0-9_-]{16}")


class ProbeFailed(Exception):
    """
    A farm did not behave as a farm must; the message says how.
    """


#: Probes a farm; fires with its slowest handshake's seconds.
Probe = Callable[[FarmEntry], Awaitable[float]]


def farmProber(reactor: Any, keyFor: Callable[[FarmEntry], str], ca: TrustRoot | None = None,
               timeout: float = PROBE_TIMEOUT, private: bool = False) -> Probe:
    """
    A L{Probe} that dials each of a farm's ports as a consumer naming
    C{keyFor(farm)} (L{privox.api.farms.FarmExchange.keyFor}: the pass a
    farm that joined is shown).

    @param private: farms at private, loopback or link-local addresses may
        join too (a private exchange, tests); else such a farm fails its
        probe, so that registering cannot make the API dial its own network.
    """

    async def probe(entry: FarmEntry) -> float:
        slowest = 0.0
        key = keyFor(entry)
        for service in SERVICES:
            endpoint = entry.endpoint(service)
            if endpoint is not None:
                d = Deferred.fromCoroutine(
                    _probePort(reactor, service, endpoint, key, ca, private)
                )
                d.addTimeout(timeout, reactor)
                try:
                    slowest = max(slowest, await d)
                except ProbeFailed:
                    raise
                except Exception as e:
                    raise ProbeFailed(f"{service} port: {e.__class__.__name__}: {e}") from None
        return slowest

    return probe


async def _probePort(
    reactor: Any, service: str, endpoint: str, key: str, ca: TrustRoot | None, private: bool
) -> float:
    started = reactor.seconds()
    if private:
        dialled = clientEndpoint(reactor, endpoint, ca)
    else:
        # Where the name leads, checked before anything is dialled (no port
        # of the API's own network is tried), and that address dialled.
        try:
            dialled = await publicEndpoint(reactor, endpoint, ca)
        except NotPublic:
            raise ProbeFailed(f"{service} port is not at a public address") from None
    protocol = ConsumerProtocol(service, key)
    await connectProtocol(dialled, protocol)
    try:
        await protocol.ready
        latency = reactor.seconds() - started
        canary = (
            JobRequest("stt", CANARY_MODEL, None, 2, "pcm_s16le", early=True)
            if service == "stt"
            else JobRequest("tts", CANARY_MODEL, None, 0, text="canary")
        )
        try:
            await protocol.submit(canary, b"\0\0" if service == "stt" else b"")
        except JobFailed as e:
            if e.code != ErrorCode.NO_PRODUCER:
                raise ProbeFailed(f"{service} port refused the canary job with {e.code}") from None
        else:
            raise ProbeFailed(f"{service} port answered a job no producer serves")
        return latency
    finally:
        protocol.transport.loseConnection()


@dataclass
class Registered:
    entry: FarmEntry
    #: The farm key's id that registered it.
    account: str
    #: When it last registered.
    seen: float
    #: Its slowest port's handshake, at the last probe (seconds).
    latency: float
    #: Its producers per service and model, as it said when it last
    #: registered (what nodes choose farms by).
    producers: dict[str, dict[str, int]] = field(default_factory=dict)


class FarmDirectory:
    """
    The farms registered with this API, probed and listed.

    @param exchange: where listed farms take jobs.
    @param probe: checks a farm before it is listed, and on every refresh.
    @param signer: signs the directory (the exchange key's private half).
    @param configured: the API's own farms (from its configuration).
    @param store: the account store the exchange's API servers share the
        directory through, if any.
    @param joining: whether farms may register (privox-local lists its
        own farm only).
    """

    def __init__(
        self,
        exchange: FarmExchange,
        probe: Probe,
        clock: IReactorTime,
        signer: Any,
        configured: list[FarmEntry],
        refresh: float = REFRESH,
        store: Any = None,
        joining: bool = True,
    ) -> None:
        self.exchange = exchange
        self.probe = probe
        self.clock = clock
        self.signer = signer
        self.configured = configured
        self.refresh = refresh
        self.store = store
        self.joining = joining
        #: When each farm's online nodes were last noted in the store.
        self._notedAt: dict[str, float] = {}
        self.listed: dict[str, Registered] = {}
        #: When each farm key's last registration was probed.
        self._probedFor: dict[str, float] = {}
        self._limit = DeferredSemaphore(PROBES_AT_ONCE)
        #: Probes the listed farms (and takes the shared ones) now and every
        #: C{refresh} seconds, while it runs: the API's service runs it.
        self.prober = Periodic(clock, refresh, self._reprobe)

    async def register(self, account: str, fields: Any) -> dict[str, Any]:
        """
        A farm's registration (C{POST /v1/farms}): C{{"name", "stt", "tts"}}.

        @raise BadInput: malformed, or an endpoint that cannot be dialled.
        @raise Conflict: the name is another farm's.
        @raise ApiError: the farm did not pass its probe (422).
        @raise NotServed: farms do not join this exchange (privox-local).
        """
        if not self.joining:
            raise NotServed("farms do not join this exchange by themselves")
        entry = replace(_entry(fields), member=account)
        try:
            producers = readProducers(fields.get("producers"))
            nodes = readNodes(fields.get("nodes"))
        except ValueError as e:
            raise BadInput(str(e)) from None
        if any(f.name == entry.name for f in self.configured):
            raise Conflict(f"farm name {entry.name!r} is taken")
        now = self.clock.seconds()
        known = self.listed.get(entry.name)
        if known is not None and known.account != account:
            raise Conflict(f"farm name {entry.name!r} is taken")
        if known is not None and known.entry == entry:
            known.seen, known.producers = now, producers
            await self._share(entry, account, now, producers, nodes)
            return self._answer(entry)
        await self._mayList(entry, account)
        last = self._probedFor.get(account)
        if last is not None and now - last < PROBE_SPACING:
            # Each probe dials out: a key may not have the API dial for it
            # as fast as it likes.
            raise OverQuota("this farm key's farm was probed just now; register again later",
                            retryAfter=int(PROBE_SPACING))
        self._probedFor[account] = now
        try:
            latency = await self.probe(entry)
        except ProbeFailed as e:
            log.info("farm {name} of key {account} failed its probe: {why}",
                     name=entry.name, account=account, why=str(e))
            raise Unprocessable(f"the farm did not pass its probe: {e}") from None
        now = self.clock.seconds()
        await self._share(entry, account, now, producers, nodes)
        self._list(Registered(entry, account, now, latency, producers))
        return self._answer(entry)

    async def _mayList(self, entry: FarmEntry, account: str) -> None:
        """
        Before a probe: one key may hold L{NAMES_PER_KEY} names, an
        endpoint is one farm's, and the directory has room.

        @raise Conflict: it may not.
        @raise Unavailable: the directory is full.
        """
        claims = [(f.entry.name, f.account, f.entry.stt, f.entry.tts) for f in self.listed.values()]
        if self.store is not None:
            claims += [(r["name"], r["account"], r["stt"], r["tts"])
                       for r in await self.store.listedFarms()]
        claims += [(f.name, None, f.stt, f.tts) for f in self.configured]
        others = [c for c in claims if c[0] != entry.name]
        mine = sorted({name for name, owner, _, _ in others if owner == account})
        if len(mine) >= NAMES_PER_KEY:
            raise Conflict(f"this farm key lists farm {mine[0]!r} already")
        held = {e for _, _, stt, tts in others for e in (stt, tts) if e}
        if held & {entry.stt, entry.tts}:
            raise Conflict("another farm lists that endpoint")
        if len({name for name, _, _, _ in others}) >= MAX_LISTED:
            raise Unavailable("the directory of farms is full", retryAfter=3600)

    async def _share(
        self, entry: FarmEntry, account: str, now: float, producers: dict[str, dict[str, int]],
        nodes: list[tuple[str, str, int]],
    ) -> None:
        if self.store is None:
            return
        if not await self.store.listFarm(
            entry.name, entry.stt, entry.tts, account, now, json.dumps(producers)
        ):
            raise Conflict(f"farm name {entry.name!r} is taken")
        # For the account pages' "online now" (no directory names a node),
        # at most every ONLINE_SPACING s however often a farm registers.
        if now - self._notedAt.get(entry.name, -math.inf) >= ONLINE_SPACING:
            self._notedAt[entry.name] = now
            await self.store.noteOnline(entry.name, nodes, now)

    def _list(self, farm: Registered) -> None:
        self.listed[farm.entry.name] = farm
        self.exchange.join(farm.entry)
        log.info("farm {name} of key {account} joined the directory ({ms:.0f} ms handshake)",
                 name=farm.entry.name, account=farm.account, ms=farm.latency * 1000)

    def _answer(self, entry: FarmEntry) -> dict[str, Any]:
        return {"name": entry.name, "listed": True, "refresh_s": self.refresh}

    def drop(self, name: str, why: str, shared: bool = True) -> None:
        """
        Take the farm C{name} out (and out of the shared directory, unless
        it is gone from there already).
        """
        farm = self.listed.pop(name, None)
        if farm is not None:
            self.exchange.leave(name)
            log.info("farm {name} left the directory: {why}", name=name, why=why)
            if shared and self.store is not None:
                # Unless it registered again meanwhile.
                unlisted = self.store.unlistFarm(name, farm.account, farm.seen)
                Deferred.fromCoroutine(unlisted).addErrback(
                    lambda f: log.failure("cannot unlist farm {name}", f, name=name)
                )

    async def _reprobe(self) -> None:
        taken: set[str] = set()
        if self.store is not None:
            try:
                await self.store.unlistStaleFarms(self.clock.seconds() - self._patience)
                taken = await self._sync(await self.store.listedFarms())
            except Exception:
                log.failure("cannot read the shared farm directory")
        now = self.clock.seconds()
        due = []
        for name, farm in [(n, f) for n, f in self.listed.items() if n not in taken]:
            if now - farm.seen > self._patience:
                self.drop(name, "it stopped registering")
            else:
                due.append(farm)
        # At once, a few at a time: a farm that hangs holds up no other.
        await gatherResults([self._limit.run(self._reprobeOne, farm) for farm in due])

    async def _reprobeOne(self, farm: Registered) -> None:
        try:
            farm.latency = await self.probe(farm.entry)
        except ProbeFailed as e:
            if self.listed.get(farm.entry.name) is farm:
                self.drop(farm.entry.name, f"its probe failed ({e})")

    @property
    def _patience(self) -> float:
        return MISSED_REFRESHES * self.refresh

    async def _sync(self, shared: list[dict[str, Any]]) -> set[str]:
        """
        Take the farms another API server listed (once they pass a probe of
        ours), note when each last registered, and let go of those no
        longer listed.

        @return: the names taken now (probed already).
        """
        taken: set[str] = set()
        own = {f.name for f in self.configured}
        byName = {row["name"]: row for row in shared if row["name"] not in own}
        for name in [n for n in self.listed if n not in byName]:
            self.drop(name, "another API server dropped it", shared=False)
        new = []
        for name, row in byName.items():
            farm = self.listed.get(name)
            if farm is not None and (farm.entry.stt, farm.entry.tts, farm.account) == (
                row["stt"], row["tts"], row["account"]
            ):
                if float(row["seen"]) > farm.seen:
                    farm.seen, farm.producers = float(row["seen"]), _storedProducers(row)
            else:
                # New here, moved (another server probed it there), or
                # another farm key's now: passes name the key, so it is
                # probed, and shown them, as that key's.
                new.append(row)

        async def take(row: dict[str, Any]) -> None:
            try:
                entry = FarmEntry(row["name"], row["stt"], row["tts"], member=row["account"])
                latency = await self.probe(entry)
            except (ProbeFailed, ValueError):
                return  # the server it registered with decides whether it stays
            self._list(Registered(entry, row["account"], float(row["seen"]), latency,
                                  _storedProducers(row)))
            taken.add(entry.name)

        await gatherResults([self._limit.run(take, row) for row in new])
        return taken

    def signed(self, now: float) -> dict[str, Any]:
        """
        C{GET /v1/farms}: the API's own primary farms and the listed ones,
        signed.
        """
        farms = [
            ListedFarm(f.name, f.stt, f.tts, member=f.member) for f in self.configured
            # Reserved farms stay private; nodes dial plain endpoints only.
            if not f.fallback and all(
                e is None or PLAIN_ENDPOINT.fullmatch(e) for e in (f.stt, f.tts)
            )
        ] + [
            ListedFarm(r.entry.name, r.entry.stt, r.entry.tts, r.producers, r.account)
            for r in self.listed.values()
        ]
        return Directory.issue(farms, now).signed(self.signer)


def readNodes(value: Any) -> list[tuple[str, str, int]]:
    """
    The nodes a farm says are online (C{[{"node": FINGERPRINT, "account":
    KEYID, "connections": N}]}, L{privox.farm.observe.onlineNodes}); none
    where absent.

    @raise ValueError: malformed.
    """
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_NODES:
        raise ValueError(f"nodes must list at most {MAX_NODES} nodes")
    nodes = []
    for item in value:
        node, account, connections = (
            item.get(k) for k in ("node", "account", "connections")
        ) if isinstance(item, dict) else (None, None, None)
        if not (isinstance(node, str) and FINGERPRINT.fullmatch(node)
                and isinstance(account, str) and MEMBER.fullmatch(account)
                and isinstance(connections, int) and not isinstance(connections, bool)
                and 0 < connections <= 1_000):
            raise ValueError("nodes: each a node's fingerprint, its key id and its connections")
        nodes.append((node, account, connections))
    return nodes


def _storedProducers(row: dict[str, Any]) -> dict[str, dict[str, int]]:
    try:
        return readProducers(json.loads(row.get("producers") or "{}"))
    except ValueError:
        return {}


def _entry(fields: Any) -> FarmEntry:
    if not isinstance(fields, dict):
        raise BadInput("a farm registers with a JSON object: name, stt, tts")
    name = fields.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadInput("name must be 1 to 64 letters, digits, '.', '_' or '-'")
    ports = []
    for service in SERVICES:
        value = fields.get(service)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_FIELD):
            raise BadInput(f"{service} must be a client endpoint string, or null")
        if value is not None and not PLAIN_ENDPOINT.fullmatch(value):
            # Nothing else: another endpoint type or parameter would have
            # the API read its own files or dial its own sockets.
            raise BadInput(
                f"{service} must be tcp:host=HOST:port=PORT or tls:host=HOST:port=PORT"
            )
        ports.append(value or None)
    try:
        return FarmEntry(name, ports[0], ports[1])
    except ValueError as e:
        raise BadInput(str(e)) from None
