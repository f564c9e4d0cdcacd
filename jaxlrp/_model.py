"""The forward pass of a model, in the call forms of `jaxlrp.lrp`, for methods that need only
the output: the gradient baselines (`jaxlrp.attribution`) and evaluation (`jaxlrp.evaluate`).

* Linen module: `apply(variables, x, **kwargs) = model.apply(variables, x, **kwargs)`;
* NNX GraphDef: `apply(state, x, **kwargs)` calls the merged module in eval mode;
* plain function: `apply(params, x, **kwargs) = fn(params, x, **kwargs)`.

An NNX module is read through its GraphDef, with `nnx.state(model)` at each call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp import _checks, _eager


def apply_function(model, apply_kwargs: dict) -> Callable:
    """`apply(params, x, **call_kwargs) -> output` for a Linen module, an NNX GraphDef or a
    plain function `fn(params, x)`."""
    if isinstance(model, nnx.GraphDef):

        def apply(state, x, **call_kwargs):
            module = nnx.merge(model, state)
            module.eval()
            return module(x, **apply_kwargs, **call_kwargs)

    elif isinstance(model, nn.Module):

        def apply(variables, x, **call_kwargs):
            return model.apply(variables, x, **apply_kwargs, **call_kwargs)

    elif callable(model) and not isinstance(model, nnx.Module):

        def apply(params, x, **call_kwargs):
            return model(params, x, **apply_kwargs, **call_kwargs)

    else:
        raise TypeError(
            f"jaxlrp: expected a Flax Linen module, an NNX module or GraphDef, or a function "
            f"fn(params, x); got {type(model).__name__}."
        )
    return apply


def in_call_form(model, apply_kwargs: dict, method: Callable) -> Callable:
    """`explain(variables, x, target=None, **kwargs)` (`explain(x, target=None, **kwargs)` for an
    NNX module, its current state read at each call) from `method(apply, variables, x, target,
    **kwargs) -> (output, attribution)`.

    Outside a JAX transformation the call is compiled once per signature, and the input (finite
    floats) and an integer target (a class of the output) are checked, as `jaxlrp.lrp` does."""
    if isinstance(model, nnx.Module):
        pure = in_call_form(nnx.graphdef(model), apply_kwargs, method)

        def stateful(x, target=None, **kwargs):
            return pure(nnx.state(model), x, target, **kwargs)

        return stateful
    compiled = _eager.jit_when_eager(functools.partial(method, apply_function(model, apply_kwargs)))

    def explain(variables, x, target=None, **kwargs):
        if _eager.is_traced((variables, x, target, kwargs)):
            return compiled(variables, x, target, **kwargs)[1]
        _checks.check_input(x)
        if target is not None and not isinstance(target, (jax.Array, np.ndarray)):
            target = jnp.asarray(target)  # traced, so that a new class does not recompile
        out, attribution = compiled(variables, x, target, **kwargs)
        if target is not None and jnp.issubdtype(target.dtype, jnp.integer) and _checks.is_concrete(target):
            _checks.check_classes(target, out.shape[-1])
        return attribution

    return explain
