"""Shared fixtures: small random Hugging Face checkpoints built with `transformers`, the correctness oracle."""
import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from npc_engine.prompt import EOT, SPECIAL_TOKENS

# The tiny test models are latency-bound: one thread per process avoids two cores thrashing between
# pytest and the service processes the tests start (they inherit the variable).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

TOKENIZER_TEXT = [
    "I forge swords for the town guard. The tavern is warm tonight, traveller.",
    "What do you do for a living? I sing songs of old heroes and dragons.",
    "The captain keeps the gate; the merchant sells spices from the south.",
    "Grüße aus der Schmiede — ça va? 火 and 🐉 are fine too.",
] * 20

VARIANTS = {
    "llama_gqa": dict(arch="llama", num_attention_heads=4, num_key_value_heads=2),
    "llama3_rope": dict(arch="llama", num_attention_heads=4, num_key_value_heads=1,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                        rope_theta=500000.0),
    "qwen2_bias": dict(arch="qwen2", num_attention_heads=4, num_key_value_heads=2),
    "llama_tied": dict(arch="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
}


def build_tokenizer(vocab_size: int = 320, bos: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", 0)])
    return tok


def build_checkpoint(path: Path, variant: str = "llama_gqa", hidden_size: int = 64, layers: int = 2,
                     seed: int = 0, bos: bool = False, vocab_size: int | None = None) -> Path:
    """A random checkpoint in Hugging Face layout plus a tokenizer whose vocabulary matches it."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(VARIANTS[variant])
    arch = spec.pop("arch")
    tok = build_tokenizer(bos=bos)
    vocab = vocab_size or tok.get_vocab_size()
    eot = tok.token_to_id(EOT)
    common = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=hidden_size * 2 + 16,
                  num_hidden_layers=layers, max_position_embeddings=1024, eos_token_id=eot, bos_token_id=0, **spec)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=variant == "llama_gqa"))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():  # random biases and norms, so a forgotten term shows up in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0 if name.endswith("bias") else 1, 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    made = {}

    def make(variant: str = "llama_gqa", **kwargs) -> Path:
        key = (variant, json.dumps(kwargs, sort_keys=True))
        if key not in made:
            made[key] = build_checkpoint(tmp_path_factory.mktemp(variant), variant, **kwargs)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(make_checkpoint) -> Path:
    """A random 2-layer Llama (GQA) with a tokenizer that knows the prompt format's special tokens."""
    return make_checkpoint("llama_gqa")


@pytest.fixture(scope="session")
def tiny_pair_dirs(make_checkpoint) -> tuple[Path, Path]:
    """A target and a (random, so mostly wrong) draft sharing one tokenizer."""
    return make_checkpoint("llama_gqa", layers=3), make_checkpoint("llama_gqa", hidden_size=32, layers=1, seed=1)
