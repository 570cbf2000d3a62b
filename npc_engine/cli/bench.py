"""`npc-engine bench`: tokens/s, acceptance and speedup of a drafter over plain decoding."""
import argparse
import json
import statistics
import time

from npc_engine.cli.common import add_model_args, check_device, parse_k

PLAYER_LINE = "Tell me about the mines and the wolves on the north road."


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="tokens/s, acceptance and speedup of a drafter over plain decoding")
    add_model_args(p)
    p.add_argument("--npc", default="blacksmith", help="persona whose prompt is measured, with one player line")
    p.add_argument("--personas", default="personas", help="persona folder")
    p.add_argument("--prompt", default=None, help="raw prompt text to measure instead of a persona's")
    p.add_argument("--max-tokens", type=int, default=40,
                   help="tokens per timed run: the end of the line is ignored, so every run measures this many")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--k", type=parse_k, default=None, help="draft length 0..16 or 'auto' (default: auto)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up; the median is reported")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=run)


def measure(engine, prompt: list[int], params, repeats: int) -> dict:
    import torch

    def sync():
        if engine.device.type == "cuda":
            torch.cuda.synchronize()

    times, tokens, stats = [], 0, None
    for i in range(repeats + 1):  # the first run is warm-up
        sync()
        t0 = time.perf_counter()
        out = list(engine.generate(prompt, params, rid=f"bench{i}"))
        sync()
        if i:
            times.append(time.perf_counter() - t0)
            tokens, stats = len(out), engine.last_stats
    median = statistics.median(times)
    return {"drafter": engine.drafter.name, "tokens": tokens, "median_s": median, "tokens_per_s": tokens / median,
            "drafted": stats.drafted, "accepted": stats.accepted,
            "acceptance": stats.accepted / stats.drafted if stats.drafted else 0.0,
            "mean_accepted_length": stats.mean_accepted, "target_forwards": stats.target_forwards}


def load_persona(folder: str, npc: str):
    from npc_engine.persona import PersonaStore

    store = PersonaStore(folder)
    if npc not in store.ids():
        raise ValueError(f"no persona with id {npc!r} in {folder} (known: {', '.join(store.ids()) or 'none'})")
    return store.get(npc)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    from npc_engine.dialogue import fit_prompt
    from npc_engine.engine import Engine
    from npc_engine.sampling import SamplingParams

    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
    persona = load_persona(args.personas, args.npc) if args.prompt is None else None
    rows = []
    for draft in ("none", args.draft) if args.draft != "none" else ("none",):
        engine = Engine.load(args.model, draft, args.device, args.dtype, backend=args.backend,
                             onnx_provider=args.onnx_provider, fixed_k=args.k, adapter=args.adapter,
                             compiled=args.compile, draft_tree=args.draft_tree if draft != "none" else None)
        engine.capture_graphs(sampled=args.temperature > 0)  # graph captures stay out of the timed runs
        engine.stop_ids = set()  # a line may end after a few tokens; figures need the full --max-tokens
        if persona is None:
            prompt = engine.tokenizer.encode(args.prompt)
        else:  # the prompt the service builds for this persona and line
            prompt = fit_prompt(engine.tokenizer, persona, [], PLAYER_LINE, engine.max_prompt_len()).ids
        rows.append(measure(engine, prompt, params, args.repeats))
    for row in rows:
        row["speedup_vs_autoregressive"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'drafter':>8} {'tokens':>6} {'tokens/s':>10} {'acceptance':>10} {'mean acc len':>12} {'speedup':>8}")
        for r in rows:
            print(f"{r['drafter']:>8} {r['tokens']:>6} {r['tokens_per_s']:>10.1f} {r['acceptance']:>10.2f} "
                  f"{r['mean_accepted_length']:>12.2f} {r['speedup_vs_autoregressive']:>7.2f}x")
    return 0
