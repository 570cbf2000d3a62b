"""A small npc-dialogue corpus and a tiny random instruct base (chat template in its tokenizer) for the persona
stage and `npc-engine eval` tests."""
import json
import random
from pathlib import Path

# SmolLM2-135M-Instruct's chat template, as its GGUF carries it
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOWNS = ["Millbrook", "Gullhaven", "Carrow", "Ashgrave", "Larkmoor", "Bramblecote"]
TRADES = [("smith", "I forge {n} swords a week.", "hammer"), ("baker", "I bake {n} loaves at dawn.", "knead"),
          ("fisher", "I catch {n} perch after rain.", "cast_line")]


def persona(i: int, banned: bool = False) -> dict:
    trade, fact, action = TRADES[i % len(TRADES)]
    town = f"{TOWNS[i % len(TOWNS)]}{i}"  # a distinctive word per persona
    return {"id": f"npc{i}", "name": f"Alda Vorn{i}", "role": f"{trade} of {town}", "style": "Short and plain.",
            "facts": [fact.format(n=3 + i), f"I live in {town}."],
            "knowledge": [f"The bridge to {town} fell in spring."],
            "emotions": ["neutral", "happy"], "actions": ["nod", action],
            "banned_topics": ["the duke"] if banned else [],
            "deflection": "Some things are not mine to say." if banned else ""}


def conversation(i: int) -> dict:
    p = persona(i, banned=i % 3 == 0)
    turns = [("What's your name?", f"Alda Vorn{i}, at your service."), ("Where do you live?", p["facts"][1]),
             ("Any news?", p["knowledge"][0]), ("Are you an AI?", "I am flesh and bone, friend.")]
    if p["banned_topics"]:
        turns.append(("Tell me about the duke.", p["deflection"]))
    out = []
    for player, npc in turns:
        out += [{"speaker": "player", "text": player},
                {"speaker": "npc", "text": npc, "emotion": random.Random(i).choice(p["emotions"]), "action": None}]
    return {"kind": "conversation", "genre": "high_fantasy", "persona": p, "turns": out, "source": "test"}


def scene(i: int) -> dict:
    a, b = persona(i), persona(i + 1)
    turns = [{"speaker": a["id"], "to": "all", "text": "Welcome, all!", "emotion": "happy", "action": "nod"},
             {"speaker": "player", "to": b["id"], "text": "What do you make?"},
             {"speaker": b["id"], "to": "player", "text": b["facts"][0], "emotion": "neutral", "action": None},
             {"speaker": a["id"], "to": b["id"], "text": f"Well said, {b['name']}.", "emotion": "happy",
              "action": None}]
    return {"kind": "scene", "genre": "high_fantasy", "situation": "Supper at the inn.", "cast": [a, b],
            "host": a["id"], "turns": turns}


def write_corpus(root: Path) -> Path:
    """<root>/npc-dialogue/{train,dev}.jsonl: 12 conversations and 2 scenes to train on, 3 conversations held out."""
    (root / "npc-dialogue").mkdir(parents=True)
    splits = {"train": [conversation(i) for i in range(12)] + [scene(20), scene(22)],
              "dev": [conversation(i) for i in range(30, 33)]}
    for split, records in splits.items():
        with open(root / "npc-dialogue" / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return root


def corpus_text(root: Path) -> list[str]:
    text = []
    for split in ("train", "dev"):
        for line in (root / "npc-dialogue" / f"{split}.jsonl").read_text().splitlines():
            r = json.loads(line)
            for p in r.get("cast", [r.get("persona")]):
                text += [p["name"], p["role"], p["style"], p["deflection"], *p["facts"], *p["knowledge"]]
            text += [t["text"] for t in r["turns"]]
    return text * 4 + ["You are About you: What you know: How you talk: Never say or hint that you are an AI, a model, "
                       "an assistant or in a game. Reply with one or two short spoken sentences, no narration. Scene: "
                       "Present: Others' lines are shown as Name: words Speak only as to the others by name. Player:"]


def build_chat_base(path: Path, corpus: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama whose tokenizer (trained on the corpus) carries SmolLM2's chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=CHAT_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_text(corpus), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        initializer_range=0.3,  # logits large enough for a LoRA to move the loss
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0,
        bos_token_id=fast.convert_tokens_to_ids("<|im_start|>"), eos_token_id=fast.convert_tokens_to_ids("<|im_end|>")))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path
