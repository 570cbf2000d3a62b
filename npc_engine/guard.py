"""Banned-topic guard: the service checks the player's text before generation and the generated
line after it; on a match the NPC says its persona's deflection line instead."""
import re
from functools import lru_cache

from npc_engine.persona import Persona


@lru_cache(maxsize=256)
def _topic_pattern(topic: str) -> re.Pattern:
    # Case-insensitive, on word boundaries, any run of whitespace between words, and a plain
    # plural ("dragon" matches "dragons", not "dragonfly").
    words = r"\s+".join(re.escape(w) for w in topic.split())
    return re.compile(rf"(?<!\w){words}(?:s|es)?(?!\w)", re.IGNORECASE)


def banned_topic(persona: Persona, text: str) -> str | None:
    """The first banned topic of `persona` that `text` touches, or None."""
    for topic in persona.banned_topics:
        if topic.strip() and _topic_pattern(topic).search(text):
            return topic
    return None
