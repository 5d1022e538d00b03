"""
Automat machines that look their transitions up in a dict.

Automat finds the transition for an input by scanning every transition of
the machine and comparing (state, input) pairs, where states are
dataclasses: about 6 us an input for a job's machine of 31 transitions, the
single largest cost of relaying a small job (bench/farm_relay.py
--profile-farm). L{build} builds a machine as Automat does and gives its
automaton a dict of the same transitions; what it answers is unchanged,
unknown inputs included (Automat still says so).
"""

from __future__ import annotations

from typing import Any

from automat import TypeMachineBuilder


def build(builder: TypeMachineBuilder[Any, Any]) -> Any:
    """
    C{builder.build()}, with transitions looked up in a dict.
    """
    machine = builder.build()
    automaton = machine.__automat_automaton__
    table = {
        (inState, inputSymbol): (outState, tuple(outputs))
        for inState, inputSymbol, outState, outputs in automaton.allTransitions()
    }
    scan = automaton.outputForInput

    def outputForInput(inState: Any, inputSymbol: Any) -> tuple[Any, Any]:
        found = table.get((inState, inputSymbol))
        return scan(inState, inputSymbol) if found is None else found

    automaton.outputForInput = outputForInput
    return machine
