"""The view of one layer that a rule works on.

Every layer that a rule sees has the form

    z = L(x; W') + b'

where `L` is linear in the inputs `x` (a dense map, a convolution of any rank, a transposed
convolution, a sum, a pooling window, or the sum of two branches) and `W'` is the merged
weight: the layer's own weight times the elementwise scale folded in from what follows it (a
BatchNorm in inference mode, a division by a constant as in a mean); `b'` is the merged bias.

When the scale varies only along the output features (BatchNorm, a scalar) it is multiplied
into the weight once, as zennit's canonizers do. Otherwise, and for maps without a weight
(sums, pooling, whose weights are implicitly one), it stays an output scale `a` and a
modified weight is applied without being built: for a positively homogeneous modifier `f`
(identity, positive or negative part, `W + γW⁺`), `f(a·W) = a⁺·f(W) − a⁻·f(−W)` output element
by output element.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

Inputs = tuple[jax.Array, ...]
Modifier = Callable[[jax.Array], jax.Array]


def _identity(w):
    return w


@dataclasses.dataclass(frozen=True)
class Layer:
    """`z = L(x; W') + b'`, see the module docstring.

    Attributes:
      linear: `(inputs, weight) -> y`, linear in `inputs`; `weight` is `None` when `self.weight` is.
      weight: the parameter operand of the linear map, or `None` for a fixed map such as a sum.
      output: the layer's forward value `z`, as the model computed it.
      scale: elementwise factor on the output not folded into the weight, or `None`.
      shift: the merged bias, or `None` for zero.
      signs: for a fixed map, the sign of each input's implicit weight (`a - b`: +1, -1).
      nonnegative_inputs: the inputs are known to be >= 0 (they come from a ReLU or max-pooling
        of one), so rules may skip their negative part.
      precise_output: `output` was computed at least as precisely as the rule computes (not in
        bfloat16 or float16), so `x·W'` may be read off it as `output − b'`.
      gates: for a product of activations (kind "product"), which operands come out of a gate
        function (`sigmoid(z)`, or `1 − sigmoid(z)`), one flag per input.
      activated: for a product, which operand is the activated branch of a gated MLP (see
        `LayerInfo.activated`), one flag per input.
    """

    linear: Callable[[Inputs, jax.Array | None], jax.Array]
    weight: jax.Array | None
    output: jax.Array
    scale: jax.Array | None = None
    shift: jax.Array | None = None
    signs: tuple[int, ...] = (1,)
    nonnegative_inputs: bool = False
    precise_output: bool = True
    gates: tuple[bool, ...] = ()
    activated: tuple[bool, ...] = ()

    def modified(self, f: Modifier = _identity) -> Callable[[Inputs], jax.Array]:
        """`x ↦ L(x; f(W'))` for an elementwise, positively homogeneous `f` (no bias)."""
        if self.weight is None:

            def coefficient(sign):
                if self.scale is None:
                    return f(sign)
                return jnp.maximum(self.scale, 0) * f(sign) - jnp.minimum(self.scale, 0) * f(-sign)

            return lambda inputs: self._fixed(inputs, coefficient)
        dtype = self.weight.dtype
        if self.scale is None:
            weight = f(self.weight).astype(dtype)
            return lambda inputs: self.linear(inputs, weight)
        up, down = f(self.weight).astype(dtype), f(-self.weight).astype(dtype)
        a_pos, a_neg = jnp.maximum(self.scale, 0), jnp.minimum(self.scale, 0)
        return lambda inputs: a_pos * self.linear(inputs, up) - a_neg * self.linear(inputs, down)

    def positive_split(self, inputs: Inputs):
        """For one input known to be ≥ 0 and a merged weight: `(x·W', x·W'⁺, s ↦ s·W', s ↦ s·W'⁺)`,
        else None.

        `x·W'` is the layer's own output minus its bias (no convolution) when the output is
        precise, so γ needs one extra application of the map (`x·W'⁺`, and `x·W'⁻ = x·W' −
        x·W'⁺`) and two transposes, not two and two. (αβ does not use it: its `x·W'⁻ + b'⁻` is
        often near zero, where the difference would leave it with the rounding of `x·W'⁺`.)
        """
        if not self.nonnegative_inputs or self.weight is None or self.scale is not None or len(inputs) != 1:
            return None
        z, back = jax.vjp(self.modified(), inputs)
        if self.precise_output:
            z = self.output - self.bias
        z_pos, back_pos = jax.vjp(self.modified(positive_part), inputs)
        return z, z_pos, lambda s: back(s)[0], lambda s: back_pos(s)[0]

    def _fixed(self, inputs: Inputs, coefficient) -> jax.Array:
        """A fixed map whose input k has the implicit weight `sign_k` (times the scale), each
        replaced by `coefficient(sign_k)`: `Σ_k coefficient(s_k)·x_k`, where `x_k` spread by the
        map is `s_k·L(x_k alone)`."""
        total = 0.0
        for k, sign in enumerate(self.signs):
            alone = tuple(x if j == k else jnp.zeros_like(x) for j, x in enumerate(inputs))
            y = self.linear(alone, None)
            s = jnp.asarray(sign, y.dtype)
            total = total + (coefficient(s) * s).astype(y.dtype) * y
        return total

    def squared(self, inputs: Inputs) -> jax.Array:
        """`x ↦ x·W'²` (elementwise square of the merged weight)."""
        if self.weight is None:
            return self._fixed(inputs, lambda s: jnp.ones_like(s) if self.scale is None else jnp.square(self.scale))
        y = self.linear(inputs, jnp.square(self.weight))
        return y if self.scale is None else jnp.square(self.scale) * y

    def ones(self, inputs: Inputs) -> jax.Array:
        """`x ↦ x·1`: every weight one, the same connectivity (padding, stride, groups)."""
        if self.weight is None:
            return self._fixed(inputs, jnp.ones_like)
        return self.linear(inputs, jnp.ones_like(self.weight))

    def product(self, inputs: Inputs) -> jax.Array:
        """`x ↦ a ⊙ L(x)`, no bias, as one map of all inputs together (for a bilinear `L`)."""
        y = self.linear(inputs, self.weight)
        return y if self.scale is None else self.scale * y

    @property
    def bias(self) -> jax.Array | float:
        """The merged bias `b'`, zero when there is none."""
        return 0.0 if self.shift is None else self.shift


def unbroadcast(r: jax.Array, shape) -> jax.Array:
    """`r` summed over the axes along which an input of `shape` was broadcast to `r`'s shape."""
    extra = r.ndim - len(shape)
    r = r.sum(axis=tuple(range(extra))) if extra else r
    axes = tuple(i for i, (a, b) in enumerate(zip(r.shape, shape)) if b == 1 and a != 1)
    return r.sum(axis=axes, keepdims=True) if axes else r


def positive_part(w):
    return jnp.maximum(w, 0)


def negative_part(w):
    return jnp.minimum(w, 0)
