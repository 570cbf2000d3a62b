"""CUDA graphs captured ahead of serving, so no capture lands inside a request."""
from functools import partial

import torch

from npc_engine.engine import rows
from npc_engine.engine.policy import timed
from npc_engine.engine.prefill import STREAM_CHUNK


def capture_graphs(fw, prefill_chunk: int, ks: list[int], batch_sizes=(1,), sampled: bool = True) -> int:
    """The graphs that steps of these batch sizes replay: prefill chunks, and every draft length the policy can pick
    (ks: greedy steps and, with `sampled`, the sampled steps' target and draft forwards). The graphs write only the
    scratch slot. Returns how many graphs were captured (0 without graphs)."""
    if not fw.graphed:
        return 0
    drafter, dev = fw.drafter, fw.device
    forwards = [fw.forward] + ([drafter.forward] if drafter.transformer is not None else [])
    before = sum(len(f.graphs) for f in forwards) + len(fw.greedy_step.graphs)
    for B in sorted({rows.batch_bucket(b) for b in batch_sizes if b <= fw.max_batch}):
        slots = torch.full((B,), fw.scratch_slot, device=dev)
        zeros = partial(tokens_and_positions, B, device=dev)
        for T, kinds in ((prefill_chunk, (torch.zeros(B, dtype=torch.long, device=dev), False)),
                         (STREAM_CHUNK, (False,))):
            for logits in kinds:
                fw.forward(*zeros(T), fw.cache, slots, fw.max_seq, logits=logits)
            drafter.prefill(*zeros(T), slots, fw.max_seq)
        for k in ks:
            width = k if drafter.host_drafts else 0
            fw.greedy_step(fw.tensor([rows.padding(fw.scratch_slot, width)] * B), k, fw.max_seq, None)
            if sampled:
                fw.forward(*zeros(k + 1), fw.cache, slots, fw.max_seq)
                if k and drafter.transformer is not None:  # propose feeds the last two tokens, then one at a time
                    for T in (2, 1):
                        drafter.forward(*zeros(T), drafter.cache, slots, fw.max_seq)
    torch.cuda.synchronize()
    return sum(len(f.graphs) for f in forwards) + len(fw.greedy_step.graphs) - before


def greedy_step_seconds(fw, ks: list[int], batch_sizes=(1,)) -> dict[tuple[int, int], float]:
    """Seconds of a replay of each captured greedy step, per (batch bucket, K): the draft policy's first step costs.
    Forward-by-forward calibration cannot see them: an eager draft forward costs most of a target step graph's
    replay, while inside the step's graph the drafts cost a few percent of it."""
    seconds = {}
    for B in sorted({rows.batch_bucket(b) for b in batch_sizes if b <= fw.max_batch}):
        for k in ks:
            width = k if fw.drafter.host_drafts else 0
            packed = fw.tensor([rows.padding(fw.scratch_slot, width)] * B)
            seconds[B, k] = timed(partial(fw.greedy_step, packed, k, fw.max_seq), fw.device)
    return seconds


def tokens_and_positions(B: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero tokens at positions 0..T-1 for B rows: capture inputs."""
    return torch.zeros(B, T, dtype=torch.long, device=device), torch.arange(T, device=device).expand(B, T)
