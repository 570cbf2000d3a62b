from pathlib import Path

import pytest

from npc_engine.guard import banned_topic
from npc_engine.persona import Persona, load_persona_dir

PERSONAS = Path(__file__).resolve().parents[1] / "personas"


def persona(*topics: str) -> Persona:
    return Persona(id="a", name="A", role="r", facts=["I am A."], greeting="Hi.",
                   fallback_lines=["Hm."], banned_topics=list(topics), deflection="Not that.")


@pytest.mark.parametrize("text, expected", [
    ("Tell me about the war.", "war"),
    ("WAR! What is it good for?", "war"),
    ("Were you in the wars?", "war"),
    ("It is warm in here.", None),
    ("A forewarned man is safe.", None),
    ("Who was your brother?", "brother"),
    ("Do you have brothers?", "brother"),
    ("What are the patrol\n  routes tonight?", "patrol routes"),
    ("Which patrol goes where?", None),
    ("", None),
])
def test_banned_topic_word_boundaries(text, expected):
    assert banned_topic(persona("war", "brother", "patrol routes"), text) == expected


def test_topic_with_punctuation_and_first_match_order():
    p = persona("duke's daughter", "debt")
    assert banned_topic(p, "Is the Duke's daughter here?") == "duke's daughter"
    assert banned_topic(p, "Your debts and the duke's daughter") == "duke's daughter"
    assert banned_topic(p, "The duke is here.") is None


def test_no_topics_never_matches():
    assert banned_topic(persona(), "war brother anything") is None


def test_shipped_personas_deflect_their_topics_only():
    cast = load_persona_dir(PERSONAS)
    for p in cast.values():
        for topic in p.banned_topics:
            assert banned_topic(p, f"So, what about the {topic.upper()}?") == topic
        # a persona's own lines never trip its guard, or every reply using them would be replaced
        own_lines = p.facts + p.knowledge + list(p.relationships.values()) + [p.greeting, p.style]
        own_lines += p.fallback_lines
        assert [line for line in own_lines if banned_topic(p, line)] == [], p.id
        assert banned_topic(p, p.deflection) is None, p.id
