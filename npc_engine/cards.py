"""Import Character Card V2 files (JSON, or PNG with the card as base64 JSON in a `chara` tEXt
chunk; V1 cards with the fields at the top level work too) into the persona TOML schema.

Mapping: "My name is <name>." plus description -> facts (a sentence about the character, by name or
by the pronoun the card uses for it, is put in the first person), personality -> style (its first
short line; the rest become facts), scenario (in the first person too) and lorebook entries ->
knowledge, first_mes -> greeting. {{user}} is "the traveler" in narration and "traveler" in speech.
Fallback lines are said whenever an answer misses its deadline, so they stay generic; the card's
example dialogue and alternate greetings are written beside them as comments to adapt. Long text is
cut into short lines: the embedded model is small and the persona block is read on every request.
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
MAX_EXAMPLES = 5
MAX_GREETING = 240
DEFAULT_FALLBACKS = ["Hm. Give me a moment.", "Let me think on that.", "Ask me again in a bit."]
# subject, object, possessive, reflexive
PRONOUNS = {"she": ("she", "her", "her", "herself"), "he": ("he", "him", "his", "himself"),
            "they": ("they", "them", "their", "themselves")}
FIRST_PERSON_VERBS = {"is": "am", "are": "am", "was": "was", "were": "was", "has": "have", "have": "have",
                      "does": "do", "goes": "go"}
# the same for "I": modals and common irregular past forms (regular ones end in -ed)
SAME_FOR_I = set("can could will would shall should may might must had did became began brought built came fought "
                 "found fled gave grew hid kept knew left lost made met ran rode saw sold spent swore taught told "
                 "took wore won wrote".split())
ADVERB = r"(?:\s+(?:often|always|never|still|also|usually|rarely|sometimes|once|only|seldom|now|even))?"
# what follows an object pronoun ("tell her."), not a possessive one ("her sword")
AFTER_OBJECT = (r"[.,;:!?)\"]|$|\s+(?:and|or|but|to|for|with|from|in|on|at|by|of|as|the|a|an|again|too|now|"
                r"once|back|up|down|away|out|off|well|alone|all)\b")


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


def _narrated(text: str, name: str) -> str:
    """Narration with {{char}} as the name and {{user}} as a third person, so verbs still agree."""
    text = re.sub(r"(^|[.!?]\s+|\n\s*)(?:\{\{user\}\}|<USER>)", r"\1The traveler", text.strip(), flags=re.IGNORECASE)
    return _fill_names(text, name, "the traveler")


def short_lines(text: str, limit: int = MAX_LINE, convert=None) -> list[str]:
    """Sentences of `text` (each passed through `convert` first, if given), with sentences longer than
    `limit` cut at commas, then at words."""
    text = text.replace("*", "")
    lines = []
    for paragraph in re.split(r"\n\s*", text):
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph.strip()):
            sentence = " ".join(sentence.split())
            sentence = convert(sentence) if convert else sentence
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


def card_pronoun(text: str) -> str | None:
    """The pronoun the card uses for its character: she or he, whichever is more frequent, else they."""
    counts = {k: len(re.findall(rf"\b(?:{'|'.join(forms)})\b", text, re.IGNORECASE)) for k, forms in PRONOUNS.items()}
    if counts["she"] or counts["he"]:
        return "she" if counts["she"] >= counts["he"] else "he"
    return "they" if counts["they"] else None


def verb_for_i(verb: str, plural: bool) -> str | None:
    """The first-person form of a third-person verb ('lives' -> 'live'), or None if it does not look like one."""
    lower = verb.lower()
    if lower in FIRST_PERSON_VERBS:
        return FIRST_PERSON_VERBS[lower]
    if plural or lower in SAME_FOR_I or lower.endswith("ed"):
        return verb
    if re.fullmatch(r"[a-z]+(?:ss|sh|ch|x|z|o)es", lower):
        return verb[:-2]
    if re.fullmatch(r"[a-z]+[^aeiou]ies", lower):
        return verb[:-3] + "y"
    if re.fullmatch(r"[a-z]+[^su]s", lower):
        return verb[:-1]
    return None


def first_person(sentence: str, name: str, pronoun: str | None = None) -> str:
    """A sentence that starts with the character (by name or `pronoun`), in the first person:
    'Aria lives in the north.' -> 'I live in the north.', "She keeps her sword." -> 'I keep my sword.'
    Other sentences come back unchanged."""
    subject, obj, possessive, reflexive = PRONOUNS.get(pronoun, ("", "", "", ""))
    owner = rf"(?:{_name_pattern(name)}'s|{possessive})" if pronoun else rf"{_name_pattern(name)}'s"
    who = rf"(?:{_name_pattern(name)}|{subject})" if pronoun else _name_pattern(name)
    if m := re.match(rf"{owner}\s+", sentence, re.IGNORECASE):
        converted = "My " + sentence[m.end():]
    elif m := re.match(rf"{who}({ADVERB})\s+([A-Za-z]+)\b", sentence, re.IGNORECASE):
        verb = verb_for_i(m.group(2), plural=pronoun == "they" and m.group(0).lower().startswith("they"))
        if verb is None:
            return sentence
        converted = f"I{m.group(1)} {verb}{sentence[m.end():]}"
    else:
        return sentence
    if pronoun:  # its own things are mine; an object pronoun ("tells him") is someone else
        converted = re.sub(rf"\b{reflexive}\b", "myself", converted, flags=re.IGNORECASE)
        protect = rf"(?!{AFTER_OBJECT})" if obj == possessive else ""  # "her sword", not "tell her."
        converted = re.sub(rf"\b{possessive}\b{protect}", "my", converted, flags=re.IGNORECASE)
    # a second verb of the same subject, "... and tells my friends"; not a plural noun, "swords and shields to ..."
    return re.sub(r"\b(and|but|or|then)\s+([a-z]+s)\b(?=\s+(?!(?:to|for|with|from|in|on|at|by|of|as|and|or|but|"
                  r"that|which|who|than|are|were)\b)[a-z])",
                  lambda m: f"{m.group(1)} {verb_for_i(m.group(2), False) or m.group(2)}", converted)


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

    def said(text: str) -> str:  # spoken by the character: {{user}} is "traveler"
        return _fill_names(text, name, "traveler")

    description = _narrated(_text(fields, "description"), name)
    pronoun = card_pronoun(description)

    def mine(sentence: str) -> str:
        return first_person(sentence, name, pronoun)

    personality = short_lines(_narrated(_text(fields, "personality"), name))
    facts = [f"My name is {name}."] + short_lines(description, convert=mine) + personality[1:]
    facts = list(dict.fromkeys(facts))
    knowledge = short_lines(_narrated(_text(fields, "scenario"), name), convert=mine)
    book = fields.get("character_book")
    for entry in (book.get("entries", []) if isinstance(book, dict) else []):
        if isinstance(entry, dict) and entry.get("enabled", True) \
                and isinstance(entry.get("content"), str):
            knowledge += short_lines(_narrated(entry["content"], name))
    greeting = _spoken_lead(said(_text(fields, "first_mes")), MAX_GREETING) \
        or f"Hello. I am {name}."
    examples = _example_lines(said(_text(fields, "mes_example")), name)
    for alternate in fields.get("alternate_greetings") or []:
        if isinstance(alternate, str) and (line := _spoken_lead(said(alternate), MAX_LINE)):
            examples.append(line)
    examples = list(dict.fromkeys(examples))[:MAX_EXAMPLES]
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
        f"role = {toml_string(_role(description, name))}",
        f"style = {toml_string(personality[0] if personality else '')}",
        f"greeting = {toml_string(greeting)}",
        "",
        _toml_array("facts", facts),
        "",
        _toml_array("knowledge", knowledge),
        "",
        *(["# The card's example dialogue and alternate greetings. Fallback lines are said whenever an answer",
            "# misses its deadline, at any moment of a conversation: adapt only lines that fit anywhere."]
          + [f"#   {toml_string(line)}," for line in examples] if examples else []),
        _toml_array("fallback_lines", DEFAULT_FALLBACKS),
        "",
    ]
    return ImportedCard("\n".join(parts), dropped)


def import_card(card_path: str | Path, out_path: str | Path, npc_id: str | None = None,
                force: bool = False) -> ImportedCard:
    """Read a card, write it as a persona file (an existing one only with `force`), and check that it validates."""
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise CardError(f"{out_path} exists; give --force to replace it")
    fields = read_card(card_path)
    imported = card_to_toml(fields, npc_id or slug(out_path.stem), Path(card_path).name)
    _, issues = parse_persona(imported.toml, out_path)
    if issues:  # a mapping bug, not bad input: the mapping always fills the required fields
        raise PersonaError(issues)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(imported.toml, encoding="utf-8")
    return imported

