"""Stages `pretrain` (target on books), `finetune` (target on conversations) and `distill` (draft
from the target's distribution), sharing one loop: AdamW, linear warmup then cosine decay, bf16
autocast and torch.compile on CUDA, a wall-clock budget, and resumable checkpoints.

Time budget: at each of CALIBRATE_AT steps the loop measures its step time since the mark before and
sets the schedule's length to the steps that fit the stage's budget (never more than max_steps), so the
LR decays fully however fast the machine is. The later marks matter on CUDA: compiled layers recompile for
each new batch width early on, and a head's steps 10-30 once measured 356 ms against 44-46 ms later, which
planned 828 steps where 7,998 fit. A stage with max_minutes = 0 runs exactly max_steps.

Determinism: the seed fixes initialisation and batch order, and a checkpoint stores the batch
generator, so a resumed CPU run ends bit for bit where an uninterrupted one does (tested). On CUDA,
kernel selection and a time budget (the step count follows the measured speed) can change results;
`--max-minutes pretrain=0,finetune=0,distill=0` fixes the step counts.

Finetune loss: only the NPC's tokens (its turns' text and closing <|eot|>) of conversation rows,
plus every token of the book-text rows mixed in. At serving time the model only ever writes NPC
turns after a given persona and history, so learning to predict the persona block or the player
spends capacity on text it never produces; the swapped-roles copy of every Persona-Chat dialogue
already makes both sides an NPC once. The book rows keep the language model from drifting.

Distill loss: KL(target || draft) over the next-token distributions at the same positions, on the
same mix. Matching the full distribution (not only the argmax) raises greedy and sampled acceptance.
"""
import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from npc_engine.loading import load_model, save_model
from npc_engine.model import ModelArgs, Transformer, compile_layers
from npc_engine.train.batches import (
    MixedSampler,
    Rows,
    conversation_windows,
    load_book_stream,
    load_conversations,
    pack,
)
from npc_engine.train.config import Shape, Stage, TrainConfig, eos_ids
from npc_engine.train.tokenizer import load_tokenizer

CALIBRATE_AT = (10, 30, 200, 1000)
BUDGET_SAFETY = 0.97


@dataclass
class Context:
    config: TrainConfig
    work: Path
    out: Path
    device: torch.device
    seed: int
    resume: bool
    log: Callable[[str], None]


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def new_model(shape: Shape, ctx: Context) -> Transformer:
    tok = load_tokenizer(ctx.work)
    if tok.get_vocab_size() > ctx.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, config vocab_size is {ctx.config.vocab_size}")
    args = ModelArgs.from_hf_config(shape.hf_config(ctx.config.vocab_size, eos_ids(tok.token_to_id)))
    model = Transformer(args)
    init_weights(model)
    return model.to(ctx.device)


def init_weights(model: Transformer) -> None:
    """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
    std = 0.02
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            torch.nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, 0.0, std / math.sqrt(2 * model.args.n_layers))
        elif name.endswith("weight"):
            torch.nn.init.normal_(p, 0.0, std)
        else:
            torch.nn.init.zeros_(p)


def count_params(model: Transformer) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied embedding is one Parameter, counted once


def lr_at(step: int, total: int, stage: Stage) -> float:
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    progress = min(1.0, (step - stage.warmup_steps) / max(1, total - stage.warmup_steps))
    return stage.lr * (stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: Transformer, stage: Stage, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=stage.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def progress_bar(total: int, initial: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, disable=None, dynamic_ncols=True)  # off when not a tty


def fall_back_to_eager(error: Exception, log) -> None:
    log(f"torch.compile failed ({type(error).__name__}: {error}); continuing without it")
    torch.compiler.set_stance("force_eager")


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(name: str, model: Transformer, loss_fn, sampler: MixedSampler, stage: Stage, ctx: Context,
          dev_loss=None, prepared_s: float = 0.0) -> dict:
    """Run one stage's optimisation; loss_fn(model, x, y, mask) -> scalar loss. With dev_loss
    (model -> float), the weights of the step with the lowest dev loss (checked every eval_every
    steps and at the end) are the ones kept. prepared_s: seconds the stage spent before its loop (loading, data),
    counted in its budget."""
    opt = make_optimizer(model, stage, ctx.device)
    ckpt = ctx.work / "ckpt" / f"{name}.pt"
    step, total, spent, best, dev_history = 0, stage.max_steps, prepared_s, None, []
    if ctx.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=ctx.device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.generator.set_state(state["generator"])
        step, total, spent, best, dev_history = (state[k] for k in ("step", "total", "seconds", "best", "dev_history"))
        ctx.log(f"{name}: resumed at step {step}/{total} ({spent:.0f} s spent)")
    compiled = stage.compile and ctx.device.type == "cuda"
    if compiled:
        compile_layers(model)
    budget = stage.max_minutes * 60
    start = time.perf_counter() - spent
    mark = None  # (step, time) of the last calibration mark
    history, bar = [], progress_bar(total, step, name)
    tokens_per_step = sampler.block_size * sum(sampler.counts.values())
    first_step = step
    while step < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, stage)
        x, y, m = sampler.batch()
        try:
            loss = optimisation_step(model, loss_fn, opt, x, y, m, stage, ctx.device)
        except Exception as e:  # a failed compile must not cost the run (backward compiles lazily: here)
            if not compiled:
                raise
            fall_back_to_eager(e, ctx.log)
            compiled = False
            opt.zero_grad(set_to_none=True)
            loss = optimisation_step(model, loss_fn, opt, x, y, m, stage, ctx.device)
        step += 1
        if bar is not None:
            bar.update(1)
        if step % stage.log_every == 0 or step == total or step == first_step + 1:
            value = loss.item()
            history.append((step, value))
            ctx.log(f"{name}: step {step}/{total} loss {value:.4f} lr {lr_at(step - 1, total, stage):.2e} "
                    f"{time.perf_counter() - start:.0f} s")
            if not math.isfinite(value):
                raise FloatingPointError(f"{name}: loss became {value} at step {step}")
        out_of_time = False
        if budget:
            at_mark = step - first_step in CALIBRATE_AT
            if ctx.device.type == "cuda" and at_mark:
                torch.cuda.synchronize()
            now = time.perf_counter()
            if at_mark and mark is not None:
                per_step = (now - mark[1]) / (step - mark[0])
                fit = step + int((budget * BUDGET_SAFETY - (now - start)) / per_step)
                total = max(step + 1, min(stage.max_steps, fit))
                ctx.log(f"{name}: {per_step * 1000:.1f} ms/step, {tokens_per_step / per_step:,.0f} tokens/s: "
                        f"schedule set to {total} steps")
                if bar is not None:
                    bar.total = total
            if at_mark:
                mark = (step, now)
            out_of_time = now - start > budget
        if dev_loss is not None and (step % stage.eval_every == 0 or step == total or out_of_time):
            value = dev_loss(model)
            dev_history.append((step, value))
            if best is None or value < best["loss"]:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = {"loss": value, "step": step, "state": state}
            ctx.log(f"{name}: step {step} dev loss {value:.4f} (best {best['loss']:.4f} at step {best['step']})")
        if out_of_time:
            ctx.log(f"{name}: time budget of {stage.max_minutes} min reached at step {step}")
            break
        if step % stage.ckpt_every == 0 and step < total:
            save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                   "total": total, "seconds": time.perf_counter() - start, "best": best,
                                   "dev_history": dev_history, "generator": sampler.generator.get_state()})
    if bar is not None:
        bar.close()
    info = {"steps": step, "planned_steps": total, "seconds": round(time.perf_counter() - start, 1),
            "tokens": step * tokens_per_step, "first_loss": history[0][1] if history else None,
            "last_loss": history[-1][1] if history else None, "loss_history": history}
    if best is not None:
        model.load_state_dict(best["state"])
        info.update(kept_step=best["step"], dev_loss=best["loss"], dev_history=dev_history)
    ckpt.unlink(missing_ok=True)
    return info


def optimisation_step(model, loss_fn, opt, x, y, m, stage: Stage, device) -> torch.Tensor:
    with autocast(device):
        loss = loss_fn(model, x, y, m)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def masked_cross_entropy(logits: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
    return (nll * m.flatten()).sum() / m.sum().clamp(min=1)


def cross_entropy_loss(model, x, y, m):
    return masked_cross_entropy(model(x), y, m)


def kl_loss(teacher: Transformer):
    def loss(model, x, y, m):
        with torch.no_grad():
            target = F.log_softmax(teacher(x).float(), dim=-1)
        draft = F.log_softmax(model(x).float(), dim=-1)
        kl = F.kl_div(draft, target, log_target=True, reduction="none").sum(-1)
        return (kl * m).sum() / m.sum().clamp(min=1)
    return loss


def conversation_pools(work: Path, block_size: int) -> dict:
    conv = load_conversations(work, "train")
    return {"persona_chat": pack(conversation_windows(conv, block_size, source=0), block_size),
            "book_dialogue": pack(conversation_windows(conv, block_size, source=1), block_size),
            "books": load_book_stream(work, "train")}


def mix_shares(config: TrainConfig) -> dict[str, float]:
    return {"persona_chat": config.mix.persona_chat, "book_dialogue": config.mix.book_dialogue,
            "books": 1.0 - config.mix.persona_chat - config.mix.book_dialogue}


def write_model(model: Transformer, path: Path, work: Path, dtype: torch.dtype) -> None:
    """The Hugging Face folder: config, safetensors shards (<= 15 MB), tokenizer, generation config."""
    tok = load_tokenizer(work)
    save_model(model, path, dtype=dtype, max_shard_mb=15,
               generation_config={"eos_token_id": eos_ids(tok.token_to_id), "pad_token_id": 0, "bos_token_id": None})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).write_bytes((work / "tokenizer" / name).read_bytes())


def record(ctx: Context, stage: str, info: dict) -> dict:
    (ctx.work / "stages").mkdir(parents=True, exist_ok=True)
    (ctx.work / "stages" / f"{stage}.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def pretrain(ctx: Context) -> dict:
    stage = ctx.config.pretrain
    torch.manual_seed(ctx.seed)
    model = new_model(ctx.config.target, ctx)
    ctx.log(f"pretrain: target {count_params(model):,} parameters")
    sampler = MixedSampler({"books": load_book_stream(ctx.work, "train")}, {"books": 1.0}, stage.batch_size,
                           stage.block_size, ctx.seed, ctx.device)
    info = train("pretrain", model, cross_entropy_loss, sampler, stage, ctx)
    write_model(model, ctx.work / "target-pretrained", ctx.work, torch.float32)
    return record(ctx, "pretrain", {**info, "parameters": count_params(model)})


@torch.no_grad()
def rows_loss(model: Transformer, rows: Rows, batch: int, device: torch.device) -> float:
    """Mean loss over the masked labels of packed rows (eager: no extra graphs for no_grad)."""
    total = weight = 0.0
    for i in range(0, len(rows), batch):
        tokens, mask = rows.tokens[i:i + batch].to(device), rows.mask[i:i + batch].to(device)
        with autocast(device), torch.compiler.set_stance("force_eager"):
            logits = model(tokens[:, :-1])
        n = mask[:, 1:].sum().item()
        total += masked_cross_entropy(logits, tokens[:, 1:], mask[:, 1:]).item() * n
        weight += n
    return total / max(weight, 1.0)


def finetune(ctx: Context) -> dict:
    stage = ctx.config.finetune
    torch.manual_seed(ctx.seed + 1)
    model = load_model(ctx.work / "target-pretrained", ctx.device, torch.float32).train().requires_grad_(True)
    sampler = MixedSampler(conversation_pools(ctx.work, stage.block_size), mix_shares(ctx.config), stage.batch_size,
                           stage.block_size, ctx.seed + 1, ctx.device)
    dev = pack(conversation_windows(load_conversations(ctx.work, "dev"), stage.block_size), stage.block_size)
    dev = Rows(dev.tokens[:ctx.config.dev_rows], dev.mask[:ctx.config.dev_rows])
    dev_loss = (lambda m: rows_loss(m, dev, stage.batch_size, ctx.device)) if len(dev) else None
    info = train("finetune", model, cross_entropy_loss, sampler, stage, ctx, dev_loss)
    write_model(model, ctx.out / "npc-target", ctx.work, torch.bfloat16)
    return record(ctx, "finetune", {**info, "parameters": count_params(model)})


def distill(ctx: Context) -> dict:
    stage = ctx.config.distill
    teacher = load_model(ctx.out / "npc-target", ctx.device, torch.float32)
    teacher.requires_grad_(False)
    if stage.compile and ctx.device.type == "cuda":
        compile_layers(teacher)
    torch.manual_seed(ctx.seed + 2)
    draft = new_model(ctx.config.draft, ctx)
    ctx.log(f"distill: draft {count_params(draft):,} parameters")
    sampler = MixedSampler(conversation_pools(ctx.work, stage.block_size), mix_shares(ctx.config), stage.batch_size,
                           stage.block_size, ctx.seed + 2, ctx.device)
    info = train("distill", draft, kl_loss(teacher), sampler, stage, ctx)
    write_model(draft, ctx.out / "npc-draft", ctx.work, torch.bfloat16)
    return record(ctx, "distill", {**info, "parameters": count_params(draft)})
