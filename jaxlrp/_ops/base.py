"""The tables that say what jaxlrp knows of each operation, and what every step has.

Like JAX's own per-primitive rule tables (`ad.primitive_jvps[p]`), what the planner knows of a
primitive is entries keyed by its name. Each operation family (a module of `jaxlrp._ops`)
registers, at import time:

* *recognizers*, run once before classification, in their order: they claim groups of nodes
  that form one operation however it is spelled (a softmax, a LayerNorm's centering) or hold
  operands constant (a statistic, CP-LRP's attention);
* *classifiers* by primitive name, or for any node: tried for each node that relevance reaches,
  in their order; the first that claims the node decides its step. The orders name the
  precedence that the algebra asks for: a held operand makes a product linear (`HELD`) before
  a learned operand makes a shift affine (`LEARNED`) before a value joins an elementwise region
  (`REGION`), and only then is an op of two activations a joint map (`JOINT`);
* *sources*, for nodes that take no relevance in but start it (an embedding lookup);
* *finishers*, run after every node is classified (the Pass steps of elementwise regions).

`jaxlrp.extend` adds to the same tables.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from typing import Any

class UnsupportedOperation(ValueError):
    """The model uses an operation on the explained input that jaxlrp has no rule for."""


HELD, LEARNED, REGION, JOINT, PASSTHROUGH, KERNEL = 10, 20, 30, 40, 50, 60

# A classifier: `claim(planner, node, relevant) -> bool`, True when it planned the node
# (`relevant`: the positions of the node's inputs that carry relevance into it).
Claim = Callable[[Any, Any, tuple[int, ...]], bool]


@dataclasses.dataclass(frozen=True)
class Classifier:
    order: int
    claim: Claim


BY_PRIMITIVE: dict[str, list[Classifier]] = defaultdict(list)
ANY_NODE: list[Classifier] = []
RECOGNIZERS: list[tuple[int, Callable]] = []
FINISHERS: list[Callable] = []
# Claims for nodes that take no relevance in but may start it (an embedding lookup).
SOURCES: list[Callable] = []


def classifier(*names: str, order: int) -> Callable[[Claim], Claim]:
    """Registers the decorated claim for the primitives `names` (for any node when none)."""

    def register(claim: Claim) -> Claim:
        entry = Classifier(order, claim)
        for name in names:
            BY_PRIMITIVE[name].append(entry)
        if not names:
            ANY_NODE.append(entry)
        return claim

    return register


def recognizer(order: int) -> Callable:
    def register(recognize: Callable) -> Callable:
        RECOGNIZERS.append((order, recognize))
        RECOGNIZERS.sort(key=lambda entry: entry[0])
        return recognize

    return register


def finisher(finish: Callable) -> Callable:
    FINISHERS.append(finish)
    return finish


def source(start: Callable) -> Callable:
    SOURCES.append(start)
    return start


def classifiers(name: str) -> list[Classifier]:
    """The classifiers tried for a node of primitive `name`, in order."""
    return sorted([*BY_PRIMITIVE.get(name, ()), *ANY_NODE], key=lambda c: c.order)


class Step:
    """A step of a plan. `run(env, run)` (`run`: an `_execute.Run`) computes its output(s) from `env` into `env`, with a
    custom VJP that carries relevance. `info` (a `LayerInfo`) makes it a row of the rule table;
    `body` is a plan nested in it (a scan's, a kernel's reference), whose rows are rows too."""

    info = None
    body = None

    def run(self, env: dict, run) -> None:
        raise NotImplementedError

    def inside(self) -> tuple:
        """Values computed inside the step that stand for its output (a layer's output before
        the BatchNorm merged into it): recording at them reads the step's output."""
        return ()
