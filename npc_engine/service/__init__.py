"""The ZeroMQ service: one ROUTER socket (transport), one loop that reads messages (handlers), runs the
calls (calls) on the engine (engine_api) and answers. The wire protocol is bridge/PROTOCOL.md.

Socket I/O and `engine.step()` share one thread, except that while a step runs the socket is lent to
the heartbeat thread (heartbeats), which answers `ping` and `hello` and holds every other message, in
order, for the loop: a step of long prompts on a slow CPU can outlast a client's heartbeat timeout.
While the engine has work the socket is polled with timeout 0 between steps; when idle the loop
sleeps in `poll` until a message, the next deadline or the next persona reload check. A deadline
can therefore be noticed one engine step late at worst; to keep the promise anyway, a request is
ended with its fallback line when the next step (estimated from recent steps) would end after
its deadline, and admission bounds the prefill work a step takes on, persona prefixes the engine has
not cached included (scheduler.PrefillBudget). An open `say` (the player still typing, its text
arriving in `say.append` pieces) is handed to the engine as soon as it arrives, with its prompt marked
incomplete: the engine prefills the text so far and generates nothing until the final piece completes
the prompt.
"""
import logging
import math
import os
import random
import time
from collections import deque

from bridge import protocol
from npc_engine.dialogue import LineStream, fallback_line, prefix_ids
from npc_engine.persona import Persona, PersonaStore
from npc_engine.scheduler import PrefillBudget, pick_preemption
from npc_engine.service.calls import Call, Calls
from npc_engine.service.config import ServiceConfig, ServiceError, check_bind, is_local_endpoint
from npc_engine.service.engine_api import EngineAPI
from npc_engine.service.handlers import Handlers, is_heartbeat
from npc_engine.service.heartbeats import Heartbeats
from npc_engine.service.scene_handlers import SceneHandlers, open_scenes
from npc_engine.service.state_handlers import StateHandlers, open_state
from npc_engine.service.transport import Incoming, Transport

__all__ = ["Service", "ServiceConfig", "ServiceError", "check_bind", "is_local_endpoint"]

log = logging.getLogger("npc_engine.service")


class Service(Handlers, StateHandlers, SceneHandlers):
    def __init__(self, engine: EngineAPI, personas: PersonaStore, config: ServiceConfig | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.personas = personas
        self.config = config or ServiceConfig()
        self.instance = os.urandom(8).hex()
        self.transport = Transport(self.config)
        self.calls = Calls()
        self.state = open_state(self.config)  # history and memories per (npc, session), scoped by CURVE key
        self.scenes = open_scenes(personas, self.config.limits)  # scenes by (CURVE key, scene id)
        self.prefixes: dict[str, tuple[Persona, list[int]]] = {}
        self.too_long: dict[str, str] = {}  # persona file -> why its prompt block does not fit the model
        self.preempted: set[str] = set()  # engine ids cancelled to free a slot, until their last event
        self.rng = random.Random()
        self.step_estimate = 0.0  # seconds, running mean of engine.step()
        self.arrivals = 0
        self.stopping = False
        self.closing = False  # shutting down: says are refused
        self.next_reload = 0.0
        self.reported_errors: dict[str, str] = {}
        self.minors: dict[bytes, int] = {}  # the minor protocol version each client negotiated (hello)
        self.heartbeats = Heartbeats(self.answer_heartbeats)  # started by run()
        self.held: deque[Incoming] = deque()  # messages read while a step ran, not yet handled

    @property
    def endpoint(self) -> str | None:
        return self.transport.endpoint

    # ---- lifecycle ----------------------------------------------------------------------------

    def bind(self) -> str:
        endpoint = self.transport.bind()
        log.info("listening on %s (%d personas)", endpoint, len(self.personas.ids()))
        self.check_personas(self.personas.ids())
        self.compile_headers(self.personas.ids())
        return endpoint

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler or another thread)."""
        self.stopping = True

    def run(self) -> None:
        if self.transport.socket is None:
            self.bind()
        self.heartbeats.start()
        try:
            while not self.stopping:
                self.iterate()
            self.shut_down()
        finally:
            self.heartbeats.stop()
            self.transport.close()
            self.state.close()

    def iterate(self) -> None:
        busy = bool(self.held) or self.engine.has_work() or (
            len(self.calls.queue) > 0 and self.engine.capacity_left() > 0)
        if self.transport.poll(0 if busy else self.idle_timeout_ms()) or self.held:
            self.read_messages()
        self.forget_gone_clients()
        now = time.monotonic()
        self.expire_deadlines(now)
        self.expire_open(now)
        self.admit()
        if self.engine.has_work():
            self.step_engine()
        if now >= self.next_reload:
            self.next_reload = now + self.config.reload_interval_s
            self.reload_personas()

    def idle_timeout_ms(self) -> int:
        now = time.monotonic()
        wake = min(now + 0.1, self.next_reload)
        if (due := self.calls.next_due(self.calls.deadlines)) is not None:
            wake = min(wake, due[0] - self.step_estimate)
        if (due := self.calls.next_due(self.calls.open_expiry)) is not None:
            wake = min(wake, due[0])
        return max(0, math.ceil((wake - now) * 1000))

    def shut_down(self) -> None:
        """Answer every call `shutting_down`, then keep answering for a grace period (a say sent as the
        signal came still gets its terminal message)."""
        self.closing = True
        for call in list(self.calls.by_key.values()):
            self.finish(call, protocol.error(call.id, "shutting_down", "the service is shutting down"))
        end = time.monotonic() + self.config.shutdown_grace_s
        while (left := end - time.monotonic()) > 0:
            if self.transport.poll(math.ceil(left * 1000)):
                self.read_messages()
        log.info("stopped")

    def read_messages(self) -> None:
        while self.held:
            self.handle(self.held.popleft())
        for _ in range(self.config.max_reads_per_step):
            src = self.transport.recv()
            if src is None:
                return
            self.handle(src)

    def forget_gone_clients(self) -> None:
        """Cancel, without a reply, the calls of clients whose connection closed or who were dropped."""
        for client in self.transport.take_gone():
            self.minors.pop(client, None)
            for call in self.calls.of_client(client):
                self.drop(call)

    # ---- the engine -------------------------------------------------------------------------------

    def admit(self) -> None:
        budget = PrefillBudget(self.config.max_prefill_tokens)
        while (top := self.calls.queue.peek()) is not None:
            call = self.calls.by_key[top[1]]
            if self.engine.capacity_left() <= 0:
                if not call.open and not self.preempted:
                    self.preempt_open_say()
                return
            if not budget.take(len(call.prompt_ids) - call.prefix_len, self.uncached_prefix(call)):
                return
            self.calls.queue.pop()
            try:
                self.engine.submit(call.rid, call.prompt_ids, call.params, prefix_len=call.prefix_len,
                                   complete=not call.open, header=call.line.header)
                call.admitted = True
            except Exception:
                log.exception("engine.submit failed for %s", call.rid)
                self.finish(call, protocol.error(call.id, "internal", "the engine refused the request"))

    def uncached_prefix(self, call: Call) -> tuple[int, ...]:
        """The call's persona prefix when the engine would compute it in the step that admits the call, else ()."""
        prefix = tuple(call.prompt_ids[:call.prefix_len])
        return () if self.engine.prefix_cached(prefix) else prefix

    def preempt_open_say(self) -> None:
        """A complete say waits and every slot is taken: free one held by an open say (PROTOCOL.md, 'Admission')."""
        holders: dict[bytes, list] = {}
        for call in self.calls.admitted():
            if call.open:
                holders.setdefault(call.client, []).append((call.arrival, call.key))
        key = pick_preemption(holders)
        if key is None:
            return
        call = self.calls.by_key[key]
        if self.engine.cancel(call.rid):
            self.preempted.add(call.rid)
        self.arrivals += 1
        self.calls.requeue(call, f"r{self.arrivals}")

    def step_engine(self) -> None:
        start = time.monotonic()
        try:
            with self.heartbeats.lent():
                events = self.engine.step()
        except Exception:
            log.exception("engine.step failed; failing its active requests")
            for call in self.calls.admitted():
                self.finish(call, protocol.error(call.id, "internal", "the engine failed while generating this line"))
            return
        elapsed = time.monotonic() - start
        self.step_estimate = elapsed if not self.step_estimate else 0.8 * self.step_estimate + 0.2 * elapsed
        self.forget_gone_clients()  # nothing of a closed connection's calls goes to whoever holds its id next
        now = time.monotonic()
        for event in events:
            if event.finished:
                self.preempted.discard(event.rid)
            call = self.calls.by_rid.get(event.rid)
            if call is None:
                continue  # already answered (cancelled, deadline, guard) or preempted
            try:
                self.on_tokens(call, event, now)
            except Exception:
                log.exception("handling tokens of %s failed", call.rid)
                self.finish(call, protocol.error(call.id, "internal", "internal error while streaming this line"))

    def answer_heartbeats(self) -> None:
        """On the heartbeat thread, while a step runs: handles the `ping` and `hello` messages waiting in the
        socket and holds the others, at most max_reads_per_step of them (a flood delays only heartbeats)."""
        while len(self.held) < self.config.max_reads_per_step and (src := self.transport.recv()) is not None:
            if is_heartbeat(src.frames, self.config.limits.max_message_bytes):
                self.handle(src)
            else:
                self.held.append(src)

    def on_tokens(self, call: Call, event, now: float) -> None:
        call.stats = event.stats
        if event.token_ids and call.first_token_at is None:
            call.first_token_at = now
        call.tokens += len(event.token_ids)
        if not event.finished:
            self.stream(call, call.line.push(event.token_ids))
            if call.line.topic:
                self.deflect(call)
            return
        call.admitted = False  # the engine has let go of it
        if event.finish_reason == "cancelled":
            self.finish(call, self.done(call, call.line.text[:call.line.shown], cancelled=True))
            return
        self.stream(call, call.line.push(event.token_ids) + call.line.finish())
        if call.line.topic:
            self.deflect(call)
        elif not call.line.text.strip():
            self.fall_back(call)
        else:
            self.remember(call, call.line.text)
            self.finish(call, self.done(call, call.line.text))

    def stream(self, call: Call, piece: str) -> None:
        if piece and call.stream:
            self.transport.send(call.client, {"type": "token", "id": call.id, "seq": call.seq, "text": piece})
            call.seq += 1

    def deflect(self, call: Call) -> None:
        self.remember(call, call.persona.deflection)
        self.finish(call, self.done(call, call.persona.deflection, deflected=True))

    def fall_back(self, call: Call) -> None:
        line = fallback_line(call.persona, call.params.seed, self.rng)
        self.remember(call, line)
        self.finish(call, self.done(call, line, fallback=True))

    def expire_deadlines(self, now: float) -> None:
        while (due := self.calls.next_due(self.calls.deadlines)) is not None and due[0] - self.step_estimate <= now:
            self.fall_back(due[1])

    def expire_open(self, now: float) -> None:
        while (due := self.calls.next_due(self.calls.open_expiry)) is not None and due[0] <= now:
            self.finish(due[1], protocol.error(due[1].id, "open_timeout", f"no say.append piece for "
                                               f"{self.config.limits.max_open_ms} ms while the say was open"))

    # ---- replies ----------------------------------------------------------------------------------

    def done(self, call: Call, text: str, fallback: bool = False, cancelled: bool = False,
             deflected: bool = False) -> dict:
        msg = self.reply_done(call.id, text, call.tokens - call.line.header_tokens, call.received, fallback, cancelled,
                              deflected)
        msg["history_cut"] = call.history_cut
        msg.update(self.header_fields(call.client, call.persona, call.line.header))
        stats = call.stats
        msg["stats"].update({
            "ttft_ms": None if call.first_token_at is None else (call.first_token_at - call.received) * 1000,
            "drafted": getattr(stats, "drafted", 0), "accepted": getattr(stats, "accepted", 0),
            "target_forwards": getattr(stats, "target_forwards", 0),
            "cached_prefix_tokens": getattr(stats, "cached_prefix_tokens", 0), "prompt_tokens": len(call.prompt_ids),
        })
        return msg

    def header_fields(self, client: bytes, persona: Persona, header=None) -> dict:
        """`done.emotion` and `done.action` (1.2, cap `emotion`) for a client that negotiated 1.2, of a persona with
        emotions: the line header's (npc_engine.header), else (nothing generated) the first emotion and no action."""
        if self.minors.get(client, 0) < 2 or not persona.emotions:
            return {}
        emotion, action = header.result() if header is not None else (persona.emotions[0], None)
        return {"emotion": emotion, "action": action}

    def new_line(self, persona: Persona) -> LineStream:
        """The stream of a line to generate for `persona`, with its header when the persona lists emotions."""
        return LineStream(self.tokenizer, persona, header=self.engine.header_matcher(persona.emotions, persona.actions))

    @staticmethod
    def reply_done(mid: str, text: str, tokens: int, received: float, fallback: bool = False,
                   cancelled: bool = False, deflected: bool = False) -> dict:
        return {"type": "done", "id": mid, "text": text, "tokens": tokens, "fallback": fallback,
                "cancelled": cancelled, "deflected": deflected, "history_cut": False,
                "stats": {"ttft_ms": None, "total_ms": (time.monotonic() - received) * 1000, "drafted": 0,
                          "accepted": 0, "target_forwards": 0, "cached_prefix_tokens": 0, "prompt_tokens": 0}}

    def remember(self, call: Call, line: str) -> None:
        """A line that ends with `done` joins its conversation's history; a scene line its scene (scene_line_ended)."""
        if call.scene is None:
            self.state.remember(call.session, call.text, line)

    def finish(self, call: Call, terminal: dict) -> None:
        """Send the call's one terminal message and forget it."""
        if self.drop(call, terminal):
            self.transport.send(call.client, terminal)

    def drop(self, call: Call, terminal: dict | None = None) -> bool:
        """Forget `call` (cancelling it in the engine), ended by `terminal` (None: no reply); False when it was
        already gone."""
        if not self.calls.remove(call):
            return False
        if call.admitted:
            self.engine.cancel(call.rid)
        if call.scene is not None:
            self.scene_line_ended(call, terminal)
        return True

    # ---- personas -----------------------------------------------------------------------------------

    def prefix_ids(self, persona: Persona) -> list[int]:
        cached = self.prefixes.get(persona.id)
        if cached is None or cached[0] is not persona:
            cached = self.prefixes[persona.id] = (persona, prefix_ids(self.tokenizer, persona))
        return cached[1]

    def persona_errors(self) -> dict[str, str]:
        return {**self.personas.errors, **self.too_long}

    def reload_personas(self) -> None:
        try:
            changed = self.personas.reload_if_changed()
        except Exception:
            log.exception("persona reload failed")
            return
        if changed:
            log.info("personas %s", self.personas.describe(changed))
            self.check_personas(changed)
            self.compile_headers(changed)
        errors = self.persona_errors()
        if errors != self.reported_errors:
            live = {str(self.personas.get(i).source) for i in self.personas.ids()}
            for file, message in sorted(errors.items()):
                if self.reported_errors.get(file) != message:
                    state = "its loaded version stays live" if file in live else "not loaded"
                    log.error("persona file %s (%s): %s", file, state, message)
            self.reported_errors = errors

    def compile_headers(self, ids: list[str]) -> None:
        """Compiles the line header of each persona now, not on its first line: the first compile sets up the
        grammar library (seconds), and the loop answers nothing meanwhile."""
        for npc_id in ids:
            if npc_id in self.personas.ids():
                persona = self.personas.get(npc_id)
                self.engine.header_matcher(persona.emotions, persona.actions)

    def check_personas(self, ids: list[str]) -> None:
        """Warn about what a persona asks that the service cannot give: its own model, a prompt block
        longer than the model takes (every say to it would fail `too_large`)."""
        limit = self.engine.max_prompt_len()
        for npc_id in ids:
            if npc_id not in self.personas.ids():
                continue
            persona = self.personas.get(npc_id)
            if persona.model:
                log.warning("persona %s names model %s; the service speaks for every persona with the model it "
                            "was started with", npc_id, persona.model)
            n = len(self.prefix_ids(persona))
            file = str(persona.source)
            if n >= limit:
                self.too_long[file] = (f"persona {npc_id}: its prompt block is {n} tokens; the model takes at most "
                                       f"{limit - 1} (every say to it fails with too_large)")
            else:
                self.too_long.pop(file, None)
