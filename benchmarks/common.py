"""Shared pieces of the benchmark scripts: model shapes, random weights shared with `transformers`, timers."""
import platform
import statistics
import time
from datetime import date

import torch

from npc_engine.model import ModelArgs, Transformer, rope_inv_freq

SHAPES = {
    # 1B-class: 16 layers, d 2048, GQA 32/8, FFN 8192, Llama-3 vocabulary.
    "1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate_size=8192,
               rope_theta=500000.0, tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
               rope_theta=500000.0),
    # Small enough for a CPU run: 12 layers, d 768 (a GPT-2-small-sized Llama).
    "small": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, intermediate_size=2048),
    # SmolLM2-135M's shape: deep and narrow, 30 layers of width 576, GQA 9/3.
    "smollm2": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536,
                    rope_theta=100000.0, tie_word_embeddings=True),
}


def random_pair(shape: str, device, dtype, seed: int = 0):
    """The same random weights in a `transformers` LlamaForCausalLM and in our Transformer (shared storage)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    args = ModelArgs(**SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        hf = LlamaForCausalLM(LlamaConfig(**args.to_hf_config())).to(dtype).eval()
    with torch.device("meta"):
        ours = Transformer(args)
    ours.load_state_dict(hf.state_dict(), assign=True, strict=False)
    if args.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    ours.inv_freq = rope_inv_freq(args).to(device)
    return hf.requires_grad_(False), ours.eval().requires_grad_(False)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of fn() over repeats, device synchronised before and after each run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hardware(device) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def header(device) -> str:
    return f"# {date.today()} on {hardware(device)}"
