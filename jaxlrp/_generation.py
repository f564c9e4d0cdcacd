"""`jaxlrp.explain_generation`: for a causal language model, the relevance of every token of a
sequence for each generated token, from one forward pass and one vmapped backward pass.

The token at position `p` was generated from the logits at position `p − 1`; its relevance
map is LRP seeded with that one logit, `out[b, p − 1, ids[b, p]]`. K generated tokens are K
seeds of the same forward pass, so their backward passes are vmapped over (as an integer
target of shape `(batch, K)` is): the result equals K separate calls, each seeded by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlrp import _bindings, _checks
from jaxlrp.composites import Composite


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenTargets:
    """LRP seeds at `(position, class)` pairs of a `(batch, T, vocab)` output: `positions` and
    `classes` are int arrays of shape `(batch, K)`; seed k of sample b is the logit
    `out[b, positions[b, k], classes[b, k]]`."""

    positions: jax.Array
    classes: jax.Array

    def seeds(self, out: jax.Array) -> jax.Array:
        """The K seeds, `(K, batch, T, vocab)`: one logit each, the rest zero."""
        if out.ndim != 3 or out.shape[0] != self.positions.shape[0]:
            raise ValueError(
                f"jaxlrp.explain_generation explains a causal language model's logits, of shape (batch, T, "
                f"vocab) with batch {self.positions.shape[0]}; the model's output has shape {out.shape}. "
                f"Select the logits with output= (output=lambda out: out['logits'])."
            )
        where = _checks.one_hot(self.positions, out.shape[1], out.dtype)  # (batch, K, T)
        which = _checks.one_hot(self.classes, out.shape[2], out.dtype)  # (batch, K, vocab)
        weights = where[..., :, None] * which[..., None, :]
        return jnp.moveaxis(weights, 1, 0) * out


def token_targets(ids, generated) -> TokenTargets:
    """The seeds for the generated positions of `ids` (`(batch, T)` ints): `generated` is the
    first generated position (an int: the prompt's length; every later one was generated) or the
    generated positions, `(K,)` or `(batch, K)` ints, each in `[1, T)`."""
    if not (hasattr(ids, "dtype") and jnp.issubdtype(ids.dtype, jnp.integer) and jnp.ndim(ids) == 2):
        what = f"{ids.dtype}{list(ids.shape)}" if hasattr(ids, "dtype") else type(ids).__name__
        raise TypeError(
            f"jaxlrp.explain_generation explains token ids, an int array of shape (batch, T), whose later "
            f"tokens were generated from the earlier ones; got {what}. For a dict or other pytree input, "
            f"name the ids with tokens= (explain_generation(model, composite, tokens=lambda x: x['token_ids'])); "
            f"under jax.vmap, the ids keep their batch axis (ids[None])."
        )
    batch, length = ids.shape
    if isinstance(generated, (int, np.integer)) and not isinstance(generated, bool):
        if not 1 <= generated < length:
            raise ValueError(
                f"jaxlrp.explain_generation: generated={generated} is the first generated position (the "
                f"prompt's length), which must be in [1, {length}) for sequences of {length} tokens."
            )
        positions = jnp.broadcast_to(jnp.arange(generated, length), (batch, length - generated))
    else:
        positions = jnp.asarray(generated)
        if positions.ndim == 0:
            raise TypeError(
                "jaxlrp.explain_generation: generated= as the first generated position is a Python int, "
                "static under jax.jit (jax.jit(explain, static_argnames='generated')): it sets how many "
                "tokens are explained. Traced positions are an int array of shape (K,) or (batch, K)."
            )
        if not jnp.issubdtype(positions.dtype, jnp.integer) or positions.ndim not in (1, 2) or (
            positions.ndim == 2 and positions.shape[0] != batch
        ):
            raise TypeError(
                f"jaxlrp.explain_generation: generated= is the first generated position (an int) or the "
                f"generated positions, an int array of shape (K,) or ({batch}, K); got "
                f"{positions.dtype}{list(positions.shape)}."
            )
        if _checks.is_concrete(positions) and positions.size and not (
            1 <= int(positions.min()) and int(positions.max()) < length
        ):
            raise ValueError(
                f"jaxlrp.explain_generation: generated positions must be in [1, {length}) (position 0 has no "
                f"logits before it); got {np.asarray(positions).tolist()}."
            )
        positions = jnp.broadcast_to(positions, (batch, positions.shape[-1]))
    classes = jnp.take_along_axis(ids, positions, axis=1)
    return TokenTargets(positions - 1, classes)


def explain_generation(
    model,
    composite: Composite,
    *,
    output: Callable | None = None,
    tokens: Callable | None = None,
    remat=None,
    **model_kwargs,
) -> Callable:
    """For a causal language model, the relevance of each token for each generated token.

    Returns `explain(*args, generated, conditions=None, **kwargs)`, in the model's call form
    (Linen: `explain(variables, ids, generated=...)`; NNX: `explain(ids, generated=...)`; a
    function: its arguments, `argnums=` in `model_kwargs` naming the token ids), `ids` of shape
    `(batch, T)`. `generated` says which tokens were generated: the first generated position
    (an int, the prompt's length) or the positions themselves, `(K,)` or `(batch, K)`. The
    result has shape `(batch, K, T)`: row k is the relevance of every token for the logit of
    the k-th generated token, read at the position before it (`logits[b, p − 1, ids[b, p]]`);
    a causal model gives the tokens after `p − 1` none.

    The model returns logits of shape `(batch, T, vocab)` (`output=` selects them from a dict
    or dataclass). An input that is a dict or another pytree (keras-hub's `{"token_ids": ...,
    "padding_mask": ...}`) names its ids with `tokens=`, a function of the input
    (`tokens=lambda x: x["token_ids"]`); the result is then that pytree, each leaf `(batch, K,
    ...)` (a mask's relevance is zero). One forward pass serves every generated token; their K backward passes are
    vmapped, so memory grows with K · T · vocab at the logits (`remat=` checkpoints blocks, as in
    `lrp`). Ids outside the logits' vocabulary are an error. It equals K calls of `jaxlrp.lrp`,
    each seeded with that one logit, and composes with `jax.jit` and `jax.vmap` as `lrp` does.
    `jaxlrp.viz.token_matrix` draws the result (PNG) and `viz.token_matrix_html` writes it as
    an HTML table.

    Example::

        explain = jaxlrp.explain_generation(model, composites.AttnLRP())
        matrix = explain(variables, ids, generated=prompt_length)      # (batch, K, T)
    """
    binding = _bindings.of(model, output=output, **model_kwargs)
    from jaxlrp._transform import explained  # _transform builds on this module's targets

    with_output = _bindings.call_form(binding, explained(binding, composite, remat=remat))

    def explain(*args, generated, conditions=None, **kwargs):
        if "target" in kwargs:
            raise TypeError(
                "jaxlrp.explain_generation: generated= says which tokens are explained (the logit of each "
                "generated token, at the position before it); there is no target=."
            )
        _, x = binding.split(args)
        targets = token_targets(x if tokens is None else tokens(x), generated)
        if conditions is not None:
            kwargs["conditions"] = conditions
        out, relevance = with_output(*args, target=targets, **kwargs)
        if _checks.is_concrete(targets.classes) and out.ndim == 3:
            _checks.check_classes(targets.classes, out.shape[-1], "jaxlrp.explain_generation (token ids as classes)")
        # (K, batch, ...) -> (batch, K, ...); a leaf without a batch axis keeps K in front
        return jax.tree.map(lambda r: jnp.moveaxis(r, 0, 1) if r.ndim >= 2 else r, relevance)

    explain.clear_cache, explain.cache_size = with_output.clear_cache, with_output.cache_size
    return explain
