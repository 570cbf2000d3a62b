"""Pipelined greedy decoding: step N + 1 is launched from step N's result on the device before the host reads
step N's tokens (on with CUDA graphs; on the CPU it only adds a wasted step at the end of every request)."""
import time
from dataclasses import dataclass

import torch

from npc_engine.engine import rows
from npc_engine.engine.requests import Request
from npc_engine.engine.rows import StepResult


@dataclass
class InflightStep:
    """A greedy step launched before the previous step's tokens reached the host."""
    reqs: list[Request]
    packed: list[list[int]]  # the input rows as launched
    k: int
    result: torch.Tensor  # host copy of the step's result rows, complete once `done` has passed
    done: torch.cuda.Event | None  # None on the CPU, where the copy is synchronous
    carried: torch.Tensor  # device [B, 3]: the CARRIED input columns of each row's next step
    chained: bool  # launched while its predecessor was in flight: its arrival time is a step's cost


class Pipeline:
    def __init__(self, fw, stepper):
        self.fw, self.stepper = fw, stepper
        self.inflight: InflightStep | None = None
        self.host_buffers: dict[tuple[str, int, int], list[torch.Tensor]] = {}  # see host_buffer
        self.last_result_at = 0.0

    def step(self, reqs: list[Request], k: int, record_step_time) -> list[tuple[Request, StepResult]]:
        """Launches the next step from the in-flight one's result (or, starting a chain, this step from the
        host's tokens and the next from its result), then reads the older step."""
        previous = self.inflight or self.launch(reqs, k, None)
        self.inflight = self.launch(reqs, k, previous)
        return self.settle(previous, record_step_time)

    def launch(self, reqs: list[Request], k: int, previous: InflightStep | None) -> InflightStep:
        fw = self.fw
        packed = self.stepper.greedy_rows(reqs, k, [[]] * len(reqs), 0)
        # From page-locked memory the copy is queued behind the running step; from pageable memory it would
        # wait for that step to finish, and the device would idle while the host prepares the next one.
        staged = self.host_buffer("rows", len(packed), len(packed[0]))
        staged.copy_(torch.tensor(packed))
        on_device = staged.to(fw.device, non_blocking=True)
        ahead = 0
        if previous is not None:  # tokens and lengths from the device: the host has not seen them yet
            on_device[:, rows.CARRIED] = previous.carried
            ahead = previous.k + 1
        out = fw.greedy_step(on_device, k, fw.kv_len(max(len(r.ids) for r in reqs) + ahead + fw.span(k)), None)
        result = self.host_buffer("result", *out.shape)  # all of it: a slice would need a device-side copy first
        result.copy_(out, non_blocking=True)
        done = None
        if fw.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return InflightStep(reqs, packed, k, result, done, out[:, rows.carried(k)], previous is not None)

    def host_buffer(self, use: str, n_rows: int, cols: int) -> torch.Tensor:
        """Host memory for a step's packed rows or its result (page-locked on CUDA, so copies are asynchronous);
        two per use and shape taken in turn, as at most two steps are unread."""
        pair = self.host_buffers.get((use, n_rows, cols))
        if pair is None:
            pinned = self.fw.device.type == "cuda"
            pair = self.host_buffers[(use, n_rows, cols)] = [
                torch.empty(n_rows, cols, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        pair.reverse()
        return pair[0]

    def settle(self, step: InflightStep, record_step_time=None) -> list[tuple[Request, StepResult]]:
        """Waits for a launched step; its results for each of its requests (record_step_time(batch, k, seconds):
        the time between two results of a running chain, a step's cost)."""
        if step.done is not None:
            step.done.synchronize()
        now = time.perf_counter()
        if step.chained and record_step_time is not None:
            record_step_time(len(step.reqs), step.k, now - self.last_result_at)
        self.last_result_at = now
        return [(r, rows.unpack(out, row, step.k)) for r, row, out in zip(step.reqs, step.packed, step.result.tolist())]

    def can_chain(self, decoding: list[Request], blocked: bool, drafting: bool) -> bool:
        """Whether the next step may start from the in-flight one's result: the same requests decoding, nothing
        blocking (admissions, cancellations, prompts to prefill to their end), and drafting only if the drafter
        reads no host tokens and (with a drafter cache) was fed by the in-flight step."""
        step = self.inflight
        drafter = self.fw.drafter
        return (len(decoding) == len(step.reqs) and all(a is b for a, b in zip(decoding, step.reqs)) and not blocked
                and not (drafting and (drafter.host_drafts or step.k == 0 and drafter.cache is not None)))
