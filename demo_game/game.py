"""The frame loop: input (keyboard or script), one bridge exchange, update, draw, 60 fps.

Nothing in a frame waits on the network or the model: lines are queued, sent and polled in the
frame's bridge phase (`Conversations.exchange`), whose time is measured against its budget.
"""
import gc
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pygame

from demo_game import tavern
from demo_game.bubbles import FONT_SIZE, Bubble
from demo_game.cast import CastMember
from demo_game.evening import Evening
from demo_game.metering import FrameStats, MeteredClient
from demo_game.mood import draw_action
from demo_game.overlay import Overlay
from demo_game.saves import Saves, default_save_dir
from demo_game.script import ScriptRunner
from demo_game.service import ServiceProcess
from demo_game.sprites import LABEL_DY, draw_npc, draw_player, render_label
from demo_game.talk import Conversations, Line

FPS = 60
TALK_RANGE = 100  # px between centres within which the player can talk to an NPC (the host: across the bar)
APPROACH = TALK_RANGE - 6  # how close walking to an NPC gets (path cells are 16 px apart)
LEAVE_RANGE = 140  # walking further than this from an NPC cancels its reply to the player
PLAYER_SPEED = 220.0
PLAYER_MAX_TOKENS = 48
PLAYER_DEADLINE_MS = 12000
MAX_INPUT_CHARS = 200
MOVE_KEYS = {pygame.K_LEFT: (-1, 0), pygame.K_a: (-1, 0), pygame.K_RIGHT: (1, 0),
             pygame.K_d: (1, 0), pygame.K_UP: (0, -1), pygame.K_w: (0, -1),
             pygame.K_DOWN: (0, 1), pygame.K_s: (0, 1)}


SPIN_S = 0.001


def pace_until(deadline: float) -> None:
    """Sleep until just before the frame deadline, then spin the last millisecond: pygame's
    Clock.tick counts whole milliseconds, so at 60 fps its frames alternate 16 and 17 ms."""
    remaining = deadline - time.perf_counter()
    if remaining > SPIN_S:
        time.sleep(remaining - SPIN_S)
    while time.perf_counter() < deadline:
        pass


@dataclass
class Options:
    address: str
    budget_ms: float = 1.0
    seed: int = 0
    chatter: bool = True
    overlay: bool = False
    capture_screenshot: bool = False
    record: bool = True  # keep every frame's times for the report
    save_dir: Path | None = None  # F5 / F9 (demo_game/saves.py); None: default_save_dir()


def label_rect(label: pygame.Surface, pos: tuple[int, int]) -> pygame.Rect:
    """Where sprites.draw_npc puts an NPC's name label."""
    return pygame.Rect((pos[0] - label.get_width() // 2, pos[1] + LABEL_DY), label.get_size())


def first_clear(options: list[pygame.Rect], taken: list[pygame.Rect]) -> pygame.Rect:
    """The first of `options` that overlaps none of `taken`, else the first."""
    return next((r for r in options if r.collidelist(taken) == -1), options[0])


class Game:
    def __init__(self, screen: pygame.Surface, cast: list[CastMember], client, options: Options,
                 service: ServiceProcess | None = None):
        self.screen = screen
        self.service = service  # the service this demo started, watched once a second
        self.cast = {m.id: m for m in cast}
        self.options = options
        self.font = pygame.font.Font(None, FONT_SIZE)
        small = pygame.font.Font(None, 18)
        self.small = small
        self.background = tavern.paint_background(pygame.font.Font(None, 22))
        self.labels = {m.id: render_label(small, m.name) for m in cast}
        # NPC names and bodies (head to feet), which the hint and the player's bubble keep clear of
        self.label_rects = [label_rect(self.labels[m.id], m.pos) for m in cast]
        self.npc_rects = [pygame.Rect(m.pos[0] - 15, m.pos[1] - 22, 30, 40) for m in cast]
        self.bubbles = {m.id: Bubble(self.font, (m.pos[0], m.pos[1] - 24), m.seat.bubble_side)
                        for m in cast}
        self.player_bubble = Bubble(self.font, (0, 0), 0, below=True)
        self.rng = random.Random(options.seed)
        self.bridge = MeteredClient(client, options.budget_ms)
        self.talk = Conversations(self.bridge, cast, self.bubbles, self.rng)
        self.saves = Saves(self.bridge, self.talk, options.save_dir or default_save_dir())
        self.evening = Evening(self.talk, cast, self.bubbles, self.rng, enabled=options.chatter)
        self.stats = FrameStats(keep_all=options.record)
        self.overlay = Overlay(small, self.stats, self.talk, options.budget_ms, options.address)
        self.overlay.visible = options.overlay
        self.rects = tavern.obstacles() + [
            pygame.Rect(m.pos[0] - tavern.NPC_RADIUS, m.pos[1] - tavern.NPC_RADIUS,
                        2 * tavern.NPC_RADIUS, 2 * tavern.NPC_RADIUS) for m in cast]
        self.player = tavern.PLAYER_START
        self.path: list[tuple[float, float]] = []
        self.partner: str | None = None  # the NPC the player last spoke to
        self.typing_to: str | None = None
        self.typed = ""
        self.open_line: Line | None = None  # the line being typed, sent so far as `sent_text`
        self.sent_text = ""
        self.hint = render_label(small, "E: talk")
        self.running = True
        self.frame = 0
        self.t0 = time.perf_counter()
        self.streaming_per_frame: list[int] = []
        self.in_flight_per_frame: list[int] = []
        self.connected_frames = 0
        self.shot: pygame.Surface | None = None
        self.shot_frame = -1
        self.shot_bubbles: list[dict] = []

    # -- what the player can do (the keyboard and scripts both use these) ------------------

    def distance(self, npc: str) -> float:
        return math.dist(self.player, self.cast[npc].pos)

    def npc_in_reach(self) -> str | None:
        near = [(self.distance(i), i) for i in self.cast if self.distance(i) <= TALK_RANGE]
        return min(near)[1] if near else None

    def out_of_reach(self, npc: str) -> bool:
        return self.distance(npc) > LEAVE_RANGE

    @property
    def idle(self) -> bool:
        """No line is queued, streaming or awaiting its terminal message."""
        return not self.talk.speaking and not self.talk.in_flight

    @property
    def walking(self) -> bool:
        return bool(self.path)

    def walk_to_npc(self, npc: str) -> bool:
        path = tavern.find_path(self.player, self.cast[npc].pos, APPROACH, self.rects)
        self.path = path or []
        return path is not None

    def walk_away_from(self, npc: str) -> bool:
        spot = max(tavern.OPEN_FLOOR, key=lambda p: math.dist(p, self.cast[npc].pos))
        path = tavern.find_path(self.player, spot, tavern.GRID, self.rects)
        self.path = path or []
        return path is not None

    def stop_walking(self) -> None:
        self.path = []

    def quick_save(self, now: float) -> None:
        self.saves.save(self.player, now)

    def quick_load(self, now: float) -> None:
        """Back to the saved spot; the NPCs get back what they remembered once the service has it."""
        player = self.saves.load(now)
        if player is not None:
            self.player, self.path = player, []

    def player_say(self, npc: str, text: str, now: float) -> None:
        self.partner = npc
        self.player_bubble.show(text, now)
        line = self.open_line
        if line is not None and not line.ended and line.npc == npc and (text + " ").startswith(self.sent_text):
            self.talk.append(line, text[len(self.sent_text):], now, final=True)  # pieces + this = text
        elif self.evening.in_scene(npc):  # the player joins the evening's conversation
            self.drop_open_line(now)
            self.evening.player_line(npc, text, now, PLAYER_MAX_TOKENS, PLAYER_DEADLINE_MS)
        else:
            self.drop_open_line(now)
            self.talk.say(npc, text, now, priority="player", session="player",
                          max_tokens=PLAYER_MAX_TOKENS, deadline_ms=PLAYER_DEADLINE_MS)
        self.open_line, self.sent_text = None, ""

    def stream_typed(self, npc: str, now: float) -> None:
        """Each word the player finishes goes to the service at once (an open say), so the NPC's
        prompt is ready when Enter is pressed. Editing text that was already sent starts over."""
        text = self.typed.lstrip()
        if self.open_line is not None and (self.open_line.ended or not text.startswith(self.sent_text)):
            self.drop_open_line(now)  # edited behind what was sent, or ended by the service (open timeout)
        if not text.endswith(" ") or not text.strip() or not self.bridge.serves("append") or self.evening.in_scene(npc):
            return  # (a scene line is sent whole)
        if self.open_line is None:
            self.open_line = self.talk.say(npc, text, now, priority="player", session="player",
                                           max_tokens=PLAYER_MAX_TOKENS, deadline_ms=PLAYER_DEADLINE_MS, open=True)
        elif len(text) > len(self.sent_text):
            self.talk.append(self.open_line, text[len(self.sent_text):], now)
        self.sent_text = text

    def drop_open_line(self, now: float) -> None:
        if self.open_line is not None and self.talk.speaking.get(self.open_line.npc) is self.open_line:
            self.talk.cancel(self.open_line.npc, now)
        self.open_line, self.sent_text = None, ""

    # -- the frame -------------------------------------------------------------------------

    def run(self, frames: int | None = None, script: ScriptRunner | None = None) -> None:
        """Run until the window closes, `frames` frames have passed, or the script is over and
        no line is in flight."""
        # Objects from start-up (imports, fonts, the cast) never die: moving them out of the
        # collector's reach keeps its pauses inside frames short.
        gc.collect()
        gc.freeze()
        self.evening.greet(time.perf_counter())
        last_start = None
        next_frame = time.perf_counter()
        while self.running:
            start = time.perf_counter()
            self.bridge.begin_frame()
            self.step(start, script, start - last_start if last_start else 0.0)
            work_ms = (time.perf_counter() - start) * 1000
            if last_start is not None:
                self.stats.add((start - last_start) * 1000, work_ms, self.bridge.frame_ms,
                               self.bridge.frame_cpu_ms)
            last_start = start
            self.frame += 1
            if frames is not None and self.frame >= frames:
                break
            if frames is None and script is not None and script.finished and self.idle:
                break
            next_frame = max(next_frame + 1 / FPS, time.perf_counter() - 1 / FPS)  # behind: don't catch up
            pace_until(next_frame)

    def step(self, now: float, script: ScriptRunner | None, dt: float) -> None:
        self.handle_events(now, keyboard=script is None)
        if script is not None:
            script.update(now)
        self.move_player(min(dt, 0.05), keyboard=script is None)
        if self.partner is not None and self.out_of_reach(self.partner):
            line = self.talk.speaking.get(self.partner)
            if line is not None and line.priority == "player":
                self.talk.cancel(self.partner, now)
        self.evening.update(now)
        self.talk.exchange(now)
        self.draw(now)
        if self.options.capture_screenshot:
            self.keep_best_screenshot()
        pygame.display.flip()
        if self.options.record:
            self.in_flight_per_frame.append(len(self.talk.in_flight))
            self.streaming_per_frame.append(sum(line.first_token_at is not None
                                                for line in self.talk.in_flight.values()))
        self.connected_frames += self.bridge.connected
        if self.service is not None and self.frame % FPS == 0 and not self.service.alive():
            code = self.service.process.returncode
            print(f"demo_game: the service exited with code {code}; NPCs say their fallback "
                  f"lines. Its log ({self.service.log_path}):\n{self.service.log_tail()}",
                  file=sys.stderr)
            self.overlay.address += f" (service exited, code {code})"
            self.service = None

    def handle_events(self, now: float, keyboard: bool) -> None:
        opened_now = False
        for event in pygame.event.get():
            if event.type == pygame.QUIT:
                self.running = False
            elif event.type == pygame.KEYDOWN and event.key == pygame.K_F1:
                self.overlay.visible = not self.overlay.visible
            elif event.type == pygame.KEYDOWN and event.key == pygame.K_F5:
                self.quick_save(now)
            elif event.type == pygame.KEYDOWN and event.key == pygame.K_F9:
                self.quick_load(now)
            elif not keyboard:
                continue
            elif self.typing_to is not None:
                if event.type == pygame.TEXTINPUT and not opened_now:
                    self.typed = (self.typed + event.text)[:MAX_INPUT_CHARS]
                    self.stream_typed(self.typing_to, now)
                elif event.type == pygame.KEYDOWN and event.key == pygame.K_BACKSPACE:
                    self.typed = self.typed[:-1]
                    self.stream_typed(self.typing_to, now)
                elif event.type == pygame.KEYDOWN and event.key == pygame.K_ESCAPE:
                    self.drop_open_line(now)
                    self.typing_to = None
                elif event.type == pygame.KEYDOWN and event.key in (pygame.K_RETURN,
                                                                    pygame.K_KP_ENTER):
                    if self.typed.strip():
                        self.player_say(self.typing_to, self.typed.strip(), now)
                    self.typing_to = None
            elif event.type == pygame.KEYDOWN and event.key == pygame.K_e:
                npc = self.npc_in_reach()
                if npc is not None:
                    self.typing_to, self.typed, opened_now = npc, "", True
                    if not self.talk.busy(npc):
                        self.bubbles[npc].show(self.cast[npc].greeting, now)
            elif event.type == pygame.KEYDOWN and event.key == pygame.K_ESCAPE:
                self.running = False

    def move_player(self, dt: float, keyboard: bool) -> None:
        if keyboard and self.typing_to is None:
            pressed = pygame.key.get_pressed()
            dx = sum(d[0] for k, d in MOVE_KEYS.items() if pressed[k])
            dy = sum(d[1] for k, d in MOVE_KEYS.items() if pressed[k])
            if dx or dy:
                self.path = []
                scale = PLAYER_SPEED * dt / math.hypot(dx, dy)
                self.player = tavern.move(self.player, (dx * scale, dy * scale), self.rects)
        step = PLAYER_SPEED * dt
        while self.path and step > 0:
            target = self.path[0]
            gap = math.dist(self.player, target)
            if gap <= step:
                self.player = target
                self.path.pop(0)
                step -= gap
            else:
                f = step / gap
                self.player = (self.player[0] + (target[0] - self.player[0]) * f,
                               self.player[1] + (target[1] - self.player[1]) * f)
                step = 0

    # -- drawing ---------------------------------------------------------------------------

    def draw(self, now: float) -> None:
        screen = self.screen
        screen.blit(self.background, (0, 0))
        t = now - self.t0
        tavern.draw_fire(screen, t)
        reach = self.npc_in_reach()
        for npc, member in self.cast.items():
            draw_npc(screen, member, self.labels[npc], t, self.talk.busy(npc), npc == reach,
                     self.talk.moods[npc].face(member.skin))
        draw_player(screen, self.player)
        taken = self.label_rects + self.npc_rects
        if reach is not None and self.typing_to is None:
            taken.append(self.place_hint(taken))
            screen.blit(self.hint, taken[-1])
        self.place_player_bubble(now, taken)
        self.player_bubble.draw(screen, now)  # under the NPCs' bubbles: their replies stay readable
        for bubble in self.bubbles.values():
            bubble.draw(screen, now)
        self.draw_actions(now)
        if self.typing_to is not None:
            self.draw_input(now)
        if status := self.saves.visible_status(now):
            rendered = self.font.render(status, True, (245, 235, 210), (24, 18, 14))
            screen.blit(rendered, rendered.get_rect(midtop=(tavern.WIDTH // 2, 8)))
        self.overlay.draw(screen, now)

    def draw_actions(self, now: float) -> None:
        """Each NPC's action label, above its bubble (or its head when it has none)."""
        for npc, mood in self.talk.moods.items():
            if (text := mood.action_label(now)) is not None:
                x, y = self.cast[npc].pos
                rect = self.bubbles[npc].rect
                draw_action(self.screen, self.small, text, rect.midtop if rect is not None else (x, y - 24))

    def place_hint(self, taken: list[pygame.Rect]) -> pygame.Rect:
        """Under the player, or right, left or above it where that keeps NPCs and their names in view."""
        x, y = int(self.player[0]), int(self.player[1])
        w, h = self.hint.get_size()
        spots = [(x - w // 2, y + 18), (x + 18, y - h // 2), (x - 18 - w, y - h // 2), (x - w // 2, y - 26 - h)]
        return first_clear([pygame.Rect(spot, (w, h)) for spot in spots], taken)

    def place_player_bubble(self, now: float, taken: list[pygame.Rect]) -> None:
        """Hang the player's bubble under the player, or over its head where that keeps names and the hint clear."""
        x, y = int(self.player[0]), int(self.player[1])
        bubble = self.player_bubble
        for below, anchor in ((True, (x, y + 30)), (False, (x, y - 22))):
            bubble.below, bubble.anchor = below, anchor
            box = bubble.footprint(self.screen, now)
            if box is None or box.collidelist(taken) == -1:
                return
        bubble.below, bubble.anchor = True, (x, y + 30)

    def draw_input(self, now: float) -> None:
        box = pygame.Rect(0, 0, 640, 36)
        box.midbottom = (tavern.WIDTH // 2, tavern.HEIGHT - 34)
        pygame.draw.rect(self.screen, (24, 18, 14), box, border_radius=6)
        pygame.draw.rect(self.screen, (230, 190, 90), box, 2, border_radius=6)
        cursor = "_" if int(now * 2) % 2 else " "
        text = f"To {self.cast[self.typing_to].name}: {self.typed}{cursor}"
        rendered = self.font.render(text, True, (245, 235, 210))
        visible = pygame.Rect(max(0, rendered.get_width() - box.width + 20), 0,
                              box.width - 20, rendered.get_height())
        self.screen.blit(rendered, (box.x + 10, box.y + 10), visible)

    def bubbles_with_text(self) -> list[dict]:
        """The NPC bubbles on screen, fully opaque and showing words (not the thinking dots)."""
        now = time.perf_counter()
        # display_text, not text: a line of characters no font draws (a random model's) still shows the dots
        return [{"npc": npc, "rect": list(b.rect), "text": text, "finished": not b.streaming}
                for npc, b in self.bubbles.items()
                if b.rect is not None and b.alpha(now) == 255 and (text := b.display_text())]

    def keep_best_screenshot(self) -> None:
        """Keep a copy of the frame showing the most speech bubbles so far, finished lines
        counting double (they show whole sentences). Copies only on improvement: a few per run."""
        def score(bubbles: list[dict]) -> int:
            return sum(2 if b["finished"] else 1 for b in bubbles)

        shown = self.bubbles_with_text()
        if score(shown) > score(self.shot_bubbles):
            self.shot, self.shot_frame, self.shot_bubbles = self.screen.copy(), self.frame, shown

    # -- the end of a run ------------------------------------------------------------------

    def finish(self, timeout_s: float = 5.0) -> None:
        """Close the evening's scene (its line in flight ends cancelled), cancel every line still running and
        wait (outside the frame loop) for the service to answer each one, so every request ends with its
        terminal message."""
        end = time.perf_counter() + timeout_s
        self.evening.close()
        for npc in list(self.talk.speaking):
            self.talk.cancel(npc, time.perf_counter())
        while time.perf_counter() < end and (self.talk.in_flight or self.talk.cancels):
            self.bridge.begin_frame()
            self.talk.exchange(time.perf_counter())
            time.sleep(0.005)

    def report(self) -> dict:
        return {
            "fps": FPS,
            "address": self.options.address,
            "budget_ms": self.options.budget_ms,
            "summary": self.stats.summary(),
            "frame_ms": self.stats.frame_ms,
            "work_ms": self.stats.work_ms,
            "bridge_ms": self.stats.bridge_ms,
            "bridge_cpu_ms": self.stats.bridge_cpu_ms,
            "in_flight": self.in_flight_per_frame,
            "streaming": self.streaming_per_frame,
            "peak_streaming": max(self.streaming_per_frame, default=0),
            "connected_frames": self.connected_frames,
            "requests": [line.report(self.t0) for line in self.talk.lines],
            "ttft_ms": [line.ttft_ms for line in self.talk.lines if line.ttft_ms is not None],
            "screenshot": {"frame": self.shot_frame, "bubbles": self.shot_bubbles},
        }
