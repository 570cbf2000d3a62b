"""The draft-length policy: a running acceptance rate per request and engine-wide, a cost model of a step drafting
k tokens (calibrated at start, then the step times measured while serving), the K that maximises tokens per second,
and probing, so speculation switched off can turn itself back on."""
import time
from dataclasses import dataclass, field

import torch

from npc_engine.engine.rows import batch_bucket

# The draft lengths the policy picks from: each is a CUDA graph that capture_graphs makes before serving.
DRAFT_LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16)
# Steps with speculation off before a request tries K = 1 again: PROBE_FIRST, doubled after each probe up to
# PROBE_AFTER (from the start for one admitted off). A 40-token line switched off by a bad stretch never reached a
# probe after 32 steps (3 of 16 dev lines decoded their last 20-24 tokens without drafts with head Q).
PROBE_FIRST, PROBE_AFTER = 8, 32
# positions a drafter with a cache may have to catch up on before such a probe: one admitted without drafting would
# first feed it the whole prompt (with such probes a random head decoded at 0.85-0.89x an ONNX int8 target's plain
# decoding, 0.99x without: benchmarks/README.md, "A feature head on ONNX Runtime")
PROBE_CATCH_UP_MAX = 2 * PROBE_AFTER
PROBE_ADMISSIONS = 16  # with speculation off, one new request in this many starts at K = 1
# Every EXPLORE_EVERY-th drafting step takes the next draft length up, then the next down, instead of the chosen one,
# and a step time older than STALE_STEPS steps is replaced, not averaged in: on a CPU whose load moves, lengths the
# policy had stopped choosing kept one old measurement each and were never chosen again (head Q on the float32 ONNX
# export chose K = 3 on 72 % of its steps, at 1.53x plain decoding against 1.64x at a fixed K = 4:
# benchmarks/README.md, "The draft-length policy on the CPU"). The chosen length is measured every step (averaged).
EXPLORE_EVERY = STALE_STEPS = 16
# With fit_line (the CPU), a drafted step's cost is a line in K fitted to every drafted step's time, each step's weight
# decaying by LINE_DECAY a step (about the last 50 steps): one step of a given K varies with the machine's load, with
# copied drafts and with the positions a head re-feeds, and single measurements of the lengths beside the chosen one
# had the policy choose by noise (head T on the float32 export: K = 4 measured 73 ms, K = 3 46 and K = 12 54; the
# engine's K decoded at 1.56x plain decoding against 1.74x at a fixed K = 4: benchmarks/README.md, "Several layers'
# features"). GPU steps replay captured graphs and keep the per-K table. The line is fitted to what the target's
# forward over the step's tokens leaves of a step's time (Calibration.verify_seconds): that forward is not linear in
# its tokens (ONNX Runtime on this CPU, SmolLM2-135M: 32 ms for 1 token, 40-41 for 3-5, 47 for 7, 53 for 9, 57 for
# 17), and a line through whole steps had the engine draft 6 or 8 (1.82x plain decoding) where K = 4 gave 1.94x
# (benchmarks/README.md, "The head on ONNX Runtime"). A length's own step times, decayed the same way, outweigh the
# line once it has more than PRIOR_STEPS of them: the line is only a prior where a length was not measured lately.
LINE_DECAY = 0.98
PRIOR_STEPS = 4.0


@dataclass
class StepLine:
    """Exponentially weighted least squares of step seconds (less each step's `base`) against K: the decayed sums of
    w, wk, wk², wt, wkt; and each K's own decayed weight and weighted seconds (`at`)."""
    w: float = 0.0
    wk: float = 0.0
    wkk: float = 0.0
    wt: float = 0.0
    wkt: float = 0.0
    at: dict[int, list[float]] = field(default_factory=dict)

    def add(self, k: int, seconds: float, base: float = 0.0) -> None:
        d, rest = LINE_DECAY, seconds - base
        self.w, self.wk, self.wkk = d * self.w + 1, d * self.wk + k, d * self.wkk + k * k
        self.wt, self.wkt = d * self.wt + rest, d * self.wkt + k * rest
        for sums in self.at.values():
            sums[0], sums[1] = d * sums[0], d * sums[1]
        sums = self.at.setdefault(k, [0.0, 0.0])
        sums[0], sums[1] = sums[0] + 1, sums[1] + seconds

    def cost(self, k: int, base: float, line: tuple[float, float]) -> float:
        """A step of K: its own measured seconds, with the fitted line (plus base) counted as PRIOR_STEPS steps."""
        w, seconds = self.at.get(k, (0.0, 0.0))
        return (seconds + PRIOR_STEPS * (base + line[0] + line[1] * k)) / (w + PRIOR_STEPS)

    def fit(self) -> tuple[float, float] | None:
        """(seconds at K = 0 of the line, seconds per drafted token), or None before two lengths were measured."""
        if not self.w:
            return None
        mean_k, mean_t = self.wk / self.w, self.wt / self.w
        spread = self.wkk / self.w - mean_k ** 2
        if spread < 1e-6:
            return None
        slope = max(0.0, (self.wkt / self.w - mean_k * mean_t) / spread)
        return mean_t - slope * mean_k, slope


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


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens emitted per step when each draft is accepted independently with probability alpha."""
    return k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def choose_k(alpha: float, step_cost, lengths: tuple[int, ...] = DRAFT_LENGTHS) -> int:
    """Draft length (one of lengths) maximising tokens per second: step_cost(k) is the time of one step drafting k
    tokens (k = 0: plain decoding). Returns 0 (speculation off) unless some K beats plain decoding by 5%."""
    plain_rate = 1.0 / step_cost(0)
    best_k, best_rate = 0, 1.05 * plain_rate
    for k in lengths:
        rate = expected_tokens(alpha, k) / step_cost(k)
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k


@dataclass
class Calibration:
    """Seconds of one target decode forward; a draft step and each extra verified token relative to it; with
    `curve`, the target forward's seconds at several token counts (ascending)."""
    forward_seconds: float = 1.0
    draft_cost: float = 1.0
    verify_cost_per_token: float = 0.0
    curve: tuple[tuple[int, float], ...] = ()

    def verify_seconds(self, tokens: int) -> float:
        """The target's forward over this many tokens, interpolated on the curve and extended by its last slope
        past its end (0 without a curve)."""
        if len(self.curve) < 2:
            return self.curve[0][1] if self.curve else 0.0
        i = next((i for i, (n, _) in enumerate(self.curve[1:-1], 1) if tokens <= n), len(self.curve) - 1)
        (n0, t0), (n1, t1) = self.curve[i - 1], self.curve[i]
        return max(0.0, t0 + (t1 - t0) * (tokens - n0) / (n1 - n0))


def calibrate(fw, lengths: tuple[int, ...] | None = None) -> Calibration:
    """Times one- and nine-token target forwards and a one-token draft forward on the scratch slot; with lengths,
    the target forward over each K + 1 tokens too (the curve)."""
    slots = torch.full((1,), fw.scratch_slot, device=fw.device)
    kv_len = fw.kv_len(64)

    def time_target(n: int, repeats: int = 5) -> float:
        tok = torch.zeros(1, n, dtype=torch.long, device=fw.device)
        pos = torch.arange(n, device=fw.device)[None]
        return timed(lambda: fw.forward(tok, pos, fw.cache, slots, kv_len), fw.device, repeats)

    t1, t9 = time_target(1), time_target(9)
    verify_cost_per_token = max(0.0, (t9 - t1) / 8 / t1)
    curve: tuple[tuple[int, float], ...] = ()
    for n in sorted({1, *(k + 1 for k in lengths)}) if lengths else ():
        # more tokens never cost less: a measurement below the one before is this machine's noise
        curve += ((n, max(time_target(n, 3), curve[-1][1] if curve else 0.0)),)
    if fw.drafter.host_drafts:
        return Calibration(t1, 0.0, verify_cost_per_token, curve)
    tok = torch.zeros(1, 1, dtype=torch.long, device=fw.device)
    # one-token forwards; a feature head's first draft of a step also re-feeds positions, which the measured step
    # times count once there are some
    t_draft = timed(lambda: fw.drafter.forward(tok, tok, fw.drafter.cache, slots, kv_len), fw.device)
    return Calibration(t1, t_draft / t1, verify_cost_per_token, curve)


def timed(fn, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of fn() after one warm-up call."""
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


class DraftPolicy:
    """Draft lengths of the engine's requests, from `lengths` (a tree step's K is its depth, each depth a step
    shape). fixed_k: always that K (no adaptation)."""

    request_decay = 0.9  # of a request's acceptance per drafted step

    def __init__(self, drafts: bool, prior_alpha: float, fixed_k: int | None, calibration: Calibration,
                 lengths: tuple[int, ...] = DRAFT_LENGTHS, catches_up: bool = False, fit_line: bool = False):
        self.drafts, self.fixed_k, self.calibration, self.lengths = drafts, fixed_k, calibration, lengths
        self.lines: dict[int, StepLine] | None = {} if fit_line else None  # per batch bucket (LINE_DECAY)
        self.catches_up = catches_up  # the drafter has a cache that steps without drafting leave behind
        self.acceptance = Acceptance.prior(prior_alpha)  # over all requests: where each new one starts
        self.admitted_without_drafts = 0
        # Step wall times measured while serving, per (batch bucket, K): they include the host work the
        # forward-only calibration misses, which decides whether speculation pays for small models.
        self.step_seconds: dict[tuple[int, int], float] = {}
        self.measured_at: dict[tuple[int, int], int] = {}  # the step count at each key's last measurement
        self.steps = self.drafting_steps = 0
        self.seeded: set[tuple[int, int]] = set()  # step_seconds keys holding seed_step_times' values

    def admit(self, r, batch: int) -> None:
        """A new request's K and acceptance, from the acceptance the engine has seen lately (lines are short: a
        request adapting from the drafter's fixed prior spends much of its line at the wrong K)."""
        alpha = self.acceptance.alpha
        r.acceptance = Acceptance.prior(alpha)
        if self.fixed_k is not None:
            r.k = self.fixed_k
            return
        r.k = choose_k(alpha, self.step_cost_fn(batch), self.lengths)
        if r.k == 0 and self.drafts:
            # Speculation is off: every PROBE_ADMISSIONS-th request drafts one token, so the engine-wide
            # acceptance can recover (a request admitted off probes mid-line only with a prompt of at most
            # PROBE_CATCH_UP_MAX tokens: its drafter would first be fed all of it).
            self.admitted_without_drafts += 1
            r.k = int(self.admitted_without_drafts % PROBE_ADMISSIONS == 0)
            if not r.k:  # the engine's drafts fail lately: the probe admissions test them, not each line early
                r.probe_wait = PROBE_AFTER

    def update(self, r, accepted: int, drafted: int, step_cost) -> None:
        """After a step: the acceptance rates, then r's next K (or, speculation off, a probe after r.probe_wait)."""
        if drafted:
            r.acceptance.update(accepted, drafted, self.request_decay)
            self.acceptance.update(accepted, drafted, 0.98)
        if self.fixed_k is not None or not self.drafts:
            return
        if r.k == 0:
            r.off_steps += 1
            behind = len(r.ids) - r.draft_valid if self.catches_up else 0
            if r.off_steps >= r.probe_wait and behind <= PROBE_CATCH_UP_MAX:
                r.k, r.off_steps, r.probe_wait = 1, 0, min(2 * r.probe_wait, PROBE_AFTER)
            return
        r.k = choose_k(r.acceptance.alpha, step_cost, self.lengths)
        if r.k:
            self.drafting_steps += 1
            if self.drafting_steps % EXPLORE_EVERY == 0:
                i = self.lengths.index(r.k) + (1 if self.drafting_steps % (2 * EXPLORE_EVERY) else -1)
                r.k = self.lengths[min(max(i, 0), len(self.lengths) - 1)]

    def step_lengths(self) -> list[int]:
        """Every K a step may take (0: plain decoding)."""
        return [0] + ([] if not self.drafts else [self.fixed_k] if self.fixed_k is not None else list(self.lengths))

    def asked_k(self, reqs: list) -> int:
        """The draft length of a step of these requests: the longest any of them asks for."""
        k = max(r.k for r in reqs) if self.drafts else 0
        if self.fixed_k is None and k and (batch_bucket(len(reqs)), 0) not in self.step_seconds:
            return 0  # measure plain decoding once per batch size: speculation must beat it, host work included
        return k

    def step_cost_fn(self, batch: int):
        """step_cost(k) for choose_k: the measured time of a step drafting k tokens at this batch size,
        else the nearest measured K plus the calibrated per-token cost, else the calibration alone."""
        bucket, c = batch_bucket(batch), self.calibration
        measured = {k: t for (b, k), t in self.step_seconds.items() if b == bucket}
        line = None if self.lines is None or bucket not in self.lines else self.lines[bucket].fit()
        if line is not None and 0 in measured:
            lines = self.lines[bucket]
            costs = {k: max(1e-9, lines.cost(k, self.verify_seconds(batch, k), line)) for k in self.lengths}
            # fewer drafts never cost more than more drafts: a few slow steps of one length must not make its shorter
            # neighbour look dearer than the longer one
            for shorter, longer in zip(self.lengths[-2::-1], self.lengths[:0:-1]):
                costs[shorter] = min(costs[shorter], costs[longer])
            return lambda k: measured[0] if k == 0 else costs[k]
        per_token = c.forward_seconds * (c.draft_cost + c.verify_cost_per_token)
        if len(measured) >= 2:  # the measured slope also counts the host work of each draft step
            lo, hi = min(measured), max(measured)
            per_token = max(per_token, (measured[hi] - measured[lo]) / (hi - lo))

        def cost(k: int) -> float:
            if k in measured:
                return measured[k]
            if measured:
                nearest = min(measured, key=lambda m: abs(m - k))
                return max(1e-9, measured[nearest] + (k - nearest) * per_token)
            return c.forward_seconds + k * per_token

        return cost

    def verify_seconds(self, batch: int, k: int) -> float:
        """The calibrated target forward over a step's tokens: batch rows of k + 1 (0 without a curve)."""
        return self.calibration.verify_seconds(batch_bucket(batch) * (k + 1))

    def seed_step_times(self, seconds: dict[tuple[int, int], float]) -> None:
        """Drafted steps' costs before any is measured (replays of captured graphs: no host work); plain decoding is
        still measured first, and a step's first measurement replaces its seed."""
        for key, value in seconds.items():
            if key[1] and key not in self.step_seconds:
                self.step_seconds[key] = value
                self.seeded.add(key)

    def record_step_time(self, batch: int, k: int, seconds: float) -> None:
        """With a draft tree, a sampled step's chain of K and a greedy tree of depth K share the key."""
        key = (batch_bucket(batch), k)
        if self.lines is not None and k:
            self.lines.setdefault(key[0], StepLine()).add(k, seconds, self.verify_seconds(batch, k))
        self.steps += 1
        old = self.step_seconds.get(key)
        if key in self.seeded or self.steps - self.measured_at.get(key, self.steps) > STALE_STEPS:
            self.seeded.discard(key)
            old = None
        self.step_seconds[key] = seconds if old is None else 0.8 * old + 0.2 * seconds
        self.measured_at[key] = self.steps
