"""The ZeroMQ service: one ROUTER socket, one loop that reads messages and steps the engine.

Socket I/O and `Engine.step()` share one thread, so the engine and the socket never cross threads.
While the engine has work the socket is polled with timeout 0 between steps; when idle the loop
sleeps in `poll` until a message, the next deadline or the next persona reload check. A deadline
can therefore be noticed one engine step late at worst; to keep the promise anyway, a request is
ended with its fallback line when the next step (estimated from recent steps) would end after
its deadline. An open `say` (the player still typing, its text arriving in `say.append` pieces)
is handed to the engine as soon as it arrives, with its prompt marked incomplete: the engine prefills
the text so far and generates nothing until the final piece completes the prompt. The wire protocol
is specified in bridge/PROTOCOL.md.
"""
import argparse
import ipaddress
import logging
import math
import os
import random
import re
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import zmq
import zmq.auth

from bridge import protocol
from npc_engine.guard import banned_topic
from npc_engine.persona import Persona, PersonaStore
from npc_engine.prompt import Turn
from npc_engine.sampling import SamplingParams
from npc_engine.scheduler import KeyedHeap, admission_order
from npc_engine.tokenizer import IncrementalDecoder

log = logging.getLogger("npc_engine.service")

SERVER_NAME = "npc-engine"


class ServiceError(Exception):
    """The service cannot start as configured."""


@dataclass
class ServiceConfig:
    bind: str = protocol.DEFAULT_ADDR
    limits: protocol.Limits = field(default_factory=protocol.Limits)
    max_calls: int = 4096  # unfinished `say` requests over all clients
    socket_max_bytes: int = 1 << 20  # ZMQ_MAXMSGSIZE: ZeroMQ drops a peer that sends a bigger frame
    send_hwm: int = 100_000  # queued messages per client before it counts as gone
    history_turns: int = 12
    max_sessions: int = 10_000
    reload_interval_s: float = 0.5
    max_reads_per_step: int = 256
    curve_secret_file: str | None = None  # zmq.auth certificate with the service's secret key
    curve_clients_dir: str | None = None  # public certificates of the clients allowed in


@dataclass
class Call:
    """One `say` in flight."""

    client: bytes
    id: str
    rid: str  # the engine's request id, unique within the service
    persona: Persona
    session: tuple[str, str]
    text: str  # the player's text (so far, while open)
    stream: bool
    received: float
    deadline: float | None
    prompt_ids: list[int]
    prefix_len: int
    params: SamplingParams
    decoder: IncrementalDecoder
    admitted: bool = False
    open: bool = False  # more `say.append` pieces are coming; the engine must not generate yet
    priority: str = "player"
    arrival: int = 0
    deadline_ms: float | None = None  # an open say's deadline starts with its final piece
    seq: int = 0
    tokens: int = 0
    generated: str = ""
    sent: int = 0  # characters of `generated` already released (streamed, or safe to show)
    first_token_at: float | None = None
    stats: object = None


def is_local_endpoint(addr: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address."""
    if addr.startswith(("ipc://", "inproc://")):
        return True
    m = re.fullmatch(r"tcp://(\[[^\]]+\]|[^:]+):(\d+|\*)", addr)
    if not m:
        return False
    host = m.group(1).strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or "*": may face the network


def check_bind(config: ServiceConfig) -> None:
    curve = (config.curve_secret_file, config.curve_clients_dir)
    if (curve[0] is None) != (curve[1] is None):
        raise ServiceError("CURVE needs both a secret key file (--curve-secret) and a client key folder (--curve-clients)")
    if curve[0] is None and not is_local_endpoint(config.bind):
        raise ServiceError(f"refusing to bind {config.bind} without CURVE: it is not a loopback address. "
                           "Give --curve-secret and --curve-clients (see bridge/PROTOCOL.md, 'Security').")
    if curve[0] is not None:
        if not zmq.has("curve"):
            raise ServiceError("this libzmq was built without CURVE support")
        if not Path(curve[0]).is_file():
            raise ServiceError(f"CURVE secret key file not found: {curve[0]}")
        if not Path(curve[1]).is_dir():
            raise ServiceError(f"CURVE client key folder not found: {curve[1]}")


class Service:
    def __init__(self, engine, personas: PersonaStore, config: ServiceConfig | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.personas = personas
        self.config = config or ServiceConfig()
        self.instance = os.urandom(8).hex()
        self.context = zmq.Context()
        self.socket: zmq.Socket | None = None
        self.endpoint: str | None = None
        self.calls: dict[tuple[bytes, str], Call] = {}
        self.by_rid: dict[str, Call] = {}
        self.per_client: dict[bytes, int] = {}
        self.queue = KeyedHeap()  # calls waiting for an engine slot
        self.deadlines = KeyedHeap()
        self.open_expiry = KeyedHeap()  # open calls, by when they time out waiting for their next piece
        self.histories: OrderedDict[tuple[str, str], list[Turn]] = OrderedDict()
        self.prefix_ids: dict[str, tuple[Persona, list[int]]] = {}
        self.gone: set[bytes] = set()
        self.rng = random.Random()
        self.step_estimate = 0.0  # seconds, running mean of engine.step()
        self.arrivals = 0
        self.stopping = False
        self.next_reload = 0.0
        self.reported_errors: dict[str, str] = {}
        self.authenticator = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def bind(self) -> str:
        check_bind(self.config)
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished client raises instead of dropping
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.socket_max_bytes)
        sock.setsockopt(zmq.SNDHWM, self.config.send_hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.send_hwm)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        if self.config.curve_secret_file:
            from zmq.auth.thread import ThreadAuthenticator

            self.authenticator = ThreadAuthenticator(self.context)
            self.authenticator.start()
            self.authenticator.configure_curve(domain="*", location=self.config.curve_clients_dir)
            public, secret = zmq.auth.load_certificate(self.config.curve_secret_file)
            if secret is None:
                raise ServiceError(f"{self.config.curve_secret_file} holds no secret key")
            sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
        try:
            sock.bind(self.config.bind)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise ServiceError(f"cannot bind {self.config.bind}: {e}") from None
        self.socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("listening on %s (%d personas)", self.endpoint, len(self.personas.ids()))
        self.warn_own_models(self.personas.ids())
        return self.endpoint

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler or another thread)."""
        self.stopping = True

    def run(self) -> None:
        if self.socket is None:
            self.bind()
        try:
            while not self.stopping:
                self.iterate()
            self.shut_down()
        finally:
            self.close()

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        self.context.term()

    def iterate(self) -> None:
        busy = self.engine.has_work() or (len(self.queue) > 0 and self.engine.capacity_left() > 0)
        if self.socket.poll(0 if busy else self.idle_timeout_ms(), zmq.POLLIN):
            self.read_messages()
        now = time.monotonic()
        self.expire_deadlines(now)
        self.expire_open(now)
        self.admit()
        if self.engine.has_work():
            self.step_engine()
        self.forget_gone_clients()
        if now >= self.next_reload:
            self.next_reload = now + self.config.reload_interval_s
            self.reload_personas()

    def idle_timeout_ms(self) -> int:
        now = time.monotonic()
        wake = min(now + 0.1, self.next_reload)
        top = self.deadlines.peek()
        if top is not None:
            wake = min(wake, top[0][0] - self.step_estimate)
        top = self.open_expiry.peek()
        if top is not None:
            wake = min(wake, top[0][0])
        return max(0, math.ceil((wake - now) * 1000))

    def shut_down(self) -> None:
        for call in list(self.calls.values()):
            self.finish(call, protocol.error(call.id, "shutting_down", "the service is shutting down"))
        log.info("stopped")

    # ---- reading ------------------------------------------------------------------------------

    def read_messages(self) -> None:
        for _ in range(self.config.max_reads_per_step):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self.handle(frames)

    def handle(self, frames: list[bytes]) -> None:
        client, msg = frames[0], None
        try:
            msg = protocol.decode(frames[1:], self.config.limits.max_message_bytes)
            msg = protocol.validate(msg, self.config.limits)
            getattr(self, "on_" + msg["type"].replace(".", "_"))(client, msg)
        except protocol.ProtocolError as e:
            self.answer_error(client, msg, protocol.error(e.id, e.code, e.message))
        except Exception:
            log.exception("handling a message failed")
            mid = protocol.message_id(msg) if isinstance(msg, dict) else None
            self.answer_error(client, msg, protocol.error(mid, "internal", "internal error while handling the message"))

    def answer_error(self, client: bytes, msg: dict | None, error: dict) -> None:
        """Send `error` in answer to `msg`. A `say.append` carries the id of a `say`, so an error with
        that id is the say's terminal message: it ends the say, and is not sent when the say has
        already ended (its terminal message was sent, as for an ignored `say.append`)."""
        if isinstance(msg, dict) and msg.get("type") == "say.append" and error["id"] is not None:
            call = self.calls.get((client, error["id"]))
            if call is not None:
                self.finish(call, error)
            return
        self.send(client, error)

    def on_hello(self, client: bytes, msg: dict) -> None:
        minor = min(msg["protocol"][1], protocol.VERSION[1])
        self.send(client, {"type": "welcome", "id": msg["id"], "protocol": [protocol.VERSION[0], minor],
                           "server": SERVER_NAME, "instance": self.instance, "npcs": self.personas.ids(),
                           "caps": list(protocol.CAPS), "limits": self.config.limits.to_wire()})

    def on_ping(self, client: bytes, msg: dict) -> None:
        self.send(client, {"type": "pong", "id": msg["id"], "instance": self.instance})

    def on_npcs(self, client: bytes, msg: dict) -> None:
        npcs = []
        for npc_id in self.personas.ids():
            p = self.personas.get(npc_id)
            npcs.append({"id": p.id, "name": p.name, "role": p.role, "greeting": p.greeting,
                         "emotions": list(p.emotions), "actions": list(p.actions)})
        errors = [{"file": f, "message": m} for f, m in sorted(self.personas.errors.items())]
        self.send(client, {"type": "npcs", "id": msg["id"], "npcs": npcs, "errors": errors})

    def on_cancel(self, client: bytes, msg: dict) -> None:
        call = self.calls.get((client, msg["id"]))
        if call is not None:  # an id that is not running is ignored: its terminal message is already sent
            self.finish(call, self.done(call, call.generated[:call.sent], cancelled=True))

    def on_say(self, client: bytes, msg: dict) -> None:
        mid = msg["id"]
        try:
            persona = self.personas.get(msg["npc"])
        except KeyError:
            known = ", ".join(self.personas.ids()[:20])
            raise protocol.ProtocolError("unknown_npc", f"no NPC '{msg['npc']}' (known: {known})", mid) from None
        if (client, mid) in self.calls:
            raise protocol.ProtocolError("duplicate_id", f"request '{mid}' is still running", mid)
        if self.per_client.get(client, 0) >= self.config.limits.max_inflight:
            raise protocol.ProtocolError("overloaded", f"this client already has {self.config.limits.max_inflight} requests running", mid)
        if len(self.calls) >= self.config.max_calls:
            raise protocol.ProtocolError("overloaded", f"the service is at its limit of {self.config.max_calls} requests", mid)
        now = time.monotonic()
        session = (persona.id, msg["session"])
        if not msg["open"] and banned_topic(persona, msg["text"]):
            self.remember(session, msg["text"], persona.deflection)
            self.send(client, self.reply_done(mid, persona.deflection, 0, now, deflected=True))
            return
        params = self.sampling(persona, msg)
        prompt_ids, prefix_len = self.build_prompt(persona, session, msg["text"], params.max_tokens, mid,
                                                   complete=not msg["open"])
        # The NPC cannot answer an open say before its final piece: its deadline starts then.
        deadline = now + msg["deadline_ms"] / 1000 if msg["deadline_ms"] is not None and not msg["open"] else None
        self.arrivals += 1
        call = Call(client, mid, f"r{self.arrivals}", persona, session, msg["text"], msg["stream"], now, deadline,
                    prompt_ids, prefix_len, params, IncrementalDecoder(self.tokenizer), open=msg["open"],
                    priority=msg["priority"], arrival=self.arrivals, deadline_ms=msg["deadline_ms"])
        key = (client, mid)
        self.calls[key] = call
        self.by_rid[call.rid] = call
        self.per_client[client] = self.per_client.get(client, 0) + 1
        self.queue.push(key, admission_order(call.priority, deadline, call.arrival))
        if deadline is not None:
            self.deadlines.push(key, (deadline,))
        if call.open:
            self.open_expiry.push(key, (now + self.config.limits.max_open_ms / 1000,))

    def on_say_append(self, client: bytes, msg: dict) -> None:
        mid, key = msg["id"], (client, msg["id"])
        call = self.calls.get(key)
        if call is None:
            return  # the say has ended (deadline, cancel, an error) and got its terminal message: ignored like `cancel`
        if not call.open:
            raise protocol.ProtocolError("bad_request", f"say '{mid}' is not open: it was sent without 'open' or "
                                         "already got its final piece", mid)
        text, limit = call.text + msg["text"], self.config.limits.max_text_chars
        if len(text) > limit:
            raise protocol.ProtocolError("too_large", f"the pieces of say '{mid}' add up to {len(text)} characters, "
                                         f"the limit is {limit}", mid)
        call.text, call.open = text, not msg["final"]
        if call.open:
            self.open_expiry.push(key, (time.monotonic() + self.config.limits.max_open_ms / 1000,))
            if not msg["text"]:
                return  # a keep-alive: the prompt is unchanged
        else:
            self.open_expiry.remove(key)
            if banned_topic(call.persona, text):  # on the whole text: a piece may end mid-word
                self.deflect(call)
                return
            if call.deadline_ms is not None:
                call.deadline = time.monotonic() + call.deadline_ms / 1000
                self.deadlines.push(key, (call.deadline,))
                if key in self.queue:  # still waiting for a slot: earliest deadline first now counts it
                    self.queue.push(key, admission_order(call.priority, call.deadline, call.arrival))
        call.prompt_ids, call.prefix_len = self.build_prompt(call.persona, call.session, text, call.params.max_tokens,
                                                             mid, complete=not call.open)
        if call.admitted:
            self.engine.update_prompt(call.rid, call.prompt_ids, complete=not call.open)

    def sampling(self, persona: Persona, msg: dict) -> SamplingParams:
        """SamplingParams defaults, then the persona's `sampling` table, then the request's fields."""
        params = SamplingParams(**persona.sampling)
        params.max_tokens = min(params.max_tokens, self.config.limits.max_tokens)
        for key in ("temperature", "seed", "max_tokens"):
            if msg[key] is not None:
                setattr(params, key, msg[key])
        return params

    def build_prompt(self, persona: Persona, session: tuple[str, str], text: str, max_tokens: int,
                     mid: str, complete: bool = True) -> tuple[list[int], int]:
        """Token ids of the persona prompt with as much history as fits, and the persona prefix length.
        complete=False: the player is still typing `text`; the prompt ends inside the player turn."""
        cached = self.prefix_ids.get(persona.id)
        if cached is None or cached[0] is not persona:
            cached = (persona, self.tokenizer.encode(persona.prefix()))
            self.prefix_ids[persona.id] = cached
        prefix_ids = cached[1]
        prefix = persona.prefix()
        turns = list(self.histories.get(session, []))
        new = [Turn("player", text)] if text.strip() else []
        limit = self.engine.max_prompt_len()
        while True:
            prompt = persona.prompt(turns + new) if complete else persona.open_prompt(turns, text)
            ids = prefix_ids + self.tokenizer.encode(prompt[len(prefix):], add_special_tokens=False)
            if len(ids) + max_tokens <= limit or not turns:
                break
            turns = turns[2:] if len(turns) > 1 else []
        if len(ids) >= limit:
            raise protocol.ProtocolError("too_large", f"the prompt is {len(ids)} tokens; the model takes at most {limit - 1}", mid)
        return ids, len(prefix_ids)

    def remember(self, session: tuple[str, str], player_text: str, npc_text: str) -> None:
        turns = self.histories.pop(session, [])
        if player_text.strip():
            turns.append(Turn("player", player_text))
        if npc_text.strip():
            turns.append(Turn("npc", npc_text))
        self.histories[session] = turns[-self.config.history_turns:]
        while len(self.histories) > self.config.max_sessions:
            self.histories.popitem(last=False)

    # ---- the engine -------------------------------------------------------------------------------

    def admit(self) -> None:
        while len(self.queue) and self.engine.capacity_left() > 0:
            call = self.calls[self.queue.pop()]
            try:
                self.engine.submit(call.rid, call.prompt_ids, call.params, prefix_len=call.prefix_len,
                                   complete=not call.open)
                call.admitted = True
            except Exception:
                log.exception("engine.submit failed for %s", call.rid)
                self.finish(call, protocol.error(call.id, "internal", "the engine refused the request"))

    def step_engine(self) -> None:
        start = time.monotonic()
        try:
            events = self.engine.step()
        except Exception:
            log.exception("engine.step failed; failing its active requests")
            for call in [c for c in self.calls.values() if c.admitted]:
                self.finish(call, protocol.error(call.id, "internal", "the engine failed while generating this line"))
            return
        elapsed = time.monotonic() - start
        self.step_estimate = elapsed if not self.step_estimate else 0.8 * self.step_estimate + 0.2 * elapsed
        now = time.monotonic()
        for event in events:
            call = self.by_rid.get(event.rid)
            if call is None:
                continue  # already answered (cancelled, deadline, guard)
            try:
                self.on_tokens(call, event, now)
            except Exception:
                log.exception("handling tokens of %s failed", call.rid)
                self.finish(call, protocol.error(call.id, "internal", "internal error while streaming this line"))

    def on_tokens(self, call: Call, event, now: float) -> None:
        call.stats = event.stats
        if event.token_ids and call.first_token_at is None:
            call.first_token_at = now
        for token in event.token_ids:
            call.generated += call.decoder.push(token)
        call.tokens += len(event.token_ids)
        if event.finished:
            call.generated += call.decoder.flush()
            call.admitted = False  # the engine has let go of it
            if event.finish_reason == "cancelled":
                self.finish(call, self.done(call, call.generated[:call.sent], cancelled=True))
            elif banned_topic(call.persona, call.generated):
                self.deflect(call)
            else:
                self.release(call, len(call.generated))
                self.remember(call.session, call.text, call.generated)
                self.finish(call, self.done(call, call.generated))
            return
        if banned_topic(call.persona, call.generated[:complete_words_end(call.generated)]):
            self.deflect(call)
        else:
            self.release(call, self.safe_end(call))

    def safe_end(self, call: Call) -> int:
        """How much of the generated text can be shown: all of it, except a tail that could still
        grow into one of the persona's banned topics (so the guard sees a topic before any of it
        streams)."""
        return unsafe_start(call.generated, call.sent, call.persona.banned_topics)

    def release(self, call: Call, end: int) -> None:
        if end <= call.sent:
            return
        if call.stream:
            self.send(call.client, {"type": "token", "id": call.id, "seq": call.seq, "text": call.generated[call.sent:end]})
            call.seq += 1
        call.sent = end

    def deflect(self, call: Call) -> None:
        self.remember(call.session, call.text, call.persona.deflection)
        self.finish(call, self.done(call, call.persona.deflection, deflected=True))

    def expire_deadlines(self, now: float) -> None:
        while (top := self.deadlines.peek()) is not None and top[0][0] - self.step_estimate <= now:
            call = self.calls[top[1]]
            line = call.persona.fallback_line(random.Random(call.params.seed) if call.params.seed is not None else self.rng)
            self.remember(call.session, call.text, line)
            self.finish(call, self.done(call, line, fallback=True))

    def expire_open(self, now: float) -> None:
        while (top := self.open_expiry.peek()) is not None and top[0][0] <= now:
            call = self.calls[top[1]]
            self.finish(call, protocol.error(call.id, "open_timeout", f"no say.append piece for "
                                             f"{self.config.limits.max_open_ms} ms while the say was open"))

    # ---- replies ----------------------------------------------------------------------------------

    def done(self, call: Call, text: str, fallback: bool = False, cancelled: bool = False,
             deflected: bool = False) -> dict:
        msg = self.reply_done(call.id, text, call.tokens, call.received, fallback, cancelled, deflected)
        stats = call.stats
        msg["stats"].update({
            "ttft_ms": None if call.first_token_at is None else (call.first_token_at - call.received) * 1000,
            "drafted": getattr(stats, "drafted", 0), "accepted": getattr(stats, "accepted", 0),
            "target_forwards": getattr(stats, "target_forwards", 0),
            "cached_prefix_tokens": getattr(stats, "cached_prefix_tokens", 0), "prompt_tokens": len(call.prompt_ids),
        })
        return msg

    @staticmethod
    def reply_done(mid: str, text: str, tokens: int, received: float, fallback: bool = False,
                   cancelled: bool = False, deflected: bool = False) -> dict:
        return {"type": "done", "id": mid, "text": text, "tokens": tokens, "fallback": fallback,
                "cancelled": cancelled, "deflected": deflected,
                "stats": {"ttft_ms": None, "total_ms": (time.monotonic() - received) * 1000, "drafted": 0,
                          "accepted": 0, "target_forwards": 0, "cached_prefix_tokens": 0, "prompt_tokens": 0}}

    def finish(self, call: Call, terminal: dict) -> None:
        """Send the call's one terminal message and forget it."""
        self.drop(call)
        self.send(call.client, terminal)

    def drop(self, call: Call) -> None:
        key = (call.client, call.id)
        if self.calls.get(key) is not call:
            return
        del self.calls[key]
        del self.by_rid[call.rid]
        self.queue.remove(key)
        self.deadlines.remove(key)
        self.open_expiry.remove(key)
        left = self.per_client[call.client] - 1
        if left:
            self.per_client[call.client] = left
        else:
            del self.per_client[call.client]
        if call.admitted:
            self.engine.cancel(call.rid)

    def send(self, client: bytes, msg: dict) -> None:
        if client in self.gone:
            return
        try:
            self.socket.send_multipart([client, protocol.TAG, msgpack.packb(msg, use_bin_type=True)], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("client %s stopped reading (%d messages queued); dropping its requests", client.hex(), self.config.send_hwm)
            self.gone.add(client)
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.gone.add(client)  # disconnected: nobody is left to answer

    def forget_gone_clients(self) -> None:
        if not self.gone:
            return
        for call in [c for c in self.calls.values() if c.client in self.gone]:
            self.drop(call)
        self.gone.clear()

    # ---- personas -----------------------------------------------------------------------------------

    def reload_personas(self) -> None:
        try:
            changed = self.personas.reload_if_changed()
        except Exception:
            log.exception("persona reload failed")
            return
        if changed:
            log.info("personas reloaded: %s", ", ".join(changed))
            self.warn_own_models(changed)
        if self.personas.errors != self.reported_errors:
            for file, message in sorted(self.personas.errors.items()):
                if self.reported_errors.get(file) != message:
                    log.error("persona file %s not loaded (previous version kept): %s", file, message)
            self.reported_errors = dict(self.personas.errors)

    def warn_own_models(self, ids: list[str]) -> None:
        for npc_id in ids:
            if npc_id in self.personas.ids() and self.personas.get(npc_id).model:
                log.warning("persona %s names model %s; the service speaks for every persona with the model it "
                            "was started with", npc_id, self.personas.get(npc_id).model)


def unsafe_start(text: str, start: int, topics: list[str]) -> int:
    """The first position at or after `start` where `text` could still grow into a match of one of
    `topics` as npc_engine.guard matches them (case-insensitive, any spacing between words, a plain
    plural, on word boundaries); len(text) when there is none."""
    wanted = [" ".join(t.lower().split()) for t in topics if t.strip()]
    for i in range(start, len(text)):
        if text[i].isspace() or (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            continue  # a match starts on a word boundary, never on a space
        tail = re.sub(r"\s+", " ", text[i:].lower())
        if any(t.startswith(tail) or (tail.startswith(t) and tail[len(t):] in ("", "s", "e", "es")) for t in wanted):
            return i
    return len(text)


def complete_words_end(text: str) -> int:
    """Length of the prefix of `text` that ends at a non-word character (its last word is complete)."""
    for i in range(len(text) - 1, -1, -1):
        if not (text[i].isalnum() or text[i] == "_"):
            return i + 1
    return 0


# ---- command line -------------------------------------------------------------------------------------

def add_subparsers(sub) -> None:
    """Register `serve` and `say` on the `npc-engine` command line."""
    from npc_engine.cli import add_model_args

    serve = sub.add_parser("serve", help="run the ZeroMQ service that game clients talk to")
    add_model_args(serve)
    serve.add_argument("--personas", default="personas", help="persona folder, hot-reloaded (default: personas)")
    serve.add_argument("--bind", default=protocol.DEFAULT_ADDR, help="ZeroMQ endpoint; a port of '*' picks a free one")
    serve.add_argument("--max-batch", type=int, default=16, help="requests generated together")
    serve.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                       help="CPU threads for the model (default: all cores but one, so socket I/O never starves)")
    serve.add_argument("--curve-secret", help="zmq.auth secret certificate of the service (enables CURVE)")
    serve.add_argument("--curve-clients", help="folder of the public certificates of allowed clients")
    serve.set_defaults(func=serve_command)

    say = sub.add_parser("say", help="ask a running service for one NPC line and stream it")
    say.add_argument("--npc", required=True, help="persona id")
    say.add_argument("--connect", default=protocol.DEFAULT_ADDR, help="service endpoint")
    say.add_argument("--session", default="terminal")
    say.add_argument("--deadline-ms", type=float)
    say.add_argument("--max-tokens", type=int)
    say.add_argument("--temperature", type=float)
    say.add_argument("--seed", type=int)
    say.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the line")
    say.add_argument("text", nargs="+", help="what the player says")
    say.set_defaults(func=say_command)


def serve_command(args: argparse.Namespace) -> int:
    import torch

    from npc_engine.engine import Engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    config = ServiceConfig(bind=args.bind, curve_secret_file=args.curve_secret, curve_clients_dir=args.curve_clients)
    try:
        check_bind(config)
        store = PersonaStore(args.personas)
        torch.set_num_threads(args.threads)
        engine = Engine.load(args.model, args.draft, args.device, args.dtype, max_batch=args.max_batch,
                             backend=args.backend, onnx_provider=args.onnx_provider)
        if engine.graphed:
            started = time.perf_counter()
            count = engine.capture_graphs(range(1, args.max_batch + 1))
            log.info("captured %d CUDA graphs in %.1f s", count, time.perf_counter() - started)
        service = Service(engine, store, config)
        endpoint = service.bind()
    except (ServiceError, FileNotFoundError, ValueError, OSError) as e:
        print(f"npc-engine serve: {e}", file=sys.stderr)
        return 2
    for file, message in store.errors.items():
        log.error("persona file %s not loaded: %s", file, message)
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    print(f"ready {endpoint}", flush=True)
    service.run()
    return 0


def say_command(args: argparse.Namespace) -> int:
    from bridge import Client

    with Client.connect(args.connect) as client:
        try:
            rid = client.say(args.npc, " ".join(args.text), session=args.session, deadline_ms=args.deadline_ms,
                             max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        except ValueError as e:
            print(f"npc-engine say: {e}", file=sys.stderr)
            return 2
        end = time.monotonic() + args.timeout
        while time.monotonic() < end:
            for event in client.poll(budget_ms=10.0):
                if event.get("id") != rid:
                    continue
                if event["type"] == "token":
                    sys.stdout.write(event["text"])
                    sys.stdout.flush()
                elif event["type"] == "done":
                    flags = [name for name in ("fallback", "deflected", "cancelled") if event.get(name)]
                    sys.stdout.write(f"\n[{', '.join(flags)}] {event['text']}\n" if flags else "\n")
                    return 0
                elif event["type"] == "error":
                    print(f"\nnpc-engine say: {event['code']}: {event['message']}", file=sys.stderr)
                    return 1
            client.wait(0.02)
        print(f"\nnpc-engine say: no reply from {args.connect} within {args.timeout} s", file=sys.stderr)
        return 1

