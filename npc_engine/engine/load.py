"""An engine from model folders on disk: the target (PyTorch, FP8 or an ONNX export), its tokenizer and a drafter."""
from functools import partial
from pathlib import Path

from npc_engine.adapters import merge_adapter
from npc_engine.drafters import draft_spec, make_drafter
from npc_engine.loading import load_model, parse_dtype
from npc_engine.paths import resolve_model
from npc_engine.quantize import WEIGHT_BITS, check_weight_bits, quantize_fp8_, quantize_weights_
from npc_engine.tokenizer import Tokenizer


def load_parts(model_dir: str | Path, draft: str = "auto", device: str = "cpu", dtype=None, backend: str = "auto",
               onnx_provider: str | None = None, max_batch: int = 16, max_seq: int = 1024,
               adapter: str | Path | None = None):
    """(target, drafter, tokenizer, device). dtype: a float dtype name, "auto", "fp8" (target weights stored as
    e4m3 with per-channel scales) or, on the CPU, "int8" / "int4" (the decoder layers' weights packed, run on
    bfloat16 activations; the adapter's pairs kept beside them). draft: "none", "ngram", a model or feature-head
    folder, or "auto" (the folder named by npc_engine.json's "draft" key in the model folder, else n-gram lookup).
    backend: "torch", "onnx" (the model folders are `npc-engine export-onnx` outputs) or "auto" (onnx when
    model_dir holds an export).
    onnx_provider: "cpu", "cuda" or "auto" (CUDA when usable, else CPU); default: the device. model_dir may be a
    GGUF file (converted once, see paths.resolve_model); adapter: a PEFT LoRA folder merged into the target."""
    model_dir = resolve_model(model_dir)
    if backend == "auto":
        backend = "onnx" if (model_dir / "manifest.json").is_file() else "torch"
    if backend == "onnx":
        if dtype == "fp8" or dtype in WEIGHT_BITS:
            raise ValueError(f"dtype {dtype} needs the torch backend (an ONNX export has its own weight-only int8 / "
                             f"int4: export-onnx --weights)")
        if adapter is not None:
            raise ValueError("--adapter needs the torch backend (an ONNX export holds merged weights)")
        from npc_engine.onnx_backend import load_onnx_model
        target = load_onnx_model(model_dir, onnx_provider or device, dtype)
        device, dtype = target.device, target.dtype
        load = partial(load_onnx_model, provider=target.provider, dtype=dtype)
    else:
        # fp8, int8, int4: the target's weights only; activations (and the draft model) in the device's default
        stored = dtype if dtype == "fp8" or dtype in WEIGHT_BITS else None
        dtype = parse_dtype(None if stored else dtype, device)
        load = partial(load_model, device=device, dtype=dtype)
        if stored in WEIGHT_BITS:  # the adapter after packing: its pairs stay beside the packed weights
            check_weight_bits(stored, device)  # before any weight is loaded
            target = quantize_weights_(load(model_dir), stored)
            if adapter is not None:
                merge_adapter(target, adapter)
        else:
            target = load(model_dir, adapter=adapter)
            target = quantize_fp8_(target) if stored else target
    drafter = make_drafter(draft_spec(model_dir, draft), target, load, backend == "torch", max_batch, max_seq, device,
                           dtype)
    return target, drafter, Tokenizer.from_dir(model_dir), device
