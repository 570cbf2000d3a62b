"""The line header as tokens: every line of a persona with emotions starts with `[emotion]` or `[emotion|action]`
(npc_engine.grammar), forced to the persona's lists by a token mask from xgrammar, chosen over llguidance by mask
time per token (0.86 against 6.52 µs, benchmarks/README.md "Line header masks"). The mask covers the header only: once
`]` is written the matcher is done and the text is free, so a line pays for masks on a handful of tokens. A persona
without emotions gets no header.
"""
from dataclasses import dataclass, field

import torch

from npc_engine.grammar import OPEN, SEP, header_grammar, parse_header


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask [..., W] (bit j of word i: token 32 i + j) -> bool mask [..., vocab_size]."""
    bits = (bitmask[..., None] >> torch.arange(32, dtype=torch.int32, device=bitmask.device)) & 1
    return bits.flatten(-2)[..., :vocab_size].bool()


@dataclass
class HeaderMatcher:
    """One line's header: the tokens allowed next, accepted tokens, rollback (speculative verification rejects drafts
    the matcher has already accepted). Tokens after the header are only counted, so that a rollback across the
    header's end returns to the right state."""

    matcher: object  # xgrammar.GrammarMatcher
    emotions: list[str]
    actions: list[str]
    tokenizer: object  # npc_engine.tokenizer.Tokenizer (decode)
    header: list[int] = field(default_factory=list)
    text_tokens: int = 0

    @property
    def done(self) -> bool:
        return self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Writes the allowed next tokens into bitmask[row] (int32, CPU); returns False (row left untouched) once the
        header is written and every token is allowed."""
        if self.done:
            return False
        self.matcher.fill_next_token_bitmask(bitmask, row)
        return True

    def mask(self, vocab_size: int) -> torch.Tensor | None:
        """The allowed next tokens as a bool tensor [vocab_size]; None once the header is done."""
        bitmask = torch.full((1, bitmask_width(vocab_size)), -1, dtype=torch.int32)
        return unpack_bitmask(bitmask, vocab_size)[0] if self.fill(bitmask, 0) else None

    def accept(self, token: int) -> bool:
        """False (state unchanged) for a token the header does not allow."""
        if self.done:
            self.text_tokens += 1
            return True
        if not self.matcher.accept_token(token):
            return False
        self.header.append(token)
        return True

    def accept_prefix(self, tokens: list[int]) -> int:
        """Accepts tokens up to the first one not allowed; returns how many were accepted."""
        for i, t in enumerate(tokens):
            if not self.accept(t):
                return i
        return len(tokens)

    def rollback(self, k: int) -> None:
        """Forgets the last k accepted tokens."""
        if k > self.text_tokens + len(self.header):
            raise ValueError(f"cannot roll back {k} tokens: only {self.text_tokens + len(self.header)} were accepted")
        from_text = min(k, self.text_tokens)
        self.text_tokens -= from_text
        if k > from_text:
            self.matcher.rollback(k - from_text)
            del self.header[len(self.header) - (k - from_text):]

    def result(self) -> tuple[str, str | None]:
        """(emotion, action) from the persona's lists. A header cut short (the line ended inside it: cancelled, past
        its deadline) resolves to the first emotion that starts with what was written, and no action."""
        text = self.tokenizer.decode(self.header)
        emotion, action, _ = parse_header(text, self.emotions, self.actions)
        if emotion is not None:
            return emotion, action
        written = text[len(OPEN):].split(SEP)[0]
        return next(e for e in self.emotions if e.startswith(written)), None


class HeaderCompiler:
    """Header grammars for one tokenizer; xgrammar caches each compiled list pair."""

    def __init__(self, tokenizer, vocab_size: int | None = None):
        """tokenizer: npc_engine.tokenizer.Tokenizer; vocab_size: the model's (it may pad the tokenizer's)."""
        # Imported here: xgrammar imports transformers (1.2 s), paid only by engines serving personas with lists.
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xgr, self.tokenizer = xgrammar, tokenizer
        self.vocab_size = vocab_size or tokenizer.vocab_size
        # Stop tokens never matter here (a matcher ends at `]`), but xgrammar refuses an empty list: None lets it guess.
        info = xgrammar.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok),
                                                       vocab_size=self.vocab_size,
                                                       stop_token_ids=tokenizer.stop_ids or None)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)

    def matcher(self, emotions: list[str], actions: list[str]) -> HeaderMatcher | None:
        """A fresh matcher for one line; None for a persona without emotions (its lines have no header, even with
        actions: the header starts with the emotion)."""
        if not emotions:
            return None
        compiled = self.compiler.compile_grammar(header_grammar(emotions, actions))
        return HeaderMatcher(self.xgr.GrammarMatcher(compiled, terminate_without_stop_token=True),
                             list(emotions), list(actions), self.tokenizer)


class StepMasks:
    """The header masks of one speculative step, one per position (as vLLM does): position i of a row is masked by
    its matcher's state after the row's drafts before i, on the draft side (`draft`: each draft is sampled from the
    masked draft distribution) and on the target side (`target`: verification compares the masked p with that q),
    so greedy output is masked plain decoding and sampled output keeps the masked target's distribution. Rows without
    a header being written, and positions after a header's end, are unmasked. A draft the header refuses (host
    drafters propose unmasked) stays a proposal: its masked p is 0, so verification rejects it, which keeps the rule
    exact for any q (cutting a row's proposals at a sampled draft the header refuses would not be). The positions
    after it are never reached and left unmasked. `rollback` returns the matchers to the step's start: the engine
    accepts the tokens the step emits."""

    def __init__(self, matchers: list[HeaderMatcher | None], vocab_size: int, device):
        self.matchers = [m if m is not None and not m.done else None for m in matchers]
        self.vocab_size, self.device = vocab_size, device
        self.walked = [0] * len(matchers)  # drafts each matcher accepted during this step
        self.refused = [False] * len(matchers)  # a draft of the row was refused: later positions are unmasked
        self.masks: list[torch.Tensor] = []  # [B, V] for positions 0, 1, ...

    @property
    def active(self) -> bool:
        return any(m is not None for m in self.matchers)

    def next_mask(self) -> torch.Tensor:
        """[B, V] bool: the tokens allowed at the next position (kept as that position's mask)."""
        bitmask = torch.full((len(self.matchers), bitmask_width(self.vocab_size)), -1, dtype=torch.int32)
        for row, m in enumerate(self.matchers):
            if m is not None and not self.refused[row]:
                m.fill(bitmask, row)
        self.masks.append(unpack_bitmask(bitmask.to(self.device), self.vocab_size))
        return self.masks[-1]

    def advance(self, drafts: list[int]) -> None:
        """Walks each row's matcher over its draft for the last masked position."""
        for row, (m, t) in enumerate(zip(self.matchers, drafts)):
            if m is None or self.refused[row]:
                continue
            if m.accept(t):
                self.walked[row] += 1
            else:
                self.refused[row] = True

    def draft(self, logits: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """Draft side: logits [B, V] of the next draft position masked; previous [B]: the drafts just sampled for
        the position before it (None at a step's first draft)."""
        if previous is not None:
            self.advance(previous.tolist())
        return logits.masked_fill(~self.next_mask(), float("-inf"))

    def target(self, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """Target side: logits [B, K+1, V] of the verify forward masked position by position (the masks the drafts
        were sampled under, then the rest)."""
        for i in range(len(self.masks), drafts.shape[1] + 1):
            if i:
                self.advance(drafts[:, i - 1].tolist())
            self.next_mask()
        return logits.masked_fill(~torch.stack(self.masks[:drafts.shape[1] + 1], 1), float("-inf"))

    def rollback(self) -> None:
        for m, walked in zip(self.matchers, self.walked):
            if walked:
                m.rollback(walked)
        self.walked = [0] * len(self.matchers)


def step_masks(matchers: list[HeaderMatcher | None], vocab_size: int, device) -> StepMasks | None:
    """The masks of a step of these rows; None when no row is writing its header."""
    masks = StepMasks(matchers, vocab_size, device)
    return masks if masks.active else None
