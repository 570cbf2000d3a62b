"""Scenes (issue 20): several NPCs in one conversation, optionally run by a host who keeps an itinerary and a
guest list. This module holds what a scene *is* and what may happen to it: the cast, who is present, the
itinerary and its position, the guests and their answers to the invitation, the transcript (speaker and
addressee of every line), the cues the host still has to act on, and the one line in flight. Who speaks
next and what the speaker is shown are npc_engine.scene_policy; serving it is npc_engine.service.

Every refusal is a SceneError with a stable `code` (the wire error code of PROTOCOL.md, cap `scene`).
"""
from dataclasses import dataclass, field

PLAYER = "player"  # the speaker / addressee id of the player
ALL = "all"  # the addressee of a line to everyone
RSVPS = ("coming", "not_coming", "no_answer")


class SceneError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class SceneLimits:
    max_cast: int = 8
    max_scenes: int = 256  # per client scope
    max_itinerary: int = 32
    max_guests: int = 64
    max_item_chars: int = 200
    max_transcript: int = 48  # lines kept per scene (the prompt shows the most recent that fit)


@dataclass
class Member:
    """A cast member as the scene sees it: its persona id, name and role."""

    npc: str
    name: str
    role: str = ""


@dataclass
class Item:
    text: str
    at: str | None = None  # a game time, as the host should say it ("at nine")


@dataclass
class Guest:
    name: str
    rsvp: str = "no_answer"
    role: str = ""
    npc: str | None = None  # the guest is this persona: present while it is in the cast
    arrived: bool = False  # a guest who is not an NPC: told by `arrive` / `leave` events


@dataclass
class Entry:
    """One transcript line: `speaker` is an NPC id, PLAYER, or "" for a game event (`text` says what happened)."""

    speaker: str
    text: str
    to: str = ALL


@dataclass
class Cue:
    """Something the host has to act on at its next turn: `welcome` the room, `introduce` a newcomer (`who`: an
    NPC id, PLAYER or a guest's name), announce itinerary `item` number `item`."""

    kind: str
    who: str = ""
    item: int = -1


@dataclass
class Flight:
    """The scene's one line being generated: the request `id` of `client`, who speaks, to whom, on what cue."""

    id: str
    speaker: str
    to: str
    cue: Cue | None = None
    client: bytes = b""


@dataclass
class Scene:
    id: str
    members: dict[str, Member]  # the cast, in order
    situation: str
    host: str | None = None
    itinerary: list[Item] = field(default_factory=list)
    position: int = 0  # itinerary items announced so far; itinerary[position] is the next one
    guests: list[Guest] = field(default_factory=list)
    player_present: bool = True
    player_role: str = ""
    transcript: list[Entry] = field(default_factory=list)
    cues: list[Cue] = field(default_factory=list)
    flight: Flight | None = None
    last_spoke: dict[str, int] = field(default_factory=dict)  # npc -> number of the line it last said
    lines: int = 0  # lines said so far (events not counted)
    max_transcript: int = 48

    @property
    def cast(self) -> list[str]:
        return list(self.members)

    def name(self, who: str) -> str:
        """How a speaker or addressee is named in a prompt."""
        if who == PLAYER:
            return "Player"
        if who in ("", ALL):
            return ""
        member = self.members.get(who)
        return member.name if member is not None else who

    def guest_present(self, guest: Guest) -> bool:
        return guest.npc in self.members if guest.npc is not None else guest.arrived

    def missing(self) -> list[Guest]:
        """Guests who said they would come and are not here."""
        return [g for g in self.guests if g.rsvp == "coming" and not self.guest_present(g)]

    def present_guests(self) -> list[Guest]:
        return [g for g in self.guests if self.guest_present(g)]

    # ---- what happens ----------------------------------------------------------------------

    def log(self, entry: Entry) -> None:
        self.transcript.append(entry)
        del self.transcript[:-self.max_transcript]

    def player_line(self, text: str, to: str | None = None) -> None:
        if to is not None and to not in self.members:
            raise SceneError("not_in_cast", f"scene '{self.id}': the player addresses '{to}', who is not in the cast "
                             f"({', '.join(self.members)})")
        self.player_present = True
        self.log(Entry(PLAYER, text, to or ALL))

    def npc_line(self, speaker: str, text: str, to: str) -> None:
        """`speaker` said `text` to `to` (its line's `done`): into the transcript."""
        self.lines += 1
        self.last_spoke[speaker] = self.lines
        self.log(Entry(speaker, text, to))

    def event(self, text: str) -> None:
        self.log(Entry("", text))

    def arrive(self, who: str) -> None:
        """A guest who is not an NPC, or the player, walks in (an NPC joins with `add`)."""
        if who == PLAYER:
            if not self.player_present:
                self.player_present = True
                self.cue(Cue("introduce", PLAYER))
            return
        guest = self.guest(who)
        if not guest.arrived:
            guest.arrived = True
            self.cue(Cue("introduce", guest.name))

    def leave(self, who: str) -> None:
        if who == PLAYER:
            self.player_present = False
        else:
            self.guest(who).arrived = False

    def guest(self, who: str) -> Guest:
        for g in self.guests:
            if g.name == who and g.npc is None:
                return g
        raise SceneError("not_in_cast", f"scene '{self.id}': no guest '{who}' (NPCs join with scene.cast)")

    def advance(self, item: int | None = None) -> int:
        """The itinerary moves on to `item` (absent: the next one); the host announces it at its next turn."""
        item = self.position if item is None else item
        if not 0 <= item < len(self.itinerary):
            raise SceneError("bad_itinerary", f"scene '{self.id}': no itinerary item {item} "
                             f"(it has {len(self.itinerary)}; {self.position} announced)")
        self.position = item + 1
        self.cues = [c for c in self.cues if c.kind != "item"]  # only the latest point is announced
        self.cue(Cue("item", item=item))
        return item

    def add(self, member: Member, max_cast: int) -> None:
        if member.npc in self.members:
            return
        if len(self.members) >= max_cast:
            raise SceneError("too_many_members", f"scene '{self.id}' has {len(self.members)} members, "
                             f"the limit is {max_cast}")
        self.members[member.npc] = member
        self.cue(Cue("introduce", member.npc))

    def remove(self, npc: str) -> None:
        """`npc` leaves the cast and never speaks again; its pending introduction goes with it. The server
        cancels its line in flight (scene.flight)."""
        if npc not in self.members:
            raise SceneError("not_in_cast", f"scene '{self.id}': '{npc}' is not in the cast")
        if npc == self.host:
            self.host = None
            self.cues = []
        del self.members[npc]
        self.cues = [c for c in self.cues if c.who != npc]

    def cue(self, cue: Cue) -> None:
        if self.host is not None and cue.who != self.host:
            self.cues.append(cue)

    def line_ended(self, text: str | None) -> None:
        """The line in flight ended: with `text` said (a `done` that was not cancelled), or not (None)."""
        flight, self.flight = self.flight, None
        if flight is None or text is None:
            return
        if flight.speaker in self.members:
            self.npc_line(flight.speaker, text, flight.to)
        if flight.cue is not None and flight.cue in self.cues:
            self.cues.remove(flight.cue)

    # ---- what the game reads -----------------------------------------------------------------

    def to_wire(self) -> dict:
        return {
            "scene": self.id, "cast": self.cast, "host": self.host, "situation": self.situation,
            "present": self.cast + [g.name for g in self.guests if g.npc is None and g.arrived]
            + ([PLAYER] if self.player_present else []),
            "itinerary": [{"text": i.text, "at": i.at} for i in self.itinerary], "position": self.position,
            "guests": [{"name": g.name, "rsvp": g.rsvp, "npc": g.npc, "present": self.guest_present(g)}
                       for g in self.guests],
            "missing": [g.name for g in self.missing()],
            "speaking": None if self.flight is None else {"id": self.flight.id, "speaker": self.flight.speaker,
                                                          "to": self.flight.to},
            "transcript": [{"speaker": e.speaker, "to": e.to, "text": e.text} for e in self.transcript],
        }


def check_itinerary(items: list, limits: SceneLimits) -> list[Item]:
    if not isinstance(items, list) or len(items) > limits.max_itinerary:
        raise SceneError("bad_itinerary", f"itinerary: a list of at most {limits.max_itinerary} items")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"text": item}
        text, at = (item.get("text"), item.get("at")) if isinstance(item, dict) else (None, None)
        if not isinstance(text, str) or not text.strip() or len(text) > limits.max_item_chars:
            raise SceneError("bad_itinerary", f"itinerary[{i}].text: a non-blank string of at most "
                             f"{limits.max_item_chars} characters")
        if at is not None and (not isinstance(at, str) or not 0 < len(at) <= 32):
            raise SceneError("bad_itinerary", f"itinerary[{i}].at: a game time, a string of 1 to 32 characters")
        out.append(Item(text.strip(), at))
    return out


def check_guests(guests: list, limits: SceneLimits) -> list[Guest]:
    if not isinstance(guests, list) or len(guests) > limits.max_guests:
        raise SceneError("bad_request", f"guests: a list of at most {limits.max_guests} guests")
    out, names = [], set()
    for i, g in enumerate(guests):
        if not isinstance(g, dict) or not isinstance(g.get("name"), str) or not 0 < len(g["name"]) <= 64:
            raise SceneError("bad_request", f"guests[{i}].name: a string of 1 to 64 characters")
        rsvp, role, npc = g.get("rsvp", "no_answer"), g.get("role", ""), g.get("npc")
        if rsvp not in RSVPS:
            raise SceneError("bad_request", f"guests[{i}].rsvp: one of {', '.join(RSVPS)}, got {rsvp!r}")
        if not isinstance(role, str) or len(role) > 200 or npc is not None and not isinstance(npc, str):
            raise SceneError("bad_request", f"guests[{i}]: role is a string of at most 200 characters, "
                             "npc a persona id")
        if g["name"] in names:
            raise SceneError("bad_request", f"guests[{i}].name: '{g['name']}' is listed twice")
        names.add(g["name"])
        out.append(Guest(g["name"], rsvp, role, npc))
    return out


class Scenes:
    """The open scenes, by (scope, scene id): a client's scenes outlive its connection, like its history.
    `lookup(npc) -> Member` names a persona id (KeyError: unknown)."""

    def __init__(self, lookup, limits: SceneLimits | None = None):
        self.lookup, self.limits = lookup, limits or SceneLimits()
        self.scenes: dict[tuple, Scene] = {}

    def get(self, scope: str, scene_id: str) -> Scene:
        scene = self.scenes.get((scope, scene_id))
        if scene is None:
            raise SceneError("scene_not_found", f"no open scene '{scene_id}'")
        return scene

    def member(self, npc: str) -> Member:
        try:
            return self.lookup(npc)
        except KeyError:
            raise SceneError("unknown_npc", f"no NPC '{npc}'") from None

    def open(self, scope: str, scene_id: str, cast: list[str], situation: str, host: str | None = None,
             itinerary: list | None = None, guests: list | None = None, player_present: bool = True,
             player_role: str = "") -> Scene:
        limits = self.limits
        if (scope, scene_id) in self.scenes:
            raise SceneError("duplicate_scene", f"scene '{scene_id}' is already open")
        if sum(key[0] == scope for key in self.scenes) >= limits.max_scenes:
            raise SceneError("overloaded", f"already {limits.max_scenes} scenes open")
        if len(cast) > limits.max_cast:
            raise SceneError("too_many_members", f"the cast has {len(cast)} members, the limit is {limits.max_cast}")
        if not cast or len(set(cast)) != len(cast):
            raise SceneError("bad_request", "cast: one or more persona ids, each once")
        members = {npc: self.member(npc) for npc in cast}
        if host is not None and host not in members:
            raise SceneError("bad_request", f"host: '{host}' is not in the cast")
        items = check_itinerary(itinerary or [], limits)
        if items and host is None:
            raise SceneError("bad_itinerary", "an itinerary needs a host to run it")
        scene = Scene(scene_id, members, situation, host, items, guests=check_guests(guests or [], limits),
                      player_present=player_present, player_role=player_role, max_transcript=limits.max_transcript)
        for g in scene.guests:
            if g.npc is not None:
                self.member(g.npc)
        scene.cue(Cue("welcome"))
        self.scenes[(scope, scene_id)] = scene
        return scene

    def add(self, scene: Scene, npcs: list[str]) -> None:
        """All of `npcs` join the cast, or none (an unknown one, or too many)."""
        members = [self.member(npc) for npc in npcs]
        if len(set(npcs) | set(scene.members)) > self.limits.max_cast:
            raise SceneError("too_many_members", f"scene '{scene.id}' would have "
                             f"{len(set(npcs) | set(scene.members))} members, the limit is {self.limits.max_cast}")
        for member in members:
            scene.add(member, self.limits.max_cast)

    def close(self, scope: str, scene_id: str) -> Scene:
        scene = self.get(scope, scene_id)
        del self.scenes[(scope, scene_id)]
        return scene
