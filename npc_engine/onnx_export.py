"""Export a Llama-family checkpoint to ONNX with explicit KV-cache inputs and outputs.

The graph follows the decoder-with-past convention of Hugging Face Optimum's exports, so code
written for those (in ONNX Runtime, Unity Sentis, Unreal NNE) can drive it:

  inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64 (1 = attend),
           position_ids [batch, seq] int64, past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
  outputs  logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past + seq, head_dim]
           (the past followed by the keys and values of the new tokens, RoPE already applied)

A query at index t of the new tokens sees past and new entries j with j <= past + t whose mask is 1.

`--layout ort` writes a graph for ONNX Runtime alone (its com.microsoft operators), the fast CPU path: each layer's
attention is one GroupQueryAttention (RoPE inside, GQA without repeating keys, past and present one buffer updated in
place), q/k/v one MatMul and gate/up one MatMul:

  inputs   input_ids [batch, seq] int64, seqlens_k [batch] int32 (the cache length after this call, minus 1),
           total_sequence_length [] int32 (an upper bound of seqlens_k + 1: the buffer length),
           query_seqlens [batch] int32 (seq for every row),
           past_key_values.{i}.key / .value [batch, kv_heads, buffer, head_dim]
  outputs  logits [batch, seq, vocab], present.{i}.key / .value: the past buffers themselves (bind them to the same
           memory), the new tokens' keys and values written at positions seqlens_k + 1 - seq ...,
           hidden_states [batch, seq, hidden]: the last decoder layer's output before the final norm; with
           `--feature-layers I,J,...` [batch, seq, n × hidden]: those layers' outputs side by side (what a feature
           head trained with the same `--feature-layers` reads)

A row's new tokens sit at positions seqlens_k + 1 - seq onwards and see every cache entry before them. The hidden
states and, with `--draft-weights`, DRAFT_WEIGHTS_FILE (the embedding, final norm and output head in the export's
dtype, unquantized: SmolLM2-135M's 113 MB in float32, so only on request) let a feature head (npc_engine.head) draft
for the export; the graph's own weights verify every token.

`--weights int8|int4`: weight-only quantization for the CPU: every MatMul with a constant weight (the projections
and the output head) becomes ONNX Runtime's MatMulNBits (blocks of WEIGHT_BLOCK input channels with a float scale
and a zero point each, as the Q4_1 GGUF; embedding, norms and the KV cache stay in the export's dtype). Decoding on
a CPU reads the weights once per step, so fewer weight bytes read is the gain.
"""
import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

import npc_engine
from npc_engine.adapters import adapter_pairs
from npc_engine.head import feature_layers_problem
from npc_engine.loading import CheckpointError, load_model
from npc_engine.model import Transformer, apply_rope, rope_cos_sin
from npc_engine.paths import resolve_model

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "npc-engine-onnx-decoder"
DRAFT_WEIGHTS_FILE = "draft_weights.safetensors"
DEFAULT_OPSET = 17
MIN_OPSET = 14  # the oldest opset the graph is tested at
MAX_OPSET = 20  # the newest opset torch's TorchScript exporter supports
EXTERNAL_DATA_BYTES = 2**31 - 2**26  # protobuf caps a file at 2 GiB; larger weights go to model.onnx.data
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
WEIGHT_BITS = {"float": None, "int8": 8, "int4": 4}
LAYOUTS = ("portable", "ort")  # the decoder-with-past convention, or ONNX Runtime's GroupQueryAttention graph
WEIGHT_BLOCK = 32  # llama.cpp's Q4_0/Q8_0 block
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "npc_engine.json")


class ExportError(ValueError):
    """An export that cannot be made; the message says why."""


def io_names(n_layers: int, layout: str = "portable") -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    first = (["input_ids", "attention_mask", "position_ids"] if layout == "portable" else
             ["input_ids", "seqlens_k", "total_sequence_length", "query_seqlens"])
    return [*first, *past], ["logits", *present] + (["hidden_states"] if layout == "ort" else [])


class DecoderWithPast(nn.Module):
    """The Transformer's weights behind the decoder-with-past interface (see the module docstring)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        m, args = self.model, self.model.args
        B, T = input_ids.shape
        P = past[0].shape[2]
        x = m.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, m.inv_freq, x.dtype)
        key_index = torch.arange(P + T, device=input_ids.device)
        query_index = torch.arange(T, device=input_ids.device) + P
        allowed = (key_index[None, :] <= query_index[:, None])[None] & attention_mask[:, None, :].bool()
        bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]  # [B, 1, T, P+T]
        repeats = args.n_heads // args.n_kv_heads
        presents = []
        for i, layer in enumerate(m.model.layers):
            attn, h = layer.self_attn, layer.input_layernorm.reference(x)
            q = apply_rope(attn.q_proj(h).view(B, T, args.n_heads, args.head_dim), cos, sin).transpose(1, 2)
            k = apply_rope(attn.k_proj(h).view(B, T, args.n_kv_heads, args.head_dim), cos, sin).transpose(1, 2)
            v = attn.v_proj(h).view(B, T, args.n_kv_heads, args.head_dim).transpose(1, 2)
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            k = k.repeat_interleave(repeats, dim=1) if repeats > 1 else k
            v = v.repeat_interleave(repeats, dim=1) if repeats > 1 else v
            # Scores and softmax in float32, so an fp16 export keeps the reference's precision.
            scores = torch.matmul(q, k.transpose(2, 3)).float() * args.head_dim ** -0.5 + bias
            out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, args.n_heads * args.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm.reference(x))
        return (m.lm_head(m.model.norm.reference(x)), *presents)


class GroupQueryAttention(torch.autograd.Function):
    """ONNX Runtime's com.microsoft.GroupQueryAttention in the exported graph. Exporting only traces `forward`, which
    gives outputs of the operator's shapes; ONNX Runtime computes the values."""

    @staticmethod
    def forward(ctx, qkv, past_k, past_v, seqlens_k, total, query_seqlens, cos, sin, args):
        return qkv[..., :args.n_heads * args.head_dim], past_k, past_v

    @staticmethod
    def symbolic(g, qkv, past_k, past_v, seqlens_k, total, query_seqlens, cos, sin, args):
        none = g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())
        # inputs: query (packed q, k, v), key, value, past_key, past_value, seqlens_k, total_sequence_length,
        # cos_cache, sin_cache, position_ids, attention_bias, head_sink, k_scale, v_scale, q_norm_weight,
        # k_norm_weight, query_seqlens
        out, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention", qkv, none, none, past_k, past_v, seqlens_k, total, cos, sin,
            none, none, none, none, none, none, none, query_seqlens, num_heads_i=args.n_heads,
            kv_num_heads_i=args.n_kv_heads, do_rotary_i=1, rotary_interleaved_i=0, outputs=3)
        out.setType(qkv.type().with_sizes([None, None, args.n_heads * args.head_dim]))
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


class OrtDecoder(nn.Module):
    """The Transformer's weights behind the `--layout ort` interface (see the module docstring)."""

    def __init__(self, model: Transformer, feature_layers: tuple[int, ...] = ()):
        super().__init__()
        self.model, self.feature_layers = model, feature_layers or (model.args.n_layers - 1,)
        freqs = torch.arange(model.args.max_position_embeddings, dtype=torch.float32)[:, None] * model.inv_freq.float()
        dtype = model.lm_head.weight.dtype
        self.register_buffer("cos", freqs.cos().to(dtype), persistent=False)  # [positions, head_dim / 2]
        self.register_buffer("sin", freqs.sin().to(dtype), persistent=False)
        self.qkv, self.gate_up = nn.ModuleList(), nn.ModuleList()
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv.append(concatenated(attn.q_proj, attn.k_proj, attn.v_proj))
            self.gate_up.append(concatenated(mlp.gate_proj, mlp.up_proj))

    def forward(self, input_ids, seqlens_k, total_sequence_length, query_seqlens, *past):
        m, args = self.model, self.model.args
        x = m.model.embed_tokens(input_ids)
        presents, features = [], []
        for i, layer in enumerate(m.model.layers):
            qkv = self.qkv[i](layer.input_layernorm.reference(x))
            out, k, v = GroupQueryAttention.apply(qkv, past[2 * i], past[2 * i + 1], seqlens_k, total_sequence_length,
                                                  query_seqlens, self.cos, self.sin, args)
            presents += [k, v]
            x = x + layer.self_attn.o_proj(out)
            gate, up = self.gate_up[i](layer.post_attention_layernorm.reference(x)).chunk(2, dim=-1)
            x = x + layer.mlp.down_proj(F.silu(gate) * up)
            if i in self.feature_layers:
                features.append(x)
        return (m.lm_head(m.model.norm.reference(x)), *presents, torch.cat(features, -1))


class LoraLinear(nn.Module):
    """base(x) + B(A(x)): a LoRA pair beside a weight that --weights quantizes. The pair stays in the export's dtype
    (quantize_weights skips it): rounding a merged weight to 4 bits snaps the adapter's small delta back onto the
    base's grid (measured with `--dtype int4`: models/README.md, "The shipped rank-4 cut on the dev split")."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(a.shape[1], a.shape[0], bias=False, dtype=base.weight.dtype)
        self.lora_b = nn.Linear(b.shape[1], b.shape[0], bias=False, dtype=base.weight.dtype)
        self.lora_a.weight.data, self.lora_b.weight.data = a.to(base.weight.dtype), b.to(base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))


def keep_adapter_beside_(model: Transformer, adapter: str | Path) -> None:
    """Wraps each layer the adapter targets in a LoraLinear."""
    for name, (a, b) in adapter_pairs(model, adapter).items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoraLinear(getattr(owner, child), a, b))


def concatenated(*layers: nn.Module) -> nn.Module:
    """One layer computing the layers' (nn.Linear or LoraLinear) outputs side by side; LoRA pairs become one pair
    (the A rows stacked, the B blocks on the diagonal)."""
    bases = [la.base if isinstance(la, LoraLinear) else la for la in layers]
    bias, dtype = bases[0].bias is not None, bases[0].weight.dtype
    fused = nn.Linear(bases[0].in_features, sum(la.out_features for la in bases), bias=bias, dtype=dtype)
    fused.weight.data = torch.cat([la.weight.data for la in bases])
    if bias:
        fused.bias.data = torch.cat([la.bias.data for la in bases])
    if not any(isinstance(la, LoraLinear) for la in layers):
        return fused
    pairs = [(la.lora_a.weight.data, la.lora_b.weight.data) if isinstance(la, LoraLinear) else
             (torch.zeros(0, la.in_features, dtype=dtype), torch.zeros(la.out_features, 0, dtype=dtype))
             for la in layers]
    return LoraLinear(fused, torch.cat([a for a, _ in pairs]), torch.block_diag(*[b for _, b in pairs]))


def example_inputs(model: Transformer, dtype: torch.dtype, layout: str, batch: int = 2, seq: int = 3, past: int = 5):
    args = model.args
    kv = torch.zeros(batch, args.n_kv_heads, past if layout == "portable" else past + seq, args.head_dim, dtype=dtype)
    ids = torch.zeros(batch, seq, dtype=torch.long)
    if layout == "ort":
        lengths = torch.full((batch,), past + seq, dtype=torch.int32)
        return (ids, lengths - 1, torch.tensor(past + seq, dtype=torch.int32), torch.full_like(lengths, seq),
                *([kv] * (2 * args.n_layers)))
    return (ids, torch.ones(batch, past + seq, dtype=torch.long),
            torch.arange(past, past + seq).expand(batch, seq).contiguous(), *([kv] * (2 * args.n_layers)))


def dynamic_axes(n_layers: int, layout: str) -> dict[str, dict[int, str]]:
    inputs, outputs = io_names(n_layers, layout)
    past, present = inputs[len(inputs) - 2 * n_layers:], outputs[1:1 + 2 * n_layers]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    if layout == "ort":
        axes.update({"seqlens_k": {0: "batch"}, "query_seqlens": {0: "batch"},
                     "hidden_states": {0: "batch", 1: "sequence"}})
        axes.update({name: {0: "batch", 2: "buffer"} for name in past + present})
        return axes
    axes.update({"attention_mask": {0: "batch", 1: "total_sequence"}, "position_ids": {0: "batch", 1: "sequence"}})
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in past})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in present})
    return axes


def quantize_weights(proto, bits: int):
    """The graph with each constant-weight MatMul as MatMulNBits of `bits` bits (onnxruntime's quantizer), but
    LoraLinear's pairs."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    lora = [node.name for node in proto.graph.node if "/lora_" in node.name]
    # accuracy level 4: int8 activations inside the product (MLAS's fast CPU kernels; int8 weights take 5-7x
    # longer without it, see benchmarks/README.md, and int4 weights 12x in the `ort` layout)
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=WEIGHT_BLOCK, is_symmetric=False, accuracy_level=4,
                                     nodes_to_exclude=lora)
    quantizer.process()
    return quantizer.model.model


def export_onnx(model_dir: str | Path, out_dir: str | Path, opset: int = DEFAULT_OPSET, dtype: str = "fp32",
                progress: bool = True, weights: str = "float", layout: str = "portable",
                adapter: str | Path | None = None, draft_weights: bool = False,
                feature_layers: tuple[int, ...] = ()) -> Path:
    """Write OUT_DIR/model.onnx (weights in model.onnx.data when over EXTERNAL_DATA_BYTES), the tokenizer
    and config files and manifest.json. Returns the path of model.onnx. weights: "float" (the export's dtype),
    "int8" or "int4"; layout: "portable" or "ort" (module docstring); adapter: a PEFT LoRA folder, merged into the
    weights but kept beside int4 ones (LoraLinear); draft_weights: with layout "ort", DRAFT_WEIGHTS_FILE too;
    feature_layers: with layout "ort", two or more layers whose outputs hidden_states holds (default the last's)."""
    import onnx  # only the exporter needs it; the runtime backend does not

    model_dir, out_dir = resolve_model(model_dir), Path(out_dir)  # a .gguf file: its converted folder
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype!r} not supported; choose one of {', '.join(EXPORT_DTYPES)}")
    if weights not in WEIGHT_BITS:
        raise ExportError(f"--weights {weights!r} not supported; choose one of {', '.join(WEIGHT_BITS)}")
    if layout not in LAYOUTS:
        raise ExportError(f"--layout {layout!r} not supported; choose one of {', '.join(LAYOUTS)}")
    if draft_weights and layout != "ort":
        raise ExportError("--draft-weights goes with --layout ort (the graph that outputs its hidden states)")
    if feature_layers and layout != "ort":
        raise ExportError("--feature-layers goes with --layout ort (the graph that outputs its hidden states)")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset} not supported; choose {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    if out_dir.exists() and out_dir.resolve() == model_dir.resolve():
        raise ExportError("the output folder must differ from the model folder")
    steps = tqdm(total=5, desc=f"export {model_dir.name}", unit="step", disable=not progress, file=sys.stderr)
    steps.set_postfix_str("loading weights")
    # int4 keeps an adapter's pairs beside its weights (LoraLinear); int8's grid holds the merged delta (the voice
    # eval measured so), and merging saves the pairs' MatMuls (benchmarks/README.md, "ONNX Runtime's
    # GroupQueryAttention layout")
    keep_pairs = adapter is not None and weights == "int4"
    model = load_model(model_dir, "cpu", EXPORT_DTYPES[dtype], adapter=None if keep_pairs else adapter)
    if keep_pairs:
        keep_adapter_beside_(model, adapter)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    problem = feature_layers_problem(feature_layers, model.args.n_layers)
    if problem:
        raise ExportError(f"--feature-layers: {problem}")
    if layout == "ort" and model.args.head_dim % 16:
        raise ExportError(f"--layout ort: ONNX Runtime's GroupQueryAttention wants a head dimension that is a "
                          f"multiple of 16, this model's is {model.args.head_dim}; use --layout portable")
    inputs, outputs = io_names(model.args.n_layers, layout)
    steps.update()
    steps.set_postfix_str("tracing the graph")
    out_dir.mkdir(parents=True, exist_ok=True)
    # torch writes one file per tensor beside a graph over 2 GB: trace into a scratch folder, then save cleanly.
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        traced = Path(scratch) / MODEL_FILE
        try:
            with torch.no_grad():
                graph = DecoderWithPast(model) if layout == "portable" else OrtDecoder(model, feature_layers)
                torch.onnx.export(graph, example_inputs(model, EXPORT_DTYPES[dtype], layout), str(traced),
                                  dynamo=False, opset_version=opset, input_names=inputs, output_names=outputs,
                                  dynamic_axes=dynamic_axes(model.args.n_layers, layout), do_constant_folding=True,
                                  custom_opsets={"com.microsoft": 1} if layout == "ort" else None)
        except Exception as e:  # torch raises several unrelated types for unsupported opsets or ops
            raise ExportError(f"torch.onnx.export failed at opset {opset}: {e}") from e
        steps.update()
        steps.set_postfix_str("saving")
        proto = onnx.load(str(traced))
    if WEIGHT_BITS[weights]:
        steps.set_postfix_str(f"quantizing weights to {weights}")
        proto = quantize_weights(proto, WEIGHT_BITS[weights])
    for old in out_dir.glob(f"{MODEL_FILE}*"):
        old.unlink()
    model_path = out_dir / MODEL_FILE
    external_data = f"{MODEL_FILE}.data" if weight_bytes > EXTERNAL_DATA_BYTES else None
    onnx.save_model(proto, str(model_path), save_as_external_data=external_data is not None,
                    all_tensors_to_one_file=True, location=external_data)
    steps.update()
    steps.set_postfix_str("checking the graph")
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{model_path}: onnx.checker rejected the exported graph: {e}") from e
    steps.update()
    steps.set_postfix_str("writing manifest")
    for name in COPIED_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    (out_dir / DRAFT_WEIGHTS_FILE).unlink(missing_ok=True)
    if draft_weights:
        save_draft_weights(model, out_dir / DRAFT_WEIGHTS_FILE)
    args = model.args
    manifest = {
        "format": MANIFEST_FORMAT, "format_version": 1, "model_file": MODEL_FILE, "external_data": external_data,
        "opset": opset, "dtype": dtype, "weights": weights, "layout": layout, "inputs": inputs, "outputs": outputs,
        "n_layers": args.n_layers, "n_kv_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "draft_weights": DRAFT_WEIGHTS_FILE if draft_weights else None,
        "feature_layers": list(feature_layers) or None,
        "source_model": str(model_dir.resolve()), "adapter": str(Path(adapter).resolve()) if adapter else None,
        "npc_engine_version": npc_engine.__version__,
        "torch_version": torch.__version__, "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime_version(),
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    steps.update()
    steps.close()
    return model_path


def save_draft_weights(model: Transformer, path: Path) -> None:
    """What a feature head reads of its target besides the hidden states: the embedding, the final norm and the
    output head (omitted when tied to the embedding)."""
    tensors = {"embed_tokens.weight": model.model.embed_tokens.weight, "norm.weight": model.model.norm.weight}
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        tensors["lm_head.weight"] = model.lm_head.weight
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version: a `--layout ort` graph uses its operators as that version defines them."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def cmd_export_onnx(args: argparse.Namespace) -> int:
    try:
        path = export_onnx(args.model, args.output, args.opset, args.dtype, weights=args.weights, layout=args.layout,
                           adapter=args.adapter, draft_weights=args.draft_weights,
                           feature_layers=args.feature_layers)
    except (ExportError, CheckpointError) as e:
        print(f"npc-engine export-onnx: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
