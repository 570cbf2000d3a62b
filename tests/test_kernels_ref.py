"""The PyTorch references of kernels/ against independent math (transformers, float64 loops), and
the Triton kernels themselves through Triton's CPU interpreter."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

import kernels
from kernels.attention import cached_attention_reference, visible_keys
from kernels.fp8 import FP8, Fp8Linear, fp8_linear_reference, quantize_fp8
from kernels.rmsnorm import add_rmsnorm_reference
from kernels.rope import rope_kv_write_reference

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- rmsnorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rmsnorm_matches_hf(dtype):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
    x, residual = torch.randn(2, 7, 96, dtype=dtype), torch.randn(2, 7, 96, dtype=dtype)
    normed, new_residual = add_rmsnorm_reference(x, residual, norm.weight.detach(), 1e-5)
    assert torch.equal(new_residual, x + residual)
    assert torch.equal(normed, norm(x + residual).detach())
    normed, same = add_rmsnorm_reference(x, None, norm.weight.detach(), 1e-5)
    assert same is x and torch.equal(normed, norm(x).detach())


# ---------------------------------------------------------------- rope + cache write


def _hf_tables(head_dim: int, n_positions: int):
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=n_positions)
    rotary = LlamaRotaryEmbedding(config)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(n_positions)[None])
    return cos[0], sin[0]  # [S, D], both halves equal


@pytest.mark.parametrize("table", ["full", "half"])
def test_rope_kv_write_matches_hf(table):
    torch.manual_seed(0)
    B, T, Hq, Hkv, D, S = 3, 4, 8, 2, 32, 40
    cos, sin = _hf_tables(D, S)
    q, k, v = torch.randn(B, T, Hq, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    positions = torch.tensor([[0, 1, 2, 3], [17, 18, 19, 20], [36, 37, 38, -1]])  # last: padding token
    slots = torch.tensor([4, 0, 2])
    k_cache = torch.full((5, Hkv, S, D), float("nan"))
    v_cache = torch.full((5, Hkv, S, D), float("nan"))
    tables = (cos, sin) if table == "full" else (cos[:, : D // 2], sin[:, : D // 2])
    q_rot = rope_kv_write_reference(q, k, v, *tables, positions, slots, k_cache, v_cache)

    rot = positions.clamp(min=0)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos[rot], sin[rot], unsqueeze_dim=2)
    torch.testing.assert_close(q_rot, hf_q, rtol=1e-6, atol=1e-6)
    written = torch.zeros(5, S, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            p = int(positions[b, t])
            if p < 0:
                continue
            written[slots[b], p] = True
            torch.testing.assert_close(k_cache[slots[b], :, p], hf_k[b, t], rtol=1e-6, atol=1e-6)
            assert torch.equal(v_cache[slots[b], :, p], v[b, t])
    for cache in (k_cache, v_cache):  # nothing else touched
        assert torch.equal(~cache.isnan().all(-1), written[:, None, :].expand(-1, Hkv, -1))


def test_rope_cache_positions_decouple_rotation_from_row():
    """Tree drafts: siblings share a rotary position (depth) but are stored in distinct cache rows."""
    torch.manual_seed(0)
    B, T, Hq, Hkv, D, S = 1, 4, 4, 2, 16, 16
    cos, sin = _hf_tables(D, S)
    q, k, v = torch.randn(B, T, Hq, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    rotary = torch.tensor([[5, 6, 6, 7]])
    rows = torch.tensor([[5, 6, 7, 8]])
    k_cache, v_cache = torch.zeros(1, Hkv, S, D), torch.zeros(1, Hkv, S, D)
    rope_kv_write_reference(q, k, v, cos, sin, rotary, torch.tensor([0]), k_cache, v_cache, cache_positions=rows)
    _, hf_k = apply_rotary_pos_emb(q, k, cos[rotary], sin[rotary], unsqueeze_dim=2)
    torch.testing.assert_close(k_cache[0, :, 5:9].transpose(0, 1), hf_k[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache[0, :, 5:9].transpose(0, 1), v[0])


# ---------------------------------------------------------------- attention


def _naive_attention(q, k_cache, v_cache, slots, positions, tree_mask):
    """Explicit float64 loops over rows, queries, heads and keys, visibility written out by hand."""
    B, T, Hq, D = q.shape
    G = Hq // k_cache.shape[1]
    out = torch.zeros(B, T, Hq, D, dtype=torch.float64)
    for b in range(B):
        p0 = int(positions[b, 0])
        for t in range(T):
            pos = int(positions[b, t])
            keys = [n for n in range(pos + 1)
                    if tree_mask is None or n < p0 or n - p0 >= T or tree_mask[b, t, n - p0]]
            for h in range(Hq):
                if not keys:
                    continue
                kk = k_cache[slots[b], h // G, keys].double()
                vv = v_cache[slots[b], h // G, keys].double()
                weights = torch.softmax(kk @ q[b, t, h].double() / math.sqrt(D), dim=0)
                out[b, t, h] = weights @ vv
    return out


@pytest.mark.parametrize("tree", [False, True])
def test_attention_reference_matches_naive(tree):
    torch.manual_seed(0)
    B, T, Hq, Hkv, D, S = 3, 4, 6, 2, 16, 24
    q = torch.randn(B, T, Hq, D)
    k_cache, v_cache = torch.randn(4, Hkv, S, D), torch.randn(4, Hkv, S, D)
    slots = torch.tensor([3, 0, 1])
    positions = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13], [20, 21, -1, -1]])
    tree_mask = None
    if tree:  # token 0 root; 1 and 2 its children; 3 child of 2
        tree_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
        tree_mask = tree_mask.expand(B, T, T).clone()
    got = cached_attention_reference(q, k_cache, v_cache, slots, positions, tree_mask)
    want = _naive_attention(q, k_cache, v_cache, slots, positions, tree_mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert (got[2, 2:] == 0).all()  # padding queries
    # A shorter window that still covers every position gives the same result.
    torch.testing.assert_close(cached_attention_reference(q, k_cache, v_cache, slots, positions, tree_mask, 22), got)


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("T,prefix_lens", [(1, [7]), (4, [0, 5, 11]), (9, [16, 0, 1, 30])])
def test_attention_prefix_reference_equals_the_concatenated_slot(T, prefix_lens, tree):
    """Rows reading their first positions from a shared prefix slot attend as rows whose own slot holds the
    prefix followed by their own keys; their own entries below the prefix length are never read (NaN here)."""
    torch.manual_seed(0)
    B, Hq, Hkv, D, S = len(prefix_lens), 6, 2, 16, 48
    q = torch.randn(B, T, Hq, D)
    k_cache, v_cache = torch.randn(B + 3, Hkv, S, D), torch.randn(B + 3, Hkv, S, D)  # rows' slots, then 2 prefix slots
    slots = torch.randperm(B + 1)[:B]
    prefix = torch.tensor([[B + 1 + b % 2, n] for b, n in enumerate(prefix_lens)])
    positions = (prefix[:, 1] + torch.randint(0, 6, (B,)))[:, None] + torch.arange(T)
    joined_k, joined_v = k_cache[slots].clone(), v_cache[slots].clone()
    for b, (pslot, n) in enumerate(prefix.tolist()):
        joined_k[b, :, :n], joined_v[b, :, :n] = k_cache[pslot, :, :n], v_cache[pslot, :, :n]
        k_cache[slots[b], :, :n] = v_cache[slots[b], :, :n] = float("nan")
    tree_mask = None
    if tree:
        tree_mask = torch.tril(torch.ones(T, T, dtype=torch.bool)).expand(B, T, T).clone()
        tree_mask[:, 1:, 0] = False  # the later tokens do not see the step's first one
    got = cached_attention_reference(q, k_cache, v_cache, slots, positions, tree_mask, prefix=prefix)
    want = cached_attention_reference(q, joined_k, joined_v, torch.arange(B), positions, tree_mask)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    naive = _naive_attention(q, joined_k, joined_v, torch.arange(B), positions, tree_mask)
    torch.testing.assert_close(got.double(), naive, rtol=1e-5, atol=1e-5)


def test_visible_keys_tree():
    positions = torch.tensor([[3, 4, 5]])
    tree_mask = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)  # 1 and 2 are siblings
    got = visible_keys(positions, tree_mask, 7).int().tolist()
    assert got == [[[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 1, 0]]]


def test_attention_rejects_bad_shapes():
    q = torch.randn(1, 1, 6, 16)
    cache = torch.randn(2, 4, 8, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        kernels.cached_attention(q, cache, cache, torch.tensor([0]), torch.tensor([[0]]))
    cache = torch.randn(2, 3, 8, 16)
    with pytest.raises(ValueError, match="tree_mask must be bool"):
        kernels.cached_attention(q, cache, cache, torch.tensor([0]), torch.tensor([[0]]), torch.ones(1, 1, 1))
    with pytest.raises(ValueError, match="prefix must be integer"):
        kernels.cached_attention(q, cache, cache, torch.tensor([0]), torch.tensor([[0]]),
                                 prefix=torch.zeros(1, 3, dtype=torch.long))


# ---------------------------------------------------------------- fp8


def test_quantize_fp8_round_trip_bound():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different magnitude
    w[5] = 0
    w_fp8, scale = quantize_fp8(w)
    assert w_fp8.dtype == FP8 and scale.shape == (64,) and scale.dtype == torch.float32
    torch.testing.assert_close(scale[6:], w[6:].abs().amax(1) / 448, rtol=1e-6, atol=0)
    deq = w_fp8.float() * scale[:, None]
    # e4m3 keeps 3 mantissa bits: half a step is 2^-4 relative; 2^-10 of the scale in the subnormals.
    assert ((deq - w).abs() <= torch.maximum(2 ** -4 * w.abs(), 2 ** -10 * scale[:, None])).all()
    assert (deq[5] == 0).all()
    assert (w_fp8.float().abs().amax(1)[6:] == 448).all()  # the full e4m3 range is used


def test_fp8_linear_reference_and_module():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48, bias=True)
    layer = Fp8Linear.from_linear(linear)
    assert set(layer.state_dict()) == {"weight_fp8", "scale", "bias"}
    x = torch.randn(2, 3, 128)
    y = layer(x)
    want = x @ (layer.weight_fp8.float() * layer.scale[:, None]).t() + linear.bias.detach()
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(fp8_linear_reference(x, layer.weight_fp8, layer.scale, layer.bias), want)
    # Weight rounding only: well under the 2^-4 per-element worst case.
    rel = (y - linear(x)).norm() / linear(x).norm()
    assert rel < 0.04
    with pytest.raises(ValueError, match="input features"):
        layer(torch.randn(2, 64))


def test_dispatch_uses_reference_on_cpu():
    torch.manual_seed(0)
    x, w = torch.randn(2, 32), torch.randn(32)
    assert torch.equal(kernels.add_rmsnorm(x, x, w, 1e-6)[0], add_rmsnorm_reference(x, x, w, 1e-6)[0])
    w_fp8, scale = kernels.quantize_fp8(torch.randn(16, 32))
    assert torch.equal(kernels.fp8_linear(x, w_fp8, scale), fp8_linear_reference(x, w_fp8, scale))


# ---------------------------------------------------------------- Triton kernels, CPU interpreter


def test_triton_kernels_in_cpu_interpreter():
    """tests/gpu/test_kernels.py at small shapes with TRITON_INTERPRET=1 (the flag must be set before
    triton is imported, hence a separate process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests/gpu/test_kernels.py")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 50, result.stdout[-2000:]
