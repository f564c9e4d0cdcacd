"""Embedding lookups: a gather of float rows from a parameter table by integer ids that depend
on the explained input (`Flow.is_lookup`) is a *tap*. Relevance starts there; what arrives at its
output is read off (through zeros added to it, whose cotangent is that relevance) and summed
over the features: one value per token."""

from __future__ import annotations

import dataclasses

from jaxlrp._analysis import is_lookup
from jaxlrp._execute import Run, read
from jaxlrp._ops.base import Step, UnsupportedOperation, source
from jaxlrp._program import Node, Value


@dataclasses.dataclass(eq=False)
class TapStep(Step):
    node: Node
    index: int  # which of the plan's taps

    @property
    def output(self) -> Value:
        return self.node.outputs[0]

    def run(self, env: dict, run: Run) -> None:
        (out,) = self.node.bind(*(read(env, a) for a in self.node.inputs))
        env[self.output] = out if run.taps is None else out + run.taps[self.index]


@source
def _tap(planner, node: Node) -> bool:
    if node.body is not None:
        check_no_lookup_inside(planner, node)
        return False
    if not planner.flow.is_lookup(node):
        return False
    taps = [s for s in planner.steps.values() if isinstance(s, TapStep)]
    planner.steps[node] = TapStep(node, len(taps))
    return True


def check_no_lookup_inside(planner, node: Node) -> None:
    """An error when `node`'s body (a scan's) looks up ids computed from the input: relevance
    would start there, and the taps that read it are not carried into bodies."""
    active = {b for a, b in zip(node.inputs, node.body.inputs) if planner.flow.is_active(a)}
    for inner in node.body.nodes:
        if any(isinstance(a, Value) and a in active for a in inner.inputs):
            if is_lookup(inner, lambda a: isinstance(a, Value) and a in active):
                raise UnsupportedOperation(
                    f"jaxlrp: {planner.where(node)} looks up ids of the explained input inside a `{node.name}` "
                    f"body (an embedding lookup per step). Look the ids up before the loop (embed the whole "
                    f"sequence, then scan over the embeddings): relevance is read at the lookup's output."
                )
            active.update(inner.outputs)
