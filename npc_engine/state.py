"""Conversation state per (npc, session): the history turns and the memories the game writes.

A `State` keeps every conversation in RAM, bounded (turns and bytes per conversation; conversations and
bytes in all, the least recently written leaving first) and, given a folder, in SQLite too: WAL mode,
one transaction per change (a finished line is one `add_turns`), everything reloaded at start. A change
reaches the disk before RAM, so a write that fails changes nothing, and a process killed at any moment
restarts with every change that had returned.

`export_blob` / `import_blob` move conversations into and out of a game's save file (the blob format is
npc_engine.conversation's); a blob that is refused changes nothing.
"""
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path

from npc_engine.conversation import (
    Conversation,
    Key,
    Memory,
    StateError,
    StateLimits,
    capped,
    from_record,
    is_turn,
    open_blob,
    pack_blob,
    pack_record,
    unpack,
)
from npc_engine.prompt import Turn

SCHEMA_VERSION = 1  # of the SQLite file, in PRAGMA user_version
DB_NAME = "state.sqlite3"


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
        if not all(is_turn(t) for t in turns):
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
                               (pack_record(conv), key.scope, key.npc, key.session))
                else:
                    self.clock += 1
                    db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, npc, session) "
                               "DO UPDATE SET touched = excluded.touched, state = excluded.state",
                               (key.scope, key.npc, key.session, self.clock,
                                pack_record(conv)))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
