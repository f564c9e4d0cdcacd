"""A flat, inlined view of a traced JAX function.

`jax.make_jaxpr` gives nested jaxprs: `jit`, `custom_jvp_call`, `custom_vjp_call` and
`remat` wrap sub-jaxprs that hide the layers inside them. LRP needs to see through them, so
this module inlines every call into one flat list of `Node`s over fresh `Value`s, keeping
each node's name stack (which carries the module markers of the bindings). Two kinds of call
stay whole: elementwise functions (an activation such as `nn.relu` is one node, so it gets
one rule) and `scan` (and a kernel with a reference, `BODIES`), whose body becomes a nested
`Program`. A `jax.checkpoint` region is inlined too, each of its nodes tagged with the region
(`Node.remat`), so that the relevance pass checkpoints it as the model does (`_remat`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core

from jaxlrp import _internals
from jaxlrp._remat import Region

# Primitives that act element by element: output element i depends on input element i only.
# A table: `jaxlrp.extend.register_elementwise` adds to it.
ELEMENTWISE = set(
    """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type
    copy cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag
    integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or
    pow real reduce_precision rem round rsqrt select_n sign sin sinh sqrt square sub tan tanh
    xor""".split()
)

# Calls whose body is inlined (or, when elementwise, kept as one node).
CALLS = frozenset(
    "jit pjit closed_call core_call custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr "
    "remat2 checkpoint call_hi_primitive".split()
)

# Primitives that jaxlrp computes another way when it re-runs a node, with the same values
# (up to rounding): `name -> rewrite(args, params)`, a list of outputs, or None where the
# primitive itself is faster. `jaxlrp._ops.convolution` registers `conv_general_dilated`
# (im2col + matmul where XLA:CPU's convolution is slow).
REWRITES: dict[str, Callable[[list, dict], list | None]] = {}

# Primitives whose equation stays one node with a nested program: `params -> ClosedJaxpr`.
# A `scan`'s body; `jaxlrp.extend.with_reference` adds its kernels' references.
BODIES: dict[str, Callable[[dict], core.ClosedJaxpr]] = {"scan": lambda params: _internals.scan_layout(params).body}


@dataclasses.dataclass(eq=False)
class Value:
    """A value of the program: an input or the output of one node."""

    aval: Any

    @property
    def shape(self):
        return self.aval.shape

    @property
    def dtype(self):
        return self.aval.dtype


@dataclasses.dataclass(frozen=True, eq=False)
class Const:
    """A literal or a constant captured by the trace."""

    value: Any


Atom = Value | Const


@dataclasses.dataclass(eq=False)
class Node:
    primitive: Any
    params: dict
    inputs: tuple[Atom, ...]
    outputs: tuple[Value, ...]
    scope: str
    elementwise: bool = False
    body: Program | None = None  # a scan's body, a kernel's reference (BODIES)
    remat: tuple[Region, ...] = ()  # the checkpointed regions it was traced in, outermost first

    @property
    def name(self) -> str:
        return self.primitive.name

    def bind(self, *args, dtype=None):
        """Runs the primitive on concrete or traced arguments; returns a list of outputs.

        With `dtype`, an accumulation dtype that the node asks for (`preferred_element_type`
        of a matmul or convolution) becomes `dtype`: for arguments cast to a wider type."""
        params = self.params if dtype is None else _internals.with_accumulation(self.params, dtype)
        args = same_varying_axes(args)
        rewrite = REWRITES.get(self.name)
        out = None if rewrite is None else rewrite(args, params)
        return _internals.bind(self.primitive, args, params) if out is None else out


varying_axes = _internals.varying_axes


def same_varying_axes(args) -> list:
    """`args` varying along the same manual axes, as `jnp` functions make them implicitly (a
    primitive bound directly, as a rule does with its modified weights, needs it explicitly)."""
    axes = [varying_axes(a) for a in args]
    union = frozenset().union(*axes)
    return [
        jax.lax.pcast(a, tuple(sorted(union - have)), to="varying") if union - have else a
        for a, have in zip(args, axes)
    ]


@dataclasses.dataclass(frozen=True)
class Traced:
    """What a binding makes of a model: its jaxpr over `(*params, x)`, the array parameters in
    that order, `describe(scope) -> (module path, class)` for a name stack, and, where the
    binding knows them, each parameter's names (`LayerInfo.names`)."""

    closed: core.ClosedJaxpr
    params: list
    describe: Callable[[str], tuple[str, type | None]]
    names: list[tuple[str, ...]] | None = None


@dataclasses.dataclass(eq=False)
class Program:
    inputs: list[Value]
    outputs: list[Atom]
    nodes: list[Node]


def _is_elementwise_jaxpr(jaxpr: core.Jaxpr) -> bool:
    if not jaxpr.outvars:
        return False
    out_shape = jaxpr.outvars[0].aval.shape
    shapes = {getattr(v.aval, "shape", ()) for v in (*jaxpr.invars, *jaxpr.outvars)}
    return shapes <= {(), out_shape} and all(_is_elementwise_eqn(e) for e in jaxpr.eqns)


def _is_elementwise_eqn(eqn) -> bool:
    name = eqn.primitive.name
    if name in ELEMENTWISE:
        return True
    if name in CALLS:
        body, _ = _internals.call_body(eqn.params)
        return body is not None and _is_elementwise_jaxpr(body)
    return False


def _join(outer: str, inner: str) -> str:
    return "/".join(s for s in (outer, inner) if s)


def from_closed_jaxpr(closed: core.ClosedJaxpr, scope: str = "") -> Program:
    inputs = [Value(v.aval) for v in closed.jaxpr.invars]
    nodes: list[Node] = []
    consts = [Const(c) for c in closed.consts]
    outputs = _inline(closed.jaxpr, consts, inputs, nodes, scope)
    return Program(inputs, outputs, nodes)


def _inline(jaxpr: core.Jaxpr, consts, args, nodes: list[Node], scope: str, remat: tuple[Region, ...] = ()) -> list[Atom]:
    env: dict[Any, Atom] = {}

    def read(v) -> Atom:
        return Const(v.val) if isinstance(v, core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        ins = tuple(read(v) for v in eqn.invars)
        eqn_scope = _join(scope, _internals.name_stack(eqn))
        name = eqn.primitive.name
        inner, inner_consts = _internals.call_body(eqn.params) if name in CALLS else (None, [])
        if inner is not None and not _is_elementwise_eqn(eqn):
            checkpoint = _internals.remat_params(name, eqn.params)
            inner_remat = remat if checkpoint is None else (*remat, Region(*checkpoint))
            outs = _inline(inner, [Const(c) for c in inner_consts], ins, nodes, eqn_scope, inner_remat)
        else:
            body = from_closed_jaxpr(BODIES[name](eqn.params), eqn_scope) if name in BODIES else None
            outs = tuple(Value(v.aval) for v in eqn.outvars)
            elementwise = _is_elementwise_eqn(eqn)
            nodes.append(Node(eqn.primitive, eqn.params, ins, outs, eqn_scope, elementwise, body, remat))
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]
