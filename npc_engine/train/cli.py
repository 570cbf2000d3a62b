"""`npc-engine train`: run the training stages in order, each one also runnable alone.

    npc-engine train                                   # everything, default config, on CUDA if present
    npc-engine train --config tiny --device cpu        # the small CPU pipeline the tests run
    npc-engine train --stages eval                     # re-measure the pair in models/
    npc-engine train --resume                          # after an interruption: skip finished stages,
                                                       # continue the current one from its checkpoint
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["prepare", "tokenizer", "pretrain", "finetune", "distill", "head", "eval"]


def stage_inputs(args) -> dict[str, Path]:
    """What each stage reads, and so what must exist when it runs without the stage before it."""
    return {"tokenizer": args.work / "data" / "split.json", "pretrain": args.work / "tokens" / "counts.json",
            "finetune": args.work / "target-pretrained" / "config.json", "distill": args.out / "npc-target" / "config.json",
            "head": args.out / "npc-target" / "config.json",
            "eval": args.out / "npc-draft" / "config.json"}


def stage_outputs(args) -> dict[str, Path]:
    """Present once a stage has finished: `--resume` skips such stages."""
    return {"prepare": args.work / "data" / "split.json", "tokenizer": args.work / "tokens" / "counts.json",
            **{s: args.work / "stages" / f"{s}.json" for s in ("pretrain", "finetune", "distill", "head")},
            "eval": args.work / "metrics.json"}


class Log:
    """Timestamped lines to stdout and `<work>/train.log`."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def parse_stages(value: str) -> list[str]:
    stages = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    return [s for s in STAGES if s in stages]


def parse_minutes(value: str) -> dict[str, float]:
    """`pretrain=3,finetune=1.5`: per-stage wall-clock budgets in minutes (0 = run max_steps)."""
    out = {}
    for item in value.split(","):
        stage, _, minutes = item.partition("=")
        if stage not in ("pretrain", "finetune", "distill", "head") or not minutes:
            raise argparse.ArgumentTypeError(f"--max-minutes takes STAGE=MINUTES for pretrain/finetune/distill/head, "
                                             f"got {item!r}")
        out[stage] = float(minutes)
    return out


def add_train_parser(sub) -> argparse.ArgumentParser:
    from npc_engine.train.config import CONFIGS

    p = sub.add_parser("train", help="train the embedded target, draft model and feature head from the corpus")
    p.add_argument("--stages", type=parse_stages, default=STAGES, help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--config", choices=sorted(CONFIGS), default="default")
    p.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "train", help="intermediate files and checkpoints")
    p.add_argument("--out", type=Path, default=ROOT / "models", help="gets npc-target/, npc-draft/ and npc-head/")
    p.add_argument("--personas", type=Path, default=ROOT / "personas", help="demo cast for the sample exchanges")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="skip finished stages and continue from checkpoints")
    p.add_argument("--max-minutes", type=parse_minutes, default={}, help="e.g. pretrain=3,finetune=1.5,distill=1.5")
    p.set_defaults(func=cmd_train)
    return p


def cmd_train(args) -> int:
    import torch

    from npc_engine.loading import CheckpointError
    from npc_engine.train import data, eval as evaluation, feature_head, loop, tokenizer
    from npc_engine.train.config import CONFIGS, with_minutes
    from npc_engine.train.data import CorpusError

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("npc-engine train: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    config = with_minutes(CONFIGS[args.config], args.max_minutes)
    log = Log(args.work / "train.log")
    ctx = loop.Context(config=config, work=args.work, out=args.out, device=torch.device(args.device),
                       seed=args.seed, resume=args.resume, log=log)
    torch.set_float32_matmul_precision("high")
    threads = torch.get_num_threads()
    if args.device == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    inputs, outputs = stage_inputs(args), stage_outputs(args)
    runners = {
        "prepare": lambda: data.prepare(args.corpus, args.work, config, log),
        "tokenizer": lambda: tokenizer.encode_corpus(
            args.work, tokenizer.train_tokenizer(args.work, config.vocab_size, config.tokenizer_sample_chars, log), log),
        "pretrain": lambda: loop.pretrain(ctx),
        "finetune": lambda: loop.finetune(ctx),
        "distill": lambda: loop.distill(ctx),
        "head": lambda: feature_head.train_head(ctx),
        "eval": lambda: evaluation.evaluate(ctx, args.personas),
    }
    log(f"train: config {config.name}, stages {','.join(args.stages)}, device {args.device}, seed {args.seed}")
    try:
        for stage in args.stages:
            if args.resume and outputs[stage].is_file():
                log(f"{stage}: already done, skipped")
                continue
            if stage in inputs and not inputs[stage].is_file():
                before = STAGES[STAGES.index(stage) - 1]
                raise FileNotFoundError(f"stage {stage} needs {inputs[stage]}: run stage {before} first")
            outputs[stage].unlink(missing_ok=True)
            t0 = time.perf_counter()
            result = runners[stage]()
            log(f"{stage}: done in {time.perf_counter() - t0:.1f} s")
            if stage == "eval":
                log("metrics: " + json.dumps({k: result[k] for k in ("perplexity", "acceptance")}))
    except (CorpusError, CheckpointError, FileNotFoundError, ValueError) as e:
        log(f"error: {e}")
        print(f"npc-engine train: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npc-engine")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
