"""What a composite sees of a layer, and the printable table of resolved rules."""

from __future__ import annotations

import dataclasses

# Layer kinds. Weighted layers are "dense" (dot_general with one parameter operand) and "conv"
# (conv_general_dilated, transposed convolutions included) whose weight comes from the
# parameters. Fixed linear maps are "sum" (a residual add or difference of two activations,
# `jnp.sum`, `jnp.mean`, `jnp.cumsum`, a matmul with a constant matrix as in
# `jax.image.resize`) and "avg_pool" (`nn.avg_pool`).
WEIGHTED = ("dense", "conv")
FIXED = ("sum", "avg_pool")
# Transformer operations (AttnLRP): a normalization with its 1/σ held constant (LayerNorm,
# RMSNorm), a product of two activations by matmul (Q·Kᵀ, A·V), a softmax.
TRANSFORMER = ("norm", "bilinear", "softmax")
# A learned shift (and the scaling around it) that no dense or conv layer absorbed: a BatchNorm
# after a ReLU or a residual add, a positional embedding after a token embedding. Pass by
# default, as zennit (with a warning); the transformer composites give it the ε rule.
AFFINE_KIND = "affine"
# A product of two activations (an LSTM's or GRU's gate times its signal, squeeze-and-excitation,
# a gated MLP's branches): `rules.Uniform()` by default, `rules.SignalTakeAll()` to hold the gate.
PRODUCT = "product"
# A table: `jaxlrp.extend.register_step` adds the kinds it registers.
KINDS = [*WEIGHTED, *FIXED, *TRANSFORMER, AFFINE_KIND, PRODUCT]


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One layer as the composites see it.

    Attributes:
      path: the `/`-joined module path (Linen), attribute path (NNX) or `jax.named_scope`
        path (plain functions) of the module that holds the layer.
      module: the module's class, or `None` for a plain function.
      kind: one of "dense", "conv", "sum", "avg_pool", "norm", "bilinear", "softmax",
        "affine" (a learned shift no dense or conv layer absorbed), or "product" (of two
        activations).
      merged: paths of the modules folded into this layer (BatchNorm, bias adds, a mean's
        division) that belong to other modules.
      input_shapes: the shapes of the layer's relevance-carrying inputs.
      output_shape: the shape of its output.
      names: for a function's layer, the names of its weight in the parameter pytree: its key
        path as `jax.tree_util.keystr` writes it (`['w1']`, `.layers[3].weight`), then the
        same `/`-joined (`layers/3/weight`) and the path of the weight's container
        (`.layers[3]`, `layers/3`, Haiku's `mlp/~/linear_2`). `NameMap` matches these too.
      gates: for a product, the positions of its operands that come out of a gate function
        (`sigmoid`, `1 − sigmoid`): the operands `rules.SignalTakeAll` gives no relevance.
      activated: for a product of one operand that comes out of a nonlinear activation and one
        that does not (a gated MLP's `act(x·W_g) ⊙ x·W_u`), the activated one's position: the
        operand `rules.HoldActivated` (CP-LRP's held gate) gives no relevance.
    """

    path: str
    module: type | None
    kind: str
    merged: tuple[str, ...] = ()
    input_shapes: tuple[tuple[int, ...], ...] = ()
    output_shape: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    gates: tuple[int, ...] = ()
    activated: tuple[int, ...] = ()

    @property
    def param(self) -> str:
        """The weight's key path in the parameter pytree, or "" (see `names`)."""
        return self.names[0] if self.names else ""

    @property
    def type_name(self) -> str:
        if self.module is None:
            return self.kind
        module = self.module.__module__
        for prefix, short in (("flax.nnx", "nnx"), ("flax.linen", "nn")):
            if module.startswith(prefix):
                return f"{short}.{self.module.__name__}"
        return self.module.__name__


@dataclasses.dataclass(frozen=True)
class RuleTable:
    """The resolved table `layer -> rule`, in execution order. `print` it before trusting a map."""

    layers: tuple[LayerInfo, ...]
    rules: tuple

    def __str__(self) -> str:
        header = ("#", "path", "type", "kind", "rule", "merged")
        rows = [
            (str(i), info.path or "<root>", info.type_name, info.kind, repr(rule), ", ".join(info.merged))
            for i, (info, rule) in enumerate(zip(self.layers, self.rules))
        ]
        if any(info.param for info in self.layers):  # a function's layers: name their weights
            header = (*header[:2], "param", *header[2:])
            rows = [(*r[:2], info.param, *r[2:]) for r, info in zip(rows, self.layers)]
        if any(info.kind == PRODUCT for info in self.layers):  # which operand of a product is a gate
            header = (*header, "gate")
            rows = [(*r, _gate(info)) for r, info in zip(rows, self.layers)]
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.layers)


def _gate(info: LayerInfo) -> str:
    """The "gate" column: the sigmoid gates, else the activated branch of a gated MLP."""
    if info.gates:
        return ", ".join(f"input {i}" for i in info.gates)
    return ", ".join(f"input {i} (activated)" for i in info.activated)
