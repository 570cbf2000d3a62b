"""`npc-engine generate`: stream a continuation of a raw prompt."""
import argparse
import sys

from npc_engine.cli.common import add_model_args, check_device, parse_k


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="stream a continuation of a prompt")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="raw text to continue (no persona or chat template is applied)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 turns it off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 turns it off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one each run)")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--k", type=parse_k, default=None, help="draft length 0..16 or 'auto' (default: auto)")
    p.add_argument("--ids", action="store_true", help="print generated token ids instead of text")
    p.add_argument("--stats", action="store_true", help="print speculation stats to stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    from npc_engine.engine import Engine
    from npc_engine.sampling import SamplingParams
    from npc_engine.tokenizer import IncrementalDecoder

    engine = Engine.load(args.model, args.draft, args.device, args.dtype, backend=args.backend,
                         onnx_provider=args.onnx_provider, fixed_k=args.k, adapter=args.adapter,
                         compiled=args.compile, draft_tree=args.draft_tree)
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
