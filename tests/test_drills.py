"""The persona stage's drills (npc_engine.train.drills): built from training personas only, every fact and knowledge
line answered once, break and banned tries in wordings other than the eval's."""
import random
from collections import Counter

from npc_engine.train.drills import BANNED_QUESTIONS, BREAK_PROMPTS, NAME_QUESTIONS, SHRUGS, drills, subject
from npc_engine.train.voice_eval import BANNED_QUESTION, BREAK_WORDS
from npc_engine.train.voice_eval import BREAK_PROMPTS as EVAL_BREAK_PROMPTS
from voice_data import conversation, persona, scene


def test_every_fact_line_is_answered_once_after_a_question_about_it():
    records = [conversation(i) for i in range(6)] + [scene(20)]
    out = drills(records, seed=1)
    assert {ex.persona.name for ex in out} == {f"Alda Vorn{i}" for i in range(6)}  # scenes' cast is not drilled
    for i in range(6):
        p = persona(i)
        said = Counter(t.text for ex in out if ex.persona.name == p["name"] for t in ex.turns if t.speaker == "npc")
        assert all(said[line] == 1 for line in p["facts"] + p["knowledge"])
        named = [ex.turns[1].text for ex in out if ex.persona.name == p["name"] and ex.turns[0].text in NAME_QUESTIONS]
        assert len(named) == 1 and p["name"] in named[0]
    for ex in out:
        assert [t.speaker for t in ex.turns] == ["player", "npc"] * (len(ex.turns) // 2)
        assert ex.kind == "drill" and len(ex.labels) == len(ex.turns) // 2
        assert all(emotion in persona(0)["emotions"] and action is None for emotion, action in ex.labels)


def test_questions_name_what_the_line_is_about():
    rng = random.Random(0)
    assert "Old Gristle" in subject("They say a giant eel called Old Gristle lives under the lighthouse.", "Hollis",
                                    Counter(), rng)
    assert "Dr. Petrov" in subject("At three the radio picks up Dr. Petrov's voice.", "Kasper Lund", Counter(), rng)
    assert "your boat" in subject("I mend my boat every spring.", "Hollis", Counter(), rng)
    assert "Hollis" not in (subject("Hollis is what they call me at the harbour.", "Hollis Oakes", Counter(), rng)
                            or "")
    rare = Counter({"perch": 1, "silver": 40, "near": 40, "rain": 40, "rocks": 40, "north": 40, "bite": 40, "best": 40})
    assert subject("silver perch bite best after rain near the north rocks", "X", rare, rng).endswith(
        ("perch?", "perch I should know?"))


def test_break_and_banned_tries_differ_from_the_eval_and_answers_stay_in_world():
    assert not set(BREAK_PROMPTS) & set(EVAL_BREAK_PROMPTS) and BANNED_QUESTION not in BANNED_QUESTIONS
    assert not any(BREAK_WORDS.search(line) for line in SHRUGS)
    out = drills([conversation(i) for i in range(30)], seed=3)
    last = [(ex.turns[-2].text, ex.turns[-1].text, ex.persona) for ex in out]
    breaks = [(q, a) for q, a, _ in last if q in BREAK_PROMPTS]
    banned = [(q, a, p) for q, a, p in last if q not in BREAK_PROMPTS]
    assert breaks and banned and all(not BREAK_WORDS.search(a) for _, a in breaks)
    assert all(p.deflection and a == p.deflection and "the duke" in q for q, a, p in banned)


def test_drills_are_seeded():
    records = [conversation(i) for i in range(6)]
    assert drills(records, seed=5) == drills(records, seed=5) != drills(records, seed=6)
