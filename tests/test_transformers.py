"""Transformers: AttnLRP and CP-LRP on stock Flax attention blocks.

Parity with LXT 2.1 (`lxt.explicit.functional`, float64, ε = 1e-10) on a block built from
stock Flax modules (LayerNorm, MultiHeadDotProductAttention, GELU MLP, residual adds, mean
pooling), with the same weights in torch; CP-LRP against a torch reference written from its
definition (attention weights constant, the ε rule on `V ↦ A·V`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import composites

import peers

EPSILON = 1e-10
FEATURES, HEADS, TOKENS = 8, 2, 5


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, mask=None):
        attention = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=FEATURES, name="attention")
        x = x + attention(nn.LayerNorm(name="ln1")(x), mask=mask)
        h = nn.Dense(2 * FEATURES, name="fc1")(nn.LayerNorm(name="ln2")(x))
        x = x + nn.Dense(FEATURES, name="fc2")(nn.gelu(h))
        return nn.Dense(3, name="head")(x.mean(1))


@pytest.fixture(scope="module")
def block():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, TOKENS, FEATURES), jnp.float64)
    variables = Block().init(jax.random.PRNGKey(1), x)
    rng = np.random.default_rng(2)  # LayerNorm scales and biases that are not 1 and 0
    variables = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 * rng.standard_normal(a.shape) if "ln" in jax.tree_util.keystr(path) else a,
        variables,
    )
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables), x


def _torch_block(variables, x, hold_attention: bool):
    """The same block in torch, each operation through LXT's explicit rule (or, with
    `hold_attention`, CP-LRP's), relevance read as the input's gradient."""
    torch = peers.require("torch")
    F = peers.require("lxt.explicit.functional")
    p = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), variables["params"])

    class Identity(torch.autograd.Function):  # GELU: relevance passes unchanged
        @staticmethod
        def forward(ctx, h):
            return torch.nn.functional.gelu(h, approximate="tanh")

        @staticmethod
        def backward(ctx, r):
            return r

    class HeldAttention(torch.autograd.Function):  # CP-LRP: A constant, ε rule on V ↦ A·V
        @staticmethod
        def forward(ctx, a, v):
            out = a @ v
            ctx.save_for_backward(a, v, out)
            return out

        @staticmethod
        def backward(ctx, r):
            a, v, out = ctx.saved_tensors
            return None, v * (a.transpose(-1, -2) @ (r / (out + EPSILON)))

    def linear(h, kernel, bias, scale=1.0):
        kernel, bias = kernel.reshape(kernel.shape[0], -1) * scale, bias.reshape(-1) * scale
        return F.linear_epsilon_fn.apply(h, kernel.T.contiguous(), bias, EPSILON)

    def layer_norm(h, q):
        return F.layer_norm_grad_fn.apply(h, q["scale"], q["bias"], 1e-6, EPSILON)

    def heads(h):
        return h.reshape(*h.shape[:2], HEADS, -1).transpose(1, 2)

    xt = torch.tensor(np.asarray(x), requires_grad=True)
    a = p["attention"]
    h = layer_norm(xt, p["ln1"])
    depth = FEATURES // HEADS
    q = heads(linear(h, a["query"]["kernel"], a["query"]["bias"], depth**-0.5))
    k, v = heads(linear(h, a["key"]["kernel"], a["key"]["bias"])), heads(linear(h, a["value"]["kernel"], a["value"]["bias"]))
    if hold_attention:
        weights = torch.softmax(q @ k.transpose(-1, -2), -1).detach()
        attended = HeldAttention.apply(weights, v)
    else:
        weights = F.softmax_fn.apply(F.matmul_fn.apply(q, k.transpose(-1, -2), False, EPSILON), -1)
        attended = F.matmul_fn.apply(weights, v, False, EPSILON)
    attended = attended.transpose(1, 2).reshape(*xt.shape[:2], FEATURES)
    out_kernel = a["out"]["kernel"].reshape(FEATURES, FEATURES)
    y = F.add2_tensors_fn.apply(xt, linear(attended, out_kernel, a["out"]["bias"]), False, EPSILON)
    h = Identity.apply(linear(layer_norm(y, p["ln2"]), p["fc1"]["kernel"], p["fc1"]["bias"]))
    y = F.add2_tensors_fn.apply(y, linear(h, p["fc2"]["kernel"], p["fc2"]["bias"]), False, EPSILON)
    out = linear(F.mean_fn.apply(y, 1, False, EPSILON), p["head"]["kernel"], p["head"]["bias"])
    target = out.argmax(-1)
    seed = torch.nn.functional.one_hot(target, 3).to(out.dtype) * out
    out.backward(seed.detach())
    return out.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("name", ["AttnLRP", "CPLRP"])
def test_equals_lxt(block, name):
    variables, x = block
    composite = getattr(composites, name)(epsilon=EPSILON)
    out, relevance = jax.jit(jaxlrp.output_and_lrp(Block(), composite))(variables, x)
    torch_out, expected = _torch_block(variables, x, hold_attention=name == "CPLRP")
    np.testing.assert_allclose(out, torch_out, rtol=1e-12)
    error = np.abs(np.asarray(relevance) - expected).max() / np.abs(expected).max()
    assert error <= 1e-6, error


def test_rule_table_of_a_block(block):
    variables, x = block
    table = jaxlrp.rule_table(Block(), composites.AttnLRP(epsilon=0.01), variables, x)
    kinds = [(info.path, info.kind) for info in table.layers]
    assert ("ln1", "norm") in kinds and ("ln2", "norm") in kinds
    assert [k for p, k in kinds if p == "attention"] == ["bilinear", "softmax", "bilinear"]
    assert {repr(r) for r, info in zip(table.rules, table.layers) if info.kind != "softmax"} == {
        "Epsilon(epsilon=0.01)", "Norm(stabilizer=0.01)", "Bilinear(epsilon=0.01)"}
    held = jaxlrp.rule_table(Block(), composites.CPLRP(epsilon=0.01), variables, x)
    assert [info.kind for info in held.layers if info.path == "attention"] == ["sum"]  # A·V, A constant
    assert "attention/query" not in [info.path for info in held.layers]  # no relevance reaches Q, K


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["AttnLRP", "CPLRP"])
def test_padding_gets_zero_relevance_and_no_nan(block, dtype, name):
    variables, x = block
    variables = jax.tree.map(lambda a: a.astype(dtype), variables)
    x = x.astype(dtype)
    valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    mask = nn.make_attention_mask(valid, valid)

    class Padded(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            return Block(name="block")(x * valid[..., None], mask)  # padded tokens zero

    wrapped = {"params": {"block": variables["params"]}}
    composite = getattr(composites, name)(epsilon=1e-6)
    relevance = jax.jit(lambda v, x: jaxlrp.lrp(Padded(), composite, mask=mask)(v, x))(wrapped, x)
    assert relevance.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(relevance.astype(jnp.float32))))
    assert bool(jnp.all(relevance[0, 3:] == 0))
