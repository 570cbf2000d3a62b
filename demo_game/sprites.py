"""Characters drawn from shapes: a shadow, a tunic, a head, and a name label underneath."""
import math

import pygame

from demo_game.cast import CastMember

PLAYER_CLOAK = (40, 70, 150)
PLAYER_TRIM = (240, 200, 80)
LABEL = (250, 240, 210)
LABEL_SHADOW = (20, 14, 10)
LABEL_DY = 18  # the name label's top, below the character's centre


def render_label(font: pygame.font.Font, text: str) -> pygame.Surface:
    shadow = font.render(text, True, LABEL_SHADOW)
    out = pygame.Surface((shadow.get_width() + 1, shadow.get_height() + 1), pygame.SRCALPHA)
    out.blit(shadow, (1, 1))
    out.blit(font.render(text, True, LABEL), (0, 0))
    return out


def draw_npc(surface: pygame.Surface, member: CastMember, label: pygame.Surface, t: float,
             speaking: bool, highlighted: bool, face: tuple[int, int, int] | None = None) -> None:
    """`face`: the head's colour (its emotion's tint, demo_game.mood), the NPC's skin by default."""
    x, y = member.pos
    bob = math.sin(t * 12) * 1.5 if speaking else 0.0
    pygame.draw.ellipse(surface, (50, 34, 24), (x - 15, y + 8, 30, 10))
    if highlighted:
        pygame.draw.circle(surface, (250, 220, 120), (x, y), 22, 2)
    pygame.draw.circle(surface, member.tunic, (x, y + bob), 14)
    pygame.draw.circle(surface, tuple(c // 2 for c in member.tunic), (x, y + bob), 14, 2)
    pygame.draw.circle(surface, face or member.skin, (x, y - 12 + bob), 9)
    pygame.draw.circle(surface, (40, 30, 20), (x - 3, y - 13 + bob), 1)
    pygame.draw.circle(surface, (40, 30, 20), (x + 3, y - 13 + bob), 1)
    surface.blit(label, (x - label.get_width() // 2, y + LABEL_DY))


def draw_player(surface: pygame.Surface, pos: tuple[float, float]) -> None:
    x, y = pos
    pygame.draw.ellipse(surface, (50, 34, 24), (x - 14, y + 8, 28, 9))
    pygame.draw.circle(surface, PLAYER_CLOAK, (x, y), 13)
    pygame.draw.circle(surface, PLAYER_TRIM, (x, y), 13, 2)
    pygame.draw.circle(surface, (236, 200, 160), (x, y - 11), 8)
    pygame.draw.arc(surface, PLAYER_CLOAK, (x - 9, y - 20, 18, 14), 0, math.pi, 4)  # hood
