"""FP8 (e4m3) linear layers with one scale per output channel.

quantize_fp8(w): scale[n] = max|w[n, :]| / 448, w_fp8 = round_e4m3(w / scale), so that
w ≈ w_fp8.float() * scale[:, None].

On CUDA, `fp8_linear` quantizes each activation row on the fly (one scale per row, one Triton
kernel) and multiplies with `torch._scaled_mm` (row-wise scales, bf16 output). Where `_scaled_mm`
cannot run (GPUs before sm_89, K or N not a multiple of 16) it falls back to a Triton kernel that
keeps the activations in their dtype and converts the weights in registers (weight-only FP8).
"""

import functools

import torch
import torch.nn as nn
import triton
import triton.language as tl

from kernels.rows_linear import launch_rows_linear

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_MIN_SCALE = 1e-12  # all-zero rows: any positive scale works


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (w_fp8 [N, K] float8_e4m3fn, scale [N] float32)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_fp8: expected a 2-D weight, got shape {tuple(w.shape)}")
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=_MIN_SCALE) / FP8_MAX
    w_fp8 = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return w_fp8, scale


def _check(x, w_fp8, scale, bias):
    N, K = w_fp8.shape
    if w_fp8.dtype != FP8 or scale.shape != (N,) or scale.dtype != torch.float32:
        raise ValueError(f"fp8_linear: expected float8_e4m3fn weight [N, K] and float32 scale [N], got "
                         f"{w_fp8.dtype} {tuple(w_fp8.shape)} and {scale.dtype} {tuple(scale.shape)}")
    if not w_fp8.is_contiguous():
        raise ValueError("fp8_linear: the fp8 weight must be contiguous [N, K]")
    if x.shape[-1] != K:
        raise ValueError(f"fp8_linear: input features {x.shape[-1]} != weight in_features {K}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"fp8_linear: bias shape {tuple(bias.shape)} != ({N},)")


def fp8_linear_reference(
    x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    _check(x, w_fp8, scale, bias)
    y = x.float() @ (w_fp8.float() * scale[:, None]).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _quantize_rows_kernel(X, XQ, XS, K, stride_x, stride_q, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
        xq = tl.minimum(tl.maximum(x / s, -448.0), 448.0)
        tl.store(XQ + row * stride_q + k, xq.to(XQ.dtype.element_ty), mask=k < K)
    tl.store(XS + row, s)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_fp8 [M, K], scale [M, 1] float32), one scale per row (Triton)."""
    M, K = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    x_fp8 = torch.empty((M, K), dtype=FP8, device=x.device)
    x_scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M:
        _quantize_rows_kernel[(M,)](x, x_fp8, x_scale, K, x.stride(0), x_fp8.stride(0),
                                    BLOCK_K=min(4096, triton.next_power_of_2(K)), num_warps=4)
    return x_fp8, x_scale


@functools.cache
def _pick_block_n(N: int, device: torch.device) -> int:
    """Widest tile that still gives every SM a program: small-M matmuls are weight-read bound."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return next((bn for bn in (128, 64, 32) if triton.cdiv(N, bn) >= sms), 16)


def fp8_linear_triton(
    x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight-only FP8: activations stay in their dtype, weights are converted in registers."""
    _check(x, w_fp8, scale, bias)
    N, K = w_fp8.shape
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M:
        block_m = max(16, min(64, triton.next_power_of_2(M)))
        # Long weight rows per stage keep enough bytes in flight at few rows; fp32 dots spill on big tiles.
        block_k = 32 if x.dtype == torch.float32 else 256 if block_m == 16 else 128
        launch_rows_linear(x2, w_fp8, bias, scale, y, (block_m, _pick_block_n(N, x.device), block_k,
                                                       8 if x.dtype == torch.float32 else 4, 4))
    return y.view(*x.shape[:-1], N)


@functools.cache
def _scaled_mm_supported(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear_scaled_mm(
    x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """FP8 x FP8 on tensor cores: activations quantized per row, `torch._scaled_mm` with row-wise scales."""
    _check(x, w_fp8, scale, bias)
    N, K = w_fp8.shape
    x_fp8, x_scale = quantize_rows_fp8(x.reshape(-1, K))
    # Row-wise scaling produces bf16 only.
    y = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=scale.view(1, N), out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).view(*x.shape[:-1], N)


def fp8_linear_cuda(
    x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    N, K = w_fp8.shape
    if N % 16 == 0 and K % 16 == 0 and _scaled_mm_supported(x.device):
        return fp8_linear_scaled_mm(x, w_fp8, scale, bias)
    return fp8_linear_triton(x, w_fp8, scale, bias)


def fp8_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ (w_fp8 * scale[:, None]).T + bias, in x's dtype."""
    return (fp8_linear_cuda if x.is_cuda else fp8_linear_reference)(x, w_fp8, scale, bias)


class Fp8Linear(nn.Module):
    """Drop-in for a bias-optional nn.Linear holding an FP8 weight and per-channel scales.

    Build it after the model has its final device and dtype: `Module.to(dtype)` would cast the
    float8 buffer like any other floating-point tensor.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.device, weight.dtype)
        layer.weight_fp8, layer.scale = quantize_fp8(weight)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight_fp8, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
