"""The line header's text: what a line of a persona with emotions starts with, how it is parsed, and its grammar.

    [emotion] spoken text
    [emotion|action] spoken text

In byte-level BPE vocabularies (SmolLM2's, the tiny pair's) `[`, `|` and `]` split off from the names around them, so
a header is the same tokens inside a training line as when it is generated, and the text after it starts with its
usual space-prefixed first word. Training writes lines with `with_header`; npc_engine.header forces generated headers
to the persona's lists with a token mask from this grammar. Standard library only: persona validation and the
service's text handling use it without torch.
"""
import re

OPEN, SEP, CLOSE = "[", "|", "]"
LABEL = re.compile(r"[^\[\]|<>\x00-\x1f]+")  # no header punctuation, no special-token look-alikes, no newlines


def check_labels(emotions: list[str], actions: list[str]) -> None:
    """Raises ValueError naming the first emotion or action that cannot be written in a header."""
    for kind, labels in (("emotion", emotions), ("action", actions)):
        for label in labels:
            if not LABEL.fullmatch(label):
                raise ValueError(f"{kind} {label!r} cannot be in a line header: it must be non-empty and free of "
                                 f"'[', '|', ']', '<', '>' and control characters")


def format_header(emotion: str, action: str | None = None) -> str:
    return OPEN + emotion + (SEP + action if action else "") + CLOSE


def with_header(text: str, emotion: str, action: str | None = None) -> str:
    """A line as the model learns to write it (training text)."""
    return f"{format_header(emotion, action)} {text}"


def parse_header(line: str, emotions: list[str], actions: list[str]) -> tuple[str | None, str | None, str]:
    """(emotion, action, spoken text) of a generated line; (None, None, line) when it starts with no valid header."""
    m = re.match(r"\[([^\[\]|]*)(?:\|([^\[\]|]*))?\] ?", line)
    if m is None or m[1] not in emotions or (m[2] is not None and m[2] not in actions):
        return None, None, line
    return m[1], m[2], line[m.end():]


def header_grammar(emotions: list[str], actions: list[str]) -> str:
    """The header as an EBNF grammar (xgrammar's dialect)."""
    check_labels(emotions, actions)

    def alternatives(labels: list[str]) -> str:
        return " | ".join('"' + label.replace("\\", "\\\\").replace('"', '\\"') + '"' for label in labels)

    if not actions:
        return f'root ::= "{OPEN}" emotion "{CLOSE}"\nemotion ::= {alternatives(emotions)}\n'
    return (f'root ::= "{OPEN}" emotion ("{SEP}" action)? "{CLOSE}"\nemotion ::= {alternatives(emotions)}\n'
            f"action ::= {alternatives(actions)}\n")
