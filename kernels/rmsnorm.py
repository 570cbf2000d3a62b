"""Fused residual add + RMSNorm (Llama / Hugging Face `LlamaRMSNorm` semantics).

new_residual = x + residual            (in the input dtype, like the model's residual add)
normed       = weight * (h * rsqrt(mean(h²) + eps)).to(dtype),  h = new_residual.float()

(weight None: 1, for a norm whose weight is folded into the linear layer after it.)
"""

import torch
import triton
import triton.language as tl


def add_rmsnorm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return h if weight is None else (weight * h).to(x.dtype), x


@triton.jit
def _add_rmsnorm_kernel(
    X, R, W, Out, ResOut,
    stride_x, stride_r, stride_o, stride_ro,
    H, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        # Round the sum to the input dtype first: the norm sees exactly the stored residual.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(ResOut + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(h * h, axis=0) / H + eps)
    normed = (h * rstd).to(x.dtype).to(tl.float32)
    if HAS_WEIGHT:
        normed = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * normed
    tl.store(Out + row * stride_o + cols, normed.to(Out.dtype.element_ty), mask=mask)


def add_rmsnorm_triton(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`out` / `residual_out` (same shape as x, may alias x or residual) receive the results; weight None: 1."""
    H = x.shape[-1]
    if weight is not None and weight.shape != (H,):
        raise ValueError(f"add_rmsnorm: weight shape {tuple(weight.shape)} != ({H},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_rmsnorm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    out = x.new_empty(x.shape) if out is None else out
    if residual is None:
        residual_out = x
    elif residual_out is None:
        residual_out = x.new_empty(x.shape)
    x2, o2 = x.reshape(-1, H), out.view(-1, H)
    r2 = x2 if residual is None else residual.reshape(-1, H)
    ro2 = x2 if residual is None else residual_out.view(-1, H)
    if x2.shape[0] == 0:
        return out, residual_out
    for t in (x2, r2, o2, ro2):
        if t.stride(-1) != 1:
            raise ValueError("add_rmsnorm: the hidden dimension must be contiguous")
    block = triton.next_power_of_2(H)
    _add_rmsnorm_kernel[(x2.shape[0],)](
        x2, r2, x2 if weight is None else weight, o2, ro2,
        x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0),
        H, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out, residual_out


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (normed, new_residual); new_residual is x itself when residual is None. weight None: a norm whose
    weight is folded into the next linear layer."""
    return (add_rmsnorm_triton if x.is_cuda else add_rmsnorm_reference)(x, residual, weight, eps)
