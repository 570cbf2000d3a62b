"""GGUF (llama.cpp's file format) -> a Hugging Face layout folder the engine loads.

Metadata, tensors and dequantization come from the `gguf` package (llama.cpp's own reader); this
module only renames tensors, undoes the Q/K row permutation llama.cpp applies to Llama attention
weights, and rebuilds the tokenizer from `tokenizer.ggml.*` the way `transformers` does.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from npc_engine.errors import CheckpointError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
TOKENIZER_KINDS = ("gpt2", "llama")
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
# The split regexes of `tokenizer.ggml.pre` values that are not GPT-2's (as transformers' GGUF loader maps them).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# (low_freq_factor, high_freq_factor, original context) of the Llama 3.1-3.3 RoPE scaling, which llama.cpp stores
# only as the per-dimension factors it implies (the rope_freqs tensor).
LLAMA3_ROPE = ((1.0, 4.0, 8192),)
PRE_TOKENIZER_SPLITS = {"llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT,
                        "smaug-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT}


def read_gguf(path: Path):
    """A GGUFReader over `path`, with a truncated or foreign file reported as a CheckpointError."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"{path}: truncated: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes}, "
                                  f"the file has {size}")
    return reader


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """The llama3 rope_scaling whose per-dimension factors are llama.cpp's rope_freqs tensor."""
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    factor = float(factors.max())
    for low, high, old in LLAMA3_ROPE:
        smooth = (old / wavelen - low) / (high - low)
        expected = np.where(wavelen < old / high, 1.0,
                            np.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth)))
        if np.allclose(expected, factors, rtol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": old}
    raise CheckpointError("per-dimension RoPE factors (rope_freqs) that are not Llama 3's scaling are not supported")


def hf_config(reader, arch: str) -> dict:
    def key(name, default=None):
        return field(reader, f"{arch}.{name}", default)

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError("no token_embd.weight tensor: not a complete language model")
    dim, n_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length") or key("rope.dimension_count") or dim // n_heads
    cfg = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),  # ggml order: [dim, vocab]
        "hidden_size": dim,
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": key("attention.head_count_kv") or n_heads,
        "intermediate_size": key("feed_forward_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6 if arch == "qwen2" else 1e-5),
        "rope_theta": key("rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "llama":
        cfg.update(head_dim=head_dim, attention_bias="blk.0.attn_q.bias" in tensors, mlp_bias=False)
    scaling = key("rope.scaling.type")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
    elif scaling not in (None, "none"):
        raise CheckpointError(f"rope scaling {scaling!r} is not supported (supported: linear)")
    if "rope_freqs.weight" in tensors:
        factors = np.array(tensors["rope_freqs.weight"].data, np.float64)
        cfg["rope_scaling"] = llama3_rope_scaling(factors, cfg["rope_theta"], head_dim)
    return cfg


def hf_name(gguf_name: str) -> str | None:
    """The transformers parameter name of a GGUF tensor, or None for tensors the model does not use."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 1 and stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{suffix}"
    return None


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` (convert_hf_to_gguf.py), which interleaves the two RoPE halves of each head."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_weights(reader, path: Path, arch: str, cfg: dict):
    """(name, torch tensor) for every tensor, dequantized by gguf (F16 and BF16 keep their dtype: no loss)."""
    from gguf import GGMLQuantizationType, dequantize

    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # read into config.json's rope_scaling
            continue
        qtype = t.tensor_type.name
        if qtype not in QUANT_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name!r} has quant type {qtype}, not supported "
                                  f"(supported: {', '.join(QUANT_TYPES)})")
        name = hf_name(t.name)
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for architecture {arch!r}")
        if t.tensor_type == GGMLQuantizationType.F16:
            w = np.array(t.data, dtype=np.float16)
        else:
            w = dequantize(t.data, t.tensor_type)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if arch == "llama" and t.name.endswith((".attn_q.weight", ".attn_q.bias")):
            w = unpermute(w, cfg["num_attention_heads"])
        elif arch == "llama" and t.name.endswith((".attn_k.weight", ".attn_k.bias")):
            w = unpermute(w, cfg["num_key_value_heads"])
        tensor = torch.from_numpy(np.array(w, order="C"))
        yield name, tensor.to(torch.bfloat16) if t.tensor_type == GGMLQuantizationType.BF16 else tensor


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in bs]
    return dict(zip(bs + others, map(chr, bs + [256 + i for i in range(len(others))])))


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best score first
    (transformers' `generate_merges`)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def build_tokenizer(reader, path: Path) -> tuple[Tokenizer, dict]:
    """tokenizer.json (as a `tokenizers.Tokenizer`) and the tokenizer_config.json fields, from tokenizer.ggml.*."""
    kind = field(reader, "tokenizer.ggml.model")
    if kind not in TOKENIZER_KINDS:
        raise CheckpointError(f"{path}: tokenizer kind {kind!r} not supported "
                              f"(supported: {', '.join(TOKENIZER_KINDS)})")
    tokens: list[str] = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = field(reader, "tokenizer.ggml.merges")
    if kind == "gpt2":
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges or []], fuse_unk=False,
                                    continuing_subword_prefix="", end_of_word_suffix=""))
        split = PRE_TOKENIZER_SPLITS.get(field(reader, "tokenizer.ggml.pre"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        if split is not None:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        control = [t for t, k in zip(tokens, types) if k == CONTROL and set(t) <= alphabet]
        add_bos = field(reader, "tokenizer.ggml.add_bos_token", False)
    else:
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = ([tuple(m.split(" ")) for m in merges] if merges
                 else merges_from_scores(tokens, field(reader, "tokenizer.ggml.scores")))
        tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=True, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
        control = [t for t, k in zip(tokens, types) if k == CONTROL]
        add_bos = field(reader, "tokenizer.ggml.add_bos_token", True)  # llama.cpp's default for SentencePiece
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED])

    def token(key):
        i = field(reader, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(add_bos and bos is not None)
    add_eos = bool(field(reader, "tokenizer.ggml.add_eos_token", False) and eos is not None)
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    specials = ([(bos, field(reader, "tokenizer.ggml.bos_token_id"))] * add_bos
                + [(eos, field(reader, "tokenizer.ggml.eos_token_id"))] * add_eos)
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos, "add_eos_token": add_eos, "clean_up_tokenization_spaces": False,
        "model_max_length": field(reader, f"{field(reader, 'general.architecture')}.context_length", 2048),
    }
    template = field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok, config


def write_shards(tensors, out_dir: Path, max_shard_bytes: float) -> None:
    shards, current, size = [], {}, 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensor, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def import_gguf(path: str | Path, out_dir: str | Path, max_shard_mb: float = 2000) -> Path:
    """Convert a GGUF file into a Hugging Face layout folder: config.json, safetensors shards, tokenizer.json,
    tokenizer_config.json (with the chat template), generation_config.json and npc_engine.json (prompt format).
    Quantized tensors are stored dequantized in float32. Returns out_dir."""
    path, out_dir = Path(path), Path(out_dir)
    reader = read_gguf(path)
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: architecture {arch!r} not supported (supported: {', '.join(ARCHITECTURES)})")
    tok, tok_config = build_tokenizer(reader, path)
    cfg = hf_config(reader, arch)
    eos = [i for i in (field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")) if i is not None]
    generation = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": sorted(set(eos)),
                  "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id")}
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("model*.safetensors*"):
        old.unlink()
    write_shards(tensor_weights(reader, path, arch, cfg), out_dir, max_shard_mb * 1e6)
    write_json(out_dir / "config.json", cfg)
    tok.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", tok_config)
    write_json(out_dir / "generation_config.json", generation)
    fmt = "chat_template" if "chat_template" in tok_config else "npc"
    write_json(out_dir / "npc_engine.json", {"prompt_format": fmt, "source": path.name,
                                             "name": field(reader, "general.name"),
                                             "license": field(reader, "general.license")})
    return out_dir


def import_gguf_atomic(path: Path, out_dir: Path) -> Path:
    """import_gguf into a sibling temporary folder, then rename it into place: a folder that exists is complete."""
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        import_gguf(path, tmp)
        tmp.rename(out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():  # not a lost race with another process: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
