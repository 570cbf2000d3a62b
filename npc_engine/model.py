"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM shapes) with a static, slot-indexed KV cache.

Parameter names are exactly those of Hugging Face `transformers`, so checkpoints load and save
without a name map. One forward serves training (no cache), chunked prefill, decode and the
verification of K+1 draft tokens: every row of the batch carries its own positions.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels.prefix import prefix_rows

MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED_ARCHITECTURES = tuple(MODEL_TYPES)
# One-row decode steps up to this hidden size run q/k/v + RoPE + cache write as one kernel: faster on the H200 for
# the trained pair (256) and the 1B shape (2048), slower for the 8B shape (4096) (benchmarks/README.md,
# "One-row q/k/v + RoPE kernel").
QKV_ROPE_MAX_DIM = 2048
# Forwards of a few rows (up to kernels.gemv.FUSED_MAX_ROWS: verified drafts, draft trees, a feature head's refeed) up
# to this hidden size fuse each RMSNorm and residual add into the linear kernels as one row does: at SmolLM2-135M's
# size (576) a step is launch-bound and fewer kernels win; at 2048 and up the norm kernel + cuBLAS ran faster
# (benchmarks/README.md, "Fused norm and residual", "Sixth GPU session").
ROWS_FUSED_MAX_DIM = 1024


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        qwen = arch == "Qwen2ForCausalLM"
        eos = cfg.get("eos_token_id")
        # transformers >= 5 writes "rope_parameters" (theta inside); older versions "rope_theta" + "rope_scaling".
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or 0,
            norm_eps=cfg.get("rms_norm_eps", 1e-6 if qwen else 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=True if qwen else cfg.get("attention_bias", False),
            o_bias=False if qwen else cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            architecture=arch,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )

    def to_hf_config(self) -> dict:
        cfg = {
            "architectures": [self.architecture],
            "model_type": MODEL_TYPES[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else (self.eos_token_id or None),
        }
        if self.architecture == "LlamaForCausalLM":
            cfg.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        return cfg


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies, including the Llama-3 and linear scalings (as `transformers` computes them)."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.int64).float() / args.head_dim))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def rope_cos_sin(input_pos: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [B, T, 1, head_dim] at positions input_pos [B, T] (computed in float32, returned in
    dtype), as apply_rope takes them: the sin's first half negated, so rotating half of x is one roll."""
    freqs = input_pos.float()[..., None, None] * inv_freq.float()
    sin = freqs.sin()
    return torch.cat((freqs, freqs), dim=-1).cos().to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: rope_cos_sin's. x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1):
    the roll gives (x2, x1) and the signed sin the minus, in four ops (a decode step runs this 60 times)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


@dataclass
class CacheLayout:
    """Where a cached forward writes and reads every layer's keys and values, one layer's k or v viewed as
    [n_slots * Hkv * max_seq, head_dim] rows; built once per forward (KVCache.layout) and shared by all layers."""
    write: torch.Tensor  # [B * T * Hkv]: the rows of the new keys and values, in [B, T, Hkv] order
    read: torch.Tensor  # [B, Hkv, n]: the rows attended (KVCache.gather_index)
    mask: torch.Tensor  # [B, 1, G * T, n], True: visible; the G query heads of a KV head attend as one block


@dataclass
class TreeStep:
    """A cached forward over draft-tree nodes: node t of row b is written at cache position write[b, t] (its RoPE
    position, input_pos, is the depth it would have in the line) and sees every cache position before base[b] (the
    row's committed tokens) and, of the tree region base[b] + s for s < S, only those where visible[b, t, s] (its
    ancestors and itself)."""
    write: torch.Tensor  # [B, T]
    base: torch.Tensor  # [B]
    visible: torch.Tensor  # [B, T, S] bool


def grouped_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, layout: CacheLayout) -> torch.Tensor:
    """q [B, T, Hq, D], rotated; k, v [B, T, Hkv, D], written into one layer's cache first -> [B, Hq, T, D]. The
    G = Hq / Hkv query heads of each KV head attend as one block of G * T query rows, so keys and values are never
    copied per query head (that copy took 12 % of a CPU decode step of SmolLM2-135M's shape: benchmarks/README.md,
    "CPU decode step")."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    k_cache.view(-1, D).index_copy_(0, layout.write, k.reshape(-1, D))
    v_cache.view(-1, D).index_copy_(0, layout.write, v.reshape(-1, D))
    q = q.transpose(1, 2).reshape(B, Hkv, Hq // Hkv * T, D)  # query head h = kv head h // G, as in GQA checkpoints
    out = F.scaled_dot_product_attention(q, gather_kv(k_cache, layout.read), gather_kv(v_cache, layout.read),
                                         attn_mask=layout.mask)
    return out.reshape(B, Hq, T, D)  # on CUDA the output of several rows is not contiguous


def gather_kv(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One layer's keys or values [n_slots, Hkv, S, D] at a `KVCache.gather_index` [B, Hkv, n] -> [B, Hkv, n, D]."""
    D = cache.shape[-1]
    return cache.view(-1, D).index_select(0, index.flatten()).view(*index.shape, D)


def mv_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, but one bfloat16 row on the CPU is a matrix-vector product (torch.mv). For one row F.linear goes to
    oneDNN's AMX kernel, which fills one row of a 16-row tile: SmolLM2-135M's decoder weights took 25.5 ms a step
    that way against 17.9 ms with mv, and up to 32 rows cost the same as one. The two give the same numbers
    (benchmarks/README.md, "bfloat16 on the CPU"), so a drafted step's verified rows match plain decoding's."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1]:
        y = torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear through mv_linear (same parameters and names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mv_linear(x, self.weight, self.bias)


def linear_params(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(weight, bias, scale) of an nn.Linear (scale None) or a kernels.Fp8Linear, as kernels.linear takes them."""
    if isinstance(layer, nn.Linear):
        return layer.weight, layer.bias, None
    return layer.weight_fp8, layer.bias, layer.scale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op; other dtypes round as transformers does, before the weight
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """transformers' formula, in ops every ONNX opset has."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        # (weight, bias, FP8 scale or None) of q, k, v as one matrix, set by npc_engine.fusion.fuse_projections_
        self.qkv: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        kv_size = args.n_kv_heads * args.head_dim
        self.qkv_sizes = (args.n_heads * args.head_dim, kv_size, kv_size)

    def forward(self, x, cos, sin, cache_kv, layout: CacheLayout | None):
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if cache_kv is None:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=True)
        else:
            # A query sees every cached key at or before its own position (layout.mask): stale entries past a
            # row's length (rolled-back drafts, padding) always sit after the query and stay hidden.
            out = grouped_cache_attention(q, k, v, *cache_kv, layout)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def forward_fused(self, qkv, cos_table, sin_table, input_pos, k_cache, v_cache, slots, kv_len, prefix, residual,
                      tree: TreeStep | None = None):
        """qkv: [B, T, q + k + v] projections (one fused matrix). Returns residual + the attention block's output.
        tree: q and k rotate at input_pos (a node's depth), the keys and values are written at tree.write."""
        from kernels import rope_kv_write

        B, T, _ = qkv.shape
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q = rope_kv_write(q, k, v, cos_table, sin_table, input_pos, slots, k_cache, v_cache,
                          None if tree is None else tree.write)
        return self.attend(q, input_pos, k_cache, v_cache, slots, kv_len, prefix, residual, tree)

    def attend(self, q, input_pos, k_cache, v_cache, slots, kv_len, prefix, residual, tree: TreeStep | None = None):
        """q [B, T, heads, head_dim], rotated, its keys and values in the cache: residual + o_proj(attention). A tree
        step's queries sit at their cache positions tree.write, the step's own keys masked by tree.visible."""
        from kernels import cached_attention, linear

        B, T = q.shape[:2]
        at, mask = (input_pos, None) if tree is None else (tree.write, tree.visible)
        out = cached_attention(q, k_cache, v_cache, slots, at, mask, max_len=kv_len, prefix=prefix)
        return linear(out.reshape(B, T, -1), *linear_params(self.o_proj), residual=residual)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

        self.gate_up: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None  # npc_engine.fusion

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, cache_kv=None, layout: CacheLayout | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache_kv, layout)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class KVCache:
    """Preallocated keys and values: [layers, slots, kv_heads, max_seq, head_dim]. A slot is one sequence
    (or a persona prefix that rows read through a prefix reference)."""

    def __init__(self, args: ModelArgs, n_slots: int, max_seq: int, device, dtype):
        shape = (args.n_layers, n_slots, args.n_kv_heads, max_seq, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_slots, self.max_seq = n_slots, max_seq

    @staticmethod
    def slot_bytes(args: ModelArgs, max_seq: int, dtype: torch.dtype) -> int:
        return 2 * args.n_layers * args.n_kv_heads * max_seq * args.head_dim * dtype.itemsize

    def gather_index(self, slots: torch.Tensor, prefix: torch.Tensor | None, n: int) -> torch.Tensor:
        """[B, Hkv, n] rows of one layer's k or v viewed as [n_slots * Hkv * max_seq, head_dim]: each batch row's
        first n entries, those below its prefix length (prefix [B, 2]: slot, length) from that prefix slot.
        Built once per forward for every layer: one index_select then gathers a layer, shared prefix or not."""
        H, j = self.k.shape[2], torch.arange(n, device=slots.device)
        rows = prefix_rows(slots, j, prefix)
        return (rows[:, None, :] * H + torch.arange(H, device=slots.device)[:, None]) * self.max_seq + j

    def layout(self, slots: torch.Tensor, input_pos: torch.Tensor, prefix: torch.Tensor | None, n: int,
               groups: int, tree: TreeStep | None = None) -> CacheLayout:
        """The rows a forward over input_pos [B, T] writes and reads in every layer, attending over n positions with
        `groups` query heads per KV head (a tree step: where `tree` says)."""
        H, (B, T) = self.k.shape[2], input_pos.shape
        heads, keys = torch.arange(H, device=slots.device), torch.arange(n, device=slots.device)
        at = input_pos if tree is None else tree.write
        write = ((slots[:, None, None] * H + heads) * self.max_seq + at[:, :, None]).flatten()
        if tree is None:
            visible = keys <= input_pos[:, :, None]  # [B, T, n]
        else:
            s, S = keys - tree.base[:, None], tree.visible.shape[-1]  # [B, n]: index in the tree region
            in_tree = tree.visible.gather(2, s.clamp(0, S - 1)[:, None].expand(B, T, n)) & (s < S)[:, None]
            visible = (s < 0)[:, None] | in_tree
        mask = visible[:, None].expand(B, groups, T, n).reshape(B, 1, groups * T, n)
        return CacheLayout(write, self.gather_index(slots, prefix, n), mask)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]


def feature_width(feature_layers: tuple[int, ...], dim: int) -> int:
    """Columns of a feature store holding these layers' outputs side by side (): the last layer's alone."""
    return max(1, len(feature_layers)) * dim


class Transformer(nn.Module):
    # With a cache, run the fused kernels of kernels/ (Triton on CUDA, their PyTorch references elsewhere).
    fused: bool = False
    # [n_slots, max_seq, dim]: when set, every cached forward stores its last hidden states (before the final norm)
    # at (slot, position), the features a feature-head drafter reads (npc_engine.head). With feature_layers (two or
    # more layer indices, a head's) it stores those layers' outputs side by side: [n_slots, max_seq, n * dim].
    feature_store: torch.Tensor | None = None
    feature_layers: tuple[int, ...] = ()
    reads_prefix_slots = True  # a row reads its persona prefix from the prefix's slot (forward's `prefix`)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self.model = Decoder(args)
        self.lm_head = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, cache: KVCache | None = None,
                slots: torch.Tensor | None = None, kv_len: int | None = None,
                logits: bool | torch.Tensor = True, prefix: torch.Tensor | None = None,
                tree: TreeStep | None = None) -> torch.Tensor | None:
        """tokens, input_pos: [B, T]; slots: [B] cache rows; kv_len: keys to attend over (≥ max position + 1).
        logits: True gives [B, T, vocab]; False skips the head (a prefill only needs the cache writes); an
        index tensor [B] gives [B, vocab] at one position of each row (a prefill's last prompt token).
        prefix: [B, 2] int64 (slot, length): a row reads cache positions below the length from that slot
        (a shared persona prefix; every input position is at or past it); None or length 0: none.
        tree: the tokens are draft-tree nodes (TreeStep; the fused forward takes only a tree over the step's own
        nodes, as npc_engine.engine.trees builds it)."""
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        if cache is not None:
            slots = torch.arange(B, device=tokens.device) if slots is None else slots
            kv_len = cache.max_seq if kv_len is None else kv_len
            if self.fused:
                if self.model.layers[0].self_attn.qkv is None:
                    raise ValueError("the fused forward needs npc_engine.fusion.fuse_projections_(model) first")
                return self.forward_fused(tokens, input_pos, cache, slots, kv_len, logits, prefix, tree)
        x = self.hidden_states(tokens, input_pos, cache, slots, kv_len, prefix, tree)
        if isinstance(logits, torch.Tensor):
            x = x[torch.arange(B, device=x.device), logits]
        elif not logits:
            return None
        return self.lm_head(self.model.norm(x))

    def hidden_states(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache: KVCache | None = None,
                      slots: torch.Tensor | None = None, kv_len: int | None = None,
                      prefix: torch.Tensor | None = None, tree: TreeStep | None = None) -> torch.Tensor:
        """The last decoder layer's output [B, T, dim], before the final norm (forward's arguments); with a cache
        and a feature store, the features stored too."""
        return self.layer_outputs(tokens, input_pos, cache, slots, kv_len, prefix, tree)[0]

    def layer_features(self, tokens: torch.Tensor, input_pos: torch.Tensor,
                       layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Without a cache (a feature head's training): the last layer's output [B, T, dim] and the listed layers'
        side by side [B, T, len(layers) * dim]; () lists the last alone."""
        last, kept = self.layer_outputs(tokens, input_pos, keep=layers)
        return last, torch.cat(kept, -1) if kept else last

    def layer_outputs(self, tokens, input_pos, cache: KVCache | None = None, slots=None, kv_len=None, prefix=None,
                      tree: TreeStep | None = None, keep: tuple[int, ...] = ()) -> tuple[torch.Tensor, list]:
        groups = self.args.n_heads // self.args.n_kv_heads
        layout = None if cache is None else cache.layout(slots, input_pos, prefix, kv_len, groups, tree)
        x = self.model.embed_tokens(tokens)
        cos, sin = rope_cos_sin(input_pos, self.inv_freq, x.dtype)
        store, kept = self.store_columns() if cache is not None else {}, []
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, None if cache is None else cache.layer(i), layout)
            if i in store:
                self.store_features(x, store[i], slots, input_pos if tree is None else tree.write)
            if i in keep:
                kept.append(x)
        return x, kept

    def store_columns(self) -> dict[int, slice]:
        """Layer index -> the feature store's columns its output fills ({} without a store)."""
        if self.feature_store is None:
            return {}
        dim = self.args.dim
        return {i: slice(n * dim, (n + 1) * dim)
                for n, i in enumerate(self.feature_layers or (self.args.n_layers - 1,))}

    def store_features(self, x: torch.Tensor, columns: slice, slots: torch.Tensor, at: torch.Tensor) -> None:
        self.feature_store[slots[:, None], at, columns] = x.to(self.feature_store.dtype)

    def forward_fused(self, tokens, input_pos, cache: KVCache, slots, kv_len: int,
                      logits: bool | torch.Tensor = True, prefix: torch.Tensor | None = None,
                      tree: TreeStep | None = None) -> torch.Tensor | None:
        """Same function as forward with a cache (the norms' weights folded into the projections after them by
        npc_engine.fusion.fuse_projections_). One row (a decode step at batch 1), and a few rows up to
        ROWS_FUSED_MAX_DIM, without FP8 weights: `fused_layer`. Otherwise residual add + RMSNorm is one kernel (with
        several rows at 2048 and up the linear kernel ran slower with them fused than cuBLAS after a norm kernel, and
        with FP8 weights the one-row kernel did too: benchmarks/README.md, "Fused norm and residual"), and so is RoPE
        + cache write. Attention over cached keys is one kernel (and its split combine). The attention kernel's tree
        mask covers the step's own keys only, so a draft tree's tree.visible must be [B, T, T] with tree.write[b] =
        tree.base[b] + 0..T-1 (as npc_engine.engine.trees builds it)."""
        from kernels import add_rmsnorm, gated_linear, linear
        from kernels.gemv import FUSED_MAX_ROWS

        if tree is not None and tree.visible.shape != (*tokens.shape, tokens.shape[1]):
            raise ValueError(f"the fused forward verifies a tree over the step's own nodes: TreeStep.visible must be "
                             f"[B, T, T] = {[*tokens.shape, tokens.shape[1]]}, got {list(tree.visible.shape)}")
        cos, sin = self.rope_table(cache.max_seq, tokens.device)
        plain = self.model.layers[0].self_attn.qkv[2] is None  # not FP8
        one_row = tree is None and tokens.numel() == 1 and plain
        rows_fused = one_row or (plain and tokens.numel() <= FUSED_MAX_ROWS and self.args.dim <= ROWS_FUSED_MAX_DIM)
        rope_in_qkv = one_row and self.args.dim <= QKV_ROPE_MAX_DIM
        h, pending = self.model.embed_tokens(tokens), None  # pending: a block's output not yet added to h
        store, at = self.store_columns(), input_pos if tree is None else tree.write
        for i, layer in enumerate(self.model.layers):
            if rows_fused:
                h = fused_layer(layer, h, cos, sin, input_pos, *cache.layer(i), slots, kv_len, prefix, tree,
                                rope_in_qkv)
            else:
                attn, mlp = layer.self_attn, layer.mlp
                eps1, eps2 = layer.input_layernorm.eps, layer.post_attention_layernorm.eps
                x, h = add_rmsnorm(h, None, None, eps1) if pending is None else add_rmsnorm(pending, h, None, eps1)
                pending = attn.forward_fused(linear(x, *attn.qkv), cos, sin, input_pos, *cache.layer(i), slots,
                                             kv_len, prefix, residual=None, tree=tree)
                x, h = add_rmsnorm(pending, h, None, eps2)
                pending = linear(gated_linear(x, *mlp.gate_up), *linear_params(mlp.down_proj))
            if i in store:  # the sum apart: h and pending go on as without a store, so the numbers are the same
                self.store_features(h if pending is None else h + pending, store[i], slots, at)
        if isinstance(logits, torch.Tensor):
            rows = torch.arange(h.shape[0], device=h.device)
            h, pending = h[rows, logits][:, None], None if pending is None else pending[rows, logits][:, None]
        elif not logits:
            return None
        x, _ = add_rmsnorm(h, pending, self.model.norm.weight, self.model.norm.eps)
        out = linear(x, *linear_params(self.lm_head))
        return out[:, 0] if isinstance(logits, torch.Tensor) else out

    def rope_table(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [n, head_dim / 2] in float32, built once (before any CUDA-graph capture)."""
        tables = self.rope_tables
        if tables is None or tables[0].shape[0] < n or tables[0].device != torch.device(device):
            freqs = torch.arange(n, device=device).float()[:, None] * self.inv_freq.to(device).float()
            self.rope_tables = (freqs.cos(), freqs.sin())
        return self.rope_tables


def fused_layer(layer: DecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, kv_len: int,
                prefix: torch.Tensor | None, tree: TreeStep | None = None, rope_in_qkv: bool = False) -> torch.Tensor:
    """h + one decoder layer of h [B, T, dim] over its cache on the fused kernels, its norms folded into its fused
    projections (npc_engine.fusion): four linear kernels with the norms and residual adds inside them, RoPE + cache
    write, attention. rope_in_qkv (one row): the q/k/v kernel also rotates and writes the cache (kernels.qkv_rope)."""
    from kernels import gated_linear, linear, qkv_rope_write

    attn, mlp = layer.self_attn, layer.mlp
    eps1, eps2 = layer.input_layernorm.eps, layer.post_attention_layernorm.eps
    if rope_in_qkv:
        q = qkv_rope_write(h, *attn.qkv[:2], eps1, attn.n_heads, attn.n_kv_heads, cos, sin, input_pos, slots,
                           k_cache, v_cache)
        h = attn.attend(q, input_pos, k_cache, v_cache, slots, kv_len, prefix, residual=h)
    else:
        h = attn.forward_fused(linear(h, *attn.qkv, rms_eps=eps1), cos, sin, input_pos, k_cache, v_cache, slots,
                               kv_len, prefix, residual=h, tree=tree)
    return linear(gated_linear(h, *mlp.gate_up, rms_eps=eps2), *linear_params(mlp.down_proj), residual=h)


def compile_layers(model: nn.Module, dynamic: bool | None = None) -> None:
    """Regional compilation: each decoder layer of a Transformer (of a feature head: its one layer) compiled in
    place. The layers share one graph, so it compiles about four times faster than the whole model (the default
    target's forward and backward on a 2-core CPU: 21 s against 80 s) and keeps the fusions inside the layers."""
    for layer in model.model.layers if isinstance(model, Transformer) else [model.layer]:
        layer.compile(dynamic=dynamic)
