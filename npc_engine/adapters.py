"""LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors), merged into the weights at load.

W' = W + scale * B @ A with scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora); rank_pattern and
alpha_pattern override r and alpha per module, matched as PEFT matches them.
"""
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from npc_engine.errors import CheckpointError
from npc_engine.quantize import PackedLinear, RescoredHead

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# Features that change what a merged weight is; refused rather than merged wrongly.
UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA bias", "use_qalora": "QALoRA",
               "modules_to_save": "modules_to_save",
               "trainable_token_indices": "trainable tokens", "target_parameters": "target_parameters"}


def pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(path: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config, {module name: (A [r, in], B [out, r])})."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"adapter folder {path} needs {CONFIG} and {WEIGHTS} (a PEFT LoRA adapter)")
    cfg = json.loads((path / CONFIG).read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path / CONFIG}: peft_type {cfg['peft_type']!r} is not supported (supported: LORA)")
    used = [name for key, name in UNSUPPORTED.items() if cfg.get(key)]
    if used:
        raise CheckpointError(f"{path / CONFIG}: {', '.join(used)} not supported (plain LoRA adapters only)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path / WEIGHTS)).items():
        m = KEY.match(key)
        if m is None:
            raise CheckpointError(f"{path / WEIGHTS}: tensor {key!r} is not a LoRA A/B weight")
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    broken = [m for m, ab in pairs.items() if set(ab) != {"A", "B"}]
    if broken:
        raise CheckpointError(f"{path / WEIGHTS}: {broken[0]} lacks its lora_A or lora_B weight")
    return cfg, {m: (ab["A"], ab["B"]) for m, ab in pairs.items()}


def module_scale(cfg: dict, name: str) -> float:
    """The factor PEFT multiplies a module's B @ A by (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    r = pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"])
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


@torch.no_grad()
def truncate_adapter(src: str | Path, dst: str | Path, rank: int) -> None:
    """Writes to `dst` the adapter whose every delta is the best rank-`rank` approximation (truncated SVD) of the
    delta in `src`, as a plain PEFT LoRA adapter with scale 1: how a trained adapter is made small enough to ship."""
    cfg, pairs = read_adapter(Path(src))
    tensors = {}
    for name, (a, b) in pairs.items():
        u, s, vh = torch.linalg.svd(module_scale(cfg, name) * b.float() @ a.float(), full_matrices=False)
        root = s[:rank].sqrt()
        tensors[f"base_model.model.{name}.lora_A.weight"] = (root[:, None] * vh[:rank]).to(a.dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (u[:, :rank] * root).to(b.dtype).contiguous()
    small = {k: v for k, v in cfg.items() if k not in ("rank_pattern", "alpha_pattern", "use_rslora")}
    small.update(r=rank, lora_alpha=rank)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / WEIGHTS))
    (dst / CONFIG).write_text(json.dumps(small, indent=2) + "\n")


def adapter_pairs(model: nn.Module, path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A [r, in], B [out, r] times the module's scale)} in float32, checked against the model's
    layers: a CheckpointError, naming the module, for an adapter made for another model."""
    path = Path(path)
    cfg, pairs = read_adapter(path)
    modules = dict(model.named_modules())
    base = cfg.get("base_model_name_or_path")
    for name, (a, b) in pairs.items():
        layer = modules.get(name)
        if not isinstance(layer, (nn.Linear, PackedLinear)):
            raise CheckpointError(f"{path}: adapter for another model: it targets {name!r}, which this model does not "
                                  f"have" + (f" (adapter made for {base})" if base else ""))
        in_f, out_f = layer.in_features, layer.out_features
        if a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{path}: adapter for another shape: {name} is {in_f} -> {out_f}, the adapter's "
                                  f"lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)}"
                                  + (f" (adapter made for {base})" if base else ""))
    return {name: (a.float().contiguous(), (b.float() * module_scale(cfg, name)).contiguous())
            for name, (a, b) in pairs.items()}


@torch.no_grad()
def merge_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Adds each LoRA delta to its nn.Linear weight in place (computed in float32); a packed layer
    (npc_engine.quantize) keeps its pair beside the packed weight instead. Raises CheckpointError, naming the module,
    for an adapter made for another model (checked for every module before any changes)."""
    modules = dict(model.named_modules())
    for name, (a, b) in adapter_pairs(model, path).items():
        layer = modules[name]
        if isinstance(layer, PackedLinear):
            layer.lora_a, layer.lora_b = a, b
            continue
        # fan_in_fan_out is ignored: PEFT resets it to False for nn.Linear targets, as all of ours are.
        if name == "lm_head" and layer.weight is modules["model.embed_tokens"].weight:
            layer.weight = nn.Parameter(layer.weight.clone(), requires_grad=False)  # untie before changing it
        delta = b @ a
        layer.weight.copy_((layer.weight.float() + delta.to(layer.weight.device)).to(layer.weight.dtype))
        if isinstance(layer, RescoredHead):
            layer.repack()
    return model
