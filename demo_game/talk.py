"""Lines in flight: who asked what, what the service streamed back, and where it is shown.

Lines are queued during the frame's update and sent in the frame's bridge phase (`exchange`), which
sends, then polls with what is left of the budget, then routes the `token`/`done`/`error`
messages to speech bubbles. An NPC says one line at a time; a new line for it cancels the old one.
A player line can go out while it is typed (an open say, one piece per finished word): the NPC
listens, and its bubble starts with the final piece. A scene line (protocol 1.2: `scene.say`, `scene.next`)
names its speaker only when the service picks it: its `line` message gives the line to that NPC's bubble.
When the service is down, or a line ends with an `error` (the bridge client also reports a lost
connection or a passed deadline as one), the NPC says one of its persona's fallback lines.
"""
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from demo_game.bubbles import Bubble
from demo_game.cast import CastMember
from demo_game.metering import MeteredClient
from demo_game.mood import Mood, from_done

SEND_SHARE = 0.5  # of the per-frame bridge budget that sending new lines may use


def trailing_off(text: str) -> str:
    """A line that `max_tokens` cut short: back to its last whole word, then "..." (its last word may be cut)."""
    text = text.rstrip()
    if not text or text[-1] in ".!?\"'":
        return text  # the line ended a sentence anyway
    if " " in text:
        text = text[:text.rfind(" ")]
    return text.rstrip(" ,;:-") + "..."


@dataclass
class Line:
    """One thing an NPC says: a `say` request to the service, or a fallback said locally."""

    npc: str
    prompt: str  # the text the NPC answers ("Brom: Have you seen the captain?")
    priority: str
    session: str
    max_tokens: int
    deadline_ms: int
    queued_at: float
    on_end: Callable[["Line", float], None] | None = None
    rid: str | None = None
    sent_at: float | None = None
    first_token_at: float | None = None
    reply: str = ""
    token_messages: int = 0
    terminal: dict | None = None  # the service's done or error message
    local: str | None = None  # why the line never reached the service: offline/rejected/cancelled
    cancel_requested: bool = False
    said: str = ""  # what the bubble ended up showing
    seqs: list[int] = field(default_factory=list)
    open: bool = False  # sent in pieces while typed; `prompt` is the first piece
    pieces: list[tuple[str, bool]] = field(default_factory=list)  # (text, final) not sent yet
    final: bool = False  # the final piece is queued or sent
    scene: str | None = None  # a scene line: `npc` is "" until the service names the speaker (unless addressed)
    speaker: str | None = None  # a scene line the game wants said by this NPC
    to: str | None = None  # the addressee of a scene line, from its `line` message
    cue: str | None = None  # what the host does with it (`line.cue`)

    @property
    def ended(self) -> bool:
        return self.terminal is not None or self.local is not None

    @property
    def ttft_ms(self) -> float | None:
        if self.first_token_at is None or self.sent_at is None:
            return None
        return (self.first_token_at - self.sent_at) * 1000

    def report(self, t0: float) -> dict:
        def rel(t):
            return None if t is None else round(t - t0, 4)
        return {"id": self.rid, "npc": self.npc, "priority": self.priority, "scene": self.scene, "to": self.to,
                "cue": self.cue,
                "session": self.session, "prompt": self.prompt, "queued_at_s": rel(self.queued_at),
                "sent_at_s": rel(self.sent_at), "ttft_ms": self.ttft_ms,
                "token_messages": self.token_messages,
                "seqs_in_order": self.seqs == list(range(len(self.seqs))), "reply": self.reply,
                "said": self.said, "cancel_requested": self.cancel_requested,
                "local": self.local, "terminal": self.terminal}


def was_cut(done: dict, max_tokens: int) -> bool:
    """A generated line (not a substitute) that used all its tokens: `max_tokens` ended it."""
    substitute = done.get("fallback") or done.get("deflected") or done.get("cancelled")
    return not substitute and done.get("tokens", 0) >= max_tokens


class Conversations:
    def __init__(self, bridge: MeteredClient, cast: list[CastMember], bubbles: dict[str, Bubble],
                 rng: random.Random):
        self.bridge = bridge
        self.cast = {m.id: m for m in cast}
        self.bubbles = bubbles
        self.rng = rng
        self.lines: list[Line] = []
        self.speaking: dict[str, Line] = {}  # npc id -> the line its bubble shows while streaming
        self.in_flight: dict[str, Line] = {}  # request id -> line sent and not yet answered
        self.outbox: list[Line] = []
        self.cancels: list[str] = []
        self.recent: deque[Line] = deque(maxlen=6)  # finished lines, for the overlay's TTFTs
        self.moods: dict[str, Mood] = {m.id: Mood() for m in cast}  # npc id -> how its last line looked
        self.expected: dict[str, Callable[[dict, float], None]] = {}  # request id -> what takes its one reply

    def say(self, npc: str, prompt: str, now: float, *, priority: str, session: str,
            max_tokens: int, deadline_ms: int, open: bool = False,
            on_end: Callable[[Line, float], None] | None = None) -> Line:
        """open=True: `prompt` is the first piece of a line still being typed (see `append`)."""
        self.cancel(npc, now)
        line = Line(npc, prompt, priority, session, max_tokens, deadline_ms, now, on_end, open=open)
        self.lines.append(line)
        self.speaking[npc] = line
        self.outbox.append(line)
        if not open:
            self.bubbles[npc].start()
        return line

    def scene_line(self, scene: str, now: float, *, priority: str, max_tokens: int, deadline_ms: int,
                   text: str | None = None, to: str | None = None, speaker: str | None = None,
                   on_end: Callable[[Line, float], None] | None = None) -> Line:
        """A line of `scene`: the player's `text` (to one NPC, who answers), else the scene's next line (by
        `speaker` if given). Its NPC is known from the start only when the player addresses one."""
        npc = to if text is not None else ""
        if npc:
            self.cancel(npc, now)
        line = Line(npc, text or "", priority, scene, max_tokens, deadline_ms, now, on_end, scene=scene,
                    speaker=speaker)
        self.lines.append(line)
        self.outbox.append(line)
        if npc:
            self.speaking[npc] = line
            self.bubbles[npc].start()
        return line

    def scene_busy(self, scene: str) -> bool:
        """A line of `scene` is queued or in flight (the service speaks one at a time)."""
        return any(line.scene == scene for line in self.outbox) or any(
            line.scene == scene for line in self.in_flight.values())

    def append(self, line: Line, text: str, now: float, final: bool = False) -> None:
        """The next piece of an open line; with the final one the NPC starts answering."""
        if line.cancel_requested or line.final or line.ended:
            return
        line.pieces.append((text, final))
        if final:
            line.final = True
            self.bubbles[line.npc].start()

    def expect(self, rid: str, on_reply: Callable[[dict, float], None]) -> None:
        """Route the one reply to request `rid` (not a line: a save's blob, say) to `on_reply`."""
        self.expected[rid] = on_reply

    def busy(self, npc: str) -> bool:
        return npc in self.speaking

    def cancel(self, npc: str, now: float) -> None:
        """Stop what `npc` is saying; its bubble keeps the words so far, cut off with a dash."""
        line = self.speaking.pop(npc, None)
        if line is None:
            return
        line.cancel_requested = True
        line.said = f"{line.reply.strip()} -" if line.reply.strip() else ""
        if not line.open or line.final:  # an NPC still listening has no bubble to end
            self.bubbles[npc].end(now, line.said)
        if line.rid is None:
            self.outbox.remove(line)
            line.local = "cancelled"
        else:
            self.cancels.append(line.rid)

    def exchange(self, now: float) -> None:
        """The frame's bridge phase: send queued cancels and lines, poll, route what came back."""
        if self.bridge.connected:
            for rid in self.cancels:
                self.bridge.cancel(rid)
            sent = 0
            for line in list(self.outbox):
                # Lines beyond half the frame's budget wait for the next frame (a toast queues
                # one per NPC at once); the first always goes, so the queue keeps moving.
                if sent and self.bridge.frame_ms >= self.bridge.budget_ms * SEND_SHARE:
                    break
                sent += 1
                try:
                    line.rid = self._send(line)
                except ValueError as e:  # the client refuses what the service would reject
                    line.terminal = {"type": "error", "code": "rejected", "message": str(e)}
                    self._say_fallback(line, now, "rejected")
                    continue
                line.sent_at = now
                self.in_flight[line.rid] = line
            del self.outbox[:sent]
            self._send_pieces(now)
        else:
            for line in self.outbox:
                self._say_fallback(line, now, "offline")
            self.outbox.clear()
        self.cancels.clear()
        for message in self.bridge.poll():
            line = self.in_flight.get(message.get("id"))
            if line is not None:
                self._route(line, message, now)
            elif message.get("id") in self.expected:
                self.expected.pop(message["id"])(message, now)

    def _send(self, line: Line) -> str:
        limits = {"max_tokens": line.max_tokens, "deadline_ms": line.deadline_ms}
        if line.scene is not None and line.npc and line.prompt:
            return self.bridge.scene_say(line.scene, line.prompt, to=line.npc, **limits)
        if line.scene is not None:
            return self.bridge.scene_next(line.scene, speaker=line.speaker, **limits)
        return self.bridge.say(line.npc, line.prompt, session=line.session, priority=line.priority, open=line.open,
                               **limits)

    def _send_pieces(self, now: float) -> None:
        for line in [ln for ln in self.in_flight.values() if ln.pieces]:
            for text, final in line.pieces:
                try:
                    self.bridge.append(line.rid, text, final)
                except ValueError as e:  # over the text limit: the client refuses it
                    line.terminal = {"type": "error", "code": "rejected", "message": str(e)}
                    self.bridge.cancel(line.rid)
                    self._say_fallback(line, now, "rejected")
                    break
                if final:
                    line.sent_at = now  # the NPC can only answer from here: TTFT counts from it
            line.pieces.clear()

    def _route(self, line: Line, message: dict, now: float) -> None:
        kind = message.get("type")
        if kind == "line":
            self._speaker(line, message, now)
            return
        shown = self.speaking.get(line.npc) is line
        if kind == "token":
            if line.first_token_at is None:
                line.first_token_at = now
            line.seqs.append(message.get("seq"))
            line.reply += message.get("text", "")
            line.token_messages += 1
            if shown:
                self.bubbles[line.npc].append(message.get("text", ""))
        elif kind in ("done", "error"):
            del self.in_flight[line.rid]
            line.terminal = message
            if kind == "done" and shown:
                line.said = message.get("text", line.reply)
                if was_cut(message, line.max_tokens):
                    line.said = trailing_off(line.said)
                self._finish(line, now)
            elif kind == "error":
                self._say_fallback(line, now, None)

    def _speaker(self, line: Line, message: dict, now: float) -> None:
        """The service named the scene line's speaker: its bubble shows the line from now on."""
        npc = message.get("speaker")
        line.to, line.cue = message.get("to"), message.get("cue")
        if npc not in self.bubbles or line.npc == npc:
            return
        self.cancel(npc, now)  # what it was saying elsewhere stops
        line.npc = npc
        self.speaking[npc] = line
        self.bubbles[npc].start()

    def _say_fallback(self, line: Line, now: float, reason: str | None) -> None:
        line.local = reason
        if self.speaking.get(line.npc) is line:
            line.said = self.cast[line.npc].fallback_line(self.rng)
            self._finish(line, now)

    def _finish(self, line: Line, now: float) -> None:
        del self.speaking[line.npc]
        self.bubbles[line.npc].end(now, line.said)
        done = line.terminal if line.terminal is not None and self.bridge.serves("emotion") else {}
        self.moods[line.npc] = from_done(done, now)  # a fallback line or an error shows a neutral face
        self.recent.append(line)
        if line.on_end is not None:
            line.on_end(line, now)
