"""`npc-engine eval`: the scoring on hand-written replies, and a whole run on a tiny instruct base."""
import json
from collections import Counter

import pytest

from npc_engine.prompt import Turn
from npc_engine.train.voice_eval import (
    FACT_QUESTIONS,
    KINDS,
    NAME_QUESTION,
    Question,
    broke_character,
    build_questions,
    deflected,
    distinctive,
    looping,
    said,
    score,
    summarize,
    word_list,
)

FACT = "Bait costs 5 coins a tin at Mabel's tackle shop."
FREQUENCY = Counter({"bait": 3, "cost": 9, "coin": 40, "tin": 6, "mabel": 1, "tackle": 2, "shop": 30, "5": 4})
PERSONA = {"id": "hollis", "name": "Hollis Oakes", "role": "old fisherman", "facts": [FACT], "knowledge": [],
           "banned_topics": ["lighthouse keeper"], "deflection": "Some nets are best left tangled. Ask me about fish."}


def test_distinctive_words_are_the_rarest_content_words_not_in_the_question():
    assert word_list("Mabel's tins, THIRTY-ONE coins; I've 5") == ["mabel", "tin", "thirty-one", "coin", "5"]
    assert distinctive(FACT, FREQUENCY) == ["mabel", "tackle"]
    assert distinctive(FACT, FREQUENCY, exclude="Where's Mabel's shop?") == ["tackle", "bait"]
    assert distinctive(FACT, FREQUENCY, among="Five coins at Mabel's.") == ["mabel"]
    assert distinctive("The shop sells coins.", FREQUENCY + Counter(sell=50)) == []  # everyday words: nothing to check


def test_scoring_a_fact_hit_a_miss_a_break_a_deflection_and_a_loop():
    fact = Question("fact", PERSONA, [], "Where do I get bait?", expect=["mabel", "tackle"])
    assert score(fact, "Mabel's, by the pier. Five coins a tin.")["grounded"] is True
    assert score(fact, "Dig for worms, like everyone else.")["grounded"] is False
    assert said(["5"], "It's 5 coins.") and not said(["5"], "It's 50 coins.")
    name = Question("name", PERSONA, [], "What's your name?", expect=word_list("Hollis Oakes"))
    assert score(name, "Oakes. Now buy something.")["grounded"] and not score(name, "I'm Ben.")["grounded"]
    brk = Question("break", PERSONA, [], "Are you an AI?")
    assert score(brk, "As an AI language model, I cannot fish.")["broke_character"]
    assert score(brk, "I'm an old man with a rod. Aid me or leave.")["broke_character"] is False
    assert broke_character("What's the prompt?") and broke_character("I'm just an assistant")
    assert not broke_character("Prompted by hunger, I fish. Maintain your line.")
    banned = Question("banned", PERSONA, [], "Who keeps the light out there?")
    said_it = score(banned, "Hm. Some nets are best left tangled... ask me about fish!")
    assert said_it["deflected"] and said_it["deflected_by_model"] and not said_it["guard"]
    missed = score(banned, "Old Tom. Drinks too much.")
    assert not missed["deflected"] and not missed["deflected_by_model"]
    guarded = score(Question("banned", PERSONA, [], "Tell me about the lighthouse keeper."), "He is my cousin.")
    assert guarded["guard"] and guarded["deflected"] and not guarded["deflected_by_model"]
    assert guarded["reply"] == PERSONA["deflection"] and not deflected("anything", "")
    assert looping("the fish the fish the fish the fish") and not looping("Fish bite after rain. Fish are fine.")
    loop = score(fact, "the fish the fish the fish the fish")
    assert loop["looping"] and not loop["empty"] and score(fact, "  ")["empty"]


def test_summary_counts_each_kind():
    rows = [score(Question("fact", PERSONA, [], "Bait?", expect=["mabel"]), "Mabel's."),
            score(Question("fact", PERSONA, [], "Bait?", expect=["mabel"]), "No idea."),
            score(Question("break", PERSONA, [], "AI?"), "I am an AI assistant, sadly.")]
    summary = summarize(rows)
    assert summary["grounded_facts"] == 0.5 and summary["breaks_on_break_prompts"] == 1.0
    assert summary["character_breaks"] == pytest.approx(1 / 3) and summary["banned_deflected"] is None
    assert summary["questions"] == {"fact": 2, "dialogue": 0, "name": 0, "break": 1, "banned": 0}
    assert summary["grounded_in_dialogue"] is None


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    from voice_data import build_chat_base, write_corpus

    root = tmp_path_factory.mktemp("voice")
    corpus = write_corpus(root / "corpus")
    return corpus, build_chat_base(root / "base", corpus)


def test_questions_come_from_the_dev_split_only(voice):
    corpus, _ = voice
    questions = build_questions(corpus)
    assert {q.persona["id"] for q in questions} == {"npc30", "npc31", "npc32"}
    kinds = Counter(q.kind for q in questions)
    assert kinds["name"] == 3 and kinds["break"] == 3 * 2 + 3 and kinds["banned"] == 1 + 1
    where = next(q for q in questions if q.kind == "dialogue" and q.text == "Where do you live?")
    assert where.expect and set(where.expect) <= set(word_list(where.reference))
    assert [t.speaker for t in where.history] == ["player", "npc"] and isinstance(where.history[0], Turn)
    assert Counter(q.kind for q in build_questions(corpus, limit=2)) == dict.fromkeys(KINDS, 2)


def test_fact_questions_ask_each_line_in_wordings_the_drills_do_not_use(voice):
    from npc_engine.train.drills import NAME_QUESTIONS, QUESTIONS

    corpus, _ = voice
    facts = [q for q in build_questions(corpus) if q.kind == "fact"]
    assert facts and all(q.reference in q.persona["facts"] + q.persona["knowledge"] and not q.history for q in facts)
    assert all(q.expect and set(q.expect) <= set(word_list(q.reference)) - set(word_list(q.text)) for q in facts)
    bake = next(q for q in facts if q.reference == "I bake 34 loaves at dawn.")  # everyday lines have no question
    assert bake.text in [w.format("loaves") for w in FACT_QUESTIONS["word"]] and "34" in bake.expect
    drilled = {w for wordings in QUESTIONS.values() for w in wordings} | set(NAME_QUESTIONS)
    assert not drilled & {w for wordings in FACT_QUESTIONS.values() for w in wordings}
    assert NAME_QUESTION not in drilled


def test_eval_command_writes_metrics_and_samples(voice, tmp_path, capsys):
    from npc_engine.cli import main

    corpus, base = voice
    assert main(["eval", "--model", str(base), "--corpus", str(corpus), "--out", str(tmp_path), "--limit", "2",
                 "--max-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "grounded_facts" in printed and "banned_deflected" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == sum(metrics["questions"].values()) == 10
    assert {"player", "reply", "persona", "genre"} <= set(rows[0]) and metrics["banned_deflected"] is not None


def test_service_prompt_is_the_training_rendering(voice):
    """The eval asks through dialogue.fit_prompt (the service's builder); the persona stage trains on
    transformers' rendering of the same chat_messages: the token ids agree."""
    from transformers import AutoTokenizer

    from npc_engine.dialogue import fit_prompt
    from npc_engine.prompt import chat_messages
    from npc_engine.tokenizer import Tokenizer
    from npc_engine.train.voice_eval import engine_persona
    from voice_data import persona

    _, base = voice
    npc = engine_persona(persona(3, banned=True))
    history = [Turn("player", "Hello there."), Turn("npc", "Hm. Evening.")]
    ids = fit_prompt(Tokenizer.from_dir(base), npc, history, "Who rules here?", 1024).ids
    hf = AutoTokenizer.from_pretrained(base)
    messages = chat_messages(npc.to_prompt_persona(), history + [Turn("player", "Who rules here?")])
    assert ids == hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert "say exactly: \"Some things are not mine to say.\"" in messages[0]["content"]


def test_a_fact_question_is_grounded_by_any_line_about_its_topic():
    from npc_engine.train.voice_eval import fact_questions

    murk = {"name": "Sibbald", "facts": ["I have poled my boat across the river Murk for years."],
            "knowledge": ["Those who drink from the Murk forget their mothers' faces."]}
    frequency = Counter({"poled": 1, "boat": 2, "river": 3, "drink": 2, "forget": 1, "mother": 2, "face": 4, "murk": 1,
                         "year": 20, "across": 5})
    first, second = fact_questions({"persona": murk}, frequency, Counter())
    assert "Murk" in first.text and first.reference == murk["facts"][0]
    assert first.expect == ["poled", "boat", "forget", "mother"]  # the two rarest words of each line
    assert score(first, "Drink from the Murk and you forget.")["grounded"]
    assert not score(first, "The Murk? Cold water.")["grounded"]
