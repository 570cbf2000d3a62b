"""`python -m demo_game`: the tavern demo, in a window or headless (see demo_game/README.md)."""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from demo_game.service import REPO_ROOT


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demo_game", description="The Gilded Tankard: "
                                "talk to NPCs voiced by npc-engine (see demo_game/README.md).")
    p.add_argument("--connect", metavar="ADDR",
                   help="use a running service (default: start one on a free loopback port)")
    p.add_argument("--model", help="model folder for the started service (default: its own)")
    p.add_argument("--draft", help="--draft for the started service")
    p.add_argument("--device", choices=["cpu", "cuda"], help="--device for the started service")
    p.add_argument("--service-threads", type=positive(int), metavar="N",
                   help="CPU threads of the started service (default on CPU: all cores but "
                        "one, which is left to the game)")
    p.add_argument("--personas", type=Path, default=REPO_ROOT / "personas", help="the cast")
    p.add_argument("--budget-ms", type=positive(float), default=1.0,
                   help="bridge time per frame")
    p.add_argument("--seed", type=int, default=0, help="seed of ambient chatter")
    p.add_argument("--no-chatter", action="store_true", help="no ambient scene lines (the itinerary still runs)")
    p.add_argument("--save-dir", type=Path, metavar="DIR",
                   help="where F5 saves and F9 loads (default: npc-engine-demo/saves in the user's data directory)")
    p.add_argument("--overlay", action="store_true", help="start with the F1 overlay shown")
    p.add_argument("--headless", action="store_true", help="no window (SDL_VIDEODRIVER=dummy)")
    p.add_argument("--frames", type=positive(int), metavar="N",
                   help="stop after N frames (default: when the script is over)")
    p.add_argument("--script", type=Path, metavar="FILE",
                   help="JSON list of actions (default in headless mode: a built-in session)")
    p.add_argument("--screenshot", type=Path, metavar="PNG",
                   help="save the frame that showed the most speech bubbles")
    p.add_argument("--report", type=Path, metavar="JSON", help="write frame times and requests")
    p.add_argument("--wait-connect", type=float, metavar="S",
                   help="seconds to wait for the service before the first frame "
                        "(default: 120 headless, 0 in a window)")
    return p


def missing_display() -> str | None:
    """Why a window would not be seen here, or None. Without a display SDL falls back to an invisible
    offscreen window, and the demo would seem to hang."""
    if os.environ.get("SDL_VIDEODRIVER"):
        return None  # chosen on purpose
    import pygame

    try:
        pygame.display.init()
        driver = pygame.display.get_driver()
    except pygame.error as e:
        return f"no video driver works here ({e})"
    finally:
        pygame.display.quit()
    if driver in ("offscreen", "dummy"):
        return f"no display (DISPLAY and WAYLAND_DISPLAY are unset or unusable; SDL chose '{driver}')"
    return None


def wait_for_service(client, service, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        client.poll(budget_ms=5.0)
        if client.connected:
            return True
        if service is not None and not service.alive():
            raise RuntimeError(f"the service exited with code {service.process.returncode}:\n"
                               f"{service.log_tail()}")
        time.sleep(0.02)
    return client.connected


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    if not args.headless and (why := missing_display()):
        print(f"demo_game: {why}, so no window can be seen. Play it in a desktop session (or over `ssh -X`); "
              "here it runs the scripted session without a window instead, as "
              "`python -m demo_game --headless --screenshot shot.png` would.", file=sys.stderr, flush=True)
        args.headless = True
    if args.headless:
        os.environ["SDL_VIDEODRIVER"] = "dummy"
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    import pygame

    from bridge import Client
    from demo_game import tavern
    from demo_game.cast import load_cast
    from demo_game.game import Game, Options
    from demo_game.script import ScriptError, ScriptRunner, default_script, load_script
    from demo_game.service import start_service
    from npc_engine.persona import PersonaError

    try:
        cast, unseated = load_cast(args.personas)
    except PersonaError as e:
        print(f"demo_game: bad persona files:\n{e}", file=sys.stderr)
        return 2
    if unseated:
        print(f"demo_game: the room is full; not seated: {', '.join(unseated)}", file=sys.stderr)
    try:
        ids = {m.id for m in cast}
        actions = load_script(args.script, ids) if args.script else (
            default_script(cast) if args.headless else None)
    except ScriptError as e:
        print(f"demo_game: {e}", file=sys.stderr)
        return 2

    service = None
    if args.connect is None:
        threads = args.service_threads
        if threads is None and args.device in (None, "cpu"):
            threads = max(1, (os.cpu_count() or 2) - 1)
        service = start_service(args.personas, args.model, args.draft, args.device, threads)
    address = args.connect or service.address
    client = Client.connect(address, name="demo_game")
    pygame.display.init()
    pygame.font.init()
    try:
        screen = pygame.display.set_mode((tavern.WIDTH, tavern.HEIGHT))
        pygame.display.set_caption("The Gilded Tankard - npc-engine demo")
        wait_s = args.wait_connect if args.wait_connect is not None else (
            120.0 if args.headless else 0.0)
        started = time.perf_counter()
        connected = wait_for_service(client, service, wait_s) if wait_s > 0 else False
        connect_wait_s = time.perf_counter() - started
        if wait_s > 0 and not connected:
            print(f"demo_game: no service at {address} after {wait_s:g} s; "
                  "NPCs say their fallback lines", file=sys.stderr)
        options = Options(address=address, budget_ms=args.budget_ms, seed=args.seed,
                          chatter=not args.no_chatter, overlay=args.overlay,
                          capture_screenshot=args.screenshot is not None,
                          record=args.report is not None or args.headless, save_dir=args.save_dir)
        game = Game(screen, cast, client, options, service)
        runner = ScriptRunner(actions, game, log=lambda m: print(m, flush=True)) \
            if actions is not None else None
        try:
            game.run(args.frames, runner)
        except ScriptError as e:
            print(f"demo_game: script {e}", file=sys.stderr)
            return 2
        finally:
            game.finish()
        if args.screenshot:
            pygame.image.save(game.shot if game.shot is not None else screen, str(args.screenshot))
        report = game.report()
        report["connect_wait_s"] = round(connect_wait_s, 3)
        report["script_finished"] = runner.finished if runner else None
        if args.report:
            args.report.write_text(json.dumps(report))
        if args.headless:
            print_summary(report)
        return 0
    except RuntimeError as e:
        print(f"demo_game: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
        pygame.quit()
        if service is not None:
            service.stop()


def print_summary(report: dict) -> None:
    s = report["summary"]
    ends = {}
    for r in report["requests"]:
        t = r["terminal"]
        key = r["local"] or (t["type"] + (":cancelled" if t.get("cancelled") else "")
                             + (":fallback" if t.get("fallback") else "")
                             + (f":{t.get('code')}" if t["type"] == "error" else "")
                             if t else "none")
        ends[key] = ends.get(key, 0) + 1
    print(f"frames {s['frames']}  frame ms p50 {s['frame_ms']['p50']:.2f} p99 "
          f"{s['frame_ms']['p99']:.2f} max {s['frame_ms']['max']:.2f}  work ms p99 "
          f"{s['work_ms']['p99']:.2f}  bridge ms p99 {s['bridge_ms']['p99']:.3f} max "
          f"{s['bridge_ms']['max']:.3f}")
    print(f"requests {len(report['requests'])}  endings {ends}  "
          f"peak streaming {report['peak_streaming']}")


if __name__ == "__main__":
    sys.exit(main())
