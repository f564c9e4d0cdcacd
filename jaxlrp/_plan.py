"""From a flat program to a relevance plan: which nodes form which LRP step.

The planner is a short driver over the tables of `jaxlrp._ops.base`: it analyzes the program
once (`_analysis.Flow`: which values carry relevance, which are learned, statistics, non-negative
values), runs the registered recognizers (a softmax, a LayerNorm's centering, the statistics a
norm holds, CP-LRP's held attention), keeps only what reaches an output, then gives each node
that relevance reaches to its classifiers in order (`jaxlrp._ops`: linear maps, norms,
softmax, products, elementwise regions, selections, embeddings, scans, kernels), and last runs
the finishers. What no classifier claims is an error that names the primitive, the module, and
the registration that teaches it (`jaxlrp.extend`).

Only values whose relevance reaches the output are planned: what feeds a `stop_gradient` alone
(`stop_gradient(softmax(q @ k.T))`) is computed as it is and needs no rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from jaxlrp import _internals, _remat
from jaxlrp._analysis import Flow, analyze, body_flags
from jaxlrp._ops import base  # importing jaxlrp._ops registers the operation families
from jaxlrp._ops.base import UnsupportedOperation
from jaxlrp._ops.embeddings import TapStep
from jaxlrp._program import Atom, Node, Program, Value

Describe = Callable[[str], tuple[str, type | None]]


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """What a plan is made with, passed whole to the plans of scan bodies and kernels:
    `describe(scope)` gives the module path and class of a name stack; `hold` names what LRP
    holds constant: "softmax" (the attention weights, CP-LRP), "selection" (the selection
    parameters of a state-space model, MambaLRP); `remat` the blocks checkpointed beyond the
    model's own regions (`_remat.spec`)."""

    describe: Describe
    hold: frozenset[str] = frozenset()
    remat: _remat.Spec = ()


@dataclasses.dataclass(eq=False)
class Plan:
    program: Program
    steps: dict[Node, base.Step]  # step by the node at whose position it runs
    skipped: set[Node]  # nodes computed inside a step
    explained: tuple[Value, ...] = ()  # the program inputs that are explained (every leaf of x)
    flow: Flow | None = None  # the analysis the plan was made from, for recording and conditions
    regions: dict[Node, tuple[_remat.Region, ...]] = dataclasses.field(default_factory=dict)  # checkpointed

    def region(self, node: Node, depth: int) -> _remat.Region | None:
        """The checkpointed region `node` runs in at nesting `depth`, or None."""
        regions = self.regions.get(node, ())
        return regions[depth] if len(regions) > depth else None

    def table_steps(self) -> list[base.Step]:
        """The steps that take rules, the rows of the rule table, in execution order, those of
        nested plans (scan bodies, kernels' references) included."""
        out = []
        for node in self.program.nodes:
            step = self.steps.get(node)
            if step is not None and step.info is not None:
                out.append(step)
            if step is not None and step.body is not None:
                out.extend(step.body.table_steps())
        return out

    def taps(self) -> list[TapStep]:
        return [s for s in self.steps.values() if isinstance(s, TapStep)]


def make_plan(
    program: Program,
    active: list[bool],
    describe: Describe,
    names: Sequence[tuple[str, ...]] | None = None,
    hold: frozenset[str] = frozenset(),
    remat: _remat.Spec = (),
) -> Plan:
    """Plans `program`, whose inputs flagged `active` are explained. `names`, when given, are
    the names of each input (the key path of a parameter in its pytree), by which a layer is
    also known; `describe`, `hold` and `remat` as in `PlanConfig`."""
    _remat.check(program, describe, remat)
    named = {} if names is None else dict(zip(program.inputs, names))
    return Planner(analyze(program, active), PlanConfig(describe, frozenset(hold), remat), named).plan()


class Planner:
    """The state of planning one program, which the operation families read and extend."""

    def __init__(self, flow: Flow, config: PlanConfig, names: dict[Value, tuple[str, ...]], state=()):
        self.flow = flow
        self.config = config
        self.names = names
        self.state = frozenset(state)  # a scan body's carry: the recurrence's state
        self.held: set[tuple[Node, int]] = set()  # (node, input position) taking a constant
        self.groups: dict[Node, Callable[[], None]] = {}  # first node -> builder of its step
        self.absorbed: set[Node] = set()  # nodes inside a claimed group or a layer's chain
        self.steps: dict[Node, base.Step] = {}
        self.skipped: set[Node] = set()
        self.source: dict[Value, Value] = {}  # elementwise region value -> its source
        self.region: dict[Node, Value] = {}  # elementwise region node -> its source

    @property
    def program(self) -> Program:
        return self.flow.program

    def carries(self, atom: Atom) -> bool:
        return self.flow.carries(atom)

    def plan(self) -> Plan:
        for _, recognize in base.RECOGNIZERS:
            recognize(self)
        self.flow = self.flow.needed(frozenset(self.held))
        for node in self.program.nodes:
            if node in self.groups:
                self.groups[node]()
            elif node not in self.absorbed:
                self.classify(node)
        for finish in base.FINISHERS:
            finish(self)
        explained = tuple(v for v in self.program.inputs if v in self.flow.active)
        regions = _remat.regions(self.program.nodes, self.config.describe, self.config.remat)
        return Plan(self.program, self.steps, self.skipped, explained, self.flow, regions)

    def classify(self, node: Node) -> None:
        relevant = self.relevant(node)
        if not relevant or not any(self.carries(v) for v in node.outputs):
            # No relevance in, or none of it reaches the output (queries and keys that feed a
            # stop_gradient alone): computed as it is, unless relevance starts there.
            any(start(self, node) for start in base.SOURCES)
            return
        if not any(c.claim(self, node, relevant) for c in base.classifiers(node.name)):
            raise UnsupportedOperation(self._unknown(node))

    def relevant(self, node: Node) -> tuple[int, ...]:
        """Positions of the inputs of `node` that carry relevance into it."""
        return tuple(i for i, a in enumerate(node.inputs) if self.carries(a) and (node, i) not in self.held)

    def every_use(self, value: Value, accept: Callable[[Node], bool]) -> bool:
        """Whether `value` is used, and `accept(user)` holds for each use (a program output
        never does)."""
        users = self.flow.users(value)
        return bool(users) and all(user is not None and accept(user) for user in users)

    def claim(self, nodes: list[Node], build: Callable[[], None]) -> None:
        """Claims `nodes` as one operation, whose step `build()` makes at the first node."""
        self.groups[nodes[0]] = build
        self.absorbed.update(nodes[1:])

    def producer_of(self, atom: Atom, names: frozenset) -> Node | None:
        node = self.flow.producer.get(atom) if isinstance(atom, Value) else None
        return node if node is not None and node.name in names and node not in self.absorbed else None

    def through(self, atom: Atom, names: frozenset) -> tuple[Atom, list[Node]]:
        """Walks back from `atom` through single-input ops in `names`: (the start, the nodes)."""
        walked = []
        while (node := self.producer_of(atom, names)) is not None:
            values = [a for a in node.inputs if isinstance(a, Value)]
            if len(values) != 1:
                break
            walked.insert(0, node)
            atom = values[0]
        return atom, walked

    def describe(self, node: Node) -> tuple[str, type | None]:
        return self.config.describe(node.scope)

    def where(self, node: Node) -> str:
        path, module = self.describe(node)
        where = f"module '{path or '<root>'}'"
        return where + (f" ({module.__name__})" if module is not None else "")

    def body_plan(self, node: Node) -> Plan:
        """The plan of `node`'s body (a scan's, a kernel's reference), made with this plan's
        configuration (CP-LRP holds inside a scan body too) and names."""
        return self.body_planner(node).plan()

    def body_planner(self, node: Node) -> Planner:
        names = {b: self.names[a] for b, a in zip(node.body.inputs, node.inputs) if a in self.names}
        learned = [not self.flow.is_active(a) for a in node.inputs]  # parameters, not held activations
        flow = analyze(node.body, body_flags(node, self.flow.carrying), learned)
        state = ()
        if node.name == "scan":
            layout = _internals.scan_layout(node.params)
            state = node.body.inputs[layout.num_consts : layout.num_consts + layout.num_carry]
        return Planner(flow, self.config, names, state)

    def _unknown(self, node: Node) -> str:
        name = node.name
        shapes = [tuple(a.shape) for a in node.inputs if isinstance(a, Value)]
        return (
            f"jaxlrp does not know how relevance passes through `{name}` in {self.where(node)} "
            f"(inputs {shapes}, output {tuple(node.outputs[0].shape)}). Supported "
            f"between layers: elementwise activations, sums and means, residual adds, pooling, "
            f"products of two activations, reshapes, slicing, concatenation and padding. To teach "
            f"jaxlrp this primitive, register it once: jaxlrp.extend.register_elementwise({name!r}) "
            f"if it acts element by element (relevance passes, as through an activation), "
            f"register_passthrough({name!r}) if it selects or moves values (relevance follows the "
            f"gradient), register_linear({name!r}) if it is linear in its activation operands (a "
            f"fixed map, kind 'sum'), register_step({name!r}, kind) for a row of its own kind whose "
            f"rule sees the primitive's linearisation."
        )

