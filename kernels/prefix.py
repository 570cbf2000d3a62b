"""The prefix-slot rule, the one place it is written: a row with a prefix reference (prefix slot, prefix length) reads
cache positions below the prefix length from the prefix slot (a persona prefix shared by many rows), every other
position from its own slot. The KV cache's gather index, the attention reference and the feature head's stores all
choose slots with `prefix_rows`; the Triton attention kernel applies the same rule per key tile."""

import torch


def prefix_rows(slots: torch.Tensor, positions: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """The slot holding each position: slots [B]; positions [B, T] or [T] (the same for every row); prefix [B, 2]
    (slot, length; length 0: none) or None. Returns [B, T]."""
    own = slots[:, None].expand(slots.shape[0], positions.shape[-1])
    return own if prefix is None else torch.where(positions < prefix[:, 1:], prefix[:, :1], own)
