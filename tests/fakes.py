"""The one scripted engine: the service's engine interface (npc_engine.service.engine_api.EngineAPI)
without a model, for tests and benchmarks/bench_service.py."""
import itertools
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class Scripted:
    reply: list[int]
    max_tokens: int
    complete: bool
    given: int = 0


class ScriptedEngine:
    """Each request answers with the next of `replies` (token by token, `tokens_per_step` a step, then
    finish "stop"), or without `replies` with `script` repeated until max_tokens ("length"). Admission
    takes up to `max_batch` requests a step. A step waits for `gate` (when given), sleeps `step_s`, and
    `prefill_s_per_token` for each prompt token it prefills for the requests it admits (past the persona
    prefix, and the prefix itself once while it is not cached), as a real engine spends that step
    prefilling them; `prefilled` keeps those counts, one per step. `prompts` and `params` keep what was
    submitted (prompts: or updated), by request id."""

    def __init__(self, tokenizer, replies: Iterable[str] | None = None, max_batch: int = 16, max_seq: int = 1024,
                 tokens_per_step: int = 1, prefill_s_per_token: float = 0.0, step_s: float = 0.0,
                 script: str = " Hm. Steel first, talk later, traveller.", gate: threading.Event | None = None):
        from npc_engine.engine import RequestStats, StepEvent

        self.tokenizer, self.max_batch, self.max_seq = tokenizer, max_batch, max_seq
        self.replies = None if replies is None else iter(replies)
        self.tokens_per_step, self.prefill_s_per_token, self.step_s = tokens_per_step, prefill_s_per_token, step_s
        self.script = tokenizer.encode(script, add_special_tokens=False)
        self.waiting: dict[str, tuple[Scripted, int]] = {}  # rid -> (request, persona prefix length)
        self.active: dict[str, Scripted] = {}
        self.cancelled: list[str] = []
        self.prompts: dict[str, list[int]] = {}
        self.params: dict[str, object] = {}
        self.steps = 0
        self.gate = gate
        self.prefixes: set[tuple[int, ...]] = set()  # persona prefixes cached
        self.prefilled: list[int] = []
        self.event, self.stats = StepEvent, RequestStats

    def header_matcher(self, emotions, actions):
        return None  # scripted lines have no header

    def submit(self, rid, prompt_ids, params, prefix_len=0, complete=True, header=None):
        if rid in self.active or rid in self.waiting:
            raise ValueError(f"request id {rid!r} is already in use")
        if self.replies is not None:
            reply = self.tokenizer.encode(next(self.replies), add_special_tokens=False)[:params.max_tokens]
        else:
            reply = list(itertools.islice(itertools.cycle(self.script), params.max_tokens))
        self.prompts[rid], self.params[rid] = list(prompt_ids), params
        self.waiting[rid] = (Scripted(reply, params.max_tokens, complete), prefix_len)

    def update_prompt(self, rid, prompt_ids, complete):
        self.prompts[rid] = list(prompt_ids)
        (self.active[rid] if rid in self.active else self.waiting[rid][0]).complete = complete

    def cancel(self, rid):
        if self.active.pop(rid, None) is None and self.waiting.pop(rid, None) is None:
            return False
        self.cancelled.append(rid)
        return True

    def has_work(self):
        return bool(self.cancelled or self.waiting or any(r.complete for r in self.active.values()))

    def capacity_left(self):
        return self.max_batch - len(self.active) - len(self.waiting)

    def prefix_cached(self, prefix_ids):
        return tuple(prefix_ids) in self.prefixes

    def max_prompt_len(self):
        return self.max_seq - 34

    def step(self):
        if self.gate is not None:
            self.gate.wait()
        self.steps += 1
        events = [self.event(rid, [], True, "cancelled", self.stats()) for rid in self.cancelled]
        self.cancelled = []
        prefill = sum(self.admit(self.prompts[rid], prefix_len) for rid, (_, prefix_len) in self.waiting.items())
        self.prefilled.append(prefill)
        self.active.update({rid: r for rid, (r, _) in self.waiting.items()})
        self.waiting = {}
        if self.step_s or prefill * self.prefill_s_per_token:
            time.sleep(self.step_s + prefill * self.prefill_s_per_token)
        for rid, r in [(rid, r) for rid, r in self.active.items() if r.complete]:
            tokens = r.reply[r.given:r.given + self.tokens_per_step]
            r.given += len(tokens)
            finished = r.given >= len(r.reply)
            reason = ("length" if r.given >= r.max_tokens else "stop") if finished else None
            events.append(self.event(rid, tokens, finished, reason, self.stats()))
            if finished:
                del self.active[rid]
        return events

    def admit(self, prompt: list[int], prefix_len: int) -> int:
        """The tokens a real engine prefills for this prompt: its persona prefix is computed once, then cached."""
        prefix = tuple(prompt[:prefix_len])
        tokens = len(prompt) - (prefix_len if prefix in self.prefixes else 0)
        self.prefixes.add(prefix)
        return tokens
