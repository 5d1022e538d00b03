"""
Automat machines that look their transitions up in a dict.

Automat finds the transition for an input by scanning every transition of
the machine and comparing (state, input) pairs, where states are
dataclasses: about 6 us an input for a job's machine of 31 transitions, the
single largest cost of relaying a small job (bench/farm_relay.py
--profile-farm). L{build} builds a machine as Automat does and gives its
automaton a dict of the same transitions; what it answers is unchanged,
unknown inputs included (Automat still says so). The dict is keyed by each
state object's identity: a machine only ever holds the states its builder
made, and hashing one (a frozen dataclass: Python code) cost as much as the
lookup itself.

Each input of such a machine then runs its transition straight from that
dict: the state changes and the outputs are called, in order, with what
Automat would give them. An input that comes while another is being
handled waits until that one is done, as in Automat, and then runs the
same way. Whatever Automat does beyond that, it still does itself: a traced
machine, an input the state has no transition for, outputs of data states,
and the error for an input that must return a value given while another
is handled. Automat's own path cost about 1.5 us an input, five inputs a
relayed job; this one a third of that.
"""

from __future__ import annotations

from typing import Any, Callable

from automat import TypeMachineBuilder
from automat._runtimeproto import _liveSignature
from automat._typed import MethodOutput


def build(builder: TypeMachineBuilder[Any, Any]) -> Any:
    """
    C{builder.build()}, with transitions looked up in a dict, and inputs
    that run them from it.
    """
    machine = builder.build()
    automaton = machine.__automat_automaton__
    table = {
        (id(inState), inputSymbol): (outState, tuple(outputs))
        for inState, inputSymbol, outState, outputs in automaton.allTransitions()
    }
    # The states stay alive with the machine, so their ids stay theirs.
    scan = automaton.outputForInput

    def outputForInput(inState: Any, inputSymbol: Any) -> tuple[Any, Any]:
        found = table.get((id(inState), inputSymbol))
        return scan(inState, inputSymbol) if found is None else found

    automaton.outputForInput = outputForInput
    # The transitions whose outputs are all plain methods, as the methods.
    direct = {
        key: (outState, tuple(output.method for output in outputs))
        for key, (outState, outputs) in table.items()
        if all(type(output) is MethodOutput and not output.requiresData for output in outputs)
    }
    implementer = machine.__automat_type__
    for name in {inputSymbol for _, inputSymbol in table}:
        returnsNone = (
            _liveSignature(getattr(builder.inputProtocol, name)).return_annotation is None
        )
        setattr(
            implementer,
            name,
            _directInput(name, getattr(implementer, name), direct, returnsNone),
        )
    return machine


def _directInput(
    name: str, automats: Callable[..., Any], direct: dict[Any, Any], returnsNone: bool
) -> Any:
    """
    The input C{name}, run from C{direct} when it can be, else by Automat's
    own implementation, C{automats}. C{returnsNone}: whether the input's
    declared result is None (only such inputs may wait their turn).
    """

    def input(self: Any, *args: Any, **kwargs: Any) -> Any:
        postponed = self.__automat_postponed__
        if postponed is not None and returnsNone:
            # Given by an output: it runs once the outputs are done, as
            # Automat would run it, but by this same path.
            postponed.append(lambda: input(self, *args, **kwargs))
            return None
        transitioner = self.__automat_transitioner__
        if postponed is not None or transitioner._tracer is not None:
            return automats(self, *args, **kwargs)
        found = direct.get((id(transitioner._state), name))
        if found is None:
            return automats(self, *args, **kwargs)
        transitioner._state, methods = found
        core = self.__automat_core__
        # Inputs that the outputs give wait until they are all done.
        postponed = self.__automat_postponed__ = []
        result = None
        try:
            for method in methods:
                result = method(self, core, *args, **kwargs)
        finally:
            self.__automat_postponed__ = None
        while postponed:
            postponed.pop(0)()
        return result

    input.__name__ = input.__qualname__ = name
    return input


class Transitions:
    """
    A machine's transitions written several states at a time
    (C{@transitions.on([a, b], Events.input, to)}), and, for a machine
    whose peer may send anything at any time, every pair not written made
    to do nothing (L{ignoreTheRest}): each is then either handled or
    ignored on purpose, never an Automat error on a live connection.
    """

    def __init__(self) -> None:
        self._written: set[tuple[str, str]] = set()

    def on(
        self, states: list[Any], input: Callable[..., None], to: Any = None
    ) -> Callable[[Any], Any]:
        """
        Register the decorated output for C{input} in each of C{states},
        going C{to} a state (or staying, without one).
        """

        def register(output: Any) -> Any:
            for state in states:
                registrar = state.upon(input)
                (registrar.loop() if to is None else registrar.to(to))(output)
                self._written.add((state.name, input.__name__))
            return output

        return register

    def ignoreTheRest(
        self, states: list[Any], inputs: list[Callable[..., None]], ignore: Any
    ) -> None:
        """
        Every (state, input) not registered with L{on} stays put, doing
        C{ignore}.
        """
        for state in states:
            for input in inputs:
                if (state.name, input.__name__) not in self._written:
                    state.upon(input).loop()(ignore)
