"""tokenizer.json loading (encoding exactly as `transformers` does) and UTF-8-safe streaming decode."""
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from npc_engine.chat_template import ChatTemplate
from npc_engine.loading import CheckpointError
from npc_engine.paths import resolve_model
from npc_engine.prompt import EOT, PERSONA

PROMPT_FORMATS = ("npc", "chat_template")


class Tokenizer:
    def __init__(self, tok: HFTokenizer, stop_ids: list[int], bos_id: int | None,
                 chat_template: ChatTemplate | None = None):
        self.tok = tok
        self.stop_ids = stop_ids
        self.bos_id = bos_id
        self.chat_template = chat_template  # set when the model is prompted through it (npc_engine.json)
        self.eot_id = tok.token_to_id(EOT)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = resolve_model(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the engine needs the checkpoint's tokenizer.json)")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{file}: cannot be read: {e}") from None
        stop, bos = set(), None
        for name in ("config.json", "generation_config.json"):
            if (path / name).is_file():
                cfg = json.loads((path / name).read_text())
                eos = cfg.get("eos_token_id")
                stop.update([eos] if isinstance(eos, int) else (eos or []))
                bos = cfg.get("bos_token_id", bos)
        if tok.token_to_id(EOT) is not None:
            stop.add(tok.token_to_id(EOT))
        template = ChatTemplate.from_dir(path)
        template = template if prompt_format(path, tok, template) == "chat_template" else None
        if template is not None:
            stop.update(end_of_turn_ids(tok, template))
        return cls(tok, sorted(stop), bos, template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The checkpoint's own post-processor decides BOS and other special tokens."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def prompt_format(path: Path, tok: HFTokenizer, template: ChatTemplate | None) -> str:
    """npc_engine.json's "prompt_format"; without one, "npc" for a vocabulary with the project's own tokens,
    else "chat_template" when the folder has a template."""
    hint = path / "npc_engine.json"
    fmt = json.loads(hint.read_text()).get("prompt_format") if hint.is_file() else None
    if fmt is None:
        fmt = "npc" if tok.token_to_id(PERSONA) is not None or template is None else "chat_template"
    if fmt not in PROMPT_FORMATS:
        raise CheckpointError(f"{hint}: prompt_format {fmt!r} unknown (known: {', '.join(PROMPT_FORMATS)})")
    if fmt == "chat_template" and template is None:
        raise CheckpointError(f"{hint}: prompt_format is chat_template but the folder has no chat template")
    return fmt


def end_of_turn_ids(tok: HFTokenizer, template: ChatTemplate) -> list[int]:
    """The special token that closes an assistant turn in the template (e.g. <|im_end|>, <|eot_id|>)."""
    ids = tok.encode(template.end_of_turn(), add_special_tokens=False).ids
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return ids[:1] if ids and ids[0] in special else []


class IncrementalDecoder:
    """Turns a token stream into text pieces; holds back bytes until they form whole characters.

    Decoding the tail window [prefix, end) and diffing it against [prefix, read) keeps tokenizers that
    add or strip spaces at word starts correct, at the cost of decoding a few tokens per step.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """At the end of a stream: whatever is still held back (an incomplete character decodes as U+FFFD)."""
        held = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        rest = self.tokenizer.decode(self.ids[self.prefix_offset:])[len(held):]
        self.prefix_offset = self.read_offset = len(self.ids)
        return rest
