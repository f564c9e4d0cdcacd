"""Teaching jaxlrp operations it does not know: one registration per primitive.

What jaxlrp knows of a primitive is one entry in a table keyed by the primitive's name (the
name an `UnsupportedOperation` error gives, `eqn.primitive.name` in a jaxpr), the way JAX
keeps its own rules per primitive (`ad.primitive_jvps[p]`, `batching.primitive_batchers[p]`).
The built-in operations are entries of the same tables. Register once, at import time of the
code that defines the primitive:

* `register_elementwise(name)`: output element i depends on input element i only (an
  activation written as a primitive of its own). It joins the elementwise region of its
  input, and relevance passes through it unchanged (the `Pass` rule of activations).
* `register_passthrough(name)`: a selection or data movement (a custom gather, a sort, a
  permutation). Relevance follows the gradient: each output's relevance goes to the input
  values it was taken from. The primitive needs a JVP (or transpose) rule, as for `jax.grad`.
* `register_linear(name)`: linear in its activation operands jointly, its other operands
  constants (a fixed map: a custom pooling, a scatter, a fixed filter). It becomes a layer of
  kind "sum" in the rule table, `Norm` by default; its map and VJP come from JAX, so it needs
  a transpose rule, as for `jax.grad`.
* `register_step(name, kind)`: a row of the rule table of its own `kind`, which composites map
  like any kind (`LayerMap({kind: rule})`; a composite without one is an error that names the
  kind). Its rule sees the primitive's linearisation at the forward inputs as a `jaxlrp.Layer`
  (`z = J·x + b'`, `b'` what makes `z` the forward value). It needs a JVP rule.
* `with_reference(kernel, reference)`: a function that runs `kernel` (a Pallas or cuDNN fused
  kernel, whose computation jaxlrp cannot see) in the forward pass, and that jaxlrp explains,
  and `jax.grad` differentiates, through `reference`, plain JAX that computes the same values.
  Its layers are rows of the rule table like the model's own.

A rule for a new kind of operation is a subclass of `jaxlrp.rules.Rule` decorated with
`jaxlrp.rules.rule`; it sees each layer as a `jaxlrp.Layer`.

    from jaxlrp import extend
    extend.register_passthrough("my_gather")
"""

from __future__ import annotations

from jaxlrp import _program, _table
from jaxlrp._ops import linear, registered, selections
from jaxlrp._ops.kernels import with_reference

__all__ = ["register_elementwise", "register_linear", "register_passthrough", "register_step", "with_reference"]


def _tables() -> dict[str, object]:
    return {
        "elementwise": _program.ELEMENTWISE,
        "passthrough": selections.GRADIENT,
        "linear": linear.FIXED_PRIMITIVES,
        "step": registered.STEP_KINDS,
        "weighted (dense/conv)": linear.WEIGHTED_PRIMITIVES,
        "call (inlined)": _program.CALLS,
        "nested program (scan, kernel with a reference)": _program.BODIES,
    }


def _check(name: str, table: str) -> bool:
    """Whether `name` is already in `table`; an error if it is in another one."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"jaxlrp.extend: a primitive is registered by its name (a str), got {name!r}.")
    known = [t for t, entries in _tables().items() if name in entries]
    if known and known != [table]:
        raise ValueError(f"jaxlrp.extend: primitive {name!r} is already registered as {known[0]}; "
                         f"it cannot also be {table}.")
    return bool(known)


def register_elementwise(name: str) -> None:
    """Registers primitive `name` as acting element by element: relevance passes through it."""
    if not _check(name, "elementwise"):
        _program.ELEMENTWISE.add(name)


def register_passthrough(name: str) -> None:
    """Registers primitive `name` as a selection: relevance follows its gradient."""
    if not _check(name, "passthrough"):
        selections.GRADIENT.add(name)


def register_linear(name: str) -> None:
    """Registers primitive `name` as linear in its activation operands: a layer of kind "sum"."""
    if not _check(name, "linear"):
        linear.FIXED_PRIMITIVES[name] = "sum"


def register_step(name: str, kind: str) -> None:
    """Registers primitive `name` as a step of its own `kind`: a row of the rule table."""
    reserved = tuple(k for k in _table.KINDS if k not in _table.FIXED and k not in registered.STEP_KINDS.values())
    if not isinstance(kind, str) or not kind or kind in reserved:
        raise ValueError(f"jaxlrp.extend.register_step: the kind is a new name (a str) or a fixed map's "
                         f"{_table.FIXED}; the kinds {reserved} belong to steps of their own structure, got {kind!r}.")
    if _check(name, "step") and registered.STEP_KINDS[name] != kind:
        raise ValueError(f"jaxlrp.extend: primitive {name!r} is already a step of kind "
                         f"{registered.STEP_KINDS[name]!r}; it cannot also be {kind!r}.")
    registered.STEP_KINDS[name] = kind
    if kind not in _table.KINDS:
        _table.KINDS.append(kind)
