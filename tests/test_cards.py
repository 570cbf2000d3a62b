import base64
import json
import struct
import zlib

import pytest

from npc_engine.cards import (
    DEFAULT_FALLBACKS,
    CardError,
    card_to_toml,
    first_person,
    import_card,
    read_card,
    short_lines,
)
from npc_engine.persona import load_persona_file

CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Aria Stormwind",
        "description": "{{char}} is a wandering knight from the north. {{char}}'s sword was forged "
                       "by her father, a smith who lived in the high mountains beyond the frozen "
                       "lakes, where the wind never stops and the snow never melts, and where the "
                       "wolves sing all night to the moon. Aria has a grey horse named Ash. She is three hundred "
                       "years old. She often guards the pass and warns travelers.",
        "personality": "Brave, loyal, dry humor.\nHates liars.",
        "scenario": "{{char}} meets {{user}} at a crossroads inn during a storm. {{user}} enters soaked.",
        "first_mes": "*Aria looks up from her ale.* Well met, {{user}}. The storm will not pass soon.",
        "mes_example": "<START>\n{{user}}: Who are you?\n{{char}}: *smiles* Aria. A knight, once.\n"
                       "{{user}}: Why do you ride alone?\nAria: Because someone must.",
        "alternate_greetings": ["Oh. You again, {{user}}."],
        "character_book": {"entries": [
            {"keys": ["north"], "content": "The north is ruled by the Frost Queen.", "enabled": True},
            {"keys": ["x"], "content": "A disabled entry.", "enabled": False},
        ]},
        "creator": "someone",
        "tags": ["knight"],
    },
}


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_png_card(path, card: dict) -> None:
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1 RGB
    pixels = zlib.compress(b"\x00\xff\x00\x00")  # filter byte + one red pixel
    chara = base64.b64encode(json.dumps(card).encode())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", pixels)
                     + png_chunk(b"tEXt", b"chara\x00" + chara) + png_chunk(b"IEND", b""))


def check_aria(path):
    p = load_persona_file(path)
    assert (p.id, p.name, p.role) == ("aria", "Aria Stormwind", "wandering knight")
    assert p.facts == [
        "My name is Aria Stormwind.",
        "I am a wandering knight from the north.",
        # the long sentence is cut at a comma to stay within 160 characters
        "My sword was forged by my father, a smith who lived in the high mountains beyond the "
        "frozen lakes, where the wind never stops and the snow never melts,",
        "and where the wolves sing all night to the moon.",
        "I have a grey horse named Ash.",
        "I am three hundred years old.",  # the card's pronoun, too
        "I often guard the pass and warn travelers.",
        "Hates liars.",
    ]
    assert p.style == "Brave, loyal, dry humor."
    assert p.greeting == "Well met, traveler. The storm will not pass soon."
    # {{user}} is a third person in narration, so the verb still agrees
    assert p.knowledge == ["I meet the traveler at a crossroads inn during a storm.", "The traveler enters soaked.",
                           "The north is ruled by the Frost Queen."]
    # example dialogue answers one question: never a fallback, only a comment beside them to adapt
    assert p.fallback_lines == DEFAULT_FALLBACKS
    text = path.read_text()
    for line in ("Aria. A knight, once.", "Because someone must.", "Oh. You again, traveler."):
        assert f'#   "{line}",' in text


def test_import_json_card(tmp_path):
    card = tmp_path / "aria.json"
    card.write_text(json.dumps(CARD))
    out = tmp_path / "personas" / "aria.toml"
    imported = import_card(card, out)
    assert imported.dropped_lines == 0 and out.read_text() == imported.toml
    check_aria(out)


def test_import_png_card(tmp_path):
    card = tmp_path / "aria.png"
    write_png_card(card, CARD)
    out = tmp_path / "aria.toml"
    import_card(card, out)
    check_aria(out)


def test_import_v1_card_and_escaping(tmp_path):
    card = tmp_path / "v1.json"
    card.write_text(json.dumps({"name": 'Old "Quote" Tom', "description": "Tom\\Back\tslash \u00e9."}))
    out = tmp_path / "tom.toml"
    import_card(card, out, npc_id="tom")
    p = load_persona_file(out)
    assert p.name == 'Old "Quote" Tom' and p.facts == ['My name is Old "Quote" Tom.', "Tom\\Back slash \u00e9."]
    assert p.greeting == 'Hello. I am Old "Quote" Tom.' and len(p.fallback_lines) == 3


def test_long_text_is_capped_and_counted():
    fields = {"name": "Bo", "description": " ".join(f"Fact number {i}." for i in range(20))}
    imported = card_to_toml(fields, "bo")
    assert imported.dropped_lines == 9 and imported.toml.count("Fact number") == 11


def test_short_lines_cuts_at_commas_then_words():
    long = "one, " * 60 + "end."
    lines = short_lines(long, 40)
    assert all(len(line) <= 40 for line in lines)
    assert " ".join(lines).split() == long.split()


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IEND", b""), "no 'chara' tEXt chunk"),
    (b"{not json", "not valid base64/JSON"),
    (b'{"data": {"description": "no name"}}', "card has no name"),
    (b"[1, 2]", "card must be a JSON object"),
])
def test_bad_cards(tmp_path, content, message):
    path = tmp_path / "card.bin"
    path.write_bytes(content)
    with pytest.raises(CardError, match=message) as e:
        read_card(path)
    assert str(e.value).startswith(str(path))


def test_import_command(tmp_path, capsys):
    from npc_engine.cli import main
    card = tmp_path / "aria.png"
    write_png_card(card, CARD)
    out = tmp_path / "personas" / "aria_knight.toml"
    assert main(["persona", "import", str(card), "-o", str(out)]) == 0
    assert load_persona_file(out).id == "aria_knight"
    assert main(["persona", "check", str(out)]) == 0
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IEND", b""))
    assert main(["persona", "import", str(broken), "-o", str(tmp_path / "b.toml")]) == 2
    assert "no 'chara' tEXt chunk" in capsys.readouterr().err and not (tmp_path / "b.toml").exists()


def test_import_refuses_to_overwrite_without_force(tmp_path, capsys):
    from npc_engine.cli import main

    card = tmp_path / "aria.json"
    card.write_text(json.dumps(CARD))
    out = tmp_path / "aria.toml"
    out.write_text("# my edits\n")
    assert main(["persona", "import", str(card), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err and out.read_text() == "# my edits\n"
    assert main(["persona", "import", str(card), "-o", str(out), "--force"]) == 0
    check_aria(out)


@pytest.mark.parametrize("sentence, pronoun, expected", [
    ("Aria lives by the sea.", "she", "I live by the sea."),
    ("She carries her bow and watches the road.", "she", "I carry my bow and watch the road."),
    ("He trusts his brother and fears him.", "he", "I trust my brother and fear him."),  # "him": someone else
    ("They were born here.", "they", "I was born here."),
    ("She taught herself to read.", "she", "I taught myself to read."),
    ("Aria sells swords and shields to the guard.", "she", "I sell swords and shields to the guard."),
    ("The north is cold.", "she", "The north is cold."),
])
def test_first_person(sentence, pronoun, expected):
    assert first_person(sentence, "Aria Stormwind", pronoun) == expected
