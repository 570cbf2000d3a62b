"""GPU step costs against the weight-read floor, side by side with `transformers` on the same weights.

Per model (random 1B-class and Llama-3.1-8B shapes in bf16 and fp8, and the embedded trained pair):
ms per decode step and per verify step (K = 4, 8, 16) as CUDA-graph replays timed with CUDA events;
TTFT with a cached 300-token persona + 20 new tokens; 40-token line time, autoregressive and
speculative (n-gram lookup for random weights, the draft model for the trained pair); the same line
with `transformers.generate`; and 64 concurrent requests at the 1B shape (aggregate tokens/s, TTFT).

    python benchmarks/bench_gpu.py --shapes 1b,8b --pair models/npc-target --json $OUT/bench_gpu.json
"""
import argparse
import gc
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import header, random_pair  # noqa: E402
from npc_engine.cuda_graphs import GraphedForward  # noqa: E402
from npc_engine.drafters import ModelDrafter, NgramDrafter, NoDrafter  # noqa: E402
from npc_engine.engine import Engine  # noqa: E402
from npc_engine.fusion import fuse_projections_  # noqa: E402
from npc_engine.loading import load_model  # noqa: E402
from npc_engine.model import KVCache  # noqa: E402
from npc_engine.quantize import quantize_fp8_  # noqa: E402
from npc_engine.sampling import SamplingParams  # noqa: E402

PERSONA, NEW, LINE = 300, 20, 40


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    a = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / event_time(lambda: b.copy_(a), 20)


def event_time(fn, repeats: int = 50, inner: int = 10) -> float:
    """Median seconds of fn() measured with CUDA events over `inner` back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and t.numel() > 1024:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    # the embedding table is read one row per token, not whole: count it only where lm_head shares it
    emb = model.model.embed_tokens.weight
    if model.lm_head.__class__.__name__ == "Linear" and model.lm_head.weight is emb:
        return total
    return total - emb.numel() * emb.element_size()


def step_times(model, kv_len: int = 384) -> dict:
    """Graph-replay ms of one forward of T tokens per row at batch 1, with the fused kernels and without."""
    out = {}
    if model.model.layers[0].self_attn.qkv is None:
        fuse_projections_(model)  # as the engine does on CUDA
    for fused in (True, False):
        model.fused = fused
        cache = KVCache(model.args, 2, 1024, "cuda", torch.bfloat16)
        graphed = GraphedForward(model, scratch_slot=1)
        for T in (1, 5, 9, 17) if fused else (1, 9):
            tokens = torch.randint(0, model.args.vocab_size, (1, T), device="cuda")
            pos = torch.arange(kv_len - T, kv_len, device="cuda")[None]
            slots = torch.zeros(1, dtype=torch.long, device="cuda")
            out[T if fused else f"{T}_unfused"] = event_time(partial(graphed, tokens, pos, cache, slots, kv_len)) * 1e3
        del graphed, cache
    model.fused = True
    return out


def engine_numbers(model, drafter, vocab: int, concurrency: int = 0) -> dict:
    engine = Engine(model, drafter, None, "cuda", max_batch=max(concurrency, 2), max_seq=1024)
    engine.capture_graphs((1, concurrency or 1), sampled=False)  # as a service does at start
    gen = torch.Generator().manual_seed(0)
    persona = torch.randint(0, vocab, (PERSONA,), generator=gen).tolist()

    def prompt():
        return persona + torch.randint(0, vocab, (NEW,), generator=gen).tolist()

    params = SamplingParams(temperature=0, max_tokens=LINE)
    engine.submit("warm", prompt(), params, prefix_len=PERSONA)  # computes and caches the persona block
    while engine.has_work():
        engine.step()
    ttfts, lines = [], []
    for i in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.submit(f"r{i}", prompt(), params, prefix_len=PERSONA)
        first = None
        while engine.has_work():
            for ev in engine.step():
                if first is None and ev.token_ids:
                    first = time.perf_counter() - t0
        lines.append(time.perf_counter() - t0)
        ttfts.append(first)
    out = {"ttft_ms": statistics.median(ttfts) * 1e3, "line_ms": statistics.median(lines) * 1e3, "tokens": LINE}
    if concurrency:
        for i in range(concurrency):  # warm-up round: captures the CUDA graphs of these batch shapes
            engine.submit(f"w{i}", prompt(), params, prefix_len=PERSONA)
        while engine.has_work():
            engine.step()
        t0, first, tokens = time.perf_counter(), {}, 0
        for i in range(concurrency):
            engine.submit(f"c{i}", prompt(), params, prefix_len=PERSONA)
        while engine.has_work():
            for ev in engine.step():
                tokens += len(ev.token_ids)
                if ev.token_ids and ev.rid not in first:
                    first[ev.rid] = time.perf_counter() - t0
        wall = time.perf_counter() - t0
        ttft = sorted(first.values())
        out.update(concurrent=concurrency, aggregate_tokens_per_s=tokens / wall,
                   concurrent_ttft_p50_ms=ttft[len(ttft) // 2] * 1e3,
                   concurrent_ttft_p99_ms=ttft[int(0.99 * (len(ttft) - 1))] * 1e3)
    return out


def hf_numbers(hf, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, PERSONA + NEW), generator=gen).cuda()
    kwargs = dict(max_new_tokens=LINE, min_new_tokens=LINE, do_sample=False, pad_token_id=0)
    hf.generate(ids, **kwargs)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, **kwargs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    line = statistics.median(times)
    return {"hf_line_ms": line * 1e3, "hf_ms_per_token": line * 1e3 / LINE}


def free():
    gc.collect()
    torch.cuda.empty_cache()


def bench_random(shape: str, bandwidth: float, concurrency: int) -> list[dict]:
    rows = []
    hf, ours = random_pair(shape, "cuda", torch.bfloat16)
    vocab = ours.args.vocab_size
    hf_cols = hf_numbers(hf, vocab)
    for dtype in ("bf16", "fp8"):
        if dtype == "fp8":
            del hf
            free()
            quantize_fp8_(ours)
        row = {"model": shape, "dtype": dtype, "weight_MB": weight_bytes(ours) / 1e6}
        row["floor_ms"] = weight_bytes(ours) / bandwidth * 1e3
        steps = step_times(ours)
        row.update(decode_ms=steps[1], verify4_ms=steps[5], verify8_ms=steps[9], verify16_ms=steps[17],
                   decode_unfused_ms=steps["1_unfused"], verify8_unfused_ms=steps["9_unfused"])
        ar = engine_numbers(ours, NoDrafter(), vocab, concurrency if (shape == "1b" and dtype == "bf16") else 0)
        row.update(ttft_ms=ar["ttft_ms"], line_ar_ms=ar["line_ms"],
                   **{k: v for k, v in ar.items() if k.startswith(("concurrent", "aggregate"))})
        row["line_spec_ngram_ms"] = engine_numbers(ours, NgramDrafter(vocab, "cuda"), vocab)["line_ms"]
        if dtype == "bf16":
            row.update(hf_cols)
        rows.append(row)
        print(json.dumps(row), flush=True)
        free()
    del ours
    free()
    return rows


def bench_pair(target_dir: str, draft_dir: str, bandwidth: float) -> dict:
    from transformers import AutoModelForCausalLM

    target, draft = load_model(target_dir, "cuda", torch.bfloat16), load_model(draft_dir, "cuda", torch.bfloat16)
    vocab = target.args.vocab_size
    row = {"model": "trained pair", "dtype": "bf16", "weight_MB": weight_bytes(target) / 1e6,
           "floor_ms": weight_bytes(target) / bandwidth * 1e3}
    steps = step_times(target)
    row.update(decode_ms=steps[1], verify4_ms=steps[5], verify8_ms=steps[9], verify16_ms=steps[17])
    ar = engine_numbers(target, NoDrafter(), vocab)
    row.update(ttft_ms=ar["ttft_ms"], line_ar_ms=ar["line_ms"])
    drafter = ModelDrafter(draft, 3, 1024, "cuda", torch.bfloat16)
    row["line_spec_draft_ms"] = engine_numbers(target, drafter, vocab)["line_ms"]
    hf = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.bfloat16).cuda().eval()
    row.update(hf_numbers(hf, vocab))
    print(json.dumps(row), flush=True)
    return row


COLUMNS = [("model", "{}"), ("dtype", "{}"), ("floor_ms", "{:.3f}"), ("decode_unfused_ms", "{:.3f}"),
           ("decode_ms", "{:.3f}"), ("verify4_ms", "{:.3f}"), ("verify8_ms", "{:.3f}"), ("verify16_ms", "{:.3f}"),
           ("ttft_ms", "{:.2f}"), ("line_ar_ms", "{:.1f}"),
           ("line_spec_ngram_ms", "{:.1f}"), ("line_spec_draft_ms", "{:.1f}"), ("hf_ms_per_token", "{:.2f}"),
           ("hf_line_ms", "{:.1f}")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--pair", default=None)
    ap.add_argument("--draft", default="models/npc-draft")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(header("cuda"))
    with torch.no_grad():
        bandwidth = copy_bandwidth()
        print(f"measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
        rows = []
        for shape in filter(None, args.shapes.split(",")):
            rows += bench_random(shape, bandwidth, args.concurrency)
        if args.pair:
            rows.append(bench_pair(args.pair, args.draft, bandwidth))
    print("\n| " + " | ".join(c for c, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(fmt.format(r[c]) if c in r else "-" for c, fmt in COLUMNS) + " |")
    for r in rows:
        if "aggregate_tokens_per_s" in r:
            print(f"\n{r['model']} {r['dtype']}: {r['concurrent']} concurrent requests: "
                  f"{r['aggregate_tokens_per_s']:.0f} tokens/s, "
                  f"TTFT p50 {r['concurrent_ttft_p50_ms']:.1f} ms, p99 {r['concurrent_ttft_p99_ms']:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_GBps": bandwidth / 1e9, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
