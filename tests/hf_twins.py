"""Hugging Face twins: one tiny random config built as the PyTorch model (float64, eval mode) and
as the Flax model, the Flax parameters converted from the torch state dict by transformers' own
`convert_pytorch_state_dict_to_flax`; and LXT 2.1's efficient AttnLRP on the torch side.

LXT's efficient mode patches classes and modules in place (`torch.nn.LayerNorm.forward`,
`torch.nn.Dropout.forward`, `transformers.models.bert.modeling_bert`'s every attribute, ...), for
the rest of the process. `lxt_patched` applies a patch map with `lxt.efficient.monkey_patch` and
puts every patched class and module back as it was when the block ends, so that no other test in
the process sees LXT's forward methods.
"""

import contextlib
import dataclasses
import functools
import types
from typing import Any, Callable

import numpy as np

import peers


def lxt_efficient():
    """`lxt.efficient` (skipped, or failed under JAXLRP_REQUIRE_PEERS=1, where torch, transformers
    or lxt is missing)."""
    torch = peers.require("torch")
    peers.require("transformers")
    peers.torchvision_stand_in(torch)
    return peers.require("lxt.efficient")


_MISSING = object()


@contextlib.contextmanager
def lxt_patched(patch_map, extra=()):
    """`lxt.efficient.monkey_patch(None, patch_map)` inside the block; every class and module in
    the map (and in `extra`, patched by the caller inside the block) restored afterwards, attribute
    by attribute."""
    efficient = lxt_efficient()
    targets = list(patch_map) + list(extra)
    saved = [(target, dict(vars(target))) for target in targets]
    try:
        efficient.monkey_patch(None, patch_map)
        yield
    finally:
        for target, before in reversed(saved):
            for key in [k for k in vars(target) if k not in before]:
                delattr(target, key)
            for key, value in before.items():
                if vars(target).get(key, _MISSING) is not value:
                    setattr(target, key, value)


def randomize_(torch_model, seed: int, vector_scale: float = 0.3):
    """Every vector parameter (norm scales and biases, linear biases, the class token's) moved
    off its initial value by `vector_scale`·N(0, 1): LayerNorm and RMSNorm scales that are not 1
    and shifts that are not 0, so that a norm rule that ignores them shows."""
    torch = peers.require("torch")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in torch_model.parameters():
            if parameter.dim() == 1 or parameter.shape[:-1].numel() == 1:
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.add_(vector_scale * noise)
    return torch_model


def flax_params(torch_model, flax_class, config, dtype):
    """The Flax model (`_do_init=False`: no random initialization) and the torch model's weights
    as its parameters, converted by transformers' `convert_pytorch_state_dict_to_flax` (which
    needs only the parameters' names and shapes, from `params_shape_tree`)."""
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    flax_model = flax_class(config, dtype=dtype, _do_init=False)
    shapes = types.SimpleNamespace(params=flax_model.params_shape_tree, base_model_prefix=flax_model.base_model_prefix)
    state = {k: v.detach().clone() for k, v in torch_model.state_dict().items()}
    params = convert_pytorch_state_dict_to_flax(state, shapes)
    return flax_model, params


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


# ---- the four twins ----------------------------------------------------------------------


@dataclasses.dataclass
class Twin:
    """One architecture in both libraries, with the same weights.

    `flax_module` is the Linen module (`flax_model.module`) with its `variables`; `x` the
    explained input (token ids, or pixels in Flax's NHWC); `call_kwargs` the arrays it takes
    beside (masks, position and token-type ids), `model_kwargs` its static arguments, `output`
    what is explained of its output. `torch_model()` builds a fresh torch model from
    `torch_module`'s class of that name as it is at that moment (inside `lxt_patched`, LXT's own
    copy for BERT), with the same state dict; `leaf(model)` is where LXT reads relevance (the
    input embeddings, or the pixels), `logits(model, leaf)` the explained logits (batch, classes).
    """

    name: str
    config: Any
    torch_module: Any
    torch_class: str
    state_dict: dict
    flax_module: Any
    variables: dict
    x: Any
    call_kwargs: dict
    model_kwargs: dict
    output: Callable
    leaf: Callable
    logits: Callable
    patch_map: dict
    tokens: bool = True
    torch_float64: dict = dataclasses.field(default_factory=dict)
    flax_context: Callable = contextlib.nullcontext

    def torch_model(self):
        model = getattr(self.torch_module, self.torch_class)(self.config).double().eval()
        model.load_state_dict(self.state_dict)
        return model


def _build(torch_module, torch_class, flax_class, config, seed):
    torch = peers.require("torch")
    import jax.numpy as jnp

    config._attn_implementation = "sdpa"  # HF's default; torch's "eager" Llama and ViT take the softmax in float32
    torch.manual_seed(seed)
    model = randomize_(getattr(torch_module, torch_class)(config).double().eval(), seed + 1)
    flax_model, params = flax_params(model, flax_class, config, jnp.float64)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, flax_model, {"params": params}


def _token_inputs(rng, vocab, shape):
    import jax.numpy as jnp

    ids = jnp.asarray(rng.integers(0, vocab, shape))
    return ids, {"attention_mask": jnp.ones(shape, "i4"), "position_ids": jnp.broadcast_to(jnp.arange(shape[1]), shape)}


def _embeddings(model):
    return model.get_input_embeddings()


BATCH, TOKENS = 2, 7


def llama(seed=0, float64=False):
    """LlamaForCausalLM: 2 layers, width 16, 4 query heads over 2 key-value heads (grouped-query),
    SiLU-gated MLP, RMSNorm, rotary positions, untied head; the last position's logits.

    `float64`: both models in float64 throughout. The stock models are not: torch's
    `LlamaRMSNorm` (and LXT's `rms_norm_forward` that replaces it) normalizes in float32, torch's
    `LlamaRotaryEmbedding` takes cos and sin in float32, and the Flax model has three float32 steps
    (`flax_llama_float64`). With `float64`, LXT's patch map gets a float64 `rms_norm_forward`
    (its own, without the casts) and a float64 rotary embedding (`torch_float64`), and the Flax
    model runs under `flax_llama_float64`."""
    transformers = peers.require("transformers")
    from transformers.models.llama import modeling_llama
    from transformers.models.llama.modeling_flax_llama import FlaxLlamaForCausalLM

    lxt_efficient()
    import lxt.efficient.models.llama as lxt_llama

    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, initializer_range=0.3, rms_norm_eps=1e-6,
        tie_word_embeddings=False)
    state, flax_model, variables = _build(modeling_llama, "LlamaForCausalLM", FlaxLlamaForCausalLM, config, seed)
    ids, call_kwargs = _token_inputs(np.random.default_rng(seed), config.vocab_size, (BATCH, TOKENS))
    ids_torch = peers.require("torch").tensor(np.asarray(ids))
    torch_float64 = {}
    if float64:
        from lxt.efficient.patches import patch_method

        torch_float64 = {
            modeling_llama.LlamaRMSNorm: functools.partial(patch_method, _rms_norm_forward_float64),
            modeling_llama.LlamaRotaryEmbedding: functools.partial(patch_method, _rotary_forward_float64),
        }
    return Twin(
        "llama", config, modeling_llama, "LlamaForCausalLM", state, flax_model.module, variables, ids, call_kwargs,
        {"deterministic": True}, lambda out: out.logits[:, -1],
        lambda model: _embeddings(model)(ids_torch),
        lambda model, leaf: model(inputs_embeds=leaf, use_cache=False).logits[:, -1],
        {**lxt_llama.attnLRP, **torch_float64}, torch_float64=torch_float64,
        flax_context=flax_llama_float64 if float64 else contextlib.nullcontext)


def gpt2(seed=0):
    """GPT2LMHeadModel: 2 layers, width 16, 2 heads, tanh-approximated GELU, learned positions
    added to the token embeddings, head tied to them; the last position's logits."""
    transformers = peers.require("transformers")
    from transformers.models.gpt2 import modeling_gpt2
    from transformers.models.gpt2.modeling_flax_gpt2 import FlaxGPT2LMHeadModel

    lxt_efficient()
    import lxt.efficient.models.gpt2 as lxt_gpt2

    config = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, initializer_range=0.3,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    state, flax_model, variables = _build(modeling_gpt2, "GPT2LMHeadModel", FlaxGPT2LMHeadModel, config, seed)
    ids, call_kwargs = _token_inputs(np.random.default_rng(seed), config.vocab_size, (BATCH, TOKENS))
    ids_torch = peers.require("torch").tensor(np.asarray(ids))
    return Twin(
        "gpt2", config, modeling_gpt2, "GPT2LMHeadModel", state, flax_model.module, variables, ids, call_kwargs,
        {"deterministic": True}, lambda out: out.logits[:, -1],
        lambda model: _embeddings(model)(ids_torch),
        lambda model, leaf: model(inputs_embeds=leaf, use_cache=False).logits[:, -1], dict(lxt_gpt2.attnLRP))


def bert(seed=0):
    """BertForSequenceClassification: 2 layers, width 16, 2 heads, exact GELU, post-norm
    LayerNorms (ε = 1e-12), learned position and token-type embeddings, tanh pooler, 3 classes.

    LXT's BERT map replaces every attribute of `modeling_bert` with its own copy of the file
    (the uniform rule in the attention, the identity rule on the GELU and the pooler's tanh), so
    the torch model is built inside `lxt_patched` from the module's class as it is then."""
    transformers = peers.require("transformers")
    torch = peers.require("torch")
    import jax.numpy as jnp
    from transformers.models.bert import modeling_bert
    from transformers.models.bert.modeling_flax_bert import FlaxBertForSequenceClassification

    lxt_efficient()
    import lxt.efficient.models.bert as lxt_bert

    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, type_vocab_size=2, num_labels=3, initializer_range=0.3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    state, flax_model, variables = _build(modeling_bert, "BertForSequenceClassification",
                                          FlaxBertForSequenceClassification, config, seed)
    ids, call_kwargs = _token_inputs(np.random.default_rng(seed), config.vocab_size, (BATCH, TOKENS))
    segments = np.zeros((BATCH, TOKENS), np.int64)
    segments[:, 4:] = 1  # two segments
    call_kwargs["token_type_ids"] = jnp.asarray(segments)
    ids_torch, segments_torch = torch.tensor(np.asarray(ids)), torch.tensor(segments)
    return Twin(
        "bert", config, modeling_bert, "BertForSequenceClassification", state, flax_model.module, variables, ids,
        call_kwargs, {"deterministic": True, "head_mask": None}, lambda out: out.logits,
        lambda model: _embeddings(model)(ids_torch),
        lambda model, leaf: model(inputs_embeds=leaf, token_type_ids=segments_torch,
                                  attention_mask=torch.ones_like(segments_torch)).logits,
        dict(lxt_bert.attnLRP))


def vit(seed=0):
    """ViTForImageClassification: 16×16 RGB images in 8×8 patches (4 patches and the class
    token), 2 layers, width 16, 2 heads, exact GELU, pre-norm LayerNorms (ε = 1e-12), 3 classes.

    LXT 2.1 has no patch map for Hugging Face's ViT (its `vit_torch` map is torchvision's, and
    CP-LRP), so this one is assembled from LXT's own AttnLRP patches as its Llama and GPT-2 maps
    are: `layer_norm_forward` on LayerNorm, `non_linear_forward` (the identity rule) on the GELU,
    `dropout_forward`, and `patch_attention` on `modeling_vit` (the uniform rule on Q·Kᵀ and A·V
    through `eager_attention_forward` and `ALL_ATTENTION_FUNCTIONS`)."""
    transformers = peers.require("transformers")
    torch = peers.require("torch")
    import jax.numpy as jnp
    from transformers.activations import GELUActivation
    from transformers.models.vit import modeling_vit
    from transformers.models.vit.modeling_flax_vit import FlaxViTForImageClassification

    lxt_efficient()
    from lxt.efficient.patches import (dropout_forward, layer_norm_forward, non_linear_forward, patch_attention,
                                       patch_method)

    config = transformers.ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3, initializer_range=0.3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    state, flax_model, variables = _build(modeling_vit, "ViTForImageClassification",
                                          FlaxViTForImageClassification, config, seed)
    pixels = np.random.default_rng(seed).standard_normal((BATCH, 3, 16, 16))
    patch_map = {
        torch.nn.LayerNorm: functools.partial(patch_method, layer_norm_forward),
        GELUActivation: functools.partial(patch_method, non_linear_forward, keep_original=True),
        torch.nn.Dropout: functools.partial(patch_method, dropout_forward),
        modeling_vit: patch_attention,
    }
    return Twin(
        "vit", config, modeling_vit, "ViTForImageClassification", state, flax_model.module, variables,
        jnp.asarray(pixels.transpose(0, 2, 3, 1)), {}, {"deterministic": True}, lambda out: out.logits,
        lambda model: torch.tensor(pixels), lambda model, leaf: model(pixel_values=leaf).logits, patch_map,
        tokens=False)


# ---- Llama in float64 throughout ---------------------------------------------------------


def _rms_norm_forward_float64(self, hidden_states):
    """LXT's `rms_norm_forward` (the identity rule: 1/σ through `stop_gradient`) without its
    casts to float32 and back."""
    from lxt.efficient.rules import stop_gradient

    torch = peers.require("torch")
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * stop_gradient(torch.rsqrt(variance + self.variance_epsilon)))


def _rotary_forward_float64(self, x, position_ids):
    """`LlamaRotaryEmbedding.forward` (default rotary type) with the angles, cos and sin in
    float64, not float32."""
    torch = peers.require("torch")
    dim = 2 * self.inv_freq.shape[0]
    inverse = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = position_ids[..., None].double() * inverse
    angles = torch.cat((angles, angles), -1)
    return (angles.cos() * self.attention_scaling).to(x.dtype), (angles.sin() * self.attention_scaling).to(x.dtype)


@contextlib.contextmanager
def flax_llama_float64():
    """Hugging Face's Flax Llama in float64 throughout, while the block runs (traces): its three
    float32 steps replaced by the same computation in the model's dtype. `FlaxLlamaRMSNorm` takes
    the variance in float32; `create_sinusoidal_positions` rounds the rotary angles to float32
    and takes sin and cos there; `FlaxLlamaAttention` sets `attention_softmax_in_fp32 = dtype is
    not jnp.float32`, True for float64, so its softmax runs in float32."""
    import jax.numpy as jnp
    import pytest
    from transformers.models.llama import modeling_flax_llama as flax_llama

    class RMSNorm(flax_llama.FlaxLlamaRMSNorm):
        def __call__(self, hidden_states):
            variance = jnp.power(hidden_states, 2).mean(-1, keepdims=True)
            return self.weight * (hidden_states / jnp.sqrt(variance + self.epsilon))

    class Attention(flax_llama.FlaxLlamaAttention):
        def setup(self):
            super().setup()
            self.attention_softmax_in_fp32 = False

    def sinusoidal_positions(num_pos, dim):
        inverse = 1.0 / (10000 ** (np.arange(0, dim, 2) / dim))
        angles = np.einsum("i , j -> i j", np.arange(num_pos), inverse)  # no .astype("float32")
        angles = np.concatenate((angles, angles), axis=-1)
        out = np.concatenate((np.sin(angles)[:, None, :], np.cos(angles)[:, None, :]), axis=-1)
        return jnp.array(out[:, :, :num_pos])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flax_llama, "FlaxLlamaRMSNorm", RMSNorm)
        patch.setattr(flax_llama, "FlaxLlamaAttention", Attention)
        patch.setattr(flax_llama, "create_sinusoidal_positions", sinusoidal_positions)
        yield


# ---- the two sides' maps -----------------------------------------------------------------


def flax_logits(twin):
    with twin.flax_context():
        out = twin.flax_module.apply(twin.variables, twin.x, **twin.call_kwargs, **twin.model_kwargs)
        return np.asarray(twin.output(out))


def torch_logits(twin):
    """The torch model's logits, unpatched by LXT (in float64 throughout with `torch_float64`)."""
    torch = peers.require("torch")
    with lxt_patched(twin.torch_float64):
        model = twin.torch_model()
        with torch.no_grad():
            return twin.logits(model, twin.leaf(model)).numpy()


def jaxlrp_relevance(twin, epsilons, target):
    """jaxlrp's `AttnLRP(epsilon)` map of the Flax model for each of `epsilons`, from one
    compiled function (the composite built from the traced ε)."""
    import jax
    import jax.numpy as jnp
    import jaxlrp
    from jaxlrp import composites

    @jax.jit
    def explain(epsilon, variables, x, call_kwargs, target):
        lrp = jaxlrp.lrp(twin.flax_module, composites.AttnLRP(epsilon=epsilon), output=twin.output, **twin.model_kwargs)
        return lrp(variables, x, **call_kwargs, target=target)

    with twin.flax_context():
        return [np.asarray(explain(jnp.float64(epsilon), twin.variables, twin.x, twin.call_kwargs, jnp.asarray(target)))
                for epsilon in epsilons]


def torch_relevance(twin, target, patch_map=None, identity_epsilon=None):
    """LXT's efficient procedure: relevance = leaf.grad · leaf after `logit.backward()` (each
    sample's target logit; their sum, the samples being independent), summed over the embedding
    features for tokens, in Flax's NHWC for pixels. `patch_map` None: the model unpatched, plain
    gradient × input (in float64 throughout with `torch_float64`). `identity_epsilon`: the
    stabilizer of LXT's identity rule (`identity_rule_implicit_fn.forward`'s `epsilon`, 1e-10 in
    `output / (input + epsilon)`) replaced. Returns (relevance, logits)."""
    torch = peers.require("torch")
    lxt_efficient()
    from lxt.efficient.rules import identity_rule_implicit_fn

    def run():
        model = twin.torch_model()
        leaf = twin.leaf(model).detach().requires_grad_()
        logits = twin.logits(model, leaf)
        logits[torch.arange(logits.shape[0]), torch.as_tensor(np.asarray(target))].sum().backward()
        relevance = (leaf.grad * leaf).detach().numpy()
        return (relevance.sum(-1) if twin.tokens else relevance.transpose(0, 2, 3, 1)), logits.detach().numpy()

    if patch_map is None:
        with lxt_patched(twin.torch_float64):
            return run()
    with lxt_patched(patch_map, extra=(identity_rule_implicit_fn,)):
        if identity_epsilon is not None:
            forward = vars(identity_rule_implicit_fn)["forward"].__func__
            identity_rule_implicit_fn.forward = staticmethod(
                lambda ctx, fn, input, epsilon=None: forward(ctx, fn, input, identity_epsilon))
        return run()
