"""Ordering of the service's waiting work: which request enters the engine next and how many at once,
which open say gives its slot up for a complete one, which deadline falls due next. Queues are
KeyedHeaps: min-heaps of request keys that support removal (lazily: a removed or re-pushed key's old
heap entries are skipped when they surface)."""
import heapq
import itertools
import math
from collections.abc import Hashable

PRIORITY_RANK = {"player": 0, "ambient": 1}


class KeyedHeap:
    def __init__(self):
        self._heap: list[tuple[tuple, int, Hashable]] = []
        self._live: dict[Hashable, int] = {}  # key -> ticket of its current entry
        self._tickets = itertools.count()

    def push(self, key: Hashable, order: tuple) -> None:
        ticket = next(self._tickets)
        self._live[key] = ticket
        heapq.heappush(self._heap, (order, ticket, key))

    def remove(self, key: Hashable) -> None:
        self._live.pop(key, None)

    def peek(self) -> tuple[tuple, Hashable] | None:
        while self._heap:
            order, ticket, key = self._heap[0]
            if self._live.get(key) == ticket:
                return order, key
            heapq.heappop(self._heap)
        return None

    def pop(self) -> Hashable | None:
        top = self.peek()
        if top is None:
            return None
        heapq.heappop(self._heap)
        del self._live[top[1]]
        return top[1]

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._live


def admission_key(priority: str, open: bool, deadline: float | None, arrival: int) -> tuple:
    """The queue order of a say: `player` before `ambient`; within a class a complete say before an open
    one (an open say only prefills while the player types), then earliest deadline first (none = last),
    then arrival."""
    return PRIORITY_RANK[priority], open, math.inf if deadline is None else deadline, arrival


class PrefillBudget:
    """How many waiting requests enter the engine at once: while their prompt tokens still to prefill fit
    the budget, and always the first. The engine prefills an admitted prompt in its next step, so this
    bounds that step: it never runs far past the earliest deadline. A persona prefix the engine has not
    cached is prefilled in that step too, once for all the requests that share it."""

    def __init__(self, tokens: int):
        self.left, self.first = tokens, True
        self.prefixes: set[tuple[int, ...]] = set()  # uncached prefixes already counted

    def take(self, tokens: int, uncached_prefix: tuple[int, ...] = ()) -> bool:
        """tokens: the prompt's tokens past its persona prefix; uncached_prefix: that prefix when the engine has
        not cached it."""
        cost = tokens if uncached_prefix in self.prefixes else tokens + len(uncached_prefix)
        if not self.first and cost > self.left:
            return False
        self.left, self.first = self.left - cost, False
        self.prefixes.add(uncached_prefix)
        return True


def pick_preemption(holders: dict[Hashable, list[tuple[int, Hashable]]]) -> Hashable | None:
    """Fairness across connections: when a complete say waits and every engine slot is held, one open say
    (prefilling a line still being typed) gives its slot up. `holders` maps each connection to its admitted
    open says as (arrival, key); the victim is the newest open say of the connection holding the most
    slots with open says."""
    if not holders:
        return None
    says = max(holders.values(), key=len)
    return max(says)[1] if says else None
