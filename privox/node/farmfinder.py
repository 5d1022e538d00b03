"""
A node that names no farm finds them in its exchange's signed directory
(L{privox.directory}): C{GET EXCHANGE/v1/farms}, checked against the pinned
exchange key (C{--exchange-key}) and its expiry, read again every
L{privox.directory.REFRESH} seconds. A directory that does not check out
is refused, and the node keeps the farms it has.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import treq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from privox.directory import REFRESH, Directory, DirectoryError
from privox.keys import webReason, withoutSecrets
from privox.periodic import Periodic

#: Longest wait for the directory, and the most bytes one may take (about
#: ten times the longest a thousand farms make).
REQUEST_TIMEOUT = 30.0
MAX_BODY = 2_000_000


class FarmFinder(Periodic):
    """
    Reads the directory at C{url} now and every C{refresh} seconds; calls
    C{found} with each good one that lists other farms than the last.
    """

    def __init__(
        self,
        url: str,
        exchange: Ed25519PublicKey | None,
        clock: IReactorTime,
        found: Callable[[Directory], None],
        http: Any = treq,
        refresh: float = REFRESH,
    ) -> None:
        super().__init__(clock, refresh, self.read)
        self.target = url.rstrip("/") + "/v1/farms"
        self.where = withoutSecrets(url)
        self.exchange = exchange
        self.found = found
        self.http = http
        self.directory: Directory | None = None

    async def read(self) -> None:
        d = Deferred.fromCoroutine(self._get())
        d.addTimeout(REQUEST_TIMEOUT, self.clock)
        try:
            code, body = await d
            if code != 200:
                raise DirectoryError(f"HTTP {code}")
            assert self.exchange is not None  # started once it is known
            directory = Directory.verify(json.loads(body), self.exchange, self.clock.seconds())
        except DirectoryError as e:
            self.say(f"refused the directory of {self.where}: {e}")
            return
        except ValueError:
            self.say(f"refused the directory of {self.where}: not JSON")
            return
        except Exception as e:
            self.say(f"cannot read the directory of {self.where} ({webReason(e)}); trying again")
            return
        before = self.directory
        if before is not None and directory.issued < before.issued:
            # An older one replayed, to undo a change while it is still good.
            self.say(f"refused the directory of {self.where}: older than the one it has")
            return
        self.directory = directory
        self.say(f"the directory of {self.where} lists {len(directory.farms)} farm(s)", warn=False)
        if before is None or before.farms != directory.farms:
            try:
                self.found(directory)
            except Exception:
                self.log.failure("following the directory of {where} failed", where=self.where)

    async def _get(self) -> tuple[int, bytes]:
        response = await self.http.get(self.target)
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            # Read no more than a directory can be: a longer answer is
            # dropped as it comes, not held.
            nonlocal size
            size += len(data)
            if size > MAX_BODY:
                raise DirectoryError(f"the directory is longer than {MAX_BODY} bytes")
            chunks.append(data)

        await treq.collect(response, collect)
        return response.code, b"".join(chunks)
