"""What a conversation is and how it is written down: the history turns and memories of one (npc, session),
the caps that bound them, and their msgpack forms (a record per conversation, for SQLite rows and save blobs
alike; a blob with a format version, a checksum and a size cap). A blob that is not exactly right is refused
with a stable code (`bad_blob`, `blob_version`, `too_large`). npc_engine.state keeps conversations."""
import hashlib
from dataclasses import dataclass, field
from typing import Any

import msgpack

from bridge import protocol
from bridge.protocol import MAX_NAME_CHARS, MAX_NPC_CHARS, MAX_SESSION_CHARS
from npc_engine.prompt import Turn

BLOB_FORMAT = "npc-engine/state"
BLOB_VERSION = 1
# Codes of StateError: the first four are answered on the wire; `bad_state` stops the service at start.
ERROR_CODES = ("bad_blob", "blob_version", "too_large", "bad_request", "bad_state")


class StateError(Exception):
    def __init__(self, code: str, message: str):
        assert code in ERROR_CODES, code
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, order=True)
class Key:
    npc: str
    session: str
    scope: str = ""  # whose conversation it is: "" for the one trusted game, else e.g. a client's CURVE key

    def __post_init__(self):
        if not (_is_str(self.npc, 1, MAX_NPC_CHARS) and _is_str(self.session, 1, MAX_SESSION_CHARS)
                and isinstance(self.scope, str)):
            raise ValueError(f"not a conversation key: {self!r}")


@dataclass(frozen=True)
class Memory:
    id: int
    text: str


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    memories: list[Memory] = field(default_factory=list)  # oldest first
    next_memory_id: int = 1
    dropped: int = 0  # turns that left the history over its caps since the conversation began

    def copy(self) -> "Conversation":
        return Conversation(list(self.turns), list(self.memories), self.next_memory_id, self.dropped)

    def nbytes(self) -> int:
        """What the conversation counts against StateLimits.total_bytes."""
        return 64 + sum(turn_bytes(t) + 16 for t in self.turns) + sum(len(m.text.encode()) + 16 for m in self.memories)


@dataclass(frozen=True)
class StateLimits:
    history_turns: int = 64
    history_bytes: int = 16 << 10  # UTF-8 bytes of the turns' strings (turn_bytes), per conversation
    memories: int = 16  # per conversation; the oldest leaves first
    memory_chars: int = 200
    conversations: int = 10_000
    total_bytes: int = 64 << 20  # all conversations together (Conversation.nbytes)
    blob_bytes: int = 48 << 10

    def __post_init__(self):
        # Bounds msgpack's overhead per turn, per memory (4 bytes per character at most) and per blob, so
        # that one conversation always fits a blob: exporting a single (npc, session) never fails.
        worst = self.history_bytes + 16 * self.history_turns + self.memories * (4 * self.memory_chars + 16) + 1024
        if worst > self.blob_bytes:
            raise ValueError(f"a conversation can need {worst} bytes, more than blob_bytes={self.blob_bytes}")
        if self.total_bytes < self.blob_bytes or self.conversations < 1:
            raise ValueError("total_bytes must hold at least one blob and conversations be at least 1")


def turn_bytes(turn: Turn) -> int:
    return len(turn.speaker.encode()) + len(turn.text.encode()) + len(turn.to.encode())


def capped(conv: Conversation, limits: StateLimits) -> Conversation:
    """The conversation within the per-conversation caps: oldest turns and memories out first, memory
    lines cut to `memory_chars`."""
    turns, drop = conv.turns, max(0, len(conv.turns) - limits.history_turns)
    size = sum(turn_bytes(t) for t in turns[drop:])
    while size > limits.history_bytes:
        size -= turn_bytes(turns[drop])
        drop += 1
    memories = [m if len(m.text) <= limits.memory_chars else Memory(m.id, m.text[:limits.memory_chars])
                for m in conv.memories[-limits.memories:]]
    return Conversation(turns[drop:], memories, conv.next_memory_id, conv.dropped + drop)


# ---- encoding: one conversation as a msgpack-ready record (SQLite rows and blobs alike) ---------------

def to_record(conv: Conversation) -> dict:
    return {"turns": [[t.speaker, t.text, t.to] if t.to else [t.speaker, t.text] for t in conv.turns],
            "memories": [[m.id, m.text] for m in conv.memories],
            "next_memory_id": conv.next_memory_id, "dropped": conv.dropped}


def pack_record(conv: Conversation) -> bytes:
    return msgpack.packb(to_record(conv), use_bin_type=True)


def is_turn(turn: Turn) -> bool:
    return _is_str(turn.speaker, 1, MAX_NAME_CHARS) and isinstance(turn.text, str) and isinstance(turn.to, str)


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise StateError("bad_blob", what)


def _is_int(value: Any, lo: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value < 2**63


def _is_str(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, str) and lo <= len(value) <= hi


def from_record(rec: Any) -> Conversation:
    """The Conversation of a record; StateError `bad_blob` naming the first thing that is wrong."""
    _require(isinstance(rec, dict), "a conversation must be a map")
    turns, memories = rec.get("turns"), rec.get("memories")
    _require(isinstance(turns, list) and all(isinstance(t, list) and len(t) in (2, 3)
                                             and _is_str(t[0], 1, MAX_NAME_CHARS)
                                             and all(isinstance(s, str) for s in t[1:]) for t in turns),
             "'turns' must be an array of [speaker, text] or [speaker, text, addressee]")
    _require(isinstance(memories, list) and all(isinstance(m, list) and len(m) == 2 and _is_int(m[0], 1)
                                                and isinstance(m[1], str) for m in memories),
             "'memories' must be an array of [id, text] with a positive integer id")
    ids = [m[0] for m in memories]
    _require(ids == sorted(set(ids)), "memory ids must increase")
    next_id, dropped = rec.get("next_memory_id"), rec.get("dropped")
    _require(_is_int(next_id, 1) and (not ids or next_id > ids[-1]), "'next_memory_id' must exceed every memory id")
    _require(_is_int(dropped, 0), "'dropped' must be an integer >= 0")
    return Conversation([Turn(*t) for t in turns], [Memory(i, t) for i, t in memories], next_id, dropped)


def unpack(data: bytes) -> Any:
    try:
        return protocol.unpack(data)
    except (ValueError, msgpack.UnpackException) as e:  # also UnicodeDecodeError, ExtraData, FormatError
        raise StateError("bad_blob", f"not valid msgpack ({type(e).__name__})") from None


def checksum(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


def pack_blob(session: str, npc: str | None, conversations: dict[str, Conversation]) -> bytes:
    body = msgpack.packb({"session": session, "npc": npc,
                          "conversations": [{"npc": n, **to_record(c)} for n, c in sorted(conversations.items())]},
                         use_bin_type=True)
    return msgpack.packb({"format": BLOB_FORMAT, "version": BLOB_VERSION, "body": body, "checksum": checksum(body)},
                         use_bin_type=True)


def open_blob(blob: Any, limits: StateLimits) -> tuple[str, str | None, dict[str, Conversation]]:
    """(session, npc or None for a whole session, {npc: conversation}) of a blob, within `limits`;
    StateError `too_large`, `blob_version` or `bad_blob` otherwise."""
    _require(isinstance(blob, (bytes, bytearray)), "a blob is bytes (msgpack bin)")
    if len(blob) > limits.blob_bytes:
        raise StateError("too_large", f"the blob is {len(blob)} bytes, the limit is {limits.blob_bytes}")
    env = unpack(bytes(blob))
    _require(isinstance(env, dict) and env.get("format") == BLOB_FORMAT, "not an npc-engine state blob")
    version = env.get("version")
    _require(_is_int(version, 0), "the blob has no format version")
    if version != BLOB_VERSION:
        raise StateError("blob_version", f"the blob has format version {version}; this service reads {BLOB_VERSION}")
    body = env.get("body")
    _require(isinstance(body, bytes) and env.get("checksum") == checksum(body),
             "checksum mismatch: the blob was damaged or changed")
    body = unpack(body)
    _require(isinstance(body, dict), "the blob's body must be a map")
    session, npc, convs = body.get("session"), body.get("npc"), body.get("conversations")
    _require(_is_str(session, 1, MAX_SESSION_CHARS), "'session' must be a string of 1 to 128 characters")
    _require(npc is None or _is_str(npc, 1, MAX_NPC_CHARS), "'npc' must be nil or a string of 1 to 64 characters")
    _require(isinstance(convs, list) and all(isinstance(c, dict) and _is_str(c.get("npc"), 1, MAX_NPC_CHARS)
                                             for c in convs), "'conversations' must be an array of maps with 'npc'")
    out = {c["npc"]: from_record(c) for c in convs}
    _require(len(out) == len(convs), "an NPC appears twice in 'conversations'")
    _require(npc is None or set(out) <= {npc}, f"a blob of NPC '{npc}' holds another NPC's conversation")
    if len(out) > limits.conversations:
        raise StateError("too_large", f"the blob holds {len(out)} conversations, the limit is {limits.conversations}")
    return session, npc, out
