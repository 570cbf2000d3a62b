"""The F1 overlay: frame-time graph, frame and bridge percentiles, lines in flight, TTFTs,
connection state. The text block is re-rendered four times a second, the graph every frame."""
import pygame

from demo_game.metering import FrameStats, percentile
from demo_game.talk import Conversations

GRAPH_W, GRAPH_H = 300, 80
GRAPH_MAX_MS = 33.4
FRAME_BUDGET_MS = 1000 / 60
PANEL = (12, 12, 10, 200)
TEXT = (235, 235, 225)
REFRESH_S = 0.25


class Overlay:
    def __init__(self, font: pygame.font.Font, stats: FrameStats, talk: Conversations,
                 budget_ms: float, address: str):
        self.font = font
        self.stats = stats
        self.talk = talk
        self.budget_ms = budget_ms
        self.address = address
        self.visible = False
        self._text: pygame.Surface | None = None
        self._text_at = -1.0

    def draw(self, surface: pygame.Surface, now: float) -> None:
        if not self.visible:
            return
        if self._text is None or now - self._text_at >= REFRESH_S:
            self._text = self._render_text()
            self._text_at = now
        width = max(GRAPH_W, self._text.get_width()) + 16
        height = GRAPH_H + self._text.get_height() + 24
        panel = pygame.Surface((width, height), pygame.SRCALPHA)
        panel.fill(PANEL)
        self._draw_graph(panel, pygame.Rect(8, 8, GRAPH_W, GRAPH_H))
        panel.blit(self._text, (8, GRAPH_H + 16))
        surface.blit(panel, (surface.get_width() - width - 8, 8))

    def _draw_graph(self, panel: pygame.Surface, area: pygame.Rect) -> None:
        pygame.draw.rect(panel, (40, 40, 36), area)
        budget_y = area.bottom - area.height * FRAME_BUDGET_MS / GRAPH_MAX_MS
        pygame.draw.line(panel, (200, 80, 60), (area.left, budget_y), (area.right, budget_y))
        frames = list(self.stats.recent_frame)
        bridge = list(self.stats.recent_bridge)
        step = area.width / max(1, self.stats.recent_frame.maxlen - 1)

        def y(ms: float) -> float:
            return area.bottom - area.height * min(ms, GRAPH_MAX_MS) / GRAPH_MAX_MS

        for i, ms in enumerate(bridge):
            x = area.left + i * step
            pygame.draw.line(panel, (90, 160, 230), (x, area.bottom), (x, y(ms)))
        if len(frames) > 1:
            points = [(area.left + i * step, y(ms)) for i, ms in enumerate(frames)]
            pygame.draw.lines(panel, (120, 230, 120), False, points)

    def _render_text(self) -> pygame.Surface:
        frames = self.stats.recent_frame
        bridge = self.stats.recent_bridge
        connected = self.talk.bridge.connected
        ttfts = [f"{line.ttft_ms:.0f}" for line in self.talk.recent if line.ttft_ms is not None]
        rows = [
            f"frame ms  p50 {percentile(frames, 50):5.1f}  p99 {percentile(frames, 99):5.1f}"
            f"  (green; red = 16.7)",
            f"bridge ms last {bridge[-1] if bridge else 0:4.2f}  p99 {percentile(bridge, 99):4.2f}"
            f"  budget {self.budget_ms:g}  (blue)",
            f"lines in flight {len(self.talk.in_flight)}  speaking {len(self.talk.speaking)}",
            f"TTFT ms (last lines) {' '.join(ttfts) or '-'}",
            f"service {self.address}: {'connected' if connected else 'DOWN - fallback lines'}",
        ]
        rendered = [self.font.render(row, True, TEXT if connected or i < 4 else (250, 120, 100))
                    for i, row in enumerate(rows)]
        line_h = self.font.get_linesize()
        out = pygame.Surface((max(r.get_width() for r in rendered), line_h * len(rows)),
                             pygame.SRCALPHA)
        for i, r in enumerate(rendered):
            out.blit(r, (0, i * line_h))
        return out
