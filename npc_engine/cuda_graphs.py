"""CUDA-graph replay of model forwards (decode, verify, draft steps) with static input buffers.

One graph per (batch bucket, tokens per row, keys attended, logits wanted) shape. Rows that pad a batch up to its
bucket write into a scratch cache slot that no request owns, so padding never touches live rows.
"""
from dataclasses import dataclass

import torch

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_GRAPH_TOKENS = 17  # verify of K = 16 drafts; prefill chunks are 16 tokens


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    input_pos: torch.Tensor
    slots: torch.Tensor
    logits: torch.Tensor | None


class GraphedForward:
    """Callable like `model(tokens, input_pos, cache, slots, kv_len, logits)`; replays a captured graph when it can."""

    def __init__(self, model: torch.nn.Module, scratch_slot: int):
        self.model, self.scratch_slot = model, scratch_slot
        self.graphs: dict[tuple[int, int, int], CapturedStep] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, tokens, input_pos, cache, slots, kv_len, logits: bool = True):
        B, T = tokens.shape
        bucket = next((b for b in BATCH_BUCKETS if b >= B), None)
        if bucket is None or T > MAX_GRAPH_TOKENS:
            return self.model(tokens, input_pos, cache, slots, kv_len, logits)
        step = self.graphs.get((bucket, T, kv_len, logits)) or self.capture(bucket, T, kv_len, logits, cache)
        step.tokens[:B].copy_(tokens)
        step.input_pos[:B].copy_(input_pos)
        step.slots[:B].copy_(slots)
        if B < bucket:  # padding rows may hold slots of an earlier, larger batch: point them at scratch again
            step.slots[B:].fill_(self.scratch_slot)
        step.graph.replay()
        return step.logits[:B] if logits else None

    def capture(self, bucket: int, T: int, kv_len: int, logits: bool, cache) -> CapturedStep:
        device = cache.k.device
        tokens = torch.zeros(bucket, T, dtype=torch.long, device=device)
        input_pos = torch.arange(T, device=device).repeat(bucket, 1)
        slots = torch.full((bucket,), self.scratch_slot, dtype=torch.long, device=device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, kernel selection)
            for _ in range(2):
                self.model(tokens, input_pos, cache, slots, kv_len, logits)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model(tokens, input_pos, cache, slots, kv_len, logits)
        step = CapturedStep(graph, tokens, input_pos, slots, out)
        self.graphs[(bucket, T, kv_len, logits)] = step
        return step
