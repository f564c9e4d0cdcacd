"""One binding per model family: how `lrp`, `output_and_lrp`, `rule_table`, the baselines of
`jaxlrp.attribution` and `evaluate.sweep` call a model, so that every call form is the same
everywhere.

===============  ===================================  ================================================
family           built by                             positional arguments of `explain`
===============  ===================================  ================================================
Linen module     `lrp(model, composite)`              `(variables, x)`
NNX module       `lrp(model, composite)`              `(x,)`, the module's current state read per call
NNX GraphDef     `lrp(graphdef, composite)`           `(state, x)`
plain function   `lrp_fn(fn, composite, argnums=1)`   `fn`'s own, `x` at `argnums` (a tuple: several)
Keras model      `lrp(model, composite)`              `(x,)`, the model's current variables read per call
Keras, pure      `lrp(model.stateless_call, c)`       `(trainable_variables, non_trainable_variables, x)`
===============  ===================================  ================================================

`target=`, `conditions=` (and SmoothGrad's `key=`) are keyword-only; every other keyword of a
call goes to the model (`mask=`, `positions=`, `train=False`), as do the model keyword arguments
given when the binding is made. `output`, a function of what the model returns, selects what is
explained (`lambda out: out["logits"][:, -1]`).

A binding gives:

* `split(args) -> (others, x)`: the explained input and the other positional arguments, checked
  against the call form (a positional target is an error that names `target=`);
* `trace(others, x, kwargs) -> Traced`: the program the planner reads (`_linen`, `_nnx`,
  `_function` mark the module scopes), the output selected;
* `apply(others, x, kwargs)`: the forward pass alone, the output selected.

`call_form(binding, method)` turns `method(others, x, *, target, **kwargs) -> (output, result)`
into the public `explain(*args, target=None, **kwargs)`, compiled per call signature when called
eagerly, with the input and an integer target checked.
"""

from __future__ import annotations

import abc
import functools
import inspect
from collections.abc import Callable, Sequence

import flax.linen as nn
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp import _checks, _eager, _function, _keras, _linen, _nnx
from jaxlrp._program import Traced

_KEYWORDS = "target= and conditions= are keyword-only"


class Binding(abc.ABC):
    """The call form of one model family (see the module's docstring)."""

    family = ""
    form = ("variables", "x")  # the positional arguments of the call form, the explained one last

    def __init__(self, model, output: Callable | None, kwargs: dict):
        self.model = model  # the module, the GraphDef or the function
        self.output = output
        self.kwargs = kwargs  # the model keyword arguments given when the binding was made

    def split(self, args: tuple) -> tuple[tuple, object]:
        if len(args) != len(self.form):
            raise _positional_error(f"{self.family} is explained with", self.form, len(args))
        return tuple(args[:-1]), args[-1]

    @abc.abstractmethod
    def trace(self, others: tuple, x, kwargs: dict) -> Traced:
        """The program of the model on `x` (output selected), module scopes marked."""

    @abc.abstractmethod
    def apply(self, others: tuple, x, kwargs: dict):
        """The model's output on `x`, selected by `output`."""

    @property
    def explains_one_array(self) -> bool:
        """Whether `x` is one argument (for a function: `argnums` is an int)."""
        return True

    def _select(self, out):
        return out if self.output is None else self.output(out)

    def _merged(self, kwargs: dict) -> dict:
        return {**self.kwargs, **kwargs}


class Linen(Binding):
    family = "a Linen module"

    def trace(self, others, x, kwargs):
        return _linen.trace(self.model, others[0], x, self._merged(kwargs), self.output)

    def apply(self, others, x, kwargs):
        return self._select(self.model.apply(others[0], x, **self._merged(kwargs)))


class NNXGraphDef(Binding):
    """The pure NNX form: the state is an argument (one compiled function for every weight set)."""

    family = "an NNX GraphDef"
    form = ("state", "x")

    def trace(self, others, x, kwargs):
        return _nnx.trace(self.model, others[0], x, self._merged(kwargs), self.output)

    def apply(self, others, x, kwargs):
        module = nnx.merge(self.model, others[0])
        module.eval()  # on the merged copy, as _nnx.trace does
        return self._select(module(x, **self._merged(kwargs)))


class NNXModule(NNXGraphDef):
    """The stateful NNX form: the module's current state is read at each call (under `jax.jit`,
    baked in as constants)."""

    family = "an NNX module"
    form = ("x",)

    def __init__(self, module: nnx.Module, output, kwargs):
        super().__init__(nnx.graphdef(module), output, kwargs)  # the GraphDef is the model traced
        self.module = module

    def split(self, args):
        _, x = super().split(args)
        return (nnx.state(self.module),), x


class Function(Binding):
    """A plain function `fn(*args)`; `args[argnums]` is explained (a tuple: those arguments,
    `x` then the tuple of them)."""

    family = "a function"

    def __init__(self, fn: Callable, argnums: int | Sequence[int], output, kwargs):
        super().__init__(fn, output, kwargs)
        if not callable(fn):
            raise TypeError(f"jaxlrp.lrp_fn explains a function, got {type(fn).__name__}.")
        many = isinstance(argnums, Sequence)
        if not all(isinstance(i, int) for i in (argnums if many else (argnums,))):
            raise TypeError(f"jaxlrp: argnums is an int or a tuple of ints (the explained arguments), got {argnums!r}.")
        self.argnums, self.many = tuple(argnums) if many else argnums, many
        self.parameters = _positional_parameters(fn)

    @property
    def explains_one_array(self) -> bool:
        return not self.many

    def positions(self, n: int) -> tuple[int, ...]:
        """The explained positions among `n` positional arguments."""
        chosen = self.argnums if self.many else (self.argnums,)
        if any(not -n <= i < n for i in chosen):
            raise TypeError(
                f"jaxlrp: argnums={self.argnums!r} names an argument that the call does not have: it "
                f"got {n} positional argument(s). {_KEYWORDS}."
            )
        return tuple(i % n for i in chosen)

    def split(self, args):
        names = self.parameters
        if names is not None and len(args) > len(names):
            raise _positional_error(f"{getattr(self.model, '__name__', 'the function')} takes", names, len(args))
        chosen = self.positions(len(args))
        others = tuple(a for i, a in enumerate(args) if i not in chosen)
        return others, tuple(args[i] for i in chosen) if self.many else args[chosen[0]]

    def _position(self, others: tuple):
        n = len(others) + (len(self.argnums) if self.many else 1)
        chosen = self.positions(n)
        return chosen if self.many else chosen[0]

    def _bound(self, kwargs: dict) -> Callable:
        fn = functools.partial(self.model, **self._merged(kwargs)) if self.kwargs or kwargs else self.model
        return fn if self.output is None else lambda *args: self.output(fn(*args))

    def trace(self, others, x, kwargs):
        return _function.trace(self._bound(kwargs), self._position(others), others, x)

    def apply(self, others, x, kwargs):
        position = self._position(others)
        args = list(others)
        for p, xi in sorted(zip(position, x)) if self.many else [(position, x)]:
            args.insert(p, xi)
        return self._bound(kwargs)(*args)


class KerasStateless(Binding):
    """The pure Keras form, `lrp(model.stateless_call, composite)`: the variables' values are
    arguments, in `stateless_call`'s order (one compiled function for every weight set)."""

    family = "a Keras model's stateless_call"
    form = ("trainable_variables", "non_trainable_variables", "x")

    def __init__(self, model, output, kwargs):
        _keras.check_backend(model)
        super().__init__(model, output, kwargs)

    def trace(self, others, x, kwargs):
        return _keras.trace(self.model, others[0], others[1], x, self._merged(kwargs), self.output)

    def apply(self, others, x, kwargs):
        kwargs = _keras.call_kwargs(self.model, self._merged(kwargs))
        return self._select(self.model.stateless_call(others[0], others[1], x, **kwargs)[0])


class Keras(KerasStateless):
    """A Keras 3 model (JAX backend), explained as it is: its variables' current values are
    read at each call (under `jax.jit`, baked in as constants)."""

    family = "a Keras model"
    form = ("x",)

    def split(self, args):
        _, x = super().split(args)
        return _keras.variables(self.model), x


def of(model, *, output: Callable | None = None, argnums: int | Sequence[int] | None = None, **kwargs) -> Binding:
    """The binding of `model`'s family; `kwargs` go to the model at every call, `argnums` (plain
    functions only, default 1) says which argument is explained."""
    if output is not None and not callable(output):
        raise TypeError(f"jaxlrp: output= is a function of the model's output (what to explain), got {output!r}.")
    if _keras.is_keras_model(model) or _keras.is_stateless_call(model):  # first: with KERAS_NNX_ENABLED a
        if argnums is not None:                                          # Keras layer is an nnx.Module too
            raise TypeError(
                "jaxlrp: argnums= says which argument of a plain function is explained; a Keras model is "
                "explained at x in the call form explain(x) (model.stateless_call: explain(trainable, non_trainable, x))."
            )
        return Keras(model, output, kwargs) if _keras.is_keras_model(model) else KerasStateless(model.__self__, output, kwargs)
    if isinstance(model, (nn.Module, nnx.Module, nnx.GraphDef)):
        if argnums is not None:
            raise TypeError(
                f"jaxlrp: argnums= says which argument of a plain function is explained; {type(model).__name__} "
                f"is a Flax model, explained at x in the call form explain(variables, x) (NNX: explain(x))."
            )
        family = NNXModule if isinstance(model, nnx.Module) else NNXGraphDef if isinstance(model, nnx.GraphDef) else Linen
        return family(model, output, kwargs)
    if callable(model):
        return Function(model, 1 if argnums is None else argnums, output, kwargs)
    raise TypeError(
        f"jaxlrp explains Flax Linen modules, NNX modules and NNX GraphDefs, Keras models, and plain functions "
        f"fn(params, x) (argnums= for other signatures); got {type(model).__name__}."
    )


def call_form(binding: Binding, method: Callable) -> Callable:
    """`explain(*args, target=None, **kwargs) -> (output, result)` from `method(others, x, *,
    target, **kwargs) -> (output, result)`, the arguments split by `binding`.

    Outside a JAX transformation the call is compiled once per signature (see `_eager`), and the
    explained input (finite floats or integer ids), an integer target (a class of the output) and,
    where the result is not finite, the weights are checked; the finiteness flags are computed in
    the compiled call itself. Under a transformation these would see tracers."""

    def checked(others, x, *, target=None, **kwargs):
        out, result = method(others, x, target=target, **kwargs)
        return out, result, (_checks.all_finite(x), _checks.all_finite(result))

    jitted = _eager.jit_when_eager(checked)

    def explain(*args, target=None, **kwargs):
        others, x = binding.split(args)
        if _eager.is_traced((others, x, target, kwargs)):
            return method(others, x, target=target, **kwargs)
        leaves = jax.tree.leaves(x)
        for leaf in leaves:
            _checks.check_input(leaf, values=False, booleans=len(leaves) > 1)
        if isinstance(target, (int, float, list, tuple, np.generic)):
            target = jnp.asarray(target)  # traced, so that a new class does not recompile
        out, result, (input_finite, result_finite) = jitted(others, x, target=target, **kwargs)
        flags_traced = _eager.is_traced((input_finite, result_finite))  # a traced hyperparameter closed over
        if flags_traced:
            for leaf in leaves:
                _checks.check_input(leaf, booleans=len(leaves) > 1)  # the input itself is concrete: checked here
        elif not input_finite:
            _checks.raise_non_finite_input()
        if isinstance(target, (jax.Array, np.ndarray)) and jnp.issubdtype(target.dtype, jnp.integer) and out.ndim \
                and _checks.is_concrete(target):
            _checks.check_classes(target, out.shape[-1])
        if not flags_traced and not result_finite:
            _checks.raise_for_weights(others)
        return out, result

    explain.clear_cache, explain.cache_size = jitted.clear_cache, jitted.cache_size
    explain.jaxlrp_description = getattr(method, "jaxlrp_description", None)
    return explain


def result_only(with_output: Callable) -> Callable:
    """`explain(*args, **kwargs)`: the result of `with_output(*args, **kwargs) -> (output, result)`."""

    @functools.wraps(with_output)
    def explain(*args, **kwargs):
        return with_output(*args, **kwargs)[1]

    explain.with_output = with_output  # explain_dataset checks targets against the output's classes
    if hasattr(with_output, "clear_cache"):
        explain.clear_cache, explain.cache_size = with_output.clear_cache, with_output.cache_size
    return explain


def _positional_parameters(fn: Callable) -> tuple[str, ...] | None:
    """The names of `fn`'s positional parameters; `None` if it takes `*args` or has no signature."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return None
    return tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _positional_error(who: str, form: Sequence[str], given: int) -> TypeError:
    names = ", ".join(form)
    return TypeError(
        f"jaxlrp: {who} {len(form)} positional argument(s) ({names}), got {given}. {_KEYWORDS}: "
        f"explain({names}, target=3) explains class 3; rule_table(model, composite, {names}) takes no target."
    )
