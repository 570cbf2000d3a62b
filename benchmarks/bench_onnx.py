"""ONNX Runtime (CPU provider) vs PyTorch (CPU) on the same weights, batch 1, greedy, no drafter.

For each model: `decode ms/step` is one forward of one new token against the KV cache (the model
call alone), averaged over the new tokens after the prompt is prefilled; `tokens/s` is the whole
line through the engine (prefill included) divided into the new tokens. Medians over --repeats runs
after one warm-up run; the two backends alternate run by run, so load on the machine hits both
alike. Both use --threads threads. The greedy tokens of the two backends are checked to be equal.

Models: --shapes (random weights; npc-target / npc-draft are the shapes of the shipped pair, small
is benchmarks.common's 12-layer d768 Llama) and --model (a Hugging Face folder or .gguf file, e.g.
models/npc-target), each saved in float32 and exported with `npc-engine export-onnx` into a scratch folder, once per
--weights choice (float, and the weight-only int8 / int4 MatMulNBits exports). "same tokens": a backend's greedy
tokens equal PyTorch's float32 ones.

    python benchmarks/bench_onnx.py --shapes npc-target,npc-draft,small --threads 1
    python benchmarks/bench_onnx.py --shapes "" --model models/npc-target --threads 1
    python benchmarks/bench_onnx.py --shapes "" --model models/base/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2 \
        --weights float,int8,int4 --repeats 3
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import SHAPES, header  # noqa: E402
from npc_engine.drafters import NoDrafter  # noqa: E402
from npc_engine.engine import Engine  # noqa: E402
from npc_engine.engine.forwards import kv_bucket  # noqa: E402
from npc_engine.loading import load_model, save_model  # noqa: E402
from npc_engine.model import KVCache, ModelArgs, Transformer  # noqa: E402
from npc_engine.onnx_backend import OnnxModel  # noqa: E402
from npc_engine.onnx_export import export_onnx  # noqa: E402
from npc_engine.sampling import SamplingParams  # noqa: E402
from npc_engine.train.config import DEFAULT  # noqa: E402

MAX_SEQ = 512


def shape_args(name: str) -> ModelArgs:
    if name in ("npc-target", "npc-draft"):
        shape = DEFAULT.target if name == "npc-target" else DEFAULT.draft
        return ModelArgs.from_hf_config(shape.hf_config(DEFAULT.vocab_size, [0]))
    return ModelArgs(**SHAPES[name])


def random_model_dir(args: ModelArgs, path: Path) -> Path:
    torch.manual_seed(0)
    save_model(Transformer(args), path, dtype=torch.float32, max_shard_mb=4096)
    return path


def decode_step_seconds(model, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """Prefill, then new_tokens greedy single-token forwards; seconds per forward and the tokens."""
    cache = KVCache(model.args, 1, MAX_SEQ, "cpu", torch.float32)
    slots = torch.zeros(1, dtype=torch.long)
    kv_len = kv_bucket(len(prompt), MAX_SEQ)
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, slots, kv_len)
    token, out = logits[:, -1:].argmax(-1), []
    t0 = time.perf_counter()
    for pos in range(len(prompt), len(prompt) + new_tokens):
        logits = model(token, torch.tensor([[pos]]), cache, slots, kv_bucket(pos + 1, MAX_SEQ))
        token = logits[:, -1:].argmax(-1)
        out.append(token.item())
    return (time.perf_counter() - t0) / new_tokens, out


def line_seconds(engine: Engine, prompt: list[int], new_tokens: int, rid: str) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    tokens = list(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=new_tokens), rid=rid))
    return time.perf_counter() - t0, tokens


def bench_model(name: str, model_dir: Path, onnx_dirs: dict[str, Path], args) -> list[dict]:
    models = {"pytorch": load_model(model_dir, "cpu", torch.float32)}
    models |= {f"onnxruntime{'' if w == 'float' else ' ' + w}": OnnxModel(d, "cpu", args.threads)
               for w, d in onnx_dirs.items()}
    vocab = models["pytorch"].args.vocab_size
    prompt = torch.randint(0, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    # No tokenizer: no stop tokens, so every line has exactly --new-tokens tokens.
    engines = {b: Engine(m, NoDrafter(), None, "cpu", max_batch=1, max_seq=MAX_SEQ, cuda_graphs=False)
               for b, m in models.items()}
    step_s, line_s, tokens = {b: [] for b in models}, {b: [] for b in models}, {}
    for repeat in range(args.repeats + 1):  # run 0 is the warm-up
        for backend in models:
            s, step_tokens = decode_step_seconds(models[backend], prompt, args.new_tokens)
            ls, line_tokens = line_seconds(engines[backend], prompt, args.new_tokens, rid=str(repeat))
            if repeat:
                step_s[backend].append(s)
                line_s[backend].append(ls)
            tokens[backend] = (step_tokens, line_tokens)
    rows = []
    for backend in models:
        step, line = statistics.median(step_s[backend]), statistics.median(line_s[backend])
        rows.append({"model": name, "backend": backend, "threads": args.threads, "decode_ms_per_step": step * 1e3,
                     "line_ms": line * 1e3, "tokens_per_s": args.new_tokens / line,
                     "same_greedy_tokens": tokens[backend] == tokens["pytorch"]})
    for r in rows:
        r["tokens_per_s_vs_pytorch"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="npc-target,npc-draft",
                    help="comma-separated: npc-target, npc-draft, small (empty for none)")
    ap.add_argument("--model", action="append", default=[], help="a Hugging Face model folder (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="threads of both backends (default 1)")
    ap.add_argument("--weights", default="float", help="comma-separated ONNX exports: float, int8, int4")
    ap.add_argument("--prompt-tokens", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime
    print(header("cpu"), f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider, float32, batch 1, greedy, "
                         f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of {args.repeats}")
    print("| model | backend | threads | decode ms/step | line ms | tokens/s | vs pytorch | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    with torch.no_grad(), tempfile.TemporaryDirectory() as scratch:
        sources = [(s, None) for s in filter(None, args.shapes.split(","))] + [(m, Path(m)) for m in args.model]
        for i, (name, model_dir) in enumerate(sources):
            model_dir = model_dir or random_model_dir(shape_args(name), Path(scratch) / f"{i}-weights")
            onnx_dirs = {w: Path(scratch) / f"{i}-onnx-{w}" for w in args.weights.split(",")}
            for weights, onnx_dir in onnx_dirs.items():
                export_onnx(model_dir, onnx_dir, progress=False, weights=weights)
            for r in bench_model(name, model_dir, onnx_dirs, args):
                rows.append(r)
                print(f"| {r['model']} | {r['backend']} | {r['threads']} | {r['decode_ms_per_step']:.2f} "
                      f"| {r['line_ms']:.1f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_vs_pytorch']:.2f}x "
                      f"| {r['same_greedy_tokens']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
