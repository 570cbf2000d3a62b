"""`npc-engine train`: run the training stages in order, each one also runnable alone.

    npc-engine train                                   # everything, default config, on CUDA if present
    npc-engine train --config tiny --device cpu        # the small CPU pipeline the tests run
    npc-engine train --stages eval                     # re-measure the pair in models/
    npc-engine train --resume                          # after an interruption: skip finished stages,
                                                       # continue the current one from its checkpoint
    npc-engine train --base DIR --stages persona --budget-minutes 5
                                                       # the persona LoRA adapter on an instruct base
                                                       # (a model folder or .gguf), into --adapter-out
    npc-engine train --base FILE.gguf --adapter A --stages head --budget-minutes 10
                                                       # a feature head for that target, into --head-out

Without --stages, the embedded pair's stages run (PAIR_STAGES); `persona` runs when named.
"""
import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from npc_engine.cli.common import feature_layers

ROOT = Path(__file__).resolve().parents[2]
PAIR_STAGES = ["prepare", "tokenizer", "pretrain", "finetune", "distill", "head", "eval"]
STAGES = PAIR_STAGES + ["persona"]
TIMED_STAGES = ("pretrain", "finetune", "distill", "head", "persona")


def stage_inputs(args) -> dict[str, Path]:
    """What each stage reads, and so what must exist when it runs without the stage before it."""
    corpus = args.corpus / "npc-dialogue" / "train.jsonl"
    return {"tokenizer": args.work / "data" / "split.json", "pretrain": args.work / "tokens" / "counts.json",
            "finetune": args.work / "target-pretrained" / "config.json",
            "distill": args.out / "npc-target" / "config.json",
            "head": corpus if args.base is not None else args.out / "npc-target" / "config.json",
            "eval": args.out / "npc-draft" / "config.json", "persona": corpus}


def stage_outputs(args) -> dict[str, Path]:
    """Present once a stage has finished: `--resume` skips such stages."""
    return {"prepare": args.work / "data" / "split.json", "tokenizer": args.work / "tokens" / "counts.json",
            **{s: args.work / "stages" / f"{s}.json" for s in ("pretrain", "finetune", "distill", "head", "persona")},
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
    """`pretrain=3,finetune=1.5`: per-stage wall-clock budgets in minutes (0 = run max_steps); a bare number is
    every stage's budget."""
    try:
        return dict.fromkeys(TIMED_STAGES, float(value))
    except ValueError:
        pass
    out = {}
    for item in value.split(","):
        stage, _, minutes = item.partition("=")
        try:
            if stage not in TIMED_STAGES:
                raise ValueError
            out[stage] = float(minutes)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--budget-minutes takes MINUTES or STAGE=MINUTES for "
                                             f"{'/'.join(TIMED_STAGES)}, got {item!r}") from None
    return out


def add_train_parser(sub) -> argparse.ArgumentParser:
    from npc_engine.train.config import CONFIGS

    p = sub.add_parser("train", help="train the embedded target, draft model and feature head from the corpus")
    p.add_argument("--stages", type=parse_stages, default=PAIR_STAGES,
                   help=f"comma-separated subset of {','.join(STAGES)} (default: all but persona)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="default", help="model sizes and step counts")
    p.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus", help="training corpus folder")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "train", help="intermediate files and checkpoints")
    p.add_argument("--out", type=Path, default=ROOT / "models", help="gets npc-target/, npc-draft/ and npc-head/")
    p.add_argument("--personas", type=Path, default=ROOT / "personas", help="demo cast for the sample exchanges")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and initialisation")
    p.add_argument("--resume", action="store_true", help="skip finished stages and continue from checkpoints")
    p.add_argument("--budget-minutes", "--max-minutes", dest="max_minutes", type=parse_minutes, default={},
                   help="wall-clock budget per stage, e.g. 5 (every stage) or pretrain=3,finetune=1.5,persona=5")
    p.add_argument("--base", type=Path, default=None,
                   help="persona and head stages: the instruct base model, a Hugging Face folder or a .gguf file")
    p.add_argument("--adapter", type=Path, default=None,
                   help="head stage with --base: the persona LoRA adapter merged into the target the head drafts for")
    p.add_argument("--head-out", type=Path, default=ROOT / "runs" / "smollm2-npc-head",
                   help="head stage with --base: the feature-head folder written")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="head stage with --base: ids the head drafts over (default: the config's)")
    p.add_argument("--head-chats", type=int, default=None,
                   help="head stage with --base: Persona-Chat cuts the target continues (default: the config's)")
    p.add_argument("--head-samples", type=int, default=None,
                   help="head stage with --base: sampled continuations per NPC turn of the written conversations, "
                        "beside the greedy one (default: the config's)")
    p.add_argument("--feature-layers", type=feature_layers, default=None,
                   help="head stage with --base: the target layers whose outputs the head reads, comma-separated, "
                        "or last (default: about a sixth, two fifths, two thirds of the way up and the last)")
    p.add_argument("--adapter-out", type=Path, default=ROOT / "models" / "smollm2-npc-persona",
                   help="persona stage: the LoRA adapter folder written")
    p.add_argument("--epochs", type=int, default=None,
                   help="persona stage: passes over the data (default: the config's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="persona stage, and the head stage with --base: examples per step (default: the config's)")
    p.add_argument("--lr", type=float, default=None, help="persona stage: peak learning rate (default: the config's)")
    p.add_argument("--rank", type=int, default=None, help="persona stage: LoRA rank (default: the config's)")
    p.add_argument("--no-drills", dest="drills", action="store_false",
                   help="persona stage: train on the written conversations only (no fact/break/banned drills)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (default: the config's, else torch's)")
    p.set_defaults(func=cmd_train)
    return p


def cmd_train(args) -> int:
    import torch

    from npc_engine.loading import CheckpointError
    from npc_engine.train import data, feature_head, loop, persona, tokenizer
    from npc_engine.train import eval as evaluation
    from npc_engine.train.config import CONFIGS, with_minutes
    from npc_engine.train.data import CorpusError

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("npc-engine train: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.head_chats is not None and args.head_chats < 0:
        print(f"npc-engine train: error: --head-chats must be 0 or more, got {args.head_chats}", file=sys.stderr)
        return 2
    if args.head_samples is not None and args.head_samples < 0:
        print(f"npc-engine train: error: --head-samples must be 0 or more, got {args.head_samples}", file=sys.stderr)
        return 2
    if "persona" in args.stages and args.base is None:
        print("npc-engine train: error: the persona stage needs --base (an instruct model folder or .gguf)",
              file=sys.stderr)
        return 2
    config = with_minutes(CONFIGS[args.config], args.max_minutes)
    if args.base is not None and "head" in args.max_minutes:
        config = replace(config, base_head=replace(config.base_head, max_minutes=args.max_minutes["head"]))
    if args.base is not None and args.batch_size is not None:
        config = replace(config, base_head=replace(config.base_head, batch_size=args.batch_size))
    if args.draft_vocab is not None:
        config = replace(config, draft_vocab=args.draft_vocab)
    if args.head_chats is not None:
        config = replace(config, head_persona_chat=args.head_chats)
    if args.head_samples is not None:
        config = replace(config, head_samples=args.head_samples)
    if args.feature_layers is not None:
        config = replace(config, head_feature_layers=args.feature_layers)
    chosen = (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr), ("rank", args.rank),
              ("alpha", None if args.rank is None else 2 * args.rank), ("drills", None if args.drills else False))
    config = replace(config, persona=replace(config.persona, **{k: v for k, v in chosen if v is not None}))
    log = Log(args.work / "train.log")
    ctx = loop.Context(config=config, work=args.work, out=args.out, device=torch.device(args.device),
                       seed=args.seed, resume=args.resume, log=log)
    torch.set_float32_matmul_precision("high")
    threads = torch.get_num_threads()
    if args.device == "cpu" and (args.threads or config.cpu_threads):
        torch.set_num_threads(args.threads or config.cpu_threads)
    inputs, outputs = stage_inputs(args), stage_outputs(args)
    runners = {
        "prepare": lambda: data.prepare(args.corpus, args.work, config, log),
        "tokenizer": lambda: tokenizer.encode_corpus(
            args.work,
            tokenizer.train_tokenizer(args.work, config.vocab_size, config.tokenizer_sample_chars, log), log),
        "pretrain": lambda: loop.pretrain(ctx),
        "finetune": lambda: loop.finetune(ctx),
        "distill": lambda: loop.distill(ctx),
        "head": lambda: (feature_head.train_head(ctx) if args.base is None else
                         feature_head.train_base_head(ctx, args.base, args.adapter, args.corpus, args.head_out)),
        "eval": lambda: evaluation.evaluate(ctx, args.personas),
        "persona": lambda: persona.train_persona(ctx, args.base, args.corpus, args.adapter_out),
    }
    log(f"train: config {config.name}, stages {','.join(args.stages)}, device {args.device}, seed {args.seed}")
    try:
        for stage in args.stages:
            if args.resume and outputs[stage].is_file():
                log(f"{stage}: already done, skipped")
                continue
            if stage in inputs and not inputs[stage].is_file():
                fix = "check --corpus" if stage == "persona" else f"run stage {STAGES[STAGES.index(stage) - 1]} first"
                raise FileNotFoundError(f"stage {stage} needs {inputs[stage]}: {fix}")
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
