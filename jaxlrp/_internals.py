"""What jaxlrp reads of JAX beyond its public API, in one place.

The engine works on traced programs, and JAX's public API (`jax.make_jaxpr`, the types of
`jax.extend.core`, `jax.lax.pcast`, `jax.typeof`) does not cover everything it must read off
them. Each such read is one function of this module, and `tests/test_internals.py` checks
each against the installed JAX on a small traced program, so a JAX release that changes one
fails there, by name, instead of as a wrong heatmap:

* **Name stacks** (`eqn.source_info.name_stack`): the `jax.named_scope`s an equation was
  traced in, relative to the enclosing call, as a `/`-joined string. The bindings mark each
  module call with a scope and read the marks back (`name_stack`).
* **Re-binding an equation** (`Primitive.get_bind_params`): an equation's params are not always
  `bind`'s keyword arguments (a call primitive holds a jaxpr where `bind` takes a function);
  rules bind the traced primitive again on modified weights (`bind`). jax 0.8 returns
  `(subfuns, params)`, jax 0.10 the params alone.
* **Primitive parameter layouts**: a call's body (`jaxpr` or `call_jaxpr`, closed or open, or
  under `jax_remat3` the `jaxpr` of a `call_hi_primitive`'s `_prim`: `call_body`); a
  checkpoint's `policy` and `prevent_cse` (`remat_params`); `scan`'s
  `jaxpr`, `num_consts`, `num_carry`, `length`, `reverse`, `unroll` (`scan_layout`);
  `conv_general_dilated`'s `dimension_numbers` (lhs, rhs and out specs),
  `feature_group_count`, `batch_group_count` (`conv_layout`); `dot_general`'s
  `dimension_numbers` as `((lhs contracting, rhs contracting), (lhs batch, rhs batch))`
  (`dot_layout`); `gather`'s `offset_dims` and `operand_batching_dims` (`gather_layout`); a
  reduction's `axes` (`reduce_axes`); a matmul's or convolution's
  `preferred_element_type` (`with_accumulation`).
* **Primitive names**: which primitive each `jnp`, `lax` and `nn` function emits (jax 0.10 made
  `jnp.stack` a primitive of its own, for instance). The engine's sets of names
  (`_program.ELEMENTWISE`, `_program.CALLS`, the operation families' in `jaxlrp._ops`) are checked against a catalogue of
  functions in the tests.
* **Defining a primitive** (`jax.interpreters.ad`, `batching`, `mlir`): the JVP, batching and
  lowering tables that `jaxlrp.extend.with_reference` registers its primitive in
  (`define_primitive`), and symbolic zero tangents (`instantiate`).
* **Varying manual axes** inside `jax.shard_map` (`aval.manual_axis_type.varying` from jax 0.9,
  `aval.vma` before: `varying_axes`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.extend import core


def name_stack(eqn: core.JaxprEqn) -> str:
    """The `jax.named_scope`s `eqn` was traced in, relative to its enclosing jaxpr: "a/b"."""
    return str(eqn.source_info.name_stack)


def bind(primitive: core.Primitive, args, params: dict) -> list:
    """Runs `primitive` with a traced equation's `params` on `args`; a list of outputs."""
    bound = primitive.get_bind_params(params)
    subfuns, bound = bound if isinstance(bound, tuple) else ((), bound)  # jax 0.8: a pair
    out = primitive.bind(*subfuns, *args, **bound)
    return list(out) if primitive.multiple_results else [out]


def with_accumulation(params: dict, dtype) -> dict:
    """`params` of a matmul or convolution accumulating in `dtype` (when it names one)."""
    if params.get("preferred_element_type") is None:
        return params
    return {**params, "preferred_element_type": dtype}


def call_body(params: dict) -> tuple[core.Jaxpr | None, list]:
    """The body of a call primitive (`jit`, `custom_jvp_call`, `remat`, ...) and its constants;
    `(None, [])` for a primitive that holds none. Under `jax_remat3` (jax 0.10), `jax.checkpoint`
    is a `call_hi_primitive` whose `_prim` holds the body in its own `params`."""
    inner = params.get("jaxpr", params.get("call_jaxpr"))
    if inner is None and "_prim" in params:
        inner = (getattr(params["_prim"], "params", None) or {}).get("jaxpr")
    if isinstance(inner, core.ClosedJaxpr):
        return inner.jaxpr, list(inner.consts)
    return inner, []


REMATS = frozenset({"remat2", "checkpoint"})


def remat_params(name: str, params: dict) -> tuple[Any, bool] | None:
    """`(policy, prevent_cse)` of a `jax.checkpoint` equation (`remat2`, or under `jax_remat3` a
    `call_hi_primitive` whose `_prim` is a remat); None for any other equation. The policy is
    `jax.checkpoint`'s own (`None`: nothing saved but the inputs)."""
    if name in REMATS:
        return params.get("policy"), bool(params.get("prevent_cse", True))
    prim = params.get("_prim") if name == "call_hi_primitive" else None
    if prim is not None and type(prim).__name__ == "RematTraced":
        inner = getattr(prim, "params", None) or {}
        return inner.get("policy"), bool(inner.get("prevent_cse", True))
    return None


@dataclasses.dataclass(frozen=True)
class ScanLayout:
    """A `scan` equation's inputs are `(*consts, *carry, *xs)`, its outputs `(*carry, *ys)`."""

    body: core.ClosedJaxpr
    num_consts: int
    num_carry: int
    length: int
    reverse: bool
    unroll: Any


def scan_layout(params: dict) -> ScanLayout:
    return ScanLayout(params["jaxpr"], params["num_consts"], params["num_carry"], params["length"],
                      params["reverse"], params["unroll"])


@dataclasses.dataclass(frozen=True)
class ConvLayout:
    """Which axis of each operand is what: `lhs_spec`/`out_spec` are (batch, feature, *spatial),
    `rhs_spec` is (out feature, in feature, *spatial)."""

    lhs_spec: tuple[int, ...]
    rhs_spec: tuple[int, ...]
    out_spec: tuple[int, ...]
    feature_group_count: int
    batch_group_count: int


def conv_layout(params: dict) -> ConvLayout:
    numbers = params["dimension_numbers"]
    return ConvLayout(tuple(numbers.lhs_spec), tuple(numbers.rhs_spec), tuple(numbers.out_spec),
                      params["feature_group_count"], params["batch_group_count"])


def dot_layout(params: dict) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]:
    """`((lhs contracting, rhs contracting), (lhs batch, rhs batch))` of a `dot_general`."""
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    return (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))


@dataclasses.dataclass(frozen=True)
class GatherLayout:
    """The output axes that hold the gathered slices, and the operand's batching axes."""

    offset_dims: tuple[int, ...]
    operand_batching_dims: tuple[int, ...]


def gather_layout(params: dict) -> GatherLayout:
    numbers = params["dimension_numbers"]
    return GatherLayout(tuple(numbers.offset_dims), tuple(getattr(numbers, "operand_batching_dims", ())))


def reduce_axes(params: dict) -> tuple[int, ...]:
    """The axes a `reduce_sum`/`reduce_max`/... equation reduces over."""
    return tuple(params["axes"])


def varying_axes(x) -> frozenset:
    """The manual mesh axes along which `x` varies inside `jax.shard_map` (empty outside)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9; earlier: aval.vma
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def define_primitive(name: str, impl, abstract_eval, jvp, batch) -> core.Primitive:
    """A primitive with multiple results: `impl(*args, **params)` evaluates and lowers it
    (lowered as the traced function it is), `abstract_eval(*avals, **params)` gives the
    output avals, `jvp(primals, tangents, **params)` and `batch(args, dims, **params)` as in
    `ad.primitive_jvps` and `batching.primitive_batchers` (`dims`: an axis or None)."""
    from jax.interpreters import ad, batching, mlir

    primitive = core.Primitive(name)
    primitive.multiple_results = True
    primitive.def_impl(impl)
    primitive.def_abstract_eval(abstract_eval)
    mlir.register_lowering(primitive, mlir.lower_fun(impl, multiple_results=True))
    ad.primitive_jvps[primitive] = jvp

    batching.primitive_batchers[primitive] = batch  # an unbatched input's dim is None
    return primitive


def instantiate(tangent):
    """A tangent as an array: a symbolic zero (`ad.Zero`) becomes zeros of its type."""
    from jax.interpreters import ad

    return ad.instantiate_zeros(tangent)
