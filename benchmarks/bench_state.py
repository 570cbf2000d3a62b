"""What conversation state costs the service: one finished line (`State.remember`, one SQLite transaction
with --state), a memory, a one-NPC export and import, and reloading a state folder at start (integrity
check included). In memory and in SQLite (WAL, synchronous=NORMAL) on the given folder's disk.
Medians over --lines operations on --sessions conversations of realistic lines.

    python benchmarks/bench_state.py --lines 2000 --sessions 500 --folder /tmp/state-bench
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from npc_engine.state import Key, State  # noqa: E402

PLAYER = "Have you heard anything about the old mill by the river, and who goes there at night?"
NPC = "Only that the miller left in a hurry last spring and never came back for his tools."


def timed(fn, n: int) -> float:
    """Median microseconds of fn(i) over i in range(n)."""
    times = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(state: State, lines: int, sessions: int) -> dict:
    key = lambda i: Key("blacksmith", f"player{i % sessions}")  # noqa: E731
    out = {"remember_us": timed(lambda i: state.remember(key(i), PLAYER, NPC), lines),
           "add_memory_us": timed(lambda i: state.add_memory(key(i), "The player saved my daughter."), lines)}
    blob = state.export_blob("player0", "blacksmith")
    out["export_us"] = timed(lambda i: state.export_blob(f"player{i % sessions}", "blacksmith"), lines)
    out["import_us"] = timed(lambda i: state.import_blob(blob, f"player{i % sessions}"), lines)
    out["blob_bytes"] = len(blob)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=500)
    ap.add_argument("--folder", help="where the SQLite state goes (default: a temporary folder)")
    args = ap.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="bench-state-"))
    shutil.rmtree(folder, ignore_errors=True)
    results = {"memory": measure(State(), args.lines, args.sessions)}
    durable = State(folder=folder)
    results["sqlite"] = measure(durable, args.lines, args.sessions)
    durable.close()
    start = time.perf_counter()
    reopened = State(folder=folder)
    results["sqlite"]["reload_ms"] = (time.perf_counter() - start) * 1000
    results["sqlite"]["reloaded_conversations"] = len(reopened.conversation_keys())
    reopened.close()
    print(json.dumps({"lines": args.lines, "sessions": args.sessions, "folder": str(folder), **results}, indent=1))


if __name__ == "__main__":
    main()
