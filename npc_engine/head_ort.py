"""A feature head's cached forward run by ONNX Runtime: the CPU drafter beside an `--layout ort` export.

On this project's CPU a head's draft is memory-bound and op-bound: PyTorch spends 1.7 ms on a forward whose
matmuls take 0.44 (benchmarks/README.md, "The head on ONNX Runtime"). The same layer as one ONNX Runtime graph
(GroupQueryAttention on the head's own KV cache, updated in place, as the target's `ort` graph does) also returns the
draft logits of its last position, so one call is one draft. The graph is traced from the loaded head when the
drafter is built (a few seconds, nothing written to disk): two graphs sharing the cache, one reading the target's
stored features (several layers side by side, mixed inside), one the head's own predicted feature.

`weights="int8"` stores the graph's matrices as ONNX Runtime's MatMulNBits (the export's quantizer): a quarter of the
bytes a draft reads. Drafts only decide what the target verifies, so output is unchanged either way. Head T, one draft
on 2 threads: PyTorch 2.70 ms, this graph 1.64 ms with float32 weights, 0.83 with int8, which drafts as well (2.82
tokens a step at K = 4 against 2.85; int4 weights lost acceptance: 2.63).
"""
import io

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from npc_engine.head import FeatureHead
from npc_engine.model import KVCache
from npc_engine.onnx_export import WEIGHT_BITS, GroupQueryAttention, concatenated, quantize_weights

INPUTS = ["embedded", "features", "seqlens_k", "total_sequence_length", "query_seqlens", "past_key", "past_value"]
OUTPUTS = ["predicted", "logits", "present_key", "present_value"]
OPSET = 17


class HeadGraph(nn.Module):
    """FeatureHead.forward with a cache, as GroupQueryAttention runs it: embedded tokens [B, T, dim] and features
    [B, T, width] (the target's stored ones when `stored`, else predicted ones) to the predicted features and the
    last position's logits over the head's draft vocabulary [B, 1, len(draft_ids)]."""

    def __init__(self, head: FeatureHead, rows: torch.Tensor, norm: nn.Module, stored: bool):
        super().__init__()
        self.head, self.stored, self.norm = head, stored and bool(head.feature_layers), norm
        layer, args = head.layer, head.args
        freqs = torch.arange(args.max_position_embeddings, dtype=torch.float32)[:, None] * head.inv_freq.float()
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.qkv = concatenated(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
        self.gate_up = concatenated(layer.mlp.gate_proj, layer.mlp.up_proj)
        self.rows = nn.Linear(rows.shape[1], rows.shape[0], bias=False)
        self.rows.weight.data = rows

    def forward(self, embedded, features, seqlens_k, total_sequence_length, query_seqlens, past_key, past_value):
        head, layer = self.head, self.head.layer
        if self.stored:
            features = head.target_features(features)
        if head.embed_norm is not None:
            embedded, features = head.embed_norm.reference(embedded), head.feature_norm.reference(features)
        x = head.fc(torch.cat([embedded, features], -1))
        out, key, value = GroupQueryAttention.apply(self.qkv(layer.input_layernorm.reference(x)), past_key, past_value,
                                                    seqlens_k, total_sequence_length, query_seqlens, self.cos,
                                                    self.sin, head.args)
        x = x + layer.self_attn.o_proj(out)
        gate, up = self.gate_up(layer.post_attention_layernorm.reference(x)).chunk(2, dim=-1)
        x = x + layer.mlp.down_proj(F.silu(gate) * up)
        return x, self.rows(self.norm.reference(x[:, -1:])), key, value


def head_session(graph: HeadGraph, width: int, weights: str, threads: int) -> ort.InferenceSession:
    """The graph traced (batch, positions and cache length dynamic) and loaded on the CPU provider."""
    args = graph.head.args
    kv = torch.zeros(2, args.n_kv_heads, 8, args.head_dim)
    example = (torch.zeros(2, 3, args.dim), torch.zeros(2, 3, width), torch.full((2,), 7, dtype=torch.int32),
               torch.tensor(8, dtype=torch.int32), torch.full((2,), 3, dtype=torch.int32), kv, kv)
    axes = {name: {0: "batch", 1: "sequence"} for name in ("embedded", "features", "predicted")}
    axes.update({name: {0: "batch", 2: "buffer"} for name in ("past_key", "past_value", "present_key",
                                                               "present_value")})
    axes.update({"seqlens_k": {0: "batch"}, "query_seqlens": {0: "batch"}, "logits": {0: "batch"}})
    traced = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(graph, example, traced, dynamo=False, opset_version=OPSET, input_names=INPUTS,
                          output_names=OUTPUTS, dynamic_axes=axes, do_constant_folding=True,
                          custom_opsets={"com.microsoft": 1})
    data = traced.getvalue()
    if WEIGHT_BITS[weights]:
        import onnx

        data = quantize_weights(onnx.load_from_string(data), WEIGHT_BITS[weights]).SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.force_spinning_stop", "1")  # as the target's: see onnx_backend
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


class OrtHead:
    """A feature head's cached forward on ONNX Runtime's CPU provider, over the head drafter's KVCache."""

    def __init__(self, head: FeatureHead, rows: torch.Tensor, norm: nn.Module, weights: str = "float",
                 threads: int = 0):
        """rows: the target's output-head rows the head drafts over; norm: the target's final norm; all float32."""
        dim, stored = head.args.dim, len(head.feature_layers) * head.args.dim
        self.sessions = {dim: head_session(HeadGraph(head, rows, norm, False), dim, weights, threads)}
        if stored:
            self.sessions[stored] = head_session(HeadGraph(head, rows, norm, True), stored, weights,
                                                 threads)
        self.bindings = {width: session.io_binding() for width, session in self.sessions.items()}
        self.n_rows = len(rows)

    def __call__(self, embedded: torch.Tensor, features: torch.Tensor, input_pos: torch.Tensor, cache: KVCache,
                 first: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows in slots first, first + 1, ... at consecutive positions input_pos [B, T]: (the predicted features
        [B, T, dim], the last position's draft logits [B, 1, n_rows]); their keys and values go into the cache."""
        (B, T), width = input_pos.shape, features.shape[-1]
        binding = self.bindings[width]
        past_key, past_value = cache.k[0][first:first + B], cache.v[0][first:first + B]
        predicted = embedded.new_empty(B, T, embedded.shape[-1])
        logits = embedded.new_empty(B, 1, self.n_rows)
        bound = {"embedded": embedded.contiguous(), "features": features.contiguous(),
                 "seqlens_k": (input_pos[:, -1]).to(torch.int32),
                 "total_sequence_length": torch.tensor(kv_len, dtype=torch.int32),
                 "query_seqlens": torch.full((B,), T, dtype=torch.int32), "past_key": past_key,
                 "past_value": past_value}
        for name, tensor in bound.items():
            bind(binding.bind_input, name, tensor)
        for name, tensor in (("predicted", predicted), ("logits", logits), ("present_key", past_key),
                             ("present_value", past_value)):
            bind(binding.bind_output, name, tensor)
        self.sessions[width].run_with_iobinding(binding)
        return predicted, logits


def bind(bind_to, name: str, tensor: torch.Tensor) -> None:
    dtype = {torch.float32: np.float32, torch.int32: np.int32}[tensor.dtype]
    bind_to(name, "cpu", 0, dtype, list(tensor.shape), tensor.data_ptr())
