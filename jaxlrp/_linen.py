"""Binding for Flax Linen: trace `module.apply` with each module call marked in the name stack.

`nn.intercept_methods` is entered inside the traced function, so it works under any outer
`jit`. Each intercepted method call opens a `jax.named_scope` whose name indexes a record of
the module's path and class; every primitive traced inside carries that scope, which is how a
`dot_general` is known to belong to `block2/Conv_0`, an `nn.Conv`.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax

_MARK = "jaxlrp~"


def mark_scope(index: int) -> contextlib.AbstractContextManager:
    """A name scope that tags every primitive traced inside with module record `index`."""
    return jax.named_scope(f"{_MARK}{index}")


def describe_marks(records: list[tuple[str, type]], root=("", None)):
    """`describe(scope) -> (path, class)` of the innermost marked module in a name stack."""

    def describe(scope: str) -> tuple[str, type | None]:
        marks = [t for t in scope.split("/") if t.startswith(_MARK)]
        return records[int(marks[-1][len(_MARK):])] if marks else root

    return describe


def trace(module: nn.Module, variables, x, apply_kwargs: dict):
    """Returns `(closed_jaxpr of (variables, x) -> output, describe(scope) -> (path, class))`."""
    records: list[tuple[str, type]] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "setup":
            return next_fun(*args, **kwargs)
        records.append(("/".join(context.module.path), type(context.module)))
        with mark_scope(len(records) - 1):
            return next_fun(*args, **kwargs)

    def apply(variables, x):
        with nn.intercept_methods(interceptor):
            return module.apply(variables, x, **apply_kwargs)

    closed = jax.make_jaxpr(apply)(variables, x)
    return closed, describe_marks(records, root=("", type(module)))
