"""How an NPC's last line looked (protocol 1.2, cap `emotion`): its `done` names an emotion, which tints the
speaker's face, and perhaps an action, shown as a short label ("*nods*") above its bubble for ACTION_S seconds."""
from dataclasses import dataclass

import pygame

ACTION_S = 2.0
TINT = 0.55  # of the emotion's colour in the face; the rest is the NPC's skin
PALETTE = {
    "happy": (250, 215, 80), "amused": (240, 170, 60), "proud": (200, 160, 240), "surprised": (120, 220, 230),
    "angry": (230, 50, 40), "sad": (80, 120, 230), "worried": (150, 150, 200), "afraid": (190, 200, 240),
    "suspicious": (120, 180, 70),
}  # any other emotion (and "neutral") leaves the face as it is
ACTION_INK = (255, 245, 200)
ACTION_BACK = (40, 28, 20)


@dataclass
class Mood:
    emotion: str | None = None
    action: str | None = None
    action_until: float = 0.0

    def face(self, skin: tuple[int, int, int]) -> tuple[int, int, int]:
        colour = PALETTE.get(self.emotion)
        if colour is None:
            return skin
        return tuple(round(s + (c - s) * TINT) for s, c in zip(skin, colour))

    def action_label(self, now: float) -> str | None:
        if self.action is None or now >= self.action_until:
            return None
        return f"*{self.action.replace('_', ' ')}*"


def from_done(done: dict, now: float) -> Mood:
    """The mood a `done` shows; one without the fields (an older service, a persona without lists) is neutral."""
    action = done.get("action")
    return Mood(done.get("emotion"), action, now + ACTION_S if action else 0.0)


def draw_action(surface: pygame.Surface, font: pygame.font.Font, text: str, midbottom: tuple[int, int]) -> None:
    rendered = font.render(text, True, ACTION_INK, ACTION_BACK)
    surface.blit(rendered, rendered.get_rect(midbottom=midbottom))
