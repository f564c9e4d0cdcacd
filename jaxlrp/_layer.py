"""The view of one layer that a rule works on.

Every layer that a rule sees has the form

    z = a ⊙ L(x; W) + b

where `L` is linear in the inputs `x` (a dense map, a convolution of any rank, a transposed
convolution, a sum, a pooling window, or the sum of two branches), `W` is its weight (`None`
for a map without parameters, whose weights are implicitly one), and `a`, `b` are elementwise
scale and shift that were folded in from what follows the linear map: its bias, a BatchNorm in
inference mode, a division by a constant as in a mean. Folding keeps the rules exact for the
merged weight `W' = a·W` without ever building it: for a positively homogeneous modifier `f`
(such as the positive part), `f(a·W) = a⁺·f(W) − a⁻·f(−W)` output element by output element.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

Inputs = tuple[jax.Array, ...]


@dataclasses.dataclass(frozen=True)
class Layer:
    """`z = scale ⊙ linear(inputs, weight) + shift`, see the module docstring.

    Attributes:
      linear: `(inputs, weight) -> y`, linear in `inputs`; `weight` is `None` when `self.weight` is.
      weight: the parameter operand of the linear map, or `None` for a fixed map such as a sum.
      scale: elementwise factor on the output, or `None` for one.
      shift: elementwise bias on the output, or `None` for zero.
    """

    linear: Callable[[Inputs, jax.Array | None], jax.Array]
    weight: jax.Array | None
    scale: jax.Array | None = None
    shift: jax.Array | None = None

    def _map(self, inputs: Inputs, weight_fn) -> jax.Array:
        weight = None if self.weight is None else weight_fn(self.weight)
        return self.linear(inputs, weight)

    def _scaled(self, y: jax.Array) -> jax.Array:
        return y if self.scale is None else self.scale * y

    def forward(self, inputs: Inputs) -> jax.Array:
        """`x ↦ x·W'` with the merged weight `W' = scale·W`, no bias."""
        return self._scaled(self._map(inputs, lambda w: w))

    def positive(self, inputs: Inputs) -> jax.Array:
        """`x ↦ x·W'⁺`."""
        return self._signed(inputs, jnp.maximum)

    def negative(self, inputs: Inputs) -> jax.Array:
        """`x ↦ x·W'⁻`."""
        return self._signed(inputs, jnp.minimum)

    def _signed(self, inputs: Inputs, clip) -> jax.Array:
        if self.weight is None:  # W = 1: W'⁺ = a⁺, W'⁻ = a⁻
            y = self.linear(inputs, None)
            if self.scale is None:
                return y if clip is jnp.maximum else jnp.zeros_like(y)
            return clip(self.scale, 0) * y
        y = self._map(inputs, lambda w: clip(w, 0))
        if self.scale is None:
            return y
        # (a·W)⁺ = a⁺·W⁺ + a⁻·W⁻ and (a·W)⁻ = a⁺·W⁻ + a⁻·W⁺.
        other = jnp.minimum if clip is jnp.maximum else jnp.maximum
        y_other = self._map(inputs, lambda w: other(w, 0))
        return jnp.maximum(self.scale, 0) * y + jnp.minimum(self.scale, 0) * y_other

    def squared(self, inputs: Inputs) -> jax.Array:
        """`x ↦ x·W'²` (elementwise square of the merged weight)."""
        y = self._map(inputs, jnp.square)
        return y if self.scale is None else jnp.square(self.scale) * y

    def ones(self, inputs: Inputs) -> jax.Array:
        """`x ↦ x·1`: every weight one, the same connectivity (padding, stride, groups)."""
        return self._map(inputs, jnp.ones_like)

    @property
    def bias(self) -> jax.Array | float:
        """The merged bias `b'`, zero when there is none."""
        return 0.0 if self.shift is None else self.shift
