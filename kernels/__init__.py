"""GPU kernels (Triton) with a PyTorch reference each; every op runs Triton on CUDA tensors and
the reference otherwise."""

from kernels.attention import cached_attention
from kernels.fp8 import Fp8Linear, fp8_linear, quantize_fp8
from kernels.gemv import gated_linear, linear
from kernels.qkv_rope import qkv_rope_write
from kernels.rmsnorm import add_rmsnorm
from kernels.rope import rope_kv_write

__all__ = ["Fp8Linear", "add_rmsnorm", "cached_attention", "fp8_linear", "gated_linear", "linear", "qkv_rope_write",
           "quantize_fp8", "rope_kv_write"]
