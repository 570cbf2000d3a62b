"""`npc-engine` command line: one subcommand per job; each sets `func` to the function that runs it."""
import argparse
import json
import statistics
import sys
import time

from npc_engine.cards import cmd_persona_import
from npc_engine.chat import cmd_chat
from npc_engine.persona import cmd_persona_check

DEFAULT_MODEL = "models/npc-target"


def add_model_args(p: argparse.ArgumentParser, model_default: str | None = DEFAULT_MODEL) -> None:
    p.add_argument("--model", default=model_default, required=model_default is None, help="Hugging Face layout model folder")
    p.add_argument("--draft", default="auto", help="draft model folder, feature-head folder, 'ngram', 'none' or 'auto' (default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 (default: bfloat16 on cuda, float32 on cpu), or fp8: e4m3 target weights, activations in the default")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"],
                   help="torch, onnx (model folders made by export-onnx) or auto (default: onnx when --model holds an export)")
    p.add_argument("--onnx-provider", default=None, choices=["cpu", "cuda", "auto"],
                   help="ONNX Runtime provider (default: --device; auto: CUDA when usable, else CPU)")


def parse_k(value: str) -> int | None:
    if value == "auto":
        return None
    k = int(value)
    if not 0 <= k <= 16:
        raise argparse.ArgumentTypeError("--k must be 0..16 or 'auto'")
    return k


def cmd_generate(args) -> int:
    from npc_engine.engine import Engine
    from npc_engine.sampling import SamplingParams
    from npc_engine.tokenizer import IncrementalDecoder

    engine = Engine.load(args.model, args.draft, args.device, args.dtype, backend=args.backend,
                         onnx_provider=args.onnx_provider, fixed_k=args.k)
    params = SamplingParams(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, max_tokens=args.max_tokens)
    prompt = engine.tokenizer.encode(args.prompt)
    decoder = IncrementalDecoder(engine.tokenizer)
    ids = []
    for token in engine.generate(prompt, params):
        ids.append(token)
        if not args.ids:
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()
    print(" ".join(map(str, ids)) if args.ids else "")
    if args.stats:
        s = engine.last_stats
        print(f"drafted={s.drafted} accepted={s.accepted} target_forwards={s.target_forwards} "
              f"mean_accepted={s.mean_accepted:.2f}", file=sys.stderr)
    return 0


def run_bench(engine, prompt: list[int], params, repeats: int) -> dict:
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


def cmd_bench(args) -> int:
    from npc_engine.engine import Engine
    from npc_engine.sampling import SamplingParams

    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
    rows = []
    for draft in ("none", args.draft) if args.draft != "none" else ("none",):
        engine = Engine.load(args.model, draft, args.device, args.dtype, backend=args.backend,
                             onnx_provider=args.onnx_provider, fixed_k=args.k)
        engine.capture_graphs(sampled=args.temperature > 0)  # graph captures stay out of the timed runs
        prompt = engine.tokenizer.encode(args.prompt)
        rows.append(run_bench(engine, prompt, params, args.repeats))
    for row in rows:
        row["speedup_vs_autoregressive"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'drafter':>8} {'tokens/s':>10} {'acceptance':>10} {'mean acc len':>12} {'speedup':>8}")
        for r in rows:
            print(f"{r['drafter']:>8} {r['tokens_per_s']:>10.1f} {r['acceptance']:>10.2f} "
                  f"{r['mean_accepted_length']:>12.2f} {r['speedup_vs_autoregressive']:>7.2f}x")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npc-engine", description="Persona-conditioned NPC dialogue engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="stream a continuation of a prompt")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--k", type=parse_k, default=None, help="draft length 0..16 or 'auto' (default)")
    p.add_argument("--ids", action="store_true", help="print generated token ids instead of text")
    p.add_argument("--stats", action="store_true", help="print speculation stats to stderr")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="tokens/s, acceptance and speedup of a drafter over plain decoding")
    add_model_args(p)
    p.add_argument("--prompt", default="<|persona|>Name: Brom, blacksmith\n- I forge swords for the town guard.<|eot|>"
                                       "<|player|>What do you do here?<|eot|><|npc|>")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--k", type=parse_k, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("persona", help="validate persona files or import character cards")
    persona_sub = p.add_subparsers(dest="persona_command", required=True, metavar="ACTION")
    q = persona_sub.add_parser("check", help="validate persona files; exit 1 listing every problem")
    q.add_argument("paths", nargs="+", metavar="PATH", help="persona files or folders")
    q.set_defaults(func=cmd_persona_check)
    q = persona_sub.add_parser("import", help="convert a Character Card V2 (JSON or PNG) to a persona file")
    q.add_argument("card", help="card file (.json, or .png with a 'chara' chunk)")
    q.add_argument("-o", "--output", required=True, help="persona file to write, e.g. personas/aria.toml")
    q.add_argument("--id", default=None, help="persona id (default: the output file name)")
    q.set_defaults(func=cmd_persona_import)

    p = sub.add_parser("chat", help="talk to one NPC in the terminal")
    p.add_argument("--npc", required=True, help="persona id")
    p.add_argument("--personas", default="personas", help="persona folder (default: personas)")
    add_model_args(p)
    p.set_defaults(model=None)  # None: the persona's `model`, else the default model
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_chat)

    from npc_engine.service import add_subparsers as add_service_commands
    add_service_commands(sub)  # serve, say
    from npc_engine.onnx_export import add_subparser as add_export_onnx_command
    add_export_onnx_command(sub)
    from npc_engine.train.cli import add_train_parser
    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from npc_engine.loading import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, CheckpointError) as e:
        print(f"npc-engine {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
