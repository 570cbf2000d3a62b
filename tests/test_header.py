"""The line header: grammar masks allow exactly the valid headers, parsing, rollback, and speculation under the mask
stays lossless (greedy: masked plain decoding; sampled: the masked target distribution)."""
import random
import time
import tomllib
from pathlib import Path

import pytest
import torch

from npc_engine.drafters import HeadDrafter, ModelDrafter
from npc_engine.engine import Engine
from npc_engine.grammar import check_labels, format_header, header_grammar, parse_header, with_header
from npc_engine.header import HeaderCompiler, HeaderMatcher, StepMasks, bitmask_width, unpack_bitmask
from npc_engine.loading import load_model
from npc_engine.sampling import SamplingParams
from npc_engine.tokenizer import Tokenizer
from test_speculative import chi_square_p_value, conditionals, make_engine, random_head, tiny_vocab_pair

ROOT = Path(__file__).resolve().parent.parent
EMOTIONS = ["happy", "neutral", "surprised", "afraid", "hap"]  # "hap" is a prefix of "happy"
ACTIONS = ["bow", "count_coins", "show_wares", "rub_hands", "shrug"]
PERSONA_LISTS = [(d.get("emotions", []), d.get("actions", []))
                 for d in (tomllib.loads(f.read_text()) for f in sorted((ROOT / "personas").glob("*.toml")))]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(ROOT / "models" / "npc-target")


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return HeaderCompiler(tokenizer, vocab_size=tokenizer.vocab_size + 40)  # a model vocabulary padded past it


@pytest.fixture(scope="module")
def pieces(tokenizer):
    special = {tokenizer.tok.token_to_id(t.content) for t in tokenizer.tok.get_added_tokens_decoder().values()}
    return [None if i in special else tokenizer.tok.decode([i], skip_special_tokens=False)
            for i in range(tokenizer.vocab_size)]


def valid_headers(emotions, actions):
    return [format_header(e, a) for e in emotions for a in [None, *actions]]


def random_walk(matcher, vocab_size, rng, on_state=None):
    """Picks uniformly among the allowed tokens until the header is done; returns the tokens."""
    tokens = []
    while not matcher.done:
        mask = matcher.mask(vocab_size)
        if on_state:
            on_state(tokens, mask)
        allowed = mask.nonzero().flatten().tolist()
        tokens.append(rng.choice(allowed))
        assert matcher.accept(tokens[-1])
        assert len(tokens) < 64
    assert matcher.mask(vocab_size) is None  # the text after the header is free
    return tokens


def test_masks_allow_exactly_the_prefixes_of_valid_headers(compiler, tokenizer, pieces):
    """At each state of random walks the mask is the set of tokens that keep the written text a prefix of a valid
    header (checked against every token of the vocabulary); special and padding tokens are never allowed."""
    headers = valid_headers(EMOTIONS, ACTIONS)
    rng = random.Random(0)

    def check(tokens, mask):
        written = tokenizer.decode(tokens)
        expected = [p is not None and any(h.startswith(written + p) for h in headers) for p in pieces]
        assert mask[:len(pieces)].tolist() == expected
        assert not mask[len(pieces):].any()

    for _ in range(6):
        random_walk(compiler.matcher(EMOTIONS, ACTIONS), compiler.vocab_size, rng, check)


@pytest.mark.parametrize("emotions,actions", [(EMOTIONS, ACTIONS), (["calm"], [])] + PERSONA_LISTS)
def test_every_generated_header_parses_into_the_lists(compiler, tokenizer, emotions, actions):
    rng = random.Random(1)
    seen = set()
    for _ in range(60):
        matcher = compiler.matcher(emotions, actions)
        text = tokenizer.decode(random_walk(matcher, compiler.vocab_size, rng))
        emotion, action, rest = parse_header(text, emotions, actions)
        assert emotion in emotions and (action is None or action in actions) and rest == ""
        assert matcher.result() == (emotion, action)
        seen.add(text)
    assert seen <= set(valid_headers(emotions, actions))


@pytest.mark.parametrize("emotions,actions", PERSONA_LISTS)
def test_training_text_tokenizes_into_a_header_the_matcher_accepts_whole(compiler, tokenizer, emotions, actions):
    """The header of a training line is tokens of its own: the matcher accepts them, is done exactly at `]`, and
    the text's tokens follow as when the text is encoded after a space."""
    for emotion in emotions:
        for action in [None, *actions]:
            ids = tokenizer.encode(with_header("Well met, traveller.", emotion, action), add_special_tokens=False)
            matcher = compiler.matcher(emotions, actions)
            n = next(i + 1 for i in range(len(ids)) if matcher.accept(ids[i]) and matcher.done)
            assert matcher.result() == (emotion, action)
            assert ids[n:] == tokenizer.encode(" Well met, traveller.", add_special_tokens=False)


def test_smollm2_tokenizes_headers_cleanly_too(tmp_path):
    """The default voice's tokenizer (SmolLM2's, from the GGUF `make model` fetches): every shipped persona's headers
    are tokens of their own, accepted whole by its matcher, and the text's tokens follow unchanged."""
    gguf = ROOT / "models" / "base" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} not fetched (make model)")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp_path)
    tokenizer = Tokenizer.from_dir(tmp_path)
    compiler = HeaderCompiler(tokenizer)
    for emotions, actions in PERSONA_LISTS:
        test_training_text_tokenizes_into_a_header_the_matcher_accepts_whole(compiler, tokenizer, emotions, actions)


def test_disallowed_token_is_refused_and_leaves_the_state(compiler, tokenizer):
    matcher = compiler.matcher(EMOTIONS, ACTIONS)
    before = matcher.mask(compiler.vocab_size)
    for bad in tokenizer.encode("]hello <|npc|>", add_special_tokens=False) + [tokenizer.vocab_size + 3]:
        assert not before[bad]
        assert not matcher.accept(bad)
    assert torch.equal(matcher.mask(compiler.vocab_size), before) and matcher.header == []


def test_rollback_restores_each_earlier_state(compiler, tokenizer):
    """Accept a header and text tokens, recording the mask before each; rolling back k tokens gives back the mask
    and the done flag of that position, across the header's end too, and the same tokens are accepted again."""
    ids = tokenizer.encode(with_header("Fine wares today.", "happy", "count_coins"), add_special_tokens=False)
    matcher = compiler.matcher(EMOTIONS, ACTIONS)
    masks = []
    for t in ids:
        masks.append(matcher.mask(compiler.vocab_size))
        assert matcher.accept(t)
    n = len(ids)
    for k in range(1, n + 1):
        matcher.rollback(k)
        expected = masks[n - k]
        got = matcher.mask(compiler.vocab_size)
        assert (got is None) == (expected is None) and (got is None or torch.equal(got, expected)), k
        assert matcher.accept_prefix(ids[n - k:]) == k
        assert matcher.result() == ("happy", "count_coins")
    with pytest.raises(ValueError, match="roll back"):
        matcher.rollback(n + 1)


def test_accept_prefix_stops_at_the_first_disallowed_token(compiler, tokenizer):
    good = tokenizer.encode("[afraid|shrug]", add_special_tokens=False)
    matcher = compiler.matcher(EMOTIONS, ACTIONS)
    assert matcher.accept_prefix(good[:2] + tokenizer.encode("]", add_special_tokens=False) + good[2:]) == 2


def test_cut_short_header_resolves_into_the_lists(compiler, tokenizer):
    ids = tokenizer.encode("[surprised|bow]", add_special_tokens=False)
    for n in range(len(ids)):
        matcher = compiler.matcher(EMOTIONS, ACTIONS)
        assert matcher.accept_prefix(ids[:n]) == n
        emotion, action = matcher.result()
        written = tokenizer.decode(ids[:n]).removeprefix("[").split("|")[0]
        assert emotion in EMOTIONS and emotion.startswith(written) and action is None
        assert emotion == "surprised" or written == ""


def test_a_tokenizer_without_stop_tokens_gets_headers_too(tokenizer):
    """A checkpoint that names no end-of-turn token (its lines run to max_tokens) still gets headers."""
    compiler = HeaderCompiler(Tokenizer(tokenizer.tok, [], None))
    matcher = compiler.matcher(EMOTIONS, ACTIONS)
    assert matcher.accept_prefix(tokenizer.encode("[afraid]", add_special_tokens=False)) and matcher.done


def test_persona_without_emotions_has_no_header(compiler):
    assert compiler.matcher([], []) is None
    assert compiler.matcher([], ["wave"]) is None


def test_parse_header():
    assert parse_header("[happy|bow] Welcome!", EMOTIONS, ACTIONS) == ("happy", "bow", "Welcome!")
    assert parse_header("[hap]Hi", EMOTIONS, ACTIONS) == ("hap", None, "Hi")
    for line in ["[angry] Go away.", "[happy|dance] Hi", "happy: Hi", "[happy|bow Hi", "Hi [happy]"]:
        assert parse_header(line, EMOTIONS, ACTIONS) == (None, None, line)
    assert with_header("Hi", "happy") == "[happy] Hi" and format_header("happy", "bow") == "[happy|bow]"


def test_labels_that_break_the_header_are_refused():
    for bad in (["ok", "a|b"], ["x]"], [""], ["<|npc|>"], ["two\nlines"]):
        with pytest.raises(ValueError, match="line header"):
            check_labels(bad, [])
        with pytest.raises(ValueError, match="line header"):
            header_grammar(["ok"], bad)
    assert 'action ::= "say \\"hi\\""' in header_grammar(["ok"], ['say "hi"'])


def test_unpack_bitmask_bit_order():
    bitmask = torch.zeros(2, bitmask_width(40), dtype=torch.int32)
    bitmask[0, 0], bitmask[1, 1] = 1 - 2**31, 1 << 7  # bit 31 is the sign bit
    mask = unpack_bitmask(bitmask, 40)
    assert mask[0].nonzero().flatten().tolist() == [0, 31] and mask[1].nonzero().flatten().tolist() == [39]



def test_step_masks_one_mask_per_speculative_position(compiler, tokenizer):
    """Draft side then target side over a row writing a header, a row past its header, a row without one and a row
    whose (host) drafts the header refuses: each position's mask is its matcher's after the drafts before it (the
    refused row's positions after the refused draft, never reached, unmasked), and rollback returns every matcher
    to the step's start."""
    V, inf = compiler.vocab_size, float("-inf")
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    header = enc("[happy|bow]")
    prefixes = [header[:1], header, None, []]
    drafts = torch.tensor([header[1:5], enc(" Hello there my friend")[:4], enc(" a b c d")[:4],
                           (enc("[") + enc("]") + enc("[[]]"))[:4]])
    matchers = [None if p is None else compiler.matcher(EMOTIONS, ACTIONS) for p in prefixes]
    for m, p in zip(matchers, prefixes):
        assert m is None or m.accept_prefix(p) == len(p)

    def reference(prefix, row_drafts, row_logits):
        m, out, live = compiler.matcher(EMOTIONS, ACTIONS), [], True
        m.accept_prefix(prefix)
        for i in range(len(row_drafts) + 1):
            mask = m.mask(V) if live else None
            out.append(row_logits[i] if mask is None else row_logits[i].masked_fill(~mask, inf))
            live = live and (i == len(row_drafts) or m.accept(row_drafts[i]))
        return torch.stack(out)

    masks = StepMasks(matchers, V, "cpu")
    logits = torch.randn(4, 5, V)
    previous = None
    for i in range(3):  # a drafter masks the first three positions; the target side computes the others
        drafted = masks.draft(logits[:, i], previous)
        previous = drafts[:, i]
    masked = masks.target(logits, drafts)
    assert torch.equal(drafted, masked[:, 2])
    for row in (0, 1, 3):
        assert torch.equal(masked[row], reference(prefixes[row], drafts[row].tolist(), logits[row])), row
    assert torch.equal(masked[1:3], logits[1:3])  # past the header, and no header: unmasked
    masks.rollback()
    assert [m.header for m in (matchers[0], matchers[1], matchers[3])] == [header[:1], header, []]
    assert matchers[1].text_tokens == 0



# ---- with the engine: speculation stays lossless under the mask -------------------------------------------------
LINES = [  # (prompt, emotions, actions): personas with both lists, emotions only, and none
    ("<|persona|>I forge swords for the town guard.<|eot|><|player|>What do you do?<|eot|><|npc|>",
     ["neutral", "angry", "proud", "sad"], ["nod", "grunt", "hammer"]),
    ("<|player|>Hi<|eot|><|npc|>", ["happy", "hap", "surprised"], []),
    ("The tavern is warm tonight, traveller. The tavern is warm tonight,", [], []),
    ("<|persona|>I sing songs of old heroes and dragons. I sing songs.<|eot|><|player|>Sing!<|eot|><|npc|>",
     ["happy", "amused", "surprised", "sad", "neutral"], ["bow", "play_lute", "wink"]),
    ("<|npc|>", ["a", "b"], ["c"]),
]


def masked_plain_decoding(model, tokenizer, matcher, prompt: list[int], max_tokens: int) -> list[int]:
    """The reference: the target over the whole sequence each token, the header's mask, argmax; max_tokens counts
    the tokens after the header."""
    ids, out, spoken = list(prompt), [], 0
    with torch.no_grad():
        while spoken < max_tokens:
            logits = model(torch.tensor([ids]))[0, -1]
            mask = matcher.mask(len(logits)) if matcher is not None else None
            token = int((logits if mask is None else logits.masked_fill(~mask, float("-inf"))).argmax())
            if token in tokenizer.stop_ids:
                break
            if mask is None:
                spoken += 1
            else:
                assert matcher.accept(token)
            ids.append(token)
            out.append(token)
    return out


def run_lines(engine, lines, params):
    outputs, matchers = {}, {}
    for i, (text, emotions, actions) in enumerate(lines):
        matchers[f"r{i}"] = engine.header_matcher(emotions, actions)
        engine.submit(f"r{i}", engine.tokenizer.encode(text), params, header=matchers[f"r{i}"])
        outputs[f"r{i}"] = []
    while engine.has_work():
        for ev in engine.step():
            outputs[ev.rid] += ev.token_ids
    return [(outputs[f"r{i}"], matchers[f"r{i}"]) for i in range(len(lines))]


@pytest.mark.parametrize("drafter_kind,k", [("none", None), ("ngram", 4), ("ngram", None), ("model", 3),
                                            ("model", None), ("head", 2), ("head", None)])
def test_greedy_with_headers_equals_masked_plain_decoding(tiny_pair_dirs, drafter_kind, k):
    """Header and text, with every drafter, batch sizes 1, 2 and 5 (rows with and without headers mixed): token for
    token the target's masked argmax; every header parses into its persona's lists."""
    target_dir, draft_dir = tiny_pair_dirs
    params = SamplingParams(temperature=0, max_tokens=20)
    model, tokenizer = load_model(target_dir), Tokenizer.from_dir(target_dir)
    compiler = HeaderCompiler(tokenizer, model.args.vocab_size)
    expected = [masked_plain_decoding(model, tokenizer, compiler.matcher(e, a), tokenizer.encode(text), 20)
                for text, e, a in LINES]
    for batch in (1, 2, 5):
        engine = make_engine(target_dir, drafter_kind, draft_dir, fixed_k=k)
        got = []
        for start in range(0, len(LINES), batch):
            got += run_lines(engine, LINES[start:start + batch], params)
        assert [tokens for tokens, _ in got] == expected, f"batch {batch}"
        for (tokens, matcher), (_, emotions, actions) in zip(got, LINES):
            if emotions:
                emotion, action, _ = parse_header(tokenizer.decode(tokens), emotions, actions)
                assert matcher.done and (emotion, action) == matcher.result() and emotion in emotions
            else:
                assert matcher is None


@pytest.mark.parametrize("drafter_kind", ["ngram", "model", "head"])
def test_sampled_headers_are_always_in_the_lists(tiny_pair_dirs, drafter_kind):
    """Random models, temperature 1.3, speculation on: every line's header is complete and from its lists, and
    max_tokens counts the spoken tokens only (a 2-token line is its header and 2 more tokens)."""
    target_dir, draft_dir = tiny_pair_dirs
    engine = make_engine(target_dir, drafter_kind, draft_dir, fixed_k=4)
    rng = random.Random(3)
    for round_ in range(3):
        lines = [(text, rng.sample(e, len(e)), a) for text, e, a in LINES if e] * 2
        results = run_lines(engine, lines, SamplingParams(temperature=1.3, max_tokens=24, seed=round_))
        for (tokens, matcher), (_, emotions, actions) in zip(results, lines):
            emotion, action, _ = parse_header(engine.tokenizer.decode(tokens), emotions, actions)
            assert emotion in emotions and (action is None or action in actions)
            assert matcher.result() == (emotion, action)
    spoken = []
    for seed in range(4):
        [(tokens, matcher)] = run_lines(engine, LINES[:1], SamplingParams(temperature=1.0, max_tokens=2, seed=seed))
        assert matcher.done  # a stop token is never allowed inside the header
        spoken.append(len(tokens) - len(matcher.header))
    assert max(spoken) == 2 and min(spoken) >= 0


TINY_VOCAB = ["[", "[a", "[b", "a", "b", "ab", "]", "|x", "|", "x"]  # the tiny_vocab_pair's 10 tokens as text


def tiny_vocab_matcher() -> HeaderMatcher:
    import xgrammar
    emotions, actions = ["a", "ab", "b", "ba"], ["x"]
    info = xgrammar.TokenizerInfo(TINY_VOCAB, vocab_type=xgrammar.VocabType.RAW)
    compiled = xgrammar.GrammarCompiler(info, max_threads=1).compile_grammar(header_grammar(emotions, actions))
    return HeaderMatcher(xgrammar.GrammarMatcher(compiled, terminate_without_stop_token=True), emotions, actions,
                         tokenizer=None)


def masked_distribution(P: list[torch.Tensor], depth: int) -> torch.Tensor:
    """The masked target's exact joint distribution of the first `depth` tokens [V] * depth (P: `conditionals`)."""
    V = len(TINY_VOCAB)
    m, joint = tiny_vocab_matcher(), torch.zeros([V] * depth)

    def walk(prefix: list[int], prob: float) -> None:
        if len(prefix) == depth:
            joint[tuple(prefix)] = prob
            return
        mask = m.mask(V)
        p = P[len(prefix)][tuple(prefix)] * (1 if mask is None else mask)
        for t in p.nonzero().flatten().tolist():
            assert m.accept(t)
            walk(prefix + [t], prob * (p[t] / p.sum()).item())
            m.rollback(1)

    walk([], 1.0)
    return joint


def sample_lines(target, draft, n: int, drafter_kind: str, depth: int = 3) -> tuple[torch.Tensor, float]:
    """n lines with headers through the engine (K = 3: the first token comes from the prefill, the next ones from one
    speculative step's positions); joint counts of their first `depth` tokens [V] * depth and the share of drafts
    accepted."""
    drafter = (ModelDrafter(draft, n + 1, 64, "cpu", torch.float32) if drafter_kind == "model" else
               HeadDrafter(random_head(target), target, n + 1, 64, "cpu", torch.float32))
    engine = Engine(target, drafter, tokenizer=None, max_batch=n, max_seq=64, fixed_k=3)
    outs, stats = {}, []
    for i in range(n):
        engine.submit(str(i), [1, 2, 3], SamplingParams(temperature=1.0, max_tokens=depth, seed=i),
                      header=tiny_vocab_matcher())
        outs[str(i)] = []
    while engine.has_work():
        for ev in engine.step():
            outs[ev.rid] += ev.token_ids
            if ev.finished:
                stats.append(ev.stats)
    counts = torch.zeros([len(TINY_VOCAB)] * depth)
    for toks in outs.values():
        counts[tuple(toks[:depth])] += 1
    return counts, sum(s.accepted for s in stats) / max(1, sum(s.drafted for s in stats))


def mask_first_position_only(self, logits, drafts):
    """A mutant of StepMasks.target: one mask (the first position's) for every verified position."""
    first = self.next_mask() if not self.masks else self.masks[0]
    return logits.masked_fill(~first[:, None], float("-inf"))


def mask_draft_side_only(self, logits, drafts):
    """A mutant of StepMasks.target: the target's distributions left unmasked."""
    return logits


def draft_side_unmasked(self, logits, previous):
    """StepMasks.draft left out: drafts sampled from the unmasked draft distribution (q is that distribution)."""
    return logits


@pytest.mark.parametrize("drafter_kind", ["model", "head"])
def test_speculative_sampling_keeps_the_masked_target_distribution(drafter_kind, monkeypatch):
    """The chi-square harness of tests/test_speculative.py with a header grammar over the 10-token vocabulary: 4096
    three-token lines through the engine match the masked target's exact distribution (p > 1e-3). Mutants that mask
    the target with one mask for all speculative positions, or mask only the draft side, fail it (p < 1e-6). Masking
    only the target side stays exact (the acceptance rule is lossless for any q the drafts are really sampled from)
    but accepts fewer drafts: the draft-side mask is what keeps speculation paying under a header."""
    target, draft = tiny_vocab_pair()
    exact = masked_distribution(conditionals(target, [1, 2, 3], 3), 3)
    counts, acceptance = sample_lines(target, draft, 4096, drafter_kind)
    p_value, df = chi_square_p_value(counts, exact)
    assert p_value > 1e-3, f"chi-square p = {p_value:.2e} (df {df})"
    for mutant in (mask_first_position_only, mask_draft_side_only):
        with monkeypatch.context() as m:
            m.setattr(StepMasks, "target", mutant)
            p_mutant, _ = chi_square_p_value(sample_lines(target, draft, 4096, drafter_kind)[0], exact)
        assert p_mutant < 1e-6, f"{mutant.__name__} not caught: p = {p_mutant:.2e}"
    with monkeypatch.context() as m:
        m.setattr(StepMasks, "draft", draft_side_unmasked)
        counts_target_only, acceptance_target_only = sample_lines(target, draft, 4096, drafter_kind)
    assert chi_square_p_value(counts_target_only, exact)[0] > 1e-3
    assert acceptance_target_only < acceptance


# ---- through the service: done carries the header (protocol 1.2, cap `emotion`), the stream never does --------------
MOODY = '''id = "moody"
name = "Mara"
role = "innkeeper"
greeting = "Welcome."
facts = ["I keep the inn."]
fallback_lines = ["One moment."]
emotions = {emotions}
actions = {actions}
'''


@pytest.fixture(scope="module")
def header_service(tmp_path_factory, tiny_model_dir):
    """`npc-engine serve` on the random tiny checkpoint (it stops at random: lines of every length), the shipped
    cast plus `moody`, whose lists the tests rewrite."""
    from test_service import start_service, stop_service
    personas = tmp_path_factory.mktemp("header-personas")
    for path in (ROOT / "personas").glob("*.toml"):
        (personas / path.name).write_text(path.read_text())
    (personas / "moody.toml").write_text(MOODY.format(emotions='["calm"]', actions='["wipe_glass"]'))
    proc, endpoint = start_service(tiny_model_dir, personas)
    yield endpoint, personas
    stop_service(proc)


def hello(raw, minor: int) -> dict:
    return raw.request({"type": "hello", "id": "h", "protocol": [1, minor], "client": "test"})


def test_done_carries_emotion_and_action_only_for_clients_that_negotiated_1_2(header_service):
    """Fuzz over the shipped personas, prompts, temperatures and lengths (1 token: a header cut short): a 1.2
    client's every `done` has an emotion from the persona's lists and an action from its lists or nil, and the
    streamed text is the done text, never the header; a 1.1 client and one that sent no hello get neither field."""
    from test_service import Raw, collect, streamed
    endpoint, _ = header_service
    lists = {d["id"]: (d.get("emotions", []), d.get("actions", [])) for d in
             (tomllib.loads(f.read_text()) for f in sorted((ROOT / "personas").glob("*.toml")))}
    new, old, none = Raw(endpoint), Raw(endpoint), Raw(endpoint)
    assert "emotion" in hello(new, 2)["caps"] and hello(old, 1)["protocol"] == [1, 1]
    rng = random.Random(5)
    texts = ["Hello there.", "What do you sell?", "Tell me about the war.", "Any work for me?", "Bye!"]
    for i, npc in enumerate(sorted(lists) * 2):
        rid = f"s{i}"
        fields = dict(npc=npc, text=rng.choice(texts), max_tokens=rng.choice([1, 2, 6, 24]),
                      temperature=rng.choice([0.0, 0.7, 1.5]), seed=i)
        for raw in (new, old, none):
            raw.say(rid, **fields)
        tokens, done = collect(new, {rid})[rid]
        assert done["type"] == "done" and (done["fallback"] or done["deflected"] or streamed(tokens) == done["text"])
        emotions, actions = lists[npc]
        if emotions:
            assert done["emotion"] in emotions and (done["action"] is None or done["action"] in actions), done
            assert parse_header(done["text"], emotions, actions)[0] is None
        else:
            assert "emotion" not in done and "action" not in done
        for raw in (old, none):
            _, done_old = collect(raw, {rid})[rid]
            assert done_old["type"] == "done" and "emotion" not in done_old and "action" not in done_old
    for raw in (new, old, none):
        raw.close()


def test_a_persona_list_change_on_hot_reload_takes_effect(header_service):
    from test_service import Raw, collect
    endpoint, personas = header_service
    raw = Raw(endpoint)
    hello(raw, 2)
    raw.say("before", npc="moody", max_tokens=8)
    assert collect(raw, {"before"})["before"][1]["emotion"] == "calm"
    (personas / "moody.toml").write_text(MOODY.format(emotions='["furious"]', actions='[]'))
    end = time.monotonic() + 10
    while True:
        raw.say("after", npc="moody", max_tokens=8)
        done = collect(raw, {"after"})["after"][1]
        if done["emotion"] == "furious" or time.monotonic() > end:
            break
    assert done["emotion"] == "furious" and done["action"] is None
    raw.close()


def test_the_python_client_gets_emotion_and_action_on_done(header_service):
    from bridge import Client
    endpoint, _ = header_service
    with Client.connect(endpoint) as client:
        end = time.monotonic() + 10
        while not client.connected and time.monotonic() < end:
            client.poll()
            client.wait(0.01)
        assert "emotion" in client.server["caps"]
        rid = client.say("moody", "A drink, please.", max_tokens=6)
        events = []
        while not any(e["type"] in ("done", "error") for e in events):
            events += client.poll(budget_ms=5)
            client.wait(0.05)
        done = events[-1]
        assert done["type"] == "done" and done["id"] == rid and done["emotion"] in ("calm", "furious")
        assert "action" in done


def test_persona_files_with_labels_a_header_cannot_hold_are_refused(tmp_path):
    from npc_engine.persona import parse_persona
    text = MOODY.format(emotions='["calm", "a|b"]', actions='["wave", "<|eot|>"]')
    persona, issues = parse_persona(text, tmp_path / "moody.toml")
    assert persona is None
    assert sorted((i.field, i.line) for i in issues) == [("actions[1]", 8), ("emotions[1]", 7)]
