"""Speech bubbles: word-wrapped text above a character that grows token by token, then fades.

A bubble re-renders its surface only when its text changes, so a frame with eight streaming
bubbles costs eight blits plus one render per token that arrived.
"""
import pygame

BACKGROUND = (250, 244, 228)
EDGE = (70, 48, 34)
INK = (32, 24, 18)
MAX_TEXT_WIDTH = 200
MAX_LINES = 5
PAD = 7
TAIL = 10
HOLD_S = 4.0  # how long a finished line stays, plus READ_S per character
READ_S = 0.05
FADE_S = 1.0
FONT_SIZE = 20
THINKING_SIZE = (58, 30)  # the box of the thinking dots
THINKING_STEPS_PER_S = 3  # the dark one of the three dots moves on this often
THINKING_DOT = (190, 176, 150)


def wrap(text: str, font: pygame.font.Font, width: int) -> list[str]:
    """Greedy word wrap; a word wider than `width` is broken between characters."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.size(candidate)[0] <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while font.size(word)[0] > width:
            fits = (i for i in range(len(word) - 1, 1, -1) if font.size(word[:i])[0] <= width)
            cut = next(fits, 1)
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    return lines


class Bubble:
    """What one character is saying. `side` is where the box leans: -1 left, 0 centred, 1 right;
    `below` hangs the box under the anchor instead of over it."""

    def __init__(self, font: pygame.font.Font, anchor: tuple[int, int], side: int,
                 below: bool = False):
        self.font = font
        self.anchor = anchor  # the tip of the tail
        self.side = side
        self.below = below
        self.text = ""
        self.streaming = False
        self.ended_at: float | None = None
        self._surface: pygame.Surface | None = None
        self._rendered: tuple | None = None  # what _surface shows: (text or thinking phase, below)
        self.rect: pygame.Rect | None = None  # the box (tail excluded) as last drawn

    def start(self) -> None:
        """A line is on its way: show thinking dots until the first piece arrives."""
        self.text, self.streaming, self.ended_at = "", True, None

    def append(self, piece: str) -> None:
        self.text += piece

    def end(self, now: float, text: str | None = None) -> None:
        """The line is complete (or cut short): keep it up for a while, then fade."""
        if text is not None:
            self.text = text
        self.streaming, self.ended_at = False, now

    def show(self, text: str, now: float) -> None:
        self.start()
        self.end(now, text)

    def clear(self) -> None:
        self.text, self.streaming, self.ended_at = "", False, None

    def alpha(self, now: float) -> int:
        if self.streaming:
            return 255
        if self.ended_at is None or not self.text.strip():
            return 0
        fade_from = self.ended_at + HOLD_S + READ_S * len(self.text)
        return int(255 * min(1.0, max(0.0, 1 - (now - fade_from) / FADE_S)))

    def display_text(self) -> str:
        # Model output may hold control characters (NUL among them) that fonts cannot render,
        # and U+FFFD where its bytes were not valid UTF-8: the font draws that as a blank.
        return " ".join("".join(c if c.isprintable() and c != "\ufffd" else " " for c in self.text).split())

    def footprint(self, surface: pygame.Surface, now: float) -> pygame.Rect | None:
        """Where the bubble (tail included) is drawn on `surface` now; None while it is not shown."""
        if self.alpha(now) == 0:
            return None
        text = self.display_text()
        key = (text, None if text else int(now * THINKING_STEPS_PER_S) % 3, self.below)
        if self._rendered != key:
            self._surface = self._render(text) if text else self._render_thinking(key[1])
            self._rendered = key
        w, h = self._surface.get_size()
        x = min(max(4, self.anchor[0] - self._tail_x(w)), surface.get_width() - w - 4)
        y = min(self.anchor[1], surface.get_height() - h - 4) if self.below else max(4, self.anchor[1] - h)
        return pygame.Rect(x, y, w, h)

    def draw(self, surface: pygame.Surface, now: float) -> None:
        box = self.footprint(surface, now)
        self.rect = None
        if box is not None:
            self.rect = pygame.Rect(box.x, box.y + (TAIL if self.below else 0), box.w, box.h - TAIL)
            self._surface.set_alpha(self.alpha(now))
            surface.blit(self._surface, box.topleft)

    def _tail_x(self, width: int) -> int:
        return {-1: width - 24, 0: width // 2, 1: 24}[self.side]

    def _render(self, text: str) -> pygame.Surface:
        lines = wrap(text, self.font, MAX_TEXT_WIDTH)
        if len(lines) > MAX_LINES:  # a long line scrolls: keep the newest words in view
            lines = ["..." + lines[-MAX_LINES]] + lines[-MAX_LINES + 1:]
        line_h = self.font.get_linesize()
        w = max(40, max(self.font.size(line)[0] for line in lines) + 2 * PAD)
        out, box = self._frame(w, len(lines) * line_h + 2 * PAD)
        for i, line in enumerate(lines):
            out.blit(self.font.render(line, True, INK), (PAD, box.top + PAD + i * line_h))
        return out

    def _render_thinking(self, phase: int) -> pygame.Surface:
        """Three dots, one of them dark in turn: the character is thinking."""
        out, box = self._frame(THINKING_SIZE[0], THINKING_SIZE[1])
        for i in range(3):
            centre = (box.centerx + (i - 1) * 14, box.centery)
            pygame.draw.circle(out, INK if i == phase else THINKING_DOT, centre, 4)
        return out

    def _frame(self, w: int, h: int) -> tuple[pygame.Surface, pygame.Rect]:
        """An empty bubble: a box of w x h with its tail; returns the surface and the box in it."""
        out = pygame.Surface((w, h + TAIL), pygame.SRCALPHA)
        box = pygame.Rect(0, TAIL if self.below else 0, w, h)
        tx = self._tail_x(w)
        base = box.top + 2 if self.below else box.bottom - 2
        tip = 0 if self.below else h + TAIL - 1
        tail = [(tx - 7, base), (tx + 7, base), (tx, tip)]
        pygame.draw.polygon(out, BACKGROUND, tail)
        pygame.draw.lines(out, EDGE, False, [tail[0], tail[2], tail[1]], 2)
        pygame.draw.rect(out, BACKGROUND, box, border_radius=8)
        pygame.draw.rect(out, EDGE, box, 2, border_radius=8)
        pygame.draw.line(out, BACKGROUND, (tx - 6, base), (tx + 6, base), 3)
        return out, box
