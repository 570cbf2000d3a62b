"""Frame times of the pygame demo while every NPC of the tavern streams a line at once.

Runs `python -m demo_game --headless` (which starts the service, or uses --connect) with a
script in which the host raises a toast `--rounds` times: all 8 NPCs answer at once, each line
streamed token by token into its bubble. Reports frame time (interval between frames at the 60
fps clock), work time (the part of the frame spent working), bridge time per frame (wall and
CPU), over all frames and over the frames during which >= `--streams` lines were streaming.

    python benchmarks/bench_demo.py                       # CPU, embedded model
    python benchmarks/bench_demo.py --device cuda         # service on the GPU
    python benchmarks/bench_demo.py --model DIR --draft none --json out.json --screenshot shot.png
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from demo_game.metering import percentile  # noqa: E402


def script(rounds: int, max_tokens: int) -> list[dict]:
    actions = [{"do": "chatter", "on": False}, {"do": "wait", "seconds": 1.0}]
    for _ in range(rounds):
        actions += [{"do": "toast", "max_tokens": max_tokens}, {"do": "wait_idle", "timeout": 60},
                    {"do": "wait", "seconds": 0.5}]
    return actions


def stats(values: list[float]) -> dict:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": max(values, default=0.0)}


def summarize(report: dict, streams: int) -> dict:
    busy = [i for i, n in enumerate(report["streaming"]) if n >= streams]
    # frame i's interval ends when frame i starts: frames 1.. carry the report's timing lists
    series = {name: report[name] for name in ("frame_ms", "work_ms", "bridge_ms", "bridge_cpu_ms")}
    requests = report["requests"]
    terminals = [r["terminal"] or {} for r in requests]
    return {
        "frames": len(series["frame_ms"]),
        "frames_streaming": len(busy),
        "peak_streaming": report["peak_streaming"],
        "all": {name: stats(values) for name, values in series.items()},
        "streaming": {name: stats([values[i - 1] for i in busy if 0 < i <= len(values)])
                      for name, values in series.items()},
        "lines": len(requests),
        "lines_done": sum(t.get("type") == "done" and not t.get("fallback") for t in terminals),
        "lines_fallback": sum(bool(t.get("fallback")) for t in terminals),
        "lines_error": sum(t.get("type") == "error" for t in terminals),
        "error_codes": dict(Counter(t["code"] for t in terminals if t.get("type") == "error")),
        "ttft_ms": stats(report["ttft_ms"]),
        "budget_ms": report["budget_ms"],
    }


def print_table(result: dict, streams: int) -> None:
    print(f"frames {result['frames']} (>= {streams} streaming: {result['frames_streaming']}), "
          f"peak streaming {result['peak_streaming']}, lines {result['lines']} "
          f"(done {result['lines_done']}, fallback {result['lines_fallback']}, "
          f"error {result['lines_error']})")
    if result["error_codes"]:
        print(f"error codes: {result['error_codes']}")
    print(f"{'ms':<24}{'p50':>8}{'p99':>8}{'max':>8}   {'p50':>8}{'p99':>8}{'max':>8}")
    print(f"{'':<24}{'all frames':>24}   {f'>= {streams} streaming':>24}")
    for name in ("frame_ms", "work_ms", "bridge_ms", "bridge_cpu_ms"):
        a, s = result["all"][name], result["streaming"][name]
        print(f"{name:<24}{a['p50']:8.2f}{a['p99']:8.2f}{a['max']:8.2f}   "
              f"{s['p50']:8.2f}{s['p99']:8.2f}{s['max']:8.2f}")
    t = result["ttft_ms"]
    print(f"{'ttft_ms (client)':<24}{t['p50']:8.1f}{t['p99']:8.1f}{t['max']:8.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connect", help="a running service (default: the demo starts one)")
    p.add_argument("--model", help="model folder for the started service")
    p.add_argument("--draft", help="--draft for the started service")
    p.add_argument("--device", choices=["cpu", "cuda"], help="--device for the started service")
    p.add_argument("--rounds", type=int, default=4, help="toasts (all NPCs speak at once)")
    p.add_argument("--max-tokens", type=int, default=48, help="length cap of each toast line")
    p.add_argument("--streams", type=int, default=8, help="concurrent lines that count as busy")
    p.add_argument("--budget-ms", type=float, default=1.0)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "bench_demo.json")
    p.add_argument("--screenshot", type=Path, help="save the busiest frame, overlay shown")
    p.add_argument("--report", type=Path, help="also keep the demo's full per-frame report")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        script_path, report_path = Path(tmp) / "script.json", Path(tmp) / "report.json"
        script_path.write_text(json.dumps(script(args.rounds, args.max_tokens)))
        command = [sys.executable, "-m", "demo_game", "--headless", "--overlay",
                   "--script", str(script_path), "--report", str(report_path),
                   "--budget-ms", str(args.budget_ms)]
        for flag, value in (("--connect", args.connect), ("--model", args.model),
                            ("--draft", args.draft), ("--device", args.device),
                            ("--screenshot", args.screenshot)):
            if value is not None:
                command += [flag, str(value)]
        started, load_before = time.perf_counter(), os.getloadavg()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout + done.stderr, file=sys.stderr)
            return done.returncode
        report = json.loads(report_path.read_text())
        if args.report:
            args.report.write_text(report_path.read_text())
    result = summarize(report, args.streams)
    result.update(command=" ".join(sys.argv), wall_s=round(time.perf_counter() - started, 1),
                  machine={"platform": platform.platform(), "cpus": os.cpu_count(),
                           "processor": platform.processor(),
                           "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]]},
                  device=args.device or "cpu", rounds=args.rounds, max_tokens=args.max_tokens)
    print_table(result, args.streams)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
