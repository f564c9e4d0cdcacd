"""Composites: which rule each layer gets.

A composite maps the model's layers (in execution order, see `jaxlrp.rule_table`) to rules:

* `LayerMap({key: rule}, first=...)` by layer type. A key is a layer kind (`"dense"`,
  `"conv"`, `"sum"`, `"avg_pool"`, `"norm"`, `"bilinear"`, `"softmax"`, `"affine"`,
  `"product"`), a module class (`nn.Dense`, `nn.Conv`, matched with
  `issubclass` on the innermost module that holds a dense or conv layer), or a tuple of keys.
  `first` is the rule for the first dense or conv layer in execution order, or a mapping
  `{key: rule}` for the first layer matching any of its keys (zennit's first-layer map).
* `NameMap({pattern: rule})`: fnmatch patterns on the `/`-joined module path, or, for a plain
  function's layer, on the names of its weight in the parameter pytree (`['w1']`,
  `.layers[3].weight`, `layers/3`, Haiku's `mlp/~/linear_2`; see `LayerInfo.names`). A
  pattern that matches no layer is an error.
* `combine(a, b, ...)`: the first composite with a rule for a layer wins.

What no composite covers gets the defaults: activations Pass, sums, means, average pooling and
residual adds `Norm(stabilizer)` with the composite's `stabilizer` (1e-6 when it sets none;
in `combine`, the first that sets one), products of two activations `Uniform()`, max pooling
its gradient; a dense or conv layer with no rule is an error. Composites are pytrees whose leaves are their rules' hyperparameters.

The named composites follow zennit 0.5.1 (dense means `nn.Dense`, `nn.DenseGeneral`,
`nn.Einsum`; conv means `nn.Conv` of any rank and `nn.ConvTranspose`):

| composite                 | conv            | dense    | first layer            |
|---------------------------|-----------------|----------|------------------------|
| `EpsilonPlus`             | ZPlus           | Epsilon  |                        |
| `EpsilonPlusFlat`         | ZPlus           | Epsilon  | Flat (first dense/conv)|
| `EpsilonAlpha2Beta1`      | AlphaBeta(2, 1) | Epsilon  |                        |
| `EpsilonAlpha2Beta1Flat`  | AlphaBeta(2, 1) | Epsilon  | Flat (first dense/conv)|
| `EpsilonGammaBox`         | Gamma           | Epsilon  | ZBox (first conv)      |
| `LRP0`                    | Epsilon(0)      | Epsilon(0) |                      |

`LRP0` also gives sums, means and pooling Norm(0): gradient × input on a ReLU network.

For transformers [Achtibat2024, Ali2022], `AttnLRP(epsilon, gamma=None)`: dense and conv layers
Epsilon(ε) (Gamma(γ) when `gamma` is set, for vision transformers), softmax by its own rule,
Q·Kᵀ and A·V `Bilinear(ε)`, LayerNorm and RMSNorm the ε rule with 1/σ held constant, residual
adds and means Norm(ε), a learned shift no layer absorbs (a positional embedding added to a
token embedding) Epsilon(ε): it takes its share like a bias. `CPLRP(epsilon, gamma=None)`: the same with the attention weights held
constant, so relevance flows through the values only.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import jax

from jaxlrp import rules as _rules
from jaxlrp import _table
from jaxlrp._table import WEIGHTED, LayerInfo

__all__ = [
    "Composite",
    "LayerMap",
    "NameMap",
    "combine",
    "EpsilonPlus",
    "EpsilonPlusFlat",
    "EpsilonAlpha2Beta1",
    "EpsilonAlpha2Beta1Flat",
    "EpsilonGammaBox",
    "LRP0",
    "AttnLRP",
    "CPLRP",
    "HoldGatedMLP",
    "MambaLRP",
]

Rule = _rules.Rule


class Composite:
    """Base class: `composite.rules(layers)` gives a rule, or None, for each layer.

    `stabilizer`: that of the default `Norm` for sums, means and pooling, or None (1e-6).
    `hold`: what LRP treats as constants: "softmax" (attention weights, CP-LRP), "selection"
    (a state-space model's selection parameters, MambaLRP)."""

    stabilizer = None
    hold: frozenset = frozenset()

    def rules(self, layers: Sequence[LayerInfo]) -> list[Rule | None]:
        raise NotImplementedError

    def unmatched(self, layers: Sequence[LayerInfo]) -> list[str]:
        """The name patterns of this composite that match none of `layers`."""
        return []


def _matches(key, info: LayerInfo) -> bool:
    if isinstance(key, tuple):
        return any(_matches(k, info) for k in key)
    if isinstance(key, str):
        if key not in _table.KINDS:
            raise ValueError(f"Unknown layer kind {key!r} in a LayerMap; the kinds are {tuple(_table.KINDS)}.")
        return info.kind == key
    if isinstance(key, type):
        return info.kind in WEIGHTED and info.module is not None and issubclass(info.module, key)
    raise TypeError(f"LayerMap keys are layer kinds (str), module classes or tuples of them; got {key!r}.")


def _named(pattern: str, info: LayerInfo) -> bool:
    """The pattern is one of the layer's names, or matches one as an fnmatch pattern (a name
    such as `.layers[0].weight` is itself no pattern for it: `[0]` is a character class)."""
    return any(name == pattern or fnmatch.fnmatchcase(name, pattern) for name in (info.path or "<root>", *info.names))


def _key_name(key) -> str:
    if isinstance(key, tuple):
        return "(" + ", ".join(_key_name(k) for k in key) + ")"
    return key if isinstance(key, str) else key.__name__


@jax.tree_util.register_pytree_node_class
class LayerMap(Composite):
    """Rules by layer kind or module class; `first` overrides the first matching layer;
    `stabilizer` is that of the default rules for sums, means, pooling, normalizations and
    bilinear matmuls (None: 1e-6); `hold` what LRP treats as constants (`("softmax",)`: attention
    weights, as CP-LRP; `("selection",)`: a state-space model's selection parameters, MambaLRP)."""

    def __init__(self, mapping: Mapping, first: Rule | Mapping | None = None, stabilizer=None, hold=()):
        if not isinstance(mapping, Mapping):
            raise TypeError(f"LayerMap takes a mapping {{layer kind or module class: rule}}; got {mapping!r}.")
        self.mapping = dict(mapping)
        self.stabilizer = stabilizer
        self.hold = frozenset(hold)
        if not self.hold <= {"softmax", "selection"}:
            raise ValueError(f"LayerMap can hold constant only 'softmax' outputs and 'selection' parameters, "
                             f"got {sorted(self.hold)}.")
        if isinstance(first, Rule):
            first = {WEIGHTED: first}
        if first is not None and not isinstance(first, Mapping):
            raise TypeError(
                f"LayerMap's first= is a rule (for the first dense or conv layer) or a mapping {{key: rule}}; got "
                f"{first!r}" + (f": write first=rules.{first}()" if isinstance(first, str) else "") + "."
            )
        self.first = None if first is None else dict(first)
        for key in [*self.mapping, *(self.first or {})]:
            _matches(key, LayerInfo("", None, "dense"))  # validates the key
        for rule in [*self.mapping.values(), *(self.first or {}).values()]:
            if not isinstance(rule, Rule) and rule is not None:
                raise TypeError(f"LayerMap values must be jaxlrp.rules.Rule instances, got {rule!r}.")

    def rules(self, layers):
        out = [next((r for k, r in self.mapping.items() if _matches(k, info)), None) for info in layers]
        if self.first:
            for i, info in enumerate(layers):
                rule = next((r for k, r in self.first.items() if _matches(k, info)), None)
                if rule is not None:
                    out[i] = rule
                    break
        return out

    def tree_flatten(self):
        first = self.first or {}
        children = (tuple(self.mapping.values()), tuple(first.values()), self.stabilizer)
        return children, (tuple(self.mapping), tuple(first), self.first is not None, self.hold)

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, first_keys, has_first, hold = aux
        obj = object.__new__(cls)
        obj.hold = hold
        obj.mapping = dict(zip(keys, children[0]))
        obj.first = dict(zip(first_keys, children[1])) if has_first else None
        obj.stabilizer = children[2]
        return obj

    def __repr__(self):
        items = ", ".join(f"{_key_name(k)}: {r!r}" for k, r in self.mapping.items())
        first = "" if self.first is None else ", first={" + ", ".join(
            f"{_key_name(k)}: {r!r}" for k, r in self.first.items()) + "}"
        stabilizer = "" if self.stabilizer is None else f", stabilizer={self.stabilizer!r}"
        hold = "" if not self.hold else f", hold={tuple(sorted(self.hold))!r}"
        return f"LayerMap({{{items}}}{first}{stabilizer}{hold})"


@jax.tree_util.register_pytree_node_class
class NameMap(Composite):
    """Rules by name: `{fnmatch pattern: rule}`, first match wins. A pattern matches a layer's
    `/`-joined module path or, for a plain function, one of its weight's names
    (`LayerInfo.names`). A pattern that matches no layer is an error."""

    def __init__(self, mapping: Mapping[str, Rule]):
        if not isinstance(mapping, Mapping):
            raise TypeError(f"NameMap takes a mapping {{pattern: rule}}; got {mapping!r}.")
        for pattern, rule in mapping.items():
            if not isinstance(pattern, str):
                raise TypeError(
                    f"NameMap keys are module paths or fnmatch patterns (str), got {pattern!r}: write "
                    f"'{pattern}' (a path), or use LayerMap for layer kinds and module classes."
                )
            if not isinstance(rule, Rule) and rule is not None:
                raise TypeError(f"NameMap values must be jaxlrp.rules.Rule instances, got {rule!r} for '{pattern}'.")
        self.mapping = dict(mapping)

    def rules(self, layers):
        return [next((r for p, r in self.mapping.items() if _named(p, info)), None) for info in layers]

    def unmatched(self, layers):
        return [p for p in self.mapping if not any(_named(p, info) for info in layers)]

    def tree_flatten(self):
        return (tuple(self.mapping.values()),), tuple(self.mapping)

    @classmethod
    def tree_unflatten(cls, keys, children):
        obj = object.__new__(cls)
        obj.mapping = dict(zip(keys, children[0]))
        return obj

    def __repr__(self):
        return f"NameMap({self.mapping!r})"


@jax.tree_util.register_pytree_node_class
class Combined(Composite):
    """Several composites; for each layer, the first that has a rule for it wins."""

    def __init__(self, composites: Sequence[Composite]):
        self.composites = tuple(composites)

    def rules(self, layers):
        out: list = [None] * len(layers)
        for composite in self.composites:
            for i, rule in enumerate(composite.rules(layers)):
                if out[i] is None:
                    out[i] = rule
        return out

    def unmatched(self, layers):
        return [p for composite in self.composites for p in composite.unmatched(layers)]

    @property
    def stabilizer(self):
        return next((c.stabilizer for c in self.composites if c.stabilizer is not None), None)

    @property
    def hold(self):
        return frozenset().union(*(c.hold for c in self.composites))

    def tree_flatten(self):
        return (self.composites,), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(children[0])

    def __repr__(self):
        return "combine(" + ", ".join(map(repr, self.composites)) + ")"


def combine(*composites: Composite) -> Combined:
    """Combines composites: for each layer, the first composite with a rule for it wins."""
    return Combined(composites)


def EpsilonPlus(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> LayerMap:
    """Conv: ZPlus; dense: Epsilon (zennit's `EpsilonPlus`)."""
    return LayerMap({"conv": _rules.ZPlus(stabilizer), "dense": _rules.Epsilon(epsilon)}, stabilizer=stabilizer)


def EpsilonPlusFlat(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> LayerMap:
    """Conv: ZPlus; dense: Epsilon; the first dense/conv layer: Flat (zennit's `EpsilonPlusFlat`)."""
    return LayerMap(
        {"conv": _rules.ZPlus(stabilizer), "dense": _rules.Epsilon(epsilon)},
        first=_rules.Flat(stabilizer),
        stabilizer=stabilizer,
    )


def EpsilonAlpha2Beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> LayerMap:
    """Conv: AlphaBeta(2, 1); dense: Epsilon (zennit's `EpsilonAlpha2Beta1`)."""
    return LayerMap(
        {"conv": _rules.AlphaBeta(2.0, 1.0, stabilizer), "dense": _rules.Epsilon(epsilon)}, stabilizer=stabilizer
    )


def EpsilonAlpha2Beta1Flat(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> LayerMap:
    """Conv: AlphaBeta(2, 1); dense: Epsilon; the first dense/conv layer: Flat."""
    return LayerMap(
        {"conv": _rules.AlphaBeta(2.0, 1.0, stabilizer), "dense": _rules.Epsilon(epsilon)},
        first=_rules.Flat(stabilizer),
        stabilizer=stabilizer,
    )


def EpsilonGammaBox(low, high, epsilon: float = 1e-6, gamma: float = 0.25, stabilizer: float = 1e-6) -> LayerMap:
    """Conv: Gamma(γ); dense: Epsilon; the first conv layer: ZBox(low, high) (zennit's
    `EpsilonGammaBox`). `low`/`high` bound the input, e.g. the normalized pixel range."""
    return LayerMap(
        {"conv": _rules.Gamma(gamma, stabilizer), "dense": _rules.Epsilon(epsilon)},
        first={"conv": _rules.ZBox(low, high, stabilizer)},
        stabilizer=stabilizer,
    )


def LRP0() -> LayerMap:
    """LRP-0 [Bach2015]: every dense and conv layer `Epsilon(0)`, every sum, mean and pooling
    `Norm(0)`. On a ReLU network it equals gradient × input; a zero denominator gives zero."""
    return LayerMap({WEIGHTED: _rules.Epsilon(0.0)}, stabilizer=0.0)


def _transformer(epsilon, gamma, hold) -> LayerMap:
    linear = _rules.Epsilon(epsilon) if gamma is None else _rules.Gamma(gamma, epsilon)
    rules = {WEIGHTED: linear, "bilinear": _rules.Bilinear(epsilon), "affine": _rules.Epsilon(epsilon)}
    return LayerMap(rules, stabilizer=epsilon, hold=hold)


def AttnLRP(epsilon: float = 1e-6, gamma: float | None = None) -> LayerMap:
    """AttnLRP [Achtibat2024]: Epsilon(ε) for dense and conv layers (Gamma(γ) with `gamma`),
    the softmax rule, `Bilinear(ε)` for Q·Kᵀ and A·V, and every stabilizer (norms, residual
    adds, means) ε."""
    return _transformer(epsilon, gamma, ())


def CPLRP(epsilon: float = 1e-6, gamma: float | None = None, hold_gate: bool = True) -> Composite:
    """CP-LRP [Ali2022]: as `AttnLRP`, with the attention weights held constant: relevance
    reaches the values through `V ↦ A·V` (the ε rule) and nothing flows into Q and K.

    `hold_gate` (the default, as LXT 2.1's CP-LRP for Llama, Qwen and Gemma): a gated MLP's
    activated branch is held too (`HoldGatedMLP`), so the linear branch takes the product's
    relevance; with `False` the product splits evenly, as under AttnLRP. Held by default
    because that is CP-LRP's own idea applied to the MLP's gate (the part of the computation
    that decides how much passes, not what passes), and the reference it is checked against."""
    held = _transformer(epsilon, gamma, ("softmax",))
    return combine(HoldGatedMLP(), held) if hold_gate else held


@jax.tree_util.register_pytree_node_class
class HoldGatedMLP(Composite):
    """`rules.HoldActivated()` for each product of a gated MLP (`act(x·W_g) ⊙ x·W_u`: one
    activated operand, no sigmoid gate); no rule for other layers, so that combined with a
    composite (`combine(HoldGatedMLP(), AttnLRP())`) the others keep theirs."""

    def rules(self, layers):
        return [_rules.HoldActivated() if info.kind == "product" and info.activated and not info.gates else None
                for info in layers]

    def tree_flatten(self):
        return (), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls()

    def __repr__(self):
        return "HoldGatedMLP()"


def MambaLRP(epsilon: float = 1e-6) -> LayerMap:
    """MambaLRP [Jafari2024] for selective state-space models (Mamba): SiLU and the other
    activations Pass; the selection parameters Δ, A̅ = exp(Δ·A), B and C, computed from the
    input, held constant (`hold=("selection",)`, see `jaxlrp._ops.ssm`), so that relevance
    flows along the signal `u → Δ·B·u → h → y` and conserves; Epsilon(ε) for dense and conv
    layers (the projections, the depthwise convolution) and ε for every stabilizer. The output
    gate `y ⊙ silu(z)`, whose operands both only modulate, splits evenly (`Uniform`).

    The recurrence is recognised as a `lax.scan`, whose carry is the state. Written with
    `lax.associative_scan` there is no carry to tell the state from C, and `h·C` stays a
    "bilinear" row of the rule table (check it there); that form is not yet held."""
    return LayerMap({WEIGHTED: _rules.Epsilon(epsilon), "bilinear": _rules.Bilinear(epsilon),
                     "affine": _rules.Epsilon(epsilon)}, stabilizer=epsilon, hold=("selection",))
