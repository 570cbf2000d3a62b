"""The demo's cast: the persona files of `personas/`, each given a seat in the tavern and a look."""
import os
import random
from dataclasses import dataclass

from demo_game.tavern import HOST_SEAT, SEATS, Seat
from npc_engine.persona import load_persona_dir

HOST_ID = "host"
TUNICS = [(178, 58, 52), (58, 110, 170), (70, 140, 80), (150, 100, 170), (200, 150, 50),
          (60, 150, 150), (170, 90, 60), (110, 110, 120), (200, 110, 140), (120, 160, 60),
          (90, 70, 140), (160, 160, 150)]
SKINS = [(236, 200, 160), (200, 150, 110), (150, 105, 75), (224, 178, 140)]


@dataclass
class CastMember:
    id: str
    name: str
    greeting: str
    fallback_lines: list[str]
    relationships: dict[str, str]  # other persona id -> description
    seat: Seat
    tunic: tuple[int, int, int]
    skin: tuple[int, int, int]

    @property
    def pos(self) -> tuple[int, int]:
        return self.seat.pos

    def fallback_line(self, rng: random.Random) -> str:
        return rng.choice(self.fallback_lines)


def load_cast(directory: str | os.PathLike) -> tuple[list[CastMember], list[str]]:
    """Seat every persona of `directory` (raises npc_engine.persona.PersonaError on bad files).
    The host stands behind the bar, the others take SEATS in id order. Returns the cast and the
    ids left standing outside because the room is full."""
    personas = load_persona_dir(directory)
    ids = sorted(personas, key=lambda i: (i != HOST_ID, i))
    cast, seats = [], iter(SEATS)
    for index, npc_id in enumerate(ids):
        seat = HOST_SEAT if npc_id == HOST_ID else next(seats, None)
        if seat is None:
            return cast, ids[index:]
        p = personas[npc_id]
        cast.append(CastMember(p.id, p.name, p.greeting, list(p.fallback_lines),
                               dict(p.relationships), seat, TUNICS[index % len(TUNICS)],
                               SKINS[index % len(SKINS)]))
    return cast, []
