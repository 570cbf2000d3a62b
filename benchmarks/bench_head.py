"""Feature heads for an instruct base (+ adapter), without the noise of a full benchmark round:

- agreement: teacher-forced, how often a head's argmax is the target's greedy token over the target's own 40-token
  continuations of dev-split prompts (and of a few training prompts: a head that learned its data, not its target,
  agrees far more there);
- --k-sweep: the engine decoding those prompts (batch 1, greedy, 40 tokens past any stop) with the head at each fixed
  draft length K: decode ms/token, the head's drafting ms per emitted token, tokens per step and the rest of a
  step (the target's verification and the engine's host work).

    python benchmarks/bench_head.py --model models/base/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --adapter models/smollm2-npc-persona --heads runs/smollm2-npc-head --dev 16
    python benchmarks/bench_head.py --heads runs/smollm2-npc-head --k-sweep 0,1,2,4 --dtype bfloat16 --dev 2
    python benchmarks/bench_head.py --model EXPORT --adapter "" --heads HEAD --k-sweep 0,4,auto --copies on,off
    python benchmarks/bench_head.py --heads HEAD --k-sweep 0,2,4,6 --device cuda --dtype bfloat16 --tree 6,24 --dev 4
"""
import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_decode import dev_prompts  # noqa: E402
from npc_engine.drafters import HeadDrafter  # noqa: E402
from npc_engine.engine import Engine  # noqa: E402
from npc_engine.engine.load import load_parts  # noqa: E402
from npc_engine.engine.trees import TreeShape  # noqa: E402
from npc_engine.head import load_head  # noqa: E402
from npc_engine.loading import load_model  # noqa: E402
from npc_engine.paths import resolve_model  # noqa: E402
from npc_engine.sampling import SamplingParams  # noqa: E402
from npc_engine.train.feature_head import greedy_replies, reply_prompts  # noqa: E402
from npc_engine.train.npc_dialogue import train_examples  # noqa: E402


def agreement(target, head, prompts: list[list[int]], replies: list[list[int]]) -> tuple[int, int]:
    """(positions where the head's argmax is the target's greedy token, positions) over the replies."""
    hits = total = 0
    for prompt, reply in zip(prompts, replies):
        x = torch.tensor([prompt + reply])
        features, stored = target.layer_features(x, torch.arange(x.shape[1])[None], head.feature_layers)
        greedy = target.lm_head(target.model.norm(features))[0, len(prompt) - 1:-1].argmax(-1)
        assert greedy.tolist() == reply, "the target's argmax must be its greedy reply"
        before = F.pad(head.target_features(stored)[:, :-1], (0, 0, 1, 0))
        mine = head.logits(target, head(target, x, before))[0, len(prompt) - 1:-1].argmax(-1)
        hits, total = hits + int((mine == greedy).sum()), total + len(reply)
    return hits, total


def k_sweep(model, adapter, head_dir, dtype, prompts, ks, new_tokens, device: str, tree: TreeShape | None,
            copies: list[bool]):
    target, drafter, _, device = load_parts(model, draft=head_dir, device=device, dtype=dtype, adapter=adapter)
    assert isinstance(drafter, HeadDrafter)
    drafting = []
    graphed = torch.device(device).type == "cuda"  # a graphed step drafts inside its graph: not timed apart

    def timed(draft):
        def timed_draft(*args, **kwargs):
            t0 = time.perf_counter()
            out = draft(*args, **kwargs)
            drafting.append(time.perf_counter() - t0)
            return out
        return timed_draft

    if not graphed:
        drafter.draft, drafter.draft_tree = timed(drafter.draft), timed(drafter.draft_tree)
    params = SamplingParams(temperature=0, max_tokens=new_tokens)
    shape = f" (tree {tree.width},{tree.nodes})" if tree else ""
    rest = "a step, ms" if graphed else "rest of a step, ms"
    print(f"| K{shape} | copies | decode ms/token | drafting ms per token | tokens per step | {rest} |")
    print("|---|---|---|---|---|---|")
    for k, copy in itertools.product(ks, copies):
        if tree is not None and k and not tree.fits(k) or k == 0 and copy != copies[0]:  # K = 0 drafts nothing
            continue
        drafter.copies = copy
        engine = Engine(target, drafter, None, device, max_batch=1, max_seq=1024, cuda_graphs=graphed, fixed_k=k,
                        draft_tree=None if k == 0 else tree)
        rounds = []
        for _ in range(2):  # the first round warms up
            decode = tokens = steps = 0
            drafting.clear()
            for prompt in prompts:
                engine.submit("line", prompt, params)
                first, n = None, 0
                while engine.has_work():
                    events = engine.step()
                    n += sum(len(e.token_ids) for e in events)
                    steps += first is not None
                    first = first or (time.perf_counter() if n else None)
                decode, tokens = decode + time.perf_counter() - first, tokens + n - 1
            rounds.append((decode, tokens, steps, sum(drafting)))
        decode, tokens, steps, drafted = rounds[-1]
        draft_ms = "-" if graphed else f"{drafted / tokens * 1e3:.2f}"
        copied = "-" if k == 0 or tree else "on" if copy else "off"
        print(f"| {'auto' if k is None else k} | {copied} | {decode / tokens * 1e3:.3f} | {draft_ms} | "
              f"{tokens / steps:.2f} | {(decode - drafted) / steps * 1e3:.3f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/base/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--adapter", default="models/smollm2-npc-persona",
                    help="the target's PEFT adapter; \"\" for none (an ONNX export holds it merged)")
    ap.add_argument("--heads", required=True, help="comma-separated feature-head folders")
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared" / "corpus"))
    ap.add_argument("--dev", type=int, default=16, help="dev-split prompts (their last NPC turn)")
    ap.add_argument("--train", type=int, default=2, help="training-split prompts for the agreement")
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k-sweep", default="", help="comma-separated draft lengths: time the first head at each "
                    "(auto: the engine's policy, one engine over both rounds)")
    ap.add_argument("--dtype", default="float32", help="--k-sweep's target dtype (float32, bfloat16, int4, ...)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="--k-sweep's device (cuda: fused kernels and CUDA graphs, drafting not timed apart)")
    ap.add_argument("--copies", default="on", choices=["on", "off", "on,off"],
                    help="--k-sweep with the head's copied drafts (HeadDrafter.copy_after) on, off or each in turn")
    ap.add_argument("--tree", type=TreeShape.parse, default=None,
                    help="--k-sweep drafts trees of this shape, WIDTH,NODES (K: the depth; depths it cannot reach "
                         "are skipped)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    folder = resolve_model(Path(args.model))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    corpus = Path(args.corpus)
    dev = dev_prompts(tokenizer, corpus, args.dev)
    heads = args.heads.split(",")
    print(f"# {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.threads} threads, {args.model} + "
          f"{args.adapter}")
    if args.k_sweep:
        ks = [None if k == "auto" else int(k) for k in args.k_sweep.split(",")]
        k_sweep(args.model, args.adapter or None, heads[0], args.dtype, dev, ks, args.new_tokens, args.device,
                args.tree, [c == "on" for c in args.copies.split(",")])
        return 0
    train = reply_prompts(tokenizer, train_examples(corpus)[:4 * args.train], 448, last_only=True)[:args.train]
    target = load_model(folder, "cpu", torch.float32, adapter=args.adapter)
    with torch.no_grad():
        replies = {name: greedy_replies(target, prompts, args.new_tokens, 0, torch.device("cpu"), print)
                   for name, prompts in (("dev", dev), ("train", train))}
        print("| head | dev agreement | training agreement |\n|---|---|---|")
        for head_dir in heads:
            head = load_head(head_dir, target, "cpu", torch.float32)
            cells = []
            for name, prompts in (("dev", dev), ("train", train)):
                hits, total = agreement(target, head, prompts, replies[name])
                cells.append(f"{hits / total:.3f} ({hits}/{total})")
            print(f"| {head_dir} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
