"""Line generation speed: our engine vs `transformers` on the same weights, batch 1.

Random-weight Llama shapes (50-token prompt, 40 new tokens, greedy) and, with --pair, the embedded
trained target/draft pair on persona prompts: `transformers.generate` (plain and assisted with the
draft), our autoregressive path (eager, and with CUDA graphs on GPU), our speculative path with the
draft model, with n-gram lookup and with the feature head (--head, default models/npc-head). Medians
over --repeats runs after one warm-up run. For our lines the decoding phase (first token to last) is
also timed on its own: prefill is the same work with or without speculation, so "decode ms/token" is
where drafting shows. --ignore-stop makes every line --new-tokens long (stop tokens are generated
like any other), so short answers do not hide it. --model (an instruct base, a .gguf file or a folder, with
--adapter) adds, with --weights, our engine on weight-only int8 / int4 packed weights (--dtype int8 / int4), with
--onnx-weights our engines on ONNX Runtime exports (MatMulNBits, in the --onnx-layouts; the heads on `ort`
ones) and, where llama-cpp-python is installed (a benchmark-only dependency), llama.cpp on the same .gguf file;
--trees adds the --model-head drafting trees.

    python benchmarks/bench_decode.py --device cuda --shapes 1b,8b --pair models/npc-target
    python benchmarks/bench_decode.py --device cpu --shapes small --pair models/npc-target
    python benchmarks/bench_decode.py --device cpu --shapes "" --threads 2 --prompts 4 --repeats 3 \
        --model models/base/SmolLM2-135M-Instruct.Q4_1.gguf --adapter models/smollm2-npc-persona \
        --model-head runs/smollm2-npc-head --weights int8,int4 --onnx-weights int8
    python benchmarks/bench_decode.py ... --model-head runs/smollm2-npc-head --dtype bfloat16 --trees 6x24
"""
import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import header, median_time, random_pair  # noqa: E402
from npc_engine.drafters import HeadDrafter, ModelDrafter, NgramDrafter, NoDrafter  # noqa: E402
from npc_engine.engine import Engine, RequestStats  # noqa: E402
from npc_engine.engine.load import load_parts  # noqa: E402
from npc_engine.engine.trees import TreeShape  # noqa: E402
from npc_engine.head import load_head  # noqa: E402
from npc_engine.loading import load_model, parse_dtype  # noqa: E402
from npc_engine.sampling import SamplingParams  # noqa: E402


def ours_line(model, drafter, tokenizer, prompt, new_tokens, device, graphs, repeats):
    engine = Engine(model, drafter, tokenizer, device, max_batch=1, max_seq=512, cuda_graphs=graphs)
    engine.capture_graphs(sampled=False)  # as a service does at start: no capture inside a timed line
    params = SamplingParams(temperature=0, max_tokens=new_tokens)
    runs, decode_seconds = [], []

    def run():
        tokens, first_at = [], None
        for t in engine.generate(prompt, params, rid=str(len(runs))):  # each token is on the host: synchronised
            tokens.append(t)
            first_at = first_at or time.perf_counter()
        decode_seconds.append(time.perf_counter() - first_at)
        runs.append(tokens)

    seconds = median_time(run, device, repeats)
    decode = statistics.median(decode_seconds[1:])  # after the warm-up run
    return seconds, len(runs[-1]), engine.last_stats, runs[-1], decode


def hf_line(hf, prompt, new_tokens, device, repeats, assistant=None, stop_ids=None):
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if stop_ids:
        kwargs["eos_token_id"] = stop_ids
    else:
        kwargs["min_new_tokens"] = new_tokens
    if assistant is not None:
        kwargs["assistant_model"] = assistant
    out = []
    seconds = median_time(lambda: out.append(hf.generate(ids, **kwargs)), device, repeats)
    return seconds, out[-1].shape[1] - len(prompt), out[-1][0, len(prompt):].tolist()


def row(name, seconds, tokens, base=None, stats=None, decode_seconds=None, decode_tokens=None):
    """decode_seconds: time from the first token to the last, over decode_tokens tokens (default tokens - 1)."""
    r = {"impl": name, "line_ms": seconds * 1e3, "tokens": tokens, "ms_per_token": seconds * 1e3 / max(tokens, 1),
         "tokens_per_s": tokens / seconds}
    decode_tokens = tokens - 1 if decode_tokens is None else decode_tokens
    if decode_seconds is not None and decode_tokens > 0:
        r["decode_ms_per_token"] = decode_seconds * 1e3 / decode_tokens
    if stats is not None and stats.drafted:
        r.update(acceptance=stats.accepted / stats.drafted, mean_accepted_length=stats.mean_accepted)
    if base is not None:
        r["speedup_vs_transformers"] = base / r["ms_per_token"]
    return r


def bench_shape(shape, device, dtype, args):
    hf, ours = random_pair(shape, device, dtype)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, ours.args.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
    rows = []
    s, n, _ = hf_line(hf, prompt, args.new_tokens, device, args.repeats)
    rows.append(row("transformers generate", s, n))
    base = rows[0]["ms_per_token"]
    variants = [("ours autoregressive, eager", NoDrafter(), False)]
    if torch.device(device).type == "cuda":
        variants.append(("ours autoregressive, CUDA graphs", NoDrafter(), True))
    variants.append(("ours speculative, n-gram", NgramDrafter(ours.args.vocab_size, device), True))
    for name, drafter, graphs in variants:
        s, n, stats, _, decode_s = ours_line(ours, drafter, None, prompt, args.new_tokens, device, graphs, args.repeats)
        rows.append(row(name, s, n, base, stats, decode_s))
    del hf, ours
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def persona_prompts(tokenizer, n: int) -> list[list[int]]:
    from npc_engine.persona import load_persona_dir
    from npc_engine.prompt import Turn

    questions = ["What do you do here?", "Where are you from?", "What is your name?", "What news from the road?"]
    personas = list(load_persona_dir(Path(__file__).resolve().parent.parent / "personas").values())
    return [tokenizer.encode(personas[i % len(personas)].prompt([Turn("player", questions[i % len(questions)])]))
            for i in range(n)]


def draft_agreement(target, draft, lines: list[tuple[list[int], list[int]]], device) -> tuple[float, int]:
    """Share of our greedy lines' positions where the draft's argmax is the target's (teacher-forced:
    both read the same prefix), the ceiling of greedy acceptance for one-token drafts."""
    hits = total = 0
    for prompt, tokens in lines:
        seq = torch.tensor([prompt + tokens], device=device)
        span = slice(len(prompt) - 1, seq.shape[1] - 1)
        hits += (target(seq)[0, span].argmax(-1) == draft(seq)[0, span].argmax(-1)).sum().item()
        total += len(tokens)
    return hits / max(total, 1), total


def bench_pair(target_dir, draft_dir, device, dtype, args):
    from transformers import AutoModelForCausalLM

    from npc_engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(target_dir)
    target, draft = load_model(target_dir, device, dtype), load_model(draft_dir, device, dtype)
    hf_target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).to(device).eval()
    hf_draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=dtype).to(device).eval()
    head = load_head(args.head, target, device, dtype) if args.head else None
    graphs = torch.device(device).type == "cuda"
    totals: dict[str, list] = {}
    same: dict[str, list[bool]] = {}
    stop_ids = None if args.ignore_stop else tokenizer.stop_ids
    ours_tokenizer = None if args.ignore_stop else tokenizer  # no tokenizer: the engine has no stop tokens
    lines = []
    for prompt in persona_prompts(tokenizer, args.prompts):
        runs = {"transformers generate": hf_line(hf_target, prompt, args.new_tokens, device, args.repeats,
                                                 stop_ids=stop_ids),
                "transformers assisted (draft)": hf_line(hf_target, prompt, args.new_tokens, device, args.repeats,
                                                         assistant=hf_draft, stop_ids=stop_ids)}
        drafters = [("ours autoregressive", NoDrafter),
                    ("ours speculative, draft model", lambda: ModelDrafter(draft, 2, 512, device, dtype)),
                    ("ours speculative, n-gram", lambda: NgramDrafter(target.args.vocab_size, device))]
        if head is not None:
            drafters.append(("ours speculative, feature head",
                             lambda: HeadDrafter(head, target, 2, 512, device, dtype)))
        for name, make_drafter in drafters:
            s, n, stats, tokens, decode_s = ours_line(target, make_drafter(), ours_tokenizer, prompt, args.new_tokens,
                                                      device, graphs, args.repeats)
            runs[name] = (s, n, tokens, stats, decode_s)
        ref_tokens = runs["ours autoregressive"][2]
        lines.append((prompt, ref_tokens))
        for name, result in runs.items():
            totals.setdefault(name, []).append(result)
            # bf16 verification of K+1 tokens may round differently from one-token decoding: count, don't stop
            same.setdefault(name, []).append(result[2] == ref_tokens)
    agreement, positions = draft_agreement(target, draft, lines, device)
    return summarize(totals, same) + [{"impl": "draft agreement", "agreement": agreement, "positions": positions}]


def summarize(totals: dict[str, list], same: dict[str, list[bool]]) -> list[dict]:
    """One row per implementation over every prompt; ratios against the first (transformers) and our AR rows."""
    rows = []
    for name, results in totals.items():
        seconds, tokens = sum(r[0] for r in results), sum(r[1] for r in results)
        stats = decode = None
        if len(results[0]) == 5:  # ours: decode ms/token = decoding time over the tokens after each line's first
            stats = RequestStats(drafted=sum(r[3].drafted for r in results),
                                 accepted=sum(r[3].accepted for r in results),
                                 target_forwards=sum(r[3].target_forwards for r in results))
            decode = (sum(r[4] for r in results), sum(r[1] - 1 for r in results))
        rows.append(row(name, seconds, tokens, None, stats, *(decode or ()))
                    | {"same_tokens_as_ours_ar": f"{sum(same[name])}/{len(same[name])}"})
    base = rows[0]["ms_per_token"]
    ar = next(r for r in rows if r["impl"] == "ours autoregressive")
    for r in rows:
        r["speedup_vs_transformers"] = base / r["ms_per_token"]
        r["speedup_vs_ours_autoregressive"] = ar["ms_per_token"] / r["ms_per_token"]
        if "decode_ms_per_token" in r:
            r["decode_speedup_vs_ours_autoregressive"] = ar["decode_ms_per_token"] / r["decode_ms_per_token"]
    return rows


def dev_prompts(tokenizer, corpus: Path, n: int, max_len: int = 448) -> list[list[int]]:
    """The first n conversations of the npc-dialogue dev split up to their last NPC turn, in the model's chat
    template (with the generation prompt)."""
    from npc_engine.train.feature_head import reply_prompts
    from npc_engine.train.npc_dialogue import examples, read_split

    return reply_prompts(tokenizer, examples(read_split(corpus, "dev"))[:4 * n], max_len, last_only=True)[:n]


def onnx_models(folder: Path, adapter, weights: list[str], layouts: list[str], scratch: Path,
                feature_layers: tuple[int, ...] = ()) -> dict[str, object]:
    """The model folder and adapter through `export-onnx` once per --onnx-weights and --onnx-layouts choice (the
    adapter's pairs kept in float beside quantized weights, as a user's export keeps them; `ort` ones with the
    outputs of a feature head's feature_layers), run by ONNX Runtime with torch's thread count: the weight-only
    int8 / int4 (`MatMulNBits`) CPU path."""
    from npc_engine.onnx_backend import OnnxModel
    from npc_engine.onnx_export import export_onnx

    models = {}
    for w in weights:
        for layout in layouts:
            out = scratch / f"onnx-{w}-{layout}"
            export_onnx(folder, out, progress=False, weights=w, layout=layout, adapter=adapter,
                        draft_weights=layout == "ort", feature_layers=feature_layers if layout == "ort" else ())
            models[f"onnxruntime {w}, {layout} layout"] = OnnxModel(out, "cpu", torch.get_num_threads())
    return models


def llama_cpp_model(model_path: str):
    """llama.cpp (llama-cpp-python) on the GGUF file itself, with torch's thread count; None, with a printed note,
    when --model is not a .gguf file or llama_cpp is not importable (a benchmark-only dependency: it compiles
    llama.cpp from source)."""
    if not str(model_path).endswith(".gguf"):
        print("llama.cpp row skipped: --model is not a .gguf file")
        return None
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp row skipped: llama_cpp (pip install llama-cpp-python) is not importable")
        return None
    threads = torch.get_num_threads()
    return Llama(model_path=str(model_path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)


def llama_cpp_line(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy, no stop token: new_tokens tokens; the line includes the prompt's prefill, as ours do."""
    llm.reset()  # else generate() reuses the KV cache of the previous line's identical prompt
    tokens, first_at = [], None
    for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        tokens.append(t)
        first_at = first_at or time.perf_counter()
        if len(tokens) == new_tokens:
            break
    return tokens, first_at


def engine_line(engine: Engine, prompt: list[int], params: SamplingParams, rid: str) -> tuple[list[int], float]:
    tokens, first_at = [], None
    for t in engine.generate(prompt, params, rid=rid):
        tokens.append(t)
        first_at = first_at or time.perf_counter()
    return tokens, first_at


def plain_row(name: str) -> str:
    """The row whose tokens `name`'s should equal: our plain decoding on the same weights."""
    if "onnxruntime" in name:
        return "ours autoregressive, " + name[name.index("onnxruntime"):]
    weights = name.rsplit(", ", 1)[-1]
    return f"ours autoregressive, {weights}" if weights.endswith(" weights") else "ours autoregressive"


def bench_base(model_path, adapter, head_dir, device, dtype, args, scratch: Path):
    """An instruct base (+ persona adapter) on dev-split persona prompts, every line --new-tokens long (stop tokens
    ignored on both sides), round-robin: each repeat runs every implementation once, in an order rotated each round,
    so a change of load on a shared machine hits all of them (medians of --repeats rounds after one warm-up round):
    transformers.generate on our merged weights, ours plain, n-gram, the trained feature head, a random head; with
    --onnx-weights our engines on ONNX Runtime exports (`export-onnx --adapter`; the heads on `ort` ones);
    llama.cpp on the GGUF file where llama_cpp is importable (the base without the adapter: the same work per token,
    other tokens).
    Each of our implementations is one engine over every prompt (its draft policy learns across lines, as a
    service's does), with its CUDA graphs captured before the first line on the GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npc_engine.head import FeatureHead, head_args
    from npc_engine.paths import resolve_model

    folder = resolve_model(model_path)
    target = load_model(folder, device, dtype, adapter=adapter)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    ours_state = target.state_dict()
    missing = [k for k in hf.state_dict() if k not in ours_state and "rotary" not in k]
    assert not missing, f"transformers weights without ours: {missing[:3]}"
    hf.load_state_dict({k: ours_state[k] for k in hf.state_dict() if k in ours_state}, strict=False)
    hf_models = {"transformers generate": hf}
    if dtype != torch.float32:  # also transformers' float32 (on the CPU its fastest) on the same weight values
        hf32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
        hf32.load_state_dict({k: v.float() for k, v in hf.state_dict().items()})
        hf_models["transformers generate, float32"] = hf32
    for m in hf_models.values():
        m.eval().generation_config.eos_token_id = None  # no stop token: every line --new-tokens long, as ours
    trained = load_head(head_dir, target, device, dtype) if head_dir else None
    layers = () if trained is None else trained.feature_layers  # the exports output them: both heads read those
    torch.manual_seed(0)
    random_head = FeatureHead(head_args(target.args), feature_layers=layers).to(device, dtype).eval()
    random_head.requires_grad_(False)
    heads = [(f"ours speculative, feature head{'' if copies else ', no copies'}", trained, copies)
             for copies in ([True, False] if args.head_copies == "on,off" else [args.head_copies == "on"])
             if trained is not None]
    heads.append(("ours speculative, random head", random_head, True))

    def head_drafter(head, copies, target):
        drafter = HeadDrafter(head, target, 2, 1024, device, dtype)
        drafter.copies = copies
        return drafter

    drafters = [("ours autoregressive", target, NoDrafter),
                ("ours speculative, n-gram", target, lambda: NgramDrafter(target.args.vocab_size, device))]
    drafters += [(name, target, lambda h=h, c=c: head_drafter(h, c, target)) for name, h, c in heads]
    if args.trees and not head_dir:
        raise SystemExit("--trees drafts with --model-head: give one")
    trees = {f"ours speculative, feature head, tree {shape}": TreeShape.parse(shape.replace("x", ","))
             for shape in filter(None, args.trees.split(","))}
    drafters += [(name, target, lambda: HeadDrafter(heads[0][1], target, 2, 1024, device, dtype)) for name in trees]
    weights = list(filter(None, args.onnx_weights.split(",")))
    layouts = list(filter(None, args.onnx_layouts.split(",")))
    for name, m in onnx_models(folder, adapter, weights, layouts, scratch, layers).items():
        drafters += [(f"ours autoregressive, {name}", m, NoDrafter),
                     (f"ours speculative, n-gram, {name}", m, lambda m=m: NgramDrafter(m.args.vocab_size, device))]
        if m.hidden:  # the `ort` layout: the heads draft on its hidden states
            m.attach_draft_weights()
            drafters += [(f"{head_name}, {name}", m, lambda h=h, c=c, m=m: head_drafter(h, c, m))
                         for head_name, h, c in heads]
    for bits in filter(None, args.weights.split(",")):  # --dtype int8 / int4: the same engine on packed weights
        q = load_parts(folder, draft="none", device=device, dtype=bits, adapter=adapter)[0]
        drafters += [(f"ours autoregressive, {bits} weights", q, NoDrafter),
                     (f"ours speculative, n-gram, {bits} weights", q, lambda q=q: NgramDrafter(q.args.vocab_size,
                                                                                                device))]
        drafters += [(f"{name}, {bits} weights", q, lambda h=h, c=c, q=q: head_drafter(h, c, q))
                     for name, h, c in heads[:-1]]  # the trained head; the random one is measured on float weights
    graphs = torch.device(device).type == "cuda"
    llm = llama_cpp_model(model_path)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens)
    totals, same = {}, {}
    if args.compile:  # every target's decoder layers (float and packed) and heads share one forward's compile cache
        torch._dynamo.config.cache_size_limit = 64
    # one engine per implementation for every prompt, as a service keeps one: its draft policy carries over lines
    engines = {name: Engine(model, make(), None, device, max_batch=1, max_seq=1024, cuda_graphs=graphs,
                            compiled=args.compile, draft_tree=trees.get(name)) for name, model, make in drafters}
    for engine in engines.values():
        engine.capture_graphs(sampled=False)  # as a service does at start (none without graphs)
    for prompt in dev_prompts(AutoTokenizer.from_pretrained(folder), Path(args.corpus), args.prompts):
        timed: dict[str, list] = {**{name: [] for name in hf_models}, **{name: [] for name in engines}}
        if llm is not None:
            timed["llama.cpp (the GGUF" + (", no adapter)" if adapter else ")")] = []
        for repeat in range(args.repeats + 1):
            names = list(timed)  # rotated each round: no implementation always runs right after another
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                t0, first_at, stats = time.perf_counter(), None, None
                if name in engines:
                    tokens, first_at = engine_line(engines[name], prompt, params, str(repeat))
                    stats = engines[name].last_stats
                elif name.startswith("llama.cpp"):
                    tokens, first_at = llama_cpp_line(llm, prompt, args.new_tokens)
                    stats = RequestStats()
                else:
                    ids = torch.tensor([prompt], device=device)
                    tokens = hf_models[name].generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                                      pad_token_id=0)[0, len(prompt):].tolist()
                end = time.perf_counter()
                if repeat:  # round 0 is the warm-up
                    timed[name].append((end - t0, tokens, stats, end - first_at if first_at else None))
        for name, runs in timed.items():
            seconds = statistics.median(r[0] for r in runs)
            tokens, stats = runs[-1][1], runs[-1][2]
            result = (seconds, len(tokens), tokens)
            if stats is not None:
                result += (stats, statistics.median(r[3] for r in runs))
            totals.setdefault(name, []).append(result)
        for name, results in totals.items():
            same.setdefault(name, []).append(results[-1][2] == totals[plain_row(name)][-1][2])
    return summarize(totals, same)


def print_vs_llama_cpp(rows: list[dict]) -> None:
    """Issue 18's quantized target: tokens/s of our rows against llama.cpp's, per line and in the decode phase."""
    llama = next((r for r in rows if r["impl"].startswith("llama.cpp")), None)
    if llama is None:
        return
    print("\ntokens/s vs llama.cpp (line, decode):")
    for r in rows:
        if r["impl"].startswith("ours") and "decode_ms_per_token" in r:
            print(f"- {r['impl']}: {r['tokens_per_s'] / llama['tokens_per_s']:.2f}x, "
                  f"{llama['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x")


def print_table(title, rows):
    print(f"\n## {title}")
    print("| impl | ms/token | tokens/s | line ms | decode ms/token | acceptance | mean accepted len | vs transformers "
          "| vs our AR | decode vs our AR | same tokens as our AR |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["impl"] == "draft agreement":
            print(f"\ndraft model's argmax = target's over our greedy lines (teacher-forced): {r['agreement']:.3f} "
                  f"of {r['positions']} positions")
            continue
        dec = f"{r['decode_ms_per_token']:.3f}" if "decode_ms_per_token" in r else "-"
        dec_ar = r.get("decode_speedup_vs_ours_autoregressive")
        dec_ar = f"{dec_ar:.2f}x" if dec_ar is not None else "-"
        acc = f"{r['acceptance']:.2f}" if r.get("acceptance") is not None else "-"
        mal = f"{r['mean_accepted_length']:.2f}" if r.get("mean_accepted_length") else "-"
        vs = f"{r['speedup_vs_transformers']:.2f}x" if "speedup_vs_transformers" in r else "1.00x"
        vs_ar = f"{r['speedup_vs_ours_autoregressive']:.2f}x" if "speedup_vs_ours_autoregressive" in r else "-"
        print(f"| {r['impl']} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | {r['line_ms']:.1f} | {dec} | {acc} "
              f"| {mal} | {vs} | {vs_ar} | {dec_ar} | {r.get('same_tokens_as_ours_ar', '-')} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", default="small", help="comma-separated: small, 1b, 8b (empty for none)")
    ap.add_argument("--pair", default=None, help="trained target folder (its draft: --draft)")
    ap.add_argument("--draft", default="models/npc-draft")
    ap.add_argument("--head", default="models/npc-head" if Path("models/npc-head").is_dir() else "",
                    help="feature head folder for --pair (empty: none)")
    ap.add_argument("--model", default=None, help="an instruct base (folder or .gguf) on dev-split persona prompts")
    ap.add_argument("--adapter", default=None, help="--model's persona LoRA adapter")
    ap.add_argument("--model-head", default="", help="--model's feature head folder (a random head runs too)")
    ap.add_argument("--head-copies", default="on", choices=["on", "off", "on,off"],
                    help="--model-head with its copied drafts (HeadDrafter.copy_after) on, off, or a row each")
    ap.add_argument("--trees", default="", help="--model-head also drafting trees, comma-separated WIDTHxNODES shapes "
                    "(e.g. 4x16,6x24; the policy picks the depth)")
    ap.add_argument("--onnx-weights", default="", help="--model also through ONNX Runtime, comma-separated exports: "
                    "float, int8, int4 (e.g. int8,int4); plain and n-gram rows")
    ap.add_argument("--onnx-layouts", default="ort", help="export-onnx layouts for --onnx-weights, comma-separated: "
                    "ort (GroupQueryAttention, the fast CPU path), portable")
    ap.add_argument("--weights", default="", help="--model also on weight-only packed weights (--dtype int8 / int4), "
                    "comma-separated: int8, int4; rows for plain, n-gram and --model-head decoding")
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared" / "corpus"))
    ap.add_argument("--dtype", default="auto", help="weights and activations: auto (the engine's choice for --device), "
                    "float32, bfloat16, float16")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="--model on the CPU: our engines with compiled layers "
                    "(the warm-up round compiles)")
    ap.add_argument("--prompts", type=int, default=4, help="persona prompts for --pair and --model")
    ap.add_argument("--prompt-tokens", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ignore-stop", action="store_true", help="--pair lines run to --new-tokens past stop tokens")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = parse_dtype(args.dtype, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(header(args.device), f"dtype {dtype}, batch 1, greedy, {torch.get_num_threads()} threads")
    results = {}
    with torch.no_grad(), tempfile.TemporaryDirectory() as scratch:
        for shape in filter(None, args.shapes.split(",")):
            results[shape] = bench_shape(shape, args.device, dtype, args)
            print_table(f"{shape}: random weights, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens",
                        results[shape])
        if args.pair:
            results["pair"] = bench_pair(args.pair, args.draft, args.device, dtype, args)
            length = (f"{args.new_tokens} tokens each (stop tokens ignored)" if args.ignore_stop
                      else f"up to {args.new_tokens} tokens")
            print_table(f"trained pair {args.pair} + {args.draft}: {args.prompts} persona prompts, {length}",
                        results["pair"])
        if args.model:
            results["model"] = bench_base(args.model, args.adapter, args.model_head, args.device, dtype, args,
                                          Path(scratch))
            print_table(f"{args.model} + {args.adapter}: {args.prompts} dev-split persona prompts, "
                        f"{args.new_tokens} tokens each (stop tokens ignored)", results["model"])
            print_vs_llama_cpp(results["model"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
