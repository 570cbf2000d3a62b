"""y = x @ W.T (+ bias) for 1 to 32 rows of x: the decode and verify steps' linear layers.

With few rows a linear layer only streams its weight matrix, and cuBLAS leaves much of the memory
bandwidth unused on the smaller matrices (benchmarks/README.md, "Kernels (bench_kernels)"). One Triton kernel
covers those shapes, for bf16/fp16 weights and for FP8 (e4m3) weights with one float32 scale per
output channel, converted in registers (weight-only FP8: the step reads half the bytes, and no
activation quantization kernel runs). One row multiplies and adds in registers; more rows use
tensor-core dots. `linear` sends plain bf16 weights with 2 or more rows to cuBLAS, which matched the
kernel there, unless a norm or residual is fused (up to 32 rows: a draft tree's verification), and FP8
weights with more than 16 rows to `kernels.fp8`. `gated_linear` computes the
MLP's silu(gate) * up in the kernel's epilogue, saving the SiLU and multiply kernels of every layer.
Both take an RMSNorm to run in front (its weight folded into the matrix: the kernel accumulates the
row's sum of squares while it streams x) and `linear` a residual to add in the epilogue.
"""

import torch
import torch.nn.functional as F
import triton

from kernels.rmsnorm import add_rmsnorm
from kernels.rows_linear import launch_rows_linear

MAX_ROWS = 16  # FP8 weights
FUSED_MAX_ROWS = 32  # bf16/fp16 weights with a norm, residual or gate fused
ONE_ROW_PROGRAMS_MAX_ROWS, ONE_ROW_PROGRAMS_MAX_WEIGHT = 8, 2 << 20  # small_m_config


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     scale: torch.Tensor | None = None, rms_eps: float | None = None,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    if rms_eps is not None:
        x = add_rmsnorm(x, None, None, rms_eps)[0]
    if scale is None:
        y = F.linear(x, weight, bias)
    else:
        y = x.float() @ (weight.float() * scale[:, None]).t()
        y = (y if bias is None else y + bias.float()).to(x.dtype)
    return y if residual is None else y + residual


def small_m_config(M: int, N: int, K: int, weight_bytes: int, gated: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for M rows against an [N, K] weight: the best
    of sweeps on the H200 over the 1B, 8B and trained-pair shapes (benchmarks/README.md, "Small-M linear kernel
    configs"). Up to ONE_ROW_PROGRAMS_MAX_ROWS rows of a small bf16 matrix (SmolLM2-135M's: a verify step of a few
    drafts) take the one-row config over a grid of rows: 2.6 against 8.7 us for 2 rows of q/k/v, 3.8 against 4.1 us
    for 5 of the down projection, slower from 9 rows, and for the 1B shape's gate/up from 3 (benchmarks/README.md,
    "Sixth GPU session")."""
    if M == 1 or (weight_bytes == 2 and M <= ONE_ROW_PROGRAMS_MAX_ROWS and N * K <= ONE_ROW_PROGRAMS_MAX_WEIGHT):
        # many small programs, each streaming whole rows
        if weight_bytes == 2 and K >= 8192:  # long rows (the MLP's down projection): one weight row per program
            return 1, 1, min(2048 if K >= 12288 else 1024, triton.next_power_of_2(K)), 4, 1
        if weight_bytes == 2 and gated and K <= 2048:
            return 1, 4, min(512, triton.next_power_of_2(K)), 4, 1
        return 1, 2 if weight_bytes == 2 else 4, min(1024, triton.next_power_of_2(K)), 4, 1
    wide = N >= 8192
    block_n = (64 if weight_bytes == 2 else 32) if wide else 32 if N >= 3072 else 16
    block_k = (128 if weight_bytes == 2 else 256) if wide else 512
    return 16, block_n, max(16, min(block_k, triton.next_power_of_2(K))), 4, 3 if wide else 4


def small_m_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          scale: torch.Tensor | None = None, gated: bool = False, rms_eps: float | None = None,
                          residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] holding 1 to FUSED_MAX_ROWS rows (FP8: MAX_ROWS); weight [N, K] with contiguous rows, FP8 when
    `scale` [N] float32 is given.
    gated: weight (and bias, scale) is [gate; up] and the result silu(x @ gate.T) * (x @ up.T), [..., N / 2].
    rms_eps: x goes through an RMSNorm (weight 1: fold it into `weight`) first.
    residual [..., N]: added to the result."""
    N, K = weight.shape[0], x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    n_out = N // 2 if gated else N
    max_rows = MAX_ROWS if scale is not None else FUSED_MAX_ROWS
    if not 1 <= M <= max_rows:
        raise ValueError(f"small-M linear: x {tuple(x.shape)} must hold 1 to {max_rows} rows")
    if weight.shape[1] != K or weight.stride(1) != 1:
        raise ValueError(f"small-M linear: weight {tuple(weight.shape)} must be [N, {K}] with contiguous rows")
    fp8_ok = scale is None or (weight.dtype == torch.float8_e4m3fn and scale.shape == (N,)
                               and scale.dtype == torch.float32)
    if not fp8_ok:
        raise ValueError(f"small-M linear: an FP8 weight needs float8_e4m3fn and a float32 scale [{N}], got "
                         f"{weight.dtype} and {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"small-M linear: bias {tuple(bias.shape)} must be [{N}]")
    if gated and N % 2:
        raise ValueError(f"small-M linear: a gated weight stacks gate and up rows, got {N} rows")
    if residual is not None and residual.shape != (*x.shape[:-1], n_out):
        raise ValueError(f"small-M linear: residual {tuple(residual.shape)} must be {(*x.shape[:-1], n_out)}")
    x2 = x2.contiguous()
    y = torch.empty(M, n_out, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k, warps, stages = small_m_config(M, N, K, weight.element_size(), gated)
    if gated and block_m > 1:  # each program reads gate and up rows: as many weight bytes as an ungated one
        block_n = max(16, block_n // 2)
    launch_rows_linear(x2, weight, bias, scale, y, (block_m, block_n, block_k, warps, stages), gated, rms_eps,
                       None if residual is None else residual.reshape(M, n_out).contiguous())
    return y.view(*x.shape[:-1], n_out)


def _small_m_kernel_takes(x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.stride(1) == 1 and 1 <= rows <= max_rows


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None, rms_eps: float | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """residual + F.linear(rms_normalize(x), ...) (an FP8 weight when `scale` is given; the norm only with rms_eps,
    its weight folded into `weight`). On CUDA the small-M kernel computes it all for one row, for up to 16 rows with
    FP8 weights and for up to 32 with a norm or residual to fuse (plain bf16 with several rows: cuBLAS, as fast)."""
    fused_io = rms_eps is not None or residual is not None
    if _small_m_kernel_takes(x, weight, MAX_ROWS if scale is not None else FUSED_MAX_ROWS if fused_io else 1):
        return small_m_linear_triton(x, weight, bias, scale, rms_eps=rms_eps, residual=residual)
    if rms_eps is not None:
        x = add_rmsnorm(x, None, None, rms_eps)[0]
    if scale is not None:
        from kernels.fp8 import fp8_linear
        y = fp8_linear(x, weight, scale, bias)
    else:
        y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, rms_eps: float | None = None) -> torch.Tensor:
    """silu(gate) * up of a fused [gate; up] projection (the MLP's input half; rms_eps as in `linear`) in one kernel
    on CUDA, for one row and for up to 32 rows of bf16/fp16 weights: the gate and up products never leave registers.
    (FP8 weights with several rows ran slower gated than as linear + SiLU + multiply on the H200: benchmarks/README.md,
    "FP8 gated linear".)"""
    if _small_m_kernel_takes(x, weight, 1 if scale is not None else FUSED_MAX_ROWS):
        return small_m_linear_triton(x, weight, bias, scale, gated=True, rms_eps=rms_eps)
    gate, up = linear(x, weight, bias, scale, rms_eps=rms_eps).chunk(2, dim=-1)
    return F.silu(gate) * up
