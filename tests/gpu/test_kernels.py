"""Each Triton kernel against its PyTorch reference.

Runs on CUDA. With TRITON_INTERPRET=1 and no GPU it runs on CPU through the Triton interpreter at
small shapes (tests/test_kernels_ref.py does that in CI); CUDA-graph tests need a GPU.
Error metric: ||out - ref|| / ||ref|| in float64.
"""

import math
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1 for the CPU interpreter)", allow_module_level=True)

import triton.language as tl  # noqa: E402

from kernels.attention import cached_attention_reference, cached_attention_triton  # noqa: E402
from kernels.fp8 import (  # noqa: E402
    FP8,
    Fp8Linear,
    fp8_linear,
    fp8_linear_reference,
    fp8_linear_scaled_mm,
    fp8_linear_triton,
    quantize_fp8,
    quantize_rows_fp8,
)
from kernels.gemv import gated_linear, linear, linear_reference, small_m_linear_triton  # noqa: E402
from kernels.qkv_rope import qkv_rope_write_reference, qkv_rope_write_triton  # noqa: E402
from kernels.rmsnorm import add_rmsnorm_reference, add_rmsnorm_triton  # noqa: E402
from kernels.rope import rope_kv_write_reference, rope_kv_write_triton  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
needs_cuda = pytest.mark.skipif(INTERPRET, reason="CUDA graphs / _scaled_mm need a GPU")


def _match_gpu_rounding() -> None:
    """The interpreter multiplies bf16 bit patterns as integers in tl.dot and truncates float32 ->
    bf16 / fp8; give it the GPU's semantics (float dot, round-to-nearest-even via torch)."""
    import numpy as np
    from triton.runtime import interpreter as ti

    exact = {tl.bfloat16: (torch.bfloat16, torch.int16, np.uint16), tl.float8e4nv: (FP8, torch.uint8, np.uint8)}

    def rounded(src, dst):
        if dst in exact and src.dtype.scalar in (tl.float32, tl.float16):
            torch_dtype, bits, np_bits = exact[dst]
            data = torch.from_numpy(np.asarray(src.data, dtype=np.float32)).to(torch_dtype)
            return ti.TensorHandle(data.view(bits).numpy().view(np_bits), dst)
        return None

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            return ti.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    builder = ti.InterpreterBuilder
    cast_impl, fp_to_fp, dot = builder.cast_impl, builder.create_fp_to_fp, builder.create_dot

    def cast(self, src, dst_type):
        out = rounded(src, dst_type.scalar)
        return cast_impl(self, src, dst_type) if out is None else out

    def cast_fp(self, src, dst_type, rounding_mode):
        out = rounded(src, dst_type.scalar)
        return fp_to_fp(self, src, dst_type, rounding_mode) if out is None else out

    builder.cast_impl, builder.create_fp_to_fp = cast, cast_fp
    builder.create_dot = lambda self, a, b, d, *args: dot(self, widen(a), widen(b), d, *args)


if INTERPRET:
    _match_gpu_rounding()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


def gpu_or_tiny(gpu, tiny):
    return tiny if INTERPRET else gpu


# ---------------------------------------------------------------- rmsnorm

RMS_SHAPES = gpu_or_tiny([(1, 2048), (17, 2048), (4, 9, 4096), (3, 1000)], [(1, 64), (3, 5, 48)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RMS_SHAPES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("with_weight", [True, False])
def test_add_rmsnorm(shape, dtype, with_residual, with_weight):
    g = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(shape, generator=g, device=DEVICE).to(dtype)
    residual = torch.randn(shape, generator=g, device=DEVICE).to(dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=g, device=DEVICE)).to(dtype) if with_weight else None
    out, res_out = nan_like(x), nan_like(x)
    normed, new_res = add_rmsnorm_triton(x, residual, weight, 1e-5, out=out, residual_out=res_out)
    ref_normed, ref_res = add_rmsnorm_reference(x, residual, weight, 1e-5)
    assert normed is out and not normed.isnan().any()
    assert rel_err(normed, ref_normed) <= TOL[dtype]
    if dtype != torch.float32:
        # Same rounding steps as the reference: outputs differ only where fp32 noise crosses a rounding edge.
        assert (normed != ref_normed).double().mean() <= 0.01
    if with_residual:
        assert new_res is res_out and torch.equal(new_res, ref_res)
    else:
        assert new_res is x and res_out.isnan().all()


# ---------------------------------------------------------------- rope + cache write

# (B, T, Hq, Hkv, D, S_max)
ROPE_SHAPES = gpu_or_tiny(
    [(1, 1, 32, 8, 64, 4096), (2, 9, 32, 8, 128, 1024), (3, 17, 14, 2, 64, 512), (2, 4, 12, 4, 80, 256)],
    [(2, 3, 4, 2, 16, 32), (1, 2, 6, 3, 24, 16)],
)


def _rope_inputs(B, T, Hq, Hkv, D, S, dtype, table_width, fused_qkv=False, seed=0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    if fused_qkv:  # strided views into one projection output, as a fused qkv matmul gives them
        qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g, device=DEVICE).to(dtype)
        q, k, v = (t.view(B, T, -1, D) for t in qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1))
    else:
        q, k, v = (torch.randn(B, T, h, D, generator=g, device=DEVICE).to(dtype) for h in (Hq, Hkv, Hkv))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, device=DEVICE).float() / D)
    angles = torch.arange(S, device=DEVICE).float()[:, None] * inv_freq
    if table_width == D:
        angles = torch.cat((angles, angles), dim=-1)
    starts = torch.randint(0, S - T + 1, (B,), generator=g, device=DEVICE)
    positions = starts[:, None] + torch.arange(T, device=DEVICE)
    slots = torch.randperm(B + 2, generator=g, device=DEVICE)[:B]
    return q, k, v, angles.cos(), angles.sin(), positions, slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROPE_SHAPES)
@pytest.mark.parametrize("table_width,fused_qkv", [("half", False), ("full", True)])
def test_rope_kv_write(shape, dtype, table_width, fused_qkv):
    B, T, Hq, Hkv, D, S = shape
    q, k, v, cos, sin, positions, slots = _rope_inputs(
        B, T, Hq, Hkv, D, S, dtype, D // 2 if table_width == "half" else D, fused_qkv)
    if B * T > 1:
        positions[-1, -1] = -1  # a padding token: rotated as position 0, nothing written
    caches = [torch.full((B + 2, Hkv, S, D), float("nan"), device=DEVICE, dtype=dtype) for _ in range(4)]
    q_out = torch.full((B, T, Hq, D), float("nan"), device=DEVICE, dtype=dtype)
    out = rope_kv_write_triton(q, k, v, cos, sin, positions, slots, caches[0], caches[1], q_out=q_out)
    ref = rope_kv_write_reference(q, k, v, cos, sin, positions, slots, caches[2], caches[3])
    assert out is q_out and not out.isnan().any()
    assert rel_err(out, ref) <= TOL[dtype]
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(got.isnan(), want.isnan())  # exactly the same entries written
        assert rel_err(got.nan_to_num(), want.nan_to_num()) <= TOL[dtype]
    assert torch.equal(caches[1].nan_to_num(), caches[3].nan_to_num())  # v is copied bit for bit


def test_rope_tree_cache_positions():
    B, T, Hq, Hkv, D, S = ROPE_SHAPES[0]
    q, k, v, cos, sin, positions, slots = _rope_inputs(B, T, Hq, Hkv, D, S, torch.float32, D // 2)
    depth = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3] * 2, device=DEVICE)[:T]
    rotary = positions[:, :1] + depth  # siblings share a rotary position, not a cache row
    caches = [torch.full((B + 2, Hkv, S, D), float("nan"), device=DEVICE) for _ in range(4)]
    out = rope_kv_write_triton(q, k, v, cos, sin, rotary, slots, caches[0], caches[1], cache_positions=positions)
    ref = rope_kv_write_reference(q, k, v, cos, sin, rotary, slots, caches[2], caches[3], cache_positions=positions)
    assert rel_err(out, ref) <= TOL[torch.float32]
    assert torch.equal(caches[0].isnan(), caches[2].isnan())
    assert rel_err(caches[0].nan_to_num(), caches[2].nan_to_num()) <= TOL[torch.float32]


# ---------------------------------------------------------------- attention

# (B, T, Hq, Hkv, D, S_max, max_len)
ATTN_SHAPES = gpu_or_tiny(
    [(1, 1, 32, 8, 64, 4096, 4096), (1, 9, 32, 8, 64, 4096, 1024), (2, 5, 32, 8, 128, 1024, 1024),
     (3, 17, 14, 2, 64, 512, 512), (2, 17, 8, 8, 64, 300, 300), (4, 1, 32, 8, 64, 2048, 2048)],
    [(1, 5, 6, 3, 24, 40, 40), (2, 17, 4, 1, 16, 64, 48)],  # the second needs two row tiles
)
SPLITS = gpu_or_tiny([None, 16, 48, 256], [None, 16])


def _attn_inputs(B, T, Hq, Hkv, D, S, max_len, dtype, seed=0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g, device=DEVICE).to(dtype)
    k_cache = torch.randn(B + 1, Hkv, S, D, generator=g, device=DEVICE).to(dtype)
    v_cache = torch.randn(B + 1, Hkv, S, D, generator=g, device=DEVICE).to(dtype)
    starts = torch.randint(0, max_len - T + 1, (B,), generator=g, device=DEVICE)
    starts[0] = max_len - T  # one row reaches the end of the window
    positions = starts[:, None] + torch.arange(T, device=DEVICE)
    slots = torch.randperm(B + 1, generator=g, device=DEVICE)[:B]
    return q, k_cache, v_cache, slots, positions


def _random_tree(B, T, seed=0):
    """Ancestor masks of random trees: token i's parent is a random earlier token."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            mask[b, i, i] = True
            if i:
                parent = int(torch.randint(0, i, (1,), generator=g))
                mask[b, i] |= mask[b, parent]
    return mask.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("split_size", SPLITS)
@pytest.mark.parametrize("tree", [False, True])
def test_cached_attention(shape, dtype, split_size, tree):
    B, T, Hq, Hkv, D, S, max_len = shape
    q, k_cache, v_cache, slots, positions = _attn_inputs(B, T, Hq, Hkv, D, S, max_len, dtype)
    if B > 1:
        positions[-1, T // 2:] = -1  # padding queries: output 0
    tree_mask = _random_tree(B, T) if tree else None
    out = nan_like(q)
    got = cached_attention_triton(q, k_cache, v_cache, slots, positions, tree_mask, max_len, split_size, out=out)
    ref = cached_attention_reference(q, k_cache, v_cache, slots, positions, tree_mask, max_len)
    assert got is out and not got.isnan().any()
    assert rel_err(got, ref) <= TOL[dtype]
    if B > 1:
        assert (got[-1, T // 2:] == 0).all()


def test_cached_attention_many_splits():
    """More splits than the combine kernel reads at once: its running rescale is exercised."""
    B, T, Hq, Hkv, D, S = 1, 2, 2, 1, 16, 1100
    q, k_cache, v_cache, slots, positions = _attn_inputs(B, T, Hq, Hkv, D, S, S, torch.float32)
    k_cache[:, :, : S // 2] *= 4  # spread the split maxima so that the rescale matters
    got = cached_attention_triton(q, k_cache, v_cache, slots, positions, split_size=16)
    assert rel_err(got, cached_attention_reference(q, k_cache, v_cache, slots, positions)) <= TOL[torch.float32]


def test_cached_attention_sees_only_its_slot_and_window():
    """Keys beyond a query's position or in other slots must not leak in: poisoning them changes nothing."""
    B, T, Hq, Hkv, D, S, max_len = ATTN_SHAPES[1]
    q, k_cache, v_cache, slots, positions = _attn_inputs(B, T, Hq, Hkv, D, S, max_len, torch.float32)
    before = cached_attention_triton(q, k_cache, v_cache, slots, positions, max_len=max_len)
    for b in range(B):
        end = int(positions[b, -1]) + 1
        k_cache[slots[b], :, end:] = float("nan")
        v_cache[slots[b], :, end:] = float("nan")
    unused = [s for s in range(B + 1) if s not in slots.tolist()]
    k_cache[unused] = float("nan")
    after = cached_attention_triton(q, k_cache, v_cache, slots, positions, max_len=max_len)
    assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("split_size", SPLITS)
@pytest.mark.parametrize("tree", [False, True])
def test_cached_attention_prefix(shape, dtype, split_size, tree):
    """Keys below a row's prefix length come from the shared prefix slot (the boundary falls inside a key
    block and a split); a row with length 0 reads only its own slot. Its own entries below the prefix
    length are NaN: never read. tree: a draft-tree step over a shared persona (both masks at once)."""
    B, T, Hq, Hkv, D, S, max_len = shape
    q, k_cache, v_cache, slots, positions = _attn_inputs(B, T, Hq, Hkv, D, S, max_len, dtype)
    prefix_slot = next(s for s in range(B + 1) if s not in slots.tolist())
    lengths = (positions[:, 0] * 2 // 3).tolist()
    if B > 1:
        lengths[-1] = 0
    prefix = torch.tensor([[prefix_slot, n] for n in lengths], device=DEVICE)
    for b, n in enumerate(lengths):
        k_cache[slots[b], :, :n] = v_cache[slots[b], :, :n] = float("nan")
    tree_mask = _random_tree(B, T) if tree else None
    got = cached_attention_triton(q, k_cache, v_cache, slots, positions, tree_mask, max_len, split_size, prefix=prefix)
    ref = cached_attention_reference(q, k_cache, v_cache, slots, positions, tree_mask, max_len, prefix)
    assert not got.isnan().any() and not ref.isnan().any()
    assert rel_err(got, ref) <= TOL[dtype]


# ---------------------------------------------------------------- fp8

# (M, K, N)
FP8_SHAPES = gpu_or_tiny([(1, 2048, 2048), (17, 2048, 512), (33, 1024, 8192), (5, 100, 72)],
                         [(1, 64, 48), (17, 32, 40)])


def _fp8_inputs(M, K, N, dtype, seed=0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    x = torch.randn(M, K, generator=g, device=DEVICE).to(dtype)
    w_fp8, scale = quantize_fp8(torch.randn(N, K, generator=g, device=DEVICE) / math.sqrt(K))
    bias = torch.randn(N, generator=g, device=DEVICE).to(dtype)
    return x, w_fp8, scale, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FP8_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_linear_triton(shape, dtype, with_bias):
    x, w_fp8, scale, bias = _fp8_inputs(*shape, dtype)
    bias = bias if with_bias else None
    got = fp8_linear_triton(x, w_fp8, scale, bias)
    assert rel_err(got, fp8_linear_reference(x, w_fp8, scale, bias)) <= TOL[dtype]


@pytest.mark.parametrize("shape", FP8_SHAPES)
def test_quantize_rows_fp8(shape):
    M, K, _ = shape
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
    x[0] = 0  # an all-zero row keeps a positive scale
    x_fp8, x_scale = quantize_rows_fp8(x)
    xf = x.float()
    assert x_fp8.dtype == FP8 and x_scale.shape == (M, 1)
    torch.testing.assert_close(x_scale[1:], xf[1:].abs().amax(1, keepdim=True) / 448, rtol=1e-6, atol=0)
    assert (x_scale > 0).all()
    # Within e4m3 rounding: half a step (2^-4 relative), or half the subnormal step near zero.
    err = (x_fp8.float() * x_scale - xf).abs()
    assert (err <= 2 ** -4 * xf.abs() + 2 ** -9 * x_scale).all()


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [s for s in FP8_SHAPES if s[1] % 16 == 0 and s[2] % 16 == 0])
def test_fp8_linear_scaled_mm(shape, dtype):
    x, w_fp8, scale, bias = _fp8_inputs(*shape, dtype)
    got = fp8_linear_scaled_mm(x, w_fp8, scale, bias)
    assert got.dtype == dtype and got.shape == (shape[0], shape[2])
    # Against the same activation quantization done in torch: only the bf16 output rounding differs.
    x_fp8, x_scale = quantize_rows_fp8(x)
    emulated = fp8_linear_reference(x_fp8.float() * x_scale, w_fp8, scale, bias)
    assert rel_err(got, emulated) <= 1e-2
    # Against the unquantized activations: e4m3 rounding of x costs about 2.7% on Gaussian data.
    assert rel_err(got, fp8_linear_reference(x, w_fp8, scale, bias)) <= 0.04


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_module_close_to_linear(dtype):
    M, K, N = FP8_SHAPES[1]
    linear = torch.nn.Linear(K, N, bias=True, device=DEVICE, dtype=dtype)
    layer = Fp8Linear.from_linear(linear)
    assert layer.weight_fp8.dtype == FP8 and layer.scale.dtype == torch.float32
    x = torch.randn(2, M, K, device=DEVICE, dtype=dtype)
    got = layer(x)
    assert got.shape == (2, M, N) and got.dtype == dtype
    # Weight (and on CUDA activation) e4m3 rounding: about 2.7% each on Gaussian data.
    assert rel_err(got, linear(x).detach()) <= 0.05


# ---------------------------------------------------------------- small-M linear (decode and verify steps)

SMALL_M_SHAPES = gpu_or_tiny([(3072, 2048), (2048, 8192), (16384, 2048), (8192, 256), (1000, 1500), (7, 100)],
                             [(7, 100), (64, 48), (130, 1030)])
HALF = [torch.bfloat16, torch.float16]


def _small_m_case(N, K, M, dtype, fp8, with_bias, in_features=None, seed=0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    weight = (torch.randn(N, K, generator=g, device=DEVICE) / math.sqrt(K)).to(dtype)
    scale = None
    if fp8:
        weight, scale = quantize_fp8(weight)
    bias = torch.randn(N, generator=g, device=DEVICE).to(dtype) if with_bias else None
    x = torch.randn(M, in_features or K, generator=g, device=DEVICE).to(dtype)
    return x, weight, bias, scale


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", SMALL_M_SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 9, 16])
@pytest.mark.parametrize("fp8,with_bias", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("gated", [False, True])
def test_small_m_linear(shape, rows, dtype, fp8, with_bias, gated):
    N, K = shape
    N += N % 2 if gated else 0
    x, weight, bias, scale = _small_m_case(N, K, rows, dtype, fp8, with_bias)
    got = small_m_linear_triton(x[:, None], weight, bias, scale, gated=gated)
    ref = linear_reference(x[:, None].double(), weight.double(), None if bias is None else bias.double(), scale)
    if gated:  # silu(gate) * up, the MLP's input half
        gate, up = ref.chunk(2, dim=-1)
        ref = torch.nn.functional.silu(gate) * up
    assert got.shape == (rows, 1, N // 2 if gated else N) and got.dtype == dtype and not got.isnan().any()
    assert rel_err(got, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", SMALL_M_SHAPES)
# bf16 up to FUSED_MAX_ROWS (a draft tree; 5: the one-row config over a grid of rows), FP8 up to MAX_ROWS
@pytest.mark.parametrize("rows,fp8", [(1, False), (5, False), (9, False), (16, False), (25, False), (1, True),
                                      (9, True), (16, True)])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("rms,with_residual", [(True, False), (False, True), (True, True)])
def test_small_m_linear_fused_norm_and_residual(shape, rows, dtype, fp8, gated, rms, with_residual):
    """An RMSNorm (weight folded into the matrix) computed from the sums of squares the kernel accumulates while it
    streams x, and the residual add in the epilogue, against norm -> linear -> (silu * up) -> + residual in float64.
    x is scaled so that a forgotten normalization is far off."""
    N, K = shape
    N += N % 2 if gated else 0
    x, weight, _, scale = _small_m_case(N, K, rows, dtype, fp8, False)
    x = (x * 7).to(dtype)
    n_out = N // 2 if gated else N
    residual = torch.randn(rows, 1, n_out, device=DEVICE).to(dtype) if with_residual else None
    got = small_m_linear_triton(x[:, None], weight, None, scale, gated=gated, rms_eps=1e-5 if rms else None,
                                residual=residual)
    xd = x[:, None].double()
    if rms:
        xd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    ref = linear_reference(xd, weight.double(), None, scale)
    if gated:
        gate, up = ref.chunk(2, dim=-1)
        ref = torch.nn.functional.silu(gate) * up
    if with_residual:
        ref = ref + residual.double()
    assert got.shape == (rows, 1, n_out) and got.dtype == dtype and not got.isnan().any()
    assert rel_err(got, ref) <= TOL[dtype]


def test_small_m_linear_refuses_bad_inputs():
    w = torch.randn(8, 64, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="1 to 32 rows"):
        small_m_linear_triton(torch.randn(33, 64, device=DEVICE, dtype=torch.bfloat16), w)
    w8, scale = quantize_fp8(w)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        small_m_linear_triton(torch.randn(17, 64, device=DEVICE, dtype=torch.bfloat16), w8, scale=scale)
    x = torch.randn(1, 64, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"must be \[N, 64\]"):
        small_m_linear_triton(x, w[:, :32])
    with pytest.raises(ValueError, match="bias"):
        small_m_linear_triton(x, w, torch.randn(9, device=DEVICE))
    with pytest.raises(ValueError, match="FP8 weight"):
        small_m_linear_triton(x, w, scale=torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="gate and up"):
        small_m_linear_triton(x, w[:7], gated=True)
    with pytest.raises(ValueError, match="residual"):
        small_m_linear_triton(x, w, residual=torch.zeros(1, 9, device=DEVICE, dtype=torch.bfloat16))


# ---------------------------------------------------------------- q/k/v + RMSNorm + RoPE + cache write (one row)

QKV_SHAPES = gpu_or_tiny([(2048, 32, 8, 64), (256, 4, 2, 64), (4096, 32, 8, 128), (896, 14, 2, 64), (96, 3, 1, 10)],
                         [(48, 4, 2, 16), (40, 2, 1, 8), (30, 3, 1, 10)])  # head dim 10: one pair per program


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("dim,n_heads,n_kv_heads,head_dim", QKV_SHAPES)
@pytest.mark.parametrize("rms,with_bias", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("position", [0, 37, -1, 64])
def test_qkv_rope_write(dim, n_heads, n_kv_heads, head_dim, dtype, rms, with_bias, position):
    """Against linear -> rope_kv_write references: rotated q, and rope(k), v in the row's slot at its position only
    (the rest of the poisoned caches untouched; position -1 is padding and 64, past the cache, writes nothing)."""
    g = torch.Generator(DEVICE).manual_seed(0)
    rows = (n_heads + 2 * n_kv_heads) * head_dim
    x = (7 * torch.randn(1, 1, dim, generator=g, device=DEVICE)).to(dtype)
    weight = (torch.randn(rows, dim, generator=g, device=DEVICE) / math.sqrt(dim)).to(dtype)
    bias = torch.randn(rows, generator=g, device=DEVICE).to(dtype) if with_bias else None
    freqs = torch.arange(64, device=DEVICE).float()[:, None] * 0.9 ** torch.arange(head_dim // 2, device=DEVICE)
    cos, sin = freqs.cos(), freqs.sin()
    positions, slots = torch.tensor([[position]], device=DEVICE), torch.tensor([2], device=DEVICE)
    caches = [[nan_like(torch.empty(3, n_kv_heads, 64, head_dim, device=DEVICE, dtype=dtype)) for _ in range(2)]
              for _ in range(2)]
    eps = 1e-5 if rms else None
    got = qkv_rope_write_triton(x, weight, bias, eps, n_heads, n_kv_heads, cos, sin, positions, slots, *caches[0])
    if position < 64:
        ref = qkv_rope_write_reference(x, weight, bias, eps, n_heads, n_kv_heads, cos, sin, positions, slots,
                                       *caches[1])
    else:  # past the cache (and the rotary tables): q is not rotated
        ref = linear_reference(x, weight, bias, rms_eps=eps)[..., :n_heads * head_dim].view(1, 1, n_heads, head_dim)
    assert got.shape == (1, 1, n_heads, head_dim) and got.dtype == dtype and not got.isnan().any()
    assert rel_err(got, ref) <= TOL[dtype]
    for mine, theirs in zip(caches[0], caches[1]):
        written = ~theirs.isnan()
        assert torch.equal(written, ~mine.isnan())
        assert int(written.sum()) == (n_kv_heads * head_dim if 0 <= position < 64 else 0)
        if 0 <= position < 64:
            assert rel_err(mine[2, :, position], theirs[2, :, position]) <= TOL[dtype]


@needs_cuda
def test_linear_dispatch():
    """One bf16 row takes the small-M kernel, more rows or float32 stay on cuBLAS (same results as
    F.linear); FP8 weights take it up to 16 rows and go to fp8_linear above; bf16 with a norm, residual or gate to
    fuse up to 32 rows."""
    weight = torch.randn(96, 64, device=DEVICE, dtype=torch.bfloat16)
    rows = torch.randn(33, 64, device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(linear(rows[:3], weight), linear_reference(rows[:3], weight))
    assert torch.equal(linear(rows[:1], weight), small_m_linear_triton(rows[:1], weight))
    assert torch.equal(linear(rows[:1].float(), weight.float()), linear_reference(rows[:1].float(), weight.float()))
    w8, scale = quantize_fp8(weight)
    assert torch.equal(linear(rows[:17], w8, None, scale), fp8_linear(rows[:17], w8, scale))
    assert torch.equal(linear(rows[:4], w8, None, scale), small_m_linear_triton(rows[:4], w8, None, scale))
    gate, up = linear_reference(rows, weight).chunk(2, dim=-1)  # 33 rows: linear, then silu * up
    assert torch.equal(gated_linear(rows, weight), torch.nn.functional.silu(gate) * up)
    assert torch.equal(gated_linear(rows[:25], weight), small_m_linear_triton(rows[:25], weight, gated=True))
    # a norm or residual to fuse: the kernel up to 32 rows (bf16; FP8 up to 16); above, norm -> linear -> add
    res = torch.randn(33, 96, device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(linear(rows[:25], weight, rms_eps=1e-5, residual=res[:25]),
                       small_m_linear_triton(rows[:25], weight, rms_eps=1e-5, residual=res[:25]))
    normed = add_rmsnorm_reference(rows, None, None, 1e-5)[0]
    assert torch.equal(linear(rows, weight, rms_eps=1e-5, residual=res), linear_reference(normed, weight) + res)
    assert torch.equal(linear(rows, w8, None, scale, rms_eps=1e-5), fp8_linear(normed, w8, scale))
    gate, up = linear_reference(normed, weight).chunk(2, dim=-1)
    assert torch.equal(gated_linear(rows, weight, rms_eps=1e-5), torch.nn.functional.silu(gate) * up)


# ---------------------------------------------------------------- CUDA graphs


def _capture(fn):
    """Warm up (compiles the kernels) on a side stream, then capture one call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@needs_cuda
@pytest.mark.parametrize("tree", [False, True])
def test_graph_replay_rope_attention(tree):
    """A captured decode/verify step (rope + cache write + attention) replays like eager as the
    positions advance, without re-capture."""
    B, T, Hq, Hkv, D, S = 2, 5, 32, 8, 64, 1024
    q, k, v, cos, sin, positions, slots = _rope_inputs(B, T, Hq, Hkv, D, S, torch.bfloat16, D // 2)
    tree_mask = _random_tree(B, T) if tree else None
    k_cache = torch.randn(B + 2, Hkv, S, D, device=DEVICE, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    positions.copy_(torch.tensor([[10], [20]], device=DEVICE) + torch.arange(T, device=DEVICE))

    def step():
        q_rot = rope_kv_write_triton(q, k, v, cos, sin, positions, slots, k_cache, v_cache)
        return cached_attention_triton(q_rot, k_cache, v_cache, slots, positions, tree_mask, max_len=S)

    graph, static_out = _capture(step)
    for start in ([100, 7], [500, 1000 - T], [3, 64]):
        positions.copy_(torch.tensor(start, device=DEVICE)[:, None] + torch.arange(T, device=DEVICE))
        for x in (q, k, v):
            x.copy_(torch.randn_like(x))
        graph.replay()
        eager = step()
        assert torch.equal(static_out, eager)
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        ref_q = rope_kv_write_reference(q, k, v, cos, sin, positions, slots, ref_k, ref_v)
        ref = cached_attention_reference(ref_q, ref_k, ref_v, slots, positions, tree_mask, S)
        assert rel_err(static_out, ref) <= TOL[torch.bfloat16]


@needs_cuda
def test_graph_replay_rmsnorm_fp8():
    x = torch.randn(3, 2048, device=DEVICE, dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    weight = torch.randn(2048, device=DEVICE, dtype=torch.bfloat16)
    w_fp8, scale = quantize_fp8(torch.randn(512, 2048, device=DEVICE) / 45)

    def step():
        normed, new_res = add_rmsnorm_triton(x, residual, weight, 1e-5)
        return fp8_linear(normed, w_fp8, scale), new_res

    graph, (static_y, static_res) = _capture(step)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        y, res = step()
        assert torch.equal(static_y, y) and torch.equal(static_res, res)
