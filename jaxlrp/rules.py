"""LRP rules: how one layer splits the relevance of its outputs among its inputs.

Every rule is a frozen dataclass registered as a pytree whose fields (epsilon, gamma, alpha,
beta, box bounds) are leaves, so rules pass through `jax.jit`, `jax.vmap` and `jax.grad` like
any array argument. A rule is called in the backward pass as

    rule(layer, inputs, relevance) -> relevance of each input

where `layer` (see `jaxlrp._layer.Layer`) is `z = x·W' + b'` with BatchNorm and the like
already merged. The same code serves every linear layer: dense, convolutions of any rank,
stride, padding, dilation and groups, transposed convolutions, sums and pooling windows,
because a rule only ever applies the layer's linear map and its transpose (the VJP).

Notation (as in DESIGN.md and zennit 0.5.1): `x⁺ = max(x, 0)`, `x⁻ = min(x, 0)`, likewise for
`W` and `b`; `stab(z) = z + ((z == 0) + sign(z))·ε`; `s = R / stab(z)`; `s·W` is the VJP of
the linear map. A zero denominator (only possible with ε = 0) gives zero, never NaN.

References:
  [Bach2015] S. Bach, A. Binder, G. Montavon, F. Klauschen, K.-R. Müller, W. Samek. On
    pixel-wise explanations for non-linear classifier decisions by layer-wise relevance
    propagation. PLoS ONE 10(7), 2015.
  [Montavon2017] G. Montavon, S. Lapuschkin, A. Binder, W. Samek, K.-R. Müller. Explaining
    nonlinear classification decisions with deep Taylor decomposition. Pattern Recognition 65, 2017.
  [Montavon2019] G. Montavon, A. Binder, S. Lapuschkin, W. Samek, K.-R. Müller. Layer-wise
    relevance propagation: an overview. In Explainable AI, LNCS 11700, Springer, 2019.
  [Lapuschkin2019] S. Lapuschkin, S. Wäldchen, A. Binder, G. Montavon, W. Samek, K.-R. Müller.
    Unmasking Clever Hans predictors and assessing what machines really learn. Nature
    Communications 10, 2019.
  [Achtibat2024] R. Achtibat, S. M. V. Hatefi, M. Dreyer, A. Jain, T. Wiegand, S. Lapuschkin,
    W. Samek. AttnLRP: Attention-aware layer-wise relevance propagation for transformers.
    ICML 2024.
  [Ali2022] A. Ali, T. Schnake, O. Eberle, G. Montavon, K.-R. Müller, L. Wolf. XAI for
    transformers: better explanations through conservative propagation. ICML 2022.
  [Arras2017] L. Arras, G. Montavon, K.-R. Müller, W. Samek. Explaining recurrent neural
    network predictions in sentiment analysis. EMNLP Workshop WASSA, 2017.
  [Anders2021] C. J. Anders, D. Neumann, W. Samek, K.-R. Müller, S. Lapuschkin. Software for
    dataset-wide XAI: from local explanations to global insights with Zennit, CoRelAy, and
    ViRelAy. arXiv:2106.13200, 2021.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp._layer import Inputs, Layer, negative_part, positive_part, unbroadcast

__all__ = [
    "Rule",
    "rule",
    "Epsilon",
    "ZPlus",
    "AlphaBeta",
    "Gamma",
    "ZBox",
    "Flat",
    "WSquare",
    "Norm",
    "Pass",
    "Bilinear",
    "Softmax",
    "Uniform",
    "SignalTakeAll",
    "HoldActivated",
    "stabilize",
]


# The stabilizer of every rule unless given (zennit's), and of the default Norm of sums,
# means and pooling when a composite sets none.
DEFAULT_STABILIZER = 1e-6


def rule(cls):
    """Makes a `Rule` subclass a rule: a frozen dataclass registered as a pytree whose fields
    are all leaves, so that it works in any composite, under `jit`, `vmap` over its fields and
    `grad` with respect to them, as the built-in rules do.

    Unflattening bypasses `__init__`, so that the checks in `__post_init__` see only what a user
    builds, never the zero cotangents or batched placeholders that JAX rebuilds a rule from.

    >>> @rules.rule
    ... class HalfEpsilon(rules.Rule):
    ...     epsilon: float = 1e-6
    ...     def __call__(self, layer, inputs, relevance):
    ...         return rules.Epsilon(self.epsilon)(layer, inputs, relevance / 2)
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    names = tuple(f.name for f in dataclasses.fields(cls))

    def unflatten(_, leaves):
        instance = object.__new__(cls)
        for name, leaf in zip(names, leaves):
            object.__setattr__(instance, name, leaf)
        return instance

    jax.tree_util.register_pytree_node(cls, lambda r: (tuple(getattr(r, n) for n in names), None), unflatten)
    return cls


def stabilize(z: jax.Array, epsilon) -> jax.Array:
    """`z + ((z == 0) + sign(z))·ε`: moves `z` away from zero by `ε`, zero counting as positive."""
    epsilon = jnp.asarray(epsilon, z.dtype)
    return z + ((z == 0).astype(z.dtype) + jnp.sign(z)) * epsilon


def _divide(relevance, denominator):
    """`relevance / denominator`, zero where the denominator is zero (no NaN, even under grad)."""
    zero = denominator == 0
    return jnp.where(zero, 0, relevance / jnp.where(zero, 1, denominator))


def _pos(t):
    return jax.tree.map(positive_part, t)


def _neg(t):
    return jax.tree.map(negative_part, t)


def _mul(a, b):
    return jax.tree.map(jnp.multiply, a, b)


def _add(*ts):
    return jax.tree.map(lambda *v: sum(v[1:], v[0]), *ts)


def _sub(a, b):
    return jax.tree.map(jnp.subtract, a, b)


def _scale(c, t):
    return jax.tree.map(lambda v: jnp.asarray(c, v.dtype) * v, t)


def _linearize(fn, inputs: Inputs):
    """`(fn(inputs), s ↦ s·W)`: the output of a linear map and its transpose."""
    z, vjp = jax.vjp(fn, inputs)
    return z, lambda s: vjp(s)[0]


def _ones(inputs: Inputs) -> Inputs:
    return jax.tree.map(jnp.ones_like, inputs)


def _by_sign(layer: Layer, inputs: Inputs, for_positive, for_negative):
    """`(z, s ↦ R_in)` for `z = x⁺·A + x⁻·B`, `R_in = x⁺ ⊙ (s·A) + x⁻ ⊙ (s·B)`, with `A`, `B`
    the layer's modified maps. Inputs known to be non-negative (after a ReLU) skip the x⁻ half."""
    if layer.nonnegative_inputs:  # x⁺ = x
        z, back_p = _linearize(for_positive, inputs)
        return z, lambda s: _mul(inputs, back_p(s))
    xp = _pos(inputs)
    z, back_p = _linearize(for_positive, xp)
    xn = _neg(inputs)
    z_n, back_n = _linearize(for_negative, xn)
    return z + z_n, lambda s: _add(_mul(xp, back_p(s)), _mul(xn, back_n(s)))


def _after(relevance, inputs: Inputs) -> Inputs:
    """`inputs`, made to depend on `relevance` (by adding a zero read from it).

    What a rule computes from the forward values alone (`x·W⁺` in z⁺, αβ and γ) could otherwise
    be scheduled in the forward pass, and XLA does so: every layer's result would be held until
    the backward pass reaches it, an activation per layer. (`lax.optimization_barrier` does not
    prevent it on CPU, where it is expanded before scheduling.) The zero is read from one element, or under explicit sharding, where an element of a
    sharded axis cannot be sliced out, from the maximum; it is zero even where that element is
    NaN or Inf, so that a sample with NaN spoils no other.
    """
    spec = getattr(jax.typeof(relevance).sharding, "spec", ())
    probe = jnp.max(relevance) if any(axis is not None for axis in spec) else relevance[(0,) * relevance.ndim]
    zero = jnp.where(jnp.isfinite(probe), 0 * probe, 0)
    return tuple(x + zero.astype(x.dtype) for x in inputs)


def _concrete(value) -> np.ndarray | None:
    """The value as a NumPy array, or None when it is traced (and so cannot be checked here)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None


# Hyperparameters that must be finite and >= 0: a negative ε or stabilizer moves z towards
# zero instead of away from it (ε = −0.5 gave a map 6,600 × the logit), a negative γ turns the
# favoured sign around.
_NONNEGATIVE = ("epsilon", "stabilizer", "gamma")


class Rule:
    """Base class of the rules: `rule(layer, inputs, relevance) -> input relevance`.

    Built with concrete hyperparameters, a rule checks them: ε, the stabilizer and γ finite
    and ≥ 0 (each rule may check more). Traced ones (under `jit`, `vmap` over a grid, `grad`)
    cannot be checked when the rule is built; the math then takes them as they are."""

    def __post_init__(self):
        for name in (n for n in _NONNEGATIVE if hasattr(self, n)):
            value = _concrete(getattr(self, name))
            if value is not None and not (np.all(np.isfinite(value)) and np.all(value >= 0)):
                raise ValueError(f"{type(self).__name__} needs {name} >= 0 (and finite), got {name}={getattr(self, name)!r}.")

    def __call__(self, layer: Layer, inputs: Inputs, relevance: jax.Array) -> Inputs:
        raise NotImplementedError


@rule
class Epsilon(Rule):
    """LRP-ε [Bach2015]: `z = x·W' + b'`, `R_in = x ⊙ (s·W')` with `s = R / stab(z, ε)`.

    ε absorbs weak or contradictory contributions; ε → 0 gives LRP-0 (gradient × input).
    Default ε = 1e-6 (zennit). Example::

        composites.LayerMap({"dense": rules.Epsilon(epsilon=0.25)})
    """

    epsilon: float = 1e-6

    def __call__(self, layer, inputs, relevance):
        _, back = _linearize(layer.modified(), inputs)
        s = _divide(relevance, stabilize(layer.output, self.epsilon))
        return _mul(inputs, back(s))


@rule
class ZPlus(Rule):
    """z⁺ rule [Montavon2017]: only contributions that raise the output.

    `z = x⁺·W'⁺ + x⁻·W'⁻ + b'⁺`, `R_in = x⁺ ⊙ (s·W'⁺) + x⁻ ⊙ (s·W'⁻)`, `s = R / stab(z)`.
    Equals AlphaBeta(1, 0). Default stabilizer 1e-6.
    """

    stabilizer: float = 1e-6

    def __call__(self, layer, inputs, relevance):
        inputs = _after(relevance, inputs)
        positive, negative = layer.modified(positive_part), layer.modified(negative_part)
        z, back = _by_sign(layer, inputs, positive, negative)
        return back(_divide(relevance, stabilize(z + jnp.maximum(layer.bias, 0), self.stabilizer)))


@rule
class AlphaBeta(Rule):
    """LRP-αβ [Bach2015]: positive and negative contributions weighted by α and β.

    `z_α = x⁺·W'⁺ + x⁻·W'⁻ + b'⁺`, `z_β = x⁺·W'⁻ + x⁻·W'⁺ + b'⁻`, `s_α = R / stab(z_α)`,
    `s_β = R / stab(z_β)`;
    `R_in = α[x⁺ ⊙ (s_α·W'⁺) + x⁻ ⊙ (s_α·W'⁻)] − β[x⁺ ⊙ (s_β·W'⁻) + x⁻ ⊙ (s_β·W'⁺)]`.
    Requires α − β = 1 and α, β ≥ 0 (checked here for concrete values). Default α=2, β=1.
    """

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        alpha, beta = _concrete(self.alpha), _concrete(self.beta)
        if alpha is None or beta is None:
            return
        if np.any(alpha < 0) or np.any(beta < 0):
            raise ValueError(f"AlphaBeta needs alpha >= 0 and beta >= 0, got alpha={self.alpha}, beta={self.beta}.")
        if not np.allclose(alpha - beta, 1.0, rtol=0, atol=1e-6):  # float32 inputs round
            raise ValueError(
                f"AlphaBeta needs alpha - beta == 1 so that relevance is conserved, got "
                f"alpha={self.alpha}, beta={self.beta}; e.g. AlphaBeta(alpha=2., beta=1.)."
            )

    def __call__(self, layer, inputs, relevance):
        # z_β is computed as a map of its own, never as z − x·W'⁺: it is often near zero, where
        # that difference would leave it with float32 rounding of the size of x·W'⁺ (measured on
        # the ResNet-18-like benchmark CNN: 6e-4 relative L2 off float64, against 6e-7).
        inputs = _after(relevance, inputs)
        positive, negative = layer.modified(positive_part), layer.modified(negative_part)
        z_alpha, back_alpha = _by_sign(layer, inputs, positive, negative)
        z_beta, back_beta = _by_sign(layer, inputs, negative, positive)
        s_alpha = _divide(relevance, stabilize(z_alpha + jnp.maximum(layer.bias, 0), self.stabilizer))
        s_beta = _divide(relevance, stabilize(z_beta + jnp.minimum(layer.bias, 0), self.stabilizer))
        return _sub(_scale(self.alpha, back_alpha(s_alpha)), _scale(self.beta, back_beta(s_beta)))


@rule
class Gamma(Rule):
    """LRP-γ [Montavon2019]: favours positive contributions by γ, sign-aware.

    `W_p = W' + γW'⁺`, `W_n = W' + γW'⁻`, `b_p = b' + γb'⁺`, `b_n = b' + γb'⁻`; with `z` the
    layer's output, `s⁺ = R·[z > 0] / stab(x⁺·W_p + x⁻·W_n + b_p)`,
    `s⁻ = R·[z < 0] / stab(x⁺·W_n + x⁻·W_p + b_n)`;
    `R_in = x⁺ ⊙ (s⁺·W_p + s⁻·W_n) + x⁻ ⊙ (s⁺·W_n + s⁻·W_p)`. Default γ = 0.25.
    """

    gamma: float = 0.25
    stabilizer: float = 1e-6

    def __call__(self, layer, inputs, relevance):
        inputs = _after(relevance, inputs)
        gamma = self.gamma
        bias = layer.bias
        b_p = bias + gamma * jnp.maximum(bias, 0)
        b_n = bias + gamma * jnp.minimum(bias, 0)
        z = layer.output
        split = layer.positive_split(inputs)
        if split is not None:  # x ≥ 0: x·W_p = x·W' + γ x·W'⁺, x·W_n = x·W' + γ(x·W' − x·W'⁺)
            xw, xw_pos, back, back_pos = split
            s_up = _divide(relevance * (z > 0), stabilize(xw + gamma * xw_pos + b_p, self.stabilizer))
            s_down = _divide(relevance * (z < 0), stabilize(xw + gamma * (xw - xw_pos) + b_n, self.stabilizer))
            # x ⊙ (s⁺·W_p + s⁻·W_n) = x ⊙ ((s⁺ + (1+γ)s⁻)·W' + γ(s⁺ − s⁻)·W'⁺)
            return _mul(inputs, _add(back(s_up + (1 + gamma) * s_down), back_pos(gamma * (s_up - s_down))))
        w_p = layer.modified(lambda w: w + gamma * jnp.maximum(w, 0))
        w_n = layer.modified(lambda w: w + gamma * jnp.minimum(w, 0))
        z_up, back_up = _by_sign(layer, inputs, w_p, w_n)
        z_down, back_down = _by_sign(layer, inputs, w_n, w_p)
        s_up = _divide(relevance * (z > 0), stabilize(z_up + b_p, self.stabilizer))
        s_down = _divide(relevance * (z < 0), stabilize(z_down + b_n, self.stabilizer))
        return _add(back_up(s_up), back_down(s_down))


@rule
class ZBox(Rule):
    """z^B rule [Montavon2017] for inputs bounded by `low ≤ x ≤ high` (e.g. pixels).

    `z = x·W' − l·W'⁺ − h·W'⁻` (biases cancel), `s = R / stab(z)`,
    `R_in = x ⊙ (s·W') − l ⊙ (s·W'⁺) − h ⊙ (s·W'⁻)`. `low` and `high` are scalars or arrays
    broadcastable to the layer's input.
    """

    low: jax.Array | float
    high: jax.Array | float
    stabilizer: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        low, high = _concrete(self.low), _concrete(self.high)
        if low is None or high is None:
            return
        finite = np.all(np.isfinite(low)) and np.all(np.isfinite(high))
        if not finite or np.any(low > high):
            raise ValueError(f"ZBox needs finite bounds with low <= high everywhere, got low={self.low!r}, high={self.high!r}.")

    def __call__(self, layer, inputs, relevance):
        inputs = _after(relevance, inputs)
        # zeros_like(x) + bound keeps x's sharding (broadcast_to would drop it).
        low = jax.tree.map(lambda x: jnp.zeros_like(x) + jnp.asarray(self.low, x.dtype), inputs)
        high = jax.tree.map(lambda x: jnp.zeros_like(x) + jnp.asarray(self.high, x.dtype), inputs)
        z_x, back_x = _linearize(layer.modified(), inputs)
        z_l, back_l = _linearize(layer.modified(positive_part), low)
        z_h, back_h = _linearize(layer.modified(negative_part), high)
        s = _divide(relevance, stabilize(z_x - z_l - z_h, self.stabilizer))
        return _sub(_sub(_mul(inputs, back_x(s)), _mul(low, back_l(s))), _mul(high, back_h(s)))


@rule
class WSquare(Rule):
    """w² rule [Montavon2017]: relevance by squared weights, independent of the input.

    `z = 1·W'² + b'²`, `R_in = s·W'²` (not multiplied by x), `s = R / stab(z)`.
    """

    stabilizer: float = 1e-6

    def __call__(self, layer, inputs, relevance):
        z, back = _linearize(layer.squared, _ones(inputs))
        s = _divide(relevance, stabilize(z + jnp.square(layer.bias), self.stabilizer))
        return back(s)


@rule
class Flat(Rule):
    """Flat rule [Lapuschkin2019]: relevance spread evenly over each output's receptive field.

    All weights one, no bias: `z = 1·1` (the fan-in, padding-aware), `R_in = s·1`.
    """

    stabilizer: float = 1e-6

    def __call__(self, layer, inputs, relevance):
        z, back = _linearize(layer.ones, _ones(inputs))
        return back(_divide(relevance, stabilize(z, self.stabilizer)))


@rule
class Norm(Rule):
    """Normalize by the output [Anders2021]: each input's share of the layer's own output.

    `z = f(x)` with the layer's fixed weights, `R_in = x ⊙ VJP(R / stab(z))`. The default for
    sums, means, average pooling and residual adds (zennit's `Norm`).
    """

    stabilizer: float = 1e-6

    def __call__(self, layer, inputs, relevance):
        return Epsilon(self.stabilizer)(layer, inputs, relevance)


@rule
class Pass(Rule):
    """Pass the relevance on unchanged: `R_in = R_out`. For activations and layers whose input
    and output have the same shape."""

    def __call__(self, layer, inputs, relevance):
        if len(inputs) != 1 or inputs[0].shape != relevance.shape:
            raise ValueError(
                f"Pass needs one input shaped like the output {relevance.shape}, "
                f"got inputs shaped {[x.shape for x in inputs]}."
            )
        return (relevance.astype(inputs[0].dtype),)


@rule
class Bilinear(Rule):
    """A product of two activations by a matmul (Q·Kᵀ, A·V) [Achtibat2024, Prop. 3.3]: the ε
    rule on the product, then half to each operand.

    `z = scale·(a·b)`, `s = R / stab(2z, ε)`, `R_a = a ⊙ (s·bᵀ)`, `R_b = b ⊙ (aᵀ·s)`. The
    default for every such matmul, with the composite's stabilizer.
    """

    epsilon: float = 1e-6

    def __call__(self, layer, inputs, relevance):
        _, back = _linearize(layer.product, inputs)
        s = _divide(relevance, stabilize(2 * layer.output, self.epsilon))
        return _mul(inputs, back(s))


@rule
class Softmax(Rule):
    """The softmax rule [Achtibat2024, Prop. 3.1]: with `x` the input and `s` the output,
    `R_in = x ⊙ (R − s ⊙ Σ R)`, the sum over the softmax axes. Masked entries (−inf, or a large
    negative fill, where s = 0) get zero relevance, never NaN. The default for every softmax.
    """

    def __call__(self, layer, inputs, relevance):
        (x,) = inputs
        # A masked entry (−inf, or a fill near the dtype's lowest value, as Flax's and JAX's
        # attention use) takes no relevance, even in a row where every entry is masked.
        masked = ~jnp.isfinite(x) | (x <= jnp.finfo(x.dtype).min / 2)
        x = jnp.where(masked, 0, x).astype(relevance.dtype)
        total = layer.linear((relevance,), None)  # Σ R over the softmax axes, kept as size 1
        return (x * (relevance - layer.output * total),)


@rule
class Uniform(Rule):
    """A product of two activations `z = a ⊙ b`, split evenly [Achtibat2024, Prop. 3.3's
    uniform rule]: `R_a = R_b = R / 2` (summed over the axes an operand was broadcast along).
    Conservative; the default for every product (an LSTM's gate times its signal, a SiLU-gated
    MLP's branches, squeeze-and-excitation).

    >>> composites.LayerMap({"product": rules.Uniform()})
    """

    def __call__(self, layer, inputs, relevance):
        return tuple(unbroadcast(relevance / len(inputs), jnp.shape(x)).astype(x.dtype) for x in inputs)


@rule
class SignalTakeAll(Rule):
    """A gate times a signal, `z = g ⊙ h` with `g = sigmoid(·)` or `1 − sigmoid(·)`: the gate
    takes no relevance and the signal takes all of it [Arras2017]: `R_g = 0`, `R_h = R`. The
    rule table names the gate (column "gate"); a product with no gate operand, or two, is an
    error when the rule is resolved.

    >>> composites.combine(composites.LayerMap({"product": rules.SignalTakeAll()}), composites.EpsilonPlus())
    """

    def __call__(self, layer, inputs, relevance):
        if sum(layer.gates) != 1 or len(inputs) != 2:
            raise ValueError(f"SignalTakeAll needs a product of one gate and one signal; the gates are {layer.gates}.")
        return tuple((jnp.zeros_like(x) if gate else unbroadcast(relevance, jnp.shape(x)).astype(x.dtype))
                     for x, gate in zip(inputs, layer.gates))


@rule
class HoldActivated(Rule):
    """A gated MLP's product `z = act(x·W_g) ⊙ x·W_u`: the activated branch is held constant,
    taking no relevance, and the linear branch takes all of it: `R_act = 0`, `R_u = R` (LXT's
    CP-LRP for Llama, Qwen and Gemma MLPs, which stops the gradient at the gate projection
    [Ali2022]). The rule table's "gate" column names the activated operand.

    >>> composites.LayerMap({"product": rules.HoldActivated()})
    """

    def __call__(self, layer, inputs, relevance):
        if sum(layer.activated) != 1 or len(inputs) != 2:
            raise ValueError(f"HoldActivated needs a product of one activated and one linear branch; "
                             f"the activated operands are {layer.activated}.")
        return tuple((jnp.zeros_like(x) if held else unbroadcast(relevance, jnp.shape(x)).astype(x.dtype))
                     for x, held in zip(inputs, layer.activated))
