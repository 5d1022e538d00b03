"""
privox.automata: machines built with dict lookups and direct inputs answer
as Automat's own do.
"""

from __future__ import annotations

from typing import Protocol

from automat import NoTransition, TypeMachineBuilder
from twisted.trial.unittest import SynchronousTestCase

from privox.automata import build


class Inputs(Protocol):
    def go(self, n: int) -> None: ...
    def back(self) -> None: ...
    def both(self) -> None: ...
    def ask(self) -> int: ...
    def askWithin(self) -> None: ...


class Core:
    def __init__(self) -> None:
        self.log: list[object] = []
        self.machine: Inputs | None = None


def machineFactories() -> list[tuple[str, object]]:
    """
    The same machine twice: as Automat builds it, and as L{build} does.
    """
    made = []
    for name, finish in (("automat", lambda b: b.build()), ("privox", build)):
        builder = TypeMachineBuilder(Inputs, Core)
        idle = builder.state("idle")
        busy = builder.state("busy")

        @idle.upon(Inputs.go).to(busy)
        def first(inputs: Inputs, core: Core, n: int) -> None:
            core.log.append(("first", n))

        @busy.upon(Inputs.back).to(idle)
        def back(inputs: Inputs, core: Core) -> None:
            core.log.append("back")

        @busy.upon(Inputs.both).to(idle)
        def both(inputs: Inputs, core: Core) -> None:
            # An input from an output runs once this one is done.
            core.log.append("both: start")
            inputs.go(7)
            core.log.append("both: end")

        @idle.upon(Inputs.ask).loop()
        @busy.upon(Inputs.ask).loop()
        def ask(inputs: Inputs, core: Core) -> int:
            core.log.append("ask")
            return len(core.log)

        @busy.upon(Inputs.askWithin).loop()
        def askWithin(inputs: Inputs, core: Core) -> None:
            # An input that must return a value cannot wait its turn.
            inputs.ask()

        made.append((name, finish(builder)))
    return made


class BuildTests(SynchronousTestCase):
    def run_(self, script: list[tuple[str, tuple[object, ...]]]) -> dict[str, list[object]]:
        logs = {}
        for name, factory in machineFactories():
            core = Core()
            machine = factory(core)  # type: ignore[operator]
            for inputName, args in script:
                try:
                    result = getattr(machine, inputName)(*args)
                except NoTransition:
                    core.log.append(("no transition", inputName))
                else:
                    core.log.append(("returned", result))
            logs[name] = core.log
        return logs

    def test_sameAsAutomat(self) -> None:
        """
        Outputs with their arguments, return values, postponed
        inputs, and inputs a state has no transition for, as Automat's own.
        """
        logs = self.run_(
            [("go", (1,)), ("go", (2,)), ("ask", ()), ("both", ()), ("back", ()),
             ("back", ()), ("go", (3,))]
        )
        self.assertEqual(logs["privox"], logs["automat"])
        self.assertEqual(
            logs["privox"][:4],
            [("first", 1), ("returned", None), ("no transition", "go"), "ask"],
        )
        self.assertIn("both: end", logs["privox"])
        self.assertEqual(
            logs["privox"][logs["privox"].index("both: end") + 1], ("first", 7)
        )

    def test_failingOutput(self) -> None:
        """
        An output that raises leaves the machine in its new state, and the
        next input is handled.
        """
        for name, factory in machineFactories():
            core = Core()
            machine = factory(core)  # type: ignore[operator]
            core.log = None  # type: ignore[assignment]
            self.assertRaises(AttributeError, machine.go, 1)
            core.log = []
            machine.back()
            self.assertEqual(core.log, ["back"], name)

    def test_traced(self) -> None:
        """
        A traced machine is traced.
        """
        [(_, _), (_, factory)] = machineFactories()
        core = Core()
        machine = factory(core)  # type: ignore[operator]
        seen = []
        machine.__automat_transitioner__.setTrace(  # type: ignore[attr-defined]
            lambda old, input, new: seen.append((old.name, input, new.name))
        )
        machine.go(1)
        machine.back()
        self.assertEqual(seen, [("idle", "go", "busy"), ("busy", "back", "idle")])

    def test_inputsRunDirectly(self) -> None:
        """
        The machine L{build} gives runs its inputs itself, not through
        Automat's implementation.
        """
        [(_, automats), (_, ours)] = machineFactories()
        self.assertIn("implementation", type(automats(Core())).go.__qualname__)  # type: ignore[operator]
        self.assertEqual(type(ours(Core())).go.__qualname__, "go")  # type: ignore[operator]

    def test_postponedRunDirectly(self) -> None:
        """
        An input given by an output runs after it by the same direct path,
        not through Automat's transition lookup.
        """
        [(_, _), (_, factory)] = machineFactories()
        core = Core()
        machine = factory(core)  # type: ignore[operator]
        transitioner = machine.__automat_transitioner__  # type: ignore[attr-defined]
        looked: list[str] = []
        transition = transitioner.transition
        transitioner.transition = lambda input: looked.append(input) or transition(input)
        machine.go(1)
        machine.both()
        self.assertEqual(core.log, [("first", 1), "both: start", "both: end", ("first", 7)])
        self.assertEqual(looked, [])

    def test_postponedMustReturnNothing(self) -> None:
        """
        An input that returns a value, given by an output, is refused as
        Automat refuses it.
        """
        for name, factory in machineFactories():
            machine = factory(Core())  # type: ignore[operator]
            machine.go(1)
            error = self.assertRaises(RuntimeError, machine.askWithin)
            self.assertIn("reentrantly", str(error), name)
