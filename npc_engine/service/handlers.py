"""Client messages, validated by bridge.protocol, turned into calls on the engine (see Service)."""
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from bridge import protocol
from npc_engine.dialogue import PromptTooLarge, fit_prompt, sampling_params
from npc_engine.guard import banned_topic
from npc_engine.persona import Persona
from npc_engine.scenes import SceneError
from npc_engine.service.calls import Call
from npc_engine.service.transport import Incoming
from npc_engine.state import Key, StateError

log = logging.getLogger("npc_engine.service")

SERVER_NAME = "npc-engine"
HEARTBEATS = ("ping", "hello")  # answered even while the engine steps (PROTOCOL.md section 7)


def is_heartbeat(frames: list[bytes], max_bytes: int) -> bool:
    try:
        msg = protocol.decode(frames, max_bytes)
    except protocol.ProtocolError:
        return False
    return msg.get("type") in HEARTBEATS


@contextmanager
def answered_as(mid: str) -> Iterator[None]:
    """A SceneError or StateError (their codes are wire codes) -> the ProtocolError of the same code."""
    try:
        yield
    except (SceneError, StateError) as e:
        raise protocol.ProtocolError(e.code, e.message, mid) from None


class Handlers:
    """The `on_<type>` method of each client message type; mixed into Service, whose state they use."""

    def handle(self, src: Incoming) -> None:
        msg = None
        try:
            msg = protocol.decode(src.frames, self.config.limits.max_message_bytes)
            msg = protocol.validate(msg, self.config.limits)
            getattr(self, "on_" + msg["type"].replace(".", "_"))(src, msg)
        except protocol.ProtocolError as e:
            self.answer_error(src.client, msg, protocol.error(e.id, e.code, e.message))
        except Exception:
            log.exception("handling a message failed")
            mid = protocol.message_id(msg) if isinstance(msg, dict) else None
            error = protocol.error(mid, "internal", "internal error while handling the message")
            self.answer_error(src.client, msg, error)

    def answer_error(self, client: bytes, msg: dict | None, error: dict) -> None:
        """Send `error` in answer to `msg`. A `say.append` carries the id of a `say`, so an error with
        that id is the say's terminal message: it ends the say, and is not sent when the say has
        already ended (its terminal message was sent, as for an ignored `say.append`)."""
        if isinstance(msg, dict) and msg.get("type") == "say.append" and error["id"] is not None:
            call = self.calls.get(client, error["id"])
            if call is not None:
                self.finish(call, error)
            return
        self.transport.send(client, error)

    def on_hello(self, src: Incoming, msg: dict) -> None:
        minor = min(msg["protocol"][1], protocol.VERSION[1])
        self.minors[src.client] = minor
        self.transport.send(src.client, {
            "type": "welcome", "id": msg["id"], "protocol": [protocol.VERSION[0], minor], "server": SERVER_NAME,
            "instance": self.instance, "npcs": self.personas.ids(), "caps": list(protocol.CAPS),
            "limits": self.config.limits.to_wire()})

    def on_ping(self, src: Incoming, msg: dict) -> None:
        self.transport.send(src.client, {"type": "pong", "id": msg["id"], "instance": self.instance})

    def on_npcs(self, src: Incoming, msg: dict) -> None:
        npcs = []
        for npc_id in self.personas.ids():
            p = self.personas.get(npc_id)
            npcs.append({"id": p.id, "name": p.name, "role": p.role, "greeting": p.greeting,
                         "emotions": list(p.emotions), "actions": list(p.actions)})
        errors = [{"file": f, "message": m} for f, m in sorted(self.persona_errors().items())]
        self.transport.send(src.client, {"type": "npcs", "id": msg["id"], "npcs": npcs, "errors": errors})

    def on_cancel(self, src: Incoming, msg: dict) -> None:
        call = self.calls.get(src.client, msg["id"])
        if call is not None:  # an id that is not running is ignored: its terminal message is already sent
            self.finish(call, self.done(call, call.line.text[:call.line.shown], cancelled=True))

    def on_say(self, src: Incoming, msg: dict) -> None:
        mid, client = msg["id"], src.client
        if self.closing:
            raise protocol.ProtocolError("shutting_down", "the service is shutting down", mid)
        try:
            persona = self.personas.get(msg["npc"])
        except KeyError:
            known = ", ".join(self.personas.ids()[:20])
            raise protocol.ProtocolError("unknown_npc", f"no NPC '{msg['npc']}' (known: {known})", mid) from None
        if self.calls.get(client, mid) is not None:
            raise protocol.ProtocolError("duplicate_id", f"request '{mid}' is still running", mid)
        if self.calls.per_client.get(client, 0) >= self.config.limits.max_inflight:
            raise protocol.ProtocolError("overloaded", f"this client already has {self.config.limits.max_inflight} "
                                         "requests running", mid)
        if len(self.calls) >= self.config.max_calls:
            limit = self.config.max_calls
            raise protocol.ProtocolError("overloaded", f"the service is at its limit of {limit} requests", mid)
        now = src.read_at  # a say read during a step is handled after it; its clock started at the read
        session = Key(persona.id, msg["session"], src.user)  # PROTOCOL.md, "History": scoped by CURVE key
        if not msg["open"] and banned_topic(persona, msg["text"]):
            self.state.remember(session, msg["text"], persona.deflection)
            self.transport.send(client, self.reply_done(mid, persona.deflection, 0, now, deflected=True)
                                | self.header_fields(client, persona))
            return
        params = sampling_params(persona, max_tokens=msg["max_tokens"], temperature=msg["temperature"],
                                 seed=msg["seed"], max_tokens_limit=self.config.limits.max_tokens)
        prompt_ids, prefix_len, cut = self.build_prompt(persona, session, msg["text"], params.max_tokens, mid,
                                                        complete=not msg["open"])
        # The NPC cannot answer an open say before its final piece: its deadline starts then.
        deadline = now + msg["deadline_ms"] / 1000 if msg["deadline_ms"] is not None and not msg["open"] else None
        self.arrivals += 1
        call = Call(client, mid, f"r{self.arrivals}", persona, session, msg["text"], msg["stream"], now, deadline,
                    prompt_ids, prefix_len, params, self.new_line(persona), open=msg["open"],
                    priority=msg["priority"], arrival=self.arrivals, deadline_ms=msg["deadline_ms"], history_cut=cut)
        self.calls.add(call, now + self.config.limits.max_open_ms / 1000 if call.open else None)

    def on_say_append(self, src: Incoming, msg: dict) -> None:
        mid = msg["id"]
        call = self.calls.get(src.client, mid)
        if call is None:
            return  # the say has ended (deadline, cancel, an error) and got its terminal message: ignored like `cancel`
        if not call.open:
            raise protocol.ProtocolError("bad_request", f"say '{mid}' is not open: it was sent without 'open' or "
                                         "already got its final piece", mid)
        text, limit = call.text + msg["text"], self.config.limits.max_text_chars
        if len(text) > limit:
            raise protocol.ProtocolError("too_large", f"the pieces of say '{mid}' add up to {len(text)} characters, "
                                         f"the limit is {limit}", mid)
        now = src.read_at
        call.text = text
        if not msg["final"]:
            self.calls.open_expiry.push(call.key, (now + self.config.limits.max_open_ms / 1000,))
            if not msg["text"]:
                return  # a keep-alive: the prompt is unchanged
        else:
            call.open = False
            self.calls.open_expiry.remove(call.key)
            if banned_topic(call.persona, text):  # on the whole text: a piece may end mid-word
                self.deflect(call)
                return
            if call.key in self.calls.queue:  # complete now: it goes before the open says
                self.calls.queue.push(call.key, call.order)
            if call.deadline_ms is not None:
                self.calls.set_deadline(call, now + call.deadline_ms / 1000)
        call.prompt_ids, call.prefix_len, call.history_cut = self.build_prompt(
            call.persona, call.session, text, call.params.max_tokens, mid, complete=not call.open)
        if call.admitted:
            self.engine.update_prompt(call.rid, call.prompt_ids, complete=not call.open)

    def build_prompt(self, persona: Persona, session: Key, text: str, max_tokens: int, mid: str,
                     complete: bool = True) -> tuple[list[int], int, bool]:
        """(prompt ids, persona prefix length, whether the prompt left out turns of the conversation)."""
        conv = self.state.get(session)
        try:
            prompt = fit_prompt(self.tokenizer, persona, conv.turns, text, self.engine.max_prompt_len(), max_tokens,
                                complete, self.prefix_ids(persona), [m.text for m in conv.memories])
        except PromptTooLarge as e:
            raise protocol.ProtocolError("too_large", str(e), mid) from None
        return prompt.ids, prompt.prefix_len, prompt.turns_left_out > 0 or conv.dropped > 0
