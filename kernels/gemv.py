"""y = x @ W.T (+ bias) for a single row x: the batch-1 decode step's matrix-vector products.

At one row a linear layer only streams its weight matrix, and cuBLAS leaves much of the memory
bandwidth unused on the smaller matrices (benchmarks/RESULTS.md, kernel table). This kernel gives
each program two output rows and reads them in 1024-wide, fully coalesced strips, accumulating in
float32. Wider inputs (M > 1: prefill, verification) stay on cuBLAS.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@triton.jit
def _gemv_kernel(X, W, B, Y, N, K, stride_w, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    rows = W + n[:, None].to(tl.int64) * stride_w
    # Partial products stay per lane until the end: one reduction per program, not per strip.
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(X + k, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + n, y.to(Y.dtype.element_ty), mask=n_ok)


def linear_gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] holding exactly one row; weight [N, K] with contiguous rows; bias [N] or None."""
    K = x.shape[-1]
    N = weight.shape[0]
    if x.numel() != K:
        raise ValueError(f"gemv: x {tuple(x.shape)} must hold one row of {K}")
    if weight.shape[1] != K or weight.stride(1) != 1:
        raise ValueError(f"gemv: weight {tuple(weight.shape)} must be [N, {K}] with contiguous rows")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"gemv: bias {tuple(bias.shape)} must be [{N}]")
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], N, device=x.device, dtype=x.dtype)
    block_k = min(1024, triton.next_power_of_2(K))
    block_n = 2
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, weight if bias is None else bias, y, N, K, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=1,
    )
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the Triton GEMV for a single bf16/fp16 row on CUDA."""
    if x.is_cuda and x.numel() == x.shape[-1] and x.dtype in (torch.bfloat16, torch.float16) and weight.stride(1) == 1:
        return linear_gemv_triton(x, weight, bias)
    return linear_reference(x, weight, bias)
