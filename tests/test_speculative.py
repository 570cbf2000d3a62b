"""The speculative core: greedy identity, the exact target distribution under sampling, rollback."""
import math
import shutil
from pathlib import Path

import pytest
import torch

from npc_engine.drafters import HeadDrafter, ModelDrafter, NgramDrafter, NoDrafter
from npc_engine.engine import Engine
from npc_engine.engine.policy import (
    DRAFT_LENGTHS,
    EXPLORE_EVERY,
    PROBE_ADMISSIONS,
    PROBE_AFTER,
    PROBE_CATCH_UP_MAX,
    PROBE_FIRST,
    Acceptance,
    Calibration,
    DraftPolicy,
    choose_k,
    expected_tokens,
)
from npc_engine.engine.stepping import verify
from npc_engine.head import FeatureHead, head_args
from npc_engine.loading import load_model
from npc_engine.model import KVCache, ModelArgs, Transformer
from npc_engine.sampling import SamplingParams, sample
from npc_engine.tokenizer import Tokenizer

EMBEDDED = Path(__file__).resolve().parents[1] / "models"
PROMPTS = [
    "<|persona|>I forge swords for the town guard.<|eot|><|player|>What do you do?<|eot|><|npc|>",
    "<|player|>Hi<|eot|><|npc|>",
    "The tavern is warm tonight, traveller. The tavern is warm tonight,",
    "<|persona|>I sing songs of old heroes and dragons. I sing songs.<|eot|><|player|>Sing!<|eot|><|npc|>I sing",
    "What",
    "The captain keeps the gate; the merchant sells spices from the south. The captain keeps",
    "Grüße aus der Schmiede — ça va?",
    "<|npc|>",
]


def make_engine(target_dir, drafter_kind, draft_dir=None, dtype=torch.float32, **kwargs):
    target = load_model(target_dir, "cpu", dtype)
    if drafter_kind == "model":
        drafter = ModelDrafter(load_model(draft_dir), 9, 1024, "cpu", torch.float32)
    elif drafter_kind == "head":  # random: mostly wrong drafts
        drafter = HeadDrafter(random_head(target).to(dtype), target, 9, 1024, "cpu", dtype)
    elif drafter_kind == "head_layers":  # on both layers' outputs: the target stores them side by side
        drafter = HeadDrafter(random_head(target, feature_layers=(0, 1)), target, 9, 1024, "cpu", torch.float32)
    elif drafter_kind == "head_reduced":  # drafts over every third id only
        drafter = HeadDrafter(random_head(target, draft_ids=torch.arange(0, target.args.vocab_size, 3)), target, 9,
                              1024, "cpu", torch.float32)
    elif drafter_kind == "ngram":
        drafter = NgramDrafter(target.args.vocab_size, "cpu")
    else:
        drafter = NoDrafter()
    return Engine(target, drafter, Tokenizer.from_dir(target_dir), max_batch=8, **kwargs)


def random_head(target: Transformer, seed: int = 0, draft_ids: torch.Tensor | None = None,
                feature_layers: tuple[int, ...] = ()) -> FeatureHead:
    torch.manual_seed(seed)
    return FeatureHead(head_args(target.args), draft_ids, feature_layers=feature_layers).eval().requires_grad_(False)


def run_batch(engine, prompts, params):
    outputs = {}
    for i, text in enumerate(prompts):
        engine.submit(f"r{i}", engine.tokenizer.encode(text), params)
        outputs[f"r{i}"] = []
    while engine.has_work():
        for ev in engine.step():
            outputs[ev.rid] += ev.token_ids
    return [outputs[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("drafter_kind,k,fused", [("model", 4, False), ("model", None, False), ("ngram", 8, False),
                                                  ("ngram", None, False), ("none", 4, False), ("model", 4, True),
                                                  ("head", 5, False), ("head", None, False), ("head", 3, True),
                                                  ("head_reduced", 4, False), ("head_reduced", None, False),
                                                  ("head_reduced", 3, True), ("head_layers", 4, False),
                                                  ("head_layers", 3, True)])
def test_greedy_speculative_is_token_identical_across_batch_sizes(tiny_pair_dirs, drafter_kind, k, fused):
    """fused: the kernels' PyTorch references, which check their inputs as the GPU kernels need them."""
    target_dir, draft_dir = tiny_pair_dirs
    params = SamplingParams(temperature=0, max_tokens=24)
    plain = run_batch(make_engine(target_dir, "none"), PROMPTS, params)
    for batch in (1, 3, 8):
        engine = make_engine(target_dir, drafter_kind, draft_dir, fixed_k=k, fused_kernels=fused)
        got = []
        for start in range(0, len(PROMPTS), batch):
            got += run_batch(engine, PROMPTS[start:start + batch], params)
        assert got == plain, f"batch {batch}"


@pytest.mark.parametrize("drafter_kind,k", [("ngram", 4), ("head", 3), ("head", 6)])
def test_bfloat16_cpu_greedy_speculative_is_token_identical(tiny_pair_dirs, drafter_kind, k):
    """bfloat16 on the CPU: a one-row step multiplies through torch.mv, a drafted step's K + 1 rows through
    oneDNN's matmul; the two give the same numbers, so drafting never changes a greedy line."""
    target_dir, draft_dir = tiny_pair_dirs
    params = SamplingParams(temperature=0, max_tokens=24)
    plain = run_batch(make_engine(target_dir, "none", dtype=torch.bfloat16), PROMPTS, params)
    for batch in (1, 3):
        engine = make_engine(target_dir, drafter_kind, draft_dir, torch.bfloat16, fixed_k=k)
        got = []
        for start in range(0, len(PROMPTS), batch):
            got += run_batch(engine, PROMPTS[start:start + batch], params)
        assert got == plain, f"batch {batch}"
        assert engine.policy.acceptance.trials > 2  # it drafted


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_layers_keep_greedy_lines(tiny_pair_dirs):
    """Engine(compiled=True): each decoder layer through torch.compile, the same greedy lines as the eager engine,
    decoding plainly and with a feature head's drafts (one-row and several-row steps)."""
    target_dir, _ = tiny_pair_dirs
    params = SamplingParams(temperature=0, max_tokens=24)
    plain = run_batch(make_engine(target_dir, "none"), PROMPTS[:4], params)
    for kind, k in (("none", None), ("head", 3)):
        engine = make_engine(target_dir, kind, fixed_k=k, compiled=True)
        assert all(layer._compiled_call_impl is not None for layer in engine.target.model.layers)
        assert run_batch(engine, PROMPTS[:4], params) == plain, kind


def test_compiled_layers_are_refused_off_the_cpu(tiny_pair_dirs):
    with pytest.raises(ValueError, match="drop --compile"):
        Engine(load_model(tiny_pair_dirs[0]), NoDrafter(), None, "cuda", compiled=True)


def test_good_draft_is_accepted_and_bad_draft_still_exact(tiny_pair_dirs):
    target_dir, draft_dir = tiny_pair_dirs
    params = SamplingParams(temperature=0, max_tokens=20)
    self_draft = make_engine(target_dir, "model", target_dir, fixed_k=4)  # the target drafting for itself
    list(self_draft.generate(self_draft.tokenizer.encode(PROMPTS[0]), params))
    assert self_draft.last_stats.accepted == self_draft.last_stats.drafted > 0
    bad = make_engine(target_dir, "model", draft_dir, fixed_k=4)
    list(bad.generate(bad.tokenizer.encode(PROMPTS[0]), params))
    assert bad.last_stats.accepted < bad.last_stats.drafted


def prefilled_reference(target_dir, draft_dir, ids: list[int]) -> tuple[Engine, int]:
    """A fresh engine that prefilled ids (every token but the last, the state the rollback invariant promises) into
    both caches, and the slot it used. fixed_k: with an adaptive K a request may start at 0 on a CPU where the
    calibration finds drafting too slow, and then only the target's cache is fed."""
    fresh = make_engine(target_dir, "model", draft_dir, fixed_k=6)
    fresh_slot = fresh.slots.free[-1]
    fresh.submit("b", ids, SamplingParams(max_tokens=1))
    fresh.step()
    return fresh, fresh_slot


def test_rollback_leaves_caches_as_if_only_accepted_tokens_were_fed(tiny_pair_dirs):
    target_dir, draft_dir = tiny_pair_dirs
    engine = make_engine(target_dir, "model", draft_dir, fixed_k=6)
    prompt = engine.tokenizer.encode(PROMPTS[0])
    engine.submit("a", prompt, SamplingParams(temperature=1.0, seed=3, max_tokens=200))
    for _ in range(6):
        engine.step()
    req = engine.active["a"]
    assert req.stats.accepted < req.stats.drafted  # some drafts were rolled back
    fresh, fresh_slot = prefilled_reference(target_dir, draft_dir, req.ids)
    n = len(req.ids)
    # The target holds every token but the last; the draft every token but the last two (it
    # re-feeds those two at the start of its next proposal).
    for ours, ref, valid in ((engine.cache, fresh.cache, n - 1), (engine.drafter.cache, fresh.drafter.cache, n - 2)):
        assert torch.allclose(ours.k[:, req.slot, :, :valid], ref.k[:, fresh_slot, :, :valid], atol=1e-5)
        assert torch.allclose(ours.v[:, req.slot, :, :valid], ref.v[:, fresh_slot, :, :valid], atol=1e-5)


def conditionals(model: Transformer, prompt: list[int], depth: int) -> list[torch.Tensor]:
    """Exact next-token distributions after every continuation of length 0..depth-1:
    result[d] has shape [V]*d + [V]."""
    V = model.args.vocab_size
    tables = []
    with torch.no_grad():
        for d in range(depth):
            conts = (torch.cartesian_prod(*[torch.arange(V)] * d).reshape(-1, d) if d
                     else torch.zeros(1, 0, dtype=torch.long))
            tokens = torch.cat([torch.tensor(prompt).expand(len(conts), -1), conts], 1)
            tables.append(torch.softmax(model(tokens)[:, -1].float(), -1).reshape([V] * d + [V]))
    return tables


def simulate_two_tokens(P, Q, n: int, verify_fn, gen) -> torch.Tensor:
    """Speculative sampling of the first two tokens for n independent requests, vectorised: K = 2
    drafts from the draft's exact conditionals Q, verified against the target's P with `verify_fn`;
    rows that emit a single token take a second step (K = 1)."""
    V = P[0].shape[-1]

    def u(*shape):
        return torch.rand(*shape, generator=gen)

    d1 = sample(Q[0].expand(n, V), u(n))
    d2 = sample(Q[1][d1], u(n))
    p = torch.stack([P[0].expand(n, V), P[1][d1], P[2][d1, d2]], 1)
    q = torch.stack([Q[0].expand(n, V), Q[1][d1]], 1)
    n_acc, extra = verify_fn(p, q, torch.stack([d1, d2], 1), torch.full((n,), 2), u(n, 2), u(n))
    first = torch.where(n_acc > 0, d1, extra)
    second = torch.where(n_acc > 1, d2, extra)
    again = n_acc == 0  # only one token so far: one more step from the context (first,)
    e1 = sample(Q[1][first], u(n))
    p2 = torch.stack([P[1][first], P[2][first, e1]], 1)
    n2, extra2 = verify_fn(p2, Q[1][first][:, None], e1[:, None], torch.ones(n, dtype=torch.long), u(n, 1), u(n))
    second = torch.where(again, torch.where(n2 > 0, e1, extra2), second)
    return torch.zeros(V * V).index_add_(0, first * V + second, torch.ones(n)).reshape(V, V)


def chi_square_p_value(observed: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    """Pearson chi-square with cells of expected count < 5 pooled; p-value by the Wilson-Hilferty approximation."""
    n = observed.sum()
    expected, observed = expected_probs.flatten().double() * n, observed.flatten().double()
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum().item()
    df = int(keep.sum()) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2)), df


def tiny_vocab_pair():
    torch.manual_seed(0)
    args = dict(vocab_size=10, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=32)
    target, draft = Transformer(ModelArgs(**args)).eval(), Transformer(ModelArgs(**args)).eval()
    with torch.no_grad():  # sharpen both so p and q differ a lot: residual sampling matters
        target.lm_head.weight.mul_(6)
        draft.lm_head.weight.mul_(6)
    return target, draft


def verify_sampling_p_on_rejection(p, q, drafts, draft_lens, u_accept, u_extra):
    """A one-line bug: on rejection, sample from p instead of norm(max(0, p - q))."""
    n_accepted, _ = verify(p, q, drafts, draft_lens, u_accept, u_extra)
    return n_accepted, sample(p[torch.arange(len(n_accepted)), n_accepted], u_extra)


def verify_without_residual_clamp(p, q, drafts, draft_lens, u_accept, u_extra):
    """Another one-line bug: residual p - q without max(0, .), renormalised (negative mass leaks in)."""
    n_accepted, _ = verify(p, q, drafts, draft_lens, u_accept, u_extra)
    rows = torch.arange(len(n_accepted))
    proposed = torch.arange(q.shape[1])[None] < draft_lens[:, None]
    q_next = torch.nn.functional.pad(q * proposed[..., None], (0, 0, 0, 1))
    residual = (p[rows, n_accepted] - q_next[rows, n_accepted]).abs()
    return n_accepted, sample(residual, u_extra)


def test_speculative_sampling_keeps_the_target_distribution():
    """10^5 requests: the joint distribution of the first two tokens under speculative sampling
    (draft model conditionals, K = 2, temperature 1) passes a chi-square test against the target's
    exact distribution at p > 1e-3; the same test rejects two one-line mutants of the rule at p < 1e-6."""
    target, draft = tiny_vocab_pair()
    P, Q = conditionals(target, [1, 2, 3], 3), conditionals(draft, [1, 2, 3], 2)
    exact = P[0][:, None] * P[1]
    gen = torch.Generator().manual_seed(0)
    p_value, df = chi_square_p_value(simulate_two_tokens(P, Q, 100_000, verify, gen), exact)
    assert p_value > 1e-3, f"chi-square p = {p_value:.2e} (df {df})"
    for mutant in (verify_sampling_p_on_rejection, verify_without_residual_clamp):
        p_mutant, _ = chi_square_p_value(simulate_two_tokens(P, Q, 100_000, mutant, gen), exact)
        assert p_mutant < 1e-6, f"{mutant.__name__} not caught: p = {p_mutant:.2e}"


@pytest.mark.parametrize("drafter_kind", ["model", "head", "head_reduced"])
def test_engine_sampling_matches_the_target_distribution(drafter_kind):
    """End to end through the engine (draft model, feature head, feature head drafting over 4 of the 10 ids; KV
    caches, rollback, per-request seeds): 4096 two-token samples against the exact distribution, chi-square
    p > 1e-3."""
    target, draft = tiny_vocab_pair()
    P = conditionals(target, [1, 2, 3], 2)
    draft_ids = torch.tensor([0, 3, 4, 8]) if drafter_kind == "head_reduced" else None
    drafter = (ModelDrafter(draft, 1025, 64, "cpu", torch.float32) if drafter_kind == "model" else
               HeadDrafter(random_head(target, draft_ids=draft_ids), target, 1025, 64, "cpu", torch.float32))
    engine = Engine(target, drafter, tokenizer=None, max_batch=1024, max_seq=64, fixed_k=3)
    counts = torch.zeros(10, 10)
    outs = {}
    for i in range(4096):
        engine.submit(str(i), [1, 2, 3], SamplingParams(temperature=1.0, max_tokens=2, seed=i))
        outs[str(i)] = []
    while engine.has_work():
        for ev in engine.step():
            outs[ev.rid] += ev.token_ids
    for toks in outs.values():
        counts[toks[0], toks[1]] += 1
    p_value, df = chi_square_p_value(counts, P[0][:, None] * P[1])
    assert p_value > 1e-3, f"chi-square p = {p_value:.2e} (df {df})"


@pytest.mark.parametrize("draft_ids", [[3], [3, 5]])
def test_engine_sampling_with_copied_drafts_matches_the_target_distribution(draft_ids):
    """A feature head whose first draft is 3 (or 3 or 5) after a prompt holding (x, 3) for every token x finds its
    first draft earlier whatever the prefill sampled, and copies what followed as its second draft, verified with a
    one-hot q: the first three tokens of 8192 samples against their exact joint distribution, chi-square p > 1e-3
    (the mixed case with the head's own q for the copies: p < 1e-6, checked)."""
    target, _ = tiny_vocab_pair()
    prompt = [t for x in range(10) for t in (x, 3)]
    P = conditionals(target, prompt, 3)
    drafter = HeadDrafter(random_head(target, draft_ids=torch.tensor(draft_ids)), target, 1025, 128, "cpu",
                          torch.float32)
    found, copy_after = [], drafter.copy_after

    def spy(*args):
        tokens, count = copy_after(*args)
        found.append(count)
        return tokens, count

    drafter.copy_after = spy
    engine = Engine(target, drafter, tokenizer=None, max_batch=1024, max_seq=128, fixed_k=3)
    outs = {}
    for i in range(8192):
        engine.submit(str(i), prompt, SamplingParams(temperature=1.0, max_tokens=3, seed=i))
        outs[str(i)] = []
    while engine.has_work():
        for ev in engine.step():
            outs[ev.rid] += ev.token_ids
    counts = torch.zeros(10, 10, 10)
    for toks in outs.values():
        counts[tuple(toks)] += 1
    copies = torch.cat(found) > 0
    assert copies.float().mean() > (0.9 if len(draft_ids) == 1 else 0.2), copies.float().mean()
    p_value, df = chi_square_p_value(counts, P[0][:, None, None] * P[1][..., None] * P[2])
    assert p_value > 1e-3, f"chi-square p = {p_value:.2e} (df {df})"


@pytest.mark.parametrize("drafter_kind,k", [("none", None), ("model", 3), ("model", None), ("ngram", None),
                                            ("ngram", 0), ("ngram", 2), ("head", 3)])
def test_pipelined_greedy_decoding_is_token_identical(drafter_kind, k):
    """Each step launched from the previous one's device result before the host reads it: the same tokens
    with requests of different lengths finishing mid-chain, a request admitted mid-chain and one cancelled.
    On the embedded trained pair: a random model repeats one token, which hides wrong positions."""
    target_dir, draft_dir = EMBEDDED / "npc-target", EMBEDDED / "npc-draft"
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (24, 5, 17, 1, 24, 9, 30, 12)]
    outputs = []
    for pipeline in (False, True):
        engine = make_engine(target_dir, drafter_kind, draft_dir, fixed_k=k, pipeline=pipeline)
        out, ends, accepted = {f"r{i}": [] for i in range(len(PROMPTS))}, {}, {}
        for i in range(6):
            engine.submit(f"r{i}", engine.tokenizer.encode(PROMPTS[i]), params[i])
        steps, chained = 0, False
        while engine.has_work():
            steps += 1
            chained |= engine.inflight is not None
            if steps == 4:  # mid-chain: one more request, one cancelled
                engine.submit("r6", engine.tokenizer.encode(PROMPTS[6]), params[6])
                assert engine.cancel("r4")
            for ev in engine.step():
                out[ev.rid] += ev.token_ids
                if ev.finished:
                    ends[ev.rid] = ev.finish_reason
                    if k is not None and ev.rid != "r4":  # a fixed K: the same drafts (the draft cache is right)
                        accepted[ev.rid] = (ev.stats.drafted, ev.stats.accepted)
        assert engine.inflight is None and not engine.active
        if pipeline:  # only steps launched while their predecessor was in flight are timed
            assert engine.policy.step_seconds
            assert chained or k  # n-gram steps that draft (fixed K > 0) are never chained
        outputs.append((out, ends, accepted))
    (plain, plain_ends, plain_accepted), (piped, piped_ends, piped_accepted) = outputs
    assert piped_accepted == plain_accepted
    assert plain_ends == piped_ends and plain_ends["r4"] == "cancelled" and len(plain_ends) == 7
    short, long = sorted([plain.pop("r4"), piped.pop("r4")], key=len)  # adaptive K: cancelled after more or
    assert long[:len(short)] == short  # fewer tokens, the same ones
    assert piped == plain


def test_request_admitted_without_drafting_catches_the_draft_cache_up():
    """A request admitted with speculation off skips the draft model's prefill; when it starts drafting, the
    catch-up prefill leaves the draft cache as if it had been fed all along: the same drafts get accepted."""
    target_dir, draft_dir = EMBEDDED / "npc-target", EMBEDDED / "npc-draft"
    params = SamplingParams(temperature=0, max_tokens=30)
    runs = []
    for first_k in (3, 0):
        engine = make_engine(target_dir, "model", draft_dir, fixed_k=first_k)
        engine.submit("a", engine.tokenizer.encode(PROMPTS[0]), params)
        tokens = [t for ev in engine.step() for t in ev.token_ids]  # admission, prefill, first token
        r = engine.active["a"]
        assert r.draft_valid == (len(r.prompt) if first_k else 0)
        engine.policy.fixed_k = r.k = 3
        while engine.has_work():
            for ev in engine.step():
                tokens += ev.token_ids
                stats = ev.stats
        runs.append((tokens, stats.drafted, stats.accepted))
    assert runs[0] == runs[1] and runs[0][2] > 0


def test_open_prompt_fed_without_drafting_catches_the_draft_cache_up():
    """An open prompt admitted with speculation off is prefilled into the target only; when a later prefill feeds the
    draft model (another request drafts), the draft cache first catches up on what the target got."""

    engine = make_engine(EMBEDDED / "npc-target", "model", EMBEDDED / "npc-draft", fixed_k=0)
    tok, params = engine.tokenizer, SamplingParams(temperature=0, max_tokens=5)
    full = tok.encode("<|persona|>I forge swords for the town guard and I never lie about steel.<|eot|><|player|>Which "
                      "blade would you carry into the northern woods at night?<|eot|><|npc|>")
    engine.submit("a", full[:40], params, complete=False)
    engine.step()
    a = engine.active["a"]
    assert a.fed >= 32 and a.draft_valid == 0
    engine.policy.fixed_k = 3
    engine.submit("b", tok.encode("<|player|>Hi<|eot|><|npc|>"), params)  # drafts: its prefill feeds the draft model
    engine.update_prompt("a", full, complete=True)
    engine.step()
    assert a.draft_valid == len(full)
    draft = engine.drafter.model
    fresh = KVCache(draft.args, 1, 1024, "cpu", torch.float32)
    with torch.no_grad():
        draft(torch.tensor([full]), torch.arange(len(full))[None], fresh, torch.tensor([0]), 1024, logits=False)
    cached = engine.drafter.cache.k[:, a.slot, :, :len(full)]
    assert (cached - fresh.k[:, 0, :, :len(full)]).abs().max() <= 1e-4


def test_choose_k_follows_acceptance_and_cost():
    def linear(per_token):
        return lambda k: 1.0 + per_token * k

    assert choose_k(0.9, linear(0.06)) > choose_k(0.5, linear(0.06)) >= 1
    assert choose_k(0.1, linear(0.55)) == 0  # speculation does not pay: switched off
    assert choose_k(0.8, lambda k: 1.0) == 16
    # only draft lengths with a graph are picked: 5 would be best here, 4 and 6 are what there is
    assert choose_k(0.8, lambda k: 1.0 if k == 0 else 1.0 + 0.2 * abs(k - 5) + 0.01 * k) in (4, 6)
    assert all(choose_k(a / 10, linear(0.05)) in (0, *DRAFT_LENGTHS) for a in range(10))
    # host overhead measured on every speculative step (not in a forward-only cost model) turns it off
    assert choose_k(0.5, lambda k: 1.0 if k == 0 else 1.6 + 0.1 * k) == 0


def test_policy_measures_the_lengths_beside_its_choice_again():
    """Every EXPLORE_EVERY-th drafting step takes the next length up, then the next down, and a step time measured
    more than STALE_STEPS steps ago is replaced: one slow measurement of K = 4 (the machine was busy then) no longer
    keeps the policy at K = 3 for good."""
    from types import SimpleNamespace

    policy = DraftPolicy(True, 0.8, None, Calibration(), lengths=(2, 3, 4))
    true_cost = {0: 1.0, 2: 1.25, 3: 1.3, 4: 1.35}
    for k in (0, 2, 3):
        policy.record_step_time(1, k, true_cost[k])
    policy.record_step_time(1, 4, 3.0)  # once, on a busy machine
    r = SimpleNamespace(k=3, acceptance=Acceptance.prior(0.8), off_steps=0, probe_wait=PROBE_FIRST, ids=[],
                        draft_valid=0)
    ks = []
    for _ in range(4 * EXPLORE_EVERY):
        policy.record_step_time(1, r.k, true_cost[r.k])
        policy.update(r, r.k, r.k, policy.step_cost_fn(1))  # every draft accepted: the longest K pays most
        ks.append(r.k)
    assert ks[:EXPLORE_EVERY - 1] == [3] * (EXPLORE_EVERY - 1) and ks[EXPLORE_EVERY - 1] == 4  # explored up
    assert ks[-EXPLORE_EVERY:].count(4) >= EXPLORE_EVERY - 1, ks  # K = 4 measured again, and chosen since
    assert policy.step_seconds[(1, 4)] == pytest.approx(1.35)  # the busy measurement replaced, not averaged in


def test_policy_on_the_cpu_chooses_by_a_line_fitted_to_noisy_step_times():
    """fit_line (the CPU): every step time varies by -40 % to +60 % around a cost that grows slowly with K; the line
    fitted to all drafted steps finds the best length (K = 6 at acceptance 0.75) where single measurements of the
    lengths beside the chosen one kept the per-K table wandering among 2 to 4."""
    import random
    from types import SimpleNamespace

    random.seed(0)
    true_cost = {0: 1.0, 2: 1.2, 3: 1.25, 4: 1.3, 6: 1.4}
    policy = DraftPolicy(True, 0.8, None, Calibration(), lengths=(2, 3, 4, 6), fit_line=True)
    policy.record_step_time(1, 0, 1.0)
    r = SimpleNamespace(k=3, acceptance=Acceptance.prior(0.8), off_steps=0, probe_wait=PROBE_FIRST, ids=[],
                        draft_valid=0)
    ks = []
    for _ in range(8 * EXPLORE_EVERY):
        policy.record_step_time(1, r.k, true_cost[r.k] * random.uniform(0.6, 1.6))
        policy.update(r, 3, 4, policy.step_cost_fn(1))  # 3 of 4 drafts accepted each step
        ks.append(r.k)
    assert ks[-4 * EXPLORE_EVERY:].count(6) >= 4 * EXPLORE_EVERY - 4, ks
    base, per_token = policy.lines[1].fit()
    assert 1.0 < base + 6 * per_token < 1.8 and per_token >= 0


def test_policy_on_the_cpu_prices_lengths_by_the_target_curve_and_their_own_steps():
    """Step times as the float32 export with head T gave them (the target's forward jumps between 5 and 7 tokens, then
    flattens): a length measured lately costs what it measured, whatever the line through all lengths says; one not
    measured costs the calibrated forward over its tokens plus the line fitted to what that forward leaves of each
    step; the choice is as good as the best measured length; and no length costs more than a longer one."""
    curve = Calibration(curve=((1, 0.0254), (5, 0.038), (7, 0.0417), (9, 0.0469), (13, 0.0469), (17, 0.0505)))
    assert curve.verify_seconds(1) == 0.0254 and curve.verify_seconds(6) == pytest.approx(0.03985)
    assert curve.verify_seconds(21) == pytest.approx(0.0541)  # past the end: the last slope
    measured = {3: 0.0442, 4: 0.0456, 6: 0.0527, 8: 0.0587, 12: 0.059, 16: 0.0746}
    policy = DraftPolicy(True, 0.8, None, curve, lengths=(1, 2, 3, 4, 6, 8, 12, 16), fit_line=True)
    policy.record_step_time(1, 0, 0.037)
    for k in [4, 4, 3, 8, 4, 8, 12, 4, 6, 8, 4, 12, 4, 8, 16, 4] * 6:
        policy.record_step_time(1, k, measured[k])
    cost = policy.step_cost_fn(1)
    assert cost(4) == pytest.approx(0.0456, rel=0.01) and cost(8) == pytest.approx(0.0587, rel=0.01)
    base, per_token = policy.lines[1].fit()
    assert cost(1) == pytest.approx(curve.verify_seconds(2) + base + per_token)  # never measured
    rate = {k: expected_tokens(0.757, k) / t for k, t in measured.items()}
    assert rate[choose_k(0.757, cost, policy.lengths)] > 0.98 * max(rate.values())
    for _ in range(6):  # a slow stretch of K = 3 steps: it never costs more than K = 4 for it
        policy.record_step_time(1, 3, 0.06)
    cost = policy.step_cost_fn(1)
    assert cost(3) == cost(4) < 0.06 and all(cost(a) <= cost(b) for a, b in zip(policy.lengths, policy.lengths[1:]))


def test_engine_switches_speculation_off_when_it_does_not_pay(tiny_pair_dirs):
    """A random draft is almost never accepted: after a few steps the engine stops drafting, and
    the measured step times it decided on are recorded."""
    target_dir, draft_dir = tiny_pair_dirs
    engine = make_engine(target_dir, "model", draft_dir)
    # drafts cost a tenth of a step: speculation goes off because acceptance falls, not because this machine's
    # load made a draft step look slow after one or two drafts (then too few were tried to move the acceptance)
    engine.policy.step_cost_fn = lambda batch: lambda k: 1.0 + 0.1 * k
    engine.submit("a", engine.tokenizer.encode(PROMPTS[0]), SamplingParams(temperature=0, max_tokens=60))
    ks = []
    while engine.has_work():
        ks += [r.k for r in engine.active.values()]
        engine.step()
    assert ks[-1] == 0 or 0 in ks[-20:], ks
    assert engine.policy.step_seconds
    # the engine remembers: the next request starts from the low acceptance seen, not the drafter's prior
    assert engine.policy.acceptance.alpha < engine.drafter.prior_alpha / 2
    engine.submit("b", engine.tokenizer.encode(PROMPTS[1]), SamplingParams(temperature=0, max_tokens=4))
    engine.step()
    assert engine.active["b"].acceptance.alpha == engine.policy.acceptance.alpha


def test_speculation_switched_off_engine_wide_is_probed_again(tiny_pair_dirs):
    """With the engine-wide acceptance low, new requests start without drafting; one in PROBE_ADMISSIONS
    drafts anyway, so a drafter that agrees (here the target itself) turns speculation back on."""
    target_dir, _ = tiny_pair_dirs
    engine = make_engine(target_dir, "model", target_dir)
    engine.policy.acceptance = Acceptance(0.2, 2.0)
    # drafts cost a tenth of a step: whether speculation pays follows acceptance, not this machine's load
    engine.policy.step_cost_fn = lambda batch: lambda k: 1.0 + 0.1 * k
    drafted = []
    for i in range(2 * PROBE_ADMISSIONS):
        list(engine.generate(engine.tokenizer.encode(PROMPTS[i % len(PROMPTS)]),
                             SamplingParams(temperature=0, max_tokens=12), rid=f"r{i}"))
        drafted.append(engine.last_stats.drafted)
    assert drafted[0] == 0 and drafted[PROBE_ADMISSIONS - 1] > 0  # the 16th request probed
    assert engine.policy.acceptance.alpha > 0.5 and drafted[-1] > 0  # and speculation stayed on


def test_a_request_admitted_without_drafting_probes_only_with_little_to_catch_up(tiny_pair_dirs):
    """After PROBE_AFTER steps off, a request probes K = 1 again, unless its drafter would first have to catch up on
    more than PROBE_CATCH_UP_MAX positions (its whole prompt, when it was admitted without drafting); a host
    drafter (n-gram) has nothing to catch up on and probes."""
    target_dir, draft_dir = tiny_pair_dirs
    long_prompt = " ".join(PROMPTS) * 3
    for drafter, probes in (("model", False), ("ngram", True)):
        engine = make_engine(target_dir, drafter, draft_dir)
        engine.policy.acceptance = Acceptance(0.0, 100.0)  # admitted with K = 0 (the probe admission is far off)
        engine.submit("a", engine.tokenizer.encode(long_prompt), SamplingParams(temperature=0, max_tokens=80))
        ks = []
        while engine.has_work():
            ks += [r.k for r in engine.active.values()]
            engine.step()
        assert len(engine.tokenizer.encode(long_prompt)) > PROBE_CATCH_UP_MAX and len(ks) > PROBE_AFTER + 1
        assert (1 in ks) == probes, (drafter, ks)


def test_a_request_switched_off_mid_line_probes_after_waits_that_double(tiny_pair_dirs):
    """A request that drafted and was switched off by its acceptance probes K = 1 after PROBE_FIRST steps off, then
    after twice as many each time, up to PROBE_AFTER."""
    target_dir, draft_dir = tiny_pair_dirs
    engine = make_engine(target_dir, "model", draft_dir)
    engine.policy.step_cost_fn = lambda batch: lambda k: 1.0 + 0.1 * k  # whether it drafts follows acceptance
    engine.submit("a", engine.tokenizer.encode(PROMPTS[0]), SamplingParams(temperature=0, max_tokens=150))
    ks = []
    while engine.has_work():
        ks += [r.k for r in engine.active.values()]
        engine.step()
    runs = "".join("0" if k == 0 else "k" for k in ks).strip("0").split("k")
    waits = [len(run) for run in runs if run]
    assert waits[:3] == [PROBE_FIRST, 2 * PROBE_FIRST, 4 * PROBE_FIRST] and PROBE_FIRST * 4 == PROBE_AFTER, ks
    assert set(waits[3:]) <= {PROBE_AFTER}, ks


def test_draft_cache_catches_up_after_steps_without_drafting(tiny_pair_dirs):
    """Steps with speculation off leave the draft model's cache behind; the next drafting step feeds
    the missing tokens first, so the draft cache again equals a fresh prefill."""
    target_dir, draft_dir = tiny_pair_dirs
    engine = make_engine(target_dir, "model", draft_dir, fixed_k=0)
    engine.submit("a", engine.tokenizer.encode(PROMPTS[0]), SamplingParams(temperature=1.0, seed=5, max_tokens=200))
    for _ in range(5):  # plain decoding: nothing reaches the draft model
        engine.step()
    req = engine.active["a"]
    engine.policy.fixed_k = req.k = 3
    engine.step()
    n = len(req.ids)
    assert req.draft_valid == n - 2
    fresh, fresh_slot = prefilled_reference(target_dir, draft_dir, req.ids)
    ours, theirs = engine.drafter.cache.k[:, req.slot, :, :n - 2], fresh.drafter.cache.k[:, fresh_slot, :, :n - 2]
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_engines_sharing_a_target_each_draft_from_their_own_feature_store(tiny_pair_dirs):
    """Two heads on one target, one on the last layer's output and one on both layers', each in its own engine,
    taking turns line by line (as a benchmark runs them) beside a plain engine: every line is the plain one."""
    target_dir, _ = tiny_pair_dirs
    params = SamplingParams(temperature=0, max_tokens=16)
    target, tok = load_model(target_dir), Tokenizer.from_dir(target_dir)
    plain = run_batch(make_engine(target_dir, "none"), PROMPTS[:3], params)
    engines = [Engine(target, HeadDrafter(random_head(target, feature_layers=layers), target, 3, 256, "cpu",
                                          torch.float32), tok, max_batch=2, max_seq=256, fixed_k=3)
               for layers in ((), (0, 1))]
    engines.insert(1, Engine(target, NoDrafter(), tok, max_batch=2, max_seq=256))
    for i, prompt in enumerate(PROMPTS[:3]):
        for engine in engines:
            assert run_batch(engine, [prompt], params) == [plain[i]]
