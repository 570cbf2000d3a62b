"""The Gilded Tankard: room layout, collision, path finding and the static background.

Everything is drawn with pygame primitives; the background is painted once into a surface and
blitted each frame, only the hearth fire is animated.
"""
import math
from collections import deque
from dataclasses import dataclass

import pygame

WIDTH, HEIGHT = 1280, 720
WALL = 24
DOOR = pygame.Rect(600, HEIGHT - WALL, 80, WALL)
PLAYER_RADIUS = 12
NPC_RADIUS = 14
GRID = 16  # path-finding cell size in pixels

FLOOR = (120, 84, 52)
FLOOR_SEAM = (98, 68, 42)
WALL_COLOR = (62, 44, 34)
WOOD_DARK = (84, 52, 30)
WOOD = (140, 94, 56)
WOOD_LIGHT = (170, 120, 72)
STONE = (110, 106, 100)


@dataclass(frozen=True)
class Seat:
    """Where an NPC stands and which way its speech bubble leans (-1 left, 0 centred, 1 right)."""

    pos: tuple[int, int]
    bubble_side: int


HOST_SEAT = Seat((640, 140), 0)
# Seats fill in this order: pairs at the same table first, so neighbours have someone to talk to.
SEATS = [
    Seat((220, 330), -1), Seat((380, 330), 1),
    Seat((900, 330), -1), Seat((1060, 330), 1),
    Seat((320, 565), -1), Seat((480, 565), 0),
    Seat((800, 565), 0), Seat((960, 565), 1),
    Seat((140, 460), 0), Seat((520, 245), -1), Seat((760, 245), 1), Seat((1160, 470), 0),
]
PLAYER_START = (640, HEIGHT - WALL - 30)
OPEN_FLOOR = [(640, 430), (640, 650), (220, 440), (1060, 440), (640, 300)]

TABLES = [((300, 330), 40), ((980, 330), 40), ((400, 565), 40), ((880, 565), 40)]
BAR = pygame.Rect(420, 176, 440, 34)
SHELVES = pygame.Rect(430, WALL, 420, 30)
HEARTH = pygame.Rect(WALL, 300, 46, 120)
BARRELS = [(64, 70), (104, 70), (1176, 70), (1216, 70), (1216, 650)]


def obstacles() -> list[pygame.Rect]:
    """Rectangles the player cannot enter (NPC bodies are added by the caller)."""
    walls = [pygame.Rect(0, 0, WIDTH, WALL), pygame.Rect(0, 0, WALL, HEIGHT),
             pygame.Rect(WIDTH - WALL, 0, WALL, HEIGHT),
             pygame.Rect(0, HEIGHT - WALL, DOOR.left, WALL),
             pygame.Rect(DOOR.right, HEIGHT - WALL, WIDTH - DOOR.right, WALL),
             pygame.Rect(0, HEIGHT, WIDTH, WALL)]  # the doorway leads nowhere
    tables = [pygame.Rect(x - r, y - r, 2 * r, 2 * r) for (x, y), r in TABLES]
    barrels = [pygame.Rect(x - 18, y - 18, 36, 36) for x, y in BARRELS]
    return walls + tables + barrels + [BAR, SHELVES, HEARTH]


def blocked(pos: tuple[float, float], rects: list[pygame.Rect],
            radius: int = PLAYER_RADIUS) -> bool:
    x, y = pos
    return any(r.inflate(2 * radius, 2 * radius).collidepoint(x, y) for r in rects)


def move(pos: tuple[float, float], delta: tuple[float, float],
         rects: list[pygame.Rect]) -> tuple[float, float]:
    """Slide along walls: apply each axis on its own and drop the one that would collide."""
    x, y = pos
    if not blocked((x + delta[0], y), rects):
        x += delta[0]
    if not blocked((x, y + delta[1]), rects):
        y += delta[1]
    return x, y


def find_path(start: tuple[float, float], goal: tuple[float, float], within: float,
              rects: list[pygame.Rect]) -> list[tuple[float, float]] | None:
    """Waypoints (cell centres) from `start` to the nearest free cell less than `within` pixels
    from `goal`, by breadth-first search over a GRID-pixel grid; None when unreachable."""
    cols, rows = WIDTH // GRID, HEIGHT // GRID

    def centre(c: tuple[int, int]) -> tuple[float, float]:
        return c[0] * GRID + GRID / 2, c[1] * GRID + GRID / 2

    def free(c: tuple[int, int]) -> bool:
        return 0 <= c[0] < cols and 0 <= c[1] < rows and not blocked(centre(c), rects)

    if math.dist(start, goal) < within:
        return []
    first = (int(start[0] // GRID), int(start[1] // GRID))
    came_from = {first: None}
    queue = deque([first])
    while queue:
        cell = queue.popleft()
        if math.dist(centre(cell), goal) < within:
            path = []
            while cell is not None:
                path.append(centre(cell))
                cell = came_from[cell]
            return path[::-1][1:] or path
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            nxt = (cell[0] + dx, cell[1] + dy)
            if nxt not in came_from and free(nxt):
                came_from[nxt] = cell
                queue.append(nxt)
    return None


def paint_background(font: pygame.font.Font) -> pygame.Surface:
    surface = pygame.Surface((WIDTH, HEIGHT))
    surface.fill(FLOOR)
    for y in range(WALL, HEIGHT, 28):  # floor planks with staggered seams
        pygame.draw.line(surface, FLOOR_SEAM, (0, y), (WIDTH, y), 2)
        offset = 90 if (y // 28) % 2 else 0
        for x in range(offset, WIDTH, 180):
            pygame.draw.line(surface, FLOOR_SEAM, (x, y), (x, y + 28), 2)
    pygame.draw.ellipse(surface, (128, 36, 40), (520, 360, 240, 140))  # rug in the middle
    pygame.draw.ellipse(surface, (176, 140, 60), (520, 360, 240, 140), 4)
    glow = pygame.Surface((240, 240), pygame.SRCALPHA)  # firelight on the floor
    for r in range(120, 0, -6):  # smaller circles overwrite larger ones: a radial gradient
        pygame.draw.circle(glow, (255, 150, 60, int(50 * (1 - r / 126))), (120, 120), r)
    surface.blit(glow, (HEARTH.right - 120, HEARTH.centery - 120))
    for wall in obstacles()[:5]:
        pygame.draw.rect(surface, WALL_COLOR, wall)
    pygame.draw.rect(surface, WOOD_DARK, DOOR)
    pygame.draw.line(surface, (200, 160, 80), DOOR.topleft, DOOR.topright, 3)

    pygame.draw.rect(surface, WOOD_DARK, SHELVES)
    for i in range(26):  # bottles on the shelves
        color = [(60, 120, 60), (140, 60, 40), (180, 160, 90), (70, 80, 140)][i % 4]
        x = SHELVES.left + 10 + i * 16
        pygame.draw.rect(surface, color, (x, SHELVES.top + 8, 8, 18), border_radius=3)
    pygame.draw.rect(surface, WOOD, BAR, border_radius=6)
    pygame.draw.rect(surface, WOOD_LIGHT, BAR.inflate(-8, -14), border_radius=4)
    for x in range(BAR.left + 40, BAR.right, 80):  # tankards on the counter
        pygame.draw.rect(surface, (200, 180, 120), (x, BAR.top + 10, 12, 14), border_radius=2)
    for x in range(470, 860, 90):  # stools
        pygame.draw.circle(surface, WOOD_DARK, (x, 232), 11)

    pygame.draw.rect(surface, STONE, HEARTH.inflate(10, 20))
    for y in range(HEARTH.top - 10, HEARTH.bottom + 10, 14):  # mortar lines
        pygame.draw.line(surface, (90, 86, 80), (HEARTH.left, y), (HEARTH.right + 5, y))
    pygame.draw.rect(surface, (30, 24, 22), HEARTH.inflate(-12, -24))
    for y in range(HEARTH.top + 20, HEARTH.bottom - 12, 18):  # logs
        pygame.draw.rect(surface, (90, 50, 26), (HEARTH.left + 8, y, 28, 7), border_radius=3)
    for (x, y), r in TABLES:
        pygame.draw.circle(surface, WOOD_DARK, (x + 3, y + 4), r)  # shadow
        pygame.draw.circle(surface, WOOD, (x, y), r)
        pygame.draw.circle(surface, WOOD_LIGHT, (x, y), r - 8, 2)
        pygame.draw.circle(surface, (210, 190, 130), (x - 10, y - 6), 6)  # a plate and a cup
        pygame.draw.rect(surface, (200, 180, 120), (x + 6, y + 2, 9, 11), border_radius=2)
    for x, y in BARRELS:
        pygame.draw.circle(surface, WOOD_DARK, (x, y), 18)
        pygame.draw.circle(surface, WOOD, (x, y), 14)
        pygame.draw.circle(surface, (90, 90, 90), (x, y), 18, 2)

    sign = font.render("The Gilded Tankard", True, (230, 190, 80))
    surface.blit(sign, (WIDTH // 2 - sign.get_width() // 2, 2))
    return surface


def draw_fire(surface: pygame.Surface, t: float) -> None:
    """The hearth's flames along the firebox: blobs whose size flickers with time."""
    box = HEARTH.inflate(-12, -24)
    for i in range(5):
        y = box.top + 8 + i * (box.height - 16) / 4
        for layer, color in enumerate([(190, 50, 20), (240, 130, 30), (255, 215, 90)]):
            flicker = math.sin(t * (9 + i) + i * 2.1 + layer) * 2.5
            radius = max(2.0, 11 - layer * 3.5 + flicker)
            pygame.draw.circle(surface, color, (box.centerx + layer * 2, y), radius)
