"""Scene lines (protocol 1.2, cap `scene`) in the batch mix with plain `say`s, end to end over loopback.

S scenes of four shipped personas (the host runs each, with a two-item itinerary and a missing guest) each
ask for L ambient lines one after another (`scene.next`: a scene speaks one line at a time), while B plain
`say`s to the same personas keep running beside them (a new one as soon as one ends; `priority: ambient` like
the scene lines, since player lines are admitted first and would starve them). Per scene line the
client measures the time to its first `token` (TTFT) and to `done`; lines/s = scene lines / wall time. The
service runs in a child process (bench_service.ServiceProcess).

    python benchmarks/bench_scenes.py --device cpu --model models/npc-target --scenes 1,4,16 --background 0,16
"""
import argparse
import sys
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_service import PLAYER_LINE, ServiceProcess, dealer, percentile, recv  # noqa: E402
from benchmarks.common import header  # noqa: E402
from bridge import protocol  # noqa: E402

CAST = ["host", "blacksmith", "bard", "guard_captain"]


def send(sock: zmq.Socket, msg: dict) -> None:
    sock.send_multipart(protocol.encode(msg))


def mix(endpoint: str, scenes: int, lines: int, background: int, max_tokens: int, tag: str) -> dict:
    game, crowd = dealer(endpoint), dealer(endpoint)
    for s in range(scenes):
        send(game, {"type": "scene.open", "id": f"o{s}", "scene": f"{tag}-{s}", "cast": CAST, "host": "host",
                    "situation": "Harvest night at the inn.", "itinerary": ["the toast", "supper"],
                    "guests": [{"name": "Mayor Odo Fenwick", "rsvp": "coming"}]})
        assert recv(game)["type"] == "scene.state"
    says = 0

    def say() -> None:
        nonlocal says
        send(crowd, {"type": "say", "id": f"b{says}", "npc": CAST[says % len(CAST)], "session": f"{tag}-b{says}",
                     "text": PLAYER_LINE, "max_tokens": max_tokens, "priority": "ambient"})
        says += 1

    for _ in range(background):
        say()
    sent, first, ttft, line_s = {}, set(), [], []
    left = {s: lines for s in range(scenes)}
    start = time.perf_counter()

    def ask(s: int) -> None:
        mid = f"{s}-{left[s]}"
        sent[mid] = time.perf_counter()
        send(game, {"type": "scene.next", "id": mid, "scene": f"{tag}-{s}", "max_tokens": max_tokens})
        left[s] -= 1

    for s in range(scenes):
        ask(s)
    poller = zmq.Poller()
    poller.register(game, zmq.POLLIN)
    poller.register(crowd, zmq.POLLIN)
    done_lines = 0
    while done_lines < scenes * lines:
        for sock, _ in poller.poll(60_000):
            msg, now = recv(sock), time.perf_counter()
            if sock is crowd:
                if msg["type"] in ("done", "error"):
                    say()
                continue
            if msg["type"] == "token" and msg["id"] not in first:
                first.add(msg["id"])
                ttft.append(now - sent[msg["id"]])
            elif msg["type"] in ("done", "error"):
                if msg["type"] == "error":
                    raise RuntimeError(f"scene line failed: {msg}")
                done_lines += 1
                line_s.append(now - sent[msg["id"]])
                s = int(msg["id"].split("-")[0])
                if left[s]:
                    ask(s)
    wall = time.perf_counter() - start
    game.close()
    crowd.close()
    ms = lambda xs, q: percentile(xs, q) * 1e3 if xs else float("nan")  # noqa: E731
    return {"scenes": scenes, "background": background, "lines_per_s": scenes * lines / wall,
            "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99), "line_p50_ms": ms(line_s, 50),
            "line_p99_ms": ms(line_s, 99), "says_done": says - background}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/npc-target")
    ap.add_argument("--draft", default="auto")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--scenes", default="1,4,16")
    ap.add_argument("--background", default="0,16", help="plain says kept running beside the scenes")
    ap.add_argument("--lines", type=int, default=4, help="lines per scene")
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    print(header(args.device), f"| model {args.model}, draft {args.draft}, max_batch {args.max_batch}, "
          f"{args.lines} lines per scene, up to {args.max_tokens} tokens a line", flush=True)
    print("| scenes | says beside | scene lines/s | TTFT p50 ms | TTFT p99 ms | line p50 ms | line p99 ms "
          "| says done |\n|---|---|---|---|---|---|---|---|", flush=True)
    service = ServiceProcess(args.model, args.draft, args.device, args.max_batch, scripted=False)
    try:
        mix(service.endpoint, 1, 2, 0, args.max_tokens, "warm")
        for b in (int(b) for b in args.background.split(",")):
            for s in (int(s) for s in args.scenes.split(",")):
                r = mix(service.endpoint, s, args.lines, b, args.max_tokens, f"s{s}b{b}")
                print(f"| {s} | {b} | {r['lines_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
                      f"{r['line_p50_ms']:.0f} | {r['line_p99_ms']:.0f} | {r['says_done']} |", flush=True)
    finally:
        service.close()


if __name__ == "__main__":
    main()
