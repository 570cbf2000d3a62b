"""Stage `prepare`: the corpus (see ../shared/corpus/README.md) turned into cleaned book text and
NPC conversations, with fixed held-out splits.

Outputs in `<work>/data/`: books_{train,val}.jsonl ({"pg", "title", "text"}, paragraphs joined by
newlines), conv_{train,dev,val}.jsonl ({"source", "persona": PromptPersona fields, "turns":
[[speaker, text], ...]}) and split.json. Training conversations come from three sources: both role
assignments of each Synthetic-Persona-Chat dialogue, one question-and-answer exchange per training
persona (questions about its name and facts, answered with them), and dialogue mined from books.

Held out (val): the books whose sha1(pg number) ranks lowest (a fraction, at least one), and every
Synthetic-Persona-Chat conversation in which either persona ranks lowest by sha1 of its facts.
Training books also lose every paragraph that appears verbatim in a held-out book (the corpus holds
several editions of Andersen, Grimm and Homer), and dialogue is mined from training books only.
The next-ranked personas form the dev split, which finetuning uses to pick its best step, so the
val conversations stay unseen by every choice made in training.
"""
import csv
import hashlib
import json
import lzma
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from npc_engine.prompt import PromptPersona, Turn
from npc_engine.train.books import clean_book, mine_dialogue

BOOK_FILES = "books/books-*.jsonl.xz"
DIALOGUE_FILES = "dialogue/Synthetic-Persona-Chat_*.csv.xz"
PERSONA_CHAT_COLUMNS = ("user 1 personas", "user 2 personas", "Best Generated Conversation")


class CorpusError(Exception):
    """The corpus folder is missing or malformed; the message names the file."""


# ---------------------------------------------------------------- reading

def read_books(corpus: Path) -> list[dict]:
    files = sorted(corpus.glob(BOOK_FILES))
    if not files:
        raise CorpusError(f"{corpus}: no {BOOK_FILES} found (is --corpus the corpus folder?)")
    books = []
    for file in files:
        with lzma.open(file, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                try:
                    book = json.loads(line)
                    books.append({"pg": book.get("pg", ""), "title": str(book.get("title", "")),
                                  "text": str(book["text"])})
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CorpusError(f"{file}:{number}: not a book record ({e})") from None
    return books


def book_key(book: dict) -> str:
    """The Project Gutenberg number, or the title where the record has none."""
    return str(book["pg"]) if book["pg"] not in ("", None) else "title:" + book["title"]


def read_persona_chat(corpus: Path) -> list[dict]:
    files = sorted(corpus.glob(DIALOGUE_FILES))
    if not files:
        raise CorpusError(f"{corpus}: no {DIALOGUE_FILES} found")
    rows = []
    for file in files:
        with lzma.open(file, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in PERSONA_CHAT_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise CorpusError(f"{file}: missing columns {missing}")
            rows += list(reader)
    return rows


# ---------------------------------------------------------------- Synthetic-Persona-Chat

NAME_PLACEHOLDER_RE = re.compile(r"\[\s*user\s*_?\s*([12])\s*(?:'s)?\s*(?:name)?\s*\]", re.IGNORECASE)
PLACEHOLDER_RE = re.compile(r"\[[^\]]*\]")
TURN_RE = re.compile(r"^\s*User ([12])\s*:\s*(.*)$")
NAMES = ["Ada", "Ben", "Cora", "Dan", "Eli", "Faye", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena", "Milo", "Nora",
         "Owen", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wade", "Xena", "Yuri", "Zoe", "Alma",
         "Bruno", "Clara", "Dmitri", "Elsa", "Felix", "Greta", "Hugo", "Iris", "Jonas", "Kira", "Leo", "Mara",
         "Nico", "Olga", "Pablo", "Rhea", "Silas", "Tess", "Ulf", "Vera", "Will", "Yara", "Zane"]


def stable_hash(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:15], 16)


def persona_facts(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def persona_key(facts: list[str]) -> str:
    return "\n".join(f.lower() for f in facts)


def conversation_lines(text: str) -> list[tuple[int, str]]:
    """(user number, text) turns; untagged lines continue the turn above; repeated speakers merge."""
    turns: list[list] = []
    for line in text.splitlines():
        m = TURN_RE.match(line)
        if m:
            user, said = int(m.group(1)), m.group(2).strip()
            if turns and turns[-1][0] == user:
                turns[-1][1] += " " + said
            else:
                turns.append([user, said])
        elif turns and line.strip():
            turns[-1][1] += "\n" + line.strip()
    return [(u, t.strip()) for u, t in turns if t.strip()]


TOPICS = [  # (topic, fact pattern); the first topic whose pattern matches a fact takes it
    ("favorite", re.compile(r"\bmy (?:favorite|favourite) (\w+(?: \w+)?) (?:is|are)\b", re.I)),
    ("pets", re.compile(r"\b(?:pets?|dogs?|cats?|pupp(?:y|ies)|kittens?|fish|birds?|parrots?|hamsters?|horses?|"
                        r"rabbits?|snakes?|lizards?|turtles?)\b", re.I)),
    ("job", re.compile(r"\b(?:work|works|job|career|employed|teacher|nurse|doctor|engineer|lawyer|chef|cook|student|"
                       r"waitress|waiter|farmer|writer|artist|musician|accountant|police|firefighter|mechanic|"
                       r"programmer|retired|manager|cashier|clerk|pilot|soldier|scientist|professor|vet|dentist|"
                       r"barista|baker|attorney|singer|actor|actress|driver|designer|librarian|photographer|plumber|"
                       r"carpenter|business)\b", re.I)),
    ("family", re.compile(r"\b(?:married|wife|husband|kids|children|sons?|daughters?|brothers?|sisters?|mom|mother|"
                          r"dad|father|parents|family|siblings|grandchildren|twins?)\b", re.I)),
    ("home", re.compile(r"\b(?:live in|lives in|living in|from|grew up|born in|moved to|raised in|hometown)\b", re.I)),
    ("hobbies", re.compile(r"\b(?:like|love|enjoy|hobby|hobbies|passion|play|fan of)\b", re.I)),
]
QA_QUESTIONS = {  # training's wordings; the adherence eval asks in other words (eval.EVAL_QUESTIONS)
    "favorite": ["Which {} do you like best?", "Tell me, what {} do you like most?"],
    "pets": ["Got any animals at home?", "Do you keep any animals?", "Any furry friends at home?"],
    "job": ["So, what's your job?", "What kind of work do you do?", "How do you earn your keep?"],
    "family": ["Do you have family?", "Who's in your family?", "Tell me about your folks."],
    "home": ["Where do you live?", "Where did you grow up?", "Where is home for you?"],
    "hobbies": ["What do you do in your free time?", "What are your hobbies?", "How do you spend your days off?"],
    "name": ["What's your name?", "Who are you?", "May I ask your name?"],
}
NAME_ANSWERS = ["I'm {}.", "My name is {}.", "They call me {}."]


def fact_topics(facts: list[str]) -> dict[str, list[str]]:
    """topic -> the facts that answer it; each favourite is its own topic ("favorite color")."""
    topics: dict[str, list[str]] = {}
    for fact in facts:
        for topic, pattern in TOPICS:
            m = pattern.search(fact)
            if m:
                topics.setdefault(f"favorite {m.group(1).lower()}" if topic == "favorite" else topic, []).append(fact)
                break
    return topics


def persona_qa_example(persona: PromptPersona) -> dict:
    """A conversation of direct questions about the persona answered with its own facts (and name),
    in an order and wording fixed by the persona's hash: it teaches the model to draw on the block."""
    key = persona_key(persona.facts)
    topics = [("name", [])] + list(fact_topics(persona.facts).items())
    topics.sort(key=lambda t: stable_hash(key + t[0]))
    turns = []
    for topic, facts in topics:
        kind, _, thing = topic.partition(" ")
        wordings = QA_QUESTIONS[kind]
        turns.append(["player", wordings[stable_hash(key + topic) % len(wordings)].format(thing)])
        name_answer = NAME_ANSWERS[stable_hash(key) % len(NAME_ANSWERS)]
        answer = name_answer.format(persona.name) if kind == "name" else " ".join(facts)
        turns.append(["npc", answer])
    return {"source": "persona-qa", "persona": asdict(persona), "turns": turns}


def persona_chat_examples(row: dict) -> list[dict]:
    """Both role assignments of one conversation: the NPC is User 2 (its persona), then User 1.
    Name placeholders get a name (the NPC's shows in its persona); the conversation ends before the
    first turn with any other placeholder."""
    facts = {1: persona_facts(row["user 1 personas"]), 2: persona_facts(row["user 2 personas"])}
    names = {1: NAMES[stable_hash(persona_key(facts[1])) % len(NAMES)]}
    names[2] = NAMES[stable_hash(persona_key(facts[2])) % len(NAMES)]
    if names[2] == names[1]:
        names[2] = NAMES[(NAMES.index(names[1]) + 1) % len(NAMES)]
    lines = []
    for user, text in conversation_lines(row["Best Generated Conversation"]):
        text = NAME_PLACEHOLDER_RE.sub(lambda m: names[int(m.group(1))], text)
        if PLACEHOLDER_RE.search(text):
            break
        lines.append((user, text))
    examples = []
    for npc in (2, 1):
        turns = [("npc" if user == npc else "player", text) for user, text in lines]
        while turns and turns[-1][0] == "player":
            turns.pop()
        if len(turns) >= 2 and facts[npc]:
            persona = PromptPersona(name=names[npc], facts=facts[npc])
            examples.append({"source": "persona-chat", "persona": asdict(persona), "turns": [list(t) for t in turns]})
    return examples


# ---------------------------------------------------------------- split and stage

def held_out(keys, *fractions: float) -> list[set]:
    """Consecutive slices of the keys ranked by sha1: one set per fraction, each at least one key
    while a key is left for training."""
    ranked = sorted(set(keys), key=lambda k: (stable_hash(str(k)), str(k)))
    sets, start = [], 0
    for fraction in fractions:
        n = max(1, round(fraction * len(ranked))) if len(ranked) - start >= 2 else 0
        sets.append(set(ranked[start:start + n]))
        start += n
    return sets


def record_persona(record: dict) -> PromptPersona:
    return PromptPersona(**record["persona"])


def record_turns(record: dict) -> list[Turn]:
    return [Turn(speaker, text) for speaker, text in record["turns"]]


def write_jsonl(path: Path, records) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _clean(book: dict) -> list[str]:
    return clean_book(book["text"])


def _mine(args: tuple[list[str], int]) -> list[dict]:
    return mine_dialogue(*args)


def prepare(corpus: Path, work: Path, config, log=print) -> dict:
    out = work / "data"
    out.mkdir(parents=True, exist_ok=True)
    books = read_books(corpus)
    rows = read_persona_chat(corpus)
    [val_keys] = held_out([book_key(b) for b in books], config.val_book_fraction)
    workers = max(1, min(os.cpu_count() or 1, 16, len(books)))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        cleaned = list(pool.map(_clean, books, chunksize=1))
        val_paragraphs = {p for b, ps in zip(books, cleaned) if book_key(b) in val_keys for p in ps if len(p) >= 40}
        train = [(b, [p for p in ps if p not in val_paragraphs])
                 for b, ps in zip(books, cleaned) if book_key(b) not in val_keys]
        mined = list(pool.map(_mine, [(ps, config.max_mined_per_book) for _, ps in train], chunksize=1))
    n_books_train = write_jsonl(out / "books_train.jsonl",
                                ({"pg": b["pg"], "title": b["title"], "text": "\n".join(ps)} for b, ps in train if ps))
    write_jsonl(out / "books_val.jsonl", ({"pg": b["pg"], "title": b["title"], "text": "\n".join(ps)}
                                          for b, ps in zip(books, cleaned) if book_key(b) in val_keys))

    persona_keys = [persona_key(persona_facts(r[c])) for r in rows for c in PERSONA_CHAT_COLUMNS[:2]]
    val_personas, dev_personas = held_out(persona_keys, config.val_persona_fraction, config.dev_persona_fraction)
    chat_train, chat_dev, chat_val = [], [], []
    for row in rows:
        keys = {persona_key(persona_facts(row[c])) for c in PERSONA_CHAT_COLUMNS[:2]}
        split = chat_val if keys & val_personas else chat_dev if keys & dev_personas else chat_train
        split.extend(persona_chat_examples(row))
    qa_personas = {persona_key(e["persona"]["facts"]): PromptPersona(**e["persona"]) for e in chat_train}
    persona_qa = [persona_qa_example(p) for p in qa_personas.values()]
    book_conversations = [c for per_book in mined for c in per_book]
    n_conv_train = write_jsonl(out / "conv_train.jsonl", chat_train + persona_qa + book_conversations)
    write_jsonl(out / "conv_dev.jsonl", chat_dev)
    write_jsonl(out / "conv_val.jsonl", chat_val)
    stats = {
        "books_train": n_books_train, "books_val": len(val_keys), "val_books": sorted(val_keys),
        "book_chars_train": sum(len(p) + 1 for _, ps in train for p in ps),
        "book_chars_val": sum(len(p) + 1 for b, ps in zip(books, cleaned) if book_key(b) in val_keys for p in ps),
        "paragraphs_dropped_as_val_duplicates":
            sum(len(c) for b, c in zip(books, cleaned) if book_key(b) not in val_keys)
        - sum(len(ps) for _, ps in train),
        "persona_chat_rows": len(rows), "val_personas": len(val_personas),
        "dev_personas": len(dev_personas), "persona_chat_train": len(chat_train), "persona_chat_dev": len(chat_dev),
        "persona_chat_val": len(chat_val), "persona_qa": len(persona_qa),
        "book_conversations": len(book_conversations), "conv_train": n_conv_train,
    }
    (out / "split.json").write_text(json.dumps({**stats, "val_persona_keys": sorted(val_personas)}, indent=1) + "\n")
    log("prepare: " + ", ".join(f"{k}={v}" for k, v in stats.items() if k != "val_books"))
    return stats
