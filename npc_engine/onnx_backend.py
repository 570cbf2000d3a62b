"""ONNX Runtime backend: an exported decoder (see onnx_export.py) called exactly like a Transformer.

`OnnxModel(tokens, input_pos, cache, slots, kv_len, logits, prefix) -> logits` keeps the engine's
slot-indexed `KVCache` (torch tensors on the model's device), so shared persona prefixes, rollback by
length and every drafter work unchanged. Each call gathers the slots' first kv_len cache entries as the
graph's past (a row's entries below its prefix length from its prefix slot), binds every input and
output to torch memory with I/O binding (no copies through numpy; on CUDA the KV cache never leaves
the device) and writes the new keys and values back at their positions. A `--layout ort` export
(GroupQueryAttention) instead reads and writes the cache slot itself where it can (`OnnxModel.call_ort`).
The CPU and CUDA paths are one code path: only the execution provider, the bound device and one
stream synchronisation before each run differ.

A `--layout ort` export also outputs its hidden states: with a feature head (`attach_draft_weights`) each call
stores them in `feature_store` as Transformer.forward does, and the head drafts on them.
"""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file
from torch import nn

from npc_engine.loading import DTYPE_NAMES, read_config
from npc_engine.model import KVCache, RMSNorm, feature_width, gather_kv
from npc_engine.onnx_export import DRAFT_WEIGHTS_FILE, MANIFEST_FILE, MANIFEST_FORMAT

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}


class OnnxBackendError(ValueError):
    """An ONNX export that cannot be run here; the message says what is wrong and what to do."""


def cuda_usable() -> bool:
    return PROVIDERS["cuda"] in ort.get_available_providers() and torch.cuda.is_available()


def resolve_provider(provider: str) -> str:
    """"cpu", "cuda" (an error when unavailable) or "auto" (CUDA when usable, else CPU)."""
    if provider == "auto":
        return "cuda" if cuda_usable() else "cpu"
    if provider not in PROVIDERS:
        raise OnnxBackendError(f"ONNX provider {provider!r} unknown; choose one of cpu, cuda, auto")
    if provider == "cuda" and not cuda_usable():
        why = ("torch sees no CUDA device" if PROVIDERS["cuda"] in ort.get_available_providers() else
               f"this onnxruntime build lacks it (available: {', '.join(ort.get_available_providers())}; "
               f"install onnxruntime-gpu)")
        raise OnnxBackendError(f"ONNX Runtime provider CUDAExecutionProvider unavailable: {why}. "
                               f"Use --onnx-provider cpu, or --onnx-provider auto to fall back to the CPU")
    return provider


def read_manifest(path: Path) -> dict:
    file = path / MANIFEST_FILE
    if not path.is_dir():
        raise OnnxBackendError(f"ONNX model folder not found: {path}")
    if not file.is_file():
        raise OnnxBackendError(f"{path}: no ONNX export here ({MANIFEST_FILE} missing); create one with "
                               f"`npc-engine export-onnx --model MODEL_DIR -o {path}`")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise OnnxBackendError(f"{file}: invalid JSON: {e}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise OnnxBackendError(f"{file}: not an npc-engine ONNX manifest (format {manifest.get('format')!r})")
    missing = [key for key in ("model_file", "opset", "dtype", "inputs", "outputs") if key not in manifest]
    if missing:
        raise OnnxBackendError(f"{file}: missing field {missing[0]!r}; re-run npc-engine export-onnx")
    for name in (manifest["model_file"], manifest.get("external_data")):
        if name and not (path / name).is_file():
            raise OnnxBackendError(f"{path / name}: missing (named by {file}); re-run npc-engine export-onnx")
    if manifest["dtype"] not in DTYPES:
        raise OnnxBackendError(f"{file}: dtype {manifest['dtype']!r} not supported (supported: {', '.join(DTYPES)})")
    return manifest


class OnnxModel:
    """An ONNX decoder-with-past run by ONNX Runtime, with a Transformer's call signature."""

    feature_store: torch.Tensor | None = None  # [slots, max_seq, dim × layers]: a feature head's, as Transformer's

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int = 0):
        path = Path(path)
        manifest = read_manifest(path)
        self.manifest = manifest
        self.args = read_config(path)
        self.dtype = DTYPES[manifest["dtype"]]
        self.provider = resolve_provider(provider)
        cuda = self.provider == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # ORT's workers spin on after a run by default, holding the cores the next torch op (a feature head's
        # drafts) or the game itself wants: 11.8 against 5.7 ms of drafting per token (benchmarks/README.md,
        # "A feature head on ONNX Runtime"); stopped at each run's end, runs are as fast
        options.add_session_config_entry("session.force_spinning_stop", "1")
        provider_options = {"device_id": str(self.device.index)} if self.provider == "cuda" else {}
        try:
            self.session = ort.InferenceSession(str(path / manifest["model_file"]), options,
                                                providers=[(PROVIDERS[self.provider], provider_options)])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
            message = str(e)
            if "opset" in message.lower():
                raise OnnxBackendError(
                    f"{path}: exported with opset {manifest['opset']} (manifest), which onnxruntime {ort.__version__} "
                    f"cannot load; re-export with a lower --opset or upgrade onnxruntime. "
                    f"({message.strip()[-200:]})") from None
            hint = ""
            if manifest.get("layout") == "ort":
                hint = (f" (a --layout ort export uses ONNX Runtime's GroupQueryAttention as onnxruntime "
                        f"{manifest.get('onnxruntime_version')} defines it: install that version, or re-export with "
                        f"--layout portable)")
            raise OnnxBackendError(f"{path}: onnxruntime {ort.__version__} cannot load the model on "
                                   f"{PROVIDERS[self.provider]}{hint}: {message.strip()[-300:]}") from None
        if self.session.get_providers()[0] != PROVIDERS[self.provider]:
            raise OnnxBackendError(f"onnxruntime did not start {PROVIDERS[self.provider]} (it gave "
                                   f"{self.session.get_providers()[0]}); "
                                   "check the CUDA libraries onnxruntime-gpu needs")
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        if names != (manifest["inputs"], manifest["outputs"]):
            raise OnnxBackendError(f"{path}: model inputs/outputs differ from {MANIFEST_FILE}; "
                                   "re-run npc-engine export-onnx")
        self.binding = self.session.io_binding()
        self.layout = manifest.get("layout", "portable")
        # GroupQueryAttention reads one buffer per row: the engine copies a persona prefix into the row's own slot
        self.reads_prefix_slots = self.layout == "portable"
        self.path, self.hidden = path, "hidden_states" in manifest["outputs"]
        # the layers whose outputs hidden_states holds side by side (export-onnx --feature-layers); (): the last
        self.feature_layers = tuple(manifest.get("feature_layers") or ())

    def attach_draft_weights(self) -> None:
        """`model.embed_tokens`, `model.norm` and `lm_head` in torch, as a feature head reads them of its target (the
        export's DRAFT_WEIGHTS_FILE)."""
        file = self.path / (self.manifest.get("draft_weights") or "")
        if not self.hidden or not file.is_file():
            lacks = "its target's hidden states" if not self.hidden else f"the export's {DRAFT_WEIGHTS_FILE}"
            raise OnnxBackendError(f"{self.path}: a feature head drafts from {lacks}, which this export lacks; "
                                   f"re-export with `npc-engine export-onnx --layout ort --draft-weights`")
        tensors = {k: nn.Parameter(v.to(self.device), requires_grad=False) for k, v in load_file(str(file)).items()}
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding.from_pretrained(tensors["embed_tokens.weight"])
        self.model.norm = RMSNorm(self.args.dim, self.args.norm_eps)
        self.model.norm.weight = tensors["norm.weight"]
        self.lm_head = nn.Linear(self.args.dim, self.args.vocab_size, bias=False, device="meta")
        self.lm_head.weight = tensors.get("lm_head.weight", self.model.embed_tokens.weight)  # absent: tied

    def bind(self, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        bind = self.binding.bind_output if output else self.binding.bind_input
        bind(name, self.device.type, self.device.index or 0, NUMPY_DTYPES[tensor.dtype], list(tensor.shape),
             tensor.data_ptr())

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                 kv_len: int, logits: bool | torch.Tensor = True, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, input_pos: [B, T], each row's positions consecutive; every cache entry of a row before its
        first position is valid (below its prefix length: in its prefix slot, see Transformer.forward).
        Entries from that position on are hidden and then overwritten."""
        if self.layout == "ort":
            return self.call_ort(tokens, input_pos, cache, slots, kv_len, logits, prefix)
        args, (B, T) = self.args, tokens.shape
        # Tensors bound to the session must stay alive until the run ends: they are all kept in `bound`.
        past_visible = torch.arange(kv_len, device=self.device)[None, :] < input_pos[:, :1]
        mask = torch.cat([past_visible, torch.ones(B, T, dtype=torch.bool, device=self.device)], dim=1).long()
        bound = {"input_ids": tokens.long().contiguous(), "attention_mask": mask,
                 "position_ids": input_pos.long().contiguous()}
        presents, index = {}, cache.gather_index(slots, prefix, kv_len)
        for i in range(args.n_layers):
            bound[f"past_key_values.{i}.key"] = gather_kv(cache.k[i], index)
            bound[f"past_key_values.{i}.value"] = gather_kv(cache.v[i], index)
            for kv in ("key", "value"):
                presents[f"present.{i}.{kv}"] = torch.empty(B, args.n_kv_heads, kv_len + T, args.head_dim,
                                                             dtype=self.dtype, device=self.device)
        out, _ = self.run(bound, presents, B, T)
        rows = slots[:, None]
        for i in range(args.n_layers):
            cache.k[i][rows, :, input_pos] = presents[f"present.{i}.key"][:, :, kv_len:].transpose(1, 2)
            cache.v[i][rows, :, input_pos] = presents[f"present.{i}.value"][:, :, kv_len:].transpose(1, 2)
        return out[torch.arange(B, device=out.device), logits] if isinstance(logits, torch.Tensor) else out

    def run(self, inputs: dict[str, torch.Tensor], presents: dict[str, torch.Tensor], B: int,
            T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Binds the inputs, the presents and new logits and hidden-state tensors (returned; no hidden states from
        a graph without them), and runs the session. Every bound tensor must stay alive until the run ends: the
        caller keeps them."""
        out = torch.empty(B, T, self.args.vocab_size, dtype=self.dtype, device=self.device)
        for name, tensor in inputs.items():
            self.bind(name, tensor)
        self.bind("logits", out, output=True)
        width = feature_width(self.feature_layers, self.args.dim)
        hidden = torch.empty(B, T, width, dtype=self.dtype, device=self.device) if self.hidden else None
        if hidden is not None:
            self.bind("hidden_states", hidden, output=True)
        for name, tensor in presents.items():
            self.bind(name, tensor, output=True)
        if self.device.type == "cuda":
            # ORT computes on its own stream: torch's gathers must be done before it reads them. ORT waits
            # for its stream at the end of a run, so the outputs are ready for torch afterwards.
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(self.binding)
        return out, hidden

    def call_ort(self, tokens, input_pos, cache: KVCache, slots, kv_len: int, logits, prefix) -> torch.Tensor:
        """`__call__` on a `--layout ort` export: GroupQueryAttention reads and writes its past buffers in place. Rows
        in consecutive slots without a shared prefix (a single request, as in most games) bind the cache itself;
        other batches gather their entries into a buffer and copy the new ones back."""
        args, (B, T) = self.args, tokens.shape
        seqlens = (input_pos[:, 0] + T - 1).to(torch.int32)
        bound = {"input_ids": tokens.long().contiguous(), "seqlens_k": seqlens,
                 "total_sequence_length": torch.tensor(kv_len, dtype=torch.int32, device=self.device),
                 "query_seqlens": torch.full((B,), T, dtype=torch.int32, device=self.device)}
        first = int(slots[0])
        in_place = (prefix is None or not bool(prefix[:, 1].any())) and slots.tolist() == list(range(first, first + B))
        index = None if in_place else cache.gather_index(slots, prefix, kv_len)
        for i in range(args.n_layers):
            for kv, layer in (("key", cache.k[i]), ("value", cache.v[i])):
                bound[f"past_key_values.{i}.{kv}"] = layer[first:first + B] if in_place else gather_kv(layer, index)
        # GroupQueryAttention updates its past buffers in place: each present is bound to its past's memory
        presents = {f"present.{i}.{kv}": bound[f"past_key_values.{i}.{kv}"]
                    for i in range(args.n_layers) for kv in ("key", "value")}
        out, hidden = self.run(bound, presents, B, T)
        if self.feature_store is not None:
            self.feature_store[slots[:, None], input_pos] = hidden.to(self.feature_store.dtype)
        if not in_place:
            rows = torch.arange(B, device=self.device)[:, None]
            for i in range(args.n_layers):
                for kv, layer in (("key", cache.k[i]), ("value", cache.v[i])):
                    layer[slots[:, None], :, input_pos] = bound[f"past_key_values.{i}.{kv}"][rows, :, input_pos]
        return out[torch.arange(B, device=out.device), logits] if isinstance(logits, torch.Tensor) else out


def load_onnx_model(path: str | Path, provider: str = "cpu", dtype: str | torch.dtype | None = None) -> OnnxModel:
    """`dtype` (None/"auto" or the export's own) is checked against the export: ONNX weights have one dtype."""
    model = OnnxModel(path, provider)
    if dtype not in (None, "auto") and DTYPE_NAMES.get(dtype, dtype) != model.dtype:
        raise OnnxBackendError(f"{path}: exported as {model.manifest['dtype']}, cannot run as {dtype}; "
                               f"re-export with --dtype or drop --dtype")
    return model
