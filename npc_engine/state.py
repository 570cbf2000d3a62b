"""Conversation state per (npc, session): the history turns and the memories the game writes.

A `State` keeps every conversation in RAM, bounded (turns and bytes per conversation; conversations and
bytes in all, the least recently written leaving first) and, given a folder, in SQLite too: WAL mode,
one transaction per change (a finished line is one `add_turns`), everything reloaded at start. A change
reaches the disk before RAM, so a write that fails changes nothing, and a process killed at any moment
restarts with every change that had returned.

`export_blob` / `import_blob` move conversations into and out of a game's save file: a msgpack blob with
a format version, a checksum and a size cap. A blob that is not exactly right is refused with a stable
code (`bad_blob`, `blob_version`, `too_large`) and changes nothing.
"""
import hashlib
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from bridge.protocol import MAX_NAME_CHARS, MAX_NPC_CHARS, MAX_SESSION_CHARS
from npc_engine.prompt import Turn

BLOB_FORMAT = "npc-engine/state"
BLOB_VERSION = 1
SCHEMA_VERSION = 1  # of the SQLite file, in PRAGMA user_version
DB_NAME = "state.sqlite3"
# Codes of StateError: the first four are answered on the wire; `bad_state` stops the service at start.
ERROR_CODES = ("bad_blob", "blob_version", "too_large", "bad_request", "bad_state")


class StateError(Exception):
    def __init__(self, code: str, message: str):
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


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code}")


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_no_ext)
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


# ---- SQLite --------------------------------------------------------------------------------------------

def open_db(path: Path) -> sqlite3.Connection:
    """The state file, locked for this process alone, checked, with its schema in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    try:
        # EXCLUSIVE: the first write lock is kept until close, so a second service on the same folder is
        # refused instead of both caching diverging copies; WAL then needs no shared-memory file.
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # in WAL mode a killed process still loses no commit
        db.execute("BEGIN IMMEDIATE")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            db.execute("ROLLBACK")
            raise StateError("bad_state", f"{path} was written by a newer npc-engine (schema {version})")
        db.execute("CREATE TABLE IF NOT EXISTS conversations (scope TEXT NOT NULL, npc TEXT NOT NULL, "
                   "session TEXT NOT NULL, touched INTEGER NOT NULL, state BLOB NOT NULL, "
                   "PRIMARY KEY (scope, npc, session))")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
        problems = [row[0] for row in db.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise StateError("bad_state", f"{path} failed SQLite's integrity check: {'; '.join(problems[:3])}")
    except sqlite3.OperationalError as e:
        db.close()
        if "locked" in str(e):
            raise StateError("bad_state", f"{path} is in use by another process") from None
        raise StateError("bad_state", f"cannot open {path}: {e}") from None
    except sqlite3.DatabaseError as e:
        db.close()
        raise StateError("bad_state", f"{path} is damaged ({e}); move it aside to start with empty state") from None
    except StateError:
        db.close()
        raise
    return db


class State:
    """Every conversation of a service. Thread-safe; each public method that changes something is one
    SQLite transaction."""

    def __init__(self, limits: StateLimits | None = None, folder: str | Path | None = None):
        self.limits = limits or StateLimits()
        self.lock = threading.Lock()
        self.conversations: OrderedDict[Key, Conversation] = OrderedDict()  # least recently written first
        self.sizes: dict[Key, int] = {}
        self.total = 0
        self.clock = 0  # `touched` of the latest write: the LRU order on disk
        self.db = None if folder is None else open_db(Path(folder) / DB_NAME)
        if self.db is not None:
            self.load()

    def load(self) -> None:
        rows = self.db.execute("SELECT scope, npc, session, touched, state FROM conversations ORDER BY touched")
        trimmed = {}
        for scope, npc, session, touched, data in rows:
            key = Key(npc, session, scope)
            try:
                conv = from_record(unpack(data))
            except StateError as e:
                raise StateError("bad_state", f"conversation {key} in the state file is damaged: {e.message}") from None
            fitted = capped(conv, self.limits)  # the limits may be smaller than when it was written
            if fitted != conv:
                trimmed[key] = fitted
            self.conversations[key], self.sizes[key] = fitted, fitted.nbytes()
            self.total += self.sizes[key]
            self.clock = touched
        with self.lock:
            if trimmed:
                self.write(trimmed, touch=False)
            self.commit({})  # evicts beyond the global caps

    def close(self) -> None:
        with self.lock:
            if self.db is not None:
                self.db.close()
                self.db = None

    # ---- reading ---------------------------------------------------------------------------------------

    def get(self, key: Key) -> Conversation:
        """A copy of the conversation (empty when there is none)."""
        with self.lock:
            conv = self.conversations.get(key)
            return Conversation() if conv is None else conv.copy()

    def history(self, key: Key) -> list[Turn]:
        return self.get(key).turns

    def list_memories(self, key: Key) -> list[Memory]:
        return self.get(key).memories

    def conversation_keys(self) -> list[Key]:
        with self.lock:
            return list(self.conversations)

    # ---- changes ---------------------------------------------------------------------------------------

    def add_turns(self, key: Key, turns: list[Turn]) -> None:
        """Append turns (blank ones are skipped); the oldest leave over the caps."""
        if not all(_is_str(t.speaker, 1, MAX_NAME_CHARS) and isinstance(t.text, str) and isinstance(t.to, str)
                   for t in turns):
            raise ValueError("a turn needs a speaker of 1 to 128 characters and string text")
        turns = [t for t in turns if t.text.strip()]
        with self.lock:
            conv = self.conversations.get(key, Conversation()).copy()
            conv.turns += turns
            self.commit({key: capped(conv, self.limits)})

    def remember(self, key: Key, player_text: str, npc_text: str) -> None:
        """A finished line: the player's text and the NPC's, as one change (one transaction)."""
        self.add_turns(key, [Turn("player", player_text), Turn("npc", npc_text)])

    def add_memory(self, key: Key, text: str) -> Memory:
        """Remember a line about the player (whitespace collapsed); the oldest memory leaves over the cap."""
        text = " ".join(text.split())
        if not text:
            raise StateError("bad_request", "a memory needs some text")
        if len(text) > self.limits.memory_chars:
            raise StateError("too_large", f"the memory has {len(text)} characters, the limit is "
                                          f"{self.limits.memory_chars}")
        with self.lock:
            conv = self.conversations.get(key, Conversation()).copy()
            memory = Memory(conv.next_memory_id, text)
            conv.memories.append(memory)
            conv.next_memory_id += 1
            self.commit({key: capped(conv, self.limits)})
        return memory

    def forget_memory(self, key: Key, memory_id: int | None = None) -> int:
        """Forget one memory by id, or all of them with None; the number forgotten."""
        with self.lock:
            conv = self.conversations.get(key)
            if conv is None:
                return 0
            conv = conv.copy()
            kept = [m for m in conv.memories if memory_id is not None and m.id != memory_id]
            forgotten, conv.memories = len(conv.memories) - len(kept), kept
            if forgotten:
                self.commit({key: conv})
            return forgotten

    def export_blob(self, session: str, npc: str | None = None, scope: str = "") -> bytes:
        """The blob of one (npc, session), or with npc None of every NPC's conversation in the session.
        StateError `too_large` when a whole session does not fit the cap (export its NPCs one by one)."""
        with self.lock:
            if npc is not None:
                conv = self.conversations.get(Key(npc, session, scope))
                convs = {} if conv is None else {npc: conv.copy()}
            else:
                convs = {k.npc: c.copy() for k, c in self.conversations.items()
                         if k.session == session and k.scope == scope}
        blob = pack_blob(session, npc, convs)
        if len(blob) > self.limits.blob_bytes:
            raise StateError("too_large", f"session '{session}' needs {len(blob)} bytes, the blob limit is "
                                          f"{self.limits.blob_bytes}: export its NPCs one at a time")
        return blob

    def import_blob(self, blob: bytes, session: str | None = None, scope: str = "") -> list[Key]:
        """Restore a blob, into `session` when given (else the blob's own). It replaces what it covers: the
        conversation of its NPC, or of a whole-session blob every conversation of the session. The caps
        apply as to new turns. Returns the keys restored; StateError (nothing changed) for a bad blob."""
        blob_session, npc, convs = open_blob(blob, self.limits)
        session = session or blob_session
        new = {Key(n, session, scope): capped(c, self.limits) for n, c in convs.items()}
        with self.lock:
            stale = [Key(npc, session, scope)] if npc is not None else [
                k for k in self.conversations if k.session == session and k.scope == scope]
            changes: dict[Key, Conversation | None] = {k: None for k in stale if k in self.conversations}
            changes.update(new)
            self.commit(changes)
        return sorted(new)

    def commit(self, changes: dict[Key, Conversation | None]) -> None:
        """Set conversations (None removes one) and evict the least recently written beyond the global
        caps: in one SQLite transaction first, then in RAM. The caller holds the lock."""
        sizes = {k: 0 if c is None else c.nbytes() for k, c in changes.items()}
        total = self.total + sum(s - self.sizes.get(k, 0) for k, s in sizes.items())
        count = len(self.conversations) + sum((c is not None) - (k in self.conversations) for k, c in changes.items())
        evict = []
        for key in self.conversations:
            if count <= self.limits.conversations and total <= self.limits.total_bytes:
                break
            if key not in changes:
                evict.append(key)
                count -= 1
                total -= self.sizes[key]
        changes = {**dict.fromkeys(evict), **changes}
        if not changes:
            return
        if self.db is not None:
            self.write(changes)
        for key, conv in changes.items():
            self.total -= self.sizes.pop(key, 0)
            self.conversations.pop(key, None)
            if conv is not None:
                self.conversations[key], self.sizes[key] = conv, sizes[key]
                self.total += sizes[key]

    def write(self, changes: dict[Key, Conversation | None], touch: bool = True) -> None:
        """One transaction; touch=False keeps the conversations' places in the LRU order."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for key, conv in changes.items():
                if conv is None:
                    db.execute("DELETE FROM conversations WHERE scope = ? AND npc = ? AND session = ?",
                               (key.scope, key.npc, key.session))
                elif not touch:
                    db.execute("UPDATE conversations SET state = ? WHERE scope = ? AND npc = ? AND session = ?",
                               (msgpack.packb(to_record(conv), use_bin_type=True), key.scope, key.npc, key.session))
                else:
                    self.clock += 1
                    db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, npc, session) "
                               "DO UPDATE SET touched = excluded.touched, state = excluded.state",
                               (key.scope, key.npc, key.session, self.clock,
                                msgpack.packb(to_record(conv), use_bin_type=True)))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
