"""Life in the room without the player: NPCs at the same table talk, the host greets and toasts.

An exchange: the asker's opener (built from its relationships: a question about someone it knows,
or to the listener) shows at once; the listener answers it through the service with
`priority: "ambient"`; the asker answers back. A toast: the host raises one and everyone idle
answers the call at the same moment, the heaviest load the room produces.
"""
import math
import random

from demo_game.bubbles import Bubble
from demo_game.cast import HOST_ID, CastMember
from demo_game.talk import Conversations, Line

HEARING_PX = 330
AMBIENT_MAX_TOKENS = 24
AMBIENT_DEADLINE_MS = 8000
ABOUT = ["Have you seen {other} today?", "What do you make of {other}?",
         "Any news of {other}?", "Has {other} been in tonight?"]
TO = ["How goes it, {listener}?", "Quiet night, eh, {listener}?",
      "What's the word tonight, {listener}?"]
TOAST_CALL = "Raise your cups, friends! A toast!"


class Chatter:
    def __init__(self, talk: Conversations, cast: list[CastMember], bubbles: dict[str, Bubble],
                 rng: random.Random, enabled: bool = True, max_exchanges: int = 2,
                 chat_every_s: tuple[float, float] = (3.0, 7.0),
                 toast_every_s: tuple[float, float] = (40.0, 70.0)):
        self.talk = talk
        self.cast = {m.id: m for m in cast}
        self.bubbles = bubbles
        self.rng = rng
        self.enabled = enabled
        self.max_exchanges = max_exchanges
        self.chat_every_s = chat_every_s
        self.toast_every_s = toast_every_s
        self.next_chat_at: float | None = None
        self.next_toast_at: float | None = None
        self.busy_with_player: set[str] = set()

    def update(self, now: float, near_player: set[str]) -> None:
        """Start an exchange or a toast when one is due. NPCs in `near_player` are left alone."""
        self.busy_with_player = near_player
        if self.next_chat_at is None:
            self.next_chat_at = now + self.rng.uniform(*self.chat_every_s)
            self.next_toast_at = now + self.rng.uniform(*self.toast_every_s)
        if not self.enabled:
            return
        if now >= self.next_chat_at:
            self.next_chat_at = now + self.rng.uniform(*self.chat_every_s)
            running = sum(line.priority == "ambient" for line in self.talk.speaking.values())
            if running < self.max_exchanges:
                self.start_exchange(now)
        if now >= self.next_toast_at:
            self.next_toast_at = now + self.rng.uniform(*self.toast_every_s)
            self.toast(now)

    def idle(self, npc: str) -> bool:
        return not self.talk.busy(npc) and npc not in self.busy_with_player

    def greet(self, now: float) -> None:
        """The host welcomes the player walking in."""
        if HOST_ID in self.cast and self.idle(HOST_ID):
            self.bubbles[HOST_ID].show(self.cast[HOST_ID].greeting, now)

    def start_exchange(self, now: float) -> None:
        pairs = [(a, b) for a in self.cast.values() for b in self.cast.values()
                 if a.id != b.id and self.idle(a.id) and self.idle(b.id)
                 and math.dist(a.pos, b.pos) <= HEARING_PX]
        if not pairs:
            return
        asker, listener = self.rng.choice(pairs)
        opener = self.opener(asker, listener)
        self.bubbles[asker.id].show(opener, now)

        def answer_back(reply: Line, at: float) -> None:
            if reply.said.strip() and self.idle(asker.id):
                self._ambient(asker.id, f"{listener.name}: {reply.said}", at)

        self._ambient(listener.id, f"{asker.name}: {opener}", now, on_end=answer_back)

    def opener(self, asker: CastMember, listener: CastMember) -> str:
        """A question about someone the asker has a relationship with, or one to the listener."""
        others = [i for i in asker.relationships if i != listener.id]
        if others:
            other = self.rng.choice(others)
            name = self.cast[other].name if other in self.cast else other.replace("_", " ").title()
            return self.rng.choice(ABOUT).format(other=name)
        return self.rng.choice(TO).format(listener=listener.name)

    def toast(self, now: float, max_tokens: int = AMBIENT_MAX_TOKENS) -> int:
        """The host proposes a toast and every NPC not already speaking answers the call at once
        (the player's presence does not stop a toast); returns how many lines were started."""
        host = self.cast.get(HOST_ID)
        if host is None or self.talk.busy(HOST_ID):
            return 0
        self._ambient(HOST_ID, f"Patrons: Give us a toast, {host.name}!", now, max_tokens)
        crowd = [m.id for m in self.cast.values() if m.id != HOST_ID and not self.talk.busy(m.id)]
        for npc in crowd:
            self._ambient(npc, f"{host.name}: {TOAST_CALL}", now, max_tokens)
        return 1 + len(crowd)

    def _ambient(self, npc: str, prompt: str, now: float, max_tokens: int = AMBIENT_MAX_TOKENS,
                 on_end=None) -> Line:
        return self.talk.say(npc, prompt, now, priority="ambient", session="ambient",
                             max_tokens=max_tokens, deadline_ms=AMBIENT_DEADLINE_MS,
                             on_end=on_end)
