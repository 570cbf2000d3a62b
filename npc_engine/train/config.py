"""Training configurations: `default` (the shipped pair, sized for one H200 run of under 9 minutes; the
persona adapter's few epochs fit an H200 in about 5 minutes, a CPU run stops at its time budget) and
`tiny` (the CPU test pipeline)."""
from dataclasses import dataclass, field, replace

from npc_engine.prompt import EOT, SPECIAL_TOKENS


@dataclass
class Shape:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 1024

    def hf_config(self, vocab_size: int, eos_ids: list[int]) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
            "bos_token_id": None,
            "eos_token_id": eos_ids,
        }


@dataclass
class Stage:
    batch_size: int
    block_size: int
    lr: float
    max_steps: int
    max_minutes: float  # wall-clock budget including compilation; 0 = steps only (exactly reproducible)
    warmup_steps: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    compile: bool = True  # only on CUDA
    log_every: int = 50
    ckpt_every: int = 500
    eval_every: int = 50  # dev-loss checks, where the stage has a dev set (finetune)


@dataclass
class Mix:
    """Share of each source in a finetune/distill batch (the rest is plain book text)."""
    persona_chat: float = 0.55
    book_dialogue: float = 0.3


@dataclass
class PersonaStage:
    """The persona adapter: LoRA on every projection of an instruct base, in its own chat template."""
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    epochs: int = 6
    batch_size: int = 16
    max_len: int = 1024  # tokens per example, system message included (SmolLM2: the longest train example is 774)
    lr: float = 4e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    max_minutes: float = 0  # wall-clock budget (model loading excluded); 0 = all epochs
    log_every: int = 10
    ckpt_every: int = 50
    drills: bool = True  # npc_engine.train.drills: fact, break and banned-topic exchanges of the training personas


@dataclass
class TrainConfig:
    name: str
    vocab_size: int
    target: Shape
    draft: Shape
    pretrain: Stage
    finetune: Stage
    distill: Stage
    head: Stage
    mix: Mix = field(default_factory=Mix)
    tokenizer_sample_chars: int = 30_000_000
    val_book_fraction: float = 0.05  # of books, at least one
    val_persona_fraction: float = 0.06  # of distinct personas, at least one
    dev_persona_fraction: float = 0.03  # the next ones by rank: picks the finetune step
    max_mined_per_book: int = 400  # dialogue exchanges mined from one book
    dev_rows: int = 64  # packed dev-conversation rows scored at each finetune check
    eval_book_blocks: int = 256
    eval_prompts: int = 256  # acceptance prompts, spread over the held-out conversations
    eval_max_new_tokens: int = 48
    eval_batch: int = 64
    eval_max_adherence: int = 400
    cpu_threads: int = 0  # torch threads on CPU; 0 = torch's default
    persona: PersonaStage = field(default_factory=PersonaStage)
    # the head of an instruct base (`--stages head --base`): rows of whole conversations, the target's greedy
    # continuations at every NPC turn of head_replies of them and at head_persona_chat cuts of Persona-Chat
    # examples (in at most a quarter of the stage's budget), head_samples continuations sampled at
    # head_sample_temperature at each of those NPC turns (in another quarter at most), a reduced draft vocabulary
    base_head: Stage = field(default_factory=lambda: Stage(
        batch_size=4, block_size=512, lr=3e-3, max_steps=20_000, max_minutes=10, warmup_steps=20, log_every=10,
        ckpt_every=100))
    # at most this many draft ids; SmolLM2's replies and NPC lines use 10,676 distinct ids, all drafted then: 2.72
    # tokens a step at K = 4 on the H200 against 2.57 over 8,192, on the CPU 2.77 each, the steps no dearer
    # (benchmarks/README.md, "Every id the data uses, and a longer head")
    draft_vocab: int = 16384
    head_replies: int = 1024
    head_reply_tokens: int = 48
    head_persona_chat: int = 2048
    head_samples: int = 0
    head_sample_temperature: float = 0.8
    # the target layers whose outputs the head reads (EAGLE-3's several-layer features); None: default_feature_layers
    # of the target, (): the last layer's alone
    head_feature_layers: tuple[int, ...] | None = None


DEFAULT = TrainConfig(
    name="default",
    vocab_size=8192,
    # 9.5 M parameters (2.1 M of them the tied embedding): the verifier.
    target=Shape(dim=256, n_layers=10, n_heads=4, n_kv_heads=2, intermediate_size=704),
    # 1.4 M parameters (1.0 M embedding), 2 layers: 5x fewer layers, 7x fewer FLOPs per token.
    draft=Shape(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, intermediate_size=384),
    pretrain=Stage(batch_size=128, block_size=512, lr=2e-3, max_steps=30_000, max_minutes=3.5, warmup_steps=200,
                   ckpt_every=2000),
    # about 70 steps per pass over the Persona-Chat rows; the dev loss picks the step kept
    finetune=Stage(batch_size=32, block_size=1024, lr=6e-4, max_steps=800, max_minutes=1.5, warmup_steps=40),
    distill=Stage(batch_size=32, block_size=1024, lr=3e-3, max_steps=20_000, max_minutes=1.75, warmup_steps=100,
                  ckpt_every=2000),
    # the feature head: one layer on the frozen target's hidden states, on the distillation mix
    head=Stage(batch_size=32, block_size=1024, lr=3e-3, max_steps=20_000, max_minutes=2, warmup_steps=100,
               ckpt_every=2000),
)

TINY = TrainConfig(
    name="tiny",
    vocab_size=512,
    target=Shape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, max_position_embeddings=256),
    draft=Shape(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=64, max_position_embeddings=256),
    pretrain=Stage(batch_size=8, block_size=64, lr=3e-3, max_steps=60, max_minutes=0, warmup_steps=5,
                   log_every=10, ckpt_every=20),
    finetune=Stage(batch_size=8, block_size=128, lr=2e-3, max_steps=30, max_minutes=0, warmup_steps=3,
                   log_every=10, ckpt_every=20, eval_every=10),
    distill=Stage(batch_size=8, block_size=128, lr=3e-3, max_steps=30, max_minutes=0, warmup_steps=3,
                  log_every=10, ckpt_every=20),
    head=Stage(batch_size=8, block_size=128, lr=3e-3, max_steps=20, max_minutes=0, warmup_steps=3,
               log_every=10, ckpt_every=10),
    tokenizer_sample_chars=2_000_000,
    val_book_fraction=0.2,
    val_persona_fraction=0.2,
    dev_persona_fraction=0.1,
    eval_book_blocks=16,
    eval_prompts=16,
    eval_max_new_tokens=12,
    eval_batch=8,
    eval_max_adherence=16,
    cpu_threads=1,  # its matrices are too small to share out; two busy threads run ten times slower
    persona=PersonaStage(rank=4, alpha=8, dropout=0.0, epochs=4, batch_size=4, max_len=384, lr=3e-2, warmup_steps=2,
                         log_every=2, ckpt_every=4),
    base_head=Stage(batch_size=4, block_size=384, lr=3e-3, max_steps=8, max_minutes=0, warmup_steps=2, log_every=2,
                    ckpt_every=4),
    draft_vocab=64,
    head_replies=6,
    head_reply_tokens=8,
    head_persona_chat=8,
    head_samples=1,
)

CONFIGS = {"default": DEFAULT, "tiny": TINY}


def with_minutes(config: TrainConfig, minutes: dict[str, float]) -> TrainConfig:
    """The config with some stages' time budgets replaced (`--max-minutes pretrain=2,distill=1`)."""
    return replace(config, **{stage: replace(getattr(config, stage), max_minutes=m) for stage, m in minutes.items()})


def eos_ids(token_to_id) -> list[int]:
    """Generation stops at the end of an NPC turn, or at the end of a document."""
    return [token_to_id(EOT), token_to_id(SPECIAL_TOKENS[0])]
