"""Stage `tokenizer`: a byte-level BPE (the GPT-2 scheme) trained on the prepared training split,
then the whole prepared corpus encoded to token files for the training stages.

Special tokens are `npc_engine.prompt.SPECIAL_TOKENS` at ids 0..4 (<|endoftext|> = 0). No
post-processor adds BOS/EOS, so `tokenizers`, `npc_engine.tokenizer.Tokenizer` and `transformers`'
`AutoTokenizer` all encode a prompt to the same ids.

Token files in `<work>/tokens/`: books_{train,val}.npy (uint16 stream, books separated by
<|endoftext|>) and conv_{train,dev,val}.npz: `ids`/`mask` (uint16/uint8, concatenated), `seg_lens`
(the persona block, then each turn, of every conversation), `conv_segs` (segments per
conversation) and `conv_source` (0 = from Synthetic-Persona-Chat, 1 = mined from a book). `mask` marks
the tokens an NPC says: the text of its turns and their closing <|eot|>.
"""
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from npc_engine.prompt import EOT, SPECIAL_TOKENS, format_turn, persona_block, training_text
from npc_engine.train.data import read_jsonl, record_persona, record_turns

BOOK_CHUNK_PARAGRAPHS = 64


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def training_sample(data: Path, max_chars: int):
    """Evenly strided book paragraphs and conversations, about max_chars in all."""
    books = read_jsonl(data / "books_train.jsonl")
    conversations = read_jsonl(data / "conv_train.jsonl")
    total = sum(len(b["text"]) for b in books) + sum(len(t) for c in conversations for _, t in c["turns"])
    stride = max(1, round(total / max_chars))
    for book in books:
        yield "\n".join(book["text"].split("\n")[::stride])
    for c in conversations[::stride]:
        yield training_text(record_persona(c), record_turns(c))


def train_tokenizer(work: Path, vocab_size: int, sample_chars: int, log=print) -> Tokenizer:
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_sample(work / "data", sample_chars), trainer)
    save_tokenizer(tok, work / "tokenizer")
    log(f"tokenizer: {tok.get_vocab_size()} tokens")
    return tok


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    """tokenizer.json plus the two small files `transformers.AutoTokenizer` reads beside it."""
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    special = {"eos_token": EOT, "pad_token": SPECIAL_TOKENS[0], "additional_special_tokens": SPECIAL_TOKENS[1:4]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "bos_token": None, "unk_token": None,
              **special}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def load_tokenizer(work: Path) -> Tokenizer:
    return Tokenizer.from_file(str(work / "tokenizer" / "tokenizer.json"))


_worker_tokenizer: Tokenizer | None = None


def _encode_slice(args: tuple[str, list[str]]) -> list[np.ndarray]:
    global _worker_tokenizer
    file, texts = args
    if _worker_tokenizer is None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
        _worker_tokenizer = Tokenizer.from_file(file)
    return [np.asarray(e.ids, dtype=np.uint16) for e in _worker_tokenizer.encode_batch_fast(texts)]


def parallel_encode(tok: Tokenizer, texts: list[str], workers: int) -> list[np.ndarray]:
    """Encode in forked worker processes, one thread each: faster than the library's own thread pool
    on small machines, and never slower."""
    file = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"npc-engine-tokenizer-{os.getpid()}.json")
    tok.save(file)
    size = max(1, -(-len(texts) // (workers * 4)))
    slices = [(file, texts[i:i + size]) for i in range(0, len(texts), size)]
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return [ids for part in pool.map(_encode_slice, slices) for ids in part]
    finally:
        os.unlink(file)


def encode_books(tok: Tokenizer, books: list[dict], workers: int) -> np.ndarray:
    """Books as one stream; paragraphs encode independently (newline is its own pre-token), so
    chunking them for parallel encoding gives the ids the whole text would get."""
    newline = tok.encode("\n").ids
    chunks, owner = [], []
    for i, book in enumerate(books):
        paragraphs = book["text"].split("\n")
        for start in range(0, len(paragraphs), BOOK_CHUNK_PARAGRAPHS):
            chunks.append("\n".join(paragraphs[start:start + BOOK_CHUNK_PARAGRAPHS]))
            owner.append(i)
    encoded = parallel_encode(tok, chunks, workers)
    eos = tok.token_to_id(SPECIAL_TOKENS[0])
    parts = []
    for j, ids in enumerate(encoded):
        if j:
            parts.append(np.asarray(newline if owner[j] == owner[j - 1] else [eos], dtype=np.uint16))
        parts.append(ids)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def encode_conversations(tok: Tokenizer, records: list[dict], workers: int) -> dict[str, np.ndarray]:
    segments, is_npc, conv_segs = [], [], []
    for r in records:
        turns = record_turns(r)
        segments.append(persona_block(record_persona(r)))
        segments += [format_turn(t) for t in turns]
        is_npc += [False] + [t.speaker == "npc" for t in turns]
        conv_segs.append(1 + len(turns))
    encoded = parallel_encode(tok, segments, workers)
    masks = []
    for ids, npc in zip(encoded, is_npc):
        mask = np.zeros(len(ids), dtype=np.uint8)
        mask[1:] = npc  # an NPC turn is <|npc|> text <|eot|>: the model learns all after the role token
        masks.append(mask)
    empty = np.zeros(0, dtype=np.uint16)
    return {"ids": np.concatenate(encoded) if encoded else empty,
            "mask": np.concatenate(masks) if masks else empty.astype(np.uint8),
            "seg_lens": np.asarray([len(ids) for ids in encoded], dtype=np.int32),
            "conv_segs": np.asarray(conv_segs, dtype=np.int32),
            "conv_source": np.asarray([1 if r["source"] == "book" else 0 for r in records], dtype=np.uint8)}


def encode_corpus(work: Path, tok: Tokenizer, log=print) -> dict:
    workers = max(1, min(os.cpu_count() or 1, 16))
    if tok.get_vocab_size() > np.iinfo(np.uint16).max:
        raise ValueError(f"vocabulary of {tok.get_vocab_size()} does not fit the uint16 token files")
    out = work / "tokens"
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        books = encode_books(tok, read_jsonl(work / "data" / f"books_{split}.jsonl"), workers)
        np.save(out / f"books_{split}.npy", books)
        counts[f"book_tokens_{split}"] = int(books.size)
    for split in ("train", "dev", "val"):
        conv = encode_conversations(tok, read_jsonl(work / "data" / f"conv_{split}.jsonl"), workers)
        np.savez(out / f"conv_{split}.npz", **conv)
        counts[f"conv_tokens_{split}"] = int(conv["ids"].size)
        counts[f"npc_tokens_{split}"] = int(conv["mask"].sum())
    (out / "counts.json").write_text(json.dumps(counts, indent=1) + "\n")
    log("tokens: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return counts
