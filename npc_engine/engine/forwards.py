"""What runs on the device: the target's forward (eager, or a CUDA-graph replayer), its KV cache, the drafter and the
whole greedy step, with the shape buckets that keep graph shapes few."""
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from npc_engine.cuda_graphs import GraphedForward, GraphedStep
from npc_engine.drafters import Drafter
from npc_engine.engine.stepping import greedy_step
from npc_engine.engine.trees import TreeShape
from npc_engine.fusion import decoder_layers, fuse_projections_
from npc_engine.head import FeatureHead
from npc_engine.model import KVCache, Transformer, compile_layers


def kv_bucket(needed: int, max_seq: int, step: int = 64) -> int:
    """Keys attended per forward, rounded up so shapes repeat (and CUDA graphs are reused)."""
    return min(max_seq, math.ceil(needed / step) * step)


def use_fused_kernels(target, drafter: Drafter, fused: bool) -> None:
    """The kernels of kernels/ (Triton on CUDA, their PyTorch references elsewhere) for the target, a draft model and
    a feature head."""
    for model in (target, drafter.transformer, drafter.model if drafter.uses_features else None):
        if model is None:
            continue
        # a fused head reads its target's RoPE table, which an ONNX Runtime target has not
        model.fused = fused and (model is target or isinstance(target, Transformer))
        if fused and isinstance(model, Transformer | FeatureHead) and decoder_layers(model)[0].self_attn.qkv is None:
            fuse_projections_(model)


def compile_step_layers(target: Transformer, drafter: Drafter) -> None:
    """model.compile_layers with dynamic shapes on the target, a draft model and a feature head: after one compile
    for one-row steps and one for several rows, every cache length and row count reuses them. On the CPU a step of a
    small model is mostly per-op overhead, which the compiled layers' fused elementwise kernels cut
    (benchmarks/README.md, "Compiled layers on the CPU")."""
    for model in (target, drafter.transformer, drafter.model if drafter.uses_features else None):
        if model is not None:
            compile_layers(model, dynamic=True)


@dataclass
class Forwards:
    target: torch.nn.Module  # a Transformer, or an ONNX Runtime model (onnx_backend.OnnxModel)
    drafter: Drafter
    cache: KVCache
    device: torch.device
    max_batch: int  # batch rows own slots [0, max_batch); slot max_batch is the scratch slot graph padding writes
    max_seq: int
    graphed: bool
    tree: TreeShape | None = None  # greedy drafted steps verify a draft tree (npc_engine.engine.trees)
    forward: Callable = None  # the target's forward, or its graph replayer
    greedy_step: Callable = None  # (packed rows, k, kv_len) -> result rows: one graph replay per step under graphs

    def __post_init__(self):
        self.forward = self.target
        self.greedy_step = partial(greedy_step, self.target, self.cache, self.drafter, tree=self.tree)
        if self.graphed:
            self.forward = GraphedForward(self.target, scratch_slot=self.scratch_slot)
            if self.drafter.transformer is not None:
                self.drafter.forward = GraphedForward(self.drafter.transformer, scratch_slot=self.scratch_slot)
            self.greedy_step = GraphedStep(self.greedy_step, self.forward.pool)

    @property
    def scratch_slot(self) -> int:
        return self.max_batch

    def span(self, k: int) -> int:
        """Cache positions past a row's length that a greedy step drafting k writes."""
        return max(k, self.tree.span(k)) if self.tree is not None and k else k

    def kv_len(self, needed: int) -> int:
        """Keys attended by a forward whose rows reach position needed - 1. Graphs attend over the whole cache: the
        attention kernel stops at each row's last position, so one graph serves every length (benchmarks/README.md,
        "Attention over the whole cache")."""
        return kv_bucket(needed, self.max_seq, self.max_seq if self.graphed else 64)

    def tensor(self, data) -> torch.Tensor:
        return torch.tensor(data, device=self.device)
