"""Ordering of the service's waiting work: which request enters the engine next, which deadline
falls due next. Both are min-heaps of request keys that support removal (lazily: a removed or
re-pushed key's old heap entries are skipped when they surface)."""
import heapq
import itertools
import math
from typing import Hashable

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


def admission_order(priority: str, deadline: float | None, arrival: int) -> tuple:
    """`player` before `ambient`; within a class, earliest deadline first (none = last), then arrival."""
    return PRIORITY_RANK[priority], math.inf if deadline is None else deadline, arrival
