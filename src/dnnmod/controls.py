"""Names of the random controls, shared by the approaches and the report (no torch).

Each approach A has one random control, ``random_<A>`` (:mod:`dnnmod.approaches.random_kernels`):
A's modules with their kernels drawn at random, as many per class and per group as A keeps.
"""

from __future__ import annotations

#: name prefix of every control: ``random_<approach>``
CONTROL_PREFIX = "random_"


def control_name(approach: str) -> str:
    """The name of ``approach``'s random control."""
    return f"{CONTROL_PREFIX}{approach}"


def control_of(name: str) -> str | None:
    """The approach a control named ``name`` matches; None for a name that is no control."""
    return name[len(CONTROL_PREFIX) :] if name.startswith(CONTROL_PREFIX) else None
