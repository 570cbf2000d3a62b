"""Stage `persona`: a LoRA adapter (PEFT format) on an instruct base, trained on the npc-dialogue corpus.

Each example (`npc_dialogue`: a conversation, or a scene from one speaker's seat) becomes the message list
of `npc_engine.prompt.chat_messages` - the persona as the system message, the same builder the service
uses - rendered with the base's own chat template. Every NPC line is written after its line header
(`npc_engine.grammar.with_header`: the corpus labels each line with an emotion and an action), so the adapter
learns to pick the header the service forces to the persona's lists. The loss covers the NPC's tokens only:
every assistant message's content and the template's end-of-turn token after it, found by rendering the
conversation up to each assistant message (with the generation prompt) and up to its end.

Seeded (epoch order and LoRA init from --seed), resumable (a checkpoint of the adapter and optimizer every
ckpt_every steps), bounded by a wall-clock budget: after a few steps the schedule is cut to the steps that fit.
Writes `adapter_config.json` + `adapter_model.safetensors` (bfloat16) and `training.json` to the adapter folder.
"""
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from npc_engine.grammar import with_header
from npc_engine.prompt import Turn, chat_messages
from npc_engine.train.config import PersonaStage
from npc_engine.train.drills import drills
from npc_engine.train.loop import Context, autocast, lr_at, save_checkpoint
from npc_engine.train.npc_dialogue import Example, read_split, train_examples

CALIBRATE_FROM, CALIBRATE_TO = 2, 6
BUDGET_SAFETY = 0.95


def load_base(base: Path, device: torch.device):
    """(tokenizer, model) of a Hugging Face folder, or of a .gguf file through transformers' GGUF loading."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, extra = (base.parent, {"gguf_file": base.name}) if base.suffix == ".gguf" else (base, {})
    if not (base.is_file() if extra else (base / "config.json").is_file()):
        raise FileNotFoundError(f"--base {base}: not a model folder or .gguf file")
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    if not tokenizer.chat_template:
        raise ValueError(f"--base {base}: its tokenizer has no chat template (the persona stage needs an "
                         f"instruct model)")
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra).to(device)
    return tokenizer, model


def render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def headed_turns(example: Example) -> list[Turn]:
    """The example's turns with every labelled NPC line after its header, as the model learns to write it."""
    labels = iter(example.labels)
    turns = []
    for turn in example.turns:
        emotion, action = next(labels) if turn.speaker == "npc" else ("", None)
        turns.append(replace(turn, text=with_header(turn.text, emotion, action)) if emotion else turn)
    return turns


def encode(tokenizer, example: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one example: mask 1 on the NPC's content and end-of-turn tokens."""
    messages = chat_messages(example.persona, headed_turns(example), example.scene)
    text = render(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before, through = render(tokenizer, messages[:i], True), render(tokenizer, messages[:i + 1], False)
            if not (text.startswith(before) and text.startswith(through)):
                raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
            spans.append((len(before), len(through.rstrip())))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start <= a < end for start, end in spans)) for a, _ in enc["offset_mapping"]]
    return enc["input_ids"][:max_len], mask[:max_len]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device):
    width = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention, mask = torch.zeros_like(x), torch.zeros_like(x)
    for b, (ids, m) in enumerate(rows):
        x[b, :len(ids)], attention[b, :len(ids)], mask[b, :len(m)] = torch.tensor(ids), 1, torch.tensor(m)
    return x.to(device), attention.to(device), mask.to(device)


def batch_loss(model, x: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the masked positions; the output head runs on those positions only (a fifth of
    the tokens: the full logits of a batch would take gigabytes)."""
    base = model.get_base_model()
    hidden = base.model(input_ids=x, attention_mask=attention).last_hidden_state[:, :-1]
    keep = mask[:, 1:].bool()
    return F.cross_entropy(base.lm_head(hidden[keep]).float(), x[:, 1:][keep])


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def schedule(stage: PersonaStage, total: int) -> PersonaStage:
    """Warmup takes at most a tenth of the steps (a CPU budget may allow only a few dozen)."""
    return replace(stage, warmup_steps=max(1, min(stage.warmup_steps, total // 10)))


def lora_model(model, stage: PersonaStage):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=stage.rank, lora_alpha=stage.alpha, lora_dropout=stage.dropout,
                        target_modules=list(stage.targets), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def adapter_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, save_embedding_layers=False)  # "auto" would look the base up online


def save_adapter(model, out: Path, base: Path) -> None:
    """PEFT's folder, weights in bfloat16 (half the bytes; the merge adds them to the base in its dtype)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = model.peft_config["default"]
    config.base_model_name_or_path = base.stem if base.suffix == ".gguf" else base.name
    config.inference_mode = True
    config.save_pretrained(str(out))
    state = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in adapter_state(model).items()}
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def train_persona(ctx: Context, base: Path, corpus: Path, out: Path) -> dict:
    stage = ctx.config.persona
    torch.manual_seed(ctx.seed)
    tokenizer, model = load_base(base, ctx.device)
    examples = train_examples(corpus) + (drills(read_split(corpus, "train"), ctx.seed) if stage.drills else [])
    rows = [row for row in (encode(tokenizer, ex, stage.max_len) for ex in examples) if sum(row[1])]
    ctx.log(f"persona: {len(rows)} examples ({sum(ex.kind == 'scene' for ex in examples)} scene seats, "
            f"{sum(ex.kind == 'drill' for ex in examples)} drills), "
            f"{sum(len(ids) for ids, _ in rows):,} tokens, {sum(sum(m) for _, m in rows):,} trained")
    model = lora_model(model, stage)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ctx.log(f"persona: LoRA r={stage.rank} on {','.join(stage.targets)}: {sum(p.numel() for p in trainable):,} "
            f"parameters; base {base}, device {ctx.device}")
    opt = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=0.0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_epoch = math.ceil(len(rows) / stage.batch_size)
    step, total, spent, history = 0, stage.epochs * per_epoch, 0.0, []
    ckpt = ctx.work / "ckpt" / "persona.pt"
    if ctx.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)  # RNG states must stay on the CPU
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, state["adapter"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        step, total, spent, history = state["step"], state["total"], state["seconds"], state["history"]
        ctx.log(f"persona: resumed at step {step}/{total} ({spent:.0f} s spent)")
    model.train()
    budget, start, first, resumed_at = stage.max_minutes * 60, time.perf_counter() - spent, step, time.perf_counter()
    window_loss, window_tokens, window_start, calibrated_at = [], 0, time.perf_counter(), None
    while step < total:
        epoch, i = divmod(step, per_epoch)
        batch = [rows[j] for j in epoch_order(len(rows), epoch, ctx.seed)[i * stage.batch_size:][:stage.batch_size]]
        x, attention, mask = collate(batch, pad_id, ctx.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, schedule(stage, total))
        with autocast(ctx.device):
            loss = batch_loss(model, x, attention, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, stage.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        window_loss.append(loss.item())
        window_tokens += int(attention.sum())
        now = time.perf_counter()
        if budget and step == first + CALIBRATE_FROM:
            calibrated_at = now
        elif budget and step == first + CALIBRATE_TO and calibrated_at is not None:
            per_step = (now - calibrated_at) / (CALIBRATE_TO - CALIBRATE_FROM)
            total = max(step + 1, min(total, step + int((budget * BUDGET_SAFETY - (now - start)) / per_step)))
            ctx.log(f"persona: {per_step:.2f} s/step: schedule set to {total} steps ({total / per_epoch:.2f} epochs)")
        if step % stage.log_every == 0 or step == total or step == first + 1:
            value = sum(window_loss) / len(window_loss)
            history.append((step, round(value, 4)))
            per_step = (now - resumed_at) / (step - first)
            ctx.log(f"persona: step {step}/{total} epoch {step / per_epoch:.2f} loss {value:.4f} "
                    f"lr {lr_at(step - 1, total, schedule(stage, total)):.2e} "
                    f"{window_tokens / (now - window_start):,.0f} tokens/s "
                    f"{now - start:.0f} s, ETA {(total - step) * per_step:.0f} s")
            if not math.isfinite(value):
                raise FloatingPointError(f"persona: loss became {value} at step {step}")
            window_loss, window_tokens, window_start = [], 0, now
        if budget and now - start > budget:
            ctx.log(f"persona: time budget of {stage.max_minutes} min reached at step {step}")
            if window_loss:
                history.append((step, round(sum(window_loss) / len(window_loss), 4)))
            break
        if step % stage.ckpt_every == 0 and step < total:
            cuda_rng = torch.cuda.get_rng_state() if ctx.device.type == "cuda" else None
            save_checkpoint(ckpt, {"adapter": adapter_state(model), "optimizer": opt.state_dict(), "step": step,
                                   "rng": torch.get_rng_state(), "cuda_rng": cuda_rng, "total": total,
                                   "seconds": time.perf_counter() - start, "history": history})
    save_adapter(model, out, base)
    info = {"steps": step, "planned_steps": total, "epochs": round(step / per_epoch, 2), "examples": len(rows),
            "seconds": round(time.perf_counter() - start, 1), "device": str(ctx.device), "seed": ctx.seed,
            "base": base.name, "first_loss": history[0][1] if history else None,
            "last_loss": history[-1][1] if history else None, "loss_history": history,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(stage).items()}}
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    ckpt.unlink(missing_ok=True)
    ctx.log(f"persona: adapter written to {out} ({sum(f.stat().st_size for f in out.iterdir()) / 2**20:.1f} MB)")
    (ctx.work / "stages").mkdir(parents=True, exist_ok=True)
    (ctx.work / "stages" / "persona.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
