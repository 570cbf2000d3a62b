"""The tavern evening, run by the service as one scene (protocol 1.2, cap `scene`): Greta hosts the regulars
(the hooded stranger and the rival keep to themselves), and the player walks in. The service picks who speaks
and keeps one line going at a time; the game only says when: an ambient line every few seconds while the scene
is quiet, the itinerary moving on at set times (arrival, the toast, supper, a song), and the player's lines to
whoever is in reach. Greta welcomes the room, introduces the player, announces each item, notices the mayor
who promised to come and never does, and the regulars talk among themselves in between. When the host's toast
ends, everyone else raises their cup at once (ordinary ambient `say`s answering it: the heaviest load the room
makes).

A service without the `scene` cap gets no ambient lines; a toast is then the host's `say` and the crowd's answers.
"""
import os
import random

from demo_game.bubbles import Bubble
from demo_game.cast import HOST_ID, CastMember
from demo_game.talk import Conversations, Line

AMBIENT_MAX_TOKENS = 24
AMBIENT_DEADLINE_MS = 8000
SITUATION = "Harvest evening at The Gilded Tankard in Harrowford; Greta hosts the regulars."
ITINERARY = [{"text": "the arrival of the guests"}, {"text": "the toast", "at": "eight"},
             {"text": "supper, Greta's mutton stew", "at": "nine"}, {"text": "a song by the fire", "at": "ten"}]
ITEM_AT_S = (0.0, 40.0, 80.0, 120.0)  # seconds into the evening when the itinerary moves on
TOAST_ITEM = 1
GUESTS = [{"name": "Mayor Odo Fenwick", "role": "mayor of Harrowford", "rsvp": "coming"},
          {"name": "Widow Marsh", "role": "the miller's widow", "rsvp": "not_coming"}]
PLAYER_ROLE = "a traveller just in from the north road"
REGULARS = ("bard", "blacksmith", "guard_captain", "healer", "merchant")  # the hooded guest and the rival keep apart
TOAST_CALL = "Raise your cups, friends! A toast!"


class Evening:
    def __init__(self, talk: Conversations, cast: list[CastMember], bubbles: dict[str, Bubble], rng: random.Random,
                 enabled: bool = True, chat_every_s: tuple[float, float] = (3.0, 7.0),
                 item_at_s: tuple[float, ...] = ITEM_AT_S):
        self.talk, self.bridge = talk, talk.bridge
        self.cast = {m.id: m for m in cast}
        self.bubbles, self.rng = bubbles, rng
        self.enabled = enabled  # ambient lines (the itinerary runs regardless)
        self.chat_every_s, self.item_at_s = chat_every_s, item_at_s
        self.scene: str | None = None  # the open scene's id
        self.members: list[str] = []  # its cast
        self.opened_at = 0.0
        self.next_item = 0
        self.next_chat_at: float | None = None
        self.toast_due: int | None = None  # a toast asked for while the scene was busy: its max_tokens

    @property
    def running(self) -> bool:
        """The scene is open: player lines to its cast go into it."""
        return self.scene is not None and self.bridge.serves("scene")

    def in_scene(self, npc: str) -> bool:
        return self.running and npc in self.members

    def update(self, now: float) -> None:
        if not self.bridge.serves("scene"):
            self.scene = None  # reopened under a new id once the service (perhaps a new one) is back
            return
        if self.scene is None:
            self.open(now)
        while self.next_item < len(self.item_at_s) and now - self.opened_at >= self.item_at_s[self.next_item]:
            self.bridge.scene_event(self.scene, itinerary=self.next_item)
            self.next_item += 1
            self.next_chat_at = now  # the host announces it at once
        if self.talk.scene_busy(self.scene):
            return
        if self.toast_due is not None:
            self.toast(now, self.toast_due)
        elif self.enabled and (self.next_chat_at is None or now >= self.next_chat_at):
            self.next_chat_at = now + self.rng.uniform(*self.chat_every_s)
            self.ambient(now)

    def open(self, now: float) -> None:
        limit = (self.bridge.client.server or {}).get("limits", {}).get("max_scene_cast", 8)
        cast = [npc for npc in (HOST_ID, *REGULARS) if npc in self.cast][:limit]
        self.scene = f"tavern-{os.urandom(4).hex()}"  # scene ids are the service's: unique per run
        self.members = cast
        self.bridge.open_scene(self.scene, cast, SITUATION, host=HOST_ID if HOST_ID in cast else None,
                               itinerary=ITINERARY if HOST_ID in cast else None, guests=GUESTS, player=False,
                               player_role=PLAYER_ROLE)
        self.bridge.scene_event(self.scene, arrive="player")  # the player walks in: the host introduces them
        self.opened_at, self.next_item, self.next_chat_at = now, 0, None

    def close(self) -> None:
        """The evening ends: the service forgets the scene (scene ids are the service's, so each run closes its own)."""
        if self.running:
            self.bridge.close_scene(self.scene)
        self.scene = None

    def ambient(self, now: float, speaker: str | None = None, max_tokens: int = AMBIENT_MAX_TOKENS,
                on_end=None) -> Line:
        return self.talk.scene_line(self.scene, now, speaker=speaker, priority="ambient", max_tokens=max_tokens,
                                    deadline_ms=AMBIENT_DEADLINE_MS, on_end=on_end)

    def player_line(self, npc: str, text: str, now: float, max_tokens: int, deadline_ms: int) -> Line:
        return self.talk.scene_line(self.scene, now, text=text, to=npc, priority="player", max_tokens=max_tokens,
                                    deadline_ms=deadline_ms)

    def greet(self, now: float) -> None:
        """The host's greeting while the service connects (the scene's welcome follows)."""
        if HOST_ID in self.cast and not self.talk.busy(HOST_ID):
            self.bubbles[HOST_ID].show(self.cast[HOST_ID].greeting, now)

    def toast(self, now: float, max_tokens: int = AMBIENT_MAX_TOKENS) -> None:
        """The host raises the toast (the itinerary's toast item: it names the guests) and, when it ends, everyone
        else answers it at once. While the scene is speaking, it waits for the line to end."""
        if HOST_ID not in self.cast:
            return
        if not self.running:
            self.talk.say(HOST_ID, f"Patrons: Give us a toast, {self.cast[HOST_ID].name}!", now, priority="ambient",
                          session="ambient", max_tokens=max_tokens, deadline_ms=AMBIENT_DEADLINE_MS)
            self.crowd(TOAST_CALL, now, max_tokens)
            return
        if self.talk.scene_busy(self.scene):
            self.toast_due = max_tokens
            return
        self.toast_due = None
        if self.next_item <= TOAST_ITEM < len(self.item_at_s):
            self.bridge.scene_event(self.scene, itinerary=TOAST_ITEM)
            self.next_item = TOAST_ITEM + 1
        self.ambient(now, speaker=HOST_ID, max_tokens=max_tokens,
                     on_end=lambda line, at: self.crowd(line.said or TOAST_CALL, at, max_tokens))

    def crowd(self, call: str, now: float, max_tokens: int) -> None:
        """Everyone but the host and those already speaking answers `call` at the same moment."""
        host = self.cast[HOST_ID].name
        for npc in [n for n in self.cast if n != HOST_ID and not self.talk.busy(n)]:
            self.talk.say(npc, f"{host}: {call}", now, priority="ambient", session="ambient", max_tokens=max_tokens,
                          deadline_ms=AMBIENT_DEADLINE_MS)
