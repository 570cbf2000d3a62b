"""Conversation state through the service (protocol 1.2, cap `memory`): memories in the prompt, save-file
blobs across restarts (the next prompt is token-identical), bad blobs over the wire, `--state DIR` under
SIGKILL with 32 concurrent clients, and 200-turn conversations that outgrow the context."""
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import msgpack
import pytest

from bridge import BridgeError, Client
from npc_engine.conversation import BLOB_FORMAT, StateLimits, checksum, open_blob
from npc_engine.state import DB_NAME, State
from test_chat_template import QWEN2, SMOLLM2, model_folder
from test_service import Raw, chatty_model_dir, personas_dir, running, start_service, stop_service  # noqa: F401


@pytest.fixture(scope="module")
def engine(chatty_model_dir):  # noqa: F811
    from npc_engine.engine import Engine

    return Engine.load(chatty_model_dir, draft="none", max_seq=512)


def service_on(engine, personas_dir, state_dir=None):  # noqa: F811
    """An in-process Service whose engine records the prompt of every say: service.prompts[text] is the
    prompt ids of the latest say with that player text."""
    from npc_engine.persona import PersonaStore
    from npc_engine.service import Service, ServiceConfig

    service = Service(engine, PersonaStore(personas_dir), ServiceConfig(bind="tcp://127.0.0.1:*", state_dir=state_dir))
    service.prompts = {}
    submit = engine.submit

    def recording_submit(rid, prompt_ids, *args, **kwargs):
        call = service.calls.by_rid[rid]
        service.prompts[call.text] = list(prompt_ids)
        return submit(rid, prompt_ids, *args, **kwargs)

    service.engine = type("Recording", (), {"__getattr__": lambda _, name: getattr(engine, name),
                                            "submit": staticmethod(recording_submit)})()
    return service


def connected(endpoint: str) -> Client:
    client = Client.connect(endpoint)
    client.reply(client.hello())
    return client


def say(client: Client, text: str, session: str = "p1") -> dict:
    """The `done` of one greedy line of `plain` (the test model never stops early: 4 tokens)."""
    rid = client.say("plain", text, session=session, max_tokens=4, temperature=0)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        for event in client.poll(5.0):
            if event.get("id") == rid and event["type"] in ("done", "error"):
                assert event["type"] == "done", event
                return event
        client.wait(0.05)
    raise TimeoutError(text)


def test_memories_reach_the_prompt_and_are_listed_and_forgotten(engine, personas_dir):  # noqa: F811
    service = service_on(engine, personas_dir)
    with running(service) as endpoint, connected(endpoint) as client:
        assert "memory" in client.server["caps"] and client.server["protocol"] == [1, 2]
        first = client.reply(client.add_memory("plain", "p1", "The player  saved my\ndaughter."))
        assert (first["type"], first["memory_id"]) == ("memory.added", 1)
        assert first["text"] == "The player saved my daughter."
        client.reply(client.add_memory("plain", "p1", "The player owes me ten silver."))
        listed = client.reply(client.list_memories("plain", "p1"))["memories"]
        assert [m["text"] for m in listed] == ["The player saved my daughter.", "The player owes me ten silver."]
        assert client.reply(client.list_memories("plain", "p2"))["memories"] == []

        assert say(client, "Hello again.")["history_cut"] is False
        prompt = engine.tokenizer.decode(service.prompts["Hello again."])
        assert "saved my daughter" in prompt and "ten silver" in prompt
        assert prompt.index("I test things.") < prompt.index("saved my daughter") < prompt.index("Hello again.")
        prefix = service.prefix_ids(service.personas.get("plain"))
        assert service.prompts["Hello again."][:len(prefix)] == prefix  # the persona block stays the cached prefix

        assert client.reply(client.forget_memory("plain", "p1", 1))["forgotten"] == 1
        assert client.reply(client.forget_memory("plain", "p1", 1))["forgotten"] == 0
        say(client, "And now?")
        prompt = engine.tokenizer.decode(service.prompts["And now?"])
        assert "saved my daughter" not in prompt and "ten silver" in prompt
        assert client.reply(client.forget_memory("plain", "p1"))["forgotten"] == 1

        with pytest.raises(BridgeError) as e:
            client.reply(client.add_memory("nobody", "p1", "x"))
        assert e.value.code == "unknown_npc"
        raw = Raw(endpoint)
        for text, code in (("x" * 201, "too_large"), (" \n", "bad_request")):
            with pytest.raises(ValueError):
                client.add_memory("plain", "p1", text)  # the client refuses what the service would
            reply = raw.request({"type": "memory.add", "id": "m", "npc": "plain", "session": "p1", "text": text})
            assert (reply["type"], reply["code"]) == ("error", code)
        raw.close()
        assert client.reply(client.list_memories("plain", "p1"))["memories"] == []


def test_export_restart_import_gives_the_same_next_prompt(engine, personas_dir, tmp_path):  # noqa: F811
    service = service_on(engine, personas_dir, str(tmp_path / "durable"))
    with running(service) as endpoint, connected(endpoint) as client:
        for text in ("Good morning.", "What do you test?", "Anything else?"):
            say(client, text)
        client.reply(client.add_memory("plain", "p1", "The player is called Mira."))
        say(client, "Other session.", session="p2")
        blob = client.reply(client.export_session("p1"))["blob"]
        one = client.reply(client.export_session("p1", npc="plain"))["blob"]
        say(client, "Do you remember me?")
    before = service.prompts["Do you remember me?"]
    assert "Mira" in engine.tokenizer.decode(before) and "Anything else?" in engine.tokenizer.decode(before)

    fresh = service_on(engine, personas_dir)  # a restarted service, state in memory: the save restores it
    with running(fresh) as endpoint, connected(endpoint) as client:
        assert client.reply(client.import_session(blob))["npcs"] == ["plain"]
        say(client, "Do you remember me?")
        assert fresh.prompts["Do you remember me?"] == before
        assert client.reply(client.import_session(one, session="copy"))["npcs"] == ["plain"]
        say(client, "Do you remember me?", session="copy")
        assert fresh.prompts["Do you remember me?"] == before

    # The durable service restarted on its folder has p1 as it was after its last line.
    durable = service_on(engine, personas_dir, str(tmp_path / "durable"))
    with running(durable) as endpoint, connected(endpoint) as client:
        say(client, "Other session.", session="p2")
        assert durable.prompts["Other session."] != service.prompts["Other session."]  # p2 has its history
        history = open_blob(client.reply(client.export_session("p1"))["blob"], StateLimits())[2]["plain"].turns
        assert [t.text for t in history if t.speaker == "player"][-1] == "Do you remember me?"


def test_bad_blobs_over_the_wire_get_stable_codes_and_change_nothing(engine, personas_dir):  # noqa: F811
    service = service_on(engine, personas_dir)
    with running(service) as endpoint, connected(endpoint) as client:
        say(client, "Remember this line.")
        client.reply(client.add_memory("plain", "p1", "A memory."))
        good = client.reply(client.export_session("p1"))["blob"]
        raw_body = msgpack.unpackb(good)["body"]
        other_version = msgpack.packb({"format": BLOB_FORMAT, "version": 2, "body": raw_body,
                                       "checksum": checksum(raw_body)})
        flipped = bytearray(good)
        flipped[good.index(raw_body) + 5] ^= 0x10
        cases = [(good[:len(good) // 2], "bad_blob"), (bytes(flipped), "bad_blob"), (other_version, "blob_version"),
                 (good + bytes(50_000), "too_large"), (good + bytes(10 * 48 * 1024), "too_large")]
        raw = Raw(endpoint)
        for n, (blob, code) in enumerate(cases):
            reply = raw.request({"type": "session.import", "id": f"i{n}", "blob": blob})
            assert (reply["type"], reply["code"]) == ("error", code), reply
            assert reply["id"] == (None if len(blob) > 64 * 1024 else f"i{n}")  # a body over the limit is not read
        assert raw.request({"type": "session.import", "id": "s", "blob": "not bin"})["code"] == "bad_blob"
        raw.close()
        assert client.reply(client.export_session("p1"))["blob"] == good


WRITERS = 32


def test_state_dir_survives_sigkill_under_32_concurrent_clients(chatty_model_dir, personas_dir, tmp_path):  # noqa: F811
    proc, endpoint = start_service(chatty_model_dir, personas_dir, "--state", str(tmp_path))
    finished: list[tuple[int, str, str]] = []  # (client, player text, done.text) of every line that got its done
    stop = threading.Event()

    def talk(i: int) -> None:
        with Client.connect(endpoint) as client:
            for n in range(20):  # 40 turns: all of them stay in the history
                text = f"client {i} line {n}"
                try:
                    reply = client.ask("plain", text, session=f"c{i}", max_tokens=4, temperature=0, timeout=10)
                except BridgeError:
                    return  # the service is gone
                finished.append((i, text, reply))
                if stop.is_set():
                    return

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(WRITERS)]
    for t in threads:
        t.start()
    try:
        end = time.monotonic() + 120
        while len(finished) < 3 * WRITERS and time.monotonic() < end:
            time.sleep(0.05)
        assert len(finished) >= 3 * WRITERS
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        stop.set()
        for t in threads:
            t.join(30)
    assert proc.returncode == -signal.SIGKILL

    proc, endpoint = start_service(chatty_model_dir, personas_dir, "--state", str(tmp_path))  # reloads it
    try:
        with connected(endpoint) as client:
            for i in range(WRITERS):
                turns = open_blob(client.reply(client.export_session(f"c{i}", "plain"))["blob"],
                                  StateLimits())[2]["plain"].turns
                pairs = list(zip([t.text for t in turns[::2]], [t.text for t in turns[1::2]]))
                mine = [(text, reply) for c, text, reply in finished if c == i]
                assert pairs[:len(mine)] == mine and len(pairs) <= len(mine) + 1  # + a line done but not delivered
        second = subprocess.run([sys.executable, "-m", "npc_engine", "serve", "--model", str(chatty_model_dir),
                                 "--personas", str(personas_dir), "--bind", "tcp://127.0.0.1:*", "--state",
                                 str(tmp_path)], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "in use by another process" in second.stderr
    finally:
        stop_service(proc)
    state = State(folder=tmp_path)  # SQLite's integrity check passes
    assert {int(k.session[1:]) for k in state.conversation_keys()} >= {c for c, _, _ in finished}
    state.close()
    assert sqlite3.connect(tmp_path / DB_NAME).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_200_turns_keep_producing_lines_with_memories_in_the_prompt(engine, personas_dir):  # noqa: F811
    service = service_on(engine, personas_dir)
    with running(service) as endpoint, connected(endpoint) as client:
        client.reply(client.add_memory("plain", "long", "The player slew the dragon of the north."))
        cuts = []
        for n in range(100):  # 200 turns, far more than the 512-token context holds
            text = f"This is my question number {n}, about swords and the town guard."
            cuts.append(say(client, text, session="long")["history_cut"])
            prompt = engine.tokenizer.decode(service.prompts[text])
            assert "slew the dragon" in prompt and text in prompt
            assert f"number {n - 1}," in prompt or n == 0  # the latest exchange stays
            assert len(service.prompts[text]) <= engine.max_prompt_len()
        assert not cuts[0] and all(cuts[-50:])


@pytest.mark.parametrize("template", [SMOLLM2, QWEN2], ids=["smollm2", "qwen2"])
def test_memories_are_a_second_system_message_for_chat_template_models(tmp_path, template):
    import transformers

    from npc_engine.dialogue import fit_prompt, prefix_ids
    from npc_engine.paths import PERSONAS_DIR
    from npc_engine.persona import PersonaStore
    from npc_engine.prompt import Turn, chat_messages
    from npc_engine.tokenizer import Tokenizer

    folder = model_folder(tmp_path, template)
    tok = Tokenizer.from_dir(folder)
    persona = PersonaStore(PERSONAS_DIR).get("merchant")
    history, memories = [Turn("player", "Hello."), Turn("npc", "Welcome!")], ["The player bought a map.", "Haggles."]
    prompt = fit_prompt(tok, persona, history, "Any maps for sale?", 4096, memories=memories)
    messages = chat_messages(persona.to_prompt_persona(), history + [Turn("player", "Any maps for sale?")],
                             memories=memories)
    assert messages[1]["role"] == "system" and "bought a map" in messages[1]["content"]
    expected = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt.ids == list(expected)
    assert prompt.ids[:prompt.prefix_len] == prefix_ids(tok, persona)  # the persona's system message: the cached prefix


STATE_MESSAGES = [  # (message, error code or None, normalised fields)
    ({"type": "session.export", "id": "e", "session": "p1"}, None, {"session": "p1", "npc": None}),
    ({"type": "session.export", "id": "e", "session": "p1", "npc": "x" * 65}, "bad_request", None),
    ({"type": "session.import", "id": "i", "blob": b"\x80"}, None, {"blob": b"\x80", "session": None}),
    ({"type": "session.import", "id": "i", "blob": "\x80"}, "bad_blob", None),
    ({"type": "session.import", "id": "i", "blob": bytes(48 * 1024 + 1)}, "too_large", None),
    ({"type": "session.import", "id": "i"}, "bad_request", None),
    ({"type": "memory.add", "id": "m", "npc": "a", "session": "s", "text": " one\n two "}, None, {"text": "one two"}),
    ({"type": "memory.add", "id": "m", "npc": "a", "session": "s", "text": "x" * 201}, "too_large", None),
    ({"type": "memory.add", "id": "m", "npc": "a", "session": "s", "text": " \t"}, "bad_request", None),
    ({"type": "memory.list", "id": "l", "npc": "a"}, "bad_request", None),
    ({"type": "memory.forget", "id": "f", "npc": "a", "session": "s"}, None, {"memory_id": None}),
    ({"type": "memory.forget", "id": "f", "npc": "a", "session": "s", "memory_id": 0}, "bad_request", None),
    ({"type": "memory.forget", "id": "f", "npc": "a", "session": "s", "memory_id": True}, "bad_request", None),
]


@pytest.mark.parametrize("msg, code, fields", STATE_MESSAGES)
def test_state_messages_are_validated_like_every_message(msg, code, fields):
    from bridge import protocol

    if code is None:
        out = protocol.validate(msg, protocol.Limits())
        assert {k: out[k] for k in fields} == fields
    else:
        with pytest.raises(protocol.ProtocolError) as e:
            protocol.validate(msg, protocol.Limits())
        assert (e.value.code, e.value.id) == (code, msg["id"])


def test_the_client_sends_state_messages_only_to_a_service_that_serves_them():
    with Client.connect("tcp://127.0.0.1:9") as client:  # nothing answers: no welcome, no caps
        with pytest.raises(ValueError, match="memory"):
            client.export_session("p1")
