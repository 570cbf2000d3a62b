"""Stage `head`: the feature-head drafter (npc_engine.head) trained on the finished target's hidden states.

Loss per position: KL(target || head) between the next-token distributions (the head's through the target's
own norm and output head) plus PULL_WEIGHT times a smooth-L1 pull of the predicted feature toward the target's,
both RMS-normalized first. The raw features are large (SmolLM2-135M: norm about 900, per-dimension RMS 23, one
dimension at 528): a raw pull measured about 12 per position against a KL of 1 to 2 and swamped it, while the
logits (through the final norm) and the head's next input (through its feature norm) never see a feature's scale.
Each batch runs twice: teacher-forced on the target's features, then fed the head's own predictions one position
back, as drafting feeds it from the second draft on (the second pass's input is detached). Same data mix and mask
as `distill`.
"""
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from npc_engine.drafters import K_MAX, NoDrafter
from npc_engine.engine import Engine
from npc_engine.engine.prefill import PREFILL_CHUNK
from npc_engine.head import (
    FeatureHead,
    default_feature_layers,
    feature_layers_problem,
    head_args,
    head_logits,
    save_head,
)
from npc_engine.loading import load_model
from npc_engine.model import Transformer, compile_layers
from npc_engine.paths import resolve_model
from npc_engine.prompt import Turn, chat_messages
from npc_engine.sampling import SamplingParams
from npc_engine.tokenizer import Tokenizer
from npc_engine.train.batches import MixedSampler
from npc_engine.train.data import persona_chat_examples, read_persona_chat
from npc_engine.train.loop import Context, conversation_pools, count_params, mix_shares, record, train
from npc_engine.train.npc_dialogue import Example, prompt_persona, train_examples
from npc_engine.train.persona import encode, render

PULL_WEIGHT = 1.0


def head_loss(target: Transformer):
    def logits(features: torch.Tensor) -> torch.Tensor:
        return head_logits(target, features).float()
    return features_loss(target, logits)


def features_loss(target: Transformer, logits):
    """The loss on the target's features of each batch; logits(features) -> the next-token logits both sides use."""
    def loss(head: FeatureHead, x, y, m):
        positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
        with torch.no_grad():
            features, stored = target.layer_features(x, positions, head.feature_layers)
        return two_pass_loss(head, target, x, features, m, logits, stored)
    return loss


def two_pass_loss(head: FeatureHead, target: Transformer, x: torch.Tensor, features: torch.Tensor, m: torch.Tensor,
                  logits, stored: torch.Tensor, pull_weight: float = PULL_WEIGHT) -> torch.Tensor:
    """Mean over the two passes and the masked positions of KL(target || head) + pull_weight * the pull. features:
    the target's last layer's output; stored: what its feature store holds for the head (Transformer.layer_features)."""
    kept = m > 0  # logits only where the loss looks: the output projection is most of a step's work
    with torch.no_grad():
        teacher = F.log_softmax(logits(features[kept]), dim=-1)
        goal = unit_rms(features[kept])
    before = F.pad(head.target_features(stored)[:, :-1], (0, 0, 1, 0))  # zeros before position 0
    weight, total = m.sum().clamp(min=1), 0.0
    for _ in range(2):
        predicted = head(target, x, before)
        mine = predicted[kept]
        kl = F.kl_div(F.log_softmax(logits(mine), dim=-1), teacher, log_target=True, reduction="none").sum(-1)
        pull = F.smooth_l1_loss(unit_rms(mine), goal, reduction="none").mean(-1)
        total = total + ((kl + pull_weight * pull) * m[kept]).sum() / weight
        before = F.pad(predicted[:, :-1].detach(), (0, 0, 1, 0))
    return total / 2


def unit_rms(features: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(features.float(), (features.shape[-1],))


def train_head(ctx: Context) -> dict:
    stage = ctx.config.head
    target = load_model(ctx.out / "npc-target", ctx.device, torch.float32)
    if stage.compile and ctx.device.type == "cuda":
        compile_layers(target)
    torch.manual_seed(ctx.seed + 3)
    head = FeatureHead(head_args(target.args)).to(ctx.device)
    torch.nn.init.normal_(head.fc.weight, 0.0, 0.02)
    ctx.log(f"head: {count_params(head):,} parameters on the target's features")
    sampler = MixedSampler(conversation_pools(ctx.work, stage.block_size), mix_shares(ctx.config), stage.batch_size,
                           stage.block_size, ctx.seed + 3, ctx.device)
    info = train("head", head, head_loss(target), sampler, stage, ctx)
    save_head(head, ctx.out / "npc-head", target_name="npc-target")
    return record(ctx, "head", {**info, "parameters": count_params(head)})


# ---------------------------------------------------------------- a head for any Llama-family target (`--base`)

def subset_loss(target: Transformer, draft_ids: torch.Tensor):
    """head_loss with both distributions taken over the draft vocabulary only (the teacher's renormalised there):
    the head can only ever propose those ids, and the output projection shrinks to their rows."""
    rows = target.lm_head.weight[draft_ids].detach()

    def logits(features: torch.Tensor) -> torch.Tensor:
        return F.linear(target.model.norm(features.to(rows.dtype)), rows).float()
    return features_loss(target, logits)


class RowSampler:
    """Batches of whole rows (token ids, loss mask), drawn uniformly with a seeded generator, right-padded to the
    longest row of the batch: (x, y, mask of y) as `train` expects."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], batch_size: int, block_size: int, seed: int,
                 device: torch.device):
        self.rows, self.block_size, self.device = rows, block_size, device
        self.counts = {"rows": batch_size}
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        picks = torch.randint(len(self.rows), (self.counts["rows"],), generator=self.generator).tolist()
        chosen = [self.rows[i] for i in picks]
        width = max(len(ids) for ids, _ in chosen)
        tokens, mask = torch.zeros(len(chosen), width, dtype=torch.long), torch.zeros(len(chosen), width)
        for b, (ids, m) in enumerate(chosen):
            tokens[b, :len(ids)], mask[b, :len(m)] = torch.tensor(ids), torch.tensor(m, dtype=torch.float)
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        return tokens[:, :-1], tokens[:, 1:], mask[:, 1:]


def reply_prompts(tokenizer, examples: list[Example], max_len: int, last_only: bool = False) -> list[list[int]]:
    """Each example up to each of its NPC messages (the head drafts every NPC turn of a conversation), or with
    last_only up to its last, in the base's chat template with the generation prompt."""
    prompts = []
    for ex in examples:
        messages = chat_messages(ex.persona, ex.turns, ex.scene)
        npc_turns = [i for i, msg in enumerate(messages) if msg["role"] == "assistant"]
        for i in npc_turns[-1:] if last_only else npc_turns:
            ids = tokenizer(render(tokenizer, messages[:i], True), add_special_tokens=False)["input_ids"]
            if len(ids) <= max_len:
                prompts.append(ids)
    return prompts


def target_replies(target: Transformer, prompts: list[list[int]], params: SamplingParams, seconds: float,
                   device: torch.device, log, label: str = "greedy") -> list[list[int]]:
    """The target's continuation of each prompt under params (max_tokens long past any end of turn, as a benchmark
    line runs; what follows an NPC's turn is the target's own text too), batched, until `seconds` have passed (0:
    all of them). A seeded params.seed gives prompt i the seed params.seed + i."""
    batch = 32 if device.type == "cuda" else 8
    longest = max(len(p) for p in prompts) + params.max_tokens
    engine = Engine(target, NoDrafter(), None, device, max_batch=batch, prefix_cache_mb=0,
                    max_seq=longest + K_MAX + PREFILL_CHUNK + 2)  # Engine.max_prompt_len's margin
    replies, start = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        out = {}
        for j, prompt in enumerate(prompts[i:i + batch]):
            seed = None if params.seed is None else params.seed + i + j
            engine.submit(str(j), prompt, replace(params, seed=seed))
            out[str(j)] = []
        while engine.has_work():
            for ev in engine.step():
                out[ev.rid] += ev.token_ids
        replies += [out[str(j)] for j in range(len(out))]
        if seconds and time.perf_counter() - start > seconds:
            break
        if (i // batch) % 8 == 7:
            log(f"head: {len(replies)}/{len(prompts)} {label} replies, {time.perf_counter() - start:.0f} s")
    return replies


def greedy_replies(target: Transformer, prompts: list[list[int]], max_tokens: int, seconds: float,
                   device: torch.device, log) -> list[list[int]]:
    return target_replies(target, prompts, SamplingParams(temperature=0, max_tokens=max_tokens), seconds, device, log)


def persona_chat_head_examples(corpus: Path, n: int, seed: int) -> list[Example]:
    """n seeded Persona-Chat cuts (a conversation, in either role, up to one of its NPC turns; no cut twice):
    everyday talk in the npc-dialogue layout. On the written NPC conversations alone a head learned their replies,
    not its target: it agreed with the target's greedy choice on 0.95 of the tokens of training replies and 0.66 of
    dev replies (head K, teacher-forced, benchmarks/README.md, "Feature heads for SmolLM2")."""
    records = [e for row in read_persona_chat(corpus) for e in persona_chat_examples(row)]
    cuts = [(i, j + 1) for i, r in enumerate(records) for j, (speaker, _) in enumerate(r["turns"]) if speaker == "npc"]
    chosen = []
    for c in torch.randperm(len(cuts), generator=torch.Generator().manual_seed(seed))[:n].tolist():
        i, end = cuts[c]
        turns = [Turn(speaker, text) for speaker, text in records[i]["turns"][:end]]
        chosen.append(Example(prompt_persona(records[i]["persona"]), turns, None,
                              [("", None)] * sum(t.speaker == "npc" for t in turns)))
    return chosen


def draft_vocabulary(replies: list[list[int]], rows: list[tuple[list[int], list[int]]], n: int,
                     always: list[int]) -> torch.Tensor:
    """The n most frequent tokens of the target's greedy replies, then of the NPC lines it was tuned on (to fill n
    when the replies use fewer distinct tokens), plus its stop tokens; sorted by id."""
    first, second = Counter(t for r in replies for t in r), Counter()
    for ids, m in rows:
        second.update(t for t, keep in zip(ids, m) if keep)
    chosen = dict.fromkeys(always)
    for counts in (first, second):
        for t, _ in counts.most_common():
            if len(chosen) >= n:
                break
            chosen.setdefault(t)
    return torch.tensor(sorted(chosen)[:max(n, len(always))], dtype=torch.long)


def train_base_head(ctx: Context, base: Path, adapter: Path | None, corpus: Path, out: Path) -> dict:
    """The feature head of an instruct base (+ its persona adapter): trained on the npc-dialogue corpus's training
    split and `head_persona_chat` Persona-Chat cuts rendered in the base's chat template (NPC turns in the
    loss) and on the target's own greedy continuations at their NPC turns, drafting over the config's
    `draft_vocab` most frequent ids of the target's outputs."""
    from transformers import AutoTokenizer

    began = time.perf_counter()
    stage, cfg = ctx.config.base_head, ctx.config
    folder = resolve_model(base)
    target = load_model(folder, ctx.device, torch.float32, adapter=adapter)
    hf_tok, tokenizer = AutoTokenizer.from_pretrained(folder), Tokenizer.from_dir(folder)
    examples = train_examples(corpus)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(ctx.seed + 3)).tolist()
    examples = [examples[i] for i in order]
    chats = persona_chat_head_examples(corpus, cfg.head_persona_chat, ctx.seed + 3)
    rows = [r for r in (encode(hf_tok, ex, stage.block_size + 1) for ex in examples + chats) if sum(r[1])]
    max_prompt = stage.block_size + 1 - cfg.head_reply_tokens
    npc_prompts = reply_prompts(hf_tok, examples[:cfg.head_replies], max_prompt)
    prompts = npc_prompts + reply_prompts(hf_tok, chats, max_prompt, last_only=True)
    ctx.log(f"head: target {base}{f' + {adapter}' if adapter else ''}, {len(rows)} corpus rows ({len(chats)} from "
            f"Persona-Chat); greedy replies to {len(prompts)} prompts, {cfg.head_samples} sampled at temperature "
            f"{cfg.head_sample_temperature} to each of {len(npc_prompts)}, up to {cfg.head_reply_tokens} tokens")
    quarter = stage.max_minutes * 60 / 4
    with torch.no_grad():
        replies = greedy_replies(target, prompts, cfg.head_reply_tokens, quarter, ctx.device, ctx.log)
        sampled_prompts = npc_prompts * cfg.head_samples
        sampled = target_replies(target, sampled_prompts, SamplingParams(
            cfg.head_sample_temperature, max_tokens=cfg.head_reply_tokens, seed=ctx.seed + 7), quarter, ctx.device,
            ctx.log, "sampled") if sampled_prompts else []
    rows += [(p + r, [0] * len(p) + [1] * len(r))
             for p, r in [*zip(prompts, replies), *zip(sampled_prompts, sampled)] if r]
    # the draft vocabulary from greedy replies only: what the engine verifies greedy lines against
    draft_ids = draft_vocabulary(replies, rows, min(cfg.draft_vocab, target.args.vocab_size), tokenizer.stop_ids)
    ctx.log(f"head: {len(replies)} greedy replies, {sum(map(len, replies)):,} tokens; {len(sampled)} sampled, "
            f"{sum(map(len, sampled)):,} tokens; draft vocabulary {len(draft_ids):,} of {target.args.vocab_size:,} ids")
    layers = (default_feature_layers(target.args.n_layers) if cfg.head_feature_layers is None
              else cfg.head_feature_layers)
    problem = feature_layers_problem(layers, target.args.n_layers)
    if problem:
        raise ValueError(f"--feature-layers: {problem}")
    torch.manual_seed(ctx.seed + 3)
    head = FeatureHead(head_args(target.args), draft_ids, feature_layers=layers).to(ctx.device)
    torch.nn.init.normal_(head.fc.weight, 0.0, 0.02)
    if layers:
        torch.nn.init.normal_(head.fuse.weight, 0.0, 0.02)
    ctx.log(f"head: {count_params(head):,} parameters on the outputs of target layers "
            f"{', '.join(map(str, layers)) if layers else 'last'}")
    sampler = RowSampler(rows, stage.batch_size, stage.block_size, ctx.seed + 3, ctx.device)
    # the budget is the stage's: an 8.4-minute stage on the GPU once overran it by its 99 s of loading and continuations
    info = train("head", head, subset_loss(target, draft_ids.to(ctx.device)), sampler, stage, ctx,
                 prepared_s=time.perf_counter() - began)
    save_head(head, out, target_name=str(base))
    extra = {"base": str(base), "adapter": str(adapter) if adapter else None, "draft_vocab": len(draft_ids),
             "feature_layers": list(layers),
             "replies": len(replies), "sampled_replies": len(sampled), "rows": len(rows), "persona_chat": len(chats)}
    (out / "training.json").write_text(json.dumps({**info, **extra}, indent=1) + "\n")
    return record(ctx, "head", {**info, **extra, "parameters": count_params(head)})
