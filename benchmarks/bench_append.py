"""What an open `say` saves: time from the player's last piece to the NPC's first token, for a line
prefilled word by word while it was typed (`submit(complete=False)` + `update_prompt`) against the
same prompt submitted whole when the player presses Enter.

Engine level, no sockets: every request has its persona block cached (as the service does) and a
conversation history of --history earlier exchanges, which is part of the prompt but not of the
cache. Medians over --repeats requests per history length, after one warm-up of each kind.

    python benchmarks/bench_append.py --device cuda --history 0,4,8
    python benchmarks/bench_append.py --device cpu
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import header  # noqa: E402
from npc_engine.engine import Engine  # noqa: E402
from npc_engine.persona import load_persona_dir  # noqa: E402
from npc_engine.prompt import Turn  # noqa: E402
from npc_engine.sampling import SamplingParams  # noqa: E402

LINE = "Tell me, what would it take to borrow a horse and a lantern before the night watch starts its round"
EXCHANGE = [Turn("player", "Have you heard anything about the old mill by the river?"),
            Turn("npc", "Only that the miller left in a hurry last spring and never came back for his tools.")]


def first_token_after(engine: Engine, rid: str) -> float:
    """Steps until `rid` produces its first token; returns the wall seconds it took."""
    start = time.perf_counter()
    while True:
        for ev in engine.step():
            if ev.rid == rid and ev.token_ids:
                return time.perf_counter() - start


def drain(engine: Engine) -> None:
    while engine.has_work():
        engine.step()


def measure(engine: Engine, persona, history: int, repeats: int) -> dict:
    tok = engine.tokenizer
    turns = EXCHANGE * history
    prefix_len = len(tok.encode(persona.prefix()))
    full = tok.encode(persona.prompt(turns + [Turn("player", LINE)]))
    params = SamplingParams(temperature=0, max_tokens=1)
    words = LINE.split(" ")
    whole, pieces, fed_at_final = [], [], []
    for i in range(repeats + 1):  # the first of each kind warms up (graphs, prefix cache)
        engine.submit(f"whole{i}", full, params, prefix_len=prefix_len)
        seconds = first_token_after(engine, f"whole{i}")
        drain(engine)
        rid = f"open{i}"
        ids = tok.encode(persona.open_prompt(turns, words[0]))
        engine.submit(rid, ids, params, prefix_len=prefix_len, complete=False)
        engine.step()
        for n in range(2, len(words) + 1):  # one word per typing pause, each followed by engine steps
            engine.update_prompt(rid, tok.encode(persona.open_prompt(turns, " ".join(words[:n]))), complete=False)
            drain(engine)
        fed = engine.active[rid].fed
        start = time.perf_counter()
        engine.update_prompt(rid, full, complete=True)
        open_seconds = time.perf_counter() - start + first_token_after(engine, rid)
        drain(engine)
        if i:
            whole.append(seconds)
            pieces.append(open_seconds)
            fed_at_final.append(len(full) - fed)
    return {"history_exchanges": history, "prompt_tokens": len(full), "cached_prefix_tokens": prefix_len,
            "whole_ms": statistics.median(whole) * 1e3, "open_ms": statistics.median(pieces) * 1e3,
            "tokens_left_at_final": statistics.median(fed_at_final)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/npc-target")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--history", default="0,4,8", help="comma-separated numbers of earlier exchanges")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    engine = Engine.load(args.model, draft="none", device=args.device, max_batch=2)
    persona = next(iter(load_persona_dir(Path(__file__).resolve().parent.parent / "personas").values()))
    print(header(args.device), f"model {args.model}, greedy, persona {persona.id}")
    rows = []
    with torch.no_grad():
        for history in map(int, args.history.split(",")):
            rows.append(measure(engine, persona, history, args.repeats))
    print("\n| earlier exchanges | prompt tokens | cached prefix | tokens left at the last piece | "
          "whole line: ms to first token | typed in pieces: ms from the last piece | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['history_exchanges']} | {r['prompt_tokens']} | {r['cached_prefix_tokens']} | "
              f"{r['tokens_left_at_final']:.0f} | {r['whole_ms']:.2f} | {r['open_ms']:.2f} | "
              f"{r['whole_ms'] / r['open_ms']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
