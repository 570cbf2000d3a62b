"""Stage `eval`: the shipped pair (as saved, computed in float32) measured on held-out data.
Writes `<work>/metrics.json` and `<work>/samples.md`.

- Perplexity: exp(mean next-token loss) on evenly spaced windows of the held-out books (every
  token), and on the held-out Persona-Chat conversations (the NPC's tokens only, given persona and
  history, as in finetuning).
- Greedy acceptance (K = 4, 8): prompts are held-out conversations cut just after an `<|npc|>`.
  The target's greedy reply (up to eval_max_new_tokens, ending at a stop token) is the reference.
  Speculative decoding is then replayed: from the accepted prefix, the draft proposes greedily
  min(K, tokens left in the reply) tokens; accepted = the length of the prefix that matches the
  reference; the step then commits accepted + 1 tokens (the target's own next token). Acceptance
  rate = accepted / proposed over all steps; mean accepted length = accepted per step; tokens per
  target forward = reply tokens / steps. The feature head (`npc-head`, when trained) is replayed on the
  same prompts and replies (`acceptance_feature_head`).
- Persona adherence: for every held-out Persona-Chat persona, each fact is matched by keywords to
  at most one topic (`data.fact_topics`); each topic with a matching fact is asked once, as the first
  player turn, in the words of EVAL_QUESTIONS (training's question-answer exchanges use others). The greedy reply
  counts as adherent when it shares a content word with one of that
  topic's facts: lowercased words of 3+ letters, a plural "s" dropped, minus STOPWORDS and minus the
  words of the question itself (so "What is your favorite color?" -> "my favorite color is" does not
  count; "blue" does).
- Ten sample exchanges with the demo cast (`personas/*.toml`), sampled at temperature 0.7, top-k 40.
"""
import json
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from npc_engine.head import FeatureHead, load_head
from npc_engine.loading import load_model
from npc_engine.model import Transformer
from npc_engine.persona import PersonaError, load_persona_dir
from npc_engine.prompt import NPC, PromptPersona, Turn, build_prompt
from npc_engine.train.batches import (
    Rows,
    book_windows,
    conversation_windows,
    load_book_stream,
    load_conversations,
    pack,
)
from npc_engine.train.config import eos_ids
from npc_engine.train.data import fact_topics, persona_key, read_jsonl, record_persona
from npc_engine.train.loop import Context, masked_cross_entropy
from npc_engine.train.tokenizer import load_tokenizer

EVAL_QUESTIONS = {  # one per topic of data.fact_topics; training asks with other words (data.QA_QUESTIONS)
    "favorite": "What is your favorite {}?",
    "pets": "Do you have any pets?",
    "job": "What do you do for a living?",
    "family": "Tell me about your family.",
    "home": "Where are you from?",
    "hobbies": "What do you like to do for fun?",
}
STOPWORDS = set("""a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each even ever every few for from further get got
had has have having he her here hers herself him himself his how i if in into is it its itself just like love loves
enjoy enjoys me more most much my myself no nor not now of off on once only or other our ours out over own really
same she should so some such than that the their them then there these they this those through to too under until
up very was we well were what when where which while who whom why will with would you your yours yourself always
never one two lot lots thing things much many time times going go make made yes yeah oh really actually""".split())
SAMPLE_LINES = ["Hello! Who are you?", "What do you do here?", "Where are you from?", "Any news from town?",
                "What do you want most in life?", "Can you help me?", "Tell me about yourself.",
                "What do you think of this place?", "Have you heard any rumours?", "Goodbye, friend."]


def content_words(text: str) -> set[str]:
    words = re.findall(r"[a-z]+", text.lower())
    return {w[:-1] if w.endswith("s") and len(w) > 3 else w for w in words if len(w) >= 3 and w not in STOPWORDS}


def topic_questions(facts: list[str]) -> list[tuple[str, str, list[str]]]:
    """(topic, question, the facts it should draw on) for each topic the facts cover."""
    out = []
    for topic, topic_facts in fact_topics(facts).items():
        kind, _, thing = topic.partition(" ")
        out.append((topic, EVAL_QUESTIONS[kind].format(thing), topic_facts))
    return out


def adherent(reply: str, question: str, facts: list[str]) -> bool:
    wanted = set().union(*(content_words(f) for f in facts)) - content_words(question)
    return bool(content_words(reply) & wanted)


@torch.no_grad()
def perplexity(model, rows: Rows, batch: int, device) -> float:
    total, weight = 0.0, 0.0
    for i in range(0, len(rows), batch):
        tokens, mask = rows.tokens[i:i + batch].to(device), rows.mask[i:i + batch].to(device)
        n = mask[:, 1:].sum().item()
        if n:
            total += masked_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], mask[:, 1:]).item() * n
            weight += n
    return float(torch.tensor(total / max(weight, 1)).exp())


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new: int, stop_ids: set[int], batch: int, device,
             temperature: float = 0.0, top_k: int = 0, generator: torch.Generator | None = None) -> list[list[int]]:
    """Batched decoding without a KV cache: rows are right-padded, and a causal model never lets a
    position see the padding after it, so each row's next token comes from its own last position."""
    results = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        B = len(chunk)
        lengths = torch.tensor([len(p) for p in chunk], device=device)
        buf = torch.zeros(B, int(lengths.max()) + max_new, dtype=torch.long, device=device)
        for b, p in enumerate(chunk):
            buf[b, :len(p)] = torch.tensor(p, device=device)
        out, done = [[] for _ in chunk], [False] * B
        rows = torch.arange(B, device=device)
        for _ in range(max_new):
            logits = model(buf[:, :int(lengths.max())])[rows, lengths - 1].float()
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                if top_k:
                    logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[:, -1:], float("-inf"))
                probs = torch.softmax(logits / temperature, -1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
            active = torch.tensor([not d for d in done], device=device)
            buf[rows[active], lengths[active]] = nxt[active]
            lengths = lengths + active.long()
            for b, token in enumerate(nxt.tolist()):
                if not done[b]:
                    out[b].append(token)
                    done[b] = token in stop_ids
            if all(done):
                break
        results += out
    return results


def model_proposals(draft: Transformer):
    """propose(work [B, S], cur [B], k) -> [B, k]: a draft model's greedy tokens after each row's first cur
    tokens (written into work as they are proposed)."""
    def propose(work: torch.Tensor, cur: torch.Tensor, k: int) -> torch.Tensor:
        rows, proposals = torch.arange(len(cur), device=cur.device), []
        for _ in range(k):
            proposals.append(draft(work[:, :int(cur.max())])[rows, cur - 1].argmax(-1))
            work[rows, cur] = proposals[-1]
            cur = cur + 1
        return torch.stack(proposals, 1)
    return propose


def head_proposals(target: Transformer, head: FeatureHead):
    """The same for a feature head, without caches: the target's features of the committed tokens, then per draft
    one head pass over the row, its new position fed the head's own predicted feature (as the engine drafts)."""
    def propose(work: torch.Tensor, cur: torch.Tensor, k: int) -> torch.Tensor:
        rows, proposals = torch.arange(len(cur), device=cur.device), []
        length = int(cur.max()) + k
        features = target.hidden_states(work[:, :length], torch.arange(length, device=cur.device).expand(len(cur), -1))
        before = F.pad(features[:, :-1], (0, 0, 1, 0))  # positions past cur are overwritten before they are read
        for _ in range(k):
            end = int(cur.max())
            predicted = head(target, work[:, :end], before[:, :end])[rows, cur - 1]
            proposals.append(head.logits(target, predicted).argmax(-1))
            work[rows, cur], before[rows, cur] = proposals[-1], predicted.to(before.dtype)
            cur = cur + 1
        return torch.stack(proposals, 1)
    return propose


@torch.no_grad()
def replay_speculation(propose, prompts: list[list[int]], replies: list[list[int]], k: int, batch: int, device) -> dict:
    """Greedy speculative decoding replayed against the target's greedy replies (module docstring); propose: a
    `model_proposals` or `head_proposals` function."""
    steps = proposed = accepted = 0
    for i in range(0, len(prompts), batch):
        chunk_p, chunk_r = prompts[i:i + batch], replies[i:i + batch]
        B = len(chunk_p)
        plen = torch.tensor([len(p) for p in chunk_p], device=device)
        rlen = torch.tensor([len(r) for r in chunk_r], device=device)
        seq = torch.zeros(B, int((plen + rlen).max()) + k + 1, dtype=torch.long, device=device)
        for b, (p, r) in enumerate(zip(chunk_p, chunk_r)):
            seq[b, :len(p) + len(r)] = torch.tensor(p + r, device=device)
        rows = torch.arange(B, device=device)
        cols = torch.arange(k, device=device)
        pos = torch.zeros(B, dtype=torch.long, device=device)  # reply tokens committed so far
        while True:
            active = pos < rlen
            if not active.any():
                break
            proposals = propose(seq.clone(), plen + pos, k)
            n_prop = torch.minimum(rlen - pos, torch.tensor(k, device=device))
            reference = seq[rows[:, None], (plen + pos)[:, None] + cols]
            match = (proposals == reference) & (cols < n_prop[:, None])
            n_acc = match.long().cumprod(1).sum(1)
            steps += int(active.sum())
            proposed += int(n_prop[active].sum())
            accepted += int(n_acc[active].sum())
            pos = torch.where(active, torch.minimum(pos + n_acc + 1, rlen), pos)
    reply_tokens = sum(len(r) for r in replies)
    return {"acceptance_rate": accepted / max(proposed, 1), "mean_accepted_length": accepted / max(steps, 1),
            "tokens_per_target_forward": reply_tokens / max(steps, 1), "steps": steps, "proposed": proposed,
            "accepted": accepted}


def acceptance_prompts(val_rows: Rows, npc_id: int, n: int) -> list[list[int]]:
    """Up to n prompts ending in `<|npc|>`, evenly spread over the held-out conversation rows."""
    prompts = []
    for row in val_rows.tokens.tolist():
        prompts += [row[:i + 1] for i, t in enumerate(row) if t == npc_id]
    if len(prompts) > n:
        prompts = [prompts[int(j * len(prompts) / n)] for j in range(n)]
    return prompts


def persona_questions(work: Path, limit: int) -> list[tuple[PromptPersona, str, str, list[str]]]:
    seen, items = set(), []
    for record in read_jsonl(work / "data" / "conv_val.jsonl"):
        persona = record_persona(record)
        key = persona_key(persona.facts)
        if record["source"] != "persona-chat" or key in seen:
            continue
        seen.add(key)
        items += [(persona, topic, q, facts) for topic, q, facts in topic_questions(persona.facts)]
    if len(items) > limit:
        items = [items[int(j * len(items) / limit)] for j in range(limit)]
    return items


def demo_cast(personas_dir: Path, log) -> list[PromptPersona]:
    if not personas_dir.is_dir():
        return []
    try:
        return [p.to_prompt_persona() for _, p in sorted(load_persona_dir(personas_dir).items())]
    except PersonaError as e:  # samples are the last, least important measurement: never lose the rest
        log(f"eval: demo personas could not be loaded, no samples: {e}")
        return []


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def evaluate(ctx: Context, personas_dir: Path) -> dict:
    start = time.perf_counter()
    cfg, device = ctx.config, ctx.device
    tok = load_tokenizer(ctx.work)
    stop = set(eos_ids(tok.token_to_id))
    target = load_model(ctx.out / "npc-target", device, torch.float32)
    draft = load_model(ctx.out / "npc-draft", device, torch.float32)

    book_rows = book_windows(load_book_stream(ctx.work, "val"), cfg.pretrain.block_size, cfg.eval_book_blocks, None)
    conv_rows = pack(conversation_windows(load_conversations(ctx.work, "val"), cfg.finetune.block_size),
                     cfg.finetune.block_size)
    ppl = {name: {"books_val": perplexity(m, book_rows, cfg.eval_batch, device),
                  "persona_chat_val_npc_turns": perplexity(m, conv_rows, cfg.eval_batch, device)}
           for name, m in (("target", target), ("draft", draft))}
    ctx.log(f"eval: perplexity {ppl}")

    prompts = acceptance_prompts(conv_rows, tok.token_to_id(NPC), cfg.eval_prompts)
    replies = generate(target, prompts, cfg.eval_max_new_tokens, stop, cfg.eval_batch, device)
    acceptance = {f"k{k}": replay_speculation(model_proposals(draft), prompts, replies, k, cfg.eval_batch, device)
                  for k in (4, 8)}
    ctx.log(f"eval: acceptance over {len(prompts)} prompts {acceptance}")
    head_acceptance = None
    if (ctx.out / "npc-head" / "config.json").is_file():
        propose = head_proposals(target, load_head(ctx.out / "npc-head", target, device, torch.float32))
        head_acceptance = {f"k{k}": replay_speculation(propose, prompts, replies, k, cfg.eval_batch, device)
                           for k in (4, 8)}
        ctx.log(f"eval: feature head acceptance {head_acceptance}")

    questions = persona_questions(ctx.work, cfg.eval_max_adherence)
    q_prompts = [tok.encode(build_prompt(p, [Turn("player", q)])).ids for p, _, q, _ in questions]
    answers = [tok.decode(ids, skip_special_tokens=True).strip()
               for ids in generate(target, q_prompts, cfg.eval_max_new_tokens, stop, cfg.eval_batch, device)]
    hits = [adherent(a, q, facts) for a, (_, _, q, facts) in zip(answers, questions)]
    by_topic: dict[str, list[bool]] = {}
    for hit, (_, topic, _, _) in zip(hits, questions):
        by_topic.setdefault(topic.split()[0], []).append(hit)
    adherence = {"score": sum(hits) / max(len(hits), 1), "questions": len(hits),
                 "personas": len({persona_key(p.facts) for p, _, _, _ in questions}),
                 "by_topic": {t: {"score": sum(v) / len(v), "questions": len(v)} for t, v in sorted(by_topic.items())},
                 "examples": [{"facts": facts, "question": q, "reply": a, "adherent": h}
                              for (_, _, q, facts), a, h in list(zip(questions, answers, hits))[:12]]}
    ctx.log(f"eval: persona adherence {adherence['score']:.3f} over {len(hits)} questions")

    stages = {}
    for f in sorted((ctx.work / "stages").glob("*.json")):
        stages[f.stem] = json.loads(f.read_text())
    metrics = {
        "config": cfg.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "target": {"parameters": sum(p.numel() for p in target.parameters()),
                   "bytes": folder_bytes(ctx.out / "npc-target")},
        "draft": {"parameters": sum(p.numel() for p in draft.parameters()),
                  "bytes": folder_bytes(ctx.out / "npc-draft")},
        "perplexity": ppl,
        "acceptance": {"prompts": len(prompts), "max_new_tokens": cfg.eval_max_new_tokens, **acceptance},
        "acceptance_feature_head": None if head_acceptance is None else {"prompts": len(prompts), **head_acceptance},
        "persona_adherence": adherence,
        "stages": {k: {kk: vv for kk, vv in v.items() if kk != "loss_history"} for k, v in stages.items()},
        "loss_history": {k: v.get("loss_history") for k, v in stages.items()},
        "eval_seconds": round(time.perf_counter() - start, 1),
    }
    (ctx.work / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    samples = sample_exchanges(target, tok, demo_cast(personas_dir, ctx.log), stop, ctx)
    (ctx.work / "samples.md").write_text(samples_markdown(samples, personas_dir))
    return metrics


def sample_exchanges(model, tok, cast: list[PromptPersona], stop: set[int], ctx: Context) -> list[dict]:
    if not cast:
        return []
    picks = [(cast[i % len(cast)], SAMPLE_LINES[i]) for i in range(len(SAMPLE_LINES))]
    prompts = [tok.encode(build_prompt(p, [Turn("player", line)])).ids for p, line in picks]
    generator = torch.Generator().manual_seed(ctx.seed)
    replies = generate(model, prompts, 64, stop, ctx.config.eval_batch, ctx.device, temperature=0.7, top_k=40,
                       generator=generator)
    return [{"name": p.name, "role": p.role, "player": line, "npc": tok.decode(r, skip_special_tokens=True).strip()}
            for (p, line), r in zip(picks, replies)]


def samples_markdown(samples: list[dict], personas_dir: Path) -> str:
    if not samples:
        return f"No demo personas found in {personas_dir}.\n"
    lines = ["Replies of `models/npc-target`, unedited: one player line each, temperature 0.7, top-k 40, "
             "at most 64 tokens.", ""]
    for s in samples:
        lines += [f"**{s['name']}** ({s['role']})", "", f"> Player: {s['player']}", ">",
                  f"> {s['name']}: {s['npc']}", ""]
    return "\n".join(lines)
