"""Feature head: a one-layer drafter that reads the target's own hidden states (EAGLE-style).

At position p the head takes the token x_p and the target's feature f_{p-1} (its last hidden state
before the final norm, at the position before; zeros at position 0), RMS-normalizes each (EAGLE-3's input
norms), mixes them with one linear layer, runs one decoder layer over its own KV cache and predicts the
feature f_p. The target's final norm and output head turn that prediction into next-token logits, so the head
owns no embedding and no vocabulary matrix: it drafts with the target's own, and a few draft steps cost one small
layer each.
Drafting feeds each predicted feature back in as the next position's input.

Reduced draft vocabulary (FR-Spec): a head may draft over a subset of the vocabulary only, `draft_ids` (the most
frequent tokens of the target's outputs). Its output projection is then the target's output-head rows of those ids,
a fraction of the full matrix on a large vocabulary; the other ids get logits of DRAFT_OFF (never drafted, q = 0
there), and the target still verifies over its full vocabulary, so output is unchanged.

Input norms: a target's features can dwarf its token embeddings (SmolLM2-135M: per-dimension RMS 23 against 0.10,
one dimension at 528), so an unnormalized fc hardly sees the token. Both inputs go through their own RMSNorm first;
the head's output scale is then free (the target's final norm and the next position's input norm both remove it).
Heads saved before the norms (no `input_norms` in their config) load and draft as they were trained.

Several layers' features (EAGLE-3): a head may read the outputs of several target layers (`feature_layers`, e.g. a low,
two middle and the last one), each RMS-normalized, side by side, mixed to one feature by the `fuse` linear layer; the
target stores those outputs side by side (`Transformer.feature_layers`, an `ort` export's `--feature-layers`). Its
own predicted features, fed back while drafting, are already one feature wide and skip the mix.

A head folder holds `config.json` (the target's shape with one layer, `architectures`:
["NpcEngineFeatureHead"], `input_norms`, `draft_vocab_size` when reduced) and `model.safetensors` (`fc.weight`,
`layer.*`, `embed_norm.weight` and `feature_norm.weight` with input norms, `draft_ids` when reduced; with several
feature layers, `feature_layers` in the config and `layer_norms.*`, `fuse.weight`).
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from npc_engine.loading import CheckpointError, parse_dtype
from npc_engine.model import (
    QKV_ROPE_MAX_DIM,
    DecoderLayer,
    KVCache,
    Linear,
    ModelArgs,
    RMSNorm,
    Transformer,
    TreeStep,
    fused_layer,
    mv_linear,
    rope_cos_sin,
    rope_inv_freq,
)

ARCHITECTURE = "NpcEngineFeatureHead"
DRAFT_OFF = -1e4  # finite: a header mask that allows only ids off the draft vocabulary still leaves a distribution


class FeatureHead(nn.Module):
    # With a cache and no tree: the fused kernels (model.fused_layer), its layer's projections fused first
    # (npc_engine.fusion.fuse_projections_); set with the target's by npc_engine.engine.forwards.use_fused_kernels.
    fused: bool = False

    def __init__(self, args: ModelArgs, draft_ids: torch.Tensor | None = None, input_norms: bool = True,
                 feature_layers: tuple[int, ...] = ()):
        """feature_layers: two or more target layers whose outputs the head reads; () the last layer's alone."""
        super().__init__()
        self.args = args  # the target's shape with n_layers = 1 (the KV cache of the head has one layer)
        if len(feature_layers) == 1:
            raise ValueError("feature_layers: two or more layers, or () for the last layer's output alone")
        self.feature_layers = tuple(feature_layers)
        if feature_layers:
            self.layer_norms = nn.ModuleList(RMSNorm(args.dim, args.norm_eps) for _ in self.feature_layers)
            self.fuse = Linear(len(self.feature_layers) * args.dim, args.dim, bias=False)
        self.embed_norm = RMSNorm(args.dim, args.norm_eps) if input_norms else None
        self.feature_norm = RMSNorm(args.dim, args.norm_eps) if input_norms else None
        self.fc = Linear(2 * args.dim, args.dim, bias=False)
        self.layer = DecoderLayer(args)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.register_buffer("draft_ids", None if draft_ids is None else torch.as_tensor(draft_ids, dtype=torch.long))
        self._rows, self._rows_of = None, (None, -1)  # the target's output-head rows of draft_ids, taken once

    def target_features(self, stored: torch.Tensor) -> torch.Tensor:
        """The target's stored features [..., len(feature_layers) * dim] as the head's input feature [..., dim]."""
        if not self.feature_layers:
            return stored
        # the layers' norms as one over [..., layers, dim] (a launch-bound GPU step pays for every kernel of four), in
        # RMSNorm.reference's ops, which the head's ONNX graph (npc_engine.head_ort) exports too
        parts = stored.to(self.fuse.weight.dtype).unflatten(-1, (len(self.feature_layers), self.args.dim))
        weight, h = torch.stack([norm.weight for norm in self.layer_norms]), parts.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.layer_norms[0].eps)
        return self.fuse((weight * h.to(parts.dtype)).flatten(-2))

    def draft_rows(self, target: Transformer) -> torch.Tensor:
        """Taken again when the output head changes (another tensor, or this one edited in place: folded norms)."""
        if not isinstance(target.lm_head, nn.Linear):
            raise ValueError("a reduced-vocabulary feature head reads the rows of the target's output head, which "
                             "--dtype fp8 stores as FP8: use the head with another dtype")
        weight = target.lm_head.weight
        if self._rows_of[0] is not weight or self._rows_of[1] != weight._version or self._rows.device != weight.device:
            self._rows, self._rows_of = weight[self.draft_ids].contiguous(), (weight, weight._version)
        return self._rows

    def logits(self, target: Transformer, features: torch.Tensor) -> torch.Tensor:
        """Next-token logits over the full vocabulary; with draft_ids only those are computed, the rest DRAFT_OFF."""
        if self.draft_ids is None:
            return head_logits(target, features)
        return self.spread(self.draft_logits(target, features), target.args.vocab_size)

    def spread(self, sub: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Logits over draft_ids [..., len(draft_ids)] as logits over the full vocabulary, DRAFT_OFF elsewhere."""
        out = sub.new_full((*sub.shape[:-1], vocab_size), DRAFT_OFF)
        return out.scatter_(-1, self.draft_ids.expand_as(sub), sub)

    def draft_logits(self, target: Transformer, features: torch.Tensor) -> torch.Tensor:
        """A reduced head's logits over its draft_ids only [..., len(draft_ids)]."""
        norm = target.model.norm
        if self.fused:
            from kernels import add_rmsnorm, linear

            return linear(add_rmsnorm(features.to(norm.weight.dtype), None, norm.weight, norm.eps)[0],
                          self.draft_rows(target))
        return mv_linear(norm(features.to(norm.weight.dtype)), self.draft_rows(target))

    def top_tokens(self, target: Transformer, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most likely next tokens of each predicted feature: (log-probabilities in float32, ids), [..., k]. A
        reduced head's off-vocabulary ids have probability ~exp(DRAFT_OFF), so its softmax runs over draft_ids only."""
        if self.draft_ids is None:
            return head_logits(target, features).float().log_softmax(-1).topk(k, -1)
        logp, index = self.draft_logits(target, features).float().log_softmax(-1).topk(k, -1)
        return logp, self.draft_ids[index]

    def forward(self, target: Transformer, tokens: torch.Tensor, features: torch.Tensor,
                input_pos: torch.Tensor | None = None, cache: KVCache | None = None, slots: torch.Tensor | None = None,
                kv_len: int | None = None, prefix: torch.Tensor | None = None,
                tree: TreeStep | None = None) -> torch.Tensor:
        """tokens [B, T], features [B, T, dim] (the feature at each position before: target_features of the target's
        or the head's own prediction): the predicted features [B, T, dim]. Without a cache the T positions attend
        causally to each other (training); tree: the tokens are draft-tree nodes (npc_engine.model.TreeStep)."""
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        kv_len = None if cache is None else cache.max_seq if kv_len is None else kv_len
        fused = self.fused and cache is not None and tree is None  # the kernels' tree mask is over one step's nodes
        dtype = self.fc.weight.dtype  # the target may run another (int4 weights: float32 embeddings)
        embedded, features = target.model.embed_tokens(tokens).to(dtype), features.to(dtype)
        if self.embed_norm is not None:
            embedded, features = self.input_norms(embedded, features, fused)
        x = torch.cat([embedded, features], dim=-1)
        if fused:
            from kernels import linear

            x, (cos, sin) = linear(x, self.fc.weight), target.rope_table(cache.max_seq, x.device)
            return fused_layer(self.layer, x, cos, sin, input_pos, *cache.layer(0), slots, kv_len, prefix,
                               rope_in_qkv=tokens.numel() == 1 and self.args.dim <= QKV_ROPE_MAX_DIM)
        x, layout = self.fc(x), None
        if cache is not None:
            layout = cache.layout(slots, input_pos, prefix, kv_len, self.args.n_heads // self.args.n_kv_heads, tree)
        return self.layer(x, *rope_cos_sin(input_pos, self.inv_freq, x.dtype),
                          None if cache is None else cache.layer(0), layout)

    def input_norms(self, embedded: torch.Tensor, features: torch.Tensor,
                    fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not fused:
            return self.embed_norm(embedded), self.feature_norm(features)
        from kernels import add_rmsnorm

        return (add_rmsnorm(embedded, None, self.embed_norm.weight, self.embed_norm.eps)[0],
                add_rmsnorm(features, None, self.feature_norm.weight, self.feature_norm.eps)[0])


def head_logits(target: Transformer, features: torch.Tensor) -> torch.Tensor:
    """Next-token logits of (predicted) features through the target's final norm and output head."""
    return target.lm_head(target.model.norm(features.to(target.model.norm.weight.dtype)))


def feature_layers_problem(layers, n_layers: int) -> str | None:
    """What is wrong with feature layers for a target of n_layers (None: nothing; () is the last layer's alone)."""
    if not layers:
        return None
    if (len(layers) < 2 or not all(isinstance(i, int) for i in layers) or list(layers) != sorted(set(layers))
            or not 0 <= layers[0] <= layers[-1] < n_layers):
        return (f"feature layers {','.join(map(str, layers))}: two or more increasing layer indices below the "
                f"target's {n_layers} layers are needed")
    return None


def default_feature_layers(n_layers: int) -> tuple[int, ...]:
    """A low, two middle and the last layer (SmolLM2-135M's 30: 5, 12, 20, 29), as EAGLE-3 mixes low, middle and
    high features; () for a one-layer target. Against the last layer alone, at equal training on the H200:
    teacher-forced dev agreement 0.738 against 0.688 (benchmarks/README.md, "Several layers' features")."""
    layers = tuple(sorted({n_layers // 6, 2 * n_layers // 5, 2 * n_layers // 3, n_layers - 1}))
    return layers if len(layers) > 1 else ()


def head_args(target_args: ModelArgs) -> ModelArgs:
    return ModelArgs(**{**target_args.__dict__, "n_layers": 1, "architecture": "LlamaForCausalLM"})


def is_head_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and ARCHITECTURE in (json.loads(config.read_text()).get("architectures") or [])


def save_head(head: FeatureHead, path: str | Path, target_name: str, dtype: torch.dtype = torch.bfloat16) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {**head.args.to_hf_config(), "architectures": [ARCHITECTURE], "model_type": "npc_engine_feature_head",
           "target": target_name, "torch_dtype": str(dtype).removeprefix("torch."),
           "input_norms": head.embed_norm is not None}
    if head.feature_layers:
        cfg["feature_layers"] = list(head.feature_layers)
    if head.draft_ids is not None:
        cfg["draft_vocab_size"] = len(head.draft_ids)
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in head.state_dict().items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def load_head(path: str | Path, target: Transformer, device, dtype=None) -> FeatureHead:
    """A head folder for this target: its shape must be the target's (hidden size, heads, RoPE)."""
    path = Path(path)
    if not is_head_dir(path):
        raise CheckpointError(f"{path}: not a feature-head folder (config.json with architectures "
                              f"[\"{ARCHITECTURE}\"], written by `npc-engine train --stages head`)")
    cfg = json.loads((path / "config.json").read_text())
    args = head_args(ModelArgs.from_hf_config({**cfg, "architectures": ["LlamaForCausalLM"]}))
    expected = head_args(target.args)
    for field in ("dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "rope_theta", "rope_scaling"):
        if getattr(args, field) != getattr(expected, field):
            raise CheckpointError(f"feature head {path} was trained for a target with {field} {getattr(args, field)}, "
                                  f"this target has {getattr(expected, field)}")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    draft_ids = tensors.get("draft_ids")
    if draft_ids is not None and (draft_ids.dim() != 1 or not len(draft_ids) or draft_ids.dtype != torch.long
                                  or int(draft_ids.min()) < 0 or int(draft_ids.max()) >= args.vocab_size):
        raise CheckpointError(f"{weights.name}: draft_ids must be a non-empty list of token ids below "
                              f"{args.vocab_size}")
    raw = cfg.get("feature_layers") or []
    layers = tuple(raw) if isinstance(raw, list) else (raw,)
    problem = feature_layers_problem(layers, target.args.n_layers)
    if problem:
        raise CheckpointError(f"feature head {path}: config.json's feature_layers: {problem}")
    head = FeatureHead(args, draft_ids, input_norms=cfg.get("input_norms", False), feature_layers=layers)
    expected_shapes = {k: v.shape for k, v in head.state_dict().items()}
    for name, tensor in tensors.items():
        if expected_shapes.get(name) != tensor.shape:
            raise CheckpointError(f"{weights.name}: unexpected tensor {name!r} {tuple(tensor.shape)} "
                                  "for a feature head")
    missing = sorted(set(expected_shapes) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: missing tensors: {', '.join(missing)}")
    head.load_state_dict(tensors)
    head = head.to(device=device, dtype=parse_dtype(dtype, device))
    head.inv_freq = rope_inv_freq(args).to(device)  # kept in float32
    return head.eval().requires_grad_(False)
