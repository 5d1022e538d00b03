"""
Pure scheduling for one service of a farm: which idle producer gets which job.

No I/O and no clock of its own: every call that depends on time takes C{now}.
Producers and jobs are opaque, hashable handles.

Rules:
  - A job goes to the idle producer that serves its model and language and
    has been idle longest (least recently used), so work spreads evenly.
  - With no idle capable producer the job waits in a FIFO queue until its
    deadline; a producer that becomes idle takes the oldest job it can serve.
  - A job that no connected producer could ever serve is refused at once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Iterable

from privox.messages import ANY, SEAL


class NoProducer(Exception):
    """
    No connected producer serves this model and language.
    """


@dataclass(frozen=True, slots=True)
class Capability:
    models: frozenset[str]
    languages: frozenset[str]
    #: What the producer can do beyond the plain job: C{seal} (it offered
    #: to, docs/privacy.rst), C{translate}. A job that needs one goes only
    #: to producers that have it.
    features: frozenset[str] = frozenset()

    @classmethod
    def of(
        cls, models: Iterable[str], languages: Iterable[str], features: Iterable[str] = ()
    ) -> Capability:
        return cls(frozenset(models), frozenset(languages), frozenset(features))

    @property
    def seals(self) -> bool:
        return SEAL in self.features

    def takes(self, language: str | None, needs: frozenset[str]) -> bool:
        return self.speaks(language) and needs <= self.features

    def speaks(self, language: str | None) -> bool:
        # An empty list or "*" means any language; a job without a language
        # can go to anyone.
        return (
            language is None
            or not self.languages
            or ANY in self.languages
            or language in self.languages
        )

    def serves(self, model: str, language: str | None, needs: frozenset[str] = frozenset()) -> bool:
        return (model in self.models or ANY in self.models) and self.takes(language, needs)


@dataclass(slots=True)
class _Waiting:
    model: str
    language: str | None
    deadline: float
    needs: frozenset[str]


class Dispatcher:
    def __init__(self, queueTimeout: float) -> None:
        self.queueTimeout = queueTimeout
        self._capabilities: dict[Hashable, Capability] = {}
        # Model name (or "*") -> every connected producer advertising it.
        self._byModel: dict[str, set[Hashable]] = {}
        # Model name (or "*") -> idle producers, oldest idle first.
        self._idle: dict[str, OrderedDict[Hashable, float]] = {}
        self._idleSince: dict[Hashable, float] = {}
        # Deadlines grow with insertion order, so the head expires first.
        self._queue: OrderedDict[Hashable, _Waiting] = OrderedDict()

    # Producers

    def addProducer(
        self, producer: Hashable, capability: Capability, now: float
    ) -> Hashable | None:
        """
        A producer has joined. It is idle unless a queued job it can serve
        is waiting; that job is returned and the producer is now busy with it.
        """
        if producer in self._capabilities:
            raise ValueError(f"producer {producer!r} already added")
        self._capabilities[producer] = capability
        for model in capability.models:
            self._byModel.setdefault(model, set()).add(producer)
        return self.release(producer, now)

    def removeProducer(self, producer: Hashable) -> None:
        """
        A producer has gone, idle or busy. Its running job is the caller's
        to fail; queued jobs keep waiting for someone else.
        """
        self._unidle(producer)
        capability = self._capabilities.pop(producer)
        for model in capability.models:
            members = self._byModel[model]
            members.discard(producer)
            if not members:
                del self._byModel[model]

    def release(self, producer: Hashable, now: float) -> Hashable | None:
        """
        A producer has finished its job. Returns the oldest queued job it can
        serve (the producer stays busy with it), or L{None} (it is idle).
        """
        capability = self._capabilities[producer]
        for job, waiting in self._queue.items():
            if capability.serves(waiting.model, waiting.language, waiting.needs):
                del self._queue[job]
                return job
        self._idleSince[producer] = now
        for model in capability.models:
            self._idle.setdefault(model, OrderedDict())[producer] = now
        return None

    def _unidle(self, producer: Hashable) -> None:
        if self._idleSince.pop(producer, None) is None:
            return
        for model in self._capabilities[producer].models:
            idle = self._idle[model]
            del idle[producer]
            if not idle:
                del self._idle[model]

    # Jobs

    def models(self, language: str | None) -> list[str]:
        """
        The models connected producers serve in C{language}, those that
        came first first (a producer serving any model names none).
        """
        return [
            model
            for model, producers in self._byModel.items()
            if model != ANY and any(self._capabilities[p].speaks(language) for p in producers)
        ]

    def canServe(
        self, model: str, language: str | None, needs: frozenset[str] = frozenset()
    ) -> bool:
        for key in (model, ANY):
            for producer in self._byModel.get(key, ()):
                if self._capabilities[producer].takes(language, needs):
                    return True
        return False

    def submit(
        self,
        job: Hashable,
        model: str,
        language: str | None,
        now: float,
        needs: frozenset[str] = frozenset(),
    ) -> Hashable | None:
        """
        Returns the producer the job is assigned to, now busy; or L{None} if
        the job was queued until C{now + queueTimeout}. A job that C{needs}
        features (C{seal}, C{translate}) goes only to a producer with them.

        @raise NoProducer: no connected producer could ever serve it.
        """
        producer = self.take(model, language, needs)
        if producer is None:
            self.enqueue(job, model, language, now, needs)
        return producer

    def take(self, model: str, language: str | None, needs: frozenset[str]) -> Hashable | None:
        """
        The idle producer that would take such a job, now busy; L{None} if
        none is idle.
        """
        producer = self._longestIdle(model, language, needs)
        if producer is not None:
            self._unidle(producer)
        return producer

    def takeThis(
        self, producer: Hashable, model: str, language: str | None, needs: frozenset[str]
    ) -> bool:
        """
        Whether C{producer} is idle and takes such a job; it is then busy.
        """
        if producer not in self._idleSince:
            return False
        if not self._capabilities[producer].serves(model, language, needs):
            return False
        self._unidle(producer)
        return True

    def enqueue(
        self,
        job: Hashable,
        model: str,
        language: str | None,
        now: float,
        needs: frozenset[str] = frozenset(),
    ) -> None:
        """
        Queue a job no idle producer could take, until C{now + queueTimeout}.

        @raise NoProducer: no connected producer could ever serve it.
        """
        if not self.canServe(model, language, needs):
            raise NoProducer(model, language)
        self._queue[job] = _Waiting(model, language, now + self.queueTimeout, needs)

    def _longestIdle(
        self, model: str, language: str | None, needs: frozenset[str]
    ) -> Hashable | None:
        best = None
        bestSince = None
        for key in (model, ANY):
            for producer, since in self._idle.get(key, {}).items():
                if bestSince is not None and since >= bestSince:
                    break
                if self._capabilities[producer].takes(language, needs):
                    best, bestSince = producer, since
                    break
        return best

    def withdraw(self, job: Hashable) -> bool:
        """
        Take a queued job out of the queue (its consumer went away).
        """
        return self._queue.pop(job, None) is not None

    def expire(self, now: float) -> list[Hashable]:
        """
        Remove and return the queued jobs whose deadline has passed.
        """
        expired = []
        while self._queue:
            job, waiting = next(iter(self._queue.items()))
            if waiting.deadline > now:
                break
            del self._queue[job]
            expired.append(job)
        return expired

    def nextDeadline(self) -> float | None:
        for waiting in self._queue.values():
            return waiting.deadline
        return None

    def drain(self) -> list[Hashable]:
        """
        Remove and return every queued job (the farm is shutting down).
        """
        jobs = list(self._queue)
        self._queue.clear()
        return jobs

    # Figures for stats lines and tests

    def queueDepth(self) -> int:
        return len(self._queue)

    def producerCount(self) -> int:
        return len(self._capabilities)

    def advertises(self, model: str) -> bool:
        """
        Whether a connected producer names C{model} in its HELO.
        """
        return model in self._byModel

    def isIdle(self, producer: Hashable) -> bool:
        return producer in self._idleSince

    def sealingByModel(self) -> dict[str, int]:
        """
        Model name -> connected producers that seal (docs/privacy.rst).
        """
        return {
            model: sum(1 for p in members if self._capabilities[p].seals)
            for model, members in sorted(self._byModel.items())
        }

    def producersByModel(self) -> dict[str, tuple[int, int]]:
        """
        Model name -> (connected producers, idle producers).
        """
        return {
            model: (len(members), len(self._idle.get(model, ())))
            for model, members in sorted(self._byModel.items())
        }
