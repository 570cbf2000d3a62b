"""Conversation state: caps, memories, blobs (round trips and every kind of bad blob), SQLite durability."""
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from bridge import protocol
from npc_engine.conversation import (
    BLOB_FORMAT,
    ERROR_CODES,
    Conversation,
    Key,
    Memory,
    StateError,
    StateLimits,
    checksum,
    pack_blob,
)
from npc_engine.prompt import Turn
from npc_engine.state import DB_NAME, State

ROOT = Path(__file__).resolve().parents[1]
SMITH, BARD = Key("smith", "p1"), Key("bard", "p1")


def pair(i: int) -> list[Turn]:
    return [Turn("player", f"question {i}"), Turn("npc", f"answer {i}")]


def snapshot(state: State) -> dict:
    return {k: state.get(k) for k in state.conversation_keys()}


def rows(db: sqlite3.Connection) -> list:
    return db.execute("SELECT scope, npc, session, state FROM conversations ORDER BY npc, session").fetchall()


def test_history_keeps_the_last_turns_within_turn_and_byte_caps():
    state = State(StateLimits(history_turns=6, history_bytes=1000))
    for i in range(5):
        state.add_turns(SMITH, pair(i))
    conv = state.get(SMITH)
    assert conv.turns == pair(2) + pair(3) + pair(4) and conv.dropped == 4
    state.add_turns(SMITH, [Turn("player", "   "), Turn("npc", "")])  # blank turns are not history
    assert state.history(SMITH) == conv.turns
    big = "🐉" * 245  # 980 bytes: with its speaker and the next turn it fits, with one more turn it does not
    state.add_turns(SMITH, [Turn("player", big), Turn("npc", "hm")])
    assert state.history(SMITH) == [Turn("player", big), Turn("npc", "hm")]
    state.add_turns(SMITH, [Turn("Tobin", "hello smith", to="smith")])  # scene turns keep speaker and addressee
    assert state.history(SMITH)[-1] == Turn("Tobin", "hello smith", to="smith")
    with pytest.raises(ValueError):
        state.add_turns(SMITH, [Turn("", "nobody said this")])


def test_memories_are_capped_oldest_first_and_forgotten_by_id():
    state = State(StateLimits(memories=3, memory_chars=40))
    made = [state.add_memory(SMITH, f"fact  {i}\n") for i in range(5)]
    assert [m.id for m in made] == [1, 2, 3, 4, 5]
    assert state.list_memories(SMITH) == [Memory(3, "fact 2"), Memory(4, "fact 3"), Memory(5, "fact 4")]
    assert state.forget_memory(SMITH, 4) == 1 and state.forget_memory(SMITH, 4) == 0
    assert state.forget_memory(BARD, 1) == 0
    assert [m.id for m in state.list_memories(SMITH)] == [3, 5]
    assert state.add_memory(SMITH, "again").id == 6  # ids are never reused within a conversation
    assert state.forget_memory(SMITH) == 3 and state.list_memories(SMITH) == []
    with pytest.raises(StateError) as e:
        state.add_memory(SMITH, "x" * 41)
    assert e.value.code == "too_large"
    with pytest.raises(StateError) as e:
        state.add_memory(SMITH, " \n\t")
    assert e.value.code == "bad_request"
    assert state.list_memories(BARD) == [] and state.history(BARD) == []


def test_the_least_recently_written_conversations_leave_over_the_global_caps():
    state = State(StateLimits(conversations=3))
    for i in range(4):
        state.add_turns(Key("smith", f"s{i}"), pair(i))
    assert [k.session for k in state.conversation_keys()] == ["s1", "s2", "s3"]
    state.add_memory(Key("smith", "s1"), "rewritten: now the most recent")
    state.add_turns(Key("smith", "s4"), pair(4))
    assert [k.session for k in state.conversation_keys()] == ["s3", "s1", "s4"]

    limits = StateLimits(history_bytes=4000, memories=4, memory_chars=100, blob_bytes=8000, total_bytes=8000)
    state = State(limits)
    for i in range(10):
        state.add_turns(Key("smith", f"s{i}"), [Turn("player", "w" * 1000)])
    assert state.total <= 8000 and len(state.conversation_keys()) == 7 and state.conversation_keys()[-1].session == "s9"
    assert state.total == sum(state.get(k).nbytes() for k in state.conversation_keys())


def test_limits_that_cannot_hold_one_conversation_in_a_blob_are_refused():
    with pytest.raises(ValueError):
        StateLimits(history_bytes=40_000)
    with pytest.raises(ValueError):
        StateLimits(total_bytes=1000)
    with pytest.raises(ValueError):
        Key("", "p1")


def filled(state: State) -> None:
    for i in range(3):
        state.add_turns(SMITH, pair(i))
    state.add_turns(BARD, pair(9))
    state.add_memory(SMITH, "The player saved my daughter from the wolves")
    state.add_turns(Key("smith", "p2"), pair(7))
    state.add_turns(Key("smith", "p1", scope="someone else"), pair(8))


def test_export_import_round_trips_one_npc_and_whole_sessions(tmp_path):
    state = State()
    filled(state)
    one, whole = state.export_blob("p1", "smith"), state.export_blob("p1")
    assert one == state.export_blob("p1", "smith")  # the same state gives the same bytes
    assert len(whole) <= state.limits.blob_bytes

    other = State(folder=tmp_path)
    assert other.import_blob(whole) == [BARD, SMITH]
    assert other.get(SMITH) == state.get(SMITH) and other.get(BARD) == state.get(BARD)
    assert other.export_blob("p1") == whole
    assert other.import_blob(one, session="copy") == [Key("smith", "copy")]
    assert other.get(Key("smith", "copy")) == state.get(SMITH)
    other.close()
    reopened = State(folder=tmp_path)
    assert reopened.export_blob("p1") == whole and reopened.get(Key("smith", "copy")) == state.get(SMITH)

    # A one-NPC blob replaces that NPC's conversation; a whole-session blob the whole session.
    reopened.add_turns(SMITH, pair(50))
    reopened.add_turns(Key("guard", "p1"), pair(51))
    reopened.import_blob(one)
    assert reopened.get(SMITH) == state.get(SMITH) and reopened.history(Key("guard", "p1")) == pair(51)
    reopened.import_blob(whole)
    assert {k for k in reopened.conversation_keys() if k.session == "p1"} == {SMITH, BARD}
    assert reopened.import_blob(state.export_blob("empty")) == []

    # Scopes do not see each other's conversations.
    restored = State()
    assert restored.import_blob(state.export_blob("p1", scope="someone else")) == [SMITH]
    assert restored.history(SMITH) == pair(8)


def test_a_session_too_big_for_one_blob_is_refused_but_each_npc_exports():
    limits = StateLimits(history_bytes=3000, history_turns=8, memories=2, memory_chars=50, blob_bytes=6000)
    state = State(limits)
    for npc in ("a", "b", "c"):
        state.add_turns(Key(npc, "p1"), [Turn("player", "x" * 1400), Turn("npc", "y" * 1400)])
    with pytest.raises(StateError) as e:
        state.export_blob("p1")
    assert e.value.code == "too_large"
    assert all(len(state.export_blob("p1", npc)) <= 6000 for npc in ("a", "b", "c"))


def envelope(body: dict, version: int = 1, fmt: str = BLOB_FORMAT) -> bytes:
    raw = msgpack.packb(body)
    return msgpack.packb({"format": fmt, "version": version, "body": raw, "checksum": checksum(raw)})


GOOD_BODY = {"session": "p1", "npc": None,
             "conversations": [{"npc": "smith", "turns": [["player", "hi"]], "memories": [[1, "m"]],
                                "next_memory_id": 2, "dropped": 0}]}


def with_conversation(**changes) -> dict:
    return {**GOOD_BODY, "conversations": [{**GOOD_BODY["conversations"][0], **changes}]}


BAD_BODIES = [
    [], {**GOOD_BODY, "session": ""}, {**GOOD_BODY, "session": 5}, {**GOOD_BODY, "npc": "x" * 65},
    {**GOOD_BODY, "conversations": {}}, {**GOOD_BODY, "conversations": [{"turns": []}]},
    {**GOOD_BODY, "conversations": GOOD_BODY["conversations"] * 2}, {**GOOD_BODY, "npc": "bard"},
    with_conversation(turns=[["player"]]), with_conversation(turns=[["", "hi"]]),
    with_conversation(turns=[["player", b"bin"]]), with_conversation(turns="hi"),
    with_conversation(memories=[[0, "m"]]), with_conversation(memories=[[True, "m"]]),
    with_conversation(memories=[[2, "a"], [1, "b"]], next_memory_id=3), with_conversation(next_memory_id=1),
    with_conversation(dropped=-1), with_conversation(dropped=None),
]


def test_every_bad_blob_gets_its_code_and_changes_nothing(tmp_path):
    state = State(folder=tmp_path)
    filled(state)
    before, on_disk = snapshot(state), rows(state.db)
    good = state.export_blob("p1")
    assert State().import_blob(envelope(GOOD_BODY)) == [SMITH]

    def refused(blob, code: str | tuple) -> None:
        with pytest.raises(StateError) as e:
            state.import_blob(blob)
        assert e.value.code in ((code,) if isinstance(code, str) else code), (blob, e.value)

    for n in range(len(good)):
        refused(good[:n], "bad_blob")  # truncated
    raw = msgpack.unpackb(good)["body"]
    body_at = good.index(raw)
    for bit in range(8 * len(good)):
        flipped = bytearray(good)
        flipped[bit // 8] ^= 1 << (bit % 8)
        in_body = body_at <= bit // 8 < body_at + len(raw)
        refused(bytes(flipped), "bad_blob" if in_body else ("bad_blob", "blob_version"))
    refused(envelope(GOOD_BODY, version=2), "blob_version")
    refused(envelope(GOOD_BODY, version=0), "blob_version")
    refused(envelope(GOOD_BODY, fmt="another/format"), "bad_blob")
    refused(good * 10 * (state.limits.blob_bytes // len(good) + 1), "too_large")
    refused(b"\x00" * (10 * state.limits.blob_bytes), "too_large")
    for blob in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"format": BLOB_FORMAT}), "a string",
                 msgpack.packb({"format": BLOB_FORMAT, "version": "1"}),
                 msgpack.packb({"format": BLOB_FORMAT, "version": 1, "body": b"\x80", "checksum": b"0" * 16}),
                 good + b"\x00", msgpack.packb(msgpack.ExtType(1, b"x"))):
        refused(blob, "bad_blob")
    for body in BAD_BODIES:
        refused(envelope(body), "bad_blob")
    assert snapshot(state) == before and rows(state.db) == on_disk


def test_imported_conversations_get_the_caps_of_this_state():
    source = State(StateLimits(history_turns=20, memories=8))
    for i in range(10):
        source.add_turns(SMITH, pair(i))
        source.add_memory(SMITH, f"fact {i}")
    target = State(StateLimits(history_turns=4, memories=2, memory_chars=5))
    target.import_blob(source.export_blob("p1"))
    conv = target.get(SMITH)
    assert conv.turns == pair(8) + pair(9) and conv.dropped == 16
    assert conv.memories == [Memory(9, "fact "), Memory(10, "fact ")] and conv.next_memory_id == 11


def test_reload_keeps_order_and_applies_smaller_limits(tmp_path):
    state = State(folder=tmp_path)
    for i in range(4):
        state.add_turns(Key("smith", f"s{i}"), pair(i) + pair(i + 10))
    state.add_memory(Key("smith", "s0"), "most recent write")
    state.close()
    state = State(StateLimits(conversations=3, history_turns=2), folder=tmp_path)
    assert [k.session for k in state.conversation_keys()] == ["s2", "s3", "s0"]
    assert state.history(Key("smith", "s0")) == pair(10) and state.get(Key("smith", "s0")).dropped == 2
    state.close()
    assert [r[2] for r in rows(sqlite3.connect(tmp_path / DB_NAME))] == ["s0", "s2", "s3"]


def test_a_failed_write_changes_nothing(tmp_path):
    state = State(folder=tmp_path)
    state.add_turns(SMITH, pair(0))
    state.db.execute("CREATE TRIGGER refuse BEFORE UPDATE ON conversations "
                     "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    with pytest.raises(sqlite3.IntegrityError):
        state.add_turns(SMITH, pair(1))
    with pytest.raises(sqlite3.IntegrityError):
        state.add_memory(SMITH, "lost")
    assert state.get(SMITH) == Conversation(pair(0))
    state.db.execute("DROP TRIGGER refuse")
    state.add_turns(SMITH, pair(1))
    assert state.history(SMITH) == pair(0) + pair(1)


def test_a_second_process_on_the_folder_is_refused(tmp_path):
    state = State(folder=tmp_path)
    state.add_turns(SMITH, pair(0))
    with pytest.raises(StateError) as e:
        State(folder=tmp_path)
    assert e.value.code == "bad_state" and "in use" in e.value.message
    state.close()
    assert State(folder=tmp_path).history(SMITH) == pair(0)


def test_a_damaged_or_newer_state_file_stops_the_start(tmp_path):
    state = State(folder=tmp_path)
    for i in range(200):
        state.add_turns(Key("smith", f"s{i}"), [Turn("player", f"{i} " * 100)])
    state.close()
    path = tmp_path / DB_NAME
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    data[3 * 4096:4 * 4096] = random.Random(0).randbytes(4096)  # a table page full of noise
    path.write_bytes(bytes(data))
    with pytest.raises(StateError) as e:
        State(folder=tmp_path)
    assert e.value.code == "bad_state"

    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StateError) as e:
        State(folder=tmp_path)
    assert e.value.code == "bad_state"

    path.unlink()
    State(folder=tmp_path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StateError) as e:
        State(folder=tmp_path)
    assert e.value.code == "bad_state" and "newer" in e.value.message


WRITER = """
import os, sys, threading
from npc_engine.prompt import Turn
from npc_engine.state import Key, State, StateLimits
state = State(StateLimits(history_turns=6), folder=sys.argv[1])
run = sys.argv[2]

def write(w):
    key = Key(f"npc{w % 2}", f"s{w}")
    for i in range(20000):
        state.add_turns(key, [Turn("player", f"{run} {w} {i}"), Turn("npc", f"ok {run} {w} {i}")])
        if i % 7 == 0:
            state.add_memory(key, f"{run} {w} {i}")
        state.add_turns(Key("npc", "shared"), [Turn("player", f"{w}:{i}")])
        os.write(1, f"{w} {i}\\n".encode())

threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
for t in threads:
    t.start()
"""


def test_sigkill_during_concurrent_writes_loses_no_finished_write(tmp_path):
    for run in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(run)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lines = []
        try:
            while len(lines) < 200:  # the writers are well under way
                lines.append(proc.stdout.readline())
                assert lines[-1], proc.stderr.read().decode()
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        lines += proc.stdout.read().splitlines(keepends=True)  # the acks written before the kill
        acked = dict(tuple(map(int, line.split())) for line in lines if line.endswith(b"\n"))
        state = State(StateLimits(history_turns=6), folder=tmp_path)  # runs SQLite's integrity check
        for w, last in acked.items():
            key = Key(f"npc{w % 2}", f"s{w}")
            conv = state.get(key)
            lines_done = [tuple(map(int, t.text.split()[1:])) for t in conv.turns if t.speaker == "npc"]
            done = [i for r, _, i in lines_done if r == run]
            assert done[-1] in (last, last + 1)  # the write in flight at the kill may have committed
            assert done == list(range(done[-1] - len(done) + 1, done[-1] + 1)) and lines_done == sorted(lines_done)
            assert conv.turns[-2] == Turn("player", f"{run} {w} {done[-1]}")
            memory = conv.memories[-1].text.split()
            assert memory[:2] == [str(run), str(w)] and last - 7 < int(memory[2]) <= last + 1
        shared = state.history(Key("npc", "shared"))
        assert len(shared) == 6 and all(t.text.split(":")[0] in ("0", "1", "2", "3") for t in shared)
        state.close()


def test_pack_blob_is_what_export_writes():
    state = State()
    state.add_turns(SMITH, pair(0))
    assert state.export_blob("p1", "smith") == pack_blob("p1", "smith", {"smith": state.get(SMITH)})


def test_state_errors_answered_on_the_wire_have_protocol_codes():
    assert set(ERROR_CODES) - {"bad_state"} <= set(protocol.ERROR_CODES)
    with pytest.raises(AssertionError):
        StateError("no_such_code", "a code the protocol does not know")
