"""The service while the engine is busy: a step longer than a client's heartbeat timeout (long prompts of NPCs
whose persona prefixes are not cached yet, on a slow CPU) must not look like a lost service nor delay the clock of a
say that arrives meanwhile, and admission must count those prefixes, so that one step does not prefill them all at
once. On tests/fakes.ScriptedEngine over a real ROUTER socket."""
import threading
import time
from pathlib import Path

import pytest

from bridge import Client
from fakes import ScriptedEngine
from test_hostile import make_service, ping, wait_for
from test_service import Raw, collect, running

PERSONA = '''id = "{id}"
name = "{name}"
role = "keeper of the {thing}"
greeting = "Hello."
facts = ["I keep the {thing} of the old mill by the river.", "The {thing} was my mother's before me.",
         "Nobody touches the {thing} without asking me first.", "I clean the {thing} every morning at dawn."]
fallback_lines = ["Give me a moment."]
'''
CAST = {"miller": ("Ada", "wheel"), "smith": ("Bram", "anvil"), "cook": ("Cora", "oven"), "bard": ("Dov", "lute")}


@pytest.fixture
def tokenizer(tiny_model_dir):
    from npc_engine.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_model_dir)


@pytest.fixture
def cast(tmp_path) -> Path:
    for npc, (name, thing) in CAST.items():
        (tmp_path / f"{npc}.toml").write_text(PERSONA.format(id=npc, name=name, thing=thing))
    return tmp_path


def connected(client: Client) -> bool:
    client.poll()
    return client.connected


def queued(service) -> int:
    service.read_messages()
    return len(service.calls)


def poll_for(client: Client, seconds: float) -> list[dict]:
    events, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        events += client.poll(budget_ms=5.0)
        time.sleep(0.01)
    return events


def test_heartbeats_are_answered_while_a_step_outlasts_the_client_heartbeat_timeout(tokenizer, cast):
    gate = threading.Event()  # the step waits for it: a step as long as the test wants
    engine = ScriptedEngine(tokenizer, gate=gate)
    with running(make_service(tokenizer, cast, engine)) as endpoint:
        client = Client(endpoint, ping_interval_s=0.05, heartbeat_timeout_s=0.3)
        raw = Raw(endpoint)
        try:
            wait_for(lambda: connected(client))
            rid = client.say("miller", "Hello there.", max_tokens=3)
            wait_for(lambda: bool(engine.waiting))  # admitted: the loop is in the step that takes it in
            raw.send({"type": "npcs", "id": "n"})  # not a heartbeat: answered after the step
            raw.say("late", npc="miller", deadline_ms=100, max_tokens=3)  # its deadline passes during the step
            assert ping(raw)["type"] == "pong"
            welcome = raw.request({"type": "hello", "id": "h", "protocol": [1, 2], "client": "test"}, timeout=5)
            assert welcome["type"] == "welcome"
            events = poll_for(client, 1.0)  # over three heartbeat timeouts
            assert client.connected and not [e for e in events if e["type"] in ("error", "connection")], events
            assert engine.steps == 0  # all of it while the first step still ran
        finally:
            gate.set()
        assert raw.recv(timeout=5)["type"] == "npcs"
        late = raw.recv(timeout=5)  # its clock started when it was read, during the step, not after it
        assert late["type"] == "done" and late["id"] == "late" and late["fallback"], late
        assert late["stats"]["total_ms"] >= 500  # the step went on for a second after it was sent
        wait_for(lambda: any(e["type"] == "done" and e["id"] == rid for e in client.poll()))
        client.close()
        raw.close()


def test_admission_counts_persona_prefixes_the_engine_has_not_cached(tokenizer, cast):
    engine = ScriptedEngine(tokenizer)
    service = make_service(tokenizer, cast, engine)
    prefix = min(len(service.prefix_ids(service.personas.get(npc))) for npc in CAST)
    raw = Raw(service.bind())
    for wave in range(2):
        for npc in CAST:
            raw.say(f"{npc}{wave}", npc=npc, max_tokens=2)
        wait_for(lambda: queued(service) == len(CAST))  # all of them wait before admission
        longest = max(len(call.prompt_ids) for call in service.calls.by_key.values())
        assert longest < 2 * prefix  # so two lines of uncached prefixes never fit the budget below
        service.config.max_prefill_tokens = longest
        first_step = len(engine.prefilled)
        while service.calls.by_key:
            service.iterate()
        prefilling = [tokens for tokens in engine.prefilled[first_step:] if tokens]
        if wave == 0:  # one line a step: each computes its persona prefix
            assert prefilling and max(prefilling) <= longest and len(prefilling) == len(CAST)
        else:  # every prefix is cached: the four lines enter together
            assert len(prefilling) == 1
    assert len(collect(raw, {f"{npc}{wave}" for npc in CAST for wave in range(2)}, timeout=5)) == 2 * len(CAST)
    service.transport.close()
    raw.close()
