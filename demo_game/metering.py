"""Stopwatches for the frame loop: time spent in the bridge client each frame, and frame times."""
import time
from collections import deque

MIN_POLL_MS = 0.1  # even a frame whose sends used the whole budget drains a little


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); 0.0 for no values."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


class MeteredClient:
    """Every call into the bridge client goes through here and is timed, so the frame loop knows
    its bridge time. `poll` gets what is left of the per-frame budget after this frame's sends."""

    def __init__(self, client, budget_ms: float):
        self.client = client
        self.budget_ms = budget_ms
        self.frame_ms = 0.0  # wall time, what the frame loses
        self.frame_cpu_ms = 0.0  # this thread's CPU time: wall time less preemption by others

    def begin_frame(self) -> None:
        self.frame_ms = self.frame_cpu_ms = 0.0

    def _timed(self, call, *args, **kwargs):
        start, start_cpu = time.perf_counter(), time.thread_time()
        try:
            return call(*args, **kwargs)
        finally:
            self.frame_ms += (time.perf_counter() - start) * 1000
            self.frame_cpu_ms += (time.thread_time() - start_cpu) * 1000

    def say(self, npc: str, text: str, **kwargs) -> str:
        return self._timed(self.client.say, npc, text, **kwargs)

    def append(self, request_id: str, text: str, final: bool) -> None:
        self._timed(self.client.append, request_id, text, final)

    def cancel(self, request_id: str) -> None:
        self._timed(self.client.cancel, request_id)

    def open_scene(self, scene: str, cast: list[str], situation: str, **kwargs) -> str:
        return self._timed(self.client.open_scene, scene, cast, situation, **kwargs)

    def scene_event(self, scene: str, **kwargs) -> str:
        return self._timed(self.client.scene_event, scene, **kwargs)

    def close_scene(self, scene: str) -> str:
        return self._timed(self.client.close_scene, scene)

    def scene_say(self, scene: str, text: str, **kwargs) -> str:
        return self._timed(self.client.scene_say, scene, text, **kwargs)

    def scene_next(self, scene: str, **kwargs) -> str:
        return self._timed(self.client.scene_next, scene, **kwargs)

    def export_session(self, session: str) -> str:
        return self._timed(self.client.export_session, session)

    def import_session(self, blob: bytes) -> str:
        return self._timed(self.client.import_session, blob)

    def serves(self, cap: str) -> bool:
        """The connected service's welcome lists `cap` (memory: saves and restores conversations; scene: runs
        scenes; emotion: lines end with their emotion and action; append: takes lines in pieces)."""
        return self.client.connected and cap in (self.client.server or {}).get("caps", [])

    def poll(self) -> list[dict]:
        budget = max(MIN_POLL_MS, self.budget_ms - self.frame_ms)
        return self._timed(self.client.poll, budget_ms=budget)

    @property
    def connected(self) -> bool:
        return self.client.connected


class FrameStats:
    """A rolling window of frame times (for the overlay) and, when `keep_all`, every frame's
    times (for the report)."""

    def __init__(self, window: int = 300, keep_all: bool = True):
        self.keep_all = keep_all
        self.frame_ms: list[float] = []   # time between the starts of consecutive frames
        self.work_ms: list[float] = []    # time the frame spent working (not waiting for vsync)
        self.bridge_ms: list[float] = []  # time inside the bridge client
        self.bridge_cpu_ms: list[float] = []  # CPU time of this thread inside the bridge client
        self.recent_frame = deque(maxlen=window)
        self.recent_bridge = deque(maxlen=window)

    def add(self, frame_ms: float, work_ms: float, bridge_ms: float, bridge_cpu_ms: float) -> None:
        self.recent_frame.append(frame_ms)
        self.recent_bridge.append(bridge_ms)
        if self.keep_all:
            self.frame_ms.append(frame_ms)
            self.work_ms.append(work_ms)
            self.bridge_ms.append(bridge_ms)
            self.bridge_cpu_ms.append(bridge_cpu_ms)

    def summary(self, skip: int = 0) -> dict:
        """p50/p99/max of each series, leaving out the first `skip` frames (window creation)."""
        out = {"frames": len(self.frame_ms)}
        for name in ("frame_ms", "work_ms", "bridge_ms", "bridge_cpu_ms"):
            values = getattr(self, name)[skip:]
            out[name] = {"p50": percentile(values, 50), "p99": percentile(values, 99),
                         "max": max(values, default=0.0)}
        return out
