"""Embedding lookups: a gather of float rows from a parameter table by integer ids that depend
on the explained input (`Flow.is_lookup`) is a *tap*. Relevance starts there; what arrives at its
output is read off (through zeros added to it, whose cotangent is that relevance) and summed
over the features: one value per token."""

from __future__ import annotations

import dataclasses

from jaxlrp._execute import Run, read
from jaxlrp._ops.base import Step, source
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
    if not planner.flow.is_lookup(node):
        return False
    taps = [s for s in planner.steps.values() if isinstance(s, TapStep)]
    planner.steps[node] = TapStep(node, len(taps))
    return True
