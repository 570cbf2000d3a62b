"""Prompts arriving in pieces (`submit(complete=False)` + `update_prompt`), and the first token coming
out of the prefill that feeds a prompt's last token."""
import pytest

from npc_engine.engine.prefill import PREFILL_CHUNK, STREAM_CHUNK
from npc_engine.sampling import SamplingParams
from test_speculative import make_engine

PERSONA = "<|persona|>I forge swords for the town guard and I never lie about steel.<|eot|>"
LINE = "<|player|>Tell me, smith, which blade would you carry into the northern woods at night?"
CLOSE = "<|eot|><|npc|>"


def one_shot(engine, ids, params):
    return list(engine.generate(ids, params, rid="one-shot"))


def drain(engine, rid):
    tokens = []
    while engine.has_work():
        for ev in engine.step():
            assert ev.rid == rid
            tokens += ev.token_ids
    return tokens


@pytest.mark.parametrize("drafter", ["none", "model"])
def test_prompt_in_pieces_gives_the_one_shot_line_and_prefills_while_it_arrives(tiny_pair_dirs, drafter):
    target_dir, draft_dir = tiny_pair_dirs
    engine = make_engine(target_dir, drafter, draft_dir)
    tok = engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=12)
    full = tok.encode(PERSONA + LINE + CLOSE)
    expected = one_shot(make_engine(target_dir, drafter, draft_dir), full, params)

    prefix_len = len(tok.encode(PERSONA))
    words = LINE.split(" ")
    engine.submit("a", tok.encode(PERSONA + words[0]), params, prefix_len=prefix_len, complete=False)
    assert engine.step() == []  # admitted and prefilled, nothing generated
    req = engine.active["a"]
    for i in range(2, len(words) + 1):
        ids = tok.encode(PERSONA + " ".join(words[:i]))
        engine.update_prompt("a", ids, complete=False)
        assert engine.step() == []
        # only whole chunks, the last token kept back
        assert req.fed <= len(ids) - 1 and (len(ids) - 1 - req.fed) < STREAM_CHUNK
    assert not engine.has_work()  # idle until the next piece: a service loop may sleep
    fed_before_final = req.fed
    assert fed_before_final > prefix_len  # the utterance was prefilled while it arrived
    engine.update_prompt("a", full, complete=True)
    first = engine.step()
    assert len(first) == 1 and len(first[0].token_ids) == 1  # the final chunk's prefill yields the first token
    assert len(full) - fed_before_final <= PREFILL_CHUNK  # the final piece: one forward
    assert first[0].token_ids + drain(engine, "a") == expected


def test_changed_tail_is_recomputed(tiny_pair_dirs):
    """A piece that changes already prefilled tokens (a retokenized word) rolls the prefill back to the
    first differing token; the line equals the one-shot line of the final prompt."""
    target_dir, _ = tiny_pair_dirs
    engine = make_engine(target_dir, "none")
    tok = engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=10)
    first_draft = tok.encode(PERSONA + LINE + " and the wolves and the")
    final = tok.encode(PERSONA + "<|player|>Never mind the woods; what do you sell?" + CLOSE)
    engine.submit("a", first_draft, params, complete=False)
    engine.step()
    assert engine.active["a"].fed >= STREAM_CHUNK
    engine.update_prompt("a", final, complete=True)
    assert drain(engine, "a") == one_shot(make_engine(target_dir, "none"), final, params)


def test_open_request_can_wait_for_a_slot_and_be_cancelled(tiny_pair_dirs):
    target_dir, _ = tiny_pair_dirs
    engine = make_engine(target_dir, "none")
    tok = engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=4)
    for i in range(engine.max_batch):
        engine.submit(f"busy{i}", tok.encode(PERSONA + LINE + CLOSE), SamplingParams(temperature=0, max_tokens=30))
    engine.submit("late", tok.encode(PERSONA + "<|player|>Hel"), params, complete=False)
    engine.step()
    assert "late" not in engine.active  # no slot yet: still waiting, and still open
    engine.update_prompt("late", tok.encode(PERSONA + "<|player|>Hello" + CLOSE), complete=True)
    engine.submit("open", tok.encode(PERSONA + "<|player|>I was"), params, complete=False)
    finished = set()
    while engine.has_work() and "late" not in finished:
        finished |= {ev.rid for ev in engine.step() if ev.finished}
    assert engine.cancel("open")
    assert any(ev.rid == "open" and ev.finish_reason == "cancelled" for ev in engine.step())


def test_prompt_cut_back_to_what_was_fed_still_answers(tiny_pair_dirs):
    """A completed prompt no longer than the fed part: its last token is fed again for the first token."""
    target_dir, _ = tiny_pair_dirs
    engine = make_engine(target_dir, "none")
    ids = engine.tokenizer.encode(PERSONA + LINE)
    params = SamplingParams(temperature=0, max_tokens=6)
    engine.submit("a", ids, params, complete=False)
    engine.step()
    fed = engine.active["a"].fed
    assert fed >= STREAM_CHUNK
    engine.update_prompt("a", ids[:fed], complete=True)
    assert drain(engine, "a") == one_shot(make_engine(target_dir, "none"), ids[:fed], params)


def test_no_work_while_open_requests_hold_every_slot(tiny_pair_dirs):
    target_dir, _ = tiny_pair_dirs
    engine = make_engine(target_dir, "none")
    ids = engine.tokenizer.encode(PERSONA)
    for i in range(engine.max_batch):
        engine.submit(f"open{i}", ids, SamplingParams(max_tokens=2), complete=False)
    engine.step()
    engine.submit("queued", ids, SamplingParams(max_tokens=2))
    assert not engine.has_work()  # the queued request waits for a slot; nothing can step
    engine.cancel("open0")
    assert engine.has_work()


def test_update_prompt_errors(tiny_pair_dirs):
    target_dir, _ = tiny_pair_dirs
    engine = make_engine(target_dir, "none")
    ids = engine.tokenizer.encode(PERSONA)
    with pytest.raises(KeyError, match="no open request 'x'"):
        engine.update_prompt("x", ids, complete=True)
    engine.submit("done", ids, SamplingParams(max_tokens=2))
    with pytest.raises(KeyError, match="no open request 'done'"):
        engine.update_prompt("done", ids, complete=True)
    engine.submit("open", ids, SamplingParams(max_tokens=2), complete=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.update_prompt("open", ids + [10**6], complete=True)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.update_prompt("open", [], complete=True)


def test_first_token_arrives_in_the_admitting_step(tiny_pair_dirs):
    target_dir, draft_dir = tiny_pair_dirs
    engine = make_engine(target_dir, "model", draft_dir)
    engine.submit("a", engine.tokenizer.encode(PERSONA + LINE + CLOSE),
                  SamplingParams(temperature=0.7, seed=3, max_tokens=5))
    events = engine.step()
    assert [len(ev.token_ids) for ev in events] == [1]
