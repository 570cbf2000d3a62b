"""Banned-topic guard: the service checks the player's text before generation and the generated
line after it; on a match the NPC says its persona's deflection line instead.

One rule, used for both questions the guard answers: does a text touch a topic (`banned_topic`), and
where could a growing text still turn into one (`unsafe_start`, for streaming hold-back). A topic
matches case-insensitively, on word boundaries, with any run of whitespace between its words, and
with a plain plural ("dragon" matches "dragons", not "dragonfly").
"""
import re
from functools import lru_cache

from npc_engine.persona import Persona

PLURALS = ("s", "es")


def is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"  # what `\w` means to `re` for str patterns


def topic_words(topic: str) -> list[str]:
    return topic.lower().split()


@lru_cache(maxsize=256)
def _topic_pattern(topic: str) -> re.Pattern:
    words = r"\s+".join(re.escape(w) for w in topic_words(topic))
    plural = "|".join(PLURALS)
    return re.compile(rf"(?<!\w){words}(?:{plural})?(?!\w)", re.IGNORECASE)


def banned_topic(persona: Persona, text: str) -> str | None:
    """The first banned topic of `persona` that `text` touches, or None."""
    for topic in persona.banned_topics:
        if topic.strip() and _topic_pattern(topic).search(text):
            return topic
    return None


def _could_become(tail: str, topic: str) -> bool:
    """Whether `tail` (lowercase, single spaces, starting on a word boundary) is a prefix of a text that
    `_topic_pattern(topic)` matches from its start: a piece of the topic, or the whole topic with a
    plural ending still growing."""
    joined = " ".join(topic_words(topic))
    if joined.startswith(tail):
        return True
    rest = tail[len(joined):] if tail.startswith(joined) else None
    return rest is not None and any(p.startswith(rest) for p in PLURALS + ("",))


def unsafe_start(text: str, start: int, topics: list[str]) -> int:
    """The first position at or after `start` where `text` could still grow into a match of one of
    `topics` (see the module's rule); len(text) when there is none."""
    wanted = [t for t in topics if t.strip()]
    for i in range(start, len(text)):
        if text[i].isspace() or (i and is_word_char(text[i - 1])):
            continue  # a match starts on a word boundary, never on a space
        tail = re.sub(r"\s+", " ", text[i:].lower())
        if any(_could_become(tail, t) for t in wanted):
            return i
    return len(text)


def complete_words_end(text: str) -> int:
    """Length of the prefix of `text` that ends at a non-word character (its last word is complete)."""
    for i in range(len(text) - 1, -1, -1):
        if not is_word_char(text[i]):
            return i + 1
    return 0
