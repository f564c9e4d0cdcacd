"""Hugging Face's Flax models: jaxlrp's AttnLRP equals LXT 2.1's efficient AttnLRP on the
PyTorch twin with the same weights (float64).

Models (`tests/hf_twins.py`), each from a tiny random config, built in torch (`.double().eval()`,
vector parameters moved off their initial values), the Flax parameters converted from its state
dict by `transformers.modeling_flax_pytorch_utils.convert_pytorch_state_dict_to_flax`:
FlaxLlamaForCausalLM, FlaxGPT2LMHeadModel, FlaxBertForSequenceClassification,
FlaxViTForImageClassification; batch 2, 7 tokens or 16×16 images. "llama-float64" is the Llama
pair with the float32 steps of both models replaced by float64 (see `hf_twins.llama`).

What is compared. jaxlrp: `jaxlrp.lrp(model.module, AttnLRP(epsilon=ε), output=...,
deterministic=True)(variables, x, attention_mask=..., position_ids=..., target=t)`, the stock
Linen module; for token ids the relevance read at the token embedding's output and summed over
its features. LXT: its README's efficient procedure, `monkey_patch` with its patch map (for
Hugging Face's ViT, which LXT 2.1 has no map for, one assembled from LXT's own patches), then
`logits = model(inputs_embeds=x)` with `x = model.get_input_embeddings()(ids)` (pixels for ViT),
`logits[target].backward()`, relevance `(x.grad * x).sum(-1)`. Both read relevance at the same
place: the word embeddings' output, before GPT-2's and BERT's position (and token-type)
embeddings are added, which take their share like a bias on both sides (jaxlrp's "affine" rows,
gradient × input at `x` in LXT). Targets: each sample's arg-max class (last position for the
causal LMs), seeded with its logit on both sides. Error: max|ours − theirs| / max|theirs|.

Where the two differ by construction: their stabilizers. LXT's efficient mode is gradient ×
input, so every linear layer, add and norm has ε = 0; its one stabilizer is the unsigned 1e-10
in its identity rule (`identity_rule_implicit_fn`: `output / (input + 1e-10)`, on GELU, SiLU,
tanh). jaxlrp's AttnLRP(ε) puts a signed ε in every ε-rule denominator and none on the identity.
So jaxlrp runs with ε = 1e-15 (≈ LXT's 0), and LXT both as shipped and with its identity
stabilizer set to 0 (`identity_epsilon=0.0`, the `epsilon` argument of LXT's own
`identity_rule_implicit_fn.forward`). Without stabilizers on either side the maps agree to
1.9e-14 - 2.2e-12 (all four models, seeds 0-3 of `hf_twins`); LXT's shipped 1e-10 alone moves
its map by up to 1.5e-8 (BERT, seed 2: it changes the relevance through each activation by
1e-10 / |input|, 1e-8 for an input of 1e-2), which sets the as-shipped tolerance.
"""

import numpy as np
import pytest

import hf_twins

pytestmark = pytest.mark.float64

EPSILON = 1e-15  # jaxlrp's ε, in place of LXT's 0 on linear layers, adds and norms
WIDE_EPSILON = 1e-10  # the same map with LXT's identity-rule number as jaxlrp's ε: the check must see it

VARIANTS = ("llama", "llama-float64", "gpt2", "bert", "vit")
FLOAT64_VARIANTS = VARIANTS[1:]

# Forward pass, Flax against torch. Measured (seed 0): llama 3.3e-7, llama-float64 7.7e-16,
# gpt2 3.8e-16, bert 1.5e-15, vit 3.4e-16. The stock Llama pair is float32 in places (torch:
# RMSNorm and the rotary cos/sin; Flax: the RMSNorm variance, the rotary table and, for
# dtype=float64, the softmax), each side rounding differently.
FORWARD = {"llama": 1e-6}
FORWARD_FLOAT64 = 1e-12

# jaxlrp (ε = 1e-15) against LXT as shipped. Measured (seed 0): llama 1.5e-7 (its float32 steps),
# llama-float64 1.2e-10, gpt2 4.4e-10, bert 1.2e-9, vit 2.8e-10; seeds 1-3 up to 1.8e-10,
# 1.8e-9, 1.5e-8, 3.9e-10 (LXT's identity stabilizer, see the module docstring). The stock
# Llama pair at 1.5e-7 is its float32 steps: the same pair in float64 is at 1.2e-10.
AS_SHIPPED = {"llama": 1e-6}
AS_SHIPPED_FLOAT64 = 1e-7

# jaxlrp (ε = 1e-15) against LXT with its identity stabilizer 0. Measured (seed 0):
# llama-float64 8.6e-14, gpt2 1.3e-13, bert 4.5e-14, vit 1.4e-13; seeds 1-3 at most 2.2e-12.
WITHOUT_STABILIZERS = 1e-10


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request):
    """Everything one model's tests compare, computed once."""
    name = request.param
    twin = hf_twins.llama(float64=True) if name == "llama-float64" else getattr(hf_twins, name)()
    flax_logits = hf_twins.flax_logits(twin)
    torch_logits = hf_twins.torch_logits(twin)
    target = torch_logits.argmax(-1)
    ours, ours_wide = hf_twins.jaxlrp_relevance(twin, (EPSILON, WIDE_EPSILON), target)
    shipped, lxt_logits = hf_twins.torch_relevance(twin, target, twin.patch_map)
    exact, _ = hf_twins.torch_relevance(twin, target, twin.patch_map, identity_epsilon=0.0)
    plain, _ = hf_twins.torch_relevance(twin, target)
    return dict(name=name, twin=twin, flax_logits=flax_logits, torch_logits=torch_logits, lxt_logits=lxt_logits,
                target=target, ours=ours, ours_wide=ours_wide, shipped=shipped, exact=exact, plain=plain)


@pytest.mark.parametrize("pair", VARIANTS, indirect=True)
def test_flax_forward_equals_torch(pair):
    """The converted Flax model computes the torch model's logits; LXT's patches leave torch's
    forward pass as it was."""
    config = pair["twin"].config
    classes = config.vocab_size if pair["name"] in ("llama", "llama-float64", "gpt2") else config.num_labels
    assert pair["flax_logits"].shape == pair["torch_logits"].shape == (hf_twins.BATCH, classes)
    error = hf_twins.relative_error(pair["flax_logits"], pair["torch_logits"])
    assert error <= FORWARD.get(pair["name"], FORWARD_FLOAT64), error
    lxt = hf_twins.relative_error(pair["lxt_logits"], pair["torch_logits"])
    assert lxt <= 1e-12, lxt


@pytest.mark.parametrize("pair", VARIANTS, indirect=True)
def test_attnlrp_equals_lxt_as_shipped(pair):
    """jaxlrp's AttnLRP on the stock Flax model against LXT's efficient AttnLRP as it ships, on
    its own; the tolerance is what LXT's identity-rule stabilizer (float64 pairs) or the stock
    Llama pair's float32 steps account for (values at the top of the module)."""
    ours, theirs = pair["ours"], pair["shipped"]
    twin = pair["twin"]
    assert ours.shape == (twin.x.shape[:2] if twin.tokens else twin.x.shape)
    assert np.all(np.isfinite(ours))
    error = hf_twins.relative_error(ours, theirs)
    assert error <= AS_SHIPPED.get(pair["name"], AS_SHIPPED_FLOAT64), error
    # A map that is not AttnLRP's is far outside: torch's plain gradient × input (measured 0.9-9.6).
    # (jaxlrp's CPLRP, or AttnLRP with gamma=0.01, measured 0.05-1.1 off on GPT-2 and BERT.)
    assert hf_twins.relative_error(pair["plain"], theirs) > 0.1


@pytest.mark.parametrize("pair", FLOAT64_VARIANTS, indirect=True)
def test_attnlrp_equals_lxt_without_stabilizers(pair):
    """Both sides at ε ≈ 0 (jaxlrp ε = 1e-15, LXT's identity rule without its 1e-10), float64
    throughout: the two implementations of AttnLRP (uniform rule on Q·Kᵀ and A·V, the softmax
    rule, identity on the activations, 1/σ held in the norms, half to each factor of Llama's
    gated product, the z-rule elsewhere) give the same map to float64 rounding. The same jaxlrp
    map with ε = 1e-10 is outside the tolerance (measured 4.4e-9 - 1.4e-8): the check resolves a
    stabilizer's worth of difference."""
    error = hf_twins.relative_error(pair["ours"], pair["exact"])
    assert error <= WITHOUT_STABILIZERS, error
    assert hf_twins.relative_error(pair["ours_wide"], pair["exact"]) > WITHOUT_STABILIZERS
