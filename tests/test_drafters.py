"""Drafters on their own: n-gram lookup, the feature head's cache and drafts against an uncached run, the registry."""
import pytest
import torch

from npc_engine.drafters import HeadDrafter, ModelDrafter, NgramDrafter, NoDrafter
from npc_engine.engine import Engine
from npc_engine.engine.slots import prefix_ref, prefix_tensor
from npc_engine.head import FeatureHead
from npc_engine.loading import load_model
from npc_engine.model import Transformer
from npc_engine.sampling import SamplingParams
from npc_engine.tokenizer import Tokenizer
from test_speculative import PROMPTS, make_engine, random_head, run_batch


def test_ngram_lookup_finds_the_latest_earlier_occurrence():
    def scan(seq, k, max_n=3):
        for n in range(min(max_n, len(seq) - 1), 0, -1):
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start:start + n] == seq[-n:]:
                    return seq[start + n:start + n + k]
        return []

    drafter, g = NgramDrafter(2**20, "cpu"), torch.Generator().manual_seed(0)
    for vocab in (2, 5, 300, 2**20):  # large ids: byte patterns that also match across token boundaries
        for _ in range(300):
            seq = torch.randint(0, vocab, (int(torch.randint(1, 50, (1,), generator=g)),), generator=g).tolist()
            assert drafter.lookup(seq, 4) == scan(seq, 4), seq
    assert drafter.lookup([7, 1, 2, 3, 9, 1, 2, 3, 5, 1, 2, 3], 3) == [5, 1, 2]


def reference_head_drafts(target: Transformer, head: FeatureHead, ids: list[int], k: int) -> list[int]:
    """Greedy drafts of a feature head without any cache (the training eval's replay proposer)."""
    from npc_engine.train.eval import head_proposals

    with torch.no_grad():
        work = torch.tensor([ids + [0] * k])
        return head_proposals(target, head)(work, torch.tensor([len(ids)]), k)[0].tolist()


def test_uncached_head_proposals_batch_rows_of_different_lengths(tiny_pair_dirs):
    from npc_engine.train.eval import head_proposals

    target = load_model(tiny_pair_dirs[0])
    head = random_head(target, seed=2)
    rows = [[5, 9, 17, 3, 8, 21, 4], [7, 2, 30]]
    work = torch.zeros(2, 12, dtype=torch.long)
    for i, r in enumerate(rows):
        work[i, :len(r)] = torch.tensor(r)
    with torch.no_grad():
        batched = head_proposals(target, head)(work, torch.tensor([len(r) for r in rows]), 4).tolist()
    assert batched == [reference_head_drafts(target, head, r, 4) for r in rows]


@pytest.mark.parametrize("shared_prefix,temperature,pipeline", [(False, 1.0, False), (True, 1.0, False),
                                                                (True, 0.0, False), (False, 0.0, True)])
def test_head_drafts_and_cache_match_an_uncached_run(tiny_pair_dirs, shared_prefix, temperature, pipeline):
    """After prefill (from a shared persona prefix or not) and steps whose drafts were partly rejected (sampled,
    greedy, pipelined greedy), the feature head's next drafts are those of an uncached run on the accepted tokens,
    whatever they accepted, and its cache equals a fresh prefill's: the target's stored features, the head's token
    store and the refeeds after rollbacks (each only as wide as the drafts its step accepted) are right."""
    target_dir, _ = tiny_pair_dirs
    engine = make_engine(target_dir, "head", fixed_k=4, pipeline=pipeline)
    persona = engine.tokenizer.encode(PROMPTS[0])
    prefix_len = len(persona) - 3 if shared_prefix else 0
    for rid in ("a", "b"):  # the second request reads the prefix the first computed
        params = SamplingParams(temperature=temperature, seed=5, max_tokens=200)
        engine.submit(rid, persona, params, prefix_len=prefix_len)
    for _ in range(5):
        engine.step()
    if engine.inflight is not None:  # the host's tokens are one step behind the device: read that step first
        engine.apply(engine.pipeline.settle(engine.inflight), engine.inflight.k)
        engine.pipeline.inflight = None
    r = engine.active["b"]
    assert r.stats.drafted > 0 and (r.shared is not None) == shared_prefix
    assert r.stats.cached_prefix_tokens == prefix_len
    drafter = engine.drafter
    drafter.copies = False  # the head's own chain (copies: test_a_head_copies_...)
    n, stale = len(r.ids), engine.prefiller.stale([r])  # re-feeds only what the engine counts as guessed
    assert stale <= 4 < drafter.guessed
    with torch.no_grad():
        got = drafter.greedy_drafts(torch.tensor([r.ids[-2:]]), torch.tensor([n]), torch.tensor([r.slot]), 4,
                                    engine.max_seq, prefix_tensor([prefix_ref(r)], "cpu"), stale)
    assert got[0].tolist() == reference_head_drafts(engine.target, drafter.model, r.ids, 4)
    fresh = make_engine(target_dir, "head", fixed_k=4)
    fresh.drafter.model = drafter.model
    fresh_slot = fresh.slots.free[-1]
    fresh.submit("c", r.ids, SamplingParams(max_tokens=1))
    fresh.step()  # prefills every token: the head's cache as if only these tokens were fed
    ours = drafter.cache.k[0, r.slot, :, prefix_len:n]
    assert torch.allclose(ours, fresh.drafter.cache.k[0, fresh_slot, :, prefix_len:n], atol=1e-5)


def copied_after(drafter: HeadDrafter, first: int, length: int, prefix=None, width: int = 4) -> list[int]:
    tokens, count = drafter.copy_after(torch.tensor([first]), torch.tensor([length]), torch.tensor([1]), prefix, 64,
                                       width)
    return tokens[0, :count[0]].tolist()


def test_a_head_copies_the_continuation_of_its_first_draft_from_earlier_in_the_line(tiny_pair_dirs):
    """copy_after: the latest earlier place where the last token was followed by the head's first draft, one that
    also matches the token before the last first; what followed it, at most `width` and only tokens the line holds
    (not the stale store past its length, not the last token's own place); a persona prefix read from its slot."""
    target = load_model(tiny_pair_dirs[0])
    drafter = HeadDrafter(random_head(target), target, 3, 64, "cpu", torch.float32)
    store = drafter.tokens
    line = [9, 1, 2, 3, 4, 7, 1, 2, 5, 6, 8, 2, 1]
    store[1, :len(line)], store[1, len(line):len(line) + 3] = torch.tensor(line), torch.tensor([1, 7, 7])
    assert copied_after(drafter, 2, len(line)) == [5, 6, 8, 2]  # the later of two (1, 2)
    assert copied_after(drafter, 2, len(line), width=2) == [5, 6]
    assert copied_after(drafter, 7, len(line)) == []  # (1, 7) only in the stale store
    assert copied_after(drafter, 4, len(line)) == []
    line = [5, 1, 2, 8, 3, 1, 2, 9, 4, 5, 1]
    store[1, :len(line)] = torch.tensor(line)
    assert copied_after(drafter, 2, len(line)) == [8, 3, 1, 2]  # (5, 1, 2) before the later (1, 2)
    line = [4, 1, 2, 6, 1]
    store[1, :len(line)] = torch.tensor(line)
    assert copied_after(drafter, 2, len(line)) == [6, 1]  # up to the last token
    store[0, :3], store[1, :6] = torch.tensor([3, 1, 2]), torch.tensor([0, 0, 0, 6, 5, 1])
    assert copied_after(drafter, 2, 6, prefix=torch.tensor([[0, 3]])) == [6, 5, 1]
    assert copied_after(drafter, 2, 6) == []


def test_head_drafts_copy_where_the_first_draft_is_found_and_the_store_holds_them(tiny_pair_dirs):
    """draft(): rows whose first draft is found earlier take the copy as their later drafts, the others the head's
    chain (as with copies off); the token store holds every draft for the next refeed."""
    target = load_model(tiny_pair_dirs[0])
    drafter = HeadDrafter(random_head(target, seed=3), target, 3, 64, "cpu", torch.float32)
    line = [9, 1, 2, 3, 4, 7, 1]
    drafter.tokens[:2, :len(line)] = torch.tensor(line)
    first = torch.tensor([2, 5])  # row 0: (1, 2) follows earlier; row 1: (1, 5) does not

    def pick(i, logits):
        return first if i == 0 else logits.argmax(-1)

    args = torch.tensor([1, 1]), torch.tensor([len(line)] * 2), torch.tensor([0, 1]), 4, 64, None, pick
    with torch.no_grad():
        drafts, copied = drafter.draft(*args)
        drafter.copies = False
        chain, none = drafter.draft(*args)
    drafts, chain = torch.stack(drafts, 1).tolist(), torch.stack(chain, 1).tolist()
    assert none is None and copied.tolist() == [[True] * 3, [False] * 3]
    assert drafts == [[2, 3, 4, 7], chain[1]] and chain[0][1:] != [3, 4, 7]
    assert drafter.tokens[0, len(line):len(line) + 4].tolist() == chain[0]  # the last draft() wrote its drafts


def test_greedy_lines_are_unchanged_where_the_head_copies(tiny_pair_dirs):
    """A head drafting over the few ids of the target's lines finds its first draft earlier in the line often, so
    many steps verify copies: the lines equal plain decoding's at batch sizes 1, 3 and 8."""
    target_dir, _ = tiny_pair_dirs
    params = SamplingParams(temperature=0, max_tokens=24)
    plain = run_batch(make_engine(target_dir, "none"), PROMPTS, params)
    target, tokenizer = load_model(target_dir), Tokenizer.from_dir(target_dir)
    ids, found = torch.tensor(sorted({*sum(plain, [])})), []
    for batch in (1, 3, 8):
        drafter = HeadDrafter(random_head(target, draft_ids=ids), target, 9, 1024, "cpu", torch.float32)

        def spy(*args, copy_after=drafter.copy_after):
            tokens, count = copy_after(*args)
            found.append(count)
            return tokens, count

        drafter.copy_after = spy
        engine = Engine(target, drafter, tokenizer, max_batch=8, fixed_k=4)
        got = []
        for start in range(0, len(PROMPTS), batch):
            got += run_batch(engine, PROMPTS[start:start + batch], params)
        assert got == plain, f"batch {batch}"
        assert int((torch.cat(found) > 0).sum()) >= 5, "too few copies to test them"
        found.clear()


def test_head_catches_up_after_steps_without_drafting(tiny_pair_dirs):
    """Drafting, then more plain steps than a refeed covers, then drafting again: the catch-up re-feeds the
    positions whose head entries rest on its own guesses and the token before the last, so the head's cache
    again equals a fresh prefill's."""
    target_dir, _ = tiny_pair_dirs
    engine = make_engine(target_dir, "head", fixed_k=4)
    engine.submit("a", engine.tokenizer.encode(PROMPTS[2]), SamplingParams(temperature=1.0, seed=7, max_tokens=200))
    for _ in range(4):
        engine.step()
    r = engine.active["a"]
    assert 0 < r.stats.accepted < r.stats.drafted
    engine.policy.fixed_k = r.k = 0
    for _ in range(25):
        engine.step()
    engine.policy.fixed_k = r.k = 3
    before = len(r.ids)
    engine.step()  # the catch-up, then a drafting step: exact below `before`, where this step's drafts begin
    fresh = make_engine(target_dir, "head", fixed_k=4)
    fresh.drafter.model = engine.drafter.model
    fresh_slot = fresh.slots.free[-1]
    fresh.submit("c", r.ids, SamplingParams(max_tokens=1))
    fresh.step()
    ours, theirs = engine.drafter.cache.k[0, r.slot, :, :before], fresh.drafter.cache.k[0, fresh_slot, :, :before]
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().amax(dim=(0, 2)).nonzero().flatten()


def test_the_registry_makes_each_drafter_and_each_states_every_capability(tiny_pair_dirs, tmp_path):
    """make_drafter names the kinds; the engine reads only the Drafter protocol's attributes, so every drafter has
    all of them (a missing one would surface only on the code path that reads it)."""
    from npc_engine.drafters import Drafter, draft_spec, make_drafter
    from npc_engine.head import save_head

    target_dir, draft_dir = tiny_pair_dirs
    target = load_model(target_dir)
    head_dir = tmp_path / "head"
    save_head(random_head(target), head_dir, target_name=target_dir.name, dtype=torch.float32)

    def make(spec: str):
        return make_drafter(spec, target, load_model, True, 2, 64, "cpu", torch.float32)

    kinds = {"none": NoDrafter, "ngram": NgramDrafter, str(head_dir): HeadDrafter, str(draft_dir): ModelDrafter}
    for spec, kind in kinds.items():
        drafter = make(spec)
        assert type(drafter) is kind
        assert all(hasattr(drafter, name) for name in Drafter.__annotations__), kind
        assert drafter.drafts == (kind is not NoDrafter) and drafter.host_drafts == (kind is NgramDrafter)
        assert (drafter.transformer is not None) == (kind is ModelDrafter)
        assert drafter.uses_features == (kind is HeadDrafter)
    assert draft_spec(target_dir, "auto") == "ngram" and draft_spec(target_dir, "none") == "none"


def test_reduced_vocabulary_head_saves_loads_and_drafts_only_its_ids(tiny_pair_dirs, tmp_path):
    """A head with draft_ids round-trips through its folder; its logits are the full head's at those ids (the
    target's output-head rows) and DRAFT_OFF elsewhere; a folder whose ids fall outside the vocabulary is refused."""
    from safetensors.torch import load_file, save_file

    from npc_engine.head import DRAFT_OFF, head_logits, load_head, save_head
    from npc_engine.loading import CheckpointError

    target = load_model(tiny_pair_dirs[0])
    ids = torch.tensor([5, 0, 17, 300])
    head = random_head(target, draft_ids=ids)
    save_head(head, tmp_path / "head", target_name="t", dtype=torch.float32)
    loaded = load_head(tmp_path / "head", target, "cpu", torch.float32)
    assert loaded.draft_ids.tolist() == ids.tolist()
    features = torch.randn(2, 3, target.args.dim)
    got, full = loaded.logits(target, features), head_logits(target, features)
    torch.testing.assert_close(got[..., ids], full[..., ids])
    off = torch.ones(target.args.vocab_size, dtype=torch.bool)
    off[ids] = False
    assert (got[..., off] == DRAFT_OFF).all()
    weights = tmp_path / "head" / "model.safetensors"
    save_file({**load_file(weights), "draft_ids": torch.tensor([1, target.args.vocab_size])}, weights)
    with pytest.raises(CheckpointError, match="draft_ids"):
        load_head(tmp_path / "head", target, "cpu", torch.float32)
