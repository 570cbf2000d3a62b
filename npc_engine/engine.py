"""The batched generation engine: admission, chunked prefill, persona prefixes shared by reference, and
the speculative step shared by every active request (plain decoding is the K = 0 case).

One `step()` advances all active requests together: the drafter proposes up to K tokens per row,
the target verifies K+1 positions of every row in one forward, and each row keeps its own accepted
length. Rows live in fixed KV-cache slots; rolling back a rejected draft is just a shorter length.
A persona prefix is computed once into a prefix slot of the caches; every request with that prefix
reads its first positions from there (the prefix reference of each forward) and computes only the rest.
A prompt may arrive in pieces (`complete=False`, then `update_prompt`): its whole chunks are
prefilled as they come, and the chunk holding its last token also yields the first new token.
Greedy steps can be pipelined: step N + 1 is launched from step N's result on the device before the
host reads step N's tokens (`pipeline`, on with CUDA graphs).
"""
import json
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from npc_engine.cuda_graphs import GraphedForward, GraphedStep
from npc_engine.head import is_head_dir, load_head
from npc_engine.loading import load_model, parse_dtype
from npc_engine.model import KVCache, Transformer, fuse_projections_
from npc_engine.quantize import quantize_fp8_
from npc_engine.sampling import SamplingParams, params_tensors, probs_from_logits, sample
from npc_engine.speculative import (DRAFT_LENGTHS, K_MAX, HeadDrafter, ModelDrafter, NgramDrafter, NoDrafter, choose_k,
                                    greedy_step, kv_bucket, verify)
from npc_engine.tokenizer import Tokenizer

STREAM_CHUNK = 16  # an open prompt is prefilled in chunks of this many tokens as it arrives
PREFILL_CHUNK = 32  # a complete prompt: most new-token prompts (a player line) fit one chunk
EAGER_PREFILL_CHUNK = 128  # without CUDA graphs no shape needs repeating: fewer, larger forwards
PROBE_AFTER = 32  # steps with speculation off before a request tries K = 1 again
PROBE_ADMISSIONS = 16  # with speculation off, one new request in this many starts at K = 1


def batch_bucket(batch: int) -> int:
    """Batch sizes are timed per power of two: step times differ with the batch, not within a bucket."""
    return 1 << max(0, batch - 1).bit_length()


@dataclass
class RequestStats:
    drafted: int = 0
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
class Acceptance:
    """Running per-token acceptance rate of drafts: decayed counts of accepted drafts and of trials (an accepted
    draft, or the first rejected one of a step)."""
    hits: float
    trials: float

    @classmethod
    def prior(cls, alpha: float, weight: float = 2.0) -> "Acceptance":
        return cls(weight * alpha, weight)

    @property
    def alpha(self) -> float:
        return self.hits / self.trials if self.trials else 0.0

    def update(self, accepted: int, drafted: int, decay: float) -> None:
        self.hits = decay * self.hits + accepted
        self.trials = decay * self.trials + accepted + (accepted < drafted)


@dataclass
class PrefixEntry:
    slot: int
    refs: int = 0  # active requests reading it


@dataclass
class Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    prefix_len: int
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)
    slot: int = -1
    generated: int = 0
    k: int = 0
    acceptance: Acceptance = field(default_factory=lambda: Acceptance(0.0, 0.0))
    off_steps: int = 0
    draft_valid: int = 0  # positions below this were fed to the drafter's cache (see its `guessed`)
    fed: int = 0  # prompt positions below this are in the target's cache
    shared: PrefixEntry | None = None  # positions below prefix_len are read from this entry's slot, never written
    complete: bool = True  # False while the prompt is still arriving
    cancelled: bool = False
    stats: RequestStats = field(default_factory=RequestStats)


@dataclass
class InflightStep:
    """A greedy step launched before the previous step's tokens reached the host (pipelined decoding)."""
    reqs: list[Request]
    rows: list[list[int]]  # as launched (column 4: drafts allowed per row)
    k: int
    result: torch.Tensor  # host copy of the step's [B, 2 + k + 3] output, complete once `done` has passed
    done: torch.cuda.Event | None  # None on the CPU, where the copy is synchronous
    state: torch.Tensor  # device [B, 3]: the first packed columns of each row's next step
    chained: bool  # launched while its predecessor was in flight: its arrival time is a step's cost


class PrefixCache:
    """Persona prefixes (token tuples) held in dedicated KV-cache slots that their requests read in place:
    reference-counted, and when no slot is free the least recently used unreferenced entry gives up its slot."""

    def __init__(self, slots: list[int]):
        self.free = slots
        self.entries: OrderedDict[tuple[int, ...], PrefixEntry] = OrderedDict()
        self.hits = 0

    def acquire(self, key: tuple[int, ...]) -> tuple[PrefixEntry | None, bool]:
        """A reference to key's entry and whether its KV is already computed; (None, False) when every slot is
        referenced (or there is none)."""
        entry = self.entries.get(key)
        hit = entry is not None
        if hit:
            self.hits += 1
            self.entries.move_to_end(key)
        elif self.free:
            entry = self.entries[key] = PrefixEntry(self.free.pop())
        else:
            victim = next((k for k, e in self.entries.items() if not e.refs), None)  # oldest first
            if victim is None:
                return None, False
            entry = self.entries[key] = PrefixEntry(self.entries.pop(victim).slot)
        entry.refs += 1
        return entry, hit

    def release(self, entry: PrefixEntry) -> None:
        entry.refs -= 1


class Engine:
    def __init__(self, target: Transformer, drafter, tokenizer: Tokenizer | None, device="cpu", max_batch: int = 16,
                 max_seq: int = 1024, fixed_k: int | None = None, prefix_cache_mb: float = 256,
                 cuda_graphs: bool = True, fused_kernels: bool | None = None, pipeline: bool | None = None):
        """pipeline: launch each greedy step before the previous one's tokens reach the host (default: with
        CUDA graphs; on the CPU it only adds a wasted step at the end of every request)."""
        self.target, self.drafter, self.tokenizer = target, drafter, tokenizer
        if drafter.name != "head" and isinstance(target, Transformer):
            target.feature_store = None  # a feature head's store, left by an earlier engine on this target
        self.device = torch.device(device)
        fused = self.device.type == "cuda" if fused_kernels is None else fused_kernels
        for model in [target] + ([drafter.model] if drafter.name == "model" else []):
            model.fused = fused
            if fused and isinstance(model, Transformer) and model.model.layers[0].self_attn.qkv is None:
                fuse_projections_(model)
        # An ONNX Runtime model (onnx_backend.OnnxModel) has no parameters: it states its dtype.
        self.dtype = next(target.parameters()).dtype if isinstance(target, torch.nn.Module) else target.dtype
        self.max_batch, self.max_seq, self.fixed_k = max_batch, max_seq, fixed_k
        # Cache slots: one per batch row, the scratch slot that CUDA-graph padding rows write into, then as many
        # persona-prefix slots as prefix_cache_mb holds (a slot of the target's cache and one of the drafter's, with
        # a feature head also a slot of the target's stored features).
        draft_dtype = None if drafter.cache is None else drafter.cache.k.dtype
        slot_bytes = KVCache.slot_bytes(target.args, max_seq, self.dtype) + (
            0 if draft_dtype is None else KVCache.slot_bytes(drafter.model.args, max_seq, draft_dtype))
        if drafter.name == "head":
            slot_bytes += max_seq * (target.args.dim * draft_dtype.itemsize + 8)
        n_slots = max_batch + 1 + int(prefix_cache_mb * 2**20) // slot_bytes
        if draft_dtype is not None and (drafter.cache.max_seq != max_seq or drafter.cache.n_slots < n_slots):
            drafter.cache = None  # freed before the larger one is allocated
            drafter.cache = KVCache(drafter.model.args, n_slots, max_seq, self.device, draft_dtype)
            if drafter.name == "head":
                drafter.allocate_stores()
        self.cache = KVCache(target.args, n_slots, max_seq, self.device, self.dtype)
        self.prefix_cache = PrefixCache(list(range(n_slots - 1, max_batch, -1)))
        self.target_forward = target
        self.greedy_step = partial(greedy_step, target, self.cache, drafter)
        self.graphed = cuda_graphs and self.device.type == "cuda" and isinstance(target, torch.nn.Module)
        self.prefill_chunk = PREFILL_CHUNK if self.graphed else EAGER_PREFILL_CHUNK
        # Keys attended per forward. Graphs attend over the whole cache: the attention kernel stops at each row's
        # last position (384 vs 1024 keys cost the same on the H200, RESULTS.md S3-6), so one graph serves every length.
        self.kv_step = max_seq if self.graphed else 64
        if self.graphed:
            self.target_forward = GraphedForward(target, scratch_slot=max_batch)
            if drafter.name == "model":
                drafter.forward = GraphedForward(drafter.model, scratch_slot=max_batch)
            self.greedy_step = GraphedStep(self.greedy_step, self.target_forward.pool)
        self.stop_ids = set(tokenizer.stop_ids) if tokenizer is not None else set()
        self.free_slots = list(range(max_batch - 1, -1, -1))
        self.waiting: deque[Request] = deque()
        self.waiting_ids: set[str] = set()
        self.active: dict[str, Request] = {}
        self.pending_events: list[StepEvent] = []
        self.pipelined = self.graphed if pipeline is None else pipeline
        self.inflight: InflightStep | None = None
        self.host_buffers: dict[tuple[str, int, int], list[torch.Tensor]] = {}  # see host_buffer
        self.last_result_at = 0.0
        self.admitted_without_drafts = 0
        self.acceptance = Acceptance.prior(drafter.prior_alpha)  # over all requests: where each new one starts
        self.seed_source = random.Random()
        # Step wall times measured while serving, per (batch bucket, K): they include the host work the
        # forward-only calibration misses, which decides whether speculation pays for small models.
        self.step_seconds: dict[tuple[int, int], float] = {}
        self.forward_seconds, self.draft_cost, self.verify_cost_per_token = (
            self.measure_costs() if drafter.name != "none" else (1.0, 1.0, 0.0))

    @classmethod
    def load(cls, model_dir: str | Path, draft: str = "auto", device: str = "cpu", dtype=None, backend: str = "auto",
             onnx_provider: str | None = None, **kwargs) -> "Engine":
        """dtype: a float dtype name, "auto", or "fp8" (target weights stored as e4m3 with per-channel scales).
        draft: "none", "ngram", a model folder, or "auto" (the folder named by npc_engine.json's
        "draft" key in the model folder, else n-gram lookup). backend: "torch", "onnx" (the model folders
        are `npc-engine export-onnx` outputs) or "auto" (onnx when model_dir holds an export).
        onnx_provider: "cpu", "cuda" or "auto" (CUDA when usable, else CPU); default: the device."""
        model_dir = Path(model_dir)
        if backend == "auto":
            backend = "onnx" if (model_dir / "manifest.json").is_file() else "torch"
        if backend == "onnx":
            if dtype == "fp8":
                raise ValueError("dtype fp8 needs the torch backend (FP8 weights are not exported to ONNX)")
            from npc_engine.onnx_backend import load_onnx_model
            target = load_onnx_model(model_dir, onnx_provider or device, dtype)
            device, dtype = target.device, target.dtype
            load = partial(load_onnx_model, provider=target.provider, dtype=dtype)
        else:
            fp8 = dtype == "fp8"  # e4m3 target weights; activations (and the draft model) in the device's default
            dtype = parse_dtype(None if fp8 else dtype, device)
            load = partial(load_model, device=device, dtype=dtype)
            target = quantize_fp8_(load(model_dir)) if fp8 else load(model_dir)
        tokenizer = Tokenizer.from_dir(model_dir)
        if draft == "auto":
            hint = model_dir / "npc_engine.json"
            draft = str(model_dir / json.loads(hint.read_text())["draft"]) if hint.is_file() else "ngram"
        max_batch, max_seq = kwargs.get("max_batch", 16), kwargs.get("max_seq", 1024)
        if draft == "none":
            drafter = NoDrafter()
        elif draft == "ngram":
            drafter = NgramDrafter(target.args.vocab_size, device)
        elif is_head_dir(draft):
            if backend == "onnx":
                raise ValueError(f"feature head {draft} drafts from the target's hidden states: "
                                 f"it needs the torch backend")
            head = load_head(draft, target, device, dtype)
            drafter = HeadDrafter(head, target, max_batch + 1, max_seq, device, dtype)
        else:
            draft_model = load(draft)
            if draft_model.args.vocab_size != target.args.vocab_size:
                raise ValueError(f"draft model {draft} has vocabulary size {draft_model.args.vocab_size}, the target "
                                 f"{model_dir} has {target.args.vocab_size}: they must share one tokenizer")
            drafter = ModelDrafter(draft_model, max_batch + 1, max_seq, device, dtype)
        return cls(target, drafter, tokenizer, device, **kwargs)

    # ---- public API -------------------------------------------------------------------------
    def submit(self, rid: str, prompt_ids: list[int], params: SamplingParams, prefix_len: int = 0,
               complete: bool = True) -> None:
        """Queues a request. complete=False: the prompt is still arriving (see `update_prompt`); it is
        admitted and prefilled chunk by chunk, and generates nothing until completed."""
        if rid in self.active or rid in self.waiting_ids:
            raise ValueError(f"request id {rid!r} is already in use")
        self.check_prompt(prompt_ids)
        seed = params.seed if params.seed is not None else self.seed_source.getrandbits(63)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        prefix_len = prefix_len if 0 < prefix_len < len(prompt_ids) else 0
        self.waiting.append(Request(rid, list(prompt_ids), params, prefix_len, generator, ids=list(prompt_ids),
                                    complete=complete))
        self.waiting_ids.add(rid)

    def update_prompt(self, rid: str, prompt_ids: list[int], complete: bool) -> None:
        """Replaces the whole prompt of a request submitted with complete=False. Prefilled positions
        that still match are kept; everything from the first differing token on is recomputed."""
        r = self.active.get(rid) or next((w for w in self.waiting if w.rid == rid), None)
        if r is None or r.complete:
            raise KeyError(f"no open request {rid!r}")
        self.check_prompt(prompt_ids)
        same = next((i for i, (a, b) in enumerate(zip(r.prompt, prompt_ids)) if a != b), min(len(r.prompt), len(prompt_ids)))
        r.prompt, r.ids, r.complete = list(prompt_ids), list(prompt_ids), complete
        # A request that has not generated keeps its last prompt token unfed: its logits give the first token.
        r.fed, r.draft_valid = min(r.fed, same, len(prompt_ids) - 1), min(r.draft_valid, same, len(prompt_ids) - 1)
        if same < r.prefix_len or len(prompt_ids) <= r.prefix_len:  # the persona prefix no longer leads the prompt
            if r.shared is not None:  # its own slot never held the prefix: it is computed there from the start
                self.unshare(r)
                r.fed = r.draft_valid = r.stats.cached_prefix_tokens = 0
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
                self.waiting_ids.discard(rid)
                self.pending_events.append(StepEvent(rid, [], True, "cancelled", r.stats))
                return True
        if rid in self.active:
            self.active[rid].cancelled = True
            return True
        return False

    def has_work(self) -> bool:
        """Whether step() would do anything: an open request whose whole chunks are fed waits for its next piece."""
        return bool((self.waiting and self.free_slots) or self.pending_events or self.inflight or any(
            r.complete or r.cancelled or self.open_prefill_end(r) > r.fed for r in self.active.values()))

    @staticmethod
    def open_prefill_end(r: Request) -> int:
        """An open prompt is fed in whole chunks and never up to its last token: the completing prefill
        needs a token whose logits give the first new token (a changed last word is rolled back by
        `update_prompt`)."""
        return r.fed + (len(r.prompt) - 1 - r.fed) // STREAM_CHUNK * STREAM_CHUNK

    def capacity_left(self) -> int:
        return len(self.free_slots) - len(self.waiting)

    def max_prompt_len(self) -> int:
        return self.max_seq - K_MAX - PREFILL_CHUNK - 2

    @torch.no_grad()
    def step(self) -> list[StepEvent]:
        events, self.pending_events = self.pending_events, []
        if self.inflight is not None and not self.can_chain():
            events += self.settle(self.inflight, timed=False)  # the time since the last result may be idle time
            self.inflight = None
        for r in [r for r in self.active.values() if r.cancelled]:
            events.append(self.finish(r, [], "cancelled"))
        admitted = []
        while self.waiting and self.free_slots:
            r = self.waiting.popleft()
            self.waiting_ids.discard(r.rid)
            r.slot = self.free_slots.pop()
            # A new request starts from the acceptance the engine has seen lately (lines are short: a request
            # adapting from the drafter's fixed prior spends much of its line at the wrong K).
            alpha = self.acceptance.alpha
            r.k = self.fixed_k if self.fixed_k is not None else choose_k(alpha, self.step_cost_fn(len(self.active) + 1))
            if r.k == 0 and self.fixed_k is None and self.drafter.name != "none":
                # Speculation is off: every PROBE_ADMISSIONS-th request drafts one token, so the engine-wide
                # acceptance can recover (short lines never reach the per-request probe after PROBE_AFTER steps).
                self.admitted_without_drafts += 1
                r.k = int(self.admitted_without_drafts % PROBE_ADMISSIONS == 0)
            r.acceptance = Acceptance.prior(alpha)
            self.active[r.rid] = r
            admitted.append(r)
        if admitted:
            self.attach_prefixes(admitted)
        # Requests whose first token comes out of this step's prefill return with it now: TTFT is one prefill.
        decoding = [r for r in self.active.values() if len(r.ids) > len(r.prompt)]
        events += self.prefill([r for r in self.active.values() if r.fed < len(r.prompt)])
        if decoding:
            events += self.speculative_step(decoding)
        return events

    def capture_graphs(self, batch_sizes=(1,), sampled: bool = True) -> int:
        """Captures ahead of serving the CUDA graphs that steps of these batch sizes replay: prefill chunks, and
        every draft length the policy can pick (greedy steps and, with `sampled`, the sampled steps' target and
        draft forwards), so no capture lands inside a request. The graphs write only the scratch slot.
        Returns how many graphs were captured (0 without graphs)."""
        if not self.graphed:
            return 0
        forwards = [self.target_forward] + ([self.drafter.forward] if self.drafter.name == "model" else [])
        before = sum(len(f.graphs) for f in forwards) + len(self.greedy_step.graphs)
        ks = [0] if self.drafter.name == "none" else [0] + ([self.fixed_k] if self.fixed_k is not None else list(DRAFT_LENGTHS))
        for B in sorted({batch_bucket(b) for b in batch_sizes if b <= self.max_batch}):
            slots = torch.full((B,), self.max_batch, device=self.device)

            def zeros(T: int) -> tuple[torch.Tensor, torch.Tensor]:
                return (torch.zeros(B, T, dtype=torch.long, device=self.device),
                        torch.arange(T, device=self.device).expand(B, T))

            for T, kinds in ((self.prefill_chunk, (torch.zeros(B, dtype=torch.long, device=self.device), False)),
                             (STREAM_CHUNK, (False,))):
                for logits in kinds:
                    self.target_forward(*zeros(T), self.cache, slots, self.max_seq, logits=logits)
                self.drafter.prefill(*zeros(T), slots, self.max_seq)
            for k in ks:
                width = k if self.drafter.name == "ngram" else 0
                self.greedy_step(torch.tensor([[0, 0, 2, self.max_batch, 0, 0, 0] + [0] * width] * B,
                                              device=self.device), k, self.max_seq)
                if sampled:
                    self.target_forward(*zeros(k + 1), self.cache, slots, self.max_seq)
                    if k and self.drafter.name == "model":  # propose feeds the last two tokens, then one at a time
                        for T in (2, 1):
                            self.drafter.forward(*zeros(T), self.drafter.cache, slots, self.max_seq)
        torch.cuda.synchronize()
        return sum(len(f.graphs) for f in forwards) + len(self.greedy_step.graphs) - before

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

    # ---- internals --------------------------------------------------------------------------
    def attach_prefixes(self, reqs: list[Request]) -> None:
        """Points each request at the shared KV of its persona prefix, computing a missing one once into a prefix
        slot (target and draft model). With no slot to spare the prefix is computed in the request's own slot
        like the rest of its prompt."""
        missing = []
        for r in reqs:
            if not r.prefix_len:
                continue
            r.shared, hit = self.prefix_cache.acquire(tuple(r.prompt[:r.prefix_len]))
            if r.shared is None:
                continue
            r.fed = r.draft_valid = r.prefix_len
            if hit:
                r.stats.cached_prefix_tokens = r.prefix_len
            else:
                missing.append(r)
        self.prefill_ranges([(r, 0, r.prefix_len) for r in missing], into_prefix=True)

    def unshare(self, r: Request) -> None:
        if r.shared is not None:
            self.prefix_cache.release(r.shared)
            r.shared = None

    @staticmethod
    def prefix_ref(r: Request) -> list[int]:
        """A row's prefix reference: (prefix slot, prefix length), or length 0."""
        return [r.shared.slot, r.prefix_len] if r.shared is not None else [0, 0]

    def prefix_tensor(self, refs: list[list[int]]) -> torch.Tensor | None:
        """None when no row reads a shared prefix: the forwards then skip the per-key slot choice."""
        return torch.tensor(refs, device=self.device) if any(n for _, n in refs) else None

    def prefill(self, reqs: list[Request]) -> list[StepEvent]:
        """Feeds prompts in chunks, batched across requests: a complete prompt up to its last token, whose
        logits give the request's first token; an open one as far as `open_prefill_end`."""
        complete = [(r, r.fed, len(r.prompt)) for r in reqs if r.complete]
        streaming = [(r, r.fed, self.open_prefill_end(r)) for r in reqs if not r.complete]
        # Requests that start with speculation off leave the draft model's cache behind (a drafting step catches up);
        # a prefill that feeds the draft model catches its requests up first (an open prompt fed while none drafted).
        drafting = any(r.k for r in reqs)
        if drafting and self.drafter.cache is not None:
            self.prefill_ranges([(r, r.draft_valid, r.fed) for r in reqs], target=False)
        self.prefill_ranges(streaming, chunk=STREAM_CHUNK, draft=drafting)
        last_logits = self.prefill_ranges(complete, draft=drafting)
        for r, _, end in complete + streaming:
            r.fed = end
            if drafting:
                r.draft_valid = end
        if not last_logits:
            return []
        finishing = [r for r, _ in last_logits]
        first = self.first_tokens(finishing, torch.stack([row for _, row in last_logits]))
        return [e for e in (self.emit(r, [t]) for r, t in zip(finishing, first)) if e is not None]

    def first_tokens(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        if all(r.params.temperature == 0 for r in reqs):
            return logits.argmax(-1).tolist()
        probs = probs_from_logits(logits[:, None], *params_tensors([r.params for r in reqs], self.device))[:, 0]
        u = torch.cat([torch.rand(1, generator=r.generator, device=self.device) for r in reqs])
        return sample(probs, u).tolist()

    def prefill_ranges(self, ranges: list[tuple[Request, int, int]], target: bool = True, chunk: int | None = None,
                       into_prefix: bool = False, draft: bool = True) -> list[tuple[Request, torch.Tensor]]:
        """Feeds positions [a, b) of each request's tokens to the target (unless target=False) and the drafter
        (unless draft=False), into the request's own slot or (into_prefix) its shared prefix slot. Returns the target's
        logits at the last prompt token of each complete prompt fed to its end."""
        ranges = [(r, a, b) for r, a, b in ranges if b > a]
        chunk = chunk or self.prefill_chunk
        longest = max((b - a for _, a, b in ranges), default=0)
        last_logits = []
        for offset in range(0, longest, chunk):
            rows = [(r, a + offset, min(b, a + offset + chunk)) for r, a, b in ranges if a + offset < b]
            # CUDA graphs want few shapes: full chunks there; eager forwards pad no further than the longest row.
            width = chunk if self.graphed else max(b - a for _, a, b in rows)
            # Short rows are padded with positions past their own end: those cache entries are
            # overwritten before any query can see them.
            tokens = [r.ids[a:b] + [0] * (width - (b - a)) for r, a, b in rows]
            positions = [list(range(a, a + width)) for _, a, _ in rows]
            tokens_t = torch.tensor(tokens, device=self.device)
            pos_t = torch.tensor(positions, device=self.device)
            slots = torch.tensor([r.shared.slot if into_prefix else r.slot for r, _, _ in rows], device=self.device)
            prefix = None if into_prefix else self.prefix_tensor([self.prefix_ref(r) for r, _, _ in rows])
            kv_len = kv_bucket(max(p[-1] for p in positions) + 1, self.max_seq, self.kv_step)
            if target:
                ending = [i for i, (r, _, b) in enumerate(rows) if r.complete and b == len(r.prompt)]
                index = torch.tensor([b - 1 - a for _, a, b in rows], device=self.device) if ending else False
                logits = self.target_forward(tokens_t, pos_t, self.cache, slots, kv_len, logits=index, prefix=prefix)
                # copied: a graph's logits buffer is overwritten by its next replay
                last_logits += [(rows[i][0], logits[i].clone()) for i in ending]
                for r, a, b in rows:
                    r.stats.prefill_tokens += b - a
            if draft:
                self.drafter.prefill(tokens_t, pos_t, slots, kv_len, prefix)
        return last_logits

    def asked_k(self, reqs: list[Request]) -> int:
        """The draft length of a step of these requests: the longest any of them asks for."""
        k = max(r.k for r in reqs) if self.drafter.name != "none" else 0
        if self.fixed_k is None and k and (batch_bucket(len(reqs)), 0) not in self.step_seconds:
            return 0  # measure plain decoding once per batch size: speculation must beat it, host work included
        return k

    def speculative_step(self, reqs: list[Request]) -> list[StepEvent]:
        B, k_asked = len(reqs), self.asked_k(reqs)
        drafter = self.drafter
        if k_asked and drafter.cache is not None:  # steps without drafting left the draft cache behind
            behind = [r for r in reqs if r.draft_valid < len(r.ids) - drafter.feeds_last]
            self.prefill_ranges([(r, max(0, r.draft_valid - drafter.guessed), len(r.ids) - drafter.feeds_last)
                                 for r in behind], target=False)
        greedy = all(r.params.temperature == 0 for r in reqs)
        # n-gram drafts are looked up in the host's tokens: a step that drafts waits for the one before it
        if greedy and self.pipelined and not (self.drafter.name == "ngram" and k_asked):
            return self.pipelined_step(reqs, k_asked)
        started = time.perf_counter()  # a catch-up is paid once; the step time decides every later step
        result = self.run_greedy_step(reqs, k_asked) if greedy else self.run_sampled_step(reqs, k_asked)
        self.record_step_time(B, k_asked, time.perf_counter() - started)
        return self.apply_step(reqs, result, k_asked)

    def apply_step(self, reqs: list[Request], result: list[list[int]], k_asked: int) -> list[StepEvent]:
        """Stats, draft length and new tokens of each request from its step result row
        (accepted, next token, drafted, *drafts)."""
        events = []
        step_cost = self.step_cost_fn(len(reqs))
        for r, (n, extra_tok, n_drafted, *draft_list) in zip(reqs, result):
            r.stats.target_forwards += 1
            r.stats.drafted += n_drafted
            r.stats.accepted += n
            self.adapt_k(r, n, n_drafted, step_cost)
            events.append(self.emit(r, draft_list[:n] + [extra_tok]))
            if k_asked > 0 and self.drafter.cache is not None:  # fed every token but those it re-feeds
                r.draft_valid = len(r.ids) - self.drafter.feeds_last
        return [e for e in events if e is not None]

    def greedy_rows(self, reqs: list[Request], k: int, found: list[list[int]], width: int) -> list[list[int]]:
        """The packed rows of `greedy_step` (padded to the batch bucket with scratch-slot rows under graphs)."""
        rows = [[r.ids[-2] if len(r.ids) > 1 else r.ids[-1], r.ids[-1], len(r.ids), r.slot,
                 min(r.k, len(f) if width else k), *self.prefix_ref(r)] + f + [0] * (width - len(f))
                for r, f in zip(reqs, found)]
        if self.graphed:  # few graph shapes: pad to the batch bucket with rows on the scratch slot
            rows += [[0, 0, 2, self.max_batch, 0, 0, 0] + [0] * width] * (batch_bucket(len(reqs)) - len(reqs))
        return rows

    def run_greedy_step(self, reqs: list[Request], k: int) -> list[list[int]]:
        """Temperature 0: the whole step is one `greedy_step` call (one graph replay on CUDA) on one packed
        input tensor. Rows: (accepted, next token, drafted, *drafts)."""
        # n-gram drafts come from the host, padded to the asked K (not the longest found: fewer graph shapes)
        host_drafts = self.drafter.name == "ngram" and k > 0
        found = [self.drafter.lookup(r.ids, k) for r in reqs] if host_drafts else [[]] * len(reqs)
        if host_drafts and not any(found):
            host_drafts, k = False, 0
        rows = self.greedy_rows(reqs, k, found, k if host_drafts else 0)
        kv_len = kv_bucket(max(len(r.ids) for r in reqs) + k, self.max_seq, self.kv_step)
        out = self.greedy_step(torch.tensor(rows).to(self.device), k, kv_len)[:, :2 + k].tolist()  # the one host sync
        return [[n, extra, row[4], *drafts] for (n, extra, *drafts), row in zip(out, rows)]

    # ---- pipelined greedy decoding: the device runs step N + 1 while the host reads step N -----------------
    def pipelined_step(self, reqs: list[Request], k: int) -> list[StepEvent]:
        """Launches the next step from the in-flight one's result (or, starting a chain, this step from the
        host's tokens and the next from its result), then reads and applies the older step."""
        previous = self.inflight or self.launch_greedy(reqs, k, None)
        self.inflight = self.launch_greedy(reqs, k, previous)
        return self.settle(previous)

    def launch_greedy(self, reqs: list[Request], k: int, previous: InflightStep | None) -> InflightStep:
        rows = self.greedy_rows(reqs, k, [[]] * len(reqs), 0)
        # From page-locked memory the copy is queued behind the running step; from pageable memory it would
        # wait for that step to finish, and the device would idle while the host prepares the next one.
        staged = self.host_buffer("rows", len(rows), len(rows[0]))
        staged.copy_(torch.tensor(rows))
        packed = staged.to(self.device, non_blocking=True)
        ahead = 0
        if previous is not None:  # tokens and lengths from the device: the host has not seen them yet
            packed[:, :3] = previous.state
            ahead = previous.k + 1
        kv_len = kv_bucket(max(len(r.ids) for r in reqs) + ahead + k, self.max_seq, self.kv_step)
        out = self.greedy_step(packed, k, kv_len)
        result = self.host_buffer("result", *out.shape)  # all of it: a slice would need a device-side copy first
        result.copy_(out, non_blocking=True)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return InflightStep(reqs, rows, k, result, done, out[:, 2 + k:], previous is not None)

    def host_buffer(self, use: str, rows: int, cols: int) -> torch.Tensor:
        """Host memory for a step's packed rows or its result (page-locked on CUDA, so copies are asynchronous);
        two per use and shape taken in turn, as at most two steps are unread."""
        pair = self.host_buffers.get((use, rows, cols))
        if pair is None:
            pinned = self.device.type == "cuda"
            pair = self.host_buffers[(use, rows, cols)] = [
                torch.empty(rows, cols, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        pair.reverse()
        return pair[0]

    def settle(self, step: InflightStep, timed: bool = True) -> list[StepEvent]:
        """Waits for a launched step and applies its result to those of its requests still decoding."""
        if step.done is not None:
            step.done.synchronize()
        now = time.perf_counter()
        if step.chained and timed:  # a step's cost in a running chain: the time between two results
            self.record_step_time(len(step.reqs), step.k, now - self.last_result_at)
        self.last_result_at = now
        live = [(r, [n, extra, row[4], *rest[:step.k]]) for r, row, (n, extra, *rest) in
                zip(step.reqs, step.rows, step.result.tolist()) if self.active.get(r.rid) is r and not r.cancelled]
        return self.apply_step([r for r, _ in live], [res for _, res in live], step.k)

    def can_chain(self) -> bool:
        """Whether the next step may start from the in-flight one's result: the same requests decoding, none to
        admit, cancel or prefill to its end (an open prompt's chunks touch only its own slot), and (with a
        draft model) no drafting after a step that did not feed it, (n-gram) no drafting at all: its lookups read
        the host's tokens."""
        decoding = [r for r in self.active.values() if len(r.ids) > len(r.prompt)]
        step = self.inflight
        return (len(decoding) == len(step.reqs) and all(a is b for a, b in zip(decoding, step.reqs))
                and not (self.waiting and self.free_slots)
                and not any(r.cancelled or (r.complete and r.fed < len(r.prompt)) for r in self.active.values())
                and not ((step.k == 0 and self.drafter.cache is not None or self.drafter.name == "ngram")
                         and self.asked_k(decoding)))

    def run_sampled_step(self, reqs: list[Request], k_asked: int) -> list[list[int]]:
        B, dev = len(reqs), self.device
        seqs = [r.ids for r in reqs]
        slots = torch.tensor([r.slot for r in reqs], device=dev)
        prefix = self.prefix_tensor([self.prefix_ref(r) for r in reqs])
        temperature, top_k, top_p = params_tensors([r.params for r in reqs], dev)
        # As many uniforms every step whatever K is: a seed gives the same stream under any draft length.
        u = torch.stack([torch.rand(2 * K_MAX + 1, generator=r.generator, device=dev) for r in reqs])
        kv_len = kv_bucket(max(map(len, seqs)) + k_asked, self.max_seq, self.kv_step)
        if k_asked > 0:
            drafts, q, lens = self.drafter.propose(seqs, slots, k_asked, (temperature, top_k, top_p), u[:, :k_asked],
                                                   kv_len, prefix)
            lens = torch.minimum(lens.to(dev), torch.tensor([r.k for r in reqs], device=dev))
            drafts = drafts.to(dev)
        else:
            drafts, q, lens = torch.zeros(B, 0, dtype=torch.long, device=dev), None, torch.zeros(B, dtype=torch.long, device=dev)
        k = drafts.shape[1]
        lengths = torch.tensor([len(s) for s in seqs], device=dev)
        tokens = torch.cat([torch.tensor([s[-1] for s in seqs], device=dev)[:, None], drafts], dim=1)
        positions = (lengths - 1)[:, None] + torch.arange(k + 1, device=dev)
        logits = self.target_forward(tokens, positions, self.cache, slots, kv_len, prefix=prefix)
        q = torch.zeros(B, k, 1, device=dev) if q is None else q.to(dev)
        n_acc, extra = verify(probs_from_logits(logits, temperature, top_k, top_p), q, drafts, lens,
                              u[:, K_MAX:K_MAX + k], u[:, 2 * K_MAX])
        return torch.cat([n_acc[:, None], extra[:, None], lens[:, None], drafts], dim=1).tolist()  # the one host sync

    def adapt_k(self, r: Request, accepted: int, drafted: int, step_cost) -> None:
        if drafted:
            r.acceptance.update(accepted, drafted, 0.9)
            self.acceptance.update(accepted, drafted, 0.98)
        if self.fixed_k is not None or self.drafter.name == "none":
            return
        if r.k == 0:
            r.off_steps += 1
            if r.off_steps >= PROBE_AFTER:
                r.k, r.off_steps = 1, 0
            return
        r.k = choose_k(r.acceptance.alpha, step_cost)

    def emit(self, r: Request, new_tokens: list[int]) -> StepEvent | None:
        out = []
        for t in new_tokens:
            if t in self.stop_ids:
                return self.finish(r, out, "stop")
            out.append(t)
            r.ids.append(t)
            r.generated += 1
            if r.generated >= r.params.max_tokens or len(r.ids) >= self.max_prompt_len():
                return self.finish(r, out, "length")
        return StepEvent(r.rid, out, stats=r.stats)

    def finish(self, r: Request, tokens: list[int], reason: str) -> StepEvent:
        del self.active[r.rid]
        self.free_slots.append(r.slot)
        self.unshare(r)
        return StepEvent(r.rid, tokens, True, reason, r.stats)

    def step_cost_fn(self, batch: int):
        """step_cost(k) for choose_k: the measured time of a step drafting k tokens at this batch size,
        else the nearest measured K plus the calibrated per-token cost, else the calibration alone."""
        bucket = batch_bucket(batch)
        measured = {k: t for (b, k), t in self.step_seconds.items() if b == bucket}
        per_token = self.forward_seconds * (self.draft_cost + self.verify_cost_per_token)
        if len(measured) >= 2:  # the measured slope also counts the host work of each draft step
            lo, hi = min(measured), max(measured)
            per_token = max(per_token, (measured[hi] - measured[lo]) / (hi - lo))

        def cost(k: int) -> float:
            if k in measured:
                return measured[k]
            if measured:
                nearest = min(measured, key=lambda m: abs(m - k))
                return max(1e-9, measured[nearest] + (k - nearest) * per_token)
            return self.forward_seconds + k * per_token

        return cost

    def record_step_time(self, batch: int, k: int, seconds: float) -> None:
        key = (batch_bucket(batch), k)
        old = self.step_seconds.get(key)
        self.step_seconds[key] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def measure_costs(self) -> tuple[float, float, float]:
        """Seconds of one target decode forward; a draft step and each extra verified token relative to it."""
        t1, t9 = self.time_target(1), self.time_target(9)
        verify_cost_per_token = max(0.0, (t9 - t1) / 8 / t1)
        if self.drafter.name == "ngram":
            return t1, 0.0, verify_cost_per_token
        slots = torch.full((1,), self.max_batch, device=self.device)
        tok = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        kv_len = kv_bucket(64, self.max_seq, self.kv_step)
        # one-token forwards; a feature head's first draft of a step also re-feeds REFEED positions, which the
        # measured step times (record_step_time) count once there are some
        t_draft = self.timed(lambda: self.drafter.forward(tok, tok, self.drafter.cache, slots, kv_len))
        return t1, t_draft / t1, verify_cost_per_token

    def time_target(self, n: int) -> float:
        slots = torch.full((1,), self.max_batch, device=self.device)
        tok = torch.zeros(1, n, dtype=torch.long, device=self.device)
        pos, kv_len = torch.arange(n, device=self.device)[None], kv_bucket(64, self.max_seq, self.kv_step)
        return self.timed(lambda: self.target_forward(tok, pos, self.cache, slots, kv_len))

    def timed(self, fn, repeats: int = 5) -> float:
        with torch.no_grad():
            fn()
            times = []
            for _ in range(repeats):
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
