"""`npc-engine eval`: the voice on the npc-dialogue dev split (see npc_engine/train/voice_eval.py)."""
import argparse
from pathlib import Path

from npc_engine.cli.common import DTYPE_HELP, check_device, voice_args

ROOT = Path(__file__).resolve().parents[2]


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="measure a model's persona voice on the npc-dialogue dev split (greedy)")
    p.add_argument("--model", default=None,
                   help="model folder or .gguf file (default: the default voice, with its persona adapter)")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder merged at load (default: none with "
                                                   "--model)")
    p.add_argument("--limit", type=int, default=None, help="at most N questions of each kind (default: all)")
    p.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus", help="the corpus folder")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "eval", help="gets samples.jsonl and metrics.json")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--max-tokens", type=int, default=48, help="reply tokens at most")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    from npc_engine.train.voice_eval import evaluate, table

    model, adapter = voice_args(args.model, args.adapter)
    metrics = evaluate(model, adapter, args.corpus, args.out, args.limit, args.device, args.dtype, args.max_tokens)
    label = Path(model).name + (f" + {Path(adapter).name}" if adapter else "")
    print(table(metrics, label))
    print(f"samples: {args.out / 'samples.jsonl'}  metrics: {args.out / 'metrics.json'} ({metrics['seconds']} s)")
    return 0
