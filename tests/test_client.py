"""bridge.Client against a scripted service (a ROUTER in a thread): the frame-budget contract,
heartbeats, reconnection and the client-side terminal events. The real service is in
test_service.py."""
import queue
import statistics
import threading
import time

import pytest
import zmq

from bridge import BridgeError, Client, protocol


class FakeService(threading.Thread):
    """Answers hello/ping (with `instance`) while `answering`; `on_say(msg)` gives the replies to a say."""

    def __init__(self, on_say=None):
        super().__init__(daemon=True)
        self.on_say = on_say
        self.answering = True
        self.instance = "A"
        self.caps: list[str] = []
        self.received: list[dict] = []
        self.outbox: queue.Queue = queue.Queue()
        self.client: bytes | None = None
        self.stopping = False
        self.ready = threading.Event()
        self.start()
        self.ready.wait()

    def run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)  # created, used and closed in this thread only
        sock.setsockopt(zmq.SNDHWM, 0)
        self.endpoint = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.ready.set()
        while not self.stopping:
            if self.answering and sock.poll(2, zmq.POLLIN):
                client, *frames = sock.recv_multipart()
                self.client = client
                msg = protocol.decode(frames, 1 << 20)
                self.received.append(msg)
                for reply in self.replies(msg):
                    sock.send_multipart([client, *protocol.encode(reply)])
            elif not self.answering:
                time.sleep(0.002)
            while not self.outbox.empty():
                sock.send_multipart([self.client, *protocol.encode(self.outbox.get())])
        sock.close(linger=0)

    def replies(self, msg: dict) -> list[dict]:
        if msg["type"] == "hello":
            return [{"type": "welcome", "id": msg["id"], "protocol": [1, 0], "server": "fake",
                     "instance": self.instance, "npcs": ["smith"], "caps": self.caps,
                     "limits": protocol.Limits().to_wire()}]
        if msg["type"] == "ping":
            return [{"type": "pong", "id": msg["id"], "instance": self.instance}]
        if msg["type"] == "say" and self.on_say is not None:
            return self.on_say(msg)
        return []

    def close(self) -> None:
        self.stopping = True
        self.join()


@pytest.fixture
def fake():
    service = FakeService()
    yield service
    service.close()


def done(rid: str, text: str) -> dict:
    return {"type": "done", "id": rid, "text": text, "tokens": 1, "fallback": False, "cancelled": False,
            "deflected": False, "stats": {}}


def poll_for(client: Client, seconds: float, until=None) -> list[dict]:
    """Poll like a game loop (1 ms budget, ~2 ms frames) for `seconds` or until `until(events)`."""
    events, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        events += client.poll(budget_ms=1.0)
        if until is not None and until(events):
            break
        time.sleep(0.002)
    return events


def connected_client(fake: FakeService, **kwargs) -> Client:
    client = Client.connect(fake.endpoint, **kwargs)
    events = poll_for(client, 2.0, until=lambda ev: client.connected)
    assert events == [{"type": "connection", "connected": True, "synthetic": True}]
    return client


def test_heartbeat_is_invisible_and_keeps_connected(fake):
    client = connected_client(fake, ping_interval_s=0.05, heartbeat_timeout_s=0.5)
    assert client.server["instance"] == "A" and client.server["npcs"] == ["smith"]
    assert poll_for(client, 0.4) == []  # pongs of the client's own pings are not events
    assert client.connected
    pings = [m for m in fake.received if m["type"] == "ping"]
    assert len(pings) >= 3
    assert all(m["id"].startswith("~") for m in pings)
    client.close()


def test_lost_service_fails_running_requests_then_reconnects(fake):
    client = connected_client(fake, ping_interval_s=0.05, heartbeat_timeout_s=0.3)
    rid = client.say("smith", "hello")
    fake.answering = False
    start = time.monotonic()
    events = poll_for(client, 2.0, until=lambda ev: any(e["type"] == "error" for e in ev))
    assert 0.25 <= time.monotonic() - start < 1.5
    assert {"type": "connection", "connected": False, "synthetic": True} in events
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["id"] == rid
    assert (errors[0]["code"], errors[0]["synthetic"]) == ("disconnected", True)
    assert not client.connected
    fake.answering = True
    events = poll_for(client, 2.0, until=lambda ev: client.connected)
    assert events == [{"type": "connection", "connected": True, "synthetic": True}]
    client.close()


def test_restarted_service_fails_only_requests_sent_before(fake):
    client = connected_client(fake, ping_interval_s=0.05, heartbeat_timeout_s=5.0)
    old = client.say("smith", "hello")
    poll_for(client, 0.5, until=lambda ev: any(m.get("id") == old for m in fake.received))
    fake.instance = "B"  # as if the process restarted: it will never answer `old`
    events = poll_for(client, 1.0, until=lambda ev: any(e["type"] == "error" for e in ev))
    new = client.say("smith", "again")
    events += poll_for(client, 0.3)
    assert [(e["id"], e["code"]) for e in events if e["type"] == "error"] == [(old, "disconnected")]
    fake.outbox.put(done(new, "ok"))
    assert [e["id"] for e in poll_for(client, 1.0, until=lambda ev: ev) if e["type"] == "done"] == [new]
    client.close()


def test_missed_deadline_gives_one_timeout_and_drops_the_late_reply(fake):
    client = connected_client(fake, deadline_grace_ms=50)
    start = time.monotonic()
    rid = client.say("smith", "hello", deadline_ms=50)
    events = poll_for(client, 2.0, until=lambda ev: ev)
    assert 0.1 <= time.monotonic() - start < 1.0
    assert events == [{"type": "error", "id": rid, "code": "timeout", "message": "no reply by the deadline",
                       "synthetic": True}]
    fake.outbox.put({"type": "token", "id": rid, "seq": 0, "text": "late"})
    fake.outbox.put(done(rid, "late"))
    fake.outbox.put({"type": "pong", "id": "marker"})
    events = poll_for(client, 1.0, until=lambda ev: ev)
    assert events == [{"type": "pong", "id": "marker"}]
    client.close()


def test_an_open_says_timeout_counts_from_its_final_piece(fake):
    fake.caps = ["append"]
    client = connected_client(fake, deadline_grace_ms=50)
    rid = client.say("smith", "Can", deadline_ms=50, open=True)
    assert poll_for(client, 0.4) == []  # typing: no deadline runs yet
    final_at = time.monotonic()  # before the append: the client's deadline starts inside it
    client.append(rid, " you?", final=True)
    events = poll_for(client, 2.0, until=lambda ev: ev)
    assert 0.1 <= time.monotonic() - final_at < 1.0
    assert [(e["id"], e["code"]) for e in events] == [(rid, "timeout")]
    client.close()


def test_poll_never_exceeds_its_budget(fake):
    client = connected_client(fake)
    empty = []
    for _ in range(5):  # the best of a few: one poll may be preempted on a loaded machine
        start = time.perf_counter()
        assert client.poll(budget_ms=1.0) == []
        empty.append(time.perf_counter() - start)
    assert min(empty) < 0.005
    n = 20_000
    for seq in range(n):
        fake.outbox.put({"type": "token", "id": "flood", "seq": seq, "text": "x"})
    time.sleep(0.5)  # let the messages reach the client's queue
    timings, events = [], []
    while len(events) < n:
        start = time.perf_counter()
        batch = client.poll(budget_ms=1.0)
        timings.append(time.perf_counter() - start)
        assert batch, "messages were queued but poll returned none"
        events += batch
    assert len(timings) > 3  # the flood needed several frames
    # 1 ms budget plus the message being read; a loaded machine may preempt the odd poll
    assert statistics.median(timings) < 0.003
    assert sum(t < 0.015 for t in timings) >= 0.9 * len(timings)
    assert [e["seq"] for e in events] == list(range(n))
    client.close()


def test_say_rejects_bad_arguments_before_sending(fake):
    client = connected_client(fake)
    for kwargs in ({"priority": "boss"}, {"temperature": -1.0}, {"max_tokens": 0}, {"deadline_ms": 0},
                   {"session": ""}, {"id": "~mine"}):
        with pytest.raises(ValueError):
            client.say("smith", "hi", **kwargs)
    with pytest.raises(ValueError, match="text"):
        client.say("smith", "x" * (protocol.Limits().max_text_chars + 1))
    client.say("smith", "hi", id="mine")
    with pytest.raises(ValueError, match="still running"):
        client.say("smith", "hi", id="mine")
    poll_for(client, 0.2)
    assert [m["id"] for m in fake.received if m["type"] == "say"] == ["mine"]
    client.close()


def test_append_sends_pieces_of_an_open_say_and_checks_them(fake):
    client = Client.connect(fake.endpoint)
    with pytest.raises(ValueError, match="welcome first"):  # a 1.0 service would answer "Can" as a whole line
        client.say("smith", "Can", open=True)
    poll_for(client, 2.0, until=lambda ev: client.connected)
    with pytest.raises(ValueError, match="append"):  # this service's welcome has no `append` cap
        client.say("smith", "hello", open=True)
    fake.caps = ["append"]
    client.hello()
    poll_for(client, 2.0, until=lambda ev: any(e["type"] == "welcome" for e in ev))
    rid = client.say("smith", "Can", open=True)
    client.append(rid, " you")
    with pytest.raises(ValueError, match="'final'"):
        client.append(rid, "!", final="yes")
    with pytest.raises(ValueError, match="add up to"):
        client.append(rid, "x" * protocol.Limits().max_text_chars)
    client.append(rid, " help?", final=True)
    with pytest.raises(ValueError, match="not open"):
        client.append(rid, " again")
    closed = client.say("smith", "hi")
    with pytest.raises(ValueError, match="not open"):
        client.append(closed, " there")
    client.append("unknown", "x", final=True)  # not running: nothing sent, like cancel
    client.say("smith", "hello", open=True)
    poll_for(client, 0.2)
    sent = [m for m in fake.received if m["type"] in ("say", "say.append")]
    assert [(m["type"], m["text"], m.get("open", m.get("final"))) for m in sent] == [
        ("say", "Can", True), ("say.append", " you", False), ("say.append", " help?", True), ("say", "hi", None),
        ("say", "hello", True)]
    client.close()


def test_ask_returns_the_line_and_keeps_other_events():
    def on_say(msg):
        rid = msg["id"]
        if msg["npc"] == "ghost":
            return [protocol.error(rid, "unknown_npc", "no NPC 'ghost'")]
        return [{"type": "token", "id": rid, "seq": 0, "text": "Hm, "},
                {"type": "token", "id": rid, "seq": 1, "text": "steel."}, done(rid, "Hm, steel.")]

    fake = FakeService(on_say)
    client = Client.connect(fake.endpoint)
    other = client.say("smith", "first")
    seen = []
    time.sleep(0.2)  # the reply to `other` is waiting when ask() starts reading
    assert client.ask("smith", "hello", timeout=5.0, on_token=seen.append) == "Hm, steel."
    assert seen == ["Hm, ", "steel."]
    kept = client.poll(budget_ms=5.0)
    assert [e["type"] for e in kept if e.get("id") == other] == ["token", "token", "done"]
    with pytest.raises(BridgeError) as e:
        client.ask("ghost", "hello", timeout=5.0)
    assert e.value.code == "unknown_npc"
    client.close()
    fake.close()


def test_a_closed_connection_fails_its_says_even_when_the_socket_reconnects():
    """The service cancels a closed connection's requests without a reply, and the DEALER reconnects by itself before
    a ping could notice (PROTOCOL.md section 7): the socket monitor ends the say with `disconnected` rather than
    leaving it waiting forever (the heartbeat here would take a minute)."""
    from test_c_abi import closing_service, free_port

    port, stop = free_port(), threading.Event()
    thread = threading.Thread(target=closing_service, args=(port, stop))
    thread.start()
    try:
        client = Client.connect(f"tcp://127.0.0.1:{port}", ping_interval_s=0.1, heartbeat_timeout_s=60.0)
        assert poll_for(client, 10.0, until=lambda ev: client.connected)
        rid = client.say("plain", "hi")
        events = poll_for(client, 20.0, until=lambda ev: any(e.get("id") == rid for e in ev) and client.connected)
        mine = [e for e in events if e.get("id") == rid]
        assert [(e["type"], e["code"], e["synthetic"]) for e in mine] == [("error", "disconnected", True)]
        assert [e["connected"] for e in events if e["type"] == "connection"] == [False, True]
        client.close()
    finally:
        stop.set()
        thread.join()
