"""Hostile clients on loopback (issue 16): routing-id attacks, takeover, vanished and non-reading
clients, oversized messages, one connection hogging the engine, deadlines behind long prompts, and
session scoping. The service runs in a thread on tests/fakes.ScriptedEngine (or the tiny model), so
every test is a bounded loop against a real ROUTER socket."""
import itertools
import logging
import struct
import threading
import time

import pytest
import zmq
import zmq.auth

from bridge import protocol
from fakes import ScriptedEngine
from test_service import PLAIN, Raw, assert_quiet, collect, running

STEP_S = 0.005  # the scripted engine's step: short, so bounds below are in steps, not in model speed


@pytest.fixture
def personas(tmp_path):
    (tmp_path / "plain.toml").write_text(PLAIN.format(id="plain"))
    return tmp_path


@pytest.fixture
def tokenizer(tiny_model_dir):
    from npc_engine.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_model_dir)


def make_service(tokenizer, personas, engine=None, **config):
    from npc_engine.persona import PersonaStore
    from npc_engine.service import Service, ServiceConfig

    engine = engine or ScriptedEngine(tokenizer, step_s=STEP_S)
    config = ServiceConfig(bind=config.pop("bind", "tcp://127.0.0.1:*"), **config)
    return Service(engine, PersonaStore(personas), config)


def client_ids(service) -> set[bytes]:
    return set(service.transport.client_fd)


def wait_for(predicate, timeout: float = 5.0) -> float:
    """Seconds until `predicate()` held (polled); fails after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(0.005)
    return time.monotonic() - start


def ping(raw: Raw, mid: str = "p") -> dict:
    return raw.request({"type": "ping", "id": mid}, timeout=5)


def served_as(endpoint: str, identity: bytes, timeout: float = 5.0) -> Raw:
    """A DEALER with this routing id that the service answers. libzmq refuses an id while a pipe with it is still
    closing (here: the refused thief's own reconnect, closed a moment ago) and drops what was sent before the
    refusal, so a fresh socket is tried until a ping comes back."""
    end = time.monotonic() + timeout
    while True:
        raw = Raw(endpoint, IDENTITY=identity)
        raw.send({"type": "ping", "id": "p"})
        if raw.sock.poll(500, zmq.POLLIN):
            assert raw.recv()["type"] == "pong"
            return raw
        raw.close()
        assert time.monotonic() < end, f"routing id {identity!r} was never served again"


# ---- 1, 2: routing ids ----------------------------------------------------------------------------

def test_the_automatic_routing_ids_start_at_a_secret(tokenizer, personas):
    """libzmq names peers 0x00 + a counter from rand(); unseeded it starts at 0x6B8B4567 in every process."""
    firsts = []
    for _ in range(2):
        service = make_service(tokenizer, personas)
        with running(service) as endpoint:
            raw = Raw(endpoint)
            ping(raw)
            (rid,) = client_ids(service)
            raw.close()
        assert len(rid) == 5 and rid[0] == 0
        firsts.append(rid)
    assert b"\x00" + struct.pack(">I", 0x6B8B4567) not in firsts
    assert firsts[0] != firsts[1]


def test_routing_id_attacks_leave_the_service_up_and_self_named_clients_unserved(tokenizer, personas):
    service = make_service(tokenizer, personas)
    with running(service) as endpoint:
        legit = [Raw(endpoint) for _ in range(3)]
        for raw in legit:
            ping(raw)
        existing = sorted(client_ids(service))
        # the blind attack (the unseeded start and the ids after it) and the existing ids: ids of
        # the automatic form, which libzmq's metadata cannot tell from automatic ones (it cuts the property
        # at the first NUL); they are served as any client, and what they aim at is a secret or refused
        automatic = [b"\x00" + struct.pack(">I", (0x6B8B4567 + i) % 2**32) for i in range(40)] + existing
        named = [b"player1", b"\x01" + existing[0][1:], b"x" * 255]
        attackers = [Raw(endpoint, IDENTITY=name) for name in automatic + named]
        for i, raw in enumerate(attackers):
            raw.say(f"a{i}", max_tokens=2)
            raw.send({"type": "ping", "id": f"x{i}"})
        victims = [Raw(endpoint) for _ in range(8)]  # new automatic ids
        for i, raw in enumerate(legit + victims):
            raw.say(f"v{i}", max_tokens=4)
        for i, raw in enumerate(legit + victims):
            assert collect(raw, {f"v{i}"}, timeout=10)[f"v{i}"][1]["type"] == "done"
        for raw in attackers[len(automatic):]:
            assert_quiet(raw, 0.05)
        assert service.transport.refused >= len(named)  # and again after each of their DEALERs reconnects
        assert not client_ids(service) & set(named)
        for raw in legit + victims + attackers:
            raw.close()


def test_a_reconnect_with_a_vanished_clients_id_gets_nothing_of_its_request(tokenizer, personas):
    service = make_service(tokenizer, personas)
    with running(service) as endpoint:
        victim = Raw(endpoint)
        victim.say("secret", text="My password is", open=True, max_tokens=8)
        ping(victim)
        (rid,) = client_ids(service)
        thief = Raw(endpoint, IDENTITY=rid)  # while the victim is connected: libzmq refuses the duplicate
        thief.append("secret", " swordfish", final=True)
        assert_quiet(thief, 0.2)
        assert service.calls.get(rid, "secret").open
        victim.close()
        wait_for(lambda: len(service.calls) == 0, timeout=1.0)  # cancelled with the connection, no reply
        thief.close()
        thief = served_as(endpoint, rid)
        thief.append("secret", " swordfish", final=True)
        thief.send({"type": "cancel", "id": "secret"})
        thief.say("mine", max_tokens=2)  # an id of the automatic form is served as a client of its own
        assert collect(thief, {"mine"}, timeout=5)["mine"][1]["type"] == "done"  # and nothing about "secret"
        assert_quiet(thief, 0.2)
        thief.close()


# ---- 3: vanished clients ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["stream", "no_stream", "open"])
def test_a_vanished_clients_requests_are_cancelled_within_a_heartbeat(tokenizer, personas, kind):
    engine = ScriptedEngine(tokenizer, max_batch=2, step_s=STEP_S)
    service = make_service(tokenizer, personas, engine, heartbeat_ms=300, heartbeat_timeout_ms=900)
    with running(service) as endpoint:
        gone = Raw(endpoint)
        fields = {"stream": {}, "no_stream": {"stream": False}, "open": {"open": True}}[kind]
        for i in range(2):  # every engine slot
            gone.say(f"g{i}", max_tokens=512, **fields)
        wait_for(lambda: len(engine.active) == 2)
        gone.close()
        wait_for(lambda: not service.calls.by_key and not engine.active, timeout=0.9)
        other = Raw(endpoint)
        other.say("o", max_tokens=4)
        steps = engine.steps
        assert collect(other, {"o"}, timeout=5)["o"][1]["tokens"] == 4
        assert engine.steps - steps <= 4 + 2  # its own 4 tokens, admission, and at most one step of the others
        other.close()


FROZEN_CLIENT = """
import sys, zmq, msgpack
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(sys.argv[1])
for i in range(2):
    sock.send_multipart([b"NPC1", msgpack.packb({"type": "say", "id": f"f{i}", "npc": "plain", "session": "f",
                                                 "text": "Hi", "max_tokens": 512, "stream": False})])
print("sent", flush=True)
sys.stdin.read()
"""


def test_a_frozen_client_is_found_out_by_the_heartbeat_and_its_requests_cancelled(tokenizer, personas):
    """No FIN, no RST: the client's process stops. ZMTP heartbeats find it (heartbeat_timeout_ms)."""
    import signal
    import subprocess
    import sys

    engine = ScriptedEngine(tokenizer, max_batch=2, step_s=STEP_S)
    service = make_service(tokenizer, personas, engine, heartbeat_ms=200, heartbeat_timeout_ms=600)
    with running(service) as endpoint:
        proc = subprocess.Popen([sys.executable, "-c", FROZEN_CLIENT, endpoint], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline() == "sent\n"
            wait_for(lambda: len(engine.active) == 2)
            proc.send_signal(signal.SIGSTOP)
            waited = wait_for(lambda: not service.calls.by_key and not engine.active, timeout=3.0)
            assert waited < 0.6 + 0.2 + 0.5  # the timeout, one heartbeat, and the loop's wake-up
        finally:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


def test_connections_over_the_limit_are_closed(tokenizer, personas):
    service = make_service(tokenizer, personas, max_connections=3)
    with running(service) as endpoint:
        admitted = [Raw(endpoint) for _ in range(3)]
        for raw in admitted:
            ping(raw)
        extra = Raw(endpoint)
        extra.send({"type": "ping", "id": "extra"})
        assert_quiet(extra, 0.5)  # closed at once, and again at each reconnect
        admitted.pop().close()
        for i in range(25):  # a place is free: its DEALER's next reconnect gets in (with "extra" still queued
            extra.send({"type": "ping", "id": f"again{i}"})  # in it, or lost with a connection being closed)
            if extra.sock.poll(200, zmq.POLLIN):
                break
        assert extra.recv(1)["id"].startswith(("extra", "again"))
        for raw in admitted + [extra]:
            raw.close()


# ---- 4, 5: memory ------------------------------------------------------------------------------------

def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_a_thousand_frame_message_is_cut_off_within_a_memory_bound(tokenizer, personas):
    """libzmq holds a message until its last frame: the watchdog closes a connection with more than
    max_unread_bytes pending. Bound: max_unread_bytes plus what loopback carries before the watchdog
    thread next looks (5 ms, more while it waits for the GIL; measured 1-6 MB more): here 16 MiB + 32 MiB
    (the issue: 1.88 GB)."""
    unread = 16 << 20
    service = make_service(tokenizer, personas, max_unread_bytes=unread)
    with running(service) as endpoint:
        good = Raw(endpoint)
        ping(good)
        peak, sampling = [resident_bytes()], threading.Event()

        def sample():
            while not sampling.is_set():
                peak.append(resident_bytes())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        attacker = Raw(endpoint)
        frame = b"\x01" * (1 << 20)
        for _ in range(999):
            attacker.sock.send(frame, zmq.SNDMORE, copy=False)
        attacker.sock.send(frame, copy=False)
        wait_for(lambda: service.transport.refused == 1, timeout=30)
        sampling.set()
        sampler.join()
        assert max(peak) - peak[0] < unread + (32 << 20)
        assert_quiet(attacker, 0.2)
        good.say("after", max_tokens=2)
        assert collect(good, {"after"}, timeout=5)["after"][1]["type"] == "done"
        attacker.close()
        good.close()


def test_a_client_that_stops_reading_is_dropped_once_and_gets_nothing_after(tokenizer, personas, caplog):
    service = make_service(tokenizer, personas, send_hwm=50)
    with running(service) as endpoint, caplog.at_level(logging.WARNING, "npc_engine.service"):
        sent_to: list[bytes] = []  # the routing id of every message that reaches the ROUTER
        sock = service.transport.socket
        send = sock.send_multipart

        def spy(frames, *args, **kwargs):
            sent_to.append(frames[0])
            return send(frames, *args, **kwargs)

        sock.send_multipart = spy
        sleeper = Raw(endpoint, RCVHWM=1, RCVBUF=4096)
        sleeper.say("long", max_tokens=512)
        ping(sleeper, "first")
        (rid,) = client_ids(service)
        end = time.monotonic() + 30
        for i in itertools.count():  # pongs with long ids, unread, until the kernel buffers and the queue are full
            if rid in service.transport.dropped or time.monotonic() > end:
                break
            try:
                sleeper.sock.send_multipart(protocol.encode({"type": "ping", "id": f"{i:0>128}"}), zmq.NOBLOCK)
            except zmq.Again:
                time.sleep(0.001)
        assert rid in service.transport.dropped
        sent = len(sent_to)
        wait_for(lambda: service.calls.get(rid, "long") is None)  # its say is cancelled
        wait_for(lambda: rid not in client_ids(service))  # its connection is closed
        time.sleep(0.3)  # its DEALER may reconnect and send on: a new client, whose pings are answered
        assert rid not in sent_to[sent:]
        assert sum("dropping client" in r.getMessage() for r in caplog.records) == 1
        sleeper.sock.close(linger=0)


# ---- 6, 7: fairness and deadlines -------------------------------------------------------------------

def test_open_says_holding_every_slot_cannot_keep_another_say_from_its_first_token(tokenizer, personas):
    engine = ScriptedEngine(tokenizer, max_batch=16, step_s=STEP_S)
    service = make_service(tokenizer, personas, engine)
    with running(service) as endpoint:
        hog, other = Raw(endpoint), Raw(endpoint)
        for i in range(20):
            hog.say(f"h{i}", text="I am still", open=True, max_tokens=4)
        wait_for(lambda: len(engine.active) == 16)
        other.say("o", max_tokens=4)
        start = time.monotonic()
        for _ in range(50):  # the hog keeps its says alive
            hog.append(f"h{_ % 20}", "")
            if other.sock.poll(10, zmq.POLLIN):
                break
        first = other.recv(5)
        assert (first["id"], first["type"], first["seq"]) == ("o", "token", 0)
        assert time.monotonic() - start < 1.0  # a few steps: one open say is preempted, the slot is taken
        while (last := other.recv(5))["type"] == "token":
            pass
        assert last["type"] == "done" and last["tokens"] == 4
        for i in range(20):
            hog.append(f"h{i}", " typing.", final=True)
        replies = collect(hog, {f"h{i}" for i in range(20)}, timeout=10)
        assert all(t["type"] == "done" and t["tokens"] == 4 for _, t in replies.values())  # preempted ones resume
        hog.close()
        other.close()


def test_a_50ms_deadline_behind_16_long_prompts_is_answered_within_a_short_step(tokenizer, personas):
    """All 17 says are read in one go (the loop is driven here): without the prefill budget the first
    step would prefill all 16 long prompts (2.2 s) and answer the 50 ms say after it."""
    per_token = 0.0001  # seconds of prefill per prompt token: 16 prompts of ~1,400 tokens take 2.2 s in one step
    engine = ScriptedEngine(tokenizer, max_batch=17, max_seq=2048, prefill_s_per_token=per_token, step_s=0.001)
    service = make_service(tokenizer, personas, engine)
    raw = Raw(service.bind())
    long_text = "the old mill by the river " * 76
    for i in range(16):
        raw.say(f"l{i}", text=long_text, max_tokens=2, session=f"l{i}")
    raw.say("quick", text="Now!", max_tokens=64, deadline_ms=50, session="q")
    time.sleep(0.3)  # all of them wait in the socket
    terminal: dict[str, dict] = {}
    end = time.monotonic() + 20
    while time.monotonic() < end:
        service.iterate()
        while raw.sock.poll(0, zmq.POLLIN):
            msg = raw.recv()
            if msg["type"] != "token":
                terminal[msg["id"]] = msg
        if len(terminal) == 17:
            break
    service.transport.close()
    raw.close()
    longest = max(len(p) for p in engine.prompts.values())
    assert longest > 1000 and all(t["type"] == "done" for t in terminal.values())
    # answered (its line, or its fallback) within one prompt's prefill of the deadline
    assert terminal["quick"]["stats"]["total_ms"] <= 50 + 2 * longest * per_token * 1000 + 100


@pytest.mark.parametrize("draft", ["none", "ngram"])
def test_the_engine_prefills_a_long_prompt_over_several_steps_into_the_same_line(tiny_model_dir, tokenizer, draft):
    from npc_engine.engine import Engine
    from npc_engine.engine.prefill import EAGER_PREFILL_CHUNK
    from npc_engine.sampling import SamplingParams

    prompt = tokenizer.encode("the old mill by the river " * 30)
    runs = {}
    for budget in (None, EAGER_PREFILL_CHUNK):
        engine = Engine.load(tiny_model_dir, draft=draft, max_prefill_tokens=budget)
        engine.submit("r", prompt, SamplingParams(temperature=0, max_tokens=8))
        tokens, first, done = [], None, False
        for step in range(1, 100):
            for event in engine.step():
                tokens += event.token_ids
                first = first or (step if event.token_ids else None)
                done = done or event.finished
            if done:
                break
        runs[budget] = tokens, first
    assert runs[None][0] == runs[EAGER_PREFILL_CHUNK][0] and len(runs[None][0]) == 8
    assert runs[None][1] == 1 and runs[EAGER_PREFILL_CHUNK][1] == -(-len(prompt) // EAGER_PREFILL_CHUNK)


# ---- 8: sessions ------------------------------------------------------------------------------------

def prompt_tokens(raw: Raw, mid: str, session: str) -> int:
    raw.say(mid, text="Hello again.", max_tokens=3, session=session)
    return collect(raw, {mid}, timeout=5)[mid][1]["stats"]["prompt_tokens"]


def test_without_curve_every_connection_shares_the_games_sessions(tokenizer, personas):
    service = make_service(tokenizer, personas)
    with running(service) as endpoint:
        a, b = Raw(endpoint), Raw(endpoint)
        first = prompt_tokens(a, "1", "player-1")
        assert prompt_tokens(b, "2", "player-1") > first  # one trusted game: b continues a's conversation
        a.close()
        b.close()


def test_with_curve_sessions_are_scoped_by_client_key(tokenizer, personas, tmp_path):
    keys = tmp_path / "keys"
    (keys / "clients").mkdir(parents=True)
    server_pub, server_secret = zmq.auth.create_certificates(str(keys), "server")
    certs = [zmq.auth.create_certificates(str(keys), name) for name in ("alice", "mallory")]
    for public, _ in certs:
        (keys / "clients" / public.split("/")[-1]).write_bytes(open(public, "rb").read())
    service = make_service(tokenizer, personas, curve_secret_file=server_secret,
                           curve_clients_dir=str(keys / "clients"))
    server_key = zmq.auth.load_certificate(server_pub)[0]

    def curve_raw(endpoint, secret_file):
        public, secret = zmq.auth.load_certificate(secret_file)
        return Raw(endpoint, CURVE_SERVERKEY=server_key, CURVE_PUBLICKEY=public, CURVE_SECRETKEY=secret)

    with running(service) as endpoint:
        alice, mallory = curve_raw(endpoint, certs[0][1]), curve_raw(endpoint, certs[1][1])
        fresh = prompt_tokens(alice, "1", "player-1")
        assert prompt_tokens(alice, "2", "player-1") > fresh
        assert prompt_tokens(mallory, "3", "player-1") == fresh  # the same session id, another key: nothing shared
        alice2 = curve_raw(endpoint, certs[0][1])  # alice again, on a new connection: her history
        assert prompt_tokens(alice2, "4", "player-1") > fresh
        for raw in (alice, mallory, alice2):
            raw.close()


# ---- 9: smaller -------------------------------------------------------------------------------------

def test_ipv6_loopback_binds(tokenizer, personas):
    service = make_service(tokenizer, personas, bind="tcp://[::1]:*")
    try:
        with running(service) as endpoint:
            raw = Raw(endpoint, IPV6=1)
            assert ping(raw)["type"] == "pong"
            raw.close()
    except AssertionError:
        raise
    except Exception as e:  # a machine without IPv6 loopback
        pytest.skip(f"no IPv6 loopback here: {e}")


def test_a_say_arriving_during_shutdown_is_answered_shutting_down(tokenizer, personas):
    service = make_service(tokenizer, personas, shutdown_grace_s=1.0)
    with running(service) as endpoint:
        raw = Raw(endpoint)
        raw.say("running", max_tokens=512)
        assert raw.recv(5)["type"] == "token"
        service.stop()
        while (terminal := raw.recv(5))["type"] == "token":
            pass
        assert (terminal["id"], terminal["code"]) == ("running", "shutting_down")
        raw.say("late", max_tokens=4)
        late = raw.recv(5)
        assert (late["id"], late["type"], late["code"]) == ("late", "error", "shutting_down")
        raw.close()


def test_a_persona_whose_block_exceeds_the_model_is_reported(tokenizer, personas):
    tale = "I know a very long tale. " * 200
    epic = PLAIN.format(id="epic").replace('facts = ["I test things."]', f'facts = ["{tale}"]')
    (personas / "epic.toml").write_text(epic)
    service = make_service(tokenizer, personas)
    with running(service) as endpoint:
        raw = Raw(endpoint)
        errors = raw.request({"type": "npcs", "id": "n"})["errors"]
        assert [e["file"] for e in errors] == [str(personas / "epic.toml")]
        assert "prompt block" in errors[0]["message"] and "too_large" in errors[0]["message"]
        raw.say("e", npc="epic")
        assert collect(raw, {"e"})["e"][1]["code"] == "too_large"
        raw.close()


def test_deflected_says_cannot_fill_memory_with_history(tokenizer, personas):
    """Issue 16: 60,000 deflected says of 2,000 emoji filled 0.45 GB. History is capped in bytes, per
    conversation and over all of them (npc_engine.state)."""
    (personas / "guarded.toml").write_text(PLAIN.format(id="guarded") + 'banned_topics = ["dragon"]\n'
                                           'deflection = "I don\'t talk about that."\n')
    service = make_service(tokenizer, personas, history_bytes=16 << 10, history_total_bytes=1 << 20)
    with running(service) as endpoint:
        raw = Raw(endpoint)
        for i in range(300):
            raw.say(f"d{i}", npc="guarded", text="dragon " + "🐉" * 1990, session=f"s{i % 150}")
        replies = collect(raw, {f"d{i}" for i in range(300)}, timeout=30)
        assert all(t["deflected"] for _, t in replies.values())
        raw.close()
    assert service.state.total <= 1 << 20
    assert max(sum(len(t.text.encode()) for t in c.turns) for c in service.state.conversations.values()) <= 16 << 10
