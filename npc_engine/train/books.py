"""Book text for training: a Project Gutenberg book cleaned into paragraphs (notes, credits and footnote marks
out), and the dialogue in them (quoted prose, or play lines "NAME. speech") mined into NPC conversations."""
import re
from collections import Counter
from dataclasses import asdict

from npc_engine.prompt import PromptPersona

# ---------------------------------------------------------------- cleaning books

NOTE_RE = re.compile(r"\[(?:Illustration|Footnote|Transcriber)[^\]]*\]", re.IGNORECASE)
FOOTNOTE_REF_RE = re.compile(r"\[\d+\]")
TAIL_NOTE_RE = re.compile(r"(?im)^\W*(?:transcriber[’']?s?\s+notes?|errors and anomalies noted by transcriber"
                          r"|errata \(noted by transcriber\))")
CREDIT_RE = re.compile(r"(?i)proofread|pgdp|produced (?:by|from)|e-?text|transcriber|internet archive|scanned|"
                       r"generously|made available|project gutenberg|https?:|www\.|html version|prepared by|"
                       r"^cover$")
WHITESPACE_RE = re.compile(r"\s+")


def clean_book(text: str) -> list[str]:
    """Body paragraphs, unwrapped to one line each: no producer credits, transcriber notes,
    illustration/footnote markers, italics underscores or runs of whitespace."""
    text = NOTE_RE.sub(" ", text.replace("\r\n", "\n"))
    tail = TAIL_NOTE_RE.search(text, int(len(text) * 0.8))
    if tail:
        text = text[:tail.start()]
    raw = re.split(r"\n[ \t]*\n", text)
    start = 0
    while start < min(len(raw), 12) and CREDIT_RE.search(raw[start].strip()):
        start += 1
    paragraphs, in_note = [], False
    for block in raw[start:]:
        if re.match(r"\W*transcriber", block, re.IGNORECASE):
            in_note = True  # an unbracketed note: its heading and the indented lines under it
            continue
        if in_note and block[:1] in (" ", "\t"):
            continue
        in_note = False
        line = WHITESPACE_RE.sub(" ", FOOTNOTE_REF_RE.sub("", block.replace("_", ""))).strip()
        if any(c.isalnum() for c in line):
            paragraphs.append(line)
    return paragraphs


# ---------------------------------------------------------------- mining dialogue from books

TITLE = r"(?:(?:MRS?|MISS|DR|ST|SIR|LADY|LORD|MME|MLLE)\.? )?"
PLAY_LINE_RE = re.compile(rf"^({TITLE}[A-Z][A-Z'’\-]+(?: [A-Z][A-Z'’\-]+){{0,3}})"
                          rf"(?: ?[(\[][^)\]]{{0,300}}[)\]])?[.:] +(.+)$")
NOT_SPEAKERS = {"ACT", "SCENE", "CHAPTER", "THE END", "END", "CONTENTS", "INTRODUCTION", "PREFACE", "NOTE", "NOTES",
                "FOOTNOTES", "INDEX", "BOOK", "PART", "CANTO", "FINIS", "EPILOGUE", "PROLOGUE", "CURTAIN", "ALL",
                "THE", "A", "I", "O", "NO", "YES"}
ROMAN_RE = re.compile(r"^[IVXLC]+$")
STAGE_DIRECTION_RE = re.compile(r"[\[(][^\])]*[\])]")
QUOTE_RE = re.compile(r'"([^"]+)"|“([^”]+)”')
SPEECH_VERBS = (r"(?:said|says|cried|asked|answered|replied|exclaimed|shouted|whispered|continued|returned|added|"
                r"called|murmured|screamed|roared|observed|remarked|inquired|demanded|repeated|declared|muttered|"
                r"sighed|laughed|growled|began)")
NAME = r"([A-Z][a-z'’\-]+(?: [A-Z][a-z'’\-]+){0,2})"
SPEAKER_AFTER_VERB_RE = re.compile(rf"\b{SPEECH_VERBS} (?:the |little |old )?{NAME}")
SPEAKER_BEFORE_VERB_RE = re.compile(rf"{NAME} {SPEECH_VERBS}\b")
NOT_NAMES = {"He", "She", "I", "They", "It", "We", "You", "The", "But", "And", "Then", "This", "That", "There",
             "Here", "So", "Now", "Yes", "No", "Oh", "Well", "What", "When", "Who", "His", "Her", "My", "Our",
             "Your", "A", "An", "At", "In", "On", "As", "If", "All", "One", "Some", "Each", "Both"}
DRAMATIS_RE = re.compile(r"^([A-Z][A-Z .'’\-]{1,40}), (?:an? |the |his |her )?([^.]{3,60})\.?$")
MAX_UTTERANCES = 8
MAX_SPEECH_CHARS = 500


def play_line(paragraph: str) -> tuple[str, str] | None:
    m = PLAY_LINE_RE.match(paragraph)
    if not m:
        return None
    name = m.group(1).strip()
    speech = WHITESPACE_RE.sub(" ", STAGE_DIRECTION_RE.sub(" ", m.group(2))).strip()
    if name in NOT_SPEAKERS or ROMAN_RE.match(name) or not re.search(r"[a-z]", speech):
        return None
    return name.title(), speech


def prose_speaker(narration: str) -> str | None:
    for pattern in (SPEAKER_AFTER_VERB_RE, SPEAKER_BEFORE_VERB_RE):
        m = pattern.search(narration)
        if m and m.group(1).split()[0] not in NOT_NAMES:
            return m.group(1)
    return None


def prose_line(paragraph: str) -> tuple[str | None, str] | None:
    """A paragraph that opens with a quotation: (speaker if the narration names one, quoted words)."""
    if not paragraph.startswith(('"', "“")):
        return None
    closed = paragraph + ('"' if paragraph.count('"') % 2 else "")
    closed += "”" if paragraph.count("“") > paragraph.count("”") else ""
    parts = [a or b for a, b in QUOTE_RE.findall(closed)]
    speech = WHITESPACE_RE.sub(" ", " ".join(p.strip() for p in parts)).strip()
    if not re.search(r"[A-Za-z]", speech):
        return None
    if speech.endswith(","):
        speech = speech[:-1] + "."
    return prose_speaker(QUOTE_RE.sub(" ", closed)), speech


def last_sentence(paragraph: str, limit: int = 200) -> str:
    sentences = re.split(r"(?<=[.!?])\s+", paragraph)
    s = sentences[-1].strip()
    return s if 20 <= len(s) <= limit and '"' not in s and "“" not in s else ""


def dramatis_roles(paragraphs: list[str]) -> dict[str, str]:
    """Roles from a play's cast list ("IRINA ARKADINA, an actress"), keyed by each word of the name."""
    roles = {}
    for p in paragraphs[: max(40, len(paragraphs) // 10)]:
        m = DRAMATIS_RE.match(p)
        if m:
            for key in [m.group(1)] + m.group(1).split():
                roles.setdefault(key.strip().title(), m.group(2).strip())
    return roles


def window_conversation(window: list[tuple[str | None, str]], kind: str, context: str, roles: dict[str, str]) -> dict:
    """A run of utterances as one conversation: the NPC is the second speaker."""
    if kind == "play":
        npc = window[1][0]
        turns = [("npc", s) if who == npc else ("player", f"{who}: {s}") for who, s in window]
        npc_name = npc
    else:  # prose: speakers alternate; names only where the narration gives them consistently
        npc_names = Counter(who for i, (who, _) in enumerate(window) if i % 2 and who)
        player_names = Counter(who for i, (who, _) in enumerate(window) if i % 2 == 0 and who)
        npc_name = npc_names.most_common(1)[0][0] if npc_names else ""
        player_name = player_names.most_common(1)[0][0] if player_names else ""
        if npc_name and npc_name in player_names:
            npc_name = ""
        if player_name and player_name == npc_name:
            player_name = ""
        turns = [("npc", s) if i % 2 else ("player", f"{player_name}: {s}" if player_name else s)
                 for i, (_, s) in enumerate(window)]
    while turns and turns[-1][0] == "player":
        turns.pop()
    persona = PromptPersona(name=npc_name or "", role=roles.get(npc_name, "") if npc_name else "",
                            facts=[context] if context else [])
    return {"source": "book", "persona": asdict(persona), "turns": [list(t) for t in turns]}


def mine_dialogue(paragraphs: list[str], max_conversations: int) -> list[dict]:
    """Runs of consecutive dialogue paragraphs (quoted prose, or play lines "NAME. speech"), cut into
    windows of at most MAX_UTTERANCES; the narration sentence before a run becomes the NPC's fact."""
    roles = dramatis_roles(paragraphs)
    conversations, run, kind, context, run_context = [], [], None, "", ""

    def flush():
        for start in range(0, len(run), MAX_UTTERANCES):
            window = run[start:start + MAX_UTTERANCES]
            if len(window) >= 2:
                conversation = window_conversation(window, kind, run_context if start == 0 else "", roles)
                if len(conversation["turns"]) >= 2:
                    conversations.append(conversation)

    for p in paragraphs:
        line = play_line(p)
        line_kind = "play" if line else None
        if line is None:
            line = prose_line(p)
            line_kind = "prose" if line else None
        if line is None or len(line[1]) > MAX_SPEECH_CHARS or line_kind != kind:
            flush()
            run, kind, run_context = [], None, context
        if line is None or len(line[1]) > MAX_SPEECH_CHARS:
            context = last_sentence(p) if line is None else ""
            continue
        if not run:
            kind, run_context = line_kind, context
        run.append(line)
    flush()
    if len(conversations) > max_conversations:  # evenly spaced through the book
        step = len(conversations) / max_conversations
        conversations = [conversations[int(i * step)] for i in range(max_conversations)]
    return conversations
