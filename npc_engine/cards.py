"""Import Character Card V2 files (JSON, or PNG with the card as base64 JSON in a `chara` tEXt
chunk; V1 cards with the fields at the top level work too) into the persona TOML schema.

Mapping: description -> facts (first person where the sentence starts with the character's name
and is/was/has), personality -> style (its first short line; the rest become facts), scenario and
lorebook entries -> knowledge, first_mes -> greeting, the character's lines in mes_example and
the alternate greetings -> fallback_lines. Long text is cut into short lines: the embedded model
is small and the persona block is read on every request.
"""
import base64
import binascii
import json
import re
import struct
import textwrap
from dataclasses import dataclass
from pathlib import Path

from npc_engine.persona import ID_PATTERN, PersonaError, parse_persona

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_LINE = 160
MAX_FACTS = 12
MAX_KNOWLEDGE = 12
MAX_FALLBACKS = 5
MAX_GREETING = 240
DEFAULT_FALLBACKS = ["Hm. Give me a moment.", "Let me think on that.", "Ask me again in a bit."]


class CardError(ValueError):
    pass


@dataclass
class ImportedCard:
    toml: str
    dropped_lines: int  # lines cut to keep the persona short


# ---------------------------------------------------------------- reading cards

def png_text_chunks(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG file, keyword -> text (latin-1, as the PNG spec defines)."""
    if not data.startswith(PNG_SIGNATURE):
        raise CardError("not a PNG file")
    chunks, pos = {}, len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) < length:
            raise CardError(f"truncated PNG chunk {kind!r}")
        if kind == b"tEXt" and b"\0" in body:
            keyword, text = body.split(b"\0", 1)
            chunks[keyword.decode("latin-1")] = text.decode("latin-1")
        if kind == b"IEND":
            break
        pos += 12 + length  # length, type, body, crc
    return chunks


def read_card(path: str | Path) -> dict:
    """The card's fields (the V2 `data` object, or a V1 card's top level)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CardError(f"{path}: cannot read: {e}") from None
    try:
        if raw.startswith(PNG_SIGNATURE):
            chunks = png_text_chunks(raw)
            if "chara" not in chunks:
                raise CardError("no 'chara' tEXt chunk (not a character card)")
            card = json.loads(base64.b64decode(chunks["chara"], validate=True))
        else:
            card = json.loads(raw.decode("utf-8-sig"))
    except CardError as e:
        raise CardError(f"{path}: {e}") from None
    except (binascii.Error, UnicodeDecodeError, ValueError) as e:
        raise CardError(f"{path}: card is not valid base64/JSON: {e}") from None
    if not isinstance(card, dict):
        raise CardError(f"{path}: card must be a JSON object")
    fields = card["data"] if isinstance(card.get("data"), dict) else card
    if not isinstance(fields.get("name"), str) or not fields["name"].strip():
        raise CardError(f"{path}: card has no name")
    return fields


# ---------------------------------------------------------------- text to short lines

def _text(fields: dict, key: str) -> str:
    value = fields.get(key)
    return value if isinstance(value, str) else ""


def _fill_names(text: str, name: str, user: str) -> str:
    text = re.sub(r"\{\{char\}\}|<BOT>", name, text, flags=re.IGNORECASE)
    return re.sub(r"\{\{user\}\}|<USER>", user, text, flags=re.IGNORECASE)


def short_lines(text: str, limit: int = MAX_LINE) -> list[str]:
    """Sentences of `text`, with sentences longer than `limit` cut at commas, then at words."""
    text = text.replace("*", "")
    lines = []
    for paragraph in re.split(r"\n\s*", text):
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph.strip()):
            sentence = " ".join(sentence.split())
            if len(sentence) <= limit:
                lines.append(sentence)
                continue
            part = ""
            for clause in re.split(r"(?<=[,;:])\s+", sentence):
                if part and len(part) + 1 + len(clause) > limit:
                    lines.append(part)
                    part = ""
                part = f"{part} {clause}".strip()
            lines += textwrap.wrap(part, limit)
    return [line for line in lines if re.search(r"\w", line)]


def _name_pattern(name: str) -> str:
    """The full name or the first name alone."""
    return rf"(?:{re.escape(name)}|{re.escape(name.split()[0])})"


def first_person(line: str, name: str) -> str:
    """'Aria is a knight.' -> 'I am a knight.' for sentences that start with the name."""
    subject = "^" + _name_pattern(name)
    for pattern, repl in ((r"\s+is\b", "I am"), (r"\s+was\b", "I was"), (r"\s+has\b", "I have"),
                          (r"'s\b", "My")):
        new, count = re.subn(subject + pattern, repl, line)
        if count:
            return new
    return line


def _spoken(text: str) -> str:
    """A line the character says: *actions* removed, whitespace collapsed."""
    return " ".join(re.sub(r"\*[^*]*\*", " ", text).split()).strip(" \"")


def _spoken_lead(text: str, limit: int) -> str:
    """The first sentences of a spoken text that fit in `limit` characters."""
    lead = ""
    for line in short_lines(_spoken(text), limit):
        if lead and len(lead) + 1 + len(line) > limit:
            break
        lead = f"{lead} {line}".strip()
    return lead


def _role(description: str, name: str) -> str:
    m = re.match(rf"{_name_pattern(name)} (?:is|was) (?:a|an|the) ([^.,;!?]{{1,40}}?)"
                 r"(?:\s+(?:who|that|with|from|in|of|and)\b|[.,;!?]|$)", description.strip())
    return m.group(1) if m else "character"


def _example_lines(mes_example: str, name: str) -> list[str]:
    lines = []
    for raw in mes_example.splitlines():
        m = re.match(rf"\s*(?:\{{\{{char\}}\}}|<BOT>|{_name_pattern(name)})\s*:\s*(.+)", raw, re.IGNORECASE)
        if m and (spoken := _spoken_lead(m.group(1), MAX_LINE)):
            lines.append(spoken)
    return lines


# ---------------------------------------------------------------- TOML output

def toml_string(s: str) -> str:
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b",
               "\f": "\\f"}
    return '"' + "".join(escapes.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or c == "\x7f"
                                             else c) for c in s) + '"'


def _toml_array(key: str, items: list[str]) -> str:
    if not items:
        return f"{key} = []"
    return f"{key} = [\n" + "".join(f"    {toml_string(i)},\n" for i in items) + "]"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:64] or "npc"


def card_to_toml(fields: dict, npc_id: str, source_name: str = "") -> ImportedCard:
    """Persona TOML for a card's fields (as returned by `read_card`)."""
    if not ID_PATTERN.fullmatch(npc_id):
        raise CardError(f"{npc_id!r} is not a valid persona id")
    name = " ".join(fields["name"].split())

    def told(text: str) -> str:  # narration: {{user}} is "you"
        return _fill_names(text, name, "you")

    def said(text: str) -> str:  # spoken by the character: {{user}} is "traveler"
        return _fill_names(text, name, "traveler")

    personality = short_lines(told(_text(fields, "personality")))
    facts = [first_person(line, name) for line in short_lines(told(_text(fields, "description")))]
    facts = facts + personality[1:] or [f"My name is {name}."]
    knowledge = short_lines(told(_text(fields, "scenario")))
    book = fields.get("character_book")
    for entry in (book.get("entries", []) if isinstance(book, dict) else []):
        if isinstance(entry, dict) and entry.get("enabled", True) \
                and isinstance(entry.get("content"), str):
            knowledge += short_lines(told(entry["content"]))
    greeting = _spoken_lead(said(_text(fields, "first_mes")), MAX_GREETING) \
        or f"Hello. I am {name}."
    fallbacks = _example_lines(said(_text(fields, "mes_example")), name)
    for alternate in fields.get("alternate_greetings") or []:
        if isinstance(alternate, str) and (line := _spoken_lead(said(alternate), MAX_LINE)):
            fallbacks.append(line)
    fallbacks = list(dict.fromkeys(fallbacks))[:MAX_FALLBACKS]
    fallbacks += DEFAULT_FALLBACKS[:max(0, 3 - len(fallbacks))]
    dropped = max(0, len(facts) - MAX_FACTS) + max(0, len(knowledge) - MAX_KNOWLEDGE)
    facts, knowledge = facts[:MAX_FACTS], knowledge[:MAX_KNOWLEDGE]
    header = f"# Imported from the character card {source_name}\n" if source_name \
        else "# Imported from a character card\n"
    if isinstance(fields.get("creator"), str) and fields["creator"].strip():
        header += f"# Card by {' '.join(fields['creator'].split())}\n"
    parts = [
        header,
        f"id = {toml_string(npc_id)}",
        f"name = {toml_string(name)}",
        f"role = {toml_string(_role(told(_text(fields, 'description')), name))}",
        f"style = {toml_string(personality[0] if personality else '')}",
        f"greeting = {toml_string(greeting)}",
        "",
        _toml_array("facts", facts),
        "",
        _toml_array("knowledge", knowledge),
        "",
        _toml_array("fallback_lines", fallbacks),
        "",
    ]
    return ImportedCard("\n".join(parts), dropped)


def import_card(card_path: str | Path, out_path: str | Path, npc_id: str | None = None) -> ImportedCard:
    """Read a card, write it as a persona file, and check that the file validates."""
    out_path = Path(out_path)
    fields = read_card(card_path)
    imported = card_to_toml(fields, npc_id or slug(out_path.stem), Path(card_path).name)
    _, issues = parse_persona(imported.toml, out_path)
    if issues:  # a mapping bug, not bad input: the mapping always fills the required fields
        raise PersonaError(issues)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(imported.toml, encoding="utf-8")
    return imported


def cmd_persona_import(args) -> int:
    imported = import_card(args.card, args.output, args.id)
    print(f"wrote {args.output}" + (f" ({imported.dropped_lines} long-text lines dropped)"
                                    if imported.dropped_lines else ""))
    return 0
