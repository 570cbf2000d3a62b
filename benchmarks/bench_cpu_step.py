"""One decode step of a Llama-shaped model on the CPU: wall and process CPU time per step and, with --profile, the
share of each PyTorch op (torch.profiler). On a shared machine the CPU time moves less than the wall time.

Random weights at SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads, vocabulary 49,152), float32 (or
bfloat16), batch 1, the eager forward the engine runs on the CPU (a slotted KV cache, `context` cached positions).

    python benchmarks/bench_cpu_step.py --threads 2 --profile
    python benchmarks/bench_cpu_step.py --threads 2 --linear-rows 1,2,3,4,5,8,9,16,32

--linear-rows times the decoder layers' projections alone, 30 layers' worth of distinct weights so that none stays
in cache, for each number of rows: float32 and bfloat16 through F.linear, one bfloat16 row through torch.mv (what
model.mv_linear runs), and whether bfloat16 rows give the same numbers whatever the rows beside them and by mv.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHAPES  # noqa: E402
from npc_engine.model import KVCache, ModelArgs, Transformer  # noqa: E402


def random_cache(model: Transformer, max_seq: int) -> KVCache:
    """Random keys and values in every position: attention costs the same whatever they are."""
    cache = KVCache(model.args, 2, max_seq, "cpu", model.lm_head.weight.dtype)
    cache.k.normal_()
    cache.v.normal_()
    return cache


def step_seconds(model: Transformer, cache: KVCache, context: int, steps: int) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds of `steps` one-token forwards at positions context, context + 1, ... as the eager
    engine runs them (keys attended rounded up to a multiple of 64)."""
    max_seq, slots, token = cache.max_seq, torch.tensor([0]), torch.tensor([[1]])
    times = []
    with torch.no_grad():
        for i in range(steps):
            pos = torch.tensor([[context + i]])
            start, cpu = time.perf_counter(), time.process_time()
            model(token, pos, cache, slots, min(max_seq, -(-(context + i + 1) // 64) * 64))
            times.append((time.perf_counter() - start, time.process_time() - cpu))
    return times


def profile_ops(model: Transformer, cache: KVCache, context: int, top: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    step_seconds(model, cache, context, 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_seconds(model, cache, context, 10)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    ranked = ranked[:top] + [e for e in ranked[top:] if e.key == "aten::copy_"]  # the copy always: issue 18
    return [{"op": e.key, "calls_per_step": e.count / 10, "self_ms_per_step": e.self_cpu_time_total / 10 / 1e3,
             "share": e.self_cpu_time_total / total} for e in ranked]


def linear_rows(args_shape: ModelArgs, rows: list[int], repeats: int = 5) -> None:
    a = args_shape
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    shapes = [(q, a.dim), (kv, a.dim), (kv, a.dim), (a.dim, q), (a.intermediate_size, a.dim),
              (a.intermediate_size, a.dim), (a.dim, a.intermediate_size)]
    weights = {dtype: [torch.randn(n, k).to(dtype) for _ in range(a.n_layers) for n, k in shapes]
               for dtype in (torch.float32, torch.bfloat16)}

    def ms(*call) -> float:
        call[0](*call[1:])
        start = time.perf_counter()
        for _ in range(repeats):
            call[0](*call[1:])
        return (time.perf_counter() - start) / repeats * 1e3

    def layers(dtype, m: int, mv: bool = False) -> None:
        xs = {k: torch.randn(m, k, dtype=dtype) for k in {w.shape[1] for w in weights[dtype]}}
        for w in weights[dtype]:
            torch.mv(w, xs[w.shape[1]][0]) if mv else F.linear(xs[w.shape[1]], w)

    print(f"one bfloat16 row through torch.mv: {ms(layers, torch.bfloat16, 1, True):.1f} ms")
    print("| rows | float32 F.linear, ms | bfloat16 F.linear, ms |\n|---|---|---|")
    for m in rows:
        print(f"| {m} | {ms(layers, torch.float32, m):.1f} | {ms(layers, torch.bfloat16, m):.1f} |")
    x = torch.randn(9, a.dim, dtype=torch.bfloat16)
    same = all(torch.equal(F.linear(x, w)[i], F.linear(x[i:i + 1], w)[0]) and torch.equal(F.linear(x, w)[i],
                                                                                          torch.mv(w, x[i]))
               for w in weights[torch.bfloat16][:len(shapes)] if w.shape[1] == a.dim for i in range(9))
    print(f"bfloat16 rows equal alone, beside 8 others and through torch.mv: {same}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=300, help="cached positions before the first timed step")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--max-seq", type=int, default=1024)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and KV cache")
    ap.add_argument("--profile", action="store_true", help="also print the ops taking the most CPU time")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="each decoder layer through torch.compile (as --compile)")
    ap.add_argument("--linear-rows", default="", help="comma-separated row counts: time the projections alone")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.linear_rows:
        linear_rows(ModelArgs(**SHAPES["smollm2"]), [int(m) for m in args.linear_rows.split(",")])
        return 0
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**SHAPES["smollm2"])).eval().to(getattr(torch, args.dtype))
    cache = random_cache(model, args.max_seq)
    if args.compile:
        for layer in model.model.layers:
            layer.compile(dynamic=True)
        start = time.perf_counter()
        step_seconds(model, cache, args.context, 1)
        print(f"first step, compiling: {time.perf_counter() - start:.1f} s")
    times = step_seconds(model, cache, args.context, args.steps + 3)[3:]
    result = {"shape": "SmolLM2-135M", "dtype": args.dtype, "compiled": args.compile, "threads": args.threads,
              "context": args.context,
              "steps": args.steps,
              "wall_ms_per_step": statistics.median(w for w, _ in times) * 1e3,
              "cpu_ms_per_step": statistics.median(c for _, c in times) * 1e3, "torch": torch.__version__,
              "machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    print(f"decode step: {result['wall_ms_per_step']:.2f} ms wall, {result['cpu_ms_per_step']:.2f} ms process CPU "
          f"(medians of {args.steps}, {args.threads} threads, {args.context} cached positions)")
    if args.profile:
        result["ops"] = profile_ops(model, cache, args.context, args.top)
        print("| op | calls/step | self ms/step | share of CPU time |\n|---|---|---|---|")
        for op in result["ops"]:
            print(f"| {op['op']} | {op['calls_per_step']:.0f} | {op['self_ms_per_step']:.2f} | {op['share']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
