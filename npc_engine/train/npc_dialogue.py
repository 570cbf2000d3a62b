"""The npc-dialogue corpus (`<corpus>/npc-dialogue/`, see its README) as chat examples for the persona stage.

A conversation record gives one example: its persona, the player's and the NPC's turns. A scene record gives
one example per cast member who speaks, seen from that speaker (the layout of `npc_engine.prompt`): the
situation, the host and the others present in the system message, its own lines as NPC turns, every other
line as a `Name: words` turn (`Name to Other: words` when addressed to one character), cut after its last
line. Each example keeps the emotion and action of every NPC turn it trains (`labels`, in order) for the
structured-output header; they are not part of the text.

Training reads `train.jsonl` only; `dev.jsonl` is for `npc-engine eval`.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from npc_engine.prompt import PromptPersona, Scene, Turn


@dataclass
class Example:
    persona: PromptPersona
    turns: list[Turn]
    scene: Scene | None = None
    labels: list[tuple[str, str | None]] = field(default_factory=list)  # (emotion, action) per NPC turn
    genre: str = ""
    kind: str = "conversation"
    skills: list[str] = field(default_factory=list)


def read_split(corpus: Path, split: str) -> list[dict]:
    """Records of `<corpus>/npc-dialogue/<split>.jsonl`; a CorpusError names a missing or malformed file."""
    from npc_engine.train.data import CorpusError

    path = corpus / "npc-dialogue" / f"{split}.jsonl"
    if not path.is_file():
        raise CorpusError(f"{path}: not found (is --corpus the corpus folder?)")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{number}: not JSON ({e})") from None
    return records


def prompt_persona(p: dict) -> PromptPersona:
    return PromptPersona(name=p.get("name", ""), role=p.get("role", ""), facts=list(p.get("facts", [])),
                         style=p.get("style", ""), knowledge=list(p.get("knowledge", [])),
                         banned_topics=list(p.get("banned_topics", [])), deflection=p.get("deflection", ""))


def conversation_example(record: dict) -> Example:
    turns, labels = [], []
    for t in record["turns"]:
        turns.append(Turn("npc" if t["speaker"] == "npc" else "player", t["text"]))
        if t["speaker"] == "npc":
            labels.append((t.get("emotion", ""), t.get("action")))
    return Example(prompt_persona(record["persona"]), turns, None, labels, record.get("genre", ""),
                   "conversation", list(record.get("skills", [])))


def scene_examples(record: dict) -> list[Example]:
    cast = {c["id"]: c for c in record["cast"]}
    names = {cid: c["name"] for cid, c in cast.items()} | {"player": "Player", "all": ""}
    player_in = any("player" in (t["speaker"], t.get("to")) for t in record["turns"])
    host = cast.get(record.get("host") or "")
    examples = []
    for cid, member in cast.items():
        last = max((i for i, t in enumerate(record["turns"]) if t["speaker"] == cid), default=-1)
        if last < 0:
            continue
        present = [f"{c['name']}, {c['role']}" for other, c in cast.items() if other != cid]
        present += ["the player"] if player_in else []
        situation = record["situation"] + (
            "" if host is None else " You are the host." if host is member else f" The host is {host['name']}.")
        turns, labels = [], []
        for t in record["turns"][:last + 1]:
            to = names.get(t.get("to") or "all", t.get("to", ""))
            if t["speaker"] == cid:
                turns.append(Turn("npc", t["text"], to))
                labels.append((t.get("emotion", ""), t.get("action")))
            else:
                turns.append(Turn("player" if t["speaker"] == "player" else names[t["speaker"]], t["text"], to))
        examples.append(Example(prompt_persona(member), turns, Scene(situation, present), labels,
                                record.get("genre", ""), "scene"))
    return examples


def examples(records: list[dict]) -> list[Example]:
    out = []
    for record in records:
        out += scene_examples(record) if record["kind"] == "scene" else [conversation_example(record)]
    return out


def train_examples(corpus: Path) -> list[Example]:
    """Every training example of the corpus; the only reader the persona stage has (never the dev split)."""
    return examples(read_split(corpus, "train"))
