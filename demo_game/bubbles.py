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
        self._rendered_text: str | None = None
        self.rect: pygame.Rect | None = None  # the box (tail excluded) as last drawn

    def start(self) -> None:
        """A line is on its way: show a thinking ellipsis until the first piece arrives."""
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

    def display_text(self, now: float) -> str:
        # Model output may hold control characters (NUL among them) that fonts cannot render,
        # and U+FFFD where its bytes were not valid UTF-8: the font draws that as a blank.
        text = " ".join("".join(c if c.isprintable() and c != "\ufffd" else " "
                                for c in self.text).split())
        if self.streaming and not text:
            return "." * (1 + int(now * 3) % 3)
        return text

    def draw(self, surface: pygame.Surface, now: float) -> None:
        alpha = self.alpha(now)
        if alpha == 0:
            self.rect = None
            return
        text = self.display_text(now)
        if self._rendered_text != text:
            self._surface = self._render(text)
            self._rendered_text = text
        self._surface.set_alpha(alpha)
        w, h = self._surface.get_size()
        x = min(max(4, self.anchor[0] - self._tail_x(w)), surface.get_width() - w - 4)
        if self.below:
            y = min(self.anchor[1], surface.get_height() - h - 4)
            self.rect = pygame.Rect(x, y + TAIL, w, h - TAIL)
        else:
            y = max(4, self.anchor[1] - h)
            self.rect = pygame.Rect(x, y, w, h - TAIL)
        surface.blit(self._surface, (x, y))

    def _tail_x(self, width: int) -> int:
        return {-1: width - 24, 0: width // 2, 1: 24}[self.side]

    def _render(self, text: str) -> pygame.Surface:
        lines = wrap(text, self.font, MAX_TEXT_WIDTH)
        if len(lines) > MAX_LINES:  # a long line scrolls: keep the newest words in view
            lines = ["..." + lines[-MAX_LINES]] + lines[-MAX_LINES + 1:]
        line_h = self.font.get_linesize()
        w = max(40, max(self.font.size(line)[0] for line in lines) + 2 * PAD)
        h = len(lines) * line_h + 2 * PAD
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
        for i, line in enumerate(lines):
            out.blit(self.font.render(line, True, INK), (PAD, box.top + PAD + i * line_h))
        return out
