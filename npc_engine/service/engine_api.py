"""What the service needs from an engine: npc_engine.engine.Engine, or tests/fakes.ScriptedEngine."""
from typing import Protocol

from npc_engine.sampling import SamplingParams


class StepEventAPI(Protocol):
    rid: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "cancelled"
    stats: object  # npc_engine.engine.RequestStats: drafted, accepted, target_forwards, cached_prefix_tokens


class EngineAPI(Protocol):
    tokenizer: object  # npc_engine.tokenizer.Tokenizer: encode, decode

    def submit(self, rid: str, prompt_ids: list[int], params: SamplingParams, prefix_len: int = 0,
               complete: bool = True, header=None) -> None:
        """Queue a request; complete=False: the prompt is still arriving and nothing is generated yet. header: the
        line header its first tokens are forced to (from header_matcher; fed every token the request emits)."""

    def header_matcher(self, emotions: list[str], actions: list[str]):
        """A npc_engine.header.HeaderMatcher for one line of a persona with these lists; None without emotions."""

    def update_prompt(self, rid: str, prompt_ids: list[int], complete: bool) -> None:
        """Replace the prompt of a request submitted with complete=False."""

    def cancel(self, rid: str) -> bool:
        """End a request; its last event (finish_reason "cancelled") comes from a later step()."""

    def has_work(self) -> bool:
        """Whether step() would do anything."""

    def capacity_left(self) -> int:
        """How many more requests submit() can take now."""

    def prefix_cached(self, prefix_ids: tuple[int, ...]) -> bool:
        """Whether a persona prefix's KV is cached: a request starting with it prefills only the rest."""

    def max_prompt_len(self) -> int:
        """The longest prompt submit() accepts."""

    def step(self) -> list[StepEventAPI]:
        """One forward of every running request; the new tokens of each."""
