"""Greedy steps that verify a tree of drafts (EAGLE-2 style): the drafter proposes several candidates per position
(`Drafter.draft_tree`), the target scores every node in one forward, each node seeing its ancestors only
(npc_engine.model.TreeStep), and the row keeps the deepest node whose whole path the target's argmax agrees with. A
node's tree index is also its cache position past the last token, so the accepted path's keys, values and features
are then moved to the positions of the line; what stays past the new length is never seen again.

Greedy output is unchanged: every accepted token is the target's argmax after the accepted ones before it, as in a
chain. A tree of depth K with one candidate per level is the chain of K drafts.
"""
from dataclasses import dataclass

import torch

from npc_engine.drafters import DraftTree, HeadDrafter
from npc_engine.engine import rows
from npc_engine.engine.prefill import PREFILL_CHUNK
from npc_engine.model import KVCache, Transformer, TreeStep
from npc_engine.sampling import greedy_tokens

# Positions past a row's length a tree step may write: Engine.max_prompt_len keeps K_MAX + PREFILL_CHUNK + 2 free,
# and a pipelined step starts up to K_MAX + 1 past the host's length.
SPAN_MAX = PREFILL_CHUNK


@dataclass(frozen=True)
class TreeShape:
    """Each level expands its `width` best nodes by their `width` most likely tokens; the `nodes` best of all are
    verified (the draft length K the policy picks is the depth)."""
    width: int
    nodes: int

    def __post_init__(self):
        if not (1 <= self.width <= SPAN_MAX and 1 <= self.nodes <= SPAN_MAX):
            raise ValueError(f"draft tree {self.width}x{self.nodes}: width and nodes must be 1..{SPAN_MAX}")

    @classmethod
    def parse(cls, text: str) -> "TreeShape":
        """"WIDTH,NODES", e.g. "4,16"."""
        try:
            width, nodes = (int(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"draft tree {text!r}: expected WIDTH,NODES, e.g. 4,16") from None
        return cls(width, nodes)

    def span(self, depth: int) -> int:
        """Cache positions past a row's length that a tree of this depth writes (the drafter's levels, the nodes)."""
        return max(self.nodes, (depth - 1) * self.width)

    def fits(self, depth: int) -> bool:
        """Within SPAN_MAX, and no deeper than its nodes can reach."""
        return self.span(depth) <= SPAN_MAX and depth <= self.nodes


def ancestors(parents: torch.Tensor, depth: int) -> torch.Tensor:
    """[B, N + 1, N + 1] bool: node i (0: the last token) and its ancestors, from parents [B, N] (tree indices)."""
    B, n = parents.shape[0], parents.shape[1] + 1
    up = torch.cat([torch.zeros_like(parents[:, :1]), parents], dim=1)  # the last token is its own parent
    eye = torch.eye(n, dtype=torch.bool, device=parents.device).expand(B, n, n)
    seen = eye
    for _ in range(depth):
        seen = eye | seen.gather(1, up[..., None].expand(B, n, n))
    return seen


def greedy_tree_step(target: Transformer, cache: KVCache, drafter: HeadDrafter, packed: torch.Tensor, k: int,
                     kv_len: int, shape: TreeShape, stale: int | None = None) -> torch.Tensor:
    """stepping.greedy_step with a draft tree of depth k (one CUDA graph under graphs): the same packed rows in and
    result rows out, the accepted path in the first ACCEPTED draft columns."""
    last, lengths = packed[:, rows.LAST_TOKEN], packed[:, rows.LENGTH]
    slots, prefix = packed[:, rows.SLOT].contiguous(), packed[:, rows.PREFIX]
    tree = drafter.draft_tree(last, lengths, slots, shape.width, k, shape.nodes, kv_len, prefix, stale)
    start = (lengths - 1)[:, None]
    tokens = torch.cat([last[:, None], tree.tokens], dim=1)
    depths = torch.cat([torch.zeros_like(tree.depths[:, :1]), tree.depths], dim=1)
    seen = ancestors(tree.parents, k)
    write = start + torch.arange(tokens.shape[1], device=packed.device)
    best = greedy_tokens(target(tokens, start + depths, cache, slots, kv_len, prefix=prefix,
                                tree=TreeStep(write, lengths - 1, seen)))
    accepted = accepted_nodes(tree, best, packed[:, rows.PROPOSED], k)
    deepest = (accepted * depths).argmax(1)  # accepted nodes lie on one path; none accepted: the last token
    n_accepted, extra = depths.gather(1, deepest[:, None])[:, 0], best.gather(1, deepest[:, None])[:, 0]
    path = path_nodes(seen, depths, deepest, k)
    path_tokens = tokens.gather(1, path)
    commit_path(target, cache, drafter, slots, lengths, path, path_tokens)
    before_extra = tokens.gather(1, deepest[:, None])[:, 0]
    return torch.cat([n_accepted[:, None], extra[:, None], path_tokens,
                      torch.stack([before_extra, extra, lengths + n_accepted + 1], dim=1)], dim=1)


def accepted_nodes(tree: DraftTree, best: torch.Tensor, proposed: torch.Tensor, depth: int) -> torch.Tensor:
    """[B, N + 1] bool: nodes whose whole path is the target's argmax (best [B, N + 1]: its token after each node),
    no deeper than the row's proposed drafts (a row asking a shorter K than the step's; padding rows: none)."""
    match = (tree.tokens == best.gather(1, tree.parents)) & (tree.depths <= proposed[:, None])
    accepted = torch.ones_like(best, dtype=torch.bool)
    for _ in range(depth):
        accepted = torch.cat([accepted[:, :1], match & accepted.gather(1, tree.parents)], dim=1)
    return accepted


def path_nodes(seen: torch.Tensor, depths: torch.Tensor, deepest: torch.Tensor, depth: int) -> torch.Tensor:
    """[B, depth]: the tree index of the accepted path's node at depth 1..depth; past the path's end, the index
    equal to the depth where the tree has it (moving it is a no-op; else stale entries past the line's end)."""
    on_path = seen.gather(1, deepest[:, None, None].expand(-1, 1, seen.shape[2]))[:, 0]  # [B, N + 1]
    levels = torch.arange(1, depth + 1, device=depths.device)
    at_level = on_path[:, None, :] & (depths[:, None, :] == levels[None, :, None])  # [B, depth, N + 1]
    return torch.where(at_level.any(-1), at_level.int().argmax(-1), levels.clamp(max=depths.shape[1] - 1))


def commit_path(target: Transformer, cache: KVCache, drafter: HeadDrafter, slots: torch.Tensor, lengths: torch.Tensor,
                path: torch.Tensor, path_tokens: torch.Tensor) -> None:
    """Moves the accepted nodes' keys and values (every layer), target features and head tokens from their tree
    positions to the line's positions lengths .. lengths + depth - 1."""
    src = (lengths - 1)[:, None] + path
    dst = lengths[:, None] + torch.arange(path.shape[1], device=path.device)
    row = slots[:, None]
    cache.k[:, row, :, dst] = cache.k[:, row, :, src]
    cache.v[:, row, :, dst] = cache.v[:, row, :, src]
    if target.feature_store is not None:
        target.feature_store[row, dst] = target.feature_store[row, src]
    drafter.tokens[row, dst] = path_tokens
