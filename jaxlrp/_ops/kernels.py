"""Fused kernels (cuDNN attention, Pallas): their computation is not in the jaxpr, so jaxlrp
cannot see into them. They are explained through a plain-JAX reference that computes the same
values (`jaxlrp.extend.with_reference`); a kernel met without one is an error that says so."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.extend import core

from jaxlrp import _internals, _program
from jaxlrp._execute import Run, placed, read, relevance_call, run as run_plan
from jaxlrp._ops.base import KERNEL, Step, UnsupportedOperation, classifier
from jaxlrp._program import Node

if TYPE_CHECKING:
    from jaxlrp._plan import Plan


def is_fused_kernel(name: str) -> bool:
    """A primitive that runs a hand-written kernel: its computation is not in the jaxpr."""
    return name in ("pallas_call", "custom_call", "ffi_call") or name.startswith(("dot_product_attention", "cudnn"))


@classifier(order=KERNEL)
def _fused(planner, node: Node, relevant) -> bool:
    if not is_fused_kernel(node.name):
        return False
    raise UnsupportedOperation(
        f"`{node.name}` in {planner.where(node)} is a fused kernel (cuDNN attention, Pallas) that jaxlrp "
        f"cannot see into. Explain through the reference implementation, which computes the same "
        f"values with ordinary operations: jaxlrp.extend.with_reference(kernel, reference) runs the "
        f"kernel and explains the reference; or jax.nn.dot_product_attention(..., implementation='xla'), "
        f"Flax attention with its default attention_fn."
    )


# ---- A kernel explained through its reference ------------------------------------------------


def with_reference(kernel: Callable, reference: Callable) -> Callable:
    """`call(*args)`: `kernel(*args)` in the forward pass, explained through `reference`.

    Both take the same arguments (pytrees of arrays) and return the same structure of arrays
    with the same shapes and dtypes. The call is one primitive: jit, vmap and lowering run the
    kernel; `jax.jvp` and `jax.grad` differentiate the reference (a Pallas or cuDNN kernel often
    has no derivative of its own); jaxlrp plans the reference as a nested program, and each
    relevance pass recomputes the reference's forward values (nothing of it is held from the
    forward pass)."""

    @functools.wraps(kernel)
    def call(*args):
        leaves, tree = jax.tree.flatten(args)
        kernel_fn, kernel_out, kernel_lifted = _flat(kernel, tree, leaves)
        reference_fn, reference_out, reference_lifted = _flat(reference, tree, leaves)
        if kernel_out != reference_out:
            raise TypeError(
                f"jaxlrp.extend.with_reference: the kernel {_name(kernel)} returns {kernel_out[1]} and the "
                f"reference {_name(reference)} returns {reference_out[1]}; they must return the same "
                f"structure, shapes and dtypes."
            )
        # Values the functions close over that are traced (an outer jit's or vmap's arrays,
        # integer ones included) become inputs.
        inputs = [*leaves, *kernel_lifted, *reference_lifted]
        n, k = len(leaves), len(kernel_lifted)
        kernel_jaxpr = jax.make_jaxpr(lambda *xs: kernel_fn(*xs[:n], *xs[n : n + k]))(*inputs)
        reference_jaxpr = jax.make_jaxpr(lambda *xs: reference_fn(*xs[:n], *xs[n + k :]))(*inputs)
        outs = REFERENCE.bind(*inputs, kernel=kernel_jaxpr, reference=reference_jaxpr)
        return kernel_out[0].unflatten(outs)

    return call


def _name(fn) -> str:
    return repr(getattr(fn, "__name__", fn))


def _flat(fn: Callable, tree, leaves):
    """`(g, (output tree, output types), lifted)`: `g(*leaves, *lifted)` is `fn`'s flat
    outputs, `lifted` the traced values `fn` closes over (every tracer among its jaxpr's
    constants)."""
    store = {}

    def flat(*xs):
        out, store["tree"] = jax.tree.flatten(fn(*tree.unflatten(xs)))
        return out

    closed = jax.make_jaxpr(flat)(*leaves)
    consts = list(closed.consts)
    traced = [i for i, c in enumerate(consts) if isinstance(c, jax.core.Tracer)]

    def with_lifted(*xs):
        merged = list(consts)
        for i, value in zip(traced, xs[len(leaves):]):
            merged[i] = value
        return core.jaxpr_as_fun(core.ClosedJaxpr(closed.jaxpr, merged))(*xs[: len(leaves)])

    types = tuple((tuple(a.shape), str(a.dtype)) for a in closed.out_avals)
    return with_lifted, (store["tree"], types), [consts[i] for i in traced]


def _impl(*args, kernel, reference):
    return core.jaxpr_as_fun(kernel)(*args)


def _abstract(*avals, kernel, reference):
    return kernel.out_avals


def _jvp(primals, tangents, *, kernel, reference):
    """The kernel's outputs; the reference's tangents."""
    outs = REFERENCE.bind(*primals, kernel=kernel, reference=reference)
    tangents = [_internals.instantiate(t) for t in tangents]
    _, out_tangents = jax.jvp(core.jaxpr_as_fun(reference), list(primals), tangents)
    return outs, out_tangents


def _batch(args, dims, *, kernel, reference):
    """Both functions vmapped over the batched inputs, the batch axis first."""
    axes = [None if d is None else 0 for d in dims]
    args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    # traced on the arguments themselves, which keeps the manual axes they vary along
    batched = [jax.make_jaxpr(jax.vmap(core.jaxpr_as_fun(j), in_axes=axes))(*args) for j in (kernel, reference)]
    outs = REFERENCE.bind(*args, kernel=batched[0], reference=batched[1])
    return outs, [0] * len(outs)


REFERENCE = _internals.define_primitive("jaxlrp_with_reference", _impl, _abstract, _jvp, _batch)
_program.BODIES[REFERENCE.name] = lambda params: params["reference"]


@dataclasses.dataclass(eq=False)
class KernelStep(Step):
    """A kernel with a reference: the kernel runs; the relevance of its inputs is that of the
    reference's plan (`body`), whose forward values the backward pass recomputes."""

    node: Node
    relevant: tuple[int, ...]
    body: Plan

    def run(self, env: dict, run: Run) -> None:
        node, relevant = self.node, self.relevant
        steps = self.body.table_steps()

        def forward(xs, others):
            return node.bind(*placed(others["args"], relevant, xs))

        def backward(xs, others, output, relevance):
            rules = dict(zip(steps, others["rules"]))
            explained = lambda *xs: run_plan(self.body, rules, placed(others["args"], relevant, xs))  # noqa: E731
            _, pullback = jax.vjp(explained, *xs)
            return pullback(list(relevance))

        args = [None if i in relevant else read(env, a) for i, a in enumerate(node.inputs)]
        xs = tuple(read(env, node.inputs[i]) for i in relevant)
        others = {"args": args, "rules": [run.rules[s] for s in steps]}
        outs = relevance_call(forward, backward, xs, others, recompute=True)
        env.update(zip(node.outputs, outs))


@classifier(REFERENCE.name, order=0)
def _kernel(planner, node: Node, relevant) -> bool:
    planner.steps[node] = KernelStep(node, relevant, planner.body_plan(node))
    return True
