"""GPU kernels (Triton) with a PyTorch reference each; every op runs Triton on CUDA tensors and
the reference otherwise.

The ops load on first use: importing one torch-only module (`kernels.prefix`) must not import Triton."""

import importlib

_MODULES = {"cached_attention": "attention", "Fp8Linear": "fp8", "fp8_linear": "fp8", "quantize_fp8": "fp8",
            "gated_linear": "gemv", "linear": "gemv", "qkv_rope_write": "qkv_rope", "add_rmsnorm": "rmsnorm",
            "rope_kv_write": "rope"}
__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kernels.{_MODULES[name]}"), name)
