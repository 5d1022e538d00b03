"""
What tests share for waiting on the real reactor: L{until} polls a
condition (plain or async) without blocking the reactor, and fails loudly
when it does not come true in time; L{recorded} keeps the protocols a
listening factory builds.
"""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable

from twisted.internet import reactor
from twisted.internet.task import deferLater


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    what: str,
    timeout: float = 30.0,
    every: float = 0.05,
) -> float:
    """
    Wait until C{condition()} holds (awaiting it if it is async).

    @return: the seconds it took.
    @raise AssertionError: it did not hold within C{timeout} seconds.
    """
    started = reactor.seconds()
    while True:
        held: Any = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return reactor.seconds() - started
        if reactor.seconds() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await deferLater(reactor, every, lambda: None)


async def sleep(seconds: float) -> None:
    """
    Let C{seconds} pass on the reactor (for load to run, not to wait for a
    condition: use L{until} for that).
    """
    await deferLater(reactor, seconds, lambda: None)


def recorded(factory: Any, made: list[Any]) -> Any:
    """
    C{factory}, appending each protocol it builds to C{made}.
    """
    build = factory.buildProtocol

    def buildProtocol(addr: Any) -> Any:
        protocol = build(addr)
        made.append(protocol)
        return protocol

    factory.buildProtocol = buildProtocol
    return factory
