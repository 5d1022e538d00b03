"""
How a peer joins a farm, as one state machine for PVX/2 and PVX/1 alike:

    greeting ──first frame byte──▶ hello ──HELO──▶ authenticating ──key good──▶ active
        │                                              ▲    │
        └──────────PVX/1 type byte and key─────────────┘    └──key refused──▶ closed

and from any state, the connection closing: C{closed}. The farm sends C{who}
on accept (greeting). A PVX/2 peer then says C{HELO}; a PVX/1 peer a type
byte and a 16-character key. Either way the key is checked (which may take
time: an HTTP validation), and the peer is let in or refused. A check that
ends after the peer left changes nothing.

The machine decides; the connection (L{HandshakeCore}) acts: checks keys,
lets peers in, refuses them. L{Phase} is where the machine is, for whoever
asks (the connection's frame handling, relays, tests).
"""

from __future__ import annotations

import enum
from typing import Protocol

from automat import TypeMachineBuilder

from privox.automata import build


class Phase(enum.Enum):
    GREETING = "greeting"  # "who" sent, nothing received yet
    HELLO = "hello"  # PVX/2: waiting for HELO
    AUTHENTICATING = "authenticating"  # the key check is running
    ACTIVE = "active"  # let in: bytes go to the session
    CLOSED = "closed"


class HandshakeCore(Protocol):
    phase: Phase

    def checkKey(self, role: str, key: str) -> None:
        "Run the key policy of C{role}; answer with accepted or refused."

    def letIn(self) -> None:
        "The key is good: OKAY (PVX/2) and a session for the peer's role."

    def refuse(self, code: str, message: str) -> None:
        "Tell the peer no (DENY, or PVX/1's nak) and close."


class Handshake(Protocol):
    def framing(self) -> None:
        "The peer's first byte starts a PVX/2 frame."

    def introduced(self, role: str, key: str) -> None:
        "A valid HELO (PVX/2), or a PVX/1 type byte and key."

    def accepted(self) -> None:
        "The key check said yes."

    def refused(self, code: str, message: str) -> None:
        "The key check said no, or the farm is stopping."

    def closed(self) -> None:
        "The connection is closing, whoever decided it."


builder = TypeMachineBuilder(Handshake, HandshakeCore)
greeting = builder.state("greeting")
hello = builder.state("hello")
authenticating = builder.state("authenticating")
active = builder.state("active")
closed = builder.state("closed")


@greeting.upon(Handshake.framing).to(hello)
def _framing(machine: Handshake, core: HandshakeCore) -> None:
    core.phase = Phase.HELLO


@greeting.upon(Handshake.introduced).to(authenticating)
@hello.upon(Handshake.introduced).to(authenticating)
def _introduced(machine: Handshake, core: HandshakeCore, role: str, key: str) -> None:
    core.phase = Phase.AUTHENTICATING
    core.checkKey(role, key)


@authenticating.upon(Handshake.accepted).to(active)
def _accepted(machine: Handshake, core: HandshakeCore) -> None:
    core.phase = Phase.ACTIVE
    core.letIn()


@authenticating.upon(Handshake.refused).to(closed)
def _refused(machine: Handshake, core: HandshakeCore, code: str, message: str) -> None:
    core.refuse(code, message)  # (closing sets the phase)


@greeting.upon(Handshake.closed).to(closed)
@hello.upon(Handshake.closed).to(closed)
@authenticating.upon(Handshake.closed).to(closed)
@active.upon(Handshake.closed).to(closed)
def _closed(machine: Handshake, core: HandshakeCore) -> None:
    core.phase = Phase.CLOSED


@closed.upon(Handshake.closed).loop()
def _alreadyClosed(machine: Handshake, core: HandshakeCore) -> None:
    pass


@closed.upon(Handshake.accepted).loop()
def _lateYes(machine: Handshake, core: HandshakeCore) -> None:
    # The peer left while its key was being checked.
    pass


@closed.upon(Handshake.refused).loop()
def _lateNo(machine: Handshake, core: HandshakeCore, code: str, message: str) -> None:
    pass


HandshakeMachine = build(builder)


def newHandshake(core: HandshakeCore) -> Handshake:
    core.phase = Phase.GREETING
    return HandshakeMachine(core)  # type: ignore[no-any-return]
