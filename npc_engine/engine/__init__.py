"""The batched generation engine: requests are admitted into KV-cache slots, their prompts prefilled (persona prefixes
shared by reference), then one speculative step at a time advances every decoding request together.

The modules follow one request's path: requests (its state) -> slots (cache slots, prefix cache) -> prefill ->
policy (its draft length) -> rows + stepping (the step) -> pipeline (greedy steps launched ahead); forwards holds
what runs on the device, capture its CUDA graphs, load the folders on disk. `Engine` is the facade a service drives:
submit, update_prompt, cancel, has_work, step.
"""
import random
import time
from collections import deque
from pathlib import Path

import torch

from npc_engine.drafters import K_MAX, Drafter
from npc_engine.engine.capture import capture_graphs, greedy_step_seconds
from npc_engine.engine.forwards import Forwards, compile_step_layers, use_fused_kernels
from npc_engine.engine.load import load_parts
from npc_engine.engine.pipeline import Pipeline
from npc_engine.engine.policy import DRAFT_LENGTHS, Calibration, DraftPolicy, calibrate
from npc_engine.engine.prefill import PREFILL_CHUNK, Prefiller, open_prefill_end
from npc_engine.engine.requests import Request, RequestStats, StepEvent
from npc_engine.engine.rows import StepResult
from npc_engine.engine.slots import Slots, slot_count
from npc_engine.engine.stepping import Stepper
from npc_engine.engine.trees import SPAN_MAX, TreeShape
from npc_engine.header import HeaderCompiler, HeaderMatcher, step_masks
from npc_engine.model import KVCache, Transformer
from npc_engine.sampling import SamplingParams
from npc_engine.tokenizer import Tokenizer

__all__ = ["Engine", "RequestStats", "StepEvent"]


class Engine:
    def __init__(self, target: Transformer, drafter: Drafter, tokenizer: Tokenizer | None, device="cpu",
                 max_batch: int = 16, max_seq: int = 1024, fixed_k: int | None = None, prefix_cache_mb: float = 256,
                 cuda_graphs: bool = True, fused_kernels: bool | None = None, pipeline: bool | None = None,
                 max_prefill_tokens: int | None = None, compiled: bool = False, draft_tree: TreeShape | None = None):
        """pipeline: launch each greedy step before the previous one's tokens reach the host (default: with CUDA
        graphs). prefix_cache_mb: memory for persona-prefix slots. max_prefill_tokens: prompt tokens a step
        prefills at most, persona prefixes included (Prefiller), none: every admitted prompt whole. compiled: on the
        CPU, torch.compile each decoder layer (forwards.compile_step_layers; the first steps of each shape wait for the
        compiler).
        draft_tree: greedy drafted steps verify a draft tree of that shape (npc_engine.engine.trees; a feature head
        drafter, the torch backend); sampled steps draft a chain."""
        self.target, self.drafter, self.tokenizer = target, drafter, tokenizer
        self.device = torch.device(device)
        draft_lengths = tree_draft_lengths(draft_tree, target, drafter, fixed_k)
        if compiled:
            if self.device.type != "cpu" or not isinstance(target, Transformer):
                raise ValueError("--compile (compiled layers) is for the torch backend on the CPU; on CUDA the "
                                 "engine captures graphs instead: drop --compile")
            compile_step_layers(target, drafter)
        fused = self.device.type == "cuda" if fused_kernels is None else fused_kernels
        use_fused_kernels(target, drafter, fused)
        # An ONNX Runtime model (onnx_backend.OnnxModel) has no parameters: it states its dtype.
        self.dtype = next(target.parameters()).dtype if isinstance(target, torch.nn.Module) else target.dtype
        self.max_batch, self.max_seq = max_batch, max_seq
        n_slots = slot_count(target.args, self.dtype, drafter, max_batch, max_seq, prefix_cache_mb)
        drafter.allocate(n_slots, max_seq)
        self.cache = KVCache(target.args, n_slots, max_seq, self.device, self.dtype)
        self.slots = Slots(max_batch, n_slots)
        graphed = cuda_graphs and self.device.type == "cuda" and isinstance(target, torch.nn.Module)
        self.fw = Forwards(target, drafter, self.cache, self.device, max_batch, max_seq, graphed, draft_tree)
        self.attach_features()
        self.prefiller, self.stepper = Prefiller(self.fw, self.slots, max_prefill_tokens), Stepper(self.fw)
        self.pipeline = Pipeline(self.fw, self.stepper) if (graphed if pipeline is None else pipeline) else None
        fit_line = self.device.type == "cpu"  # the policy's step costs: see npc_engine.engine.policy.LINE_DECAY
        calibration = Calibration()
        if drafter.drafts:
            calibration = calibrate(self.fw, draft_lengths if fit_line and fixed_k is None else None)
        self.policy = DraftPolicy(drafter.drafts, drafter.prior_alpha, fixed_k, calibration, draft_lengths,
                                  catches_up=drafter.cache is not None, fit_line=fit_line)
        self.stop_ids = set(tokenizer.stop_ids) if tokenizer is not None else set()
        self.waiting: deque[Request] = deque()
        self.active: dict[str, Request] = {}
        self.pending_events: list[StepEvent] = []
        self.seed_source = random.Random()
        self.last_stats: RequestStats | None = None
        self.headers: HeaderCompiler | None = None  # made on the first header asked for

    @classmethod
    def load(cls, model_dir: str | Path, draft: str = "auto", device: str = "cpu", dtype=None, backend: str = "auto",
             onnx_provider: str | None = None, adapter: str | Path | None = None, **kwargs) -> "Engine":
        """An engine on model folders: see npc_engine.engine.load.load_parts for the arguments."""
        target, drafter, tokenizer, device = load_parts(model_dir, draft, device, dtype, backend, onnx_provider,
                                                        kwargs.get("max_batch", 16), kwargs.get("max_seq", 1024),
                                                        adapter)
        return cls(target, drafter, tokenizer, device, **kwargs)

    @property
    def graphed(self) -> bool:
        return self.fw.graphed

    @property
    def prefix_cache(self):
        return self.slots.prefixes

    # ---- the service's interface ------------------------------------------------------------------------------
    def submit(self, rid: str, prompt_ids: list[int], params: SamplingParams, prefix_len: int = 0,
               complete: bool = True, header: HeaderMatcher | None = None) -> None:
        """Queues a request. complete=False: the prompt is still arriving (see `update_prompt`); it is
        admitted and prefilled chunk by chunk, and generates nothing until completed. header: the line header
        (`header_matcher`) its first tokens are forced to (they do not count against max_tokens); it is fed the
        tokens the request emits."""
        if rid in self.active or any(w.rid == rid for w in self.waiting):
            raise ValueError(f"request id {rid!r} is already in use")
        self.check_prompt(prompt_ids)
        seed = params.seed if params.seed is not None else self.seed_source.getrandbits(63)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        prefix_len = prefix_len if 0 < prefix_len < len(prompt_ids) else 0
        self.waiting.append(Request(rid, list(prompt_ids), params, prefix_len, generator, ids=list(prompt_ids),
                                    complete=complete, header=header))

    def header_matcher(self, emotions: list[str], actions: list[str]) -> HeaderMatcher | None:
        """A header for one line of a persona with these lists (npc_engine.header); None without emotions."""
        if not emotions:
            return None
        if self.headers is None:
            self.headers = HeaderCompiler(self.tokenizer, self.target.args.vocab_size)
        return self.headers.matcher(emotions, actions)

    def update_prompt(self, rid: str, prompt_ids: list[int], complete: bool) -> None:
        """Replaces the whole prompt of a request submitted with complete=False. Prefilled positions
        that still match are kept; everything from the first differing token on is recomputed."""
        r = self.active.get(rid) or next((w for w in self.waiting if w.rid == rid), None)
        if r is None or r.complete:
            raise KeyError(f"no open request {rid!r}")
        self.check_prompt(prompt_ids)
        same = next((i for i, (a, b) in enumerate(zip(r.prompt, prompt_ids)) if a != b),
                    min(len(r.prompt), len(prompt_ids)))
        r.prompt, r.ids, r.complete = list(prompt_ids), list(prompt_ids), complete
        # A request that has not generated keeps its last prompt token unfed: its logits give the first token.
        r.fed, r.draft_valid = min(r.fed, same, len(prompt_ids) - 1), min(r.draft_valid, same, len(prompt_ids) - 1)
        r.draft_exact = min(r.draft_exact, r.draft_valid)
        if same < r.prefix_len or len(prompt_ids) <= r.prefix_len:  # the persona prefix no longer leads the prompt
            if r.shared is not None:  # its own slot never held the prefix: it is computed there from the start
                self.slots.unshare(r)
                r.fed = r.draft_valid = r.draft_exact = r.stats.cached_prefix_tokens = 0
            r.prefix_len = 0

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) > self.max_prompt_len():
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; this engine takes at most {self.max_prompt_len()}")
        bad = [t for t in prompt_ids if not 0 <= t < self.target.args.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary (size {self.target.args.vocab_size})")

    def cancel(self, rid: str) -> bool:
        for r in self.waiting:
            if r.rid == rid:
                self.waiting.remove(r)
                self.pending_events.append(StepEvent(rid, [], True, "cancelled", r.stats))
                return True
        if rid in self.active:
            self.active[rid].cancelled = True
            return True
        return False

    def has_work(self) -> bool:
        """Whether step() would do anything: an open request whose whole chunks are fed waits for its next piece."""
        return bool((self.waiting and self.slots.free) or self.pending_events or self.inflight or any(
            r.complete or r.cancelled or open_prefill_end(r) > r.fed for r in self.active.values()))

    def capacity_left(self) -> int:
        return len(self.slots.free) - len(self.waiting)

    def prefix_cached(self, prefix_ids: tuple[int, ...]) -> bool:
        """Whether a persona prefix's KV is cached: a request that starts with it prefills only the rest."""
        return tuple(prefix_ids) in self.slots.prefixes

    def max_prompt_len(self) -> int:
        return self.max_seq - K_MAX - PREFILL_CHUNK - 2

    @property
    def inflight(self):
        return self.pipeline.inflight if self.pipeline is not None else None

    def attach_features(self) -> None:
        """Engines may share one target (a benchmark's, each with its own drafter): the target stores the features
        this engine's feature head reads, in that head's store, or none."""
        if self.drafter.uses_features:
            self.drafter.attach()
        else:
            self.fw.target.feature_store = None

    @torch.no_grad()
    def step(self) -> list[StepEvent]:
        self.attach_features()
        events, self.pending_events = self.pending_events, []
        if self.inflight is not None and not self.can_chain():
            events += self.apply(self.pipeline.settle(self.pipeline.inflight), self.inflight.k)  # untimed: idle time
            self.pipeline.inflight = None
        for r in [r for r in self.active.values() if r.cancelled]:
            events.append(self.finish(r, [], "cancelled"))
        admitted = []
        while self.waiting and self.slots.free:
            r = self.waiting.popleft()
            self.slots.take(r)
            self.policy.admit(r, len(self.active) + 1)
            self.active[r.rid] = r
            admitted.append(r)
        spent = self.prefiller.attach_prefixes(admitted)
        # Requests whose first token comes out of this step's prefill return with it now: TTFT is one prefill.
        decoding = [r for r in self.active.values() if r.decoding]
        first = self.prefiller.prefill([r for r in self.active.values() if r.fed < len(r.prompt)], spent)
        events += [e for e in (self.emit(r, [t]) for r, t in first) if e is not None]
        if decoding:
            events += self.decode(decoding)
        return events

    def capture_graphs(self, batch_sizes=(1,), sampled: bool = True) -> int:
        """Captures ahead of serving the CUDA graphs of these batch sizes (npc_engine.engine.capture), then times
        their greedy steps for the draft policy."""
        ks = self.policy.step_lengths()
        self.attach_features()
        captured = capture_graphs(self.fw, self.prefiller.chunk, ks, batch_sizes, sampled)
        if captured and self.drafter.drafts:
            self.policy.seed_step_times(greedy_step_seconds(self.fw, ks, batch_sizes))
        return captured

    def generate(self, prompt_ids: list[int], params: SamplingParams, rid: str = "generate"):
        """Yields token ids of one request as they are produced (for the CLI and benchmarks)."""
        self.submit(rid, prompt_ids, params)
        while True:
            for ev in self.step():
                if ev.rid == rid:
                    yield from ev.token_ids
                    if ev.finished:
                        self.last_stats = ev.stats
                        return

    # ---- one decoding step --------------------------------------------------------------------------------------
    def decode(self, reqs: list[Request]) -> list[StepEvent]:
        k = self.policy.asked_k(reqs)
        if k:  # steps without drafting left the drafter's cache behind
            self.prefiller.catch_up(reqs)
        # A line header being written is masked at each draft and verified position: the sampled step does it (its
        # temperature 0 is the masked argmax), with the host in the loop for a few steps at the start of a line.
        masks = step_masks([r.header for r in reqs], self.target.args.vocab_size, self.device)
        greedy = masks is None and all(r.params.temperature == 0 for r in reqs)
        # host drafts are looked up in the host's tokens: a step that drafts waits for the one before it
        if greedy and self.pipeline is not None and not (self.drafter.host_drafts and k):
            return self.apply(self.pipeline.step(reqs, k, self.policy.record_step_time), k)
        stale = self.prefiller.stale(reqs) if k else 0  # graphed steps re-feed all a drafter may have guessed
        started = time.perf_counter()  # a catch-up is paid once; the step time decides every later step
        results = self.stepper.greedy(reqs, k, stale) if greedy else self.stepper.sampled(reqs, k, stale, masks)
        if masks is None:  # a masked step's host work is not what later steps cost
            self.policy.record_step_time(len(reqs), k, time.perf_counter() - started)
        return self.apply(list(zip(reqs, results)), k)

    def can_chain(self) -> bool:
        decoding = [r for r in self.active.values() if r.decoding]
        blocked = bool(self.waiting and self.slots.free) or any(
            r.cancelled or (r.complete and r.fed < len(r.prompt)) for r in self.active.values())
        return self.pipeline.can_chain(decoding, blocked, bool(decoding and self.policy.asked_k(decoding)))

    def apply(self, results: list[tuple[Request, StepResult]], k_asked: int) -> list[StepEvent]:
        """Stats, draft length and new tokens of each request still decoding from its step result."""
        live = [(r, res) for r, res in results if self.active.get(r.rid) is r and not r.cancelled]
        step_cost = self.policy.step_cost_fn(len(live))
        events = []
        for r, res in live:
            start = len(r.ids)
            r.stats.target_forwards += 1
            r.stats.drafted += res.proposed
            r.stats.accepted += res.accepted
            self.policy.update(r, res.accepted, res.proposed, step_cost)
            events.append(self.emit(r, res.drafts[:res.accepted] + [res.next_token]))
            if k_asked and self.drafter.cache is not None:  # fed every token but those it re-feeds, only the line's
                r.draft_valid, r.draft_exact = len(r.ids) - self.drafter.feeds_last, start  # before its drafts
        return [e for e in events if e is not None]

    def emit(self, r: Request, new_tokens: list[int]) -> StepEvent | None:
        out = []
        for t in new_tokens:
            if t in self.stop_ids:
                return self.finish(r, out, "stop")
            out.append(t)
            r.ids.append(t)
            if r.header is not None and not r.header.done:
                r.header.accept(t)  # max_tokens bounds the spoken words: the header's tokens do not count
            else:
                r.generated += 1
            if r.generated >= r.params.max_tokens or len(r.ids) >= self.max_prompt_len():
                return self.finish(r, out, "length")
        return StepEvent(r.rid, out, stats=r.stats)

    def finish(self, r: Request, tokens: list[int], reason: str) -> StepEvent:
        del self.active[r.rid]
        self.slots.give_back(r)
        return StepEvent(r.rid, tokens, True, reason, r.stats)


def tree_draft_lengths(tree: TreeShape | None, target: torch.nn.Module, drafter: Drafter,
                       fixed_k: int | None) -> tuple[int, ...]:
    """The draft lengths (tree depths) an engine with this draft tree may pick; a clear error for what cannot run it."""
    if tree is None:
        return DRAFT_LENGTHS
    if not drafter.drafts_trees:
        raise ValueError(f"a draft tree needs a feature-head drafter (--draft HEAD_DIR), not {drafter.name!r}")
    if not isinstance(target, Transformer):
        raise ValueError("a draft tree runs the torch backend's forward: drop --backend onnx")
    if fixed_k is not None and not tree.fits(fixed_k):
        raise ValueError(f"a draft tree {tree.width},{tree.nodes} of depth {fixed_k}: it writes {tree.span(fixed_k)} "
                         f"positions ahead (at most {SPAN_MAX}) and cannot be deeper than its nodes")
    return tuple(k for k in DRAFT_LENGTHS if tree.fits(k))
