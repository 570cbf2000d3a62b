"""The ZeroMQ service end to end: a real `npc-engine serve` process on loopback with a small random
checkpoint, spoken to with raw DEALER sockets (so every frame is checked as sent) and with
bridge.Client. Conformance of every message, streaming order, one terminal message per request,
cancel, deadlines, guard, hot reload, many clients, fuzzing, CURVE and shutdown."""
import json
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.auth

from bridge import Client, protocol
from npc_engine.prompt import EOT

REPO = Path(__file__).resolve().parents[1]
PLAIN = '''id = "{id}"
name = "Ada"
role = "tester"
greeting = "Hello."
facts = ["I test things."]
fallback_lines = ["Give me a moment.", "Let me think."]
'''
PLAIN_FALLBACKS = ["Give me a moment.", "Let me think."]
# max_tokens of a line that outlives the test's patience: the model below never stops early and the
# service runs without a drafter (one token per step), so such a line takes 0.4 s or more
LONG = 512


# ---- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chatty_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny random checkpoint without an end-of-turn token, so every line runs to max_tokens
    (a random model would otherwise stop at random)."""
    out = tmp_path_factory.mktemp("chatty") / "model"
    shutil.copytree(tiny_model_dir, out)
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    for token in tokenizer["added_tokens"]:
        if token["content"] == EOT:
            token["content"] = "<|unused|>"
    tokenizer["model"]["vocab"]["<|unused|>"] = tokenizer["model"]["vocab"].pop(EOT)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    for name in ("config.json", "generation_config.json"):
        if (out / name).is_file():
            config = json.loads((out / name).read_text())
            config["eos_token_id"] = None
            (out / name).write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def personas_dir(tmp_path_factory) -> Path:
    """The shipped cast plus `plain` (no banned topics: every token streams at once)."""
    out = tmp_path_factory.mktemp("personas")
    for path in (REPO / "personas").glob("*.toml"):
        shutil.copy(path, out)
    (out / "plain.toml").write_text(PLAIN.format(id="plain"))
    return out


def start_service(model_dir: Path, personas_dir: Path, *extra: str, env: dict | None = None):
    """`npc-engine serve` on a free loopback port; returns (process, endpoint)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "npc_engine", "serve", "--model", str(model_dir), "--draft", "none",
         "--personas", str(personas_dir), "--bind", "tcp://127.0.0.1:*", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("ready "):
        proc.kill()
        raise RuntimeError(f"service did not start: {line!r}\n{proc.stderr.read()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the log pipe from filling
    return proc, line.split()[1]


def stop_service(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def service(chatty_model_dir, personas_dir):
    proc, endpoint = start_service(chatty_model_dir, personas_dir)
    yield endpoint
    stop_service(proc)
    assert proc.returncode == 0


@contextmanager
def running(service):
    """Runs an npc_engine.service.Service in a thread (its socket is created, used and closed
    there); yields its endpoint."""
    ready = threading.Event()

    def run():
        service.bind()
        ready.set()
        service.run()

    thread = threading.Thread(target=run)
    thread.start()
    assert ready.wait(30)
    try:
        yield service.endpoint
    finally:
        service.stop()
        thread.join(30)
    assert not thread.is_alive()


class Raw:
    """A DEALER that sends exactly what it is given and reads whole messages."""

    def __init__(self, endpoint: str, **sockopts):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        for option, value in sockopts.items():
            self.sock.setsockopt(getattr(zmq, option), value)
        self.sock.connect(endpoint)

    def send(self, msg: dict) -> None:
        self.sock.send_multipart(protocol.encode(msg))

    def say(self, rid: str, npc: str = "plain", text: str = "Hello there.", **fields) -> None:
        self.send({"type": "say", "id": rid, "npc": npc, "session": fields.pop("session", rid), "text": text, **fields})

    def append(self, rid: str, text: str, final: bool = False) -> None:
        self.send({"type": "say.append", "id": rid, "text": text, "final": final})

    def recv(self, timeout: float = 30.0) -> dict:
        if not self.sock.poll(timeout * 1000, zmq.POLLIN):
            raise TimeoutError(f"no message within {timeout} s")
        frames = self.sock.recv_multipart()
        assert len(frames) == 2 and frames[0] == b"NPC1", frames
        return msgpack.unpackb(frames[1], raw=False)

    def request(self, msg: dict, timeout: float = 30.0) -> dict:
        self.send(msg)
        return self.recv(timeout)

    def close(self) -> None:
        self.sock.close()


def collect(raw: Raw, rids: set[str], timeout: float = 60.0) -> dict[str, tuple[list[dict], dict]]:
    """Read until every request in `rids` has its terminal message: {rid: (tokens, terminal)}.
    Checks seq order and that nothing follows a terminal message."""
    tokens = {rid: [] for rid in rids}
    terminal: dict[str, dict] = {}
    end = time.monotonic() + timeout
    while len(terminal) < len(rids):
        msg = raw.recv(max(0.1, end - time.monotonic()))
        rid = msg["id"]
        assert rid in rids, msg
        assert rid not in terminal, f"message after the terminal one: {msg}"
        if msg["type"] == "token":
            assert msg["seq"] == len(tokens[rid]), f"seq gap: {msg}"
            assert isinstance(msg["text"], str) and msg["text"]
            tokens[rid].append(msg)
        else:
            assert msg["type"] in ("done", "error"), msg
            terminal[rid] = msg
    return {rid: (tokens[rid], terminal[rid]) for rid in rids}


def assert_quiet(raw: Raw, seconds: float = 0.3) -> None:
    assert not raw.sock.poll(seconds * 1000, zmq.POLLIN), f"unexpected message: {raw.recv()}"


def streamed(tokens: list[dict]) -> str:
    return "".join(t["text"] for t in tokens)


def npcs_reply(endpoint: str) -> dict:
    raw = Raw(endpoint)
    reply = raw.request({"type": "npcs", "id": "n"})
    raw.close()
    return reply


# ---- conformance ----------------------------------------------------------------------------------

def test_hello_ping_and_npcs(service, personas_dir):
    raw = Raw(service)
    welcome = raw.request({"type": "hello", "id": "h", "protocol": [1, 3], "client": "test", "caps": ["x"], "extra": 1})
    ids = sorted(p.stem for p in personas_dir.glob("*.toml"))
    assert welcome["type"] == "welcome" and welcome["id"] == "h"
    assert welcome["protocol"] == [1, 2]
    assert raw.request({"type": "hello", "id": "h0", "protocol": [1, 0]})["protocol"] == [1, 0]
    assert welcome["npcs"] == ids
    assert set(welcome["caps"]) == set(protocol.CAPS)
    assert welcome["limits"] == protocol.Limits().to_wire()
    pong = raw.request({"type": "ping", "id": "p"})
    assert pong == {"type": "pong", "id": "p", "instance": welcome["instance"]}
    npcs = raw.request({"type": "npcs", "id": "n"})
    assert npcs["errors"] == []
    by_id = {n["id"]: n for n in npcs["npcs"]}
    assert sorted(by_id) == ids
    assert by_id["blacksmith"]["name"] == "Brom Ironhand"
    assert by_id["blacksmith"]["greeting"].startswith("Hm.")
    assert "hammer" in by_id["blacksmith"]["actions"] and "proud" in by_id["blacksmith"]["emotions"]
    raw.close()


def test_say_streams_tokens_in_order_then_exactly_one_done(service):
    raw = Raw(service)
    raw.say("a", max_tokens=12, temperature=0.7, seed=5)
    tokens, done = collect(raw, {"a"})["a"]
    assert done["type"] == "done"
    assert tokens, "a streaming say sent no token"
    assert done["text"] == streamed(tokens)
    assert done["tokens"] == 12
    assert (done["fallback"], done["cancelled"], done["deflected"]) == (False, False, False)
    stats = done["stats"]
    assert 0 < stats["ttft_ms"] <= stats["total_ms"]
    assert stats["prompt_tokens"] > 0 and stats["target_forwards"] > 0
    assert stats["accepted"] <= stats["drafted"]
    assert_quiet(raw)
    raw.close()


def test_stream_false_sends_only_done_and_seed_repeats_the_line(service):
    raw = Raw(service)
    raw.say("quiet", max_tokens=10, temperature=1.0, seed=42, stream=False, session="same-seed-1")
    raw.say("loud", max_tokens=10, temperature=1.0, seed=42, session="same-seed-2")
    replies = collect(raw, {"quiet", "loud"})
    assert replies["quiet"][0] == []
    assert replies["quiet"][1]["text"] == replies["loud"][1]["text"] == streamed(replies["loud"][0])
    raw.close()


def test_history_grows_the_prompt_and_the_persona_block_is_cached(service):
    raw = Raw(service)
    stats = []
    for i in range(3):
        raw.say(f"h{i}", max_tokens=4, session="history")
        stats.append(collect(raw, {f"h{i}"})[f"h{i}"][1]["stats"])
    prompts = [s["prompt_tokens"] for s in stats]
    assert prompts[0] < prompts[1] < prompts[2]  # each turn adds the player's line and the NPC's
    assert stats[2]["cached_prefix_tokens"] > 0  # the persona block came from the prefix cache
    raw.say("other", max_tokens=4, session="history-other")
    assert collect(raw, {"other"})["other"][1]["stats"]["prompt_tokens"] == prompts[0]
    raw.close()


BAD_MESSAGES = [
    # (frames, expected code, expected id)
    ([b"NPC1"], "bad_request", None),
    ([b"NPC1", msgpack.packb({"type": "ping", "id": "x"}), b"extra"], "bad_request", None),
    ([b"GET / HTTP/1.1", b""], "bad_request", None),
    ([b"NPC2", msgpack.packb({"type": "ping", "id": "x"})], "version_mismatch", None),
    ([b"NPC1", b"\xc1\xc1"], "bad_request", None),
    ([b"NPC1", msgpack.packb([1, 2, 3])], "bad_request", None),
    ([b"NPC1", msgpack.packb({"type": "ping"})], "bad_request", None),
    ([b"NPC1", msgpack.packb({"type": "dance", "id": "d"})], "unknown_type", "d"),
    ([b"NPC1", msgpack.packb({"type": "say.append", "id": 5, "text": "x"})], "bad_request", None),
    ([b"NPC1", msgpack.packb({"type": "scene.start", "id": "r2"})], "unsupported", "r2"),
    ([b"NPC1", msgpack.packb({"type": "memory.add", "id": "r3", "npc": "plain", "session": "s"})], "bad_request", "r3"),
    ([b"NPC1", msgpack.packb({"type": "session.import", "id": "r4", "blob": "text"})], "bad_blob", "r4"),
    ([b"NPC1", msgpack.packb({"type": "hello", "id": "v", "protocol": [2, 0]})], "version_mismatch", "v"),
    ([b"NPC1", msgpack.packb({"type": "say", "id": "s1", "npc": "plain", "session": "s"})], "bad_request", "s1"),
    ([b"NPC1", msgpack.packb({"type": "say", "id": "s2", "npc": "plain", "session": "s", "text": "hi",
                              "max_tokens": "many"})], "bad_request", "s2"),
    ([b"NPC1", msgpack.packb({"type": "say", "id": "s3", "npc": "nobody", "session": "s", "text": "hi"})],
     "unknown_npc", "s3"),
    ([b"NPC1", msgpack.packb({"type": "say", "id": "s4", "npc": "plain", "session": "s", "text": "x" * 2001})],
     "too_large", "s4"),
    ([b"NPC1", msgpack.packb({"type": "say", "id": "s5", "npc": "plain", "session": "s", "text": "x",
                              "pad": "p" * 70_000})], "too_large", None),
]


@pytest.mark.parametrize("frames, code, rid", BAD_MESSAGES,
                         ids=[f"{i}-{c}" for i, (_, c, _) in enumerate(BAD_MESSAGES)])
def test_bad_messages_get_one_error_with_a_stable_code(service, frames, code, rid):
    raw = Raw(service)
    raw.sock.send_multipart(frames)
    reply = raw.recv(10)
    assert reply["type"] == "error"
    assert (reply["code"], reply["id"]) == (code, rid)
    assert isinstance(reply["message"], str) and reply["message"]
    if code == "bad_request" and rid is not None:
        assert re.search(r"'(text|max_tokens)'", reply["message"])
    assert_quiet(raw, 0.1)
    raw.close()


def test_duplicate_id_is_refused_and_the_running_request_finishes(service):
    raw = Raw(service)
    raw.say("dup", max_tokens=30)
    raw.say("dup", max_tokens=30)
    messages = [raw.recv()]
    while messages[-1]["type"] != "done":
        messages.append(raw.recv())
    errors = [m for m in messages if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["duplicate_id"]  # answers the second say only
    tokens = [m for m in messages if m["type"] == "token"]
    assert [t["seq"] for t in tokens] == list(range(len(tokens)))
    assert messages[-1]["cancelled"] is False and messages[-1]["text"] == streamed(tokens)
    assert_quiet(raw)
    raw.close()


def test_unknown_npc_names_the_known_ones(service):
    raw = Raw(service)
    raw.say("u", npc="dragon")
    reply = collect(raw, {"u"})["u"][1]
    assert reply["code"] == "unknown_npc" and "dragon" in reply["message"] and "blacksmith" in reply["message"]
    raw.close()


def test_say_command_streams_a_line_and_reports_errors(service):
    ok = subprocess.run([sys.executable, "-m", "npc_engine", "say", "--connect", service, "--npc", "blacksmith",
                         "--max-tokens", "6", "Any", "news?"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.endswith("\n") and len(ok.stdout) > 1
    bad = subprocess.run([sys.executable, "-m", "npc_engine", "say", "--connect", service, "--npc", "dragon", "Hi"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 1 and "unknown_npc" in bad.stderr


# ---- flow control ----------------------------------------------------------------------------------

def test_cancel_mid_stream(service):
    raw = Raw(service)
    raw.say("c", max_tokens=LONG)
    tokens = [raw.recv()]
    assert tokens[0]["type"] == "token" and tokens[0]["seq"] == 0
    raw.send({"type": "cancel", "id": "c"})
    while (msg := raw.recv())["type"] == "token":
        assert msg["seq"] == len(tokens)
        tokens.append(msg)
    assert msg["type"] == "done" and msg["cancelled"] is True and msg["fallback"] is False
    assert msg["text"] == streamed(tokens)
    assert msg["tokens"] < LONG
    raw.send({"type": "cancel", "id": "c"})  # no longer running: ignored, no second terminal
    assert_quiet(raw)
    raw.close()


def test_per_client_limit_then_cancel_of_queued_requests(service):
    raw = Raw(service)
    limit = protocol.Limits().max_inflight
    for i in range(limit + 1):
        raw.say(f"q{i}", max_tokens=LONG, stream=False)
    refusal = raw.recv()
    assert (refusal["type"], refusal["id"], refusal["code"]) == ("error", f"q{limit}", "overloaded")
    for i in range(limit):
        raw.send({"type": "cancel", "id": f"q{i}"})
    replies = collect(raw, {f"q{i}" for i in range(limit)})
    assert all(done["type"] == "done" and done["cancelled"] for _, done in replies.values())
    never_admitted = sum(done["tokens"] == 0 and done["text"] == "" for _, done in replies.values())
    assert never_admitted >= limit - 16
    raw.close()


def test_deadline_ends_the_line_with_a_fallback_in_time(service):
    raw = Raw(service)
    start = time.monotonic()
    raw.say("late", max_tokens=LONG, deadline_ms=100)
    tokens, done = collect(raw, {"late"})["late"]
    elapsed = time.monotonic() - start
    assert done["type"] == "done" and done["fallback"] is True and done["cancelled"] is False
    assert done["text"] in PLAIN_FALLBACKS and done["tokens"] < LONG
    # at the deadline less the estimated step, plus transit; the whole line takes 0.4 s or more
    assert 0.05 < elapsed < 0.6, f"fallback after {elapsed:.3f} s for a 100 ms deadline"
    raw.say("in-time", max_tokens=4, deadline_ms=30_000)
    assert collect(raw, {"in-time"})["in-time"][1]["fallback"] is False
    raw.close()


def test_player_priority_is_admitted_before_ambient(service):
    raw = Raw(service)
    # fill the engine's slots, then queue ambient before player requests
    for i in range(16):
        raw.say(f"fill{i}", max_tokens=LONG, stream=False)
    time.sleep(0.3)
    raw.say("ambient", max_tokens=1, priority="ambient", stream=False)
    raw.say("player", max_tokens=1, priority="player", stream=False)
    time.sleep(0.1)
    for i in range(16):
        raw.send({"type": "cancel", "id": f"fill{i}"})
    order = []
    while len(order) < 18:
        msg = raw.recv()
        order.append(msg["id"])
    assert order.index("player") < order.index("ambient")
    raw.close()


# ---- say.append: a player line sent in pieces ------------------------------------------------------

PIECES = ["Can ", "you mend", " my sw", "ord?"]  # pieces end mid-word and carry their own spaces


def say_in_pieces(raw: Raw, rid: str, pieces: list[str], **fields) -> None:
    raw.say(rid, text=pieces[0], open=True, **fields)
    for i, piece in enumerate(pieces[1:], 2):
        raw.append(rid, piece, final=i == len(pieces))


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 11)])
def test_a_line_sent_in_pieces_gets_the_same_answer_as_sent_whole(service, temperature, seed):
    raw = Raw(service)
    fields = {"max_tokens": 12, "temperature": temperature, **({"seed": seed} if seed is not None else {})}
    raw.say("whole", text="".join(PIECES), session=f"whole-{temperature}", **fields)
    say_in_pieces(raw, "pieces", PIECES, session=f"pieces-{temperature}", **fields)
    replies = collect(raw, {"whole", "pieces"})
    (_, whole), (tokens, pieces) = replies["whole"], replies["pieces"]
    assert pieces["type"] == "done" and (pieces["fallback"], pieces["cancelled"], pieces["deflected"]) == (False,) * 3
    assert pieces["text"] == streamed(tokens) == whole["text"]
    assert pieces["tokens"] == whole["tokens"] == 12
    assert pieces["stats"]["prompt_tokens"] == whole["stats"]["prompt_tokens"]
    assert_quiet(raw)
    raw.close()


def test_append_to_a_say_that_is_not_running_is_ignored(service):
    raw = Raw(service)
    raw.append("never-sent", "hello", final=True)
    raw.send({"type": "say.append", "id": "never-sent", "text": 5})  # malformed too: nobody to answer
    raw.say("ended", max_tokens=2)
    collect(raw, {"ended"})
    raw.append("ended", "more", final=True)
    assert_quiet(raw)
    assert raw.request({"type": "ping", "id": "p"})["type"] == "pong"
    raw.close()


def test_append_to_a_say_that_is_not_open_ends_it_with_bad_request(service):
    raw = Raw(service)
    say_in_pieces(raw, "twice", ["Hello", " there", "!"], max_tokens=LONG)
    raw.append("twice", " again")  # the say is final already: a client bug
    raw.say("closed", max_tokens=LONG)
    raw.append("closed", " more")  # sent without open
    replies = collect(raw, {"twice", "closed"})
    for rid in ("twice", "closed"):
        error = replies[rid][1]
        assert (error["type"], error["code"]) == ("error", "bad_request") and "not open" in error["message"]
    assert_quiet(raw)
    raw.close()


def test_a_malformed_append_ends_its_say_with_bad_request_naming_the_field(service):
    raw = Raw(service)
    cases = {"f1": ({"final": "yes"}, "'final'"), "f2": ({"text": None}, "'text'"), "f3": ({"text": 7}, "'text'"),
             "f4": ({b"bin": 1}, "keys")}
    for rid, (bad, _) in cases.items():
        raw.say(rid, text="Hi", open=True)
        raw.send({"type": "say.append", "id": rid, "text": "!", **bad})
    replies = collect(raw, set(cases))
    for rid, (_, named) in cases.items():
        error = replies[rid][1]
        assert (error["type"], error["code"]) == ("error", "bad_request") and named in error["message"]
    assert_quiet(raw)
    raw.close()


def test_cancel_ends_an_open_say(service):
    raw = Raw(service)
    raw.say("typing", text="Let me tell you", open=True)
    raw.append("typing", " about")
    raw.send({"type": "cancel", "id": "typing"})
    done = collect(raw, {"typing"})["typing"][1]
    assert done["type"] == "done" and done["cancelled"] is True and (done["text"], done["tokens"]) == ("", 0)
    raw.append("typing", " my day", final=True)  # ended: ignored
    assert_quiet(raw)
    raw.close()


def test_banned_topic_split_over_pieces_is_deflected_at_the_final_piece(service):
    raw = Raw(service)
    say_in_pieces(raw, "war", ["Tell me about the wa", "rs", ", old man."], npc="blacksmith")
    tokens, done = collect(raw, {"war"})["war"]
    assert tokens == [] and done["deflected"] is True and done["tokens"] == 0
    assert done["text"] == "I don't talk about that. Ask me about steel."
    raw.close()


def test_open_says_wait_in_the_queue_behind_a_full_engine(service):
    raw = Raw(service)
    raw.say("ref", text="".join(PIECES), max_tokens=6, temperature=0.0, session="queued-ref")
    reference = collect(raw, {"ref"})["ref"][1]["text"]
    for i in range(16):  # every engine slot
        raw.say(f"fill{i}", max_tokens=LONG, stream=False)
    time.sleep(0.3)
    fields = {"max_tokens": 6, "temperature": 0.0}
    say_in_pieces(raw, "final-queued", PIECES, session="queued-a", **fields)  # completed before admission
    raw.say("final-admitted", text=PIECES[0], open=True, session="queued-b", **fields)
    raw.append("final-admitted", PIECES[1])
    time.sleep(0.1)
    for i in range(16):
        raw.send({"type": "cancel", "id": f"fill{i}"})
    time.sleep(0.3)  # admitted while still open
    raw.append("final-admitted", PIECES[2])
    raw.append("final-admitted", PIECES[3], final=True)
    replies = collect(raw, {f"fill{i}" for i in range(16)} | {"final-queued", "final-admitted"})
    assert replies["final-queued"][1]["text"] == replies["final-admitted"][1]["text"] == reference
    raw.close()


def test_bridge_client_sends_a_line_in_pieces(service):
    with Client.connect(service) as client:
        end = time.monotonic() + 10
        while not client.connected and time.monotonic() < end:
            client.poll()
            client.wait(0.01)
        assert "append" in client.server["caps"] and client.server["protocol"] == list(protocol.VERSION)
        whole = client.ask("plain", "".join(PIECES), max_tokens=8, temperature=0.0, session="client-whole")
        rid = client.say("plain", PIECES[0], open=True, max_tokens=8, temperature=0.0, session="client-pieces")
        for piece in PIECES[1:-1]:
            client.append(rid, piece)
        client.append(rid, PIECES[-1], final=True)
        with pytest.raises(ValueError, match="not open"):
            client.append(rid, "more")
        events = []
        while not any(e["type"] in ("done", "error") for e in events):
            events += client.poll(budget_ms=5)
            client.wait(0.05)
        assert events[-1]["type"] == "done" and events[-1]["text"] == whole
        client.append(rid, "late", final=True)  # ended: nothing sent, nothing raised


# An in-process service whose open says time out quickly and whose text limit fits the tiny model; it
# records how much of each request's prompt the engine had prefilled when it got the completed prompt.
OPEN_MS = 400
TEXT_CHARS = 200


@pytest.fixture(scope="module")
def quick_open(chatty_model_dir, personas_dir):
    from npc_engine.engine import Engine
    from npc_engine.persona import PersonaStore
    from npc_engine.service import Service, ServiceConfig

    engine = Engine.load(chatty_model_dir, draft="none")
    service = Service(engine, PersonaStore(personas_dir),
                      ServiceConfig(bind="tcp://127.0.0.1:*",
                                    limits=protocol.Limits(max_open_ms=OPEN_MS, max_text_chars=TEXT_CHARS)))
    service.prefilled_at_final = {}
    real_update = engine.update_prompt

    def update_prompt(rid, prompt_ids, complete):
        if complete and rid in engine.active:
            stats, call = engine.active[rid].stats, service.calls.by_rid[rid]
            service.prefilled_at_final[call.id] = stats.prefill_tokens + stats.cached_prefix_tokens - call.prefix_len
        real_update(rid, prompt_ids, complete)

    engine.update_prompt = update_prompt
    with running(service) as endpoint:
        yield service, endpoint


def test_an_open_say_without_pieces_ends_with_open_timeout(quick_open):
    service, endpoint = quick_open
    raw = Raw(endpoint)
    assert raw.request({"type": "hello", "id": "h", "protocol": [1, 1]})["limits"]["max_open_ms"] == OPEN_MS
    start = time.monotonic()
    raw.say("idle", text="Well", open=True, max_tokens=4)
    raw.say("alive", text="Well", open=True, max_tokens=4)
    while time.monotonic() - start < 2.5 * OPEN_MS / 1000:  # empty pieces keep a say open
        raw.append("alive", "")
        time.sleep(OPEN_MS / 4000)
    raw.append("alive", ", well.", final=True)
    replies = collect(raw, {"idle", "alive"})
    error = replies["idle"][1]
    assert (error["type"], error["code"]) == ("error", "open_timeout")
    assert replies["alive"][1]["type"] == "done" and replies["alive"][1]["tokens"] == 4
    assert_quiet(raw)
    raw.close()


def test_an_open_says_deadline_starts_with_its_final_piece(quick_open):
    """Typing for longer than the deadline costs nothing; after the final piece the deadline holds."""
    service, endpoint = quick_open
    raw = Raw(endpoint)
    raw.say("slow-typist", text="Well", open=True, max_tokens=4, deadline_ms=1000)
    raw.say("late", text="Tell me", open=True, max_tokens=LONG, deadline_ms=100)
    start = time.monotonic()
    while time.monotonic() - start < 1.2:  # typing for longer than either deadline, kept open by empty pieces
        raw.append("slow-typist", "")
        raw.append("late", "")
        time.sleep(OPEN_MS / 4000)
    raw.append("slow-typist", ", well.", final=True)
    final_at = time.monotonic()
    raw.append("late", " everything.", final=True)
    replies = collect(raw, {"slow-typist", "late"})
    typist, late = replies["slow-typist"][1], replies["late"][1]
    assert typist["type"] == "done" and typist["fallback"] is False and typist["tokens"] == 4
    assert late["type"] == "done" and late["fallback"] is True
    assert time.monotonic() - final_at < 1.0
    assert_quiet(raw)
    raw.close()


def test_pieces_over_the_text_limit_end_the_say_with_too_large(quick_open):
    service, endpoint = quick_open
    raw = Raw(endpoint)
    raw.say("sum", text="x" * (TEXT_CHARS - 100), open=True)
    raw.append("sum", " y" * 40)  # still fits
    raw.append("sum", "z" * 21)
    raw.say("piece", text="", open=True)
    raw.append("piece", "x" * (TEXT_CHARS + 1))  # one piece over the limit
    replies = collect(raw, {"sum", "piece"})
    assert {(t["type"], t["code"]) for _, t in replies.values()} == {("error", "too_large")}
    assert f"add up to {TEXT_CHARS + 1}" in replies["sum"][1]["message"]
    assert_quiet(raw)
    raw.close()


def test_the_text_so_far_is_prefilled_before_the_final_piece(quick_open):
    from npc_engine.engine.prefill import STREAM_CHUNK

    service, endpoint = quick_open
    raw = Raw(endpoint)
    raw.say("early", text="I walked for three days through the rain and the mud to reach this forge, and the guard "
            "at the gate told me you are the best smith in the town, so ", open=True, max_tokens=4)
    time.sleep(OPEN_MS / 2000)
    raw.append("early", "now my sword is broken.", final=True)
    done = collect(raw, {"early"})["early"][1]
    assert done["type"] == "done" and done["tokens"] == 4
    assert service.prefilled_at_final["early"] >= STREAM_CHUNK  # at least one whole chunk of the player's turn
    raw.close()


# ---- guard and hot reload --------------------------------------------------------------------------

def test_banned_topic_in_player_text_is_deflected(service):
    raw = Raw(service)
    raw.say("g", npc="blacksmith", text="Tell me about the WARS, old man.")
    tokens, done = collect(raw, {"g"})["g"]
    assert tokens == []
    assert done["deflected"] is True and done["tokens"] == 0
    assert done["text"] == "I don't talk about that. Ask me about steel."
    raw.close()


@pytest.mark.parametrize("text, start, expected", [
    ("The wa", 0, 4), ("The war", 0, 4), ("The wars", 0, 4), ("The wares are fine", 0, 18),
    ("The warden", 0, 10), ("Sword", 0, 5), ("I met the Duke's  dau", 0, 10), ("the duke's son", 0, 14),
    ("awa", 0, 3), ("A sword. The wa", 2, 13), ("", 0, 0),
])
def test_unsafe_start_holds_only_what_could_become_a_topic(text, start, expected):
    from npc_engine.guard import unsafe_start

    assert unsafe_start(text, start, ["war", "duke's daughter", "  "]) == expected


def wait_for_npc(endpoint: str, npc: str, timeout: float = 5.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        reply = npcs_reply(endpoint)
        if npc in [n["id"] for n in reply["npcs"]]:
            return reply
        time.sleep(0.1)
    raise AssertionError(f"{npc} was not loaded within {timeout} s")


def test_banned_topic_in_generated_text_never_streams(service, personas_dir):
    from npc_engine.guard import banned_topic
    from npc_engine.persona import load_persona_file

    raw = Raw(service)
    raw.say("probe", npc="plain", max_tokens=40, temperature=0.7, seed=7, session="guard-a")
    pieces, done = collect(raw, {"probe"})["probe"]
    line = done["text"]
    # a word that arrived split over two messages: only a hold-back keeps its first part unshown
    boundaries = {len(streamed(pieces[:i])) for i in range(1, len(pieces))}
    split_words = [m.group() for m in re.finditer(r"\w+", line) if any(m.start() < b < m.end() for b in boundaries)]
    assert split_words, f"no word of the random model's line arrived in two pieces: {pieces}"
    topic = split_words[-1]
    # the same persona block (banned topics are not in the prompt), now banning that word
    (personas_dir / "guarded.toml").write_text(PLAIN.format(id="guarded") + f'banned_topics = [{json.dumps(topic)}]\n'
                                                'deflection = "Let us not speak of that."\n')
    wait_for_npc(service, "guarded")
    raw.say("guarded", npc="guarded", max_tokens=40, temperature=0.7, seed=7, session="guard-b")
    tokens, done = collect(raw, {"guarded"})["guarded"]
    assert done["deflected"] is True and done["text"] == "Let us not speak of that."
    shown = streamed(tokens)
    assert line.startswith(shown)
    assert banned_topic(load_persona_file(personas_dir / "guarded.toml"), shown) is None
    raw.close()


def test_hot_reload_adds_personas_and_reports_bad_files(service, personas_dir):
    (personas_dir / "newcomer.toml").write_text(PLAIN.format(id="newcomer"))
    wait_for_npc(service, "newcomer")
    raw = Raw(service)
    raw.say("n1", npc="newcomer", max_tokens=3)
    assert collect(raw, {"n1"})["n1"][1]["type"] == "done"
    (personas_dir / "broken.toml").write_text('id = "broken"\nname = 5\n')
    (personas_dir / "newcomer.toml").write_text(PLAIN.format(id="newcomer").replace('greeting = "Hello."\n', ""))
    end = time.monotonic() + 5
    while len(npcs_reply(service)["errors"]) < 2 and time.monotonic() < end:
        time.sleep(0.1)
    reply = npcs_reply(service)
    errors = {Path(e["file"]).name: e["message"] for e in reply["errors"]}
    assert set(errors) == {"broken.toml", "newcomer.toml"}
    assert "greeting" in errors["newcomer.toml"] and "name" in errors["broken.toml"]
    assert "newcomer" in [n["id"] for n in reply["npcs"]]  # the previous version stays live
    raw.say("n2", npc="newcomer", max_tokens=3)
    assert collect(raw, {"n2"})["n2"][1]["type"] == "done"
    (personas_dir / "broken.toml").unlink()
    (personas_dir / "newcomer.toml").unlink()
    end = time.monotonic() + 5
    while npcs_reply(service)["errors"] and time.monotonic() < end:
        time.sleep(0.1)
    assert npcs_reply(service)["errors"] == []
    raw.close()


# ---- many clients and hostile input ----------------------------------------------------------------

def test_32_concurrent_clients(service):
    clients = [Raw(service) for _ in range(32)]
    for i, raw in enumerate(clients):
        raw.say(f"c{i}", npc="plain" if i % 2 else "healer", text=f"Hello number {i}", max_tokens=8)
    poller = zmq.Poller()
    for raw in clients:
        poller.register(raw.sock, zmq.POLLIN)
    tokens = {i: [] for i in range(32)}
    terminal = {}
    end = time.monotonic() + 120
    while len(terminal) < 32 and time.monotonic() < end:
        for sock, _ in poller.poll(1000):
            i = next(j for j, raw in enumerate(clients) if raw.sock is sock)
            msg = clients[i].recv()
            assert msg["id"] == f"c{i}" and i not in terminal
            if msg["type"] == "token":
                assert msg["seq"] == len(tokens[i])
                tokens[i].append(msg)
            else:
                terminal[i] = msg
    assert len(terminal) == 32
    for i, done in terminal.items():
        assert done["type"] == "done" and done["tokens"] == 8
        if i % 2:  # plain streams everything; the healer holds back text that could start a banned topic
            assert done["text"] == streamed(tokens[i])
        else:
            assert done["text"].startswith(streamed(tokens[i]))
    for raw in clients:
        raw.close()


def malformed(rng: random.Random) -> list[bytes]:
    """One message the service must answer with an error."""
    kind = rng.randrange(9)
    if kind == 0:
        return [b"NPC1", rng.randbytes(rng.randrange(0, 200))]
    if kind == 1:
        return [rng.randbytes(rng.randrange(0, 8)), msgpack.packb({"type": "ping", "id": "x"})]
    if kind == 2:
        return [b"NPC1"] * rng.choice([1, 3, 4])
    if kind == 3:
        return [b"NPC1", msgpack.packb(rng.choice([7, "say", [1, 2], None, 2.5, True]))]
    bad_values = [None, 3, -1, 2.5, "x", "", [], {}, True, "n" * 300, 2**64 - 1]
    msg = {"type": "say", "id": f"f{rng.randrange(10**6)}", "npc": "plain", "session": "s", "text": "hi"}
    if kind == 4:  # one field of wrong type or range
        msg[rng.choice(["type", "id", "npc", "session", "text", "max_tokens", "temperature", "seed",
                        "deadline_ms", "priority", "stream"])] = rng.choice(bad_values[1:])
        msg["npc"] = msg["npc"] if msg["npc"] != "plain" else "nobody"  # never a valid request
    elif kind == 5:  # a required field missing
        del msg[rng.choice(["type", "id", "npc", "session", "text"])]
    elif kind == 6:
        msg["type"] = rng.choice(["scene.x", "SESSION.EXPORT", "yell", "", "PING"])
    elif kind == 7:
        msg["text"] = "x" * rng.choice([2001, 5000])
    else:
        return [b"NPC1", msgpack.packb({**msg, "pad": "p" * rng.choice([70_000, 200_000])})]
    return [b"NPC1", msgpack.packb(msg)]


def test_fuzz_does_not_hurt_a_well_behaved_client(service):
    rng = random.Random(1234)
    fuzzers = [Raw(service, SNDHWM=0, RCVHWM=0) for _ in range(4)]
    giant = Raw(service)  # frames over the socket limit: ZeroMQ drops this connection, no reply
    good = Raw(service)
    sent = replies = 0
    lines = []

    def drain(timeout_ms: int = 0) -> int:
        n = 0
        for raw in fuzzers:
            while raw.sock.poll(timeout_ms, zmq.POLLIN):
                msg = raw.recv()
                assert msg["type"] == "error" and msg["code"] in protocol.ERROR_CODES, msg
                n += 1
                timeout_ms = 0
        return n

    line = 0
    good.say(f"good{line}", max_tokens=16, session="fuzz")
    good_tokens, start = [], time.monotonic()
    while sent < 12_000 or len(lines) < 3:
        if sent < 12_000:
            for _ in range(200):
                rng.choice(fuzzers).sock.send_multipart(malformed(rng))
                sent += 1
            if sent % 4000 == 0:
                giant.sock.send_multipart([b"NPC1", b"\x00" * (2 << 20)])
        replies += drain()
        while good.sock.poll(0, zmq.POLLIN):
            msg = good.recv()
            assert msg["id"] == f"good{line}"
            if msg["type"] == "token":
                assert msg["seq"] == len(good_tokens)
                good_tokens.append(msg)
                continue
            assert msg["type"] == "done" and msg["tokens"] == 16 and msg["text"] == streamed(good_tokens)
            lines.append(msg)
            line += 1
            good_tokens = []
            good.say(f"good{line}", max_tokens=16, session="fuzz")
        assert time.monotonic() - start < 120
    end = time.monotonic() + 30
    while replies < sent and time.monotonic() < end:
        replies += drain(200)
    assert replies == sent  # every malformed message got exactly one error
    assert len(lines) >= 3
    for raw in fuzzers + [giant, good]:
        raw.close()
    after = Raw(service)
    assert after.request({"type": "ping", "id": "after"}, timeout=10)["type"] == "pong"
    after.close()


# ---- bind, CURVE, shutdown ---------------------------------------------------------------------------

@pytest.mark.parametrize("addr, local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.8.0.2:1", True), ("tcp://localhost:5555", True),
    ("tcp://[::1]:5555", True), ("ipc:///tmp/npc.sock", True), ("tcp://127.0.0.1:*", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://192.168.1.20:5555", False),
    ("tcp://eth0:5555", False), ("tcp://[::]:5555", False),
])
def test_loopback_detection(addr, local):
    from npc_engine.service import is_local_endpoint

    assert is_local_endpoint(addr) is local


def test_non_loopback_bind_without_curve_is_refused(tmp_path, capsys):
    from npc_engine.cli import main

    assert main(["serve", "--bind", "tcp://0.0.0.0:5555", "--model", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "refusing to bind tcp://0.0.0.0:5555" in err and "--curve-secret" in err


def test_curve_admits_only_known_clients_and_shutdown_answers_in_flight(chatty_model_dir, personas_dir, tmp_path):
    keys = tmp_path / "keys"
    (keys / "clients").mkdir(parents=True)
    server_public_file, server_secret_file = zmq.auth.create_certificates(str(keys), "server")
    game_public_file, game_secret_file = zmq.auth.create_certificates(str(keys), "game")
    stranger_public_file, stranger_secret_file = zmq.auth.create_certificates(str(keys), "stranger")
    shutil.copy(game_public_file, keys / "clients")
    proc, endpoint = start_service(chatty_model_dir, personas_dir, "--curve-secret", server_secret_file,
                                   "--curve-clients", str(keys / "clients"))
    try:
        server_public, _ = zmq.auth.load_certificate(server_public_file)
        game = Client.connect(endpoint, curve_server_key=server_public,
                              curve_keypair=zmq.auth.load_certificate(game_secret_file))
        stranger = Client.connect(endpoint, curve_server_key=server_public,
                                  curve_keypair=zmq.auth.load_certificate(stranger_secret_file))
        plaintext = Client.connect(endpoint)
        end = time.monotonic() + 10
        while not game.connected and time.monotonic() < end:
            for client in (game, stranger, plaintext):
                client.poll()
            time.sleep(0.01)
        assert game.connected
        assert not stranger.connected and not plaintext.connected
        # shutdown: every request in flight is answered `shutting_down`
        rids = [game.say("plain", "Hello", max_tokens=LONG) for _ in range(3)]
        events = []
        while not any(e["type"] == "token" for e in events):
            events += game.poll(budget_ms=5)
            game.wait(0.05)
        proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 10
        while sum(e["type"] in ("done", "error") for e in events) < 3 and time.monotonic() < end:
            events += game.poll(budget_ms=5)
            game.wait(0.05)
        terminal = [e for e in events if e["type"] in ("done", "error")]
        assert sorted(e["id"] for e in terminal) == sorted(rids)
        assert all(e["type"] == "error" and e["code"] == "shutting_down" and not e.get("synthetic") for e in terminal)
        assert proc.wait(timeout=10) == 0
        for client in (game, stranger, plaintext):
            client.close()
    finally:
        stop_service(proc)


# ---- faults inside the service ------------------------------------------------------------------------

def test_a_fault_in_one_request_answers_internal_and_the_service_keeps_serving(chatty_model_dir, personas_dir):
    from npc_engine.engine import Engine
    from npc_engine.persona import PersonaStore
    from npc_engine.service import Service, ServiceConfig

    service = Service(Engine.load(chatty_model_dir, draft="ngram"), PersonaStore(personas_dir),
                      ServiceConfig(bind="tcp://127.0.0.1:*"))
    real_on_tokens, real_step, real_build = service.on_tokens, service.engine.step, service.build_prompt
    failures = {"step": 0}

    def on_tokens(call, event, now):
        if call.text == "boom":
            raise RuntimeError("injected fault while streaming")
        real_on_tokens(call, event, now)

    def build_prompt(persona, session, text, *rest, **kwargs):
        if text == "crash":
            raise RuntimeError("injected fault while building the prompt")
        return real_build(persona, session, text, *rest, **kwargs)

    def step():
        if failures["step"] == 0 and any(c.text == "engine fault" for c in service.calls.admitted()):
            failures["step"] += 1
            raise RuntimeError("injected engine fault")
        return real_step()

    service.on_tokens, service.build_prompt, service.engine.step = on_tokens, build_prompt, step
    with running(service) as endpoint:
        raw = Raw(endpoint)
        raw.say("ok1", text="fine", max_tokens=6)
        raw.say("boom", text="boom", max_tokens=6)
        raw.say("crash", text="crash", max_tokens=6)
        replies = collect(raw, {"ok1", "boom", "crash"})
        assert replies["ok1"][1]["type"] == "done" and replies["ok1"][1]["tokens"] == 6
        assert (replies["boom"][1]["type"], replies["boom"][1]["code"]) == ("error", "internal")
        assert (replies["crash"][1]["type"], replies["crash"][1]["code"]) == ("error", "internal")
        raw.say("ef", text="engine fault", max_tokens=6)
        assert collect(raw, {"ef"})["ef"][1]["code"] == "internal"
        raw.say("ok2", text="fine again", max_tokens=6)
        assert collect(raw, {"ok2"})["ok2"][1]["type"] == "done"
        assert failures["step"] == 1
        raw.close()


# ---- chat and the service agree ------------------------------------------------------------------------

def test_chat_and_the_service_build_token_identical_prompts_and_pick_the_same_sampling(tiny_model_dir, tmp_path):
    """The same persona, history and player lines through `npc-engine chat` and the service: the same
    prompt ids and prefix lengths, turn by turn (history dropped in the same exchanges when it no longer
    fits), and the same sampling parameters (request or flags over the persona over the defaults)."""
    import io

    from fakes import ScriptedEngine
    from npc_engine.chat import run_chat
    from npc_engine.dialogue import sampling_params
    from npc_engine.persona import PersonaStore
    from npc_engine.service import Service, ServiceConfig
    from npc_engine.tokenizer import Tokenizer

    (tmp_path / "tuned.toml").write_text(PLAIN.format(id="tuned") + "[sampling]\ntemperature = 0.3\nmax_tokens = 20\n")
    lines = ["Hello there.", "What do you test?", "And the weather?", "Tell me more about it.", "Why?", "Really?"]
    replies = ["I test swords for the town guard.", "", "The tavern is warm tonight, traveller.",
               "Songs of old heroes.", "Because.", "Yes."]  # the empty one falls back on both paths
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    store = PersonaStore(tmp_path)
    chat_engine = ScriptedEngine(tokenizer, replies, max_seq=180)  # small: the history must be cut to fit
    script = iter(lines + ["/quit"])
    run_chat(chat_engine, store, "tuned", lambda p: sampling_params(p, temperature=1.1, seed=7, max_tokens_limit=512),
             lambda _: next(script), io.StringIO())
    service_engine = ScriptedEngine(tokenizer, replies, max_seq=180)
    service = Service(service_engine, store, ServiceConfig(bind="tcp://127.0.0.1:*"))
    with running(service) as endpoint:
        raw = Raw(endpoint)
        for i, line in enumerate(lines):
            raw.say(str(i), npc="tuned", text=line, session="s", temperature=1.1, seed=7)
            assert collect(raw, {str(i)})[str(i)][1]["type"] == "done"
        raw.close()
    chat_prompts, service_prompts = list(chat_engine.prompts.values()), list(service_engine.prompts.values())
    assert chat_prompts == service_prompts
    assert len(chat_prompts[-1]) < len(chat_prompts[-2]) or len(chat_prompts[-1]) + 20 > 180 - 34 - 20  # history cut
    assert [vars(p) for p in chat_engine.params.values()] == [vars(p) for p in service_engine.params.values()]
    assert {(p.temperature, p.max_tokens) for p in chat_engine.params.values()} == {(1.1, 20)}
