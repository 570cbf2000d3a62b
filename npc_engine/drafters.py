"""Drafters: what proposes up to K tokens per row for the target to verify.

Every drafter states what it can do through the same attributes (the `Drafter` protocol), so the engine never asks
which drafter it holds: `make_drafter` is the one place that knows the kinds by name. A drafter proposes drafts with
their draft distributions q (one-hot for deterministic drafters); when every row is greedy, the engine's greedy step
asks on-device drafters for argmax drafts inside its one forward sequence, and host drafters for a lookup.
"""
import json
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from kernels.prefix import prefix_rows
from npc_engine.head import FeatureHead, is_head_dir, load_head
from npc_engine.loading import CheckpointError
from npc_engine.model import KVCache, Transformer, TreeStep, feature_width
from npc_engine.sampling import probs_from_logits, sample

K_MAX = 16  # the longest draft a step may verify


@dataclass
class DraftTree:
    """Draft-tree nodes after each row's last token (tree index 0), indexed 1..N in the order of the tensors' columns,
    every parent before its children."""
    tokens: torch.Tensor  # [B, N]
    parents: torch.Tensor  # [B, N]: the tree index of each node's parent (0: the last token)
    depths: torch.Tensor  # [B, N]: 1 for the last token's children


class Drafter(Protocol):
    name: str  # for reports only: the engine decides by the capabilities below
    prior_alpha: float  # the acceptance rate assumed before any is measured
    drafts: bool  # False: plain decoding (the engine never asks for drafts)
    host_drafts: bool  # drafts come from `lookup` over the host's tokens (not from a device forward)
    uses_features: bool  # reads the target's hidden states (attach(): the target writes them into its store)
    drafts_trees: bool  # has draft_tree(last, lengths, slots, width, depth, nodes, kv_len, prefix) -> DraftTree
    transformer: Transformer | None  # a full draft model the engine may fuse and capture in CUDA graphs
    cache: KVCache | None  # per-slot state, in the engine's slot layout (prefix slots included)
    feeds_last: int  # each proposal re-feeds this many last tokens: its cache needs every token before them
    guessed: int  # positions before those whose cache entries may rest on its own guesses (re-fed on catch-up)
    # A proposal's `stale`: how many of those `guessed` positions may rest on guesses this step (the engine counts
    # them per request; None: all `guessed`). A drafter that never guesses (guessed = 0) has nothing to re-feed.

    def slot_bytes(self, max_seq: int) -> int:
        """Bytes of drafter state per cache slot."""

    def allocate(self, n_slots: int, max_seq: int) -> None:
        """(Re)allocates the per-slot state for the engine's slot layout."""

    def prefill(self, tokens, input_pos, slots, kv_len, prefix=None) -> None:
        """Feeds prompt (or catch-up) positions."""

    def propose(self, seqs: list[list[int]], slots, k: int, sampling, u, kv_len: int, prefix=None, constrain=None,
                stale: int | None = None):
        """(drafts [B, k], q [B, k, V], lengths [B]): k drafts per row sampled with the uniforms u [B, k].
        constrain(logits [B, V], previous drafts [B] or None) masks each draft position's logits before q is taken
        (npc_engine.header.StepMasks.draft); host drafters leave it to the target side."""


class Cacheless:
    """State-free drafters: nothing to allocate or prefill."""

    transformer, cache, uses_features, drafts_trees = None, None, False, False
    feeds_last = guessed = 0

    def slot_bytes(self, max_seq: int) -> int:
        return 0

    def allocate(self, n_slots: int, max_seq: int) -> None:
        pass

    def prefill(self, tokens, input_pos, slots, kv_len, prefix=None) -> None:
        pass


class NoDrafter(Cacheless):
    """Plain autoregressive decoding."""

    name, prior_alpha, drafts, host_drafts = "none", 0.0, False, False


class NgramDrafter(Cacheless):
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens (n = max_n..1)
    in the request's own context (persona text + conversation) and propose what followed it."""

    name, prior_alpha, drafts, host_drafts = "ngram", 0.5, True, True

    def __init__(self, vocab_size: int, device, max_n: int = 3):
        self.vocab_size, self.device, self.max_n = vocab_size, device, max_n

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

    def propose(self, seqs, slots, k, sampling, u, kv_len, prefix=None, constrain=None, stale=None):
        found = [self.lookup(s, k) for s in seqs]
        width = k if any(found) else 0  # padded to the asked K: one verify shape per K
        drafts = torch.tensor([f + [0] * (width - len(f)) for f in found], dtype=torch.long, device=self.device)
        lens = torch.tensor([len(f) for f in found], dtype=torch.long, device=self.device)
        return drafts, F.one_hot(drafts, self.vocab_size).float(), lens


class ModelDrafter:
    """A small Llama-family model sharing the target's tokenizer, with its own KV cache in the engine's slot layout
    (prefix slots included), so one slot index names the same sequence in both caches."""

    name, prior_alpha, drafts, host_drafts, uses_features, drafts_trees = "model", 0.7, True, False, False, False
    feeds_last = 2  # each proposal re-feeds the last two tokens: its cache needs every token before them
    guessed = 0

    def __init__(self, model: Transformer, n_slots: int, max_seq: int, device, dtype):
        self.model = self.transformer = self.forward = model  # forward may become a CUDA-graph replayer
        self.device = device
        self.cache = KVCache(model.args, n_slots, max_seq, device, dtype)

    def slot_bytes(self, max_seq: int) -> int:
        return KVCache.slot_bytes(self.model.args, max_seq, self.cache.k.dtype)

    def allocate(self, n_slots: int, max_seq: int) -> None:
        if self.cache.max_seq != max_seq or self.cache.n_slots < n_slots:
            dtype, self.cache = self.cache.k.dtype, None  # freed before the larger one is allocated
            self.cache = KVCache(self.model.args, n_slots, max_seq, self.device, dtype)

    def prefill(self, tokens, input_pos, slots, kv_len, prefix=None) -> None:
        self.forward(tokens, input_pos, self.cache, slots, kv_len, logits=False, prefix=prefix)

    def propose(self, seqs, slots, k, sampling, u, kv_len, prefix=None, constrain=None, stale=None):
        """Feeds the last two tokens first: after a step the draft cache may lack one or both of them,
        and rewriting a cached token at its own position is harmless."""
        lengths = torch.tensor([len(s) for s in seqs], device=self.device)
        tokens = torch.tensor([[s[-2] if len(s) > 1 else s[-1], s[-1]] for s in seqs], device=self.device)
        pos = torch.stack([(lengths - 2).clamp(min=0), lengths - 1], dim=1)
        drafts, qs = [], []
        for i in range(k):
            logits = self.forward(tokens, pos, self.cache, slots, kv_len, prefix=prefix)[:, -1]
            if constrain is not None:
                logits = constrain(logits, drafts[-1] if drafts else None)
            q = probs_from_logits(logits[:, None], *sampling)[:, 0]
            drafts.append(sample(q, u[:, i]))
            qs.append(q)
            tokens, pos = drafts[-1][:, None], pos[:, -1:] + 1
        return torch.stack(drafts, 1), torch.stack(qs, 1), torch.full((len(seqs),), k, device=self.device)

    def greedy_drafts(self, last2: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor, k: int,
                      kv_len: int, prefix: torch.Tensor | None = None, stale: int | None = None) -> torch.Tensor:
        """k argmax drafts, all on the device (the raw model: this runs inside the greedy step's graph)."""
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
    token and the positions before it that the previous step accepted (`refeed`) with the target's features, so the
    head's cache holds only target features up to the last token, then drafts on its own predicted features. After
    steps without drafting the engine's catch-up feeds it again from `guessed` positions before where it stopped."""

    name, prior_alpha, drafts, host_drafts, uses_features, transformer = "head", 0.7, True, False, True, None
    drafts_trees = True
    feeds_last = 1  # the last token comes from the step; the refeed reads the others from the token store
    # accepted drafts' entries were computed from predicted features (after a tree step: other nodes' entries) until
    # the next refeed, which covers them: a step accepts at most K_MAX
    guessed = K_MAX

    def __init__(self, head: FeatureHead, target: Transformer, n_slots: int, max_seq: int, device, dtype,
                 ort_weights: str | None = "int8"):
        """ort_weights: the weights of the head's ONNX Runtime graph beside an ONNX export on the CPU ("int8",
        "float"; None: the head runs on PyTorch there too)."""
        self.model, self.target, self.device, self.dtype = head, target, device, dtype
        if target.feature_layers != head.feature_layers:
            if not isinstance(target, Transformer):  # an ONNX export outputs the layers it was exported with
                raise CheckpointError(
                    f"the feature head reads the outputs of target layers {list(head.feature_layers) or 'last'}, the "
                    f"export outputs layers {list(target.feature_layers) or 'last'}: re-export with `npc-engine "
                    f"export-onnx --layout ort --draft-weights --feature-layers "
                    f"{','.join(map(str, head.feature_layers)) or 'last'}`")
        # Later drafts copied from earlier in the line where the first draft is found there (copy_after). On the CPU a
        # step that copies skips the head's forwards (head Q: 1.53x plain decoding with copies, 1.30x without); on an
        # H200 the lookup cost 0.06 ms of a 1.0-1.6 ms step, and head Q decoded at 1.34x with copies, 1.39x without.
        self.copies = torch.device(device).type == "cpu"
        if head.draft_ids is not None:
            head.draft_rows(target)  # taken now: a target it cannot draft for is refused at load, not mid-line
        # beside an ONNX export on the CPU the head's chain runs on ONNX Runtime too (npc_engine.head_ort); trees,
        # shared-prefix rows and full-vocabulary heads stay on PyTorch
        self.ort = None
        if (ort_weights and not isinstance(target, Transformer) and torch.device(device).type == "cpu"
                and head.draft_ids is not None and dtype == torch.float32):
            from npc_engine.head_ort import OrtHead

            self.ort = OrtHead(head, head.draft_rows(target), target.model.norm, ort_weights)
        self.cache = self.tokens = self.store = None
        self.allocate(n_slots, max_seq)

    def slot_bytes(self, max_seq: int) -> int:
        """The head's KV, the target's stored features and the head's token store."""
        return KVCache.slot_bytes(self.model.args, max_seq, self.dtype) + max_seq * (
            feature_width(self.model.feature_layers, self.model.args.dim) * self.dtype.itemsize + torch.long.itemsize)

    def allocate(self, n_slots: int, max_seq: int) -> None:
        """The head's cache, the target's feature store and the head's token store, one row per slot; attached."""
        if self.cache is None or self.cache.max_seq != max_seq or self.cache.n_slots < n_slots:
            self.cache = self.store = self.tokens = None  # freed before the larger ones are allocated
            self.cache = KVCache(self.model.args, n_slots, max_seq, self.device, self.dtype)
            width = feature_width(self.model.feature_layers, self.model.args.dim)
            self.store = torch.zeros(n_slots, max_seq, width, device=self.device, dtype=self.dtype)
            self.tokens = torch.zeros(n_slots, max_seq, dtype=torch.long, device=self.device)
        self.attach()

    def attach(self) -> None:
        """The target stores the outputs this head reads in this drafter's store (engines sharing one target, each
        with its own head, attach theirs before each step)."""
        self.target.feature_store, self.target.feature_layers = self.store, self.model.feature_layers

    def features_before(self, slots: torch.Tensor, input_pos: torch.Tensor,
                        prefix: torch.Tensor | None) -> torch.Tensor:
        """The target's stored features at each position before input_pos [B, T] (zeros before position 0)."""
        before = (input_pos - 1).clamp(min=0)
        return self.target.feature_store[prefix_rows(slots, before, prefix), before] * (input_pos > 0)[..., None]

    def run(self, tokens, input_pos, features, slots, kv_len, prefix,
            tree: TreeStep | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head over tokens [B, T] on features [B, T, ...] (the target's stored ones or the head's predicted
        ones): (the predicted features [B, T, dim], the last position's draft logits [B, 1, len(draft_ids)] when
        ONNX Runtime computed them with the features, else None)."""
        if tree is None:  # tree nodes are not the line's tokens: the step writes the accepted ones (engine.trees)
            self.tokens[slots[:, None], input_pos] = tokens
        if self.ort is not None and tree is None and self.ort_runs(slots, input_pos, prefix):
            embedded = self.target.model.embed_tokens(tokens)
            return self.ort(embedded, features, input_pos, self.cache, int(slots[0]), kv_len)
        if features.shape[-1] != self.model.args.dim:  # the target's stored layers, side by side
            features = self.model.target_features(features)
        return self.model(self.target, tokens, features, input_pos, self.cache, slots, kv_len, prefix, tree), None

    @staticmethod
    def ort_runs(slots: torch.Tensor, input_pos: torch.Tensor, prefix: torch.Tensor | None) -> bool:
        """Whether the head's graph can run these rows: in consecutive slots (it binds them as one block of the
        cache), none reading a persona prefix's slot, each at consecutive positions (GroupQueryAttention's)."""
        first, (B, T) = int(slots[0]), input_pos.shape
        return ((prefix is None or not bool(prefix[:, 1].any())) and slots.tolist() == list(range(first, first + B))
                and bool((input_pos[:, -1] - input_pos[:, 0] == T - 1).all()))

    def choose(self, pick, i: int, predicted: torch.Tensor, sub: torch.Tensor | None) -> torch.Tensor:
        """Draft i after the last predicted feature [B] (sub: run's draft logits; pick: as `draft` takes it)."""
        head = self.model
        if pick is not None or head.draft_ids is None:
            logits = head.logits(self.target, predicted[:, -1]) if sub is None else head.spread(
                sub[:, -1], self.target.args.vocab_size)
            return logits.argmax(-1) if pick is None else pick(i, logits)
        sub = head.draft_logits(self.target, predicted[:, -1]) if sub is None else sub[:, -1]
        return head.draft_ids[sub.argmax(-1)]

    def forward(self, tokens, input_pos, cache, slots, kv_len, logits: bool = True, prefix=None):
        """The head on stored features (prefill, timing), with ModelDrafter.forward's arguments (cache: the head's)."""
        predicted, _ = self.run(tokens, input_pos, self.features_before(slots, input_pos, prefix), slots, kv_len,
                                prefix)
        return self.model.logits(self.target, predicted) if logits else None

    def prefill(self, tokens, input_pos, slots, kv_len, prefix=None) -> None:
        self.forward(tokens, input_pos, self.cache, slots, kv_len, logits=False, prefix=prefix)

    def draft(self, last: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor, k: int, kv_len: int,
              prefix: torch.Tensor | None, pick, copy: bool = True,
              stale: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """k >= 1 drafts after each row's last token [B] at position lengths - 1: the head's first, pick(0, logits),
        then per position the copy `copy_after` finds or the head's own chain, pick(i, logits) (pick None: the most
        likely token, without full-vocabulary logits for a reduced head). Returns the drafts and
        which later ones are copies [B, k - 1] (None: no lookup). Positions before the last were all fed to the
        target, and to the head as prompt or accepted drafts."""
        (predicted, sub), pos = self.refeed(last, lengths, slots, kv_len, prefix, stale), lengths[:, None]
        drafts, copied = [self.choose(pick, 0, predicted, sub)], None
        if copy and self.copies and k > 1:
            tokens, count = self.copy_after(drafts[0], lengths, slots, prefix, kv_len, k - 1)
            copied = torch.arange(k - 1, device=last.device) < count[:, None]
        # reading a CPU flag costs nothing and a skipped head forward is most of a draft; a CUDA step is one graph
        chain = copied is None or last.device.type != "cpu" or not bool(copied.all())
        for i in range(1, k):
            if chain:
                predicted, sub = self.run(drafts[-1][:, None], pos, predicted, slots, kv_len, prefix)
                mine = self.choose(pick, i, predicted, sub)
                drafts.append(mine if copied is None else torch.where(copied[:, i - 1], tokens[:, i - 1], mine))
            else:
                drafts.append(tokens[:, i - 1])
            pos = pos + 1
        # the token store holds every draft (the head fed all but the last, or none); the next refeed reads it
        self.tokens[slots[:, None], lengths[:, None] + torch.arange(k, device=last.device)] = torch.stack(drafts, 1)
        return drafts, copied

    def copy_after(self, first: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor, prefix: torch.Tensor | None,
                   kv_len: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt lookup seeded by the head's first draft [B]: the latest earlier place where the row's last token was
        followed by `first` (one where the token before the last matches too preferred), and the `width` tokens that
        followed it there [B, width] with how many of them the row holds [B] (0: no such place). An NPC line often
        repeats its persona's words: there a copy drafts further than the head, and costs no head forward."""
        B, dev = len(first), first.device
        pos = torch.arange(kv_len, device=dev).expand(B, kv_len)
        history = self.tokens[prefix_rows(slots, pos, prefix), pos]  # past a row's last position: stale, masked
        last = (lengths - 1)[:, None]
        pair = ((history == first[:, None]) & (history.roll(1, 1) == history.gather(1, last))
                & (pos >= 1) & (pos < last))
        triple = pair & (history.roll(2, 1) == history.gather(1, (last - 1).clamp(min=0))) & (pos >= 2)
        best, at = torch.where(pair, pos + kv_len * triple, -1).max(1)
        count = torch.where(best >= 0, (last[:, 0] - at).clamp(max=width), 0)
        return history.gather(1, (at[:, None] + 1 + torch.arange(width, device=dev)).clamp(max=kv_len - 1)), count

    def refeed(self, last: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor, kv_len: int,
               prefix: torch.Tensor | None, stale: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feeds the last token and the `stale` positions before it (whose entries may rest on guesses: the
        engine's count, default all `guessed`) on the target's features: the predicted feature [B, 1, dim] after
        last, with run's draft logits. The engine counts the drafts its last step accepted (head Q at K = 4: 1.67 a
        step, so 2.67 positions fed against 17): on the CPU that cut its drafting time per token by a quarter to two
        fifths."""
        width = self.feeds_last + (self.guessed if stale is None else stale)
        pos = ((lengths - 1)[:, None] + torch.arange(1 - width, 1, device=lengths.device)).clamp(min=0)
        tokens = self.tokens[prefix_rows(slots, pos, prefix), pos]
        tokens[:, -1] = last
        predicted, sub = self.run(tokens, pos, self.features_before(slots, pos, prefix), slots, kv_len, prefix)
        return predicted[:, -1:], sub

    def draft_tree(self, last: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor, width: int, depth: int,
                   nodes: int, kv_len: int, prefix: torch.Tensor | None, stale: int | None = None) -> DraftTree:
        """EAGLE-2's dynamic draft tree after each row's last token [B] at position lengths - 1: every level
        expands the `width` best-scored nodes of the level before by their `width` most likely tokens (a node's
        score: the summed log-probabilities of its path), `depth` levels, then the `nodes` best-scored of all
        expanded nodes are the tree. A child scores below its parent, so the chosen nodes hold their ancestors. The
        head feeds each level at cache positions past the row's length, its nodes seeing their ancestors only."""
        B, W, dev = len(last), width, last.device
        predicted, _ = self.refeed(last, lengths, slots, kv_len, prefix, stale)
        scores, tokens = self.model.top_tokens(self.target, predicted[:, 0], W)
        scores = scores.double()  # float32 could not tell a child 1e-9 below its parent from it
        ids, features = torch.arange(W, device=dev).expand(B, W), predicted.expand(B, W, -1)
        eye = torch.eye(W, dtype=torch.bool, device=dev).expand(B, W, W)
        seen = eye  # of the fed nodes, each one's ancestors and itself
        all_scores, all_tokens, all_parents = [scores], [tokens], [torch.full_like(ids, -1)]
        all_depths = [torch.ones(W, dtype=torch.long, device=dev)]  # no host tensor: this runs inside CUDA graphs
        for d in range(1, depth):  # feed the level-d nodes, expand them to depth d + 1
            write = lengths[:, None] + (d - 1) * W + torch.arange(W, device=dev)
            predicted, _ = self.run(tokens, (lengths - 1 + d)[:, None].expand(B, W), features, slots, kv_len,
                                    prefix, TreeStep(write, lengths, seen))
            logp, child = self.model.top_tokens(self.target, predicted, W)
            child_scores = (scores[..., None] + logp.double() - 1e-9).flatten(1)  # [B, W * W]
            all_scores.append(child_scores)
            all_tokens.append(child.flatten(1))
            all_parents.append(ids[..., None].expand(B, W, W).flatten(1))
            all_depths.append(torch.full((W * W,), d + 1, device=dev))
            if d + 1 < depth:
                scores, best = child_scores.topk(W, -1)
                parent = best // W  # the fed node each next one comes from
                tokens, ids = child.flatten(1).gather(1, best), W + (d - 1) * W * W + best
                features = predicted.gather(1, parent[..., None].expand(-1, -1, predicted.shape[-1]))
                seen = torch.cat([seen.gather(1, parent[..., None].expand(-1, -1, seen.shape[-1])), eye], dim=2)
        expanded = W + (depth - 1) * W * W
        chosen = torch.cat(all_scores, 1).topk(min(nodes, expanded), -1).indices.sort(-1).values
        index_of = torch.zeros(B, expanded + 1, dtype=torch.long, device=dev)  # expanded id + 1 -> tree index
        index_of.scatter_(1, chosen + 1, torch.arange(1, chosen.shape[1] + 1, device=dev).expand_as(chosen))
        return DraftTree(torch.cat(all_tokens, 1).gather(1, chosen),
                         index_of.gather(1, torch.cat(all_parents, 1).gather(1, chosen) + 1),
                         torch.cat(all_depths)[chosen])

    def greedy_drafts(self, last2, lengths, slots, k, kv_len, prefix=None, stale=None) -> torch.Tensor:
        return torch.stack(self.draft(last2[:, 1], lengths, slots, k, kv_len, prefix, None, stale=stale)[0], 1)

    def propose(self, seqs, slots, k, sampling, u, kv_len, prefix=None, constrain=None, stale=None):
        qs, picked = [], []

        def pick(i, logits):
            if constrain is not None:  # a header mask: copies stay off (the draft before is then the head's)
                logits = constrain(logits, picked[-1] if picked else None)
            qs.append(probs_from_logits(logits[:, None], *sampling)[:, 0])
            picked.append(sample(qs[-1], u[:, i]))
            return picked[-1]

        lengths = torch.tensor([len(s) for s in seqs], device=self.device)
        last = torch.tensor([s[-1] for s in seqs], device=self.device)
        drafts, copied = self.draft(last, lengths, slots, k, kv_len, prefix, pick, copy=constrain is None,
                                    stale=stale)
        drafts, q = torch.stack(drafts, 1), torch.stack(qs, 1)
        if copied is not None:  # a copy is a function of the line and the first draft: its q is one-hot
            copies = F.one_hot(drafts[:, 1:], q.shape[-1]).to(q.dtype)
            later = q[:, 1:] if len(qs) == k else copies  # the head skipped: every later draft is a copy
            q = torch.cat([q[:, :1], torch.where(copied[..., None], copies, later)], 1)
        return drafts, q, torch.full((len(seqs),), k, device=self.device)


def draft_spec(model_dir: Path, draft: str) -> str:
    """"auto": the folder named by npc_engine.json's "draft" key in the model folder, else n-gram lookup."""
    if draft != "auto":
        return draft
    hint = model_dir / "npc_engine.json"
    named = json.loads(hint.read_text()).get("draft") if hint.is_file() else None
    return str(model_dir / named) if named else "ngram"


def make_drafter(draft: str, target, load_model, torch_backend: bool, max_batch: int, max_seq: int, device,
                 dtype) -> Drafter:
    """The drafter a spec names: "none", "ngram", a feature-head folder or a draft-model folder (loaded with
    load_model(path), the target's loader). The registry: the only code that tells drafter kinds apart by name."""
    if draft == "none":
        return NoDrafter()
    if draft == "ngram":
        return NgramDrafter(target.args.vocab_size, device)
    if is_head_dir(draft):
        if not torch_backend:
            target.attach_draft_weights()  # an ONNX export: the weights the head reads of its target
        return HeadDrafter(load_head(draft, target, device, dtype), target, max_batch + 1, max_seq, device, dtype)
    draft_model = load_model(draft)
    if draft_model.args.vocab_size != target.args.vocab_size:
        raise ValueError(f"draft model {draft} has vocabulary size {draft_model.args.vocab_size}, the target has "
                         f"{target.args.vocab_size}: they must share one tokenizer")
    return ModelDrafter(draft_model, max_batch + 1, max_seq, device, dtype)
