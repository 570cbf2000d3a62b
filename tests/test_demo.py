"""The pygame demo, headless, against a live service on a tiny random model."""
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
pygame = pytest.importorskip("pygame")

from demo_game.bubbles import BACKGROUND, FONT_SIZE, TAIL, Bubble, wrap  # noqa: E402
from demo_game.cast import HOST_ID, load_cast  # noqa: E402
from demo_game.service import free_port  # noqa: E402
from demo_game.talk import trailing_off, was_cut  # noqa: E402
from test_service import personas_dir, running  # noqa: E402,F401 (a fixture by name)
from test_state_service import service_on  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PERSONAS = REPO / "personas"
BUDGET_MS = 1.0
SLACK_MS = 0.5


def run_demo(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "demo_game", "--headless", *map(str, args)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def shown(request: dict) -> str:
    """What a player line's bubble ends with: the line, trailing off if max_tokens cut it."""
    from demo_game.game import PLAYER_MAX_TOKENS

    done = request["terminal"]
    return trailing_off(done["text"]) if was_cut(done, PLAYER_MAX_TOKENS) else done["text"]


def patrons() -> list[str]:
    cast, _ = load_cast(PERSONAS)
    return [m.id for m in cast if m.id != HOST_ID]


def text_pixels(image: pygame.Surface, rect: list[int]) -> tuple[float, int]:
    """(share of bubble-background pixels, count of dark ink pixels) inside `rect`, less the
    bubble's border."""
    x, y, w, h = pygame.Rect(rect).inflate(-6, -6)
    background = ink = 0
    for px in range(x, x + w):
        for py in range(y, y + h):
            r, g, b, *_ = image.get_at((px, py))
            background += (r, g, b) == BACKGROUND
            ink += r + g + b < 150  # the ink; floor, seams and borders are lighter
    return background / (w * h), ink


def rendered_ink(text: str) -> int:
    """Dark pixels of `text` in a bubble of its own, drawn by the demo's renderer."""
    pygame.font.init()
    drawn = Bubble(pygame.font.Font(None, FONT_SIZE), (0, 0), 0)._render(text)
    surface = pygame.Surface(drawn.get_size())
    surface.fill(BACKGROUND)
    surface.blit(drawn, (0, 0))
    return text_pixels(surface, [0, 0, surface.get_width(), surface.get_height() - TAIL])[1]


@pytest.fixture(scope="module")
def scripted_run(tiny_model_dir, tmp_path_factory):
    """The demo starts its own service and plays a script: three patrons and the host talk
    (one left mid-reply), then the host's toast makes every NPC speak at once."""
    out = tmp_path_factory.mktemp("demo")
    first, second, third = patrons()[:3]
    script = [
        {"do": "chatter", "on": False},
        {"do": "walk_to", "npc": first}, {"do": "say", "text": "Good evening! What news?"},
        {"do": "wait_reply", "timeout": 40},
        {"do": "walk_to", "npc": second}, {"do": "say", "text": "Any work going?"},
        {"do": "wait", "seconds": 0.3}, {"do": "walk_away"},
        {"do": "walk_to", "npc": third}, {"do": "say", "text": "Tell me about this town."},
        {"do": "wait_reply", "timeout": 40},
        {"do": "walk_to", "npc": HOST_ID}, {"do": "say", "text": "A room for the night."},
        {"do": "wait_reply", "timeout": 40}, {"do": "toast"}, {"do": "wait_idle", "timeout": 60},
    ]
    (out / "script.json").write_text(json.dumps(script))
    started = time.monotonic()
    demo = run_demo(["--model", tiny_model_dir, "--draft", "none", "--budget-ms", BUDGET_MS,
                     "--script", out / "script.json", "--screenshot", out / "shot.png",
                     "--report", out / "report.json"])
    stdout, stderr = demo.communicate(timeout=150)
    assert demo.returncode == 0, stderr
    report = json.loads((out / "report.json").read_text())
    return report, out / "shot.png", (first, second, third), time.monotonic() - started


def test_every_request_ends_with_one_terminal_message(scripted_run):
    report, _, (first, second, third), _ = scripted_run
    requests = report["requests"]
    assert report["script_finished"] is True
    for r in requests:
        assert r["local"] is None, r  # the service was up: nothing said without it
        assert r["terminal"] is not None and r["terminal"]["type"] == "done", r
        assert not r["terminal"].get("synthetic"), r
        assert r["seqs_in_order"], r
    speakers = {r["npc"] for r in requests}
    assert len(speakers) == len(patrons()) + 1 >= 4  # the toast reached the whole room
    assert sum(bool(r["terminal"]["text"].strip()) for r in requests) >= 4
    # The tiny model may finish a line before the player has walked away; a cancel is sent
    # only for a line still streaming (see test_walking_away_mid_reply_cancels_the_line).
    left = next(r for r in requests if r["npc"] == second and r["priority"] == "player")
    assert left["terminal"]["cancelled"] is False or left["cancel_requested"]
    for npc in (first, third, HOST_ID):
        r = next(r for r in requests if r["npc"] == npc and r["priority"] == "player")
        assert not r["cancel_requested"] and r["terminal"]["cancelled"] is False
        assert r["said"] == shown(r)
    streamed = [r for r in requests if r["token_messages"] > 0]
    assert streamed and all(r["ttft_ms"] > 0 for r in streamed)
    assert report["peak_streaming"] >= 4


def test_screenshot_shows_speech_bubbles_with_text(scripted_run):
    report, shot, _, _ = scripted_run
    bubbles = report["screenshot"]["bubbles"]
    assert len(bubbles) >= 4
    image = pygame.image.load(str(shot))
    assert image.get_size() == (1280, 720)
    for bubble in bubbles:
        background, ink = text_pixels(image, bubble["rect"])
        assert background > 0.4, bubble
        # The same text drawn alone gives the ink to expect. A random test model may say just "."
        # (3 dark pixels); another bubble may overlap this one's corner, hence the half.
        expected = rendered_ink(bubble["text"])
        assert expected > 0 and ink >= expected / 2, (bubble, ink, expected)
    # the same check on the floor, where no bubble is, finds neither
    background, ink = text_pixels(image, [640, 640, 60, 30])
    assert background == 0 and ink == 0


def test_bridge_time_stays_within_its_budget(scripted_run):
    """The frame's CPU time in the bridge stays within the budget plus a small slack. Wall time also
    counts the moments the OS gives the core to another thread (the service, ZeroMQ's I/O thread),
    and on a shared 2-core VM even the CPU time of the odd frame swells several-fold when the bridge
    thread is switched out mid-call (measured: a 139-call scene_say at 5-8 ms). So, like the client's
    own budget test, the median and the share of frames are checked here; the worst frame is
    bench_demo's to report."""
    report, _, _, wall_s = scripted_run
    frames = report["summary"]["frames"]
    cpu_ms = report["bridge_cpu_ms"]
    assert frames == len(report["bridge_ms"]) == len(cpu_ms) > 60
    assert statistics.median(cpu_ms) <= BUDGET_MS, report["summary"]
    within = sum(ms <= BUDGET_MS + SLACK_MS for ms in cpu_ms)
    assert within >= 0.95 * frames, (sorted(cpu_ms)[-20:], report["summary"])
    assert report["budget_ms"] == BUDGET_MS
    # frames are paced to 60 fps
    assert 15 <= report["summary"]["frame_ms"]["p50"] <= 21
    assert report["summary"]["work_ms"]["p50"] < 1000 / 60
    assert sum(report["frame_ms"]) / 1000 < wall_s


def test_fallback_lines_while_the_service_is_down_then_reconnects(tiny_model_dir, tmp_path):
    """No service at first: the NPC answers with a line from its persona file. Then the service
    comes up on that address, the client reconnects by itself and the next line is the model's."""
    npc = patrons()[0]
    address = f"tcp://127.0.0.1:{free_port()}"
    script = [{"do": "chatter", "on": False}, {"do": "walk_to", "npc": npc},
              {"do": "say", "text": "Hello?"}, {"do": "wait", "seconds": 0.5},
              {"do": "wait_connected", "timeout": 90}, {"do": "say", "text": "Hello again."},
              {"do": "wait_reply", "timeout": 40}]
    (tmp_path / "script.json").write_text(json.dumps(script))
    demo = run_demo(["--connect", address, "--wait-connect", 0, "--script",
                     tmp_path / "script.json", "--report", tmp_path / "report.json"])
    service = None
    watchdog = threading.Timer(120, demo.kill)  # a hung demo ends the stdout loop below
    watchdog.start()
    try:
        for line in demo.stdout:  # start the service once the offline line has been said
            if "wait_connected" in line:
                break
        service = subprocess.Popen(
            [sys.executable, "-m", "npc_engine", "serve", "--model", str(tiny_model_dir),
             "--draft", "none", "--personas", str(PERSONAS), "--bind", address],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=dict(os.environ, OMP_NUM_THREADS="1"))  # one core stays with the demo
        _, stderr = demo.communicate(timeout=120)
    finally:
        watchdog.cancel()
        demo.kill()
        if service is not None:
            service.terminate()
            service.wait(10)
    assert demo.returncode == 0, stderr
    report = json.loads((tmp_path / "report.json").read_text())
    offline, online = report["requests"]
    fallback_lines = next(m for m in load_cast(PERSONAS)[0] if m.id == npc).fallback_lines
    assert offline["local"] == "offline" and offline["id"] is None
    assert offline["said"] in fallback_lines
    assert online["local"] is None and online["terminal"]["type"] == "done", online
    assert not online["terminal"].get("synthetic"), online
    assert online["said"] == shown(online)


def test_bad_script_is_refused_with_the_action_named(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"do": "wait", "seconds": 1},
                                                   {"do": "walk_to", "npc": "nobody"}]))
    demo = run_demo(["--script", tmp_path / "bad.json"])
    _, stderr = demo.communicate(timeout=60)
    assert demo.returncode == 2
    assert "action 1 (walk_to): no NPC 'nobody' in the cast" in stderr


def test_wrap_keeps_lines_within_width_and_bubbles_drop_control_characters():
    pygame.font.init()
    font = pygame.font.Font(None, FONT_SIZE)
    text = "a tankard of ale " * 8 + "x" * 80
    lines = wrap(text, font, 120)
    assert all(font.size(line)[0] <= 120 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    bubble = Bubble(font, (100, 100), 0)
    bubble.start()
    bubble.append("bad\x00 char\nhere\ufffd!")
    assert bubble.display_text() == "bad char here !"


class StubClient:
    """Stands in for bridge.Client where a test must control when each message arrives."""

    def __init__(self):
        self.connected = True
        self.server = {"caps": ["append"]}
        self.sent: list[tuple[str, str, str, dict]] = []
        self.appended: list[tuple[str, str, bool]] = []
        self.cancelled: list[str] = []
        self.inbox: list[dict] = []

    def append(self, rid: str, text: str, final: bool) -> None:
        self.appended.append((rid, text, final))

    def say(self, npc: str, text: str, **kwargs) -> str:
        rid = f"r{len(self.sent)}"
        self.sent.append((rid, npc, text, kwargs))
        return rid

    def cancel(self, rid: str) -> None:
        self.cancelled.append(rid)

    def poll(self, budget_ms: float = 1.0) -> list[dict]:
        messages, self.inbox = self.inbox, []
        return messages


@contextmanager
def demo_on(client, **options):
    """The demo's Game with the shipped cast on a 1280x720 screen, talking to a stub `client`."""
    from demo_game.game import Game, Options

    pygame.display.init()
    pygame.font.init()
    screen = pygame.display.set_mode((1280, 720))
    cast, _ = load_cast(PERSONAS)
    try:
        yield Game(screen, cast, client, Options(address="stub", **options))
    finally:
        pygame.display.quit()


@pytest.fixture
def game():
    client = StubClient()
    with demo_on(client, chatter=False) as game:
        yield game, client


def frames(game, n: int = 1) -> None:
    for _ in range(n):
        game.step(time.perf_counter(), None, 1 / 60)


def test_walking_away_mid_reply_cancels_the_line(game):
    game, client = game
    npc = patrons()[0]
    assert game.walk_to_npc(npc)
    frames(game, 240)
    assert not game.walking and game.npc_in_reach() == npc
    game.player_say(npc, "Hello there", time.perf_counter())
    frames(game)
    (rid, to, text, kwargs), = client.sent
    assert (to, text, kwargs["priority"]) == (npc, "Hello there", "player")
    client.inbox = [{"type": "token", "id": rid, "seq": 0, "text": "Well met,"},
                    {"type": "token", "id": rid, "seq": 1, "text": " stranger"}]
    frames(game)
    assert game.bubbles[npc].display_text() == "Well met, stranger"
    assert game.walk_away_from(npc)
    while not game.out_of_reach(npc):
        assert game.walking
        frames(game)
    frames(game)
    assert client.cancelled == [rid]
    assert game.bubbles[npc].display_text() == "Well met, stranger -"
    client.inbox = [{"type": "done", "id": rid, "text": "Well met, stranger", "tokens": 2,
                     "fallback": False, "cancelled": True, "stats": {}}]
    frames(game)
    assert not game.talk.in_flight
    assert game.talk.lines[0].terminal["cancelled"] is True


def test_error_or_lost_service_gives_a_fallback_line(game):
    game, client = game
    cast = {m.id: m for m in load_cast(PERSONAS)[0]}
    first, second = patrons()[:2]
    now = time.perf_counter()
    for npc in (first, second):
        game.talk.say(npc, "Hi", now, priority="ambient", session="s", max_tokens=8,
                      deadline_ms=1000)
    frames(game)
    client.inbox = [{"type": "error", "id": client.sent[0][0], "code": "disconnected",
                     "message": "no word from the service", "synthetic": True}]
    frames(game)
    assert game.bubbles[first].text in cast[first].fallback_lines
    client.connected = False  # lines asked for while the service is down never leave
    game.talk.say(second, "Hi again", now, priority="ambient", session="s", max_tokens=8,
                  deadline_ms=1000)
    frames(game)
    assert len(client.sent) == 2
    assert game.bubbles[second].text in cast[second].fallback_lines


def type_keys(game, keys: str) -> None:
    """The player types `keys` (a frame per key); "\b" is Backspace, "\n" is Enter."""
    for key in keys:
        if key == "\b":
            event = pygame.event.Event(pygame.KEYDOWN, key=pygame.K_BACKSPACE)
        elif key == "\n":
            event = pygame.event.Event(pygame.KEYDOWN, key=pygame.K_RETURN)
        else:
            event = pygame.event.Event(pygame.TEXTINPUT, text=key)
        pygame.event.post(event)
        frames(game)


def start_typing_to(game, npc: str) -> None:
    assert game.walk_to_npc(npc)
    frames(game, 240)
    pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_e))
    frames(game)
    assert game.typing_to == npc


def test_typed_words_go_out_as_an_open_say(game):
    """Each finished word is a piece; Enter sends the rest as the final one, and the NPC, silent
    while the player typed, starts its bubble. Editing text already sent starts a new line."""
    game, client = game
    npc = patrons()[0]
    start_typing_to(game, npc)
    type_keys(game, "Can you ")
    (rid, to, text, kwargs), = client.sent
    assert (to, text, kwargs["open"]) == (npc, "Can ", True) and client.appended == [(rid, "you ", False)]
    assert not game.bubbles[npc].streaming  # listening
    type_keys(game, "help?\n")
    assert client.appended[-1] == (rid, "help?", True)
    assert text + "".join(piece for _, piece, _ in client.appended) == "Can you help?"
    assert game.bubbles[npc].streaming and game.talk.speaking[npc].sent_at is not None

    start_typing_to(game, npc)
    type_keys(game, "Hi there ")
    second = client.sent[-1][0]
    type_keys(game, "\b\b\b")  # back into what was sent: that line is withdrawn
    frames(game)
    assert client.cancelled[-1] == second and game.open_line is None
    type_keys(game, "re, friend\n")
    assert client.sent[-1][2] == "Hi there, " and client.appended[-1] == (client.sent[-1][0], "friend", True)


def test_an_open_line_the_service_ended_is_typed_again_whole(game):
    """An open say that ends while the player types (here: its open timeout) gets no more pieces:
    the next finished word opens a new line with the whole text so far."""
    game, client = game
    npc = patrons()[2]
    start_typing_to(game, npc)
    type_keys(game, "Where is ")
    rid = client.sent[-1][0]
    client.inbox = [{"type": "error", "id": rid, "code": "open_timeout", "message": "no piece"}]
    frames(game)
    before = len(client.appended)
    type_keys(game, "the smith?\n")
    (again, to, text, kwargs) = client.sent[-1]
    assert (to, text, kwargs["open"]) == (npc, "Where is the ", True)
    assert client.appended[before:] == [(again, "smith?", True)]


def test_without_the_append_cap_a_typed_line_goes_whole(game):
    game, client = game
    client.server = {"caps": []}
    npc = patrons()[1]
    start_typing_to(game, npc)
    type_keys(game, "Any work going?")
    assert client.sent == []
    type_keys(game, "\n")
    (_, to, text, kwargs), = client.sent
    assert (to, text, kwargs.get("open", False)) == (npc, "Any work going?", False) and client.appended == []


@pytest.mark.skipif(sys.platform != "linux", reason="the display comes from DISPLAY/WAYLAND_DISPLAY on Linux only")
def test_without_a_display_it_says_so_and_runs_headless():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER")}
    demo = subprocess.run([sys.executable, "-m", "demo_game", "--connect", f"tcp://127.0.0.1:{free_port()}",
                           "--frames", "3", "--wait-connect", "0.1"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert demo.returncode == 0, demo.stderr
    assert "no display" in demo.stderr and "--headless" in demo.stderr
    assert demo.stdout.startswith("frames ") or "\nframes " in demo.stdout  # the headless summary


@pytest.mark.parametrize("text, expected", [
    ("I forge swords for the gua", "I forge swords for the..."),
    ("Steel first, talk", "Steel first..."),
    ("It is done.", "It is done."),
    ("Hm", "Hm..."),
])
def test_a_line_cut_by_max_tokens_trails_off(text, expected):
    assert trailing_off(text) == expected


def test_cut_line_ends_with_an_ellipsis_in_the_bubble(game):
    game, client = game
    npc = patrons()[0]
    now = time.perf_counter()
    game.talk.say(npc, "Tell me everything.", now, priority="ambient", session="s", max_tokens=3, deadline_ms=1000)
    game.talk.say(patrons()[1], "Hi", now, priority="ambient", session="s", max_tokens=3, deadline_ms=1000)
    frames(game)
    (cut, *_), (whole, *_) = client.sent
    client.inbox = [{"type": "done", "id": cut, "text": "Well, the mines have", "tokens": 3, "fallback": False},
                    {"type": "done", "id": whole, "text": "Hello.", "tokens": 2, "fallback": False}]
    frames(game)
    assert game.bubbles[npc].text == "Well, the mines..." and game.talk.lines[0].said == "Well, the mines..."
    assert game.bubbles[patrons()[1]].text == "Hello."


def test_thinking_bubble_is_three_dots_not_a_speck():
    from demo_game.bubbles import THINKING_SIZE

    pygame.font.init()
    surface = pygame.Surface((400, 300))
    bubble = Bubble(pygame.font.Font(None, FONT_SIZE), (200, 200), 0)
    bubble.start()
    bubble.draw(surface, 0.0)
    assert bubble.rect.size == THINKING_SIZE
    dark = sum(sum(surface.get_at((x, y))[:3]) < 150 for x in range(bubble.rect.left + 4, bubble.rect.right - 4)
               for y in range(bubble.rect.top + 4, bubble.rect.bottom - 4))
    assert dark >= 20  # one dark dot of radius 4 (the others are light)


def test_host_can_be_reached_from_in_front_of_the_bar(game):
    from demo_game import tavern

    game, _ = game
    game.player = (tavern.HOST_SEAT.pos[0], tavern.BAR.bottom + tavern.PLAYER_RADIUS)
    assert not tavern.blocked(game.player, game.rects) and game.npc_in_reach() == HOST_ID
    game.player = tavern.PLAYER_START
    assert game.walk_to_npc(HOST_ID)
    assert game.path[-1][1] > tavern.BAR.bottom  # the path ends in front of the bar, not behind it


def test_hint_and_player_bubble_keep_name_labels_readable(game):
    game, _ = game
    npc = game.cast[patrons()[0]]
    labels = game.label_rects + game.npc_rects
    game.player = (npc.pos[0] - 30, npc.pos[1])  # beside the NPC: its name is where the hint would go
    assert game.npc_in_reach() == npc.id and game.place_hint(labels).collidelist(labels) == -1
    game.player = (npc.pos[0], npc.pos[1] - 44)  # just above the NPC: its name is under the player
    now = time.perf_counter()
    game.player_bubble.show("Evening. What news from the mines?", now)
    game.draw(now)
    assert not game.player_bubble.below and game.player_bubble.footprint(game.screen, now).collidelist(labels) == -1


class SceneStubClient(StubClient):
    """A stub service with the `scene` cap (protocol 1.2): scene requests are recorded like says."""

    def __init__(self):
        super().__init__()
        self.server = {"caps": ["append", "scene"], "limits": {"max_scene_cast": 8}}
        self.scene_calls: list[tuple[str, str, dict]] = []  # (kind, scene, fields)

    def _scene(self, kind: str, scene: str, **fields) -> str:
        rid = f"s{len(self.scene_calls)}"
        self.scene_calls.append((kind, scene, fields))
        return rid

    def open_scene(self, scene, cast, situation, **fields):
        return self._scene("open", scene, cast=cast, situation=situation, **fields)

    def scene_event(self, scene, **fields):
        return self._scene("event", scene, **fields)

    def scene_say(self, scene, text, **fields):
        return self._scene("say", scene, text=text, **fields)

    def scene_next(self, scene, **fields):
        return self._scene("next", scene, **fields)

    def close_scene(self, scene):
        return self._scene("close", scene)

    def of(self, kind: str) -> list[tuple[str, dict]]:
        return [(f"s{i}", c[2]) for i, c in enumerate(self.scene_calls) if c[0] == kind]


@pytest.fixture
def evening():
    client = SceneStubClient()
    with demo_on(client) as game:
        game.evening.chat_every_s = (0.0, 0.0)
        yield game, client


def test_the_evening_is_one_scene_the_host_runs(evening):
    from demo_game.evening import GUESTS, ITINERARY, REGULARS

    game, client = evening
    frames(game)
    (kind, scene, opened), (_, _, arrive) = client.scene_calls[:2]
    assert kind == "open" and opened["cast"] == [HOST_ID, *REGULARS] and opened["host"] == HOST_ID
    assert opened["itinerary"] == ITINERARY and opened["guests"] == GUESTS and opened["player"] is False
    assert arrive == {"arrive": "player"}  # the host introduces the player who walks in
    assert client.of("event")[1][1] == {"itinerary": 0}  # the evening begins: the arrival
    (rid, fields), = client.of("next")  # one line at a time: the next waits for this one
    assert fields["speaker"] is None and fields["deadline_ms"] > 0
    frames(game, 3)
    assert len(client.of("next")) == 1
    client.inbox = [{"type": "line", "id": rid, "scene": scene, "speaker": HOST_ID, "to": "all", "cue": "welcome",
                     "item": None},
                    {"type": "token", "id": rid, "seq": 0, "text": "Welcome, loves!"}]
    frames(game)
    assert game.bubbles[HOST_ID].display_text() == "Welcome, loves!"
    client.inbox = [{"type": "done", "id": rid, "text": "Welcome, loves!", "tokens": 3, "fallback": False,
                     "cancelled": False, "stats": {}, "scene": scene, "speaker": HOST_ID, "to": "all"}]
    frames(game, 2)
    assert len(client.of("next")) == 2 and game.talk.lines[0].cue == "welcome"
    game.finish(timeout_s=0.0)
    assert client.scene_calls[-1] == ("close", scene, {})  # the service forgets the evening with the game


def test_the_player_joins_the_scene_talking_to_a_regular_but_not_to_an_outsider(evening):
    from demo_game.evening import REGULARS

    game, client = evening
    game.evening.enabled = False
    frames(game)
    regular, outsider = REGULARS[0], next(m for m in patrons() if m not in REGULARS)
    assert game.walk_to_npc(regular)
    frames(game, 240)
    game.player_say(regular, "Play us a song!", time.perf_counter())
    frames(game)
    (_, fields), = client.of("say")
    assert fields["text"] == "Play us a song!" and fields["to"] == regular
    assert game.bubbles[regular].streaming  # the addressed NPC answers: its bubble is thinking already
    assert game.walk_to_npc(outsider)
    frames(game, 240)
    game.player_say(outsider, "And you, stranger?", time.perf_counter())
    frames(game)
    assert [s[1] for s in client.sent] == [outsider]  # an ordinary say


def test_the_toast_is_the_itinerary_item_and_the_room_answers_it(evening):
    game, client = evening
    game.evening.enabled = False
    frames(game)
    game.evening.toast(time.perf_counter())
    frames(game)
    assert client.of("event")[-1][1] == {"itinerary": 1}
    (rid, fields), = client.of("next")
    assert fields["speaker"] == HOST_ID
    client.inbox = [{"type": "line", "id": rid, "speaker": HOST_ID, "to": "all", "cue": "item", "item": 1},
                    {"type": "done", "id": rid, "text": "To Brom and Pip!", "tokens": 4, "fallback": False,
                     "cancelled": False, "stats": {}}]
    # a frame sends lines until half its bridge budget is spent: on a loaded machine the room answers over frames
    frames_until(game, lambda: {npc for _, npc, _, _ in client.sent} >= set(patrons()), timeout=10)
    crowd = {npc for _, npc, _, _ in client.sent}
    assert crowd == set(patrons()) and all(t.endswith("To Brom and Pip!") for _, _, t, _ in client.sent)


# ---- F5 / F9: the save file and the conversations next to it (protocol 1.2 cap `memory`) --------------------

def frames_until(game, done, timeout: float = 60.0) -> None:
    """Frames as a game runs them, with time to spare in each (the in-process service needs the interpreter too)."""
    end = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < end, "timed out"
        frames(game)
        time.sleep(0.004)


def press(game, key: int) -> None:
    pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=key))
    frames(game)


def talk_to(game, npc: str, text: str) -> None:
    if game.npc_in_reach() != npc:
        assert game.walk_to_npc(npc)
        frames_until(game, lambda: not game.walking)
    game.player_say(npc, text, time.perf_counter())
    frames_until(game, lambda: not game.talk.busy(npc))
    assert game.talk.lines[-1].terminal["type"] == "done", [(ln.npc, ln.scene, ln.terminal) for ln in game.talk.lines]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """The tiny model with room for the shipped personas' prompt blocks and a few turns."""
    from npc_engine.engine import Engine

    return Engine.load(tiny_model_dir, draft="none", max_seq=1024)


def test_f5_saves_what_the_player_said_and_f9_brings_it_back_after_a_restart(engine, personas_dir, tmp_path):  # noqa: F811
    from bridge import Client

    outsider = "hooded_guest"  # not in the evening's scene: the player's own conversation, session `player`
    # (a long heartbeat: the service shares this process, and its first line of a persona compiles its header grammar)
    saves = tmp_path / "saves"
    first = service_on(engine, personas_dir)
    with running(first) as endpoint, Client.connect(endpoint, heartbeat_timeout_s=30) as client, \
            demo_on(client, chatter=False, save_dir=saves) as game:
        frames_until(game, lambda: game.bridge.serves("memory"))
        talk_to(game, outsider, "My name is Ada, from the south road.")
        press(game, pygame.K_F5)
        frames_until(game, lambda: not game.saves.busy)
        assert game.saves.visible_status(time.perf_counter()) == f"saved to {saves / 'quicksave.json'}"
        saved_at = game.player
        game.finish()
    assert json.loads((saves / "quicksave.json").read_text())["player"] == list(saved_at)

    second = service_on(engine, personas_dir)  # restarted: it remembers nothing
    with running(second) as endpoint, Client.connect(endpoint, heartbeat_timeout_s=30) as client, \
            demo_on(client, chatter=False, save_dir=saves) as game:
        frames_until(game, lambda: game.bridge.serves("memory"))
        talk_to(game, outsider, "Who am I?")
        assert "Ada" not in engine.tokenizer.decode(second.prompts["Who am I?"])
        press(game, pygame.K_F9)
        assert game.player == saved_at and game.npc_in_reach() == outsider
        frames_until(game, lambda: not game.saves.busy)
        assert game.saves.status.startswith("loaded ")
        talk_to(game, outsider, "Do you remember me?")
        game.finish()
    prompt = engine.tokenizer.decode(second.prompts["Do you remember me?"])
    assert "My name is Ada, from the south road." in prompt and "Who am I?" not in prompt  # the save replaced it


def test_f9_without_a_save_or_a_memory_service_says_why(game, tmp_path):
    game, client = game
    game.saves.save_path = tmp_path / "none.json"
    press(game, pygame.K_F9)
    assert game.saves.visible_status(time.perf_counter()).startswith(f"no save to load in {tmp_path}")
    press(game, pygame.K_F5)  # the stub's welcome lists no `memory`
    assert "cannot be saved" in game.saves.visible_status(time.perf_counter()) and not client.sent
    from demo_game.script import ScriptRunner, validate

    runner = ScriptRunner(validate([{"do": "save"}, {"do": "load", "timeout": 1}], set()), game, log=lambda _: None)
    runner.update(time.perf_counter())
    assert runner.finished and "no save to load" in game.saves.status  # scripts save and load as F5 and F9 do


def head_pixels(game, npc: str) -> list:
    x, y = game.cast[npc].pos
    return [tuple(game.screen.get_at((x + dx, y - 12 + dy))[:3]) for dx in range(-5, 6) for dy in range(-5, 6)]


def test_a_done_with_emotion_and_action_tints_the_face_and_shows_the_action(game):
    from demo_game.mood import ACTION_S, PALETTE, Mood

    game, client = game
    client.server = {"caps": ["append", "emotion"]}
    first, second = patrons()[:2]
    now = time.perf_counter()
    for npc in (first, second):
        game.talk.say(npc, "Hi", now, priority="ambient", session="s", max_tokens=8, deadline_ms=1000)
    frames_until(game, lambda: len(client.sent) == 2, timeout=10)  # a loaded frame may send one line only
    client.inbox = [{"type": "done", "id": client.sent[0][0], "text": "Grr.", "tokens": 2, "fallback": False,
                     "emotion": "angry", "action": "cross_arms"},
                    {"type": "done", "id": client.sent[1][0], "text": "Hello.", "tokens": 2, "fallback": False}]
    frames(game)
    mood = game.talk.moods[first]
    assert (mood.emotion, mood.action) == ("angry", "cross_arms") and "angry" in PALETTE
    assert mood.face(game.cast[first].skin) != game.cast[first].skin
    assert game.talk.moods[second] == Mood()  # a done without the fields keeps the face neutral
    shown = time.perf_counter()
    assert mood.action_label(shown) == "*cross arms*" and mood.action_label(shown + ACTION_S) is None
    game.draw(shown)
    tinted, screen = head_pixels(game, first), game.screen.copy()
    game.talk.moods[first] = Mood()
    game.draw(shown)
    assert head_pixels(game, first) != tinted
    top = game.bubbles[first].rect.midtop  # the action's label sits on the bubble
    above = [(top[0] + dx, top[1] - dy) for dx in range(-20, 21) for dy in range(1, 10)]
    assert [screen.get_at(p) for p in above] != [game.screen.get_at(p) for p in above]


def test_without_the_emotion_cap_the_face_stays_neutral(game):
    from demo_game.mood import Mood

    game, client = game
    npc = patrons()[0]
    game.talk.say(npc, "Hi", time.perf_counter(), priority="ambient", session="s", max_tokens=8, deadline_ms=1000)
    frames(game)
    client.inbox = [{"type": "done", "id": client.sent[0][0], "text": "Grr.", "tokens": 2, "fallback": False,
                     "emotion": "angry", "action": "cross_arms"}]
    frames(game)
    assert game.talk.moods[npc] == Mood()
