"""One speculative step over a batch of decoding requests: the drafter proposes up to K tokens per row, the target
verifies K + 1 positions of every row in one forward, and each row keeps its own accepted length (plain decoding is
K = 0). Rows live in fixed KV-cache slots; rolling back a rejected draft is just a shorter length.

`verify` keeps the output distribution exactly the target's: accept draft x with probability min(1, p(x)/q(x)); at
the first rejection sample from norm(max(0, p - q)); when every proposed draft passes, sample a bonus token from p.
"""
import torch
import torch.nn.functional as F

from npc_engine.drafters import K_MAX, Drafter
from npc_engine.engine import rows
from npc_engine.engine.rows import StepResult
from npc_engine.engine.slots import prefix_ref, prefix_tensor
from npc_engine.engine.trees import TreeShape, greedy_tree_step
from npc_engine.header import StepMasks
from npc_engine.model import KVCache
from npc_engine.sampling import greedy_tokens, params_tensors, probs_from_logits, sample


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
    batch = torch.arange(B, device=p.device)
    p_next = p[batch, n_accepted]
    q_next = F.pad(q, (0, 0, 0, 1))[batch, n_accepted]  # zero row past the drafts: residual = p (bonus)
    residual = (p_next - q_next).clamp_(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    return n_accepted, sample(residual, u_extra)


def verify_greedy(logits: torch.Tensor, drafts: torch.Tensor,
                  draft_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature 0 (the same rule with one-hot p and q, without building them): the longest prefix
    of drafts matching the target's argmax, then the target's own token."""
    best = greedy_tokens(logits)
    K = drafts.shape[1]
    proposed = torch.arange(K, device=drafts.device)[None, :] < draft_lens[:, None]
    n_accepted = ((drafts == best[:, :K]) & proposed).long().cumprod(dim=1).sum(dim=1)
    return n_accepted, best.gather(1, n_accepted[:, None]).squeeze(1)


def greedy_step(target, target_cache: KVCache, drafter: Drafter, packed: torch.Tensor, k: int,
                kv_len: int, stale: int | None = None, tree: TreeShape | None = None) -> torch.Tensor:
    """One whole temperature-0 speculative step on the device, so it can be one CUDA graph: draft k tokens (with
    `tree`, a draft tree of depth k: npc_engine.engine.trees), verify them with one target forward, accept. packed:
    [B, rows.HOST_DRAFTS (+ k)] input rows; returns the [B, 2 + k + 3] result rows (npc_engine.engine.rows). stale:
    the drafter's (Drafter.propose); None under graphs, whose step re-feeds as much whatever the last step accepted."""
    if tree is not None and k:
        return greedy_tree_step(target, target_cache, drafter, packed, k, kv_len, tree, stale)
    last2, lengths = packed[:, rows.PREV_TOKEN:rows.LAST_TOKEN + 1], packed[:, rows.LENGTH]
    slots, prefix = packed[:, rows.SLOT].contiguous(), packed[:, rows.PREFIX]
    if k and not drafter.host_drafts:
        drafts = drafter.greedy_drafts(last2, lengths, slots, k, kv_len, prefix, stale)
    else:
        drafts = packed[:, rows.HOST_DRAFTS:rows.HOST_DRAFTS + k]
    emitted = torch.cat([last2[:, 1:], drafts], dim=1)  # the last token, then the drafts
    positions = (lengths - 1)[:, None] + torch.arange(k + 1, device=packed.device)
    logits = target(emitted, positions, target_cache, slots, kv_len, prefix=prefix)
    n_accepted, extra = verify_greedy(logits, drafts, packed[:, rows.PROPOSED])
    before_extra = emitted.gather(1, n_accepted[:, None])[:, 0]
    return torch.cat([n_accepted[:, None], extra[:, None], drafts,
                      torch.stack([before_extra, extra, lengths + n_accepted + 1], dim=1)], dim=1)


class Stepper:
    """Runs the steps of decoding requests on a Forwards (npc_engine.engine.forwards)."""

    def __init__(self, fw):
        self.fw = fw

    def greedy_rows(self, reqs: list, k: int, found: list[list[int]], width: int) -> list[list[int]]:
        """The packed rows of `greedy_step` (padded to the batch bucket with scratch-slot rows under graphs)."""
        packed = [rows.pack(r.ids, r.slot, min(r.k, len(f) if width else k), prefix_ref(r), f, width)
                  for r, f in zip(reqs, found)]
        if self.fw.graphed:  # few graph shapes: pad to the batch bucket
            packed += [rows.padding(self.fw.scratch_slot, width)] * (rows.batch_bucket(len(reqs)) - len(reqs))
        return packed

    def greedy(self, reqs: list, k: int, stale: int | None = None) -> list[StepResult]:
        """Temperature 0: the whole step is one `greedy_step` call (one graph replay on CUDA) on one packed tensor."""
        drafter = self.fw.drafter
        # host drafts are padded to the asked K (not the longest found: fewer graph shapes)
        found = [drafter.lookup(r.ids, k) for r in reqs] if drafter.host_drafts and k else [[]] * len(reqs)
        width = k if any(found) else 0
        k = k if width or not drafter.host_drafts else 0
        packed = self.greedy_rows(reqs, k, found, width)
        kv_len = self.fw.kv_len(max(len(r.ids) for r in reqs) + self.fw.span(k))
        stale = None if self.fw.graphed else stale  # one graph per K
        out = self.fw.greedy_step(self.fw.tensor(packed), k, kv_len, stale)[:, :rows.FIRST_DRAFT + k].tolist()
        return [rows.unpack(o, row, k) for o, row in zip(out, packed)]

    def sampled(self, reqs: list, k_asked: int, stale: int | None = None,
                masks: StepMasks | None = None) -> list[StepResult]:
        """masks: the line headers being written, masked at every draft and verified position."""
        fw, dev = self.fw, self.fw.device
        B, seqs = len(reqs), [r.ids for r in reqs]
        slots = fw.tensor([r.slot for r in reqs])
        prefix = prefix_tensor([prefix_ref(r) for r in reqs], dev)
        temperature, top_k, top_p = params_tensors([r.params for r in reqs], dev)
        # As many uniforms every step whatever K is: a seed gives the same stream under any draft length.
        u = torch.stack([torch.rand(2 * K_MAX + 1, generator=r.generator, device=dev) for r in reqs])
        kv_len = fw.kv_len(max(map(len, seqs)) + k_asked)
        if k_asked > 0:
            drafts, q, lens = fw.drafter.propose(seqs, slots, k_asked, (temperature, top_k, top_p), u[:, :k_asked],
                                                 kv_len, prefix, masks.draft if masks is not None else None, stale)
            lens = torch.minimum(lens.to(dev), fw.tensor([r.k for r in reqs]))
            drafts = drafts.to(dev)
        else:
            drafts, q = torch.zeros(B, 0, dtype=torch.long, device=dev), None
            lens = torch.zeros(B, dtype=torch.long, device=dev)
        k = drafts.shape[1]
        lengths = fw.tensor([len(s) for s in seqs])
        tokens = torch.cat([fw.tensor([s[-1] for s in seqs])[:, None], drafts], dim=1)
        positions = (lengths - 1)[:, None] + torch.arange(k + 1, device=dev)
        logits = fw.forward(tokens, positions, fw.cache, slots, kv_len, prefix=prefix)
        if masks is not None:
            logits = masks.target(logits, drafts)
        q = torch.zeros(B, k, 1, device=dev) if q is None else q.to(dev)
        n_acc, extra = verify(probs_from_logits(logits, temperature, top_k, top_p), q, drafts, lens,
                              u[:, K_MAX:K_MAX + k], u[:, 2 * K_MAX])
        out = torch.cat([n_acc[:, None], extra[:, None], lens[:, None], drafts], dim=1).tolist()  # the one host sync
        if masks is not None:
            masks.rollback()  # the engine feeds the headers the tokens emitted
        return [StepResult(n, token, proposed, d) for n, token, proposed, *d in out]

