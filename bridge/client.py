"""Python client of the npc-engine bridge, for game loops and scripts.

A `Client` owns one ZeroMQ DEALER socket and must be used from one thread. Game loops call
`poll()` once per frame: it never blocks longer than its budget. Scripts call `ask()`.

Besides the service's messages, `poll()` yields client-side events (all with `"synthetic": True`):
- `{"type": "connection", "connected": bool}` when the service is first heard from or lost;
- `{"type": "error", "id", "code": "disconnected"}` for every unfinished request when the
  service has not been heard from for `heartbeat_timeout_s`, restarted (it forgot them), or closed the
  connection (it cancelled them without a reply, and the socket reconnects by itself);
- `{"type": "error", "id", "code": "timeout"}` when a request with a deadline has no terminal
  message `deadline_grace_ms` after its deadline.
After a synthetic terminal event, late messages for that id are dropped, so every `say` id gets
exactly one terminal event (`done` or `error`).

Scenes (protocol 1.2, cap `scene`): `open_scene`, then `scene_say` / `scene_next` ask for one line each (a
`line` event names its speaker and addressee, then `token`s and one terminal event, as for `say`),
`scene_event`, `scene_cast`, `scene_state`, `close_scene`.

Emotion and action (protocol 1.2, cap `emotion`): the `done` event of a line of an NPC that lists emotions carries
`emotion` (one of its `emotions`) and `action` (one of its `actions`, or None); this client negotiates 1.2.

A line the player is still typing can reach the service early: `say(..., open=True)` with the text
so far, then `append(id, piece)` per piece and `append(id, last_piece, final=True)`. The service
prefills the prompt while the player types and starts answering at the final piece.
"""
import itertools
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from bridge import protocol
from bridge.scene_memory_calls import MemoryCalls, SceneCalls

INTERNAL_PREFIX = "~"  # ids of the client's own heartbeat messages; never shown to the caller


class BridgeError(Exception):
    """A request ended with an `error` message (or a client-side one)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class _Pending:
    sent_at: float
    expires_at: float | None  # deadline plus grace, for the synthetic `timeout`
    deadline_ms: float | None = None  # an open say's deadline, which starts with its final piece


class Client(MemoryCalls, SceneCalls):
    def __init__(self, addr: str = protocol.DEFAULT_ADDR, *, name: str = "bridge-python",
                 ping_interval_s: float = 1.0, heartbeat_timeout_s: float = 3.0,
                 deadline_grace_ms: float = 1000.0, curve_server_key: bytes | None = None,
                 curve_keypair: tuple[bytes, bytes] | None = None, context: zmq.Context | None = None):
        """Prefer `Client.connect`. `curve_server_key` (Z85 public key of the service) and
        `curve_keypair` (this client's Z85 public, secret) enable CURVE encryption."""
        if (curve_server_key is None) != (curve_keypair is None):
            raise ValueError("CURVE needs both curve_server_key and curve_keypair")
        self.addr = addr
        self.name = name
        self.ping_interval_s = ping_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.deadline_grace_ms = deadline_grace_ms
        self.server: dict | None = None  # the latest `welcome`
        self._curve = (curve_server_key, curve_keypair)
        self._context = context or zmq.Context.instance()
        prefix = os.urandom(3).hex()  # ids stay unique across this process's clients
        self._ids = (f"{prefix}-{n}" for n in itertools.count())
        self._pending: dict[str, _Pending] = {}
        self._open_chars: dict[str, int] = {}  # open say id -> characters sent so far
        self._abandoned: OrderedDict[str, None] = OrderedDict()  # ids answered by a synthetic event
        self._probes: dict[str, float] = {}  # internal ping/hello id -> send time
        self._instance: str | None = None
        self._connected = False
        self._events: list[dict] = []
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None  # reports the socket's connection closing
        self._open()

    @classmethod
    def connect(cls, addr: str = protocol.DEFAULT_ADDR, **kwargs) -> "Client":
        return cls(addr, **kwargs)

    @property
    def connected(self) -> bool:
        """True once the service has answered and until it has been silent for heartbeat_timeout_s."""
        return self._connected

    def close(self) -> None:
        if self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
            self._socket = self._monitor = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------

    def say(self, npc: str, text: str, *, session: str = "default", max_tokens: int | None = None,
            temperature: float | None = None, seed: int | None = None, deadline_ms: float | None = None,
            priority: str = "player", stream: bool = True, open: bool = False, id: str | None = None) -> str:
        """Ask `npc` for a line; returns the request id. Raises ValueError for arguments the
        service would reject (so mistakes surface at the call, not as a later `error`).

        open=True: the player is still typing and `text` is only the first piece (may be ""); send the
        rest with `append`. The NPC answers once the final piece arrives, and the service ends the
        say with `open_timeout` when no piece comes for `limits.max_open_ms`. Its deadline counts
        from the final piece: the NPC cannot answer before the line is complete."""
        rid = self._new_id(id)
        msg = {"type": "say", "id": rid, "npc": npc, "session": session, "text": text,
               "priority": priority, "stream": stream}
        optional = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed, "deadline_ms": deadline_ms}
        msg.update({k: v for k, v in optional.items() if v is not None})
        if open:
            self._check_append_served()
            msg["open"] = True
        self._check(msg)
        if open:
            self._open_chars[rid] = len(text)
        return self._start_line(rid, msg, deadline_ms, open)

    def append(self, id: str, text: str, final: bool = False) -> None:
        """Send the next piece of the open say `id`: `text` is appended verbatim (include the spaces
        between words). final=True completes the line and the NPC starts answering. No event answers
        the append itself. A say that has already ended is left alone, as `cancel` does. Raises
        ValueError when `id` is running but not open (sent without open=True, or already final) or
        when the pieces would exceed `limits.max_text_chars`."""
        if id not in self._pending:
            return
        if id not in self._open_chars:
            raise ValueError(f"request {id!r} is not open: it was sent without open=True or already got its final "
                             "piece")
        msg = {"type": "say.append", "id": id, "text": text, "final": final}
        self._check(msg)
        total, limit = self._open_chars[id] + len(text), self._limits().max_text_chars
        if total > limit:
            raise ValueError(f"the pieces of request {id!r} would add up to {total} characters, the limit is {limit}")
        if final:
            del self._open_chars[id]
            pending = self._pending[id]
            if pending.deadline_ms is not None:
                pending.expires_at = time.monotonic() + (pending.deadline_ms + self.deadline_grace_ms) / 1000
        else:
            self._open_chars[id] = total
        self._send(msg)

    def cancel(self, id: str) -> None:
        """Ask the service to stop request `id`; it then ends with `done` and `cancelled: true`
        (or its normal terminal message if that was already on its way)."""
        if id in self._pending:
            self._send({"type": "cancel", "id": id})

    def hello(self) -> str:
        return self._request("hello", protocol=list(protocol.VERSION), client=self.name)

    def ping(self) -> str:
        return self._request("ping")

    def npcs(self) -> str:
        return self._request("npcs")

    def _check_cap(self, cap: str, what: str) -> None:
        if self.server is None or cap not in self.server.get("caps", []):
            raise ValueError(f"{what}: needs the service's welcome with '{cap}' in its caps (protocol 1.2): poll until "
                             "the connection event first")

    def _limits(self) -> protocol.Limits:
        return protocol.Limits.from_wire(self.server["limits"]) if self.server else protocol.Limits()

    def _check(self, msg: dict) -> None:
        try:
            protocol.validate(msg, self._limits())
        except protocol.ProtocolError as e:
            raise ValueError(e.message) from None

    def _check_append_served(self) -> None:
        # A 1.0 service would ignore `open`, answer the first piece as a whole line, then refuse the pieces.
        if self.server is None:
            raise ValueError("open says need the service's welcome first (its caps must list 'append'): poll until "
                             "the connection event before opening one")
        if "append" not in self.server.get("caps", []):
            raise ValueError("the service does not serve open says (no 'append' in welcome.caps; it needs protocol "
                             "1.1)")

    def _capped_request(self, cap: str, what: str, msg: dict) -> str:
        self._check_cap(cap, what)
        msg = {k: v for k, v in msg.items() if v is not None}
        msg["id"] = next(self._ids)
        self._check(msg)
        self._send(msg)
        return msg["id"]

    def _start_line(self, rid: str, msg: dict, deadline_ms: float | None, open: bool = False) -> str:
        """Send a request answered by a streamed line and track it until its one terminal event. An open say's
        deadline starts with its final piece (`append`)."""
        now = time.monotonic()
        expires = now + (deadline_ms + self.deadline_grace_ms) / 1000 if deadline_ms is not None and not open else None
        self._pending[rid] = _Pending(now, expires, deadline_ms if open else None)
        self._abandoned.pop(rid, None)
        self._send(msg)
        return rid

    def _request(self, kind: str, **fields) -> str:
        rid = self._new_id(None)
        self._send({"type": kind, "id": rid, **fields})
        return rid

    def _new_id(self, wanted: str | None) -> str:
        if wanted is None:
            return next(self._ids)
        valid = isinstance(wanted, str) and 0 < len(wanted) <= protocol.MAX_ID_CHARS
        if not valid or wanted.startswith(INTERNAL_PREFIX):
            raise ValueError(f"id must be a string of 1 to {protocol.MAX_ID_CHARS} characters not starting with "
                             f"{INTERNAL_PREFIX!r}")
        if wanted in self._pending:
            raise ValueError(f"request {wanted!r} is still running")
        return wanted

    # -- receiving --------------------------------------------------------------------------

    def poll(self, budget_ms: float = 1.0) -> list[dict]:
        """Every event available now, reading for at most `budget_ms` (never waits for more)."""
        start = time.perf_counter()
        end = start + budget_ms / 1000
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._receive(frames)
            if time.perf_counter() >= end:
                break
        self._housekeeping(time.monotonic())
        events, self._events = self._events, []
        return events

    def ask(self, npc: str, text: str, timeout: float = 30.0, on_token: Callable[[str], None] | None = None,
            **say_kwargs) -> str:
        """Blocking: the whole line (`done.text`). Raises BridgeError on an `error` or after
        `timeout` seconds (the request is then cancelled). `on_token(text)` sees each piece.
        Events of other requests that arrive meanwhile are kept for the next `poll()`."""
        rid = self.say(npc, text, **say_kwargs)
        end = time.monotonic() + timeout
        others: list[dict] = []
        try:
            while True:
                for event in self.poll(budget_ms=5.0):
                    if event.get("id") != rid:
                        others.append(event)
                    elif event["type"] == "token" and on_token is not None:
                        on_token(event["text"])
                    elif event["type"] == "done":
                        return event["text"]
                    elif event["type"] == "error":
                        raise BridgeError(event["code"], event["message"])
                left = end - time.monotonic()
                if left <= 0:
                    self.cancel(rid)
                    self._abandon(rid)
                    raise BridgeError("timeout", f"no reply within {timeout} s")
                self.wait(min(left, self.ping_interval_s))
        finally:
            self._events[:0] = others

    def reply(self, rid: str, timeout: float = 10.0) -> dict:
        """Blocking, for scripts: the event answering request `rid` (not a `say`: see `ask`). Raises
        BridgeError on an `error` or after `timeout` seconds. Other events are kept for the next `poll()`."""
        end = time.monotonic() + timeout
        others: list[dict] = []
        try:
            while True:
                events = self.poll(budget_ms=5.0)
                mine = [i for i, event in enumerate(events) if event.get("id") == rid]
                if mine:
                    event = events.pop(mine[0])
                    others += events
                    if event["type"] == "error":
                        raise BridgeError(event["code"], event["message"])
                    return event
                others += events
                left = end - time.monotonic()
                if left <= 0:
                    raise BridgeError("timeout", f"no reply within {timeout} s")
                self.wait(min(left, self.ping_interval_s))
        finally:
            self._events[:0] = others

    def wait(self, timeout_s: float) -> None:
        """Block until a message arrives or `timeout_s` passes (for scripts; games call poll only)."""
        self._socket.poll(timeout=timeout_s * 1000, flags=zmq.POLLIN)

    def _receive(self, frames: list[bytes]) -> None:
        try:
            msg = protocol.decode(frames, max_bytes=1 << 30)
        except protocol.ProtocolError:
            return  # not from an npc-engine service speaking protocol 1; nothing to report against
        self._last_heard = time.monotonic()
        self._unanswered_since = None
        if not self._connected:
            self._set_connected(True)
        mid = msg.get("id")
        if isinstance(mid, str) and mid.startswith(INTERNAL_PREFIX):
            self._on_probe_reply(mid, msg)
            return
        if msg.get("type") == "welcome":
            self.server = msg
        if mid in self._abandoned:
            return
        if msg.get("type") in ("done", "error"):
            self._pending.pop(mid, None)
            self._open_chars.pop(mid, None)
        self._events.append(msg)

    def _on_probe_reply(self, mid: str, msg: dict) -> None:
        sent_at = self._probes.pop(mid, None)
        if msg.get("type") == "welcome":
            self.server = msg
        instance = msg.get("instance")
        if instance is None or sent_at is None:
            return
        if self._instance is not None and instance != self._instance:
            # The service restarted: requests sent before this probe went to the old one and are lost.
            self._fail(lambda p: p.sent_at < sent_at, "disconnected", "the service restarted; the request was lost")
        self._instance = instance

    # -- connection upkeep -----------------------------------------------------------------------

    def _open(self) -> None:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        server_key, keypair = self._curve
        if server_key is not None:
            sock.curve_serverkey = server_key
            sock.curve_publickey, sock.curve_secretkey = keypair
        # Requests belong to their connection (PROTOCOL.md section 7): when it closes, the service has cancelled
        # them, even if the DEALER reconnects before a ping could notice. The monitor says so.
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(self.addr)
        self._socket = sock
        self._last_heard = time.monotonic()
        self._last_probe = 0.0
        self._unanswered_since: float | None = None  # first probe sent since the service was last heard
        self._probes.clear()
        self._probe("hello", protocol=list(protocol.VERSION), client=self.name)

    def _probe(self, kind: str, **fields) -> None:
        pid = f"{INTERNAL_PREFIX}{next(self._ids)}"
        now = time.monotonic()
        self._probes[pid] = now
        self._last_probe = now
        if self._unanswered_since is None:
            self._unanswered_since = now
        self._send({"type": kind, "id": pid, **fields})

    def _send(self, msg: dict) -> None:
        try:
            self._socket.send_multipart(protocol.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            pass  # queue full while the service is unreachable; the heartbeat reports the loss

    def _housekeeping(self, now: float) -> None:
        if self._connection_closed():
            if self._connected:
                self._set_connected(False)
            self._fail(lambda p: True, "disconnected", "the connection to the service closed")
        waiting = self._unanswered_since
        if waiting is not None and now - waiting >= self.heartbeat_timeout_s:
            if self._connected:
                self._set_connected(False)
            self._fail(lambda p: True, "disconnected", f"no word from the service for {now - waiting:.1f} s")
            self.close()
            self._open()  # a fresh socket drops messages queued for the lost connection
            return
        if now - self._last_heard >= self.ping_interval_s and now - self._last_probe >= self.ping_interval_s:
            self._probe("ping")
        expired = [rid for rid, p in self._pending.items() if p.expires_at is not None and now >= p.expires_at]
        for rid in expired:
            self._synthetic_error(rid, "timeout", "no reply by the deadline")

    def _connection_closed(self) -> bool:
        """Drains the monitor (it reports only EVENT_DISCONNECTED); True when it reported anything."""
        closed = False
        while True:
            try:
                self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return closed
            closed = True

    def _set_connected(self, value: bool) -> None:
        self._connected = value
        self._events.append({"type": "connection", "connected": value, "synthetic": True})

    def _fail(self, which, code: str, message: str) -> None:
        for rid in [rid for rid, p in self._pending.items() if which(p)]:
            self._synthetic_error(rid, code, message)

    def _synthetic_error(self, rid: str, code: str, message: str) -> None:
        self._abandon(rid)
        self._events.append({"type": "error", "id": rid, "code": code, "message": message, "synthetic": True})

    def _abandon(self, rid: str) -> None:
        self._pending.pop(rid, None)
        self._open_chars.pop(rid, None)
        self._abandoned[rid] = None
        while len(self._abandoned) > 4096:
            self._abandoned.popitem(last=False)
