"""From a flat program to a relevance plan: which nodes form which LRP layer.

Float values that depend on the explained input through float values are *activations*: they
carry relevance. Everything else (parameters, batch statistics, constants, masks made from
comparisons of the input, `stop_gradient` values, what is computed from them) is computed as
it is and acts as a constant. Each node that reads an activation is classified, in execution
order:

* a `dot_general` or `conv_general_dilated` with one activation and one constant operand (the
  weight) starts a weighted layer ("dense", "conv"), or a fixed one ("sum") when no parameter
  enters the weight (`jax.image.resize`, `stop_gradient(attention) @ v`); a patch extraction
  (a convolution with a constant kernel) that feeds a dense map is one "conv" layer with it
  (`nn.ConvLocal`); a `reduce_sum`, `cumsum`,
  `reduce_window_sum` or an add/sub of two different activations starts a fixed linear layer
  ("sum", "avg_pool"). The layer absorbs the chain that follows it while each value has a
  single use: for a weighted layer, elementwise affine ops with a constant operand (bias,
  BatchNorm in inference mode, scaling); for a fixed map, only scaling (a mean's division);
  and reshapes and dtype conversions between them. That is how BatchNorm gets merged into the
  layer that feeds it (in mixed precision too), and a mean becomes one averaging layer.
* an elementwise op whose activation operands all derive elementwise from one *source* joins
  that source's elementwise region; every region value used outside its region becomes one
  Pass step from the source (activation functions, a BatchNorm that no layer feeds, scaling
  by a constant, `x * sigmoid(x)`). A region that applies a per-feature affine map with
  learned operands (a BatchNorm that no layer feeds) is reported: a row of the rule table and
  a warning, never a silent Pass.
* the product of two different activations splits relevance evenly (a "product").
* selections (max pooling, `max`, slicing, reshapes, concatenation, padding, gathers) keep
  their gradient: relevance follows the selected values.
* a gather of a parameter table by integer activations (an embedding lookup) is a *tap*:
  relevance is read off its output.
* `scan` gets a plan of its own for its body.
Only values whose relevance reaches the output are planned: what feeds a `stop_gradient`
alone (`stop_gradient(softmax(q @ k.T))`) is computed as it is and needs no rule.
Anything else that touches an activation is an error naming the primitive and module.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from jaxlrp import _internals
from jaxlrp._program import ELEMENTWISE, Atom, Const, Node, Program, Value
from jaxlrp._table import AFFINE_KIND, LayerInfo

WEIGHTED_PRIMITIVES = {"dot_general": "dense", "conv_general_dilated": "conv"}
WEIGHTED_KINDS = frozenset(WEIGHTED_PRIMITIVES.values())
# Fixed linear maps by primitive: linear in their activation operands jointly, every other
# operand a constant. `scatter-add` (`jax.ops.segment_sum`, `x.at[i].add(v)`: message passing)
# is one, its indices structure. A table: `jaxlrp.extend.register_linear` adds to it.
FIXED_PRIMITIVES = {"reduce_sum": "sum", "cumsum": "sum", "reduce_window_sum": "avg_pool", "scatter-add": "sum"}
AFFINE = frozenset("add sub mul div neg".split())
SCALING = frozenset("mul div neg".split())
STRUCTURAL = frozenset("reshape broadcast_in_dim squeeze expand_dims transpose".split())
# Ops that keep every value (up to rounding): a layer's chain absorbs them as if absent.
VALUE_PRESERVING = frozenset("convert_element_type copy".split())
# What a layer's chain and a weight's name look through.
RESHAPING = STRUCTURAL | VALUE_PRESERVING
# What keeps every element once (no broadcast): a mean over a regrouped value is a mean of it.
REGROUPING = frozenset("reshape squeeze expand_dims transpose".split()) | VALUE_PRESERVING
# Selections and data movement: relevance follows the gradient. A table:
# `jaxlrp.extend.register_passthrough` adds to it.
GRADIENT = set(
    """reshape broadcast_in_dim squeeze expand_dims transpose concatenate stack slice dynamic_slice
    dynamic_update_slice gather scatter scatter-max scatter-min pad rev select_n max min reduce_max
    reduce_min reduce_window_max reduce_window_min copy convert_element_type reduce_precision split
    sort cummax cummin stop_gradient optimization_barrier pvary pcast""".split()
)
TAPS = frozenset("gather dynamic_slice".split())
# Ops whose output is >= 0 when their float operands are (selections, reshapes, max-pooling).
KEEP_SIGN = frozenset(
    """reshape broadcast_in_dim squeeze expand_dims transpose concatenate stack slice dynamic_slice
    gather pad rev reduce_max reduce_window_max copy convert_element_type""".split()
)


def is_float(atom: Atom) -> bool:
    dtype = atom.dtype if isinstance(atom, Value) else jnp.result_type(atom.value)
    return jnp.issubdtype(dtype, jnp.floating)


@dataclasses.dataclass(eq=False)
class LinearStep:
    """A weighted or fixed linear layer: its linear map (`nodes`), then its absorbed `chain`.

    `nodes` is usually one node; a patch extraction before a dense map (`nn.ConvLocal`) makes
    two or more. The relevant inputs are those of `nodes[0]`, the weight an input of `nodes[-1]`.
    """

    nodes: list[Node]
    chain: list[Node]
    relevant: tuple[int, ...]  # positions in nodes[0].inputs that carry relevance
    weight: int | None  # position of the parameter operand in nodes[-1].inputs, None for fixed maps
    info: LayerInfo
    nonnegative: bool = False  # every relevant input is >= 0 by construction (a ReLU's output)

    @property
    def first(self) -> Node:
        return self.nodes[0]

    @property
    def weighted(self) -> Node:
        return self.nodes[-1]

    @property
    def output(self) -> Value:
        return (self.chain[-1] if self.chain else self.weighted).outputs[0]


@dataclasses.dataclass(eq=False)
class PassStep:
    """An elementwise region from `source` to `output`: relevance passes unchanged."""

    source: Value
    nodes: list[Node]
    output: Value
    extras: list[Value]  # other values the region reads (parameters, masks)


@dataclasses.dataclass(eq=False)
class SoftmaxStep:
    """`s = exp(x − c) / Σ_axes exp(x − c)` (c a stop_gradient of the max, or none): `nodes`
    compute it from `source`; its rule sees the output and the axes (AttnLRP Prop. 3.1)."""

    nodes: list[Node]
    source: Value
    axes: tuple[int, ...]
    info: LayerInfo

    @property
    def output(self) -> Value:
        return self.nodes[-1].outputs[0]


@dataclasses.dataclass(eq=False)
class ProductStep:
    """`a ⊙ b` of two activations (a gate times a signal, a gated MLP's branches): its rule
    splits the relevance between them; `info.gates` names the operands that come out of a
    gate function."""

    node: Node
    info: LayerInfo

    @property
    def gates(self) -> tuple[bool, ...]:
        """One flag per operand: whether it is a gate."""
        return tuple(i in self.info.gates for i in range(len(self.node.inputs)))


@dataclasses.dataclass(eq=False)
class TapStep:
    node: Node
    index: int


@dataclasses.dataclass(eq=False)
class ScanStep:
    node: Node
    body: Plan


@dataclasses.dataclass(eq=False)
class Plan:
    program: Program
    steps: dict[Node, object]  # step by the node at whose position it runs
    skipped: set[Node]  # nodes computed inside a step
    explained: tuple[Value, ...] = ()  # the program inputs that are explained (every leaf of x)

    def table_steps(self) -> list[LinearStep | SoftmaxStep | ProductStep]:
        """The steps that take rules, the rows of the rule table, in execution order: linear
        layers (affine maps among them), softmaxes and products, scan bodies included."""
        out = []
        for node in self.program.nodes:
            step = self.steps.get(node)
            if isinstance(step, (LinearStep, SoftmaxStep, ProductStep)):
                out.append(step)
            elif isinstance(step, ScanStep):
                out.extend(step.body.table_steps())
        return out

    def taps(self) -> list[TapStep]:
        return [s for s in self.steps.values() if isinstance(s, TapStep)]


class UnsupportedOperation(ValueError):
    """The model uses an operation on the explained input that jaxlrp has no rule for."""


Describe = Callable[[str], tuple[str, type | None]]


def make_plan(
    program: Program,
    active: list[bool],
    describe: Describe,
    names: Sequence[tuple[str, ...]] | None = None,
    hold: frozenset[str] = frozenset(),
) -> Plan:
    """Plans `program`, whose inputs flagged `active` are explained. `describe(scope)` gives the
    module path and class of a name stack; `names`, when given, the names of each input (the
    key path of a parameter in its pytree), by which a layer is also known. `hold` names the
    operation kinds whose outputs are constants to LRP ("softmax": CP-LRP's attention)."""
    named = {} if names is None else dict(zip(program.inputs, names))
    return _Planner(program, describe, named, hold).plan(active)


class _Planner:
    def __init__(self, program: Program, describe: Describe, names: dict[Value, tuple[str, ...]], hold=frozenset()):
        self.program = program
        self.describe = describe
        self.names = names
        self.hold = hold
        self.uses: dict[Value, list[Node | None]] = defaultdict(list)
        for node in program.nodes:
            for a in node.inputs:
                if isinstance(a, Value):
                    self.uses[a].append(node)
        for a in program.outputs:
            if isinstance(a, Value):
                self.uses[a].append(None)
        self.order = {node: i for i, node in enumerate(program.nodes)}
        self.producer = {v: node for node in program.nodes for v in node.outputs}

    def is_active(self, atom: Atom) -> bool:
        """Depends on the explained input (through any path, integer ones included)."""
        return isinstance(atom, Value) and atom in self.active

    def carries(self, atom: Atom) -> bool:
        """Carries relevance: a float value that depends on the input through float values.

        A mask made from the input's comparisons, or a `stop_gradient` of it, is a constant to
        LRP: relevance does not flow into it."""
        return isinstance(atom, Value) and atom in self.carrying

    def plan(self, active: list[bool]) -> Plan:
        self._flow(active)
        self.groups: dict[Node, Callable[[], None]] = {}  # first node -> builder of its step
        self.absorbed: set[Node] = set()
        self.held: set[tuple[Node, int]] = set()  # (node, input position) taking a constant
        self.stats = self._statistics()  # read by the normalization and centering recognizers
        for recognize in (self._recognize_softmax, self._recognize_normalization, self._recognize_centering):
            recognize()
        self._keep_needed()
        self.nonnegative = _nonnegative_values(self.program)
        self.source: dict[Value, Value] = {}
        self.region: dict[Node, Value] = {}  # region node -> its source
        self.steps: dict[Node, object] = {}
        self.skipped: set[Node] = set()
        for node in self.program.nodes:
            if node in self.groups:
                self.groups[node]()
            elif node not in self.absorbed:
                self._classify(node)
        self._add_pass_steps()
        explained = tuple(v for v, a in zip(self.program.inputs, active) if a)
        return Plan(self.program, self.steps, self.skipped, explained)

    def output_carries(self) -> list[bool]:
        return [self.carries(a) for a in self.program.outputs]

    def _flow(self, active: list[bool]) -> None:
        """Which values depend on the active inputs, which of those carry relevance, and which
        depend on the parameters (the other inputs) rather than on constants alone."""
        self.active = {v for v, a in zip(self.program.inputs, active) if a}
        self.carrying = {v for v in self.active if is_float(v)}
        self.learned = {v for v, a in zip(self.program.inputs, active) if not a}
        for node in self.program.nodes:
            if any(isinstance(a, Value) and a in self.learned for a in node.inputs):
                self.learned.update(node.outputs)
            if node.name == "scan":
                body = self._body_planner(node)
                body._flow(self._scan_flags(node))
                outs = [v for v, c in zip(node.outputs, body.output_carries()) if c]
                self.active.update(outs)
                self.carrying.update(outs)
            elif any(self.is_active(a) for a in node.inputs):
                self.active.update(node.outputs)
                starts = self._is_embedding(node)  # relevance starts at an embedding lookup
                if starts or (node.name != "stop_gradient" and any(self.carries(a) for a in node.inputs)):
                    self.carrying.update(v for v in node.outputs if is_float(v))

    def _keep_needed(self) -> None:
        """Drops from `carrying` the values whose relevance cannot reach an output (what feeds
        a `stop_gradient` alone): they are computed as they are and need no rule."""
        needed = {a for a in self.program.outputs if isinstance(a, Value)}
        for node in reversed(self.program.nodes):
            if node.name != "stop_gradient" and any(v in needed for v in node.outputs):
                needed.update(a for i, a in enumerate(node.inputs) if isinstance(a, Value) and (node, i) not in self.held)
        self.carrying &= needed

    def _is_embedding(self, node: Node) -> bool:
        """A gather of float rows from a parameter table by integer ids that depend on the input."""
        return (
            node.name in TAPS
            and is_float(node.outputs[0])
            and not self.is_active(node.inputs[0])
            and any(self.is_active(a) and not is_float(a) for a in node.inputs[1:])
        )

    def _scan_flags(self, node: Node) -> list[bool]:
        """Which scan body inputs carry relevance: consts and xs as given, the carry to a fixed point."""
        layout = _internals.scan_layout(node.params)
        n_consts, n_carry = layout.num_consts, layout.num_carry
        flags = [self.carries(a) for a in node.inputs]
        while True:
            body = self._body_planner(node)
            body._flow(flags)
            carry_out = body.output_carries()[:n_carry]
            new = [f or (n_consts <= i < n_consts + n_carry and carry_out[i - n_consts]) for i, f in enumerate(flags)]
            if new == flags:
                return flags
            flags = new

    def _body_planner(self, node: Node) -> _Planner:
        names = {b: self.names[a] for b, a in zip(node.body.inputs, node.inputs) if a in self.names}
        return _Planner(node.body, self.describe, names, self.hold)  # CP-LRP holds inside the body too

    def src(self, value: Value) -> Value:
        return self.source.get(value, value)

    def _where(self, node: Node) -> str:
        path, module = self.describe(node.scope)
        where = f"module '{path or '<root>'}'"
        return where + (f" ({module.__name__})" if module is not None else "")

    def _relevant(self, node: Node) -> tuple[int, ...]:
        """Positions of the inputs of `node` that carry relevance into it."""
        return tuple(i for i, a in enumerate(node.inputs) if self.carries(a) and (node, i) not in self.held)

    def _classify(self, node: Node) -> None:
        relevant = self._relevant(node)
        out = node.outputs[0]
        name = node.name
        if not relevant or not any(self.carries(v) for v in node.outputs):
            # No relevance in, or none of it reaches the output (queries and keys that feed a
            # stop_gradient alone): computed as it is.
            if self._is_embedding(node):
                taps = [s for s in self.steps.values() if isinstance(s, TapStep)]
                self.steps[node] = TapStep(node, len(taps))
            return
        if name == "scan":
            self._scan(node)
            return
        sources = {self.src(node.inputs[i]) for i in relevant}
        # Elementwise, up to size-1 axes that broadcast implicitly (`f32[B,F,1] × f32[1,1,K]`).
        same_shapes = all(_broadcasts_to(node.inputs[i].shape, out.shape) for i in relevant)
        if name in WEIGHTED_PRIMITIVES and len(relevant) == 1:
            weight = 1 - relevant[0]
            local = self._local_conv(node, weight)
            if local is not None:  # nn.ConvLocal: patch extraction, then a dense map per position
                nodes, weight = local
                self._linear(nodes, relevant, weight, "conv")
            elif self._is_learned(node.inputs[weight]):
                self._linear([node], relevant, weight, WEIGHTED_PRIMITIVES[name])
            else:  # a constant matrix that no parameter enters (jax.image.resize) is a fixed map
                self._linear([node], relevant, weight, "sum")
        elif name in FIXED_PRIMITIVES:
            self._linear([node], relevant, None, FIXED_PRIMITIVES[name])
        elif name in ("add", "sub") and len(relevant) == 1 and any(self._is_learned(a) for a in node.inputs):
            # A learned shift that no dense or conv layer absorbed (a BatchNorm after a ReLU or
            # a residual add, a positional embedding after a token embedding): an affine map.
            self._linear([node], relevant, None, AFFINE_KIND)
        elif name in ("mul", "div") and any((node, i) in self.held for i in range(2)):
            # times or over a held normalizer (RMSNorm's 1/σ): an elementwise linear map
            self._linear([node], relevant, None, "norm")
        elif node.elementwise and len(sources) == 1 and same_shapes and is_float(out):
            (source,) = sources
            self.source[out] = source
            self.region[node] = source
        elif name in ("add", "sub") and len(relevant) == 2:
            self._linear([node], relevant, None, "sum")
        elif name == "dot_general" and len(relevant) == 2:  # Q·Kᵀ, A·V
            self._linear([node], relevant, None, "bilinear")
        elif name == "mul" and len(relevant) == 2:
            self._product(node)
        elif name in GRADIENT or (node.elementwise and not is_float(out)):
            return
        elif _is_fused_kernel(name):
            raise UnsupportedOperation(
                f"`{name}` in {self._where(node)} is a fused kernel (cuDNN attention, Pallas) that jaxlrp "
                f"cannot see into. Explain through the reference implementation, which computes the same "
                f"values with ordinary operations: jax.nn.dot_product_attention(..., implementation='xla'), "
                f"Flax attention with its default attention_fn, or the kernel's plain-JAX reference."
            )
        else:
            raise UnsupportedOperation(
                f"jaxlrp does not know how relevance passes through `{name}` in {self._where(node)} "
                f"(inputs {[tuple(a.shape) for a in node.inputs]}, output {tuple(out.shape)}). Supported "
                f"between layers: elementwise activations, sums and means, residual adds, pooling, "
                f"products of two activations, reshapes, slicing, concatenation and padding. To teach "
                f"jaxlrp this primitive, register it once: jaxlrp.extend.register_elementwise({name!r}) "
                f"if it acts element by element (relevance passes, as through an activation), "
                f"register_passthrough({name!r}) if it selects or moves values (relevance follows the "
                f"gradient), register_linear({name!r}) if it is linear in its activation operands (a "
                f"fixed map, kind 'sum')."
            )

    # ---- Operations recognised as a group of nodes, before the rest is classified ----------

    def _claim(self, nodes: list[Node], build: Callable[[], None]) -> None:
        self.groups[nodes[0]] = build
        self.absorbed.update(nodes[1:])

    def _producer_of(self, atom: Atom, names: frozenset) -> Node | None:
        node = self.producer.get(atom) if isinstance(atom, Value) else None
        return node if node is not None and node.name in names and node not in self.absorbed else None

    def _through(self, atom: Atom, names: frozenset) -> tuple[Atom, list[Node]]:
        """Walks back from `atom` through single-input ops in `names`: (the start, the nodes)."""
        walked = []
        while (node := self._producer_of(atom, names)) is not None:
            values = [a for a in node.inputs if isinstance(a, Value)]
            if len(values) != 1:
                break
            walked.insert(0, node)
            atom = values[0]
        return atom, walked

    def _recognize_softmax(self) -> None:
        """`exp(x − c) / Σ exp(x − c)` with c a constant or a stop_gradient (of the max): one
        softmax step, or, when softmax outputs are held (CP-LRP), a constant."""
        for node in self.program.nodes:
            if node.name != "div" or not all(self.carries(a) for a in node.inputs):
                continue
            numerator, denominator = node.inputs
            exp = self._producer_of(numerator, frozenset({"exp"}))
            # The sum may be taken in a wider dtype: `jax.nn.softmax` in bfloat16 converts
            # exp's output to float32, sums, and converts the sum back.
            total, reshapes = self._through(denominator, RESHAPING)
            reduce = self._producer_of(total, frozenset({"reduce_sum"}))
            if exp is None or reduce is None:
                continue
            summed, conversions = self._through(reduce.inputs[0], VALUE_PRESERVING)
            if summed is not numerator:
                continue
            nodes = [exp, *conversions, reduce, *reshapes, node]
            source = exp.inputs[0]
            shift = self._producer_of(source, frozenset({"sub"}))
            if shift is not None and self.carries(shift.inputs[0]) and not self.carries(shift.inputs[1]):
                nodes.insert(0, shift)
                source = shift.inputs[0]
            if len(self.uses[numerator]) != 2 or any(len(self.uses[n.outputs[0]]) != 1 for n in nodes[:-1] if n not in (exp,)):
                continue
            if "softmax" in self.hold:  # held where it is used
                value = self._as_used(node.outputs[0])
                self.held.update((user, i) for user in self.uses[value] if user is not None
                                 for i, a in enumerate(user.inputs) if a is value)
                continue
            self._claim(nodes, lambda nodes=nodes, source=source, axes=_internals.reduce_axes(reduce.params): self._softmax(nodes, source, axes))

    def _as_used(self, value: Value) -> Value:
        """A softmax's output as its users read it: past reshapes, dtype conversions and a mask
        multiplied in afterwards (`keras.layers.Softmax(mask=...)`), each its single use."""
        while len(self.uses[value]) == 1 and (user := self.uses[value][0]) is not None:
            others = [a for a in user.inputs if a is not value]
            if user.name in RESHAPING and len(user.inputs) == 1:
                pass
            elif user.name == "mul" and len(others) == 1 and not self.carries(others[0]):
                pass
            else:
                break
            value = user.outputs[0]
        return value

    def _softmax(self, nodes: list[Node], source: Value, axes: tuple[int, ...]) -> None:
        if not self.carries(nodes[-1].outputs[0]):  # under a stop_gradient: computed as it is
            return
        self.skipped.update(nodes[:-1])
        path, module = self.describe(nodes[-1].scope)
        shape = tuple(source.shape)
        info = LayerInfo(path, module, "softmax", input_shapes=(shape,), output_shape=shape)
        self.steps[nodes[-1]] = SoftmaxStep(nodes, source, axes, info)

    def _statistics(self) -> set[Value]:
        """Values computed from reductions (sums, maxima) of activations and from constants
        only: a mean, a variance, a norm, 1/σ (times a LayerNorm's scale). A reduction counts
        only when what it yields meets, in one operation, an activation as large as the values
        it reduced (it normalizes them); a mean-pooling's output, which a LayerNorm may then
        normalize, is an activation."""
        seeds = self._derived_from_reductions()
        confirmed = {
            reduce for node in self.program.nodes for a in node.inputs if a in seeds
            for reduce in seeds[a]
            if _size(node.outputs[0].shape) == _size(reduce.inputs[0].shape)  # GroupNorm regroups
            and any(self.carries(b) and reduce not in seeds.get(b, ()) for b in node.inputs)
        }
        return {v for v, reductions in seeds.items() if reductions <= confirmed}

    def _derived_from_reductions(self) -> dict[Value, frozenset[Node]]:
        """Each value computed from reductions of activations and constants only, with those
        reductions."""
        seeds: dict[Value, frozenset[Node]] = {}
        for node in self.program.nodes:
            carried = [a for a in node.inputs if self.carries(a)]
            if not carried:
                continue
            if node.name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod"):
                seeds.update((v, frozenset({node})) for v in node.outputs)
            elif (node.elementwise or node.name in STRUCTURAL or node.name == "stop_gradient") and all(
                a in seeds for a in carried
            ):
                reductions = frozenset().union(*(seeds[a] for a in carried))
                seeds.update((v, reductions) for v in node.outputs)
        return seeds

    def _recognize_normalization(self) -> None:
        """An activation times or over a statistic of activations (LayerNorm's and RMSNorm's
        1/σ): the statistic is held constant, so the normalization is linear (AttnLRP Prop. 3.4,
        LXT's `layer_norm_grad_fn`)."""
        stats = self.stats
        for node in self.program.nodes:
            if node.name not in ("mul", "div") or node in self.absorbed or node in self.groups:
                continue
            a, b = node.inputs
            if not (self.carries(a) and self.carries(b)):
                continue
            if b in stats and a not in stats:
                self.held.add((node, 1))
            elif node.name == "mul" and a in stats and b not in stats:
                self.held.add((node, 0))

    def _recognize_centering(self) -> None:
        """`x − mean(x)` (a LayerNorm's centering): one linear map, kind "norm", that takes in
        the scaling by the held 1/σ, the scale and the bias after it. A centering that only
        feeds the variance (`jnp` code that writes `x − mean` twice) is left to the statistics."""
        stats = self.stats
        for node in self.program.nodes:
            if node.name != "sub" or node in self.absorbed or not all(self.carries(a) for a in node.inputs):
                continue
            if self._feeds_statistics_only(node.outputs[0], stats):
                continue
            x, mean = node.inputs
            total, walked = self._through(mean, RESHAPING | SCALING)
            reduce = self._producer_of(total, frozenset({"reduce_sum"}))
            if reduce is None or any(
                n.name in SCALING and any(self.carries(a) for a in n.inputs if a is not n.inputs[0]) for n in walked
            ):
                continue
            # Both read the same value, perhaps each through its own dtype conversion (bfloat16),
            # the mean perhaps over a regrouping of it (GroupNorm reshapes into groups).
            root, into_sub = self._through(x, VALUE_PRESERVING)
            reduced, into_reduce = self._through(reduce.inputs[0], REGROUPING)
            if root is not reduced:
                continue
            nodes = sorted({*into_reduce, reduce, *walked, *into_sub, node}, key=self.order.__getitem__)
            self._claim(nodes, lambda nodes=nodes: self._linear(nodes, (0,), None, "norm"))

    def _feeds_statistics_only(self, value: Value, stats: set[Value]) -> bool:
        """Whether every use of `value` ends, through elementwise and structural ops, in a
        reduction that is a statistic (the variance's `(x − mean)²`)."""
        users = self.uses[value]
        if not users:
            return False
        for user in users:
            if user is None:
                return False
            if user.name.startswith("reduce_"):
                if not all(v in stats for v in user.outputs):
                    return False
            elif not (user.elementwise or user.name in STRUCTURAL) or not all(
                self._feeds_statistics_only(v, stats) for v in user.outputs
            ):
                return False
        return True

    def _is_learned(self, atom: Atom) -> bool:
        """Computed from the parameters and not from the input (a weight, a statistic)."""
        return isinstance(atom, Value) and atom in self.learned and atom not in self.active

    def _local_conv(self, node: Node, weight: int) -> tuple[list[Node], int] | None:
        """`([patches, reshapes..., dot], weight position)` when `node` extracts patches (a
        convolution with a constant kernel) that feed, through reshapes only, a dense map with a
        learned weight (`nn.ConvLocal`); else None."""
        if node.name != "conv_general_dilated" or self._is_learned(node.inputs[weight]) or weight != 1:
            return None
        # A patch extraction (`lax.conv_general_dilated_patches`): one group per input feature,
        # one output feature per input feature and window position. A fixed filter is not one.
        kernel, layout = node.inputs[1].shape, _internals.conv_layout(node.params)
        features = node.inputs[0].shape[layout.lhs_spec[1]]
        window = int(np.prod([kernel[d] for d in layout.rhs_spec[2:]]))
        if layout.feature_group_count != features or kernel[layout.rhs_spec[0]] != features * window:
            return None
        nodes, value = [node], node.outputs[0]
        while len(self.uses[value]) == 1 and self.uses[value][0] is not None:
            user = self.uses[value][0]
            nodes.append(user)
            if user.name == "dot_general" and sum(a is value for a in user.inputs) == 1:
                other = next(i for i, a in enumerate(user.inputs) if a is not value)
                return (nodes, other) if self._is_learned(user.inputs[other]) else None
            if user.name not in STRUCTURAL:
                return None
            value = user.outputs[0]
        return None

    def _linear(self, nodes: list[Node], relevant, weight, kind: str) -> None:
        # A weighted layer takes in its bias and a BatchNorm; a fixed map (a sum, a pooling
        # window) only a constant factor such as a mean's division: a BatchNorm after it Passes.
        first, last = nodes[0], nodes[-1]
        chain = self._absorb(last.outputs[0], AFFINE if kind in WEIGHTED_KINDS or kind in ("norm", AFFINE_KIND) else SCALING)
        *inner, end = members = [*nodes, *chain]
        self.absorbed.update(members[1:])
        # Computed inside the step. When the linear part computes a value read elsewhere too (a
        # LayerNorm's mean, which its variance reads), the linear part is computed outside too.
        shared = any(u not in members for n in nodes for u in self.uses[n.outputs[0]] if n is not end)
        self.skipped.update(chain[:-1] if shared else inner)
        path, module = self.describe(last.scope)
        merged = []
        for n in chain:
            other, _ = self.describe(n.scope)
            if other != path and other not in merged and self._merges(n):
                merged.append(other)
        info = LayerInfo(
            path=path,
            module=module,
            kind=kind,
            merged=tuple(merged),
            input_shapes=tuple(tuple(first.inputs[i].shape) for i in relevant),
            output_shape=tuple(end.outputs[0].shape),
            names=self._weight_names(last.inputs[weight]) if kind in WEIGHTED_KINDS else (),
        )
        nonnegative = all(first.inputs[i] in self.nonnegative for i in relevant)
        self.steps[end] = LinearStep(nodes, chain, tuple(relevant), weight, info, nonnegative)

    @staticmethod
    def _merges(node: Node) -> bool:
        """Whether an absorbed node computes something (not a dtype conversion or reshape)."""
        return node.name not in RESHAPING

    def _weight_names(self, weight: Atom) -> tuple[str, ...]:
        """The names of the parameter a weight is read from, through conversions and reshapes."""
        while isinstance(weight, Value) and weight not in self.names:
            node = self.producer.get(weight)
            values = [] if node is None else [a for a in node.inputs if isinstance(a, Value)]
            if len(values) != 1 or node.name not in RESHAPING:
                return ()
            weight = values[0]
        return self.names.get(weight, ())

    def _absorb(self, value: Value, ops: frozenset) -> list[Node]:
        """The single-use chain of `ops` (and reshapes and dtype conversions between them)
        after a linear map."""
        chain: list[Node] = []
        while len(self.uses[value]) == 1 and self.uses[value][0] is not None:
            user = self.uses[value][0]
            others = [a for a in user.inputs if a is not value]
            if user.name in RESHAPING and len(user.inputs) == 1:
                if not is_float(user.outputs[0]):
                    break
            elif (
                user.name in ops
                and sum(a is value for a in user.inputs) == 1
                and not any(self.carries(a) for a in others)
                and all(is_float(a) for a in others)
                and user.outputs[0].shape == value.shape
                and not (user.name == "div" and user.inputs[0] is not value)
            ):
                pass
            else:
                break
            chain.append(user)
            value = user.outputs[0]
        while chain and not self._merges(chain[-1]):
            chain.pop()
        return chain

    def _product(self, node: Node) -> None:
        path, module = self.describe(node.scope)
        gates = tuple(i for i, a in enumerate(node.inputs) if self._is_gate(a))
        info = LayerInfo(path, module, "product", input_shapes=tuple(tuple(a.shape) for a in node.inputs),
                         output_shape=tuple(node.outputs[0].shape), gates=gates)
        self.steps[node] = ProductStep(node, info)

    def _is_gate(self, atom: Atom) -> bool:
        """Comes out of a gate function: `sigmoid(z)` or `1 − sigmoid(z)` (an LSTM's or GRU's
        gates), through reshapes and dtype conversions [Arras2017]."""
        value, _ = self._through(atom, RESHAPING)
        node = self.producer.get(value) if isinstance(value, Value) else None
        if node is None:
            return False
        if node.name == "logistic":
            return True
        if node.elementwise and node.name not in ELEMENTWISE:  # a call such as jax.nn.sigmoid's
            body, _ = _internals.call_body(node.params)
            return body is not None and len(body.eqns) == 1 and body.eqns[0].primitive.name == "logistic"
        one = _known(node.inputs[0])
        if node.name == "sub" and one is not None and np.all(one == 1):
            return self._is_gate(node.inputs[1])
        return False

    def _scan(self, node: Node) -> None:
        body = self._body_planner(node).plan(self._scan_flags(node))
        self.steps[node] = ScanStep(node, body)

    def _add_pass_steps(self) -> None:
        for node, source in self.region.items():
            out = node.outputs[0]
            exposed = any(u is None or self.region.get(u) is not source for u in self.uses[out])
            if exposed:
                self.steps[node] = self._region_step(source, out)
            else:
                self.skipped.add(node)

    def _region_step(self, source: Value, output: Value) -> PassStep:
        members: set[Node] = set()
        extras: list[Value] = []
        stack = [output]
        seen = set()
        while stack:
            v = stack.pop()
            if v in seen or v is source:
                continue
            seen.add(v)
            n = self.producer.get(v)
            if n is not None and self.region.get(n) is source:
                members.add(n)
                stack.extend(a for a in n.inputs if isinstance(a, Value))
            elif v not in extras:
                extras.append(v)
        nodes = sorted(members, key=self.order.__getitem__)
        return PassStep(source, nodes, output, extras)



def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _broadcasts_to(shape, out) -> bool:
    """`shape` is `out`, or `out` with some axes of size 1 (numpy-style, same rank)."""
    return len(shape) == len(out) and all(a in (1, b) for a, b in zip(shape, out))


def _is_fused_kernel(name: str) -> bool:
    """A primitive that runs a hand-written kernel: its computation is not in the jaxpr."""
    return name in ("pallas_call", "custom_call", "ffi_call") or name.startswith(("dot_product_attention", "cudnn"))


def _known(atom: Atom):
    """A constant's value when it is known at planning time, else None (a traced array that the
    model closes over, such as a keyword argument passed inside `jit`)."""
    if not isinstance(atom, Const) or isinstance(atom.value, jax.core.Tracer):
        return None
    return np.asarray(atom.value)


def _nonnegative_const(atom: Atom) -> bool:
    value = _known(atom)
    return value is not None and bool(np.all(value >= 0))


def _is_relu_jaxpr(jaxpr) -> bool:
    """Whether a call's single output is `max(x, c)` with a constant c >= 0 (nested calls too)."""
    if len(jaxpr.outvars) != 1 or not jaxpr.eqns:
        return False
    last = jaxpr.eqns[-1]
    if last.outvars[0] is not jaxpr.outvars[0]:
        return False
    if last.primitive.name == "max":
        return any(isinstance(v, core.Literal) and np.all(np.asarray(v.val) >= 0) for v in last.invars)
    inner, _ = _internals.call_body(last.params)
    return inner is not None and _is_relu_jaxpr(inner)


def _nonnegative_values(program: Program) -> set[Value]:
    """Values that are >= 0 by construction: ReLU outputs and what max-pooling, reshapes and
    slicing make of them. Rules use it to skip the negative half of an input."""
    out: set[Value] = set()
    for node in program.nodes:
        floats = [a for a in node.inputs if is_float(a)]
        if node.name == "max":
            keep = any(_nonnegative_const(a) or a in out for a in node.inputs)
        elif node.elementwise and node.name not in ELEMENTWISE:
            keep = _is_relu_jaxpr(_internals.call_body(node.params)[0])
        elif node.name in KEEP_SIGN:
            keep = bool(floats) and all(a in out or _nonnegative_const(a) for a in floats)
        else:
            keep = False
        if keep:
            out.update(v for v in node.outputs if is_float(v))
    return out
