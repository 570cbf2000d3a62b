"""The engine's draft-length policy against fixed draft lengths, taking turns line by line: our plain decoding and a
feature head at each fixed K and at the engine's own choice ("auto"), one engine each over every prompt, in an order
rotated each prompt and round (a shared CPU's load hits all of them). Decode ms/token (first token to last), ms per
step, tokens per step and the ratio to plain decoding, summed over the rounds after a warm-up round; batch 1, greedy,
40 tokens past any stop.

    OMP_NUM_THREADS=2 python benchmarks/bench_draft_lengths.py --model EXPORT --adapter "" --head HEAD --ks auto,4
"""
import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_decode import dev_prompts  # noqa: E402
from npc_engine.drafters import HeadDrafter, NoDrafter  # noqa: E402
from npc_engine.engine import Engine  # noqa: E402
from npc_engine.engine.load import load_parts  # noqa: E402
from npc_engine.paths import resolve_model  # noqa: E402
from npc_engine.sampling import SamplingParams  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/base/SmolLM2-135M-Instruct.Q4_1.gguf",
                    help="the target: a model folder, .gguf file or `export-onnx --layout ort` export")
    ap.add_argument("--adapter", default="models/smollm2-npc-persona", help="\"\" for none (an export holds it)")
    ap.add_argument("--tokenizer", default="models/base/SmolLM2-135M-Instruct.Q4_1.gguf",
                    help="the base whose chat template renders the dev prompts")
    ap.add_argument("--head", required=True, help="a feature-head folder")
    ap.add_argument("--ks", default="auto,4", help="comma-separated fixed draft lengths, auto: the engine's policy")
    ap.add_argument("--head-graphs", default="int8",
                    help="comma-separated: the head's ONNX Runtime graph weights beside an export (int8, float), "
                         "torch: the head on PyTorch")
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared" / "corpus"))
    ap.add_argument("--dev", type=int, default=16, help="dev-split prompts (their last NPC turn)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up round")
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    target, drafter, _, device = load_parts(args.model, draft=args.head, device="cpu", dtype="float32",
                                            adapter=args.adapter or None)
    assert isinstance(drafter, HeadDrafter), f"{args.head}: not a feature head"
    prompts = dev_prompts(AutoTokenizer.from_pretrained(resolve_model(Path(args.tokenizer))), Path(args.corpus),
                          args.dev)
    engines = {"plain": Engine(target, NoDrafter(), None, device, max_batch=1, max_seq=1024)}
    graphs = args.head_graphs.split(",")
    for k in args.ks.split(","):  # one drafter (cache and feature store) per engine
        for graph in graphs:
            own = HeadDrafter(drafter.model, target, 2, 1024, device, torch.float32,
                              ort_weights=None if graph == "torch" else graph)
            name = f"K = {k}" + (f", {graph}" if len(graphs) > 1 else "")
            engines[name] = Engine(target, own, None, device, max_batch=1, max_seq=1024,
                                   fixed_k=None if k == "auto" else int(k))
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens)
    seconds, tokens, steps, lines = Counter(), Counter(), Counter(), {}
    for rnd in range(args.rounds + 1):
        for i, prompt in enumerate(prompts):
            names, turn = list(engines), (rnd + i) % len(engines)
            for name in names[turn:] + names[:turn]:
                engine, out, first, n_steps = engines[name], [], None, 0
                engine.submit("line", prompt, params)
                while engine.has_work():
                    out += [t for event in engine.step() for t in event.token_ids]
                    n_steps += first is not None
                    first = first or (time.perf_counter() if out else None)
                if rnd:  # round 0 warms up
                    seconds[name] += time.perf_counter() - first
                    tokens[name], steps[name] = tokens[name] + len(out) - 1, steps[name] + n_steps
                lines.setdefault(i, {})[name] = out
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {args.threads} threads, {args.model}, "
          f"head {args.head}, {len(prompts)} dev prompts, {args.rounds} rounds")
    print("| engine | decode ms/token | ms per step | tokens per step | vs plain | lines equal to plain |")
    print("|---|---|---|---|---|---|")
    plain = seconds["plain"] / tokens["plain"]
    for name in engines:
        per_token = seconds[name] / tokens[name]
        equal = sum(line[name] == line["plain"] for line in lines.values())
        print(f"| {name} | {per_token * 1e3:.2f} | {seconds[name] / steps[name] * 1e3:.1f} | "
              f"{tokens[name] / steps[name]:.2f} | {plain / per_token:.2f}x | {equal}/{len(lines)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
