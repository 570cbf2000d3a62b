"""Training batches from the token files: random windows of the book stream, and conversations cut
into windows of whole turns (each with its persona block) packed into fixed-length rows.

A row holds block_size + 1 tokens: inputs are row[:-1], labels row[1:], and the loss mask
mask[1:]. Examples in a row are separated by <|endoftext|>, which is never a label.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PAD_ID = 0  # <|endoftext|>


@dataclass
class Rows:
    tokens: torch.Tensor  # [N, block + 1] int64
    mask: torch.Tensor  # [N, block + 1] float32: 1 where the token is a label that counts

    def __len__(self) -> int:
        return self.tokens.shape[0]


def load_book_stream(work: Path, split: str) -> torch.Tensor:
    return torch.from_numpy(np.load(work / "tokens" / f"books_{split}.npy").astype(np.int64))


def load_conversations(work: Path, split: str) -> dict[str, np.ndarray]:
    with np.load(work / "tokens" / f"conv_{split}.npz") as f:
        return {k: f[k] for k in f.files}


def conversation_windows(conv: dict[str, np.ndarray], block_size: int, source: int | None = None
                         ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each conversation as persona block + consecutive whole turns, at most block_size tokens per
    window (a single turn longer than that is cut); windows without NPC tokens are dropped."""
    seg_starts = np.concatenate([[0], np.cumsum(conv["seg_lens"])])
    conv_first_seg = np.concatenate([[0], np.cumsum(conv["conv_segs"])])
    ids, mask, lens = conv["ids"], conv["mask"], conv["seg_lens"]
    windows = []
    for c in range(len(conv["conv_segs"])):
        if source is not None and conv["conv_source"][c] != source:
            continue
        first, end = conv_first_seg[c], conv_first_seg[c + 1]
        persona = slice(seg_starts[first], seg_starts[first + 1])
        persona_len = int(lens[first])
        if persona_len >= block_size:
            continue
        i = first + 1
        while i < end:
            length, j = persona_len, i
            while j < end and length + lens[j] <= block_size:
                length += lens[j]
                j += 1
            if j == i:  # one turn alone is too long: keep its start
                turns = slice(seg_starts[i], seg_starts[i] + block_size - persona_len)
                j = i + 1
            else:
                turns = slice(seg_starts[i], seg_starts[j])
            window_mask = np.concatenate([mask[persona], mask[turns]])
            if window_mask.any():
                windows.append((np.concatenate([ids[persona], ids[turns]]), window_mask))
            i = j
    return windows


def pack(windows: list[tuple[np.ndarray, np.ndarray]], block_size: int) -> Rows:
    """Greedy packing in order: a window that does not fit the current row starts the next one."""
    width = block_size + 1
    tokens, masks = [], []
    row_ids, row_mask, used = [], [], 0
    for ids, mask in windows:
        if used and used + len(ids) + 1 > width:
            tokens.append(np.concatenate(row_ids + [np.full(width - used, PAD_ID)]))
            masks.append(np.concatenate(row_mask + [np.zeros(width - used)]))
            row_ids, row_mask, used = [], [], 0
        row_ids += [ids, np.array([PAD_ID])]
        row_mask += [mask, np.zeros(1)]
        used += len(ids) + 1
    if used:
        tokens.append(np.concatenate(row_ids + [np.full(width - used, PAD_ID)])[:width])
        masks.append(np.concatenate(row_mask + [np.zeros(width - used)])[:width])
    if not tokens:
        return Rows(torch.zeros(0, width, dtype=torch.int64), torch.zeros(0, width))
    return Rows(torch.from_numpy(np.stack(tokens).astype(np.int64)),
                torch.from_numpy(np.stack(masks).astype(np.float32)))


def book_windows(stream: torch.Tensor, block_size: int, n: int, generator: torch.Generator | None) -> Rows:
    """n windows of block_size + 1 tokens at random offsets (evenly spaced when generator is None)."""
    limit = stream.numel() - block_size - 1
    if limit <= 0:
        raise ValueError(f"book stream of {stream.numel()} tokens is shorter than one block of {block_size + 1}")
    if generator is None:
        offsets = torch.linspace(0, limit, n).long()
    else:
        offsets = torch.randint(0, limit + 1, (n,), generator=generator)
    rows = stream[offsets[:, None] + torch.arange(block_size + 1)]
    return Rows(rows, torch.ones(rows.shape))


class MixedSampler:
    """Batches drawn with replacement from packed persona-chat rows, packed book-dialogue rows and
    book windows, in fixed shares per batch. A seeded CPU generator makes the order reproducible."""

    def __init__(self, pools: dict[str, Rows | torch.Tensor], shares: dict[str, float], batch_size: int,
                 block_size: int, seed: int, device: torch.device):
        self.block_size, self.device = block_size, device
        self.pools = {k: v for k, v in pools.items() if len(v) > 0}
        counts = {k: round(batch_size * shares[k]) for k in self.pools}
        first = next(iter(self.pools))  # a missing source's share goes to the first one present
        counts[first] += batch_size - sum(counts.values())
        self.counts = {k: n for k, n in counts.items() if n > 0}
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = []
        for name, n in self.counts.items():
            pool = self.pools[name]
            if isinstance(pool, Rows):
                pick = torch.randint(0, len(pool), (n,), generator=self.generator)
                parts.append(Rows(pool.tokens[pick], pool.mask[pick]))
            else:
                parts.append(book_windows(pool, self.block_size, n, self.generator))
        tokens = torch.cat([p.tokens for p in parts]).to(self.device, non_blocking=True)
        mask = torch.cat([p.mask for p in parts]).to(self.device, non_blocking=True)
        return tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
