"""Drafters, the lossless acceptance rule and the draft-length policy.

A drafter proposes up to K tokens per row with their draft distributions q (one-hot for
deterministic drafters; when every row is greedy, `greedy_step` runs the whole step without them).
The target scores the last emitted token plus the K drafts in one forward, giving K+1
distributions p. `verify` keeps the output distribution exactly the target's: accept draft x with
probability min(1, p(x)/q(x)); at the first rejection sample from norm(max(0, p - q)); when every
proposed draft passes, sample a bonus token from p.
"""
import math
from array import array

import torch
import torch.nn.functional as F

from npc_engine.head import FeatureHead, head_logits
from npc_engine.model import KVCache, Transformer
from npc_engine.sampling import probs_from_logits, sample

K_MAX = 16
# The draft lengths the policy picks from: each is a CUDA graph that Engine.capture_graphs makes before serving.
DRAFT_LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16)


def verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, draft_lens: torch.Tensor,
           u_accept: torch.Tensor, u_extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p [B, K+1, V] target probs; q [B, K, V] draft probs; drafts [B, K]; draft_lens [B] (drafts past a
    row's length are not proposals); u_accept [B, K], u_extra [B] uniforms in [0, 1).
    Returns (accepted count [B], the extra token [B]) with no host synchronisation."""
    B, K = drafts.shape
    proposed = torch.arange(K, device=p.device)[None, :] < draft_lens[:, None]
    q = q * proposed[..., None]
    p_draft = p[:, :K].gather(-1, drafts[..., None]).squeeze(-1)
    q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)
    accepted = (u_accept * q_draft < p_draft) & proposed
    n_accepted = accepted.long().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(B, device=p.device)
    p_next = p[rows, n_accepted]
    q_next = F.pad(q, (0, 0, 0, 1))[rows, n_accepted]  # zero row past the drafts: residual = p (bonus)
    residual = (p_next - q_next).clamp_(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    return n_accepted, sample(residual, u_extra)


def verify_greedy(logits: torch.Tensor, drafts: torch.Tensor, draft_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature 0 (the same rule with one-hot p and q, without building them): the longest prefix
    of drafts matching the target's argmax, then the target's own token."""
    best = logits.argmax(-1)
    K = drafts.shape[1]
    proposed = torch.arange(K, device=drafts.device)[None, :] < draft_lens[:, None]
    n_accepted = ((drafts == best[:, :K]) & proposed).long().cumprod(dim=1).sum(dim=1)
    return n_accepted, best.gather(1, n_accepted[:, None]).squeeze(1)


def greedy_step(target: Transformer, target_cache: KVCache,
                drafter: "NoDrafter | NgramDrafter | ModelDrafter | HeadDrafter", packed: torch.Tensor, k: int,
                kv_len: int) -> torch.Tensor:
    """One whole temperature-0 speculative step on the device, so it can be one CUDA graph: draft k
    tokens, verify them with one target forward, accept. packed [B, 7 (+ k)] int64 rows hold
    (token before the last, last token, length, slot, drafts allowed, prefix slot, prefix length
    (, k drafts from the host)). Returns [B, 2 + k + 3]: (accepted count, the target's next token, the k drafts,
    then the first three packed columns for the row's next step), so a next step can start from this one's
    result without the host (pipelined decoding)."""
    last2, lengths, slots, allowed = packed[:, :2], packed[:, 2], packed[:, 3].contiguous(), packed[:, 4]
    prefix = packed[:, 5:7]
    if drafter.name in ("model", "head") and k:
        drafts = drafter.greedy_drafts(last2, lengths, slots, k, kv_len, prefix)
    else:
        drafts = packed[:, 7:7 + k]
    tokens = torch.cat([last2[:, 1:], drafts], dim=1)
    positions = (lengths - 1)[:, None] + torch.arange(k + 1, device=packed.device)
    logits = target(tokens, positions, target_cache, slots, kv_len, prefix=prefix)
    n_accepted, extra = verify_greedy(logits, drafts, allowed)
    emitted = torch.cat([last2[:, 1:], drafts], dim=1)  # the last token, then the accepted drafts
    before_extra = emitted.gather(1, n_accepted[:, None])[:, 0]
    return torch.cat([n_accepted[:, None], extra[:, None], drafts,
                      torch.stack([before_extra, extra, lengths + n_accepted + 1], dim=1)], dim=1)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens emitted per step when each draft is accepted independently with probability alpha."""
    return k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def choose_k(alpha: float, step_cost) -> int:
    """Draft length (one of DRAFT_LENGTHS) maximising tokens per second: step_cost(k) is the time of one step
    drafting k tokens (k = 0: plain decoding). Returns 0 (speculation off) unless some K beats plain decoding by 5%."""
    plain_rate = 1.0 / step_cost(0)
    best_k, best_rate = 0, 1.05 * plain_rate
    for k in DRAFT_LENGTHS:
        rate = expected_tokens(alpha, k) / step_cost(k)
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k


class NoDrafter:
    """Plain autoregressive decoding."""

    name = "none"
    cache = None
    prior_alpha = 0.0

    def prefill(self, tokens, input_pos, slots, kv_len, prefix=None) -> None:
        pass


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens (n = max_n..1)
    in the request's own context (persona text + conversation) and propose what followed it."""

    name = "ngram"
    cache = None
    prior_alpha = 0.5

    def __init__(self, vocab_size: int, device, max_n: int = 3):
        self.vocab_size, self.device, self.max_n = vocab_size, device, max_n

    def prefill(self, tokens, input_pos, slots, kv_len, prefix=None) -> None:
        pass

    def lookup(self, seq: list[int], k: int) -> list[int]:
        # bytes.rfind scans in C: a Python loop over a few hundred tokens cost more than a step on the GPU.
        data, width = array("i", seq).tobytes(), array("i").itemsize
        for n in range(min(self.max_n, len(seq) - 1), 0, -1):
            tail, end = data[-n * width:], (len(seq) - 1) * width  # occurrences that end before the last token
            while (at := data.rfind(tail, 0, end)) >= 0 and at % width:
                end = at + len(tail) - 1  # a match across token boundaries: look further back
            if at >= 0:
                start = at // width
                return seq[start + n:start + n + k]
        return []

    def propose(self, seqs, slots, k, sampling, u, kv_len, prefix=None):
        found = [self.lookup(s, k) for s in seqs]
        width = k if any(found) else 0  # padded to the asked K: one verify shape per K
        drafts = torch.tensor([f + [0] * (width - len(f)) for f in found], dtype=torch.long, device=self.device)
        lens = torch.tensor([len(f) for f in found], dtype=torch.long, device=self.device)
        return drafts, F.one_hot(drafts, self.vocab_size).float(), lens


class ModelDrafter:
    """A small Llama-family model sharing the target's tokenizer, with its own KV cache. An Engine gives that cache
    its own slot layout (prefix slots included), so one slot index names the same sequence in both caches."""

    name = "model"
    prior_alpha = 0.7
    feeds_last = 2  # each proposal re-feeds the last two tokens: its cache needs every token before them
    guessed = 0  # positions before those whose cache entries may rest on its own guesses

    def __init__(self, model: Transformer, n_slots: int, max_seq: int, device, dtype):
        self.model = self.forward = model  # forward may become a CUDA-graph replayer
        self.cache = KVCache(model.args, n_slots, max_seq, device, dtype)
        self.device = device

    def prefill(self, tokens, input_pos, slots, kv_len, prefix=None) -> None:
        self.forward(tokens, input_pos, self.cache, slots, kv_len, logits=False, prefix=prefix)

    def propose(self, seqs, slots, k, sampling, u, kv_len, prefix=None):
        """Feeds the last two tokens first: after a step the draft cache may lack one or both of them,
        and rewriting a cached token at its own position is harmless."""
        lengths = torch.tensor([len(s) for s in seqs], device=self.device)
        tokens = torch.tensor([[s[-2] if len(s) > 1 else s[-1], s[-1]] for s in seqs], device=self.device)
        pos = torch.stack([(lengths - 2).clamp(min=0), lengths - 1], dim=1)
        drafts, qs = [], []
        for i in range(k):
            logits = self.forward(tokens, pos, self.cache, slots, kv_len, prefix=prefix)[:, -1]
            q = probs_from_logits(logits[:, None], *sampling)[:, 0]
            drafts.append(sample(q, u[:, i]))
            qs.append(q)
            tokens, pos = drafts[-1][:, None], pos[:, -1:] + 1
        return torch.stack(drafts, 1), torch.stack(qs, 1), torch.full((len(seqs),), k, device=self.device)

    def greedy_drafts(self, last2: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor, k: int,
                      kv_len: int, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """k argmax drafts, all on the device (the raw model: this runs inside `greedy_step`'s graph)."""
        tokens, pos = last2, torch.stack([(lengths - 2).clamp(min=0), lengths - 1], dim=1)
        drafts = []
        for _ in range(k):
            drafts.append(self.model(tokens, pos, self.cache, slots, kv_len, prefix=prefix)[:, -1].argmax(-1))
            tokens, pos = drafts[-1][:, None], pos[:, -1:] + 1
        return torch.stack(drafts, 1)


class HeadDrafter:
    """A feature head (npc_engine.head) on the target's hidden states. The target stores them for every position
    it computes (`Transformer.feature_store`, one row per cache slot, prefix slots included); the head has its own
    one-layer KV cache and the tokens it was fed in the same slot layout. Each draft first re-feeds the last
    REFEED positions with the target's features, so the head's cache holds only target features up to the last
    token whatever the previous step accepted, then drafts on its own predicted features. After steps without
    drafting the engine's catch-up feeds it again from `guessed` positions before where it stopped."""

    name = "head"
    prior_alpha = 0.7
    REFEED = K_MAX + 1  # the last token and every draft a step can accept
    feeds_last = 1  # the last token comes from the step; the refeed reads the others from the token store
    guessed = K_MAX  # accepted drafts' entries were computed from predicted features until the next refeed

    def __init__(self, head: FeatureHead, target: Transformer, n_slots: int, max_seq: int, device, dtype):
        self.model, self.target, self.device = head, target, device
        self.cache = KVCache(head.args, n_slots, max_seq, device, dtype)
        self.allocate_stores()

    def allocate_stores(self) -> None:
        """The target's feature store and the head's token store, one row per slot of the head's cache (call again
        after replacing the cache)."""
        n_slots, max_seq = self.cache.n_slots, self.cache.max_seq
        self.target.feature_store = self.tokens = None
        self.target.feature_store = torch.zeros(n_slots, max_seq, self.model.args.dim, device=self.device,
                                                dtype=self.cache.k.dtype)
        self.tokens = torch.zeros(n_slots, max_seq, dtype=torch.long, device=self.device)

    @staticmethod
    def store_rows(slots: torch.Tensor, positions: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        """The slot holding each position [B, T]: a shared prefix's below its length, else the row's own."""
        rows = slots[:, None].expand_as(positions)
        return rows if prefix is None else torch.where(positions < prefix[:, 1:], prefix[:, :1], rows)

    def features_before(self, slots: torch.Tensor, input_pos: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        """The target's feature at each position before input_pos [B, T] (zeros before position 0)."""
        before = (input_pos - 1).clamp(min=0)
        return self.target.feature_store[self.store_rows(slots, before, prefix), before] * (input_pos > 0)[..., None]

    def run(self, tokens, input_pos, features, slots, kv_len, prefix) -> torch.Tensor:
        self.tokens[slots[:, None], input_pos] = tokens
        return self.model(self.target, tokens, features, input_pos, self.cache, slots, kv_len, prefix)

    def forward(self, tokens, input_pos, cache, slots, kv_len, logits: bool = True, prefix=None):
        """The head on stored features (prefill, timing), with ModelDrafter.forward's arguments (cache: the head's)."""
        predicted = self.run(tokens, input_pos, self.features_before(slots, input_pos, prefix), slots, kv_len, prefix)
        return head_logits(self.target, predicted) if logits else None

    def prefill(self, tokens, input_pos, slots, kv_len, prefix=None) -> None:
        self.forward(tokens, input_pos, self.cache, slots, kv_len, logits=False, prefix=prefix)

    def draft(self, last: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor, k: int, kv_len: int,
              prefix: torch.Tensor | None, pick) -> list[torch.Tensor]:
        """k drafts after each row's last token [B] at position lengths - 1; pick(i, logits [B, V]) chooses draft i.
        Positions before the last were all fed to the target, and to the head as prompt or accepted drafts."""
        pos = ((lengths - 1)[:, None] + torch.arange(1 - self.REFEED, 1, device=lengths.device)).clamp(min=0)
        tokens = self.tokens[self.store_rows(slots, pos, prefix), pos]
        tokens[:, -1] = last
        features, drafts = self.features_before(slots, pos, prefix), []
        for i in range(k):
            predicted = self.run(tokens, pos, features, slots, kv_len, prefix)[:, -1:]
            drafts.append(pick(i, head_logits(self.target, predicted)[:, -1]))
            tokens, features, pos = drafts[-1][:, None], predicted, pos[:, -1:] + 1
        if k:  # the last draft is never fed here; the next step's refeed reads it if it is accepted
            self.tokens[slots[:, None], pos] = tokens
        return drafts

    def greedy_drafts(self, last2, lengths, slots, k, kv_len, prefix=None) -> torch.Tensor:
        return torch.stack(self.draft(last2[:, 1], lengths, slots, k, kv_len, prefix,
                                      lambda i, logits: logits.argmax(-1)), 1)

    def propose(self, seqs, slots, k, sampling, u, kv_len, prefix=None):
        qs = []

        def pick(i, logits):
            qs.append(probs_from_logits(logits[:, None], *sampling)[:, 0])
            return sample(qs[-1], u[:, i])

        lengths = torch.tensor([len(s) for s in seqs], device=self.device)
        last = torch.tensor([s[-1] for s in seqs], device=self.device)
        drafts = self.draft(last, lengths, slots, k, kv_len, prefix, pick)
        return torch.stack(drafts, 1), torch.stack(qs, 1), torch.full((len(seqs),), k, device=self.device)


def kv_bucket(needed: int, max_seq: int, step: int = 64) -> int:
    """Keys attended per forward, rounded up so shapes repeat (and later CUDA graphs can be reused)."""
    return min(max_seq, math.ceil(needed / step) * step)
