"""Each Triton kernel against its PyTorch reference on CUDA, at the 1B shape (d 2048, GQA 32/8,
head dim 64, FFN 8192, vocab 128256), batch 1, T = 1, 5, 9, 17 new tokens, contexts 300/1024/4096.

Times are medians of `triton.testing.do_bench` (L2 flushed before every call) over a CUDA-graph
replay of the op, so Python launch overhead is left out as it is in the engine's captured steps;
ops that cannot be captured (the rope reference indexes with a data-dependent mask) run eagerly.
The floor is the op's compulsory bytes (inputs read once, outputs written once) over the measured
device-to-device copy bandwidth.

    python benchmarks/bench_kernels.py        # table on stdout; $OUT/bench_kernels.json when OUT is set
"""

import json
import math
import os
import sys
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels.attention import cached_attention_reference, cached_attention_triton  # noqa: E402
from kernels.fp8 import fp8_linear_reference, fp8_linear_scaled_mm, fp8_linear_triton, quantize_fp8  # noqa: E402
from kernels.gemv import small_m_linear_triton  # noqa: E402
from kernels.rmsnorm import add_rmsnorm_reference, add_rmsnorm_triton  # noqa: E402
from kernels.rope import rope_kv_write_reference, rope_kv_write_triton  # noqa: E402

DIM, HQ, HKV, HEAD_DIM, FFN, VOCAB = 2048, 32, 8, 64, 8192, 128256
TOKENS = (1, 5, 9, 17)
CONTEXTS = (300, 1024, 4096)
LINEARS = {"q_proj": (DIM, DIM), "k_proj": (HKV * HEAD_DIM, DIM), "gate_proj": (FFN, DIM),
           "down_proj": (DIM, FFN), "lm_head": (VOCAB, DIM)}  # name: (N out, K in)
DT = torch.bfloat16
BF16 = 2
NOT_CAPTURABLE = {("rope_kv_write", "reference")}  # torch.nonzero syncs with the host


def time_us(fn, capture: bool) -> tuple[float, str]:
    """Median microseconds of one call, replayed from a CUDA graph when capture is set."""
    fn()
    torch.cuda.synchronize()
    run, mode = fn, "eager"
    if capture:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run, mode = graph.replay, "graph"
    return do_bench(run, warmup=25, rep=200, return_mode="median") * 1e3, mode


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def rmsnorm_cases():
    weight = torch.randn(DIM, device="cuda", dtype=DT)
    for T in TOKENS:
        x, residual = torch.randn(T, DIM, device="cuda", dtype=DT), torch.randn(T, DIM, device="cuda", dtype=DT)
        yield ("add_rmsnorm", f"T={T} d={DIM}", (4 * T * DIM + DIM) * BF16, {
            "triton": lambda x=x, r=residual: add_rmsnorm_triton(x, r, weight, 1e-5),
            "reference": lambda x=x, r=residual: add_rmsnorm_reference(x, r, weight, 1e-5)})


def rope_cases():
    S = 4096 + 256
    k_cache = torch.zeros(4, HKV, S, HEAD_DIM, device="cuda", dtype=DT)
    v_cache = torch.zeros_like(k_cache)
    angles = torch.arange(S, device="cuda").float()[:, None] * torch.rand(HEAD_DIM // 2, device="cuda")
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([1], device="cuda")
    for T in TOKENS:
        q = torch.randn(1, T, HQ, HEAD_DIM, device="cuda", dtype=DT)
        k, v = (torch.randn(1, T, HKV, HEAD_DIM, device="cuda", dtype=DT) for _ in range(2))
        positions = 1024 + torch.arange(T, device="cuda")[None]
        moved = 2 * T * (HQ + 2 * HKV) * HEAD_DIM * BF16 + 2 * T * HEAD_DIM // 2 * 4
        args = (q, k, v, cos, sin, positions, slots, k_cache, v_cache)
        yield ("rope_kv_write", f"T={T}", moved, {
            "triton": lambda args=args: rope_kv_write_triton(*args),
            "reference": lambda args=args: rope_kv_write_reference(*args)})


def attention_cases():
    S = 4096 + 256
    k_cache = torch.randn(4, HKV, S, HEAD_DIM, device="cuda", dtype=DT)
    v_cache = torch.randn_like(k_cache)
    slots = torch.tensor([1], device="cuda")
    for ctx in CONTEXTS:
        for T in TOKENS:
            for tree in (False, True) if T > 1 and ctx == 1024 else (False,):
                q = torch.randn(1, T, HQ, HEAD_DIM, device="cuda", dtype=DT)
                positions = ctx + torch.arange(T, device="cuda")[None]
                max_len = triton.cdiv(ctx + T, 256) * 256  # a graph bucket
                tree_mask = torch.ones(1, T, T, device="cuda", dtype=torch.bool).tril() if tree else None
                keys = ctx + T
                moved = 2 * keys * HKV * HEAD_DIM * BF16 + 2 * T * HQ * HEAD_DIM * BF16
                impls = {
                    "triton": lambda q=q, p=positions, m=tree_mask, L=max_len:
                        cached_attention_triton(q, k_cache, v_cache, slots, p, m, L),
                    "reference": lambda q=q, p=positions, m=tree_mask, L=max_len:
                        cached_attention_reference(q, k_cache, v_cache, slots, p, m, L),
                }
                if not tree:
                    mask = (torch.arange(max_len, device="cuda") <= positions[0, :, None])[None, None]
                    impls["sdpa"] = partial(sdpa_attention, q, k_cache, v_cache, slots, mask, max_len)
                name = "attention" + ("+tree" if tree else "")
                yield (name, f"ctx={ctx} T={T} L={max_len}", moved, impls)


def sdpa_attention(q, k_cache, v_cache, slots, mask, L):
    """Attention without the kernel: gather the rows' keys, repeat them per query head, masked SDPA."""
    G = q.shape[2] // k_cache.shape[1]
    keys = k_cache[:, :, :L].index_select(0, slots).repeat_interleave(G, dim=1)
    values = v_cache[:, :, :L].index_select(0, slots).repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)


def fp8_cases():
    for name, (N, K) in LINEARS.items():
        weight = torch.randn(N, K, device="cuda", dtype=DT) / math.sqrt(K)
        w_fp8, scale = quantize_fp8(weight)
        for M in (1, 9, 17):
            x = torch.randn(M, K, device="cuda", dtype=DT)
            io = (M * K + M * N) * BF16
            fp8 = {"fp8 scaled_mm": lambda x=x, w=w_fp8, s=scale: fp8_linear_scaled_mm(x, w, s),
                   "fp8 triton": lambda x=x, w=w_fp8, s=scale: fp8_linear_triton(x, w, s),
                   "fp8 reference": lambda x=x, w=w_fp8, s=scale: fp8_linear_reference(x, w, s)}
            bf16 = {"bf16 F.linear": lambda x=x, w=weight: F.linear(x, w)}
            if M <= 16:  # the small-M kernel the decode and verify steps use
                fp8["fp8 small-M triton"] = lambda x=x, w=w_fp8, s=scale: small_m_linear_triton(x, w, None, s)
                bf16["bf16 small-M triton"] = lambda x=x, w=weight: small_m_linear_triton(x, w)
            yield (f"linear {name}", f"M={M} N={N} K={K}", N * K + 4 * N + io, fp8)
            yield (f"linear {name}", f"M={M} N={N} K={K}", N * K * BF16 + io, bf16)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_kernels: needs a CUDA device")
    torch.manual_seed(0)
    device = f"{torch.cuda.get_device_name()} (torch {torch.__version__}, triton {triton.__version__})"
    bandwidth = copy_bandwidth()
    print(f"{device}\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows = []
    for cases in (rmsnorm_cases, rope_cases, attention_cases, fp8_cases):
        try:
            for kernel, shape, moved, impls in cases():
                floor_us = moved / bandwidth * 1e6
                for impl, fn in impls.items():
                    row = dict(kernel=kernel, shape=shape, impl=impl, bytes=moved, floor_us=floor_us)
                    try:
                        row["us"], row["mode"] = time_us(fn, (kernel, impl) not in NOT_CAPTURABLE)
                    except Exception as e:  # keep going: one broken case must not hide the others
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                        traceback.print_exc()
                    rows.append(row)
                    print(f"  {kernel:<18} {shape:<26} {impl:<14} "
                          + (f"{row['us']:9.1f} us" if "us" in row else row["error"]), flush=True)
        except Exception:
            traceback.print_exc()
        torch.cuda.empty_cache()

    print(f"\n{'kernel':<18} {'shape':<26} {'impl':<14} {'us':>9} {'floor us':>9} {'floor %':>8}  mode")
    for r in rows:
        if "us" in r:
            print(f"{r['kernel']:<18} {r['shape']:<26} {r['impl']:<14} {r['us']:9.1f} {r['floor_us']:9.2f} "
                  f"{100 * r['floor_us'] / r['us']:7.1f}%  {r['mode']}")
        else:
            print(f"{r['kernel']:<18} {r['shape']:<26} {r['impl']:<14} ERROR {r['error'][:60]}")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_kernels.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(device=device, copy_bandwidth_Bps=bandwidth, rows=rows), indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
