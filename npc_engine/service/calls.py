"""The `say` requests in flight: one Call each, indexed by (client, id) and by engine request id, with
the queue that waits for engine slots and the two clocks that can end a call (its deadline, and an
open say's wait for its next piece)."""
from dataclasses import dataclass

from npc_engine.dialogue import LineStream
from npc_engine.persona import Persona
from npc_engine.sampling import SamplingParams
from npc_engine.scheduler import KeyedHeap, admission_key
from npc_engine.state import Key


@dataclass
class Call:
    """One `say` (or scene line) in flight."""

    client: bytes
    id: str
    rid: str  # the engine's request id, unique within the service (a new one after each preemption)
    persona: Persona
    session: Key | None  # the conversation (npc, session, scope); None for a scene line
    text: str  # the player's text (so far, while open)
    stream: bool
    received: float
    deadline: float | None
    prompt_ids: list[int]
    prefix_len: int
    params: SamplingParams
    line: LineStream
    admitted: bool = False
    open: bool = False  # more `say.append` pieces are coming; the engine must not generate yet
    priority: str = "player"
    arrival: int = 0
    deadline_ms: float | None = None  # an open say's deadline starts with its final piece
    seq: int = 0
    tokens: int = 0
    first_token_at: float | None = None
    stats: object = None
    history_cut: bool = False  # the prompt left out turns of the conversation (done.history_cut)
    scene: tuple | None = None  # a scene line: (scope, scene id, speaker, addressee); it has no `session`

    @property
    def key(self) -> tuple[bytes, str]:
        return self.client, self.id

    @property
    def order(self) -> tuple:
        return admission_key(self.priority, self.open, self.deadline, self.arrival)


class Calls:
    def __init__(self):
        self.by_key: dict[tuple[bytes, str], Call] = {}
        self.by_rid: dict[str, Call] = {}
        self.per_client: dict[bytes, int] = {}
        self.queue = KeyedHeap()  # calls waiting for an engine slot
        self.deadlines = KeyedHeap()
        self.open_expiry = KeyedHeap()  # open calls, by when they time out waiting for their next piece

    def __len__(self) -> int:
        return len(self.by_key)

    def get(self, client: bytes, mid: str) -> Call | None:
        return self.by_key.get((client, mid))

    def add(self, call: Call, open_until: float | None) -> None:
        self.by_key[call.key] = call
        self.by_rid[call.rid] = call
        self.per_client[call.client] = self.per_client.get(call.client, 0) + 1
        self.queue.push(call.key, call.order)
        if call.deadline is not None:
            self.deadlines.push(call.key, (call.deadline,))
        if open_until is not None:
            self.open_expiry.push(call.key, (open_until,))

    def remove(self, call: Call) -> bool:
        """Forget `call`; False when it was already gone."""
        if self.by_key.get(call.key) is not call:
            return False
        del self.by_key[call.key]
        del self.by_rid[call.rid]
        for heap in (self.queue, self.deadlines, self.open_expiry):
            heap.remove(call.key)
        left = self.per_client[call.client] - 1
        if left:
            self.per_client[call.client] = left
        else:
            del self.per_client[call.client]
        return True

    def set_deadline(self, call: Call, deadline: float) -> None:
        call.deadline = deadline
        self.deadlines.push(call.key, (deadline,))
        if call.key in self.queue:  # still waiting for a slot: earliest deadline first now counts it
            self.queue.push(call.key, call.order)

    def requeue(self, call: Call, rid: str) -> None:
        """Back to the queue under a new engine request id (its old one is being cancelled)."""
        del self.by_rid[call.rid]
        call.rid, call.admitted = rid, False
        self.by_rid[rid] = call
        self.queue.push(call.key, call.order)

    def of_client(self, client: bytes) -> list[Call]:
        return [c for c in self.by_key.values() if c.client == client]

    def admitted(self) -> list[Call]:
        return [c for c in self.by_key.values() if c.admitted]

    def next_due(self, heap: KeyedHeap) -> tuple[float, Call] | None:
        top = heap.peek()
        return None if top is None else (top[0][0], self.by_key[top[1]])
