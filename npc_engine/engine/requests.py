"""A request's state from submission to its last token, and what a step reports about it."""
from dataclasses import dataclass, field

import torch

from npc_engine.engine.policy import PROBE_FIRST, Acceptance
from npc_engine.engine.slots import PrefixEntry
from npc_engine.header import HeaderMatcher
from npc_engine.sampling import SamplingParams


@dataclass
class RequestStats:
    drafted: int = 0  # drafts the target verified
    accepted: int = 0
    target_forwards: int = 0
    prefill_tokens: int = 0
    cached_prefix_tokens: int = 0

    @property
    def mean_accepted(self) -> float:
        """Tokens emitted per target verify forward."""
        return 0.0 if not self.target_forwards else (self.accepted + self.target_forwards) / self.target_forwards


@dataclass
class StepEvent:
    rid: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    stats: RequestStats | None = None


@dataclass
class Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    prefix_len: int
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)
    slot: int = -1
    generated: int = 0  # tokens counted against max_tokens (a line header's are not)
    k: int = 0  # drafts this request asks for per step
    acceptance: Acceptance = field(default_factory=lambda: Acceptance(0.0, 0.0))
    off_steps: int = 0  # steps since speculation was switched off for it
    probe_wait: int = PROBE_FIRST  # off steps before its next probe
    draft_valid: int = 0  # positions below this were fed to the drafter's cache (see its `guessed`)
    draft_exact: int = 0  # positions below this were fed to it from the line's tokens only, none from its guesses
    fed: int = 0  # prompt positions below this are in the target's cache
    shared: PrefixEntry | None = None  # positions below prefix_len are read from this entry's slot, never written
    complete: bool = True  # False while the prompt is still arriving
    cancelled: bool = False
    stats: RequestStats = field(default_factory=RequestStats)
    header: HeaderMatcher | None = None  # the line header this request writes first (fed every token emitted)

    @property
    def decoding(self) -> bool:
        return len(self.ids) > len(self.prompt)
