"""Persona prefixes shared by reference: a prefix's KV is computed once into a prefix slot of the caches and
read in place by every conversation with that persona; entries are reference-counted and LRU-evicted
among the unreferenced ones; without a free prefix slot a request computes its prefix in its own slot."""
import pytest

from npc_engine.model import KVCache
from npc_engine.sampling import SamplingParams
from test_speculative import make_engine

PERSONAS = ["<|persona|>I forge swords for the town guard and I never lie about steel.<|eot|>",
            "<|persona|>I sing songs of old heroes and dragons in the tavern.<|eot|>",
            "<|persona|>I keep the gate and I trust no merchant from the south.<|eot|>",
            "<|persona|>The captain of the guard, tired and honest.<|eot|>"]
LINES = ["<|player|>What do you do?<|eot|><|npc|>", "<|player|>Hi<|eot|><|npc|>",
         "<|player|>Which blade would you carry into the northern woods at night, smith?<|eot|><|npc|>",
         "<|player|>Sing!<|eot|><|npc|>"]
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def conversation(tok, persona: str, line: str = LINES[0]) -> tuple[list[int], int]:
    prefix = tok.encode(persona)
    return prefix + tok.encode(line), len(prefix)


def run(engine, prompts: list[list[int]], params: SamplingParams, prefix_len: int = 0):
    """Submits every prompt at once and steps to the end: (tokens, final stats) per prompt."""
    out, stats = {f"r{i}": [] for i in range(len(prompts))}, {}
    for i, ids in enumerate(prompts):
        engine.submit(f"r{i}", ids, params, prefix_len=prefix_len)
    while engine.has_work():
        for ev in engine.step():
            out[ev.rid] += ev.token_ids
            if ev.finished:
                stats[ev.rid] = ev.stats
    return [out[f"r{i}"] for i in range(len(prompts))], [stats[f"r{i}"] for i in range(len(prompts))]


def drain(engine, rid: str) -> list[int]:
    tokens = []
    while engine.has_work():
        tokens += [t for ev in engine.step() if ev.rid == rid for t in ev.token_ids]
    return tokens


@pytest.mark.parametrize("drafter,temperature", [("none", 0), ("ngram", 0), ("model", 0), ("model", 0.8)])
def test_conversations_sharing_a_persona_equal_unshared_ones_and_compute_it_once(tiny_pair_dirs, drafter, temperature):
    target_dir, draft_dir = tiny_pair_dirs
    params = SamplingParams(temperature=temperature, seed=7, max_tokens=16)
    plain = make_engine(target_dir, drafter, draft_dir, fixed_k=4)
    engine = make_engine(target_dir, drafter, draft_dir, fixed_k=4)
    prompts = [conversation(engine.tokenizer, PERSONAS[0], line)[0] for line in LINES]
    P = conversation(engine.tokenizer, PERSONAS[0])[1]
    expected, plain_stats = run(plain, prompts, params)
    assert any(expected)
    for wave in range(2):  # the first wave computes the persona once for all four, the second finds it cached
        got, stats = run(engine, prompts, params, prefix_len=P)
        assert got == expected, f"wave {wave}"
        new_tokens = sum(len(p) - P for p in prompts)
        assert sum(s.prefill_tokens for s in stats) == new_tokens + (P if wave == 0 else 0)
        assert sum(s.cached_prefix_tokens for s in stats) == P * (len(prompts) - (wave == 0))
        # the drafter saw the same context: the same drafts were proposed and accepted
        assert [(s.drafted, s.accepted) for s in stats] == [(s.drafted, s.accepted) for s in plain_stats]
        (entry,) = engine.prefix_cache.entries.values()
        assert entry.refs == 0 and entry.slot > engine.max_batch
    assert engine.prefix_cache.hits == 2 * len(prompts) - 1


def test_the_draft_model_reads_the_shared_prefix_too(tiny_pair_dirs):
    """The target drafting for itself accepts every draft only if the draft cache's prefix slot holds the persona."""
    target_dir, _ = tiny_pair_dirs
    engine = make_engine(target_dir, "model", target_dir, fixed_k=4)
    prompts = [conversation(engine.tokenizer, PERSONAS[1], line)[0] for line in LINES]
    P = conversation(engine.tokenizer, PERSONAS[1])[1]
    for _ in range(2):
        _, stats = run(engine, prompts, GREEDY, prefix_len=P)
        assert all(s.accepted == s.drafted > 0 for s in stats)
    assert engine.prefix_cache.hits == 2 * len(prompts) - 1


def test_references_are_released_when_requests_finish_or_are_cancelled(tiny_pair_dirs):
    target_dir, _ = tiny_pair_dirs
    engine = make_engine(target_dir, "none")
    P = conversation(engine.tokenizer, PERSONAS[0])[1]
    for i, line in enumerate(LINES[:3]):
        engine.submit(f"r{i}", conversation(engine.tokenizer, PERSONAS[0], line)[0],
                      SamplingParams(temperature=0, max_tokens=40), prefix_len=P)
    engine.step()
    (entry,) = engine.prefix_cache.entries.values()
    assert entry.refs == 3 and all(r.shared is entry for r in engine.active.values())
    assert engine.cancel("r0")
    engine.step()
    assert entry.refs == 2 and "r0" not in engine.active
    while engine.has_work():
        engine.step()
        assert entry.refs == sum(r.shared is entry for r in engine.active.values())
    assert entry.refs == 0 and not engine.active


def test_eviction_takes_the_least_recent_unreferenced_prefix_and_falls_back_when_none_is_free(tiny_pair_dirs):
    target_dir, _ = tiny_pair_dirs
    plain = make_engine(target_dir, "none")
    slot_mb = KVCache.slot_bytes(plain.target.args, plain.max_seq, plain.dtype) / 2**20
    engine = make_engine(target_dir, "none", prefix_cache_mb=2.5 * slot_mb)
    cache, tok = engine.prefix_cache, engine.tokenizer
    assert len(cache.free) == 2 and engine.cache.n_slots == engine.max_batch + 3
    (a, pa), (b, pb), (c, pc), (d, pd) = [conversation(tok, persona) for persona in PERSONAS]
    key = {persona: tuple(tok.encode(persona)) for persona in PERSONAS}

    def answer(ids, prefix_len):
        (tokens,), (stats,) = run(engine, [ids], GREEDY, prefix_len)
        assert tokens == run(plain, [ids], GREEDY)[0][0]
        return stats

    answer(a, pa)
    answer(b, pb)
    engine.submit("holds-a", a, GREEDY, prefix_len=pa, complete=False)  # an open line keeps A referenced
    engine.step()
    answer(b, pb)  # B is now the most recent: A, the least recent, is referenced
    slot_b = cache.entries[key[PERSONAS[1]]].slot
    assert answer(c, pc).cached_prefix_tokens == 0
    assert list(cache.entries) == [key[PERSONAS[0]], key[PERSONAS[2]]]
    assert cache.entries[key[PERSONAS[2]]].slot == slot_b and cache.entries[key[PERSONAS[0]]].refs == 1

    engine.submit("holds-c", c, GREEDY, prefix_len=pc, complete=False)
    engine.step()
    stats = answer(d, pd)  # both prefix slots referenced: D is computed in its own slot
    assert stats.cached_prefix_tokens == 0 and stats.prefill_tokens == len(d)
    assert key[PERSONAS[3]] not in cache.entries
    for rid, ids in (("holds-a", a), ("holds-c", c)):
        engine.update_prompt(rid, ids, complete=True)
        assert drain(engine, rid) == run(plain, [ids], GREEDY)[0][0]
    assert all(e.refs == 0 for e in cache.entries.values())


def test_no_prefix_slots_computes_every_prefix_in_the_request_slot(tiny_pair_dirs):
    target_dir, draft_dir = tiny_pair_dirs
    engine = make_engine(target_dir, "model", draft_dir, fixed_k=3, prefix_cache_mb=0)
    assert engine.cache.n_slots == engine.drafter.cache.n_slots == engine.max_batch + 1
    prompts = [conversation(engine.tokenizer, PERSONAS[0], line)[0] for line in LINES]
    P = conversation(engine.tokenizer, PERSONAS[0])[1]
    got, stats = run(engine, prompts, GREEDY, prefix_len=P)
    assert got == run(make_engine(target_dir, "none"), prompts, GREEDY)[0]
    assert not engine.prefix_cache.entries and all(s.cached_prefix_tokens == 0 for s in stats)
    assert [s.prefill_tokens for s in stats] == [len(p) for p in prompts]


def test_streamed_prompt_changed_inside_the_shared_prefix_is_recomputed_in_its_own_slot(tiny_pair_dirs):
    """A change after the persona keeps the shared reference; a change inside it (or a prompt cut back into
    it) drops the reference, and the request computes its new prompt from the start in its own slot."""
    target_dir, draft_dir = tiny_pair_dirs
    engine = make_engine(target_dir, "model", draft_dir)
    tok = engine.tokenizer
    ids, P = conversation(tok, PERSONAS[0], LINES[2])
    run(engine, [ids], GREEDY, prefix_len=P)  # the persona is cached
    (entry,) = engine.prefix_cache.entries.values()

    engine.submit("a", ids[:-3], GREEDY, prefix_len=P, complete=False)
    engine.step()
    req = engine.active["a"]
    assert req.shared is entry and entry.refs == 1 and req.fed > P and req.stats.cached_prefix_tokens == P
    engine.update_prompt("a", ids[:P + 2] + tok.encode(" and the wolves"), complete=False)
    assert req.shared is entry and req.fed == P + 2
    final = tok.encode(PERSONAS[0].replace("steel", "bronze")) + tok.encode(LINES[2])
    assert next(i for i, (x, y) in enumerate(zip(final, ids)) if x != y) < P
    engine.update_prompt("a", final, complete=True)
    assert req.shared is None and entry.refs == 0 and req.fed == req.draft_valid == req.prefix_len == 0
    assert req.stats.cached_prefix_tokens == 0
    plain = make_engine(target_dir, "model", draft_dir)
    assert drain(engine, "a") == run(plain, [final], GREEDY)[0][0]

    engine.submit("b", ids, GREEDY, prefix_len=P, complete=False)
    engine.step()
    assert engine.active["b"].shared is entry
    engine.update_prompt("b", ids[:P - 3], complete=True)  # cut back inside the persona
    assert engine.active["b"].shared is None and entry.refs == 0
    assert drain(engine, "b") == run(plain, [ids[:P - 3]], GREEDY)[0][0]


def test_a_step_counts_the_prefixes_it_computes_against_its_prefill_budget(tiny_pair_dirs):
    """Two lines of personas not cached yet, a budget that holds both prefixes and one line's own tokens: the
    step computes both prefixes and one line; the other line's tokens wait for the next step (the service admitted
    both counting their prefixes, scheduler.PrefillBudget)."""
    target_dir, _ = tiny_pair_dirs
    tok = make_engine(target_dir, "none").tokenizer
    (a, pa), (b, pb) = conversation(tok, PERSONAS[0]), conversation(tok, PERSONAS[1], LINES[1])
    engine = make_engine(target_dir, "none", max_prefill_tokens=len(a) + len(b) - 1)
    engine.submit("a", a, GREEDY, prefix_len=pa)
    engine.submit("b", b, GREEDY, prefix_len=pb)
    assert [ev.rid for ev in engine.step() if ev.token_ids] == ["a"]
    assert sorted(ev.rid for ev in engine.step() if ev.token_ids) == ["a", "b"]
    assert engine.prefix_cached(a[:pa]) and engine.prefix_cached(b[:pb])


def test_a_cached_prefix_is_read_even_when_a_new_prefix_in_the_same_step_needs_its_slot(tiny_pair_dirs):
    """The service admits a line whose prefix is cached as if it were free: a new prefix admitted with it in one step
    must not evict it first."""
    target_dir, _ = tiny_pair_dirs
    plain = make_engine(target_dir, "none")
    slot_mb = KVCache.slot_bytes(plain.target.args, plain.max_seq, plain.dtype) / 2**20
    engine = make_engine(target_dir, "none", prefix_cache_mb=1.5 * slot_mb)  # one prefix slot
    (a, pa), (b, pb) = conversation(engine.tokenizer, PERSONAS[0]), conversation(engine.tokenizer, PERSONAS[1])
    run(engine, [a], GREEDY, pa)
    assert engine.prefix_cached(a[:pa]) and not engine.prefix_cached(b[:pb])
    engine.submit("b", b, GREEDY, prefix_len=pb)  # first: it asks for a prefix slot before a takes its reference
    engine.submit("a", a, GREEDY, prefix_len=pa)
    stats = {}
    while engine.has_work():
        stats |= {ev.rid: ev.stats for ev in engine.step() if ev.finished}
    assert stats["a"].cached_prefix_tokens == pa and stats["a"].prefill_tokens == len(a) - pa
    assert stats["b"].cached_prefix_tokens == 0 and stats["b"].prefill_tokens == len(b)  # in its own slot
