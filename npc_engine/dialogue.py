"""The dialogue policy shared by the service and `npc-engine chat`, so both build the same prompt from
the same persona, history and text, and pick the same sampling parameters:

- `sampling_params`: defaults, then the persona's `sampling` table, then the caller's values
  (a request's fields, or `chat`'s command-line flags); `fallback_line` for a missed deadline or an
  empty reply;
- `fit_prompt`: persona block (a token prefix the engine caches) + the memories the
  game wrote about the player + as much history as fits, oldest exchange dropped first, + the player's
  text; for a model prompted through its chat template (the tokenizer carries it), the persona is the
  system message, the memories a second one, and the turns user/assistant messages;
- `LineStream`: generated tokens to text, with the guard's hold-back of a tail that could still
  grow into a banned topic.
The greeting is not part of the history: the game shows it, the service cannot know whether it did.
"""
import random
from dataclasses import dataclass

from npc_engine.chat_template import chat_prefix, chat_prompt
from npc_engine.guard import banned_topic, complete_words_end, unsafe_start
from npc_engine.persona import Persona
from npc_engine.prompt import Turn, memory_block
from npc_engine.sampling import SamplingParams
from npc_engine.tokenizer import IncrementalDecoder, Tokenizer


class PromptTooLarge(ValueError):
    """The persona block and the new text alone do not fit the model."""


def sampling_params(persona: Persona, *, max_tokens: int | None = None, temperature: float | None = None,
                    seed: int | None = None, max_tokens_limit: int | None = None) -> SamplingParams:
    """SamplingParams defaults, then the persona's `sampling` table, then the given values (None: not given).
    `max_tokens_limit` caps what the persona asks for (the service's `limits.max_tokens`)."""
    params = SamplingParams(**persona.sampling)
    if max_tokens_limit is not None:
        params.max_tokens = min(params.max_tokens, max_tokens_limit)
    for key, value in (("max_tokens", max_tokens), ("temperature", temperature), ("seed", seed)):
        if value is not None:
            setattr(params, key, value)
    return params


def prefix_text(tokenizer: Tokenizer, persona: Persona) -> str:
    """The persona block, or with a chat template the rendered system message: every prompt starts with it."""
    template = getattr(tokenizer, "chat_template", None)
    return persona.prefix() if template is None else chat_prefix(template, persona.to_prompt_persona())


def prompt_text(tokenizer: Tokenizer, persona: Persona, turns: list[Turn], text: str, complete: bool,
                memories: list[str] = ()) -> str:
    """The whole prompt; `memories` (what the NPC remembers about the player) follow the persona block."""
    template = getattr(tokenizer, "chat_template", None)
    if template is not None:
        return chat_prompt(template, persona.to_prompt_persona(), turns, text, complete, memories)
    new = [Turn("player", text)] if text.strip() else []
    prompt = persona.prompt(turns + new) if complete else persona.open_prompt(turns, text)
    block = persona.prefix()
    return block + memory_block(memories) + prompt[len(block):]


def fallback_line(persona: Persona, seed: int | None, rng: random.Random) -> str:
    """The persona's line for a deadline missed or an empty reply: fixed by the request's seed, if any."""
    return persona.fallback_line(random.Random(seed) if seed is not None else rng)


def prefix_ids(tokenizer: Tokenizer, persona: Persona) -> list[int]:
    """Token ids of the persona block: the prefix every prompt for this persona starts with. A chat template
    writes its own special tokens (BOS included), so nothing is added to its text."""
    return tokenizer.encode(prefix_text(tokenizer, persona),
                            add_special_tokens=getattr(tokenizer, "chat_template", None) is None)


@dataclass
class Prompt:
    ids: list[int]
    prefix_len: int  # the persona block's tokens: the prefix the engine caches
    turns_left_out: int  # the oldest turns of the history that did not fit


def fit_prompt(tokenizer: Tokenizer, persona: Persona, history: list[Turn], text: str, max_len: int, reserve: int = 0,
               complete: bool = True, prefix: list[int] | None = None, memories: list[str] = ()) -> Prompt:
    """The prompt for the player's `text` after `history`. The oldest exchange (two turns) is left out
    while the prompt and `reserve` reply tokens exceed `max_len`; `memories` always stay. Raises
    PromptTooLarge when the prompt does not fit `max_len` even without history. complete=False: the
    player is still typing `text`, and the prompt ends inside the player's turn. `prefix`: the
    persona's `prefix_ids`, when the caller caches them."""
    prefix = prefix_ids(tokenizer, persona) if prefix is None else prefix
    block = prefix_text(tokenizer, persona)
    turns = list(history)
    while True:
        prompt = prompt_text(tokenizer, persona, turns, text, complete, memories)
        ids = prefix + tokenizer.encode(prompt[len(block):], add_special_tokens=False)
        if len(ids) + reserve <= max_len or not turns:
            break
        turns = turns[2:] if len(turns) > 1 else []
    if len(ids) >= max_len:
        raise PromptTooLarge(f"the prompt is {len(ids)} tokens; the model takes at most {max_len - 1}")
    return Prompt(ids, len(prefix), len(history) - len(turns))


class LineStream:
    """One generated line: tokens in, text out. `push` returns the text that may be shown now; with
    `hold_back` (the service) a tail that could still grow into a banned topic waits until it cannot,
    and a topic found in complete words sets `topic` (the line must be deflected). `finish` returns
    the rest and checks the whole line."""

    def __init__(self, tokenizer, persona: Persona, hold_back: bool = True, header=None):
        """header: the line's npc_engine.header.HeaderMatcher (the engine feeds it the tokens before they come
        here): its tokens are never text, and the space after it is dropped."""
        self.decoder = IncrementalDecoder(tokenizer)
        self.persona, self.hold_back, self.header = persona, hold_back, header
        self.pushed = 0  # tokens pushed, the header's included
        self.text = ""
        self.shown = 0  # characters of `text` released by push/finish
        self.topic: str | None = None

    def push(self, token_ids: list[int]) -> str:
        for token in token_ids:
            self.pushed += 1
            if self.header is not None and self.pushed <= len(self.header.header):
                continue
            piece = self.decoder.push(token)
            self.text += piece.removeprefix(" ") if self.header is not None and not self.text else piece
        if not self.hold_back:
            return self._release(len(self.text))
        self.topic = banned_topic(self.persona, self.text[:complete_words_end(self.text)])
        return "" if self.topic else self._release(unsafe_start(self.text, self.shown, self.persona.banned_topics))

    @property
    def header_tokens(self) -> int:
        """Tokens pushed that were the line header's."""
        return 0 if self.header is None else min(self.pushed, len(self.header.header))

    def finish(self) -> str:
        rest = self.decoder.flush()
        self.text += rest.removeprefix(" ") if self.header is not None and not self.text else rest
        self.topic = banned_topic(self.persona, self.text)
        return "" if self.topic and self.hold_back else self._release(len(self.text))

    def _release(self, end: int) -> str:
        piece = self.text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return piece
