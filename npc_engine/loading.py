"""Load and save Hugging Face layout checkpoints: config.json + *.safetensors shards (+ index)."""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from npc_engine.errors import CheckpointError
from npc_engine.model import ModelArgs, Transformer, rope_inv_freq
from npc_engine.paths import resolve_model

SUPPORTED_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# Buffers some exporters write that are recomputed here.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def parse_dtype(name: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise CheckpointError(f"dtype {name!r} not supported; choose one of {', '.join(sorted(DTYPE_NAMES))} (the "
                              f"engine's --dtype also takes fp8 on cuda, int8 and int4 on cpu)")
    return DTYPE_NAMES[name]


def read_config(path: Path) -> ModelArgs:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (a Hugging Face model folder needs config.json)")
    try:
        cfg = json.loads(config_file.read_text())
        return ModelArgs.from_hf_config(cfg)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: invalid JSON: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{config_file}: missing field {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{config_file}: {e}") from None


def shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shards that are missing: {', '.join(missing)}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights found")
    return files


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
               adapter: str | Path | None = None) -> Transformer:
    """Build a Transformer from a Hugging Face folder or a GGUF file (converted once, see paths.resolve_model).
    Tensors are memory-mapped, shard by shard. adapter: a PEFT LoRA folder merged into the weights."""
    path = resolve_model(path)
    args = read_config(path)
    dtype = parse_dtype(dtype, device)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state = {}
    for file in shard_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(IGNORED_SUFFIXES) or (args.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                if name not in expected:
                    raise CheckpointError(f"{file.name}: unexpected tensor {name!r} for {args.architecture} "
                                          f"(is this a different architecture?)")
                tensor = f.get_tensor(name)
                if tensor.dtype not in SUPPORTED_DTYPES:
                    raise CheckpointError(f"{file.name}: tensor {name!r} has dtype {tensor.dtype}, not supported "
                                          f"(supported: float32, float16, bfloat16)")
                if tensor.shape != expected[name]:
                    raise CheckpointError(f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                          f"config.json implies {tuple(expected[name])}")
                state[name] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path}: missing tensors: {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""))
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args).to(device)  # the meta-device buffer is recomputed, never stored
    if adapter is not None:
        from npc_engine.adapters import merge_adapter

        merge_adapter(model, adapter)
    return model.eval().requires_grad_(False)


def save_model(model: Transformer, path: str | Path, dtype: torch.dtype = torch.bfloat16, max_shard_mb: float = 15,
               generation_config: dict | None = None) -> None:
    """Write config.json and safetensors shards of at most max_shard_mb each (plus an index when sharded)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.args.to_hf_config()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight")
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_mb * 1e6:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    for old in path.glob("model*.safetensors*"):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
