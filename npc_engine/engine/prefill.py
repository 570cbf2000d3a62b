"""Prompt prefill: persona prefixes attached from (or computed once into) their prefix slots, then the rest of each
prompt in chunks batched across requests. A complete prompt is fed up to its last token, whose logits give the
request's first token (so time to first token is one prefill); an open prompt (still arriving) in whole chunks of
STREAM_CHUNK as they come. The drafter's cache is fed alongside when some request drafts, and caught up when it fell
behind."""
import torch

from npc_engine.engine.requests import Request
from npc_engine.engine.slots import Slots, prefix_ref, prefix_tensor
from npc_engine.header import step_masks
from npc_engine.model import KVCache
from npc_engine.sampling import params_tensors, probs_from_logits, sample

STREAM_CHUNK = 16  # an open prompt is prefilled in chunks of this many tokens as it arrives
PREFILL_CHUNK = 32  # a complete prompt: most new-token prompts (a player line) fit one chunk
EAGER_PREFILL_CHUNK = 128  # without CUDA graphs no shape needs repeating: fewer, larger forwards


def open_prefill_end(r: Request) -> int:
    """An open prompt is fed in whole chunks and never up to its last token: the completing prefill needs a token
    whose logits give the first new token (a changed last word is rolled back by `update_prompt`)."""
    return r.fed + (len(r.prompt) - 1 - r.fed) // STREAM_CHUNK * STREAM_CHUNK


class Prefiller:
    def __init__(self, fw, slots: Slots, max_tokens: int | None = None):
        """max_tokens: persona-prefix and complete-prompt tokens fed per step at most (the first prompt gets at least
        one chunk), so a step never runs far past a request's deadline; the rest follows in the next steps."""
        self.fw, self.slots, self.max_tokens = fw, slots, max_tokens
        self.chunk = PREFILL_CHUNK if fw.graphed else EAGER_PREFILL_CHUNK

    def attach_prefixes(self, reqs: list[Request]) -> int:
        """Points each request at the shared KV of its persona prefix, computing a missing one once into a prefix
        slot (target and drafter); returns the prefix tokens computed. With no slot to spare the prefix is computed
        in the request's own slot like the rest of its prompt."""
        missing = []
        # Hits take their references first: a miss may evict the least recently used unreferenced prefix, and the
        # service admitted this step's requests counting their cached prefixes as free.
        for r in sorted(reqs, key=lambda r: tuple(r.prompt[:r.prefix_len]) not in self.slots.prefixes):
            if not r.prefix_len:
                continue
            compute = self.slots.share(r)
            if r.shared is None:
                continue
            r.fed = r.draft_valid = r.draft_exact = r.prefix_len
            if compute:
                missing.append(r)
            else:
                r.stats.cached_prefix_tokens = r.prefix_len
        self.feed([(r, 0, r.prefix_len) for r in missing], into_prefix=True)
        if not self.fw.target.reads_prefix_slots:
            self.copy_prefixes([r for r in reqs if r.shared is not None])
        return sum(r.prefix_len for r in missing)

    def copy_prefixes(self, reqs: list[Request]) -> None:
        """For a target that reads one slot per row: each request's persona prefix copied from its prefix slot into
        its own (target and draft caches, a feature head's features and tokens), and the reference dropped. The
        prefix is still computed once."""
        drafter = self.fw.drafter
        caches = [self.fw.cache] + ([drafter.cache] if isinstance(drafter.cache, KVCache) else [])
        stores = [self.fw.target.feature_store, drafter.tokens] if drafter.uses_features else []
        for r in reqs:
            for cache in caches:
                for kv in (cache.k, cache.v):
                    kv[:, r.slot, :, :r.prefix_len] = kv[:, r.shared.slot, :, :r.prefix_len]
            for store in stores:
                store[r.slot, :r.prefix_len] = store[r.shared.slot, :r.prefix_len]
            self.slots.unshare(r)
            r.shared = None

    def prefill(self, reqs: list[Request], spent: int = 0) -> list[tuple[Request, int]]:
        """Feeds the prompts not yet in the cache (complete ones within max_tokens less `spent`, the prefix tokens
        this step computed); returns (request, first token) for each prompt completed."""
        complete = self.within_budget([(r, r.fed, len(r.prompt)) for r in reqs if r.complete], spent)
        streaming = [(r, r.fed, open_prefill_end(r)) for r in reqs if not r.complete]
        # Requests that start with speculation off leave the drafter's cache behind (a drafting step catches up);
        # a prefill that feeds the drafter catches its requests up first (an open prompt fed while none drafted).
        drafting = any(r.k for r in reqs)
        if drafting and self.fw.drafter.cache is not None:
            self.feed([(r, r.draft_valid, r.fed) for r in reqs], target=False)
        self.feed(streaming, chunk=STREAM_CHUNK, draft=drafting)
        last_logits = self.feed(complete, draft=drafting)
        for r, _, end in complete + streaming:
            r.fed = end
            if drafting:
                r.draft_valid = end
        if not last_logits:
            return []
        finishing = [r for r, _ in last_logits]
        return list(zip(finishing, self.first_tokens(finishing, torch.stack([row for _, row in last_logits]))))

    def within_budget(self, ranges: list[tuple[Request, int, int]], spent: int) -> list[tuple[Request, int, int]]:
        if self.max_tokens is None:
            return ranges
        left, out = self.max_tokens - spent, []
        for r, a, b in ranges:
            take = min(b - a, left if out else max(left, self.chunk))
            if take < b - a:
                take -= take % self.chunk  # a cut prompt stops on a chunk boundary
            if take > 0:
                out.append((r, a, a + take))
                left -= take
        return out

    def catch_up(self, reqs: list[Request]) -> None:
        """Before a drafting step: feeds the drafter what steps without drafting left out (from `guessed` positions
        before where it stopped, up to the positions its proposals re-feed)."""
        drafter = self.fw.drafter
        if drafter.cache is None:
            return
        behind = [r for r in reqs if r.draft_valid < len(r.ids) - drafter.feeds_last]
        self.feed([(r, max(0, r.draft_valid - drafter.guessed), len(r.ids) - drafter.feeds_last) for r in behind],
                  target=False)

    def stale(self, reqs: list[Request]) -> int:
        """After catch_up: how many positions before those a drafting step re-feeds may hold the drafter's guesses
        in some row (the drafts its last step accepted; its whole `guessed` where unknown)."""
        drafter = self.fw.drafter
        return max(0, min(drafter.guessed, max(len(r.ids) - drafter.feeds_last - r.draft_exact for r in reqs)))

    def first_tokens(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        masks = step_masks([r.header for r in reqs], logits.shape[-1], self.fw.device)
        if masks is not None:  # a line header's first token
            logits = logits.masked_fill(~masks.next_mask(), float("-inf"))
        if all(r.params.temperature == 0 for r in reqs):
            return logits.argmax(-1).tolist()
        device = self.fw.device
        probs = probs_from_logits(logits[:, None], *params_tensors([r.params for r in reqs], device))[:, 0]
        u = torch.cat([torch.rand(1, generator=r.generator, device=device) for r in reqs])
        return sample(probs, u).tolist()

    def feed(self, ranges: list[tuple[Request, int, int]], target: bool = True, chunk: int | None = None,
             into_prefix: bool = False, draft: bool = True) -> list[tuple[Request, torch.Tensor]]:
        """Feeds positions [a, b) of each request's tokens to the target (unless target=False) and the drafter
        (unless draft=False), into the request's own slot or (into_prefix) its shared prefix slot. Returns the
        target's logits at the last prompt token of each complete prompt fed to its end."""
        fw = self.fw
        ranges = [(r, a, b) for r, a, b in ranges if b > a]
        chunk = chunk or self.chunk
        longest = max((b - a for _, a, b in ranges), default=0)
        last_logits = []
        for offset in range(0, longest, chunk):
            rows = [(r, a + offset, min(b, a + offset + chunk)) for r, a, b in ranges if a + offset < b]
            # CUDA graphs want few shapes: full chunks there; eager forwards pad no further than the longest row.
            width = chunk if fw.graphed else max(b - a for _, a, b in rows)
            # Short rows are padded with positions past their own end: those cache entries are
            # overwritten before any query can see them.
            tokens = fw.tensor([r.ids[a:b] + [0] * (width - (b - a)) for r, a, b in rows])
            positions = [list(range(a, a + width)) for _, a, _ in rows]
            pos_t = fw.tensor(positions)
            slots = fw.tensor([r.shared.slot if into_prefix else r.slot for r, _, _ in rows])
            prefix = None if into_prefix else prefix_tensor([prefix_ref(r) for r, _, _ in rows], fw.device)
            kv_len = fw.kv_len(max(p[-1] for p in positions) + 1)
            if target:
                ending = [i for i, (r, _, b) in enumerate(rows) if r.complete and b == len(r.prompt)]
                index = fw.tensor([b - 1 - a for _, a, b in rows]) if ending else False
                logits = fw.forward(tokens, pos_t, fw.cache, slots, kv_len, logits=index, prefix=prefix)
                # copied: a graph's logits buffer is overwritten by its next replay
                last_logits += [(rows[i][0], logits[i].clone()) for i in ending]
                for r, a, b in rows:
                    r.stats.prefill_tokens += b - a
            if draft:
                fw.drafter.prefill(tokens, pos_t, slots, kv_len, prefix)
        for r, a, b in ranges if draft and not into_prefix else ():
            if a <= r.draft_exact:  # padding past b may have overwritten entries there
                r.draft_exact = b
        return last_logits
