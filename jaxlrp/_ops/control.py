"""Control flow: a `scan` gets a plan of its own for its body, made with the same
configuration (CP-LRP's hold, the names, `describe`) and run inside `lax.scan`."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from jax import lax

from jaxlrp import _internals
from jaxlrp._execute import Run, read, run as run_plan
from jaxlrp._ops.base import Step, classifier
from jaxlrp._ops.embeddings import check_no_lookup_inside
from jaxlrp._program import Node

if TYPE_CHECKING:
    from jaxlrp._plan import Plan


@dataclasses.dataclass(eq=False)
class ScanStep(Step):
    node: Node
    body: Plan

    def run(self, env: dict, run: Run) -> None:
        node = self.node
        layout = _internals.scan_layout(node.params)
        n_consts, n_carry = layout.num_consts, layout.num_carry
        args = [read(env, a) for a in node.inputs]
        consts, init, xs = args[:n_consts], args[n_consts : n_consts + n_carry], args[n_consts + n_carry :]

        def body(carry, x):
            outs = run_plan(self.body, run.rules, [*consts, *carry, *x])
            return outs[:n_carry], outs[n_carry:]

        carry, ys = lax.scan(body, init, xs, length=layout.length, reverse=layout.reverse, unroll=layout.unroll)
        env.update(zip(node.outputs, [*carry, *ys]))


@classifier("scan", order=0)
def _scan(planner, node: Node, relevant) -> bool:
    check_no_lookup_inside(planner, node)
    planner.steps[node] = ScanStep(node, planner.body_plan(node))
    return True
