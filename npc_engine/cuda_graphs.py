"""CUDA-graph replay of model forwards (prefill chunks, sampled speculative steps) and of whole
greedy speculative steps, with static input buffers.

One forward graph per (batch bucket, tokens per row, keys attended, logits wanted) shape. Rows that pad a batch up to
its bucket write into a scratch cache slot that no request owns, so padding never touches live rows. Every graph reads
a prefix reference per row (a shared persona prefix slot and its length; length 0 for rows without one).
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch

from npc_engine.model import KVCache

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_GRAPH_TOKENS = 32  # the longest prefill chunk; verify of K = 16 drafts is 17 tokens


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    input_pos: torch.Tensor
    slots: torch.Tensor
    prefix: torch.Tensor
    logit_index: torch.Tensor | None
    logits: torch.Tensor | None


class GraphedForward:
    """Callable like `model(tokens, input_pos, cache, slots, kv_len, logits, prefix)`; replays a captured graph when it
    can. `logits` is True, False or an index tensor [B] (logits at one position per row)."""

    def __init__(self, model: torch.nn.Module, scratch_slot: int):
        self.model, self.scratch_slot = model, scratch_slot
        self.graphs: dict[tuple[int, int, int], CapturedStep] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, tokens, input_pos, cache, slots, kv_len, logits: bool = True,
                 prefix: torch.Tensor | None = None):
        B, T = tokens.shape
        bucket = next((b for b in BATCH_BUCKETS if b >= B), None)
        if bucket is None or T > MAX_GRAPH_TOKENS:
            return self.model(tokens, input_pos, cache, slots, kv_len, logits, prefix)
        kind = "index" if isinstance(logits, torch.Tensor) else logits
        step = self.graphs.get((bucket, T, kv_len, kind)) or self.capture(bucket, T, kv_len, kind, cache)
        step.tokens[:B].copy_(tokens)
        step.input_pos[:B].copy_(input_pos)
        step.slots[:B].copy_(slots)
        if prefix is None:
            step.prefix[:B].zero_()
        else:
            step.prefix[:B].copy_(prefix)
        if kind == "index":
            step.logit_index[:B].copy_(logits)
        if B < bucket:  # padding rows may hold slots of an earlier, larger batch: point them at scratch again
            step.slots[B:].fill_(self.scratch_slot)
            step.prefix[B:].zero_()
        step.graph.replay()
        return step.logits[:B] if logits is not False else None

    def capture(self, bucket: int, T: int, kv_len: int, kind: bool | str, cache: KVCache) -> CapturedStep:
        device = cache.k.device
        tokens = torch.zeros(bucket, T, dtype=torch.long, device=device)
        input_pos = torch.arange(T, device=device).repeat(bucket, 1)
        slots = torch.full((bucket,), self.scratch_slot, dtype=torch.long, device=device)
        prefix = torch.zeros(bucket, 2, dtype=torch.long, device=device)
        logit_index = torch.zeros(bucket, dtype=torch.long, device=device) if kind == "index" else None
        logits = logit_index if kind == "index" else kind
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, kernel selection)
            for _ in range(2):
                self.model(tokens, input_pos, cache, slots, kv_len, logits, prefix)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model(tokens, input_pos, cache, slots, kv_len, logits, prefix)
        step = CapturedStep(graph, tokens, input_pos, slots, prefix, logit_index, out)
        self.graphs[(bucket, T, kv_len, kind)] = step
        return step


class GraphedStep:
    """Replays `fn(packed, *key)` from a graph captured per (packed shape, *key): every input of the step
    is in one small int64 tensor, copied into the graph's own input before a replay."""

    def __init__(self, fn: Callable[..., torch.Tensor], pool: tuple | None = None):
        self.fn, self.pool = fn, pool if pool is not None else torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, packed: torch.Tensor, *key) -> torch.Tensor:
        captured = self.graphs.get((tuple(packed.shape), *key))
        if captured is None:
            return self.capture(packed, key)
        graph, static_in, out = captured
        static_in.copy_(packed)
        graph.replay()
        return out

    def capture(self, packed: torch.Tensor, key: tuple) -> torch.Tensor:
        """The warm-up runs are real steps on the real inputs: they write the same cache entries the replay will."""
        static_in = packed.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.fn(static_in, *key)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(static_in, *key)
        self.graphs[(tuple(packed.shape), *key)] = (graph, static_in, out)
        graph.replay()
        return out
