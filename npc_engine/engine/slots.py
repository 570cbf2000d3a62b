"""KV-cache slots. Slots [0, max_batch) hold one decoding request each (a free list); slot max_batch is the scratch
slot that CUDA-graph padding rows write; the rest hold persona prefixes (`PrefixCache`), which every request with
that prefix reads in place through its prefix reference (prefix slot, prefix length). Which slot a position is read
from is the prefix-slot rule, written once in `kernels.prefix.prefix_rows` (the lowest layer that applies it)."""
from collections import OrderedDict
from dataclasses import dataclass

import torch

from npc_engine.model import KVCache


@dataclass
class PrefixEntry:
    slot: int
    refs: int = 0  # active requests reading it


class PrefixCache:
    """Persona prefixes (token tuples) held in dedicated KV-cache slots that their requests read in place:
    reference-counted, and when no slot is free the least recently used unreferenced entry gives up its slot."""

    def __init__(self, slots: list[int]):
        self.free = slots
        self.entries: OrderedDict[tuple[int, ...], PrefixEntry] = OrderedDict()
        self.hits = 0

    def acquire(self, key: tuple[int, ...]) -> tuple[PrefixEntry | None, bool]:
        """A reference to key's entry and whether its KV is already computed; (None, False) when every slot is
        referenced (or there is none)."""
        entry = self.entries.get(key)
        hit = entry is not None
        if hit:
            self.hits += 1
            self.entries.move_to_end(key)
        elif self.free:
            entry = self.entries[key] = PrefixEntry(self.free.pop())
        else:
            victim = next((k for k, e in self.entries.items() if not e.refs), None)  # oldest first
            if victim is None:
                return None, False
            entry = self.entries[key] = PrefixEntry(self.entries.pop(victim).slot)
        entry.refs += 1
        return entry, hit

    def release(self, entry: PrefixEntry) -> None:
        entry.refs -= 1

    def __contains__(self, key: tuple[int, ...]) -> bool:
        """Whether key's KV is computed (an entry is computed in the step that made it)."""
        return key in self.entries


def slot_count(target_args, dtype: torch.dtype, drafter, max_batch: int, max_seq: int, prefix_cache_mb: float) -> int:
    """One slot per batch row, the scratch slot, then as many prefix slots as prefix_cache_mb holds (a slot of the
    target's cache plus the drafter's state for one slot)."""
    slot_bytes = KVCache.slot_bytes(target_args, max_seq, dtype) + drafter.slot_bytes(max_seq)
    return max_batch + 1 + int(prefix_cache_mb * 2**20) // slot_bytes


class Slots:
    def __init__(self, max_batch: int, n_slots: int):
        self.free = list(range(max_batch - 1, -1, -1))
        self.prefixes = PrefixCache(list(range(n_slots - 1, max_batch, -1)))

    def take(self, r) -> None:
        r.slot = self.free.pop()

    def give_back(self, r) -> None:
        self.free.append(r.slot)
        self.unshare(r)

    def share(self, r) -> bool:
        """Points r at the prefix slot of its persona prefix; returns whether that slot still needs computing."""
        r.shared, hit = self.prefixes.acquire(tuple(r.prompt[:r.prefix_len]))
        return r.shared is not None and not hit

    def unshare(self, r) -> None:
        if r.shared is not None:
            self.prefixes.release(r.shared)
            r.shared = None


def prefix_ref(r) -> list[int]:
    """A request's prefix reference: (prefix slot, prefix length), or length 0."""
    return [r.shared.slot, r.prefix_len] if r.shared is not None else [0, 0]


def prefix_tensor(refs: list[list[int]], device) -> torch.Tensor | None:
    """Rows' prefix references; None when no row reads a shared prefix: the forwards then skip the per-key slot
    choice."""
    return torch.tensor(refs, device=device) if any(n for _, n in refs) else None
