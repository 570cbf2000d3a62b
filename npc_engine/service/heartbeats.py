"""Heartbeats answered while the engine steps. The loop thread owns the socket and runs `engine.step()`; a step of
long prompts on a slow CPU can take seconds, longer than a client's heartbeat timeout (PROTOCOL.md section 7), and a
client would call a busy service lost. So while the loop is inside a step it lends the socket to this thread, which
answers `ping` and `hello` and keeps every other message for the loop, in order.

Every handover goes through a lock (a full memory barrier, which is what ZeroMQ asks of a socket that moves between
threads): the loop marks the socket lent, and at the end of the step unmarks it and waits for a read in progress;
the thread reads only while it holds the lock and the socket is lent. That costs the loop two uncontended locks a
step and no thread wake-up: the engine keeps its thread (and its CUDA graphs), and a short step pays nothing more."""
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("npc_engine.service")

CHECK_S = 0.05  # how often the thread looks whether the loop is lending the socket


class Heartbeats:
    def __init__(self, read: Callable[[], None]):
        """read: answers the heartbeats waiting in the socket and keeps the other messages (run on this thread)."""
        self.read = read
        self.lock = threading.Lock()
        self.lending = False
        self.running = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.running.set()
        self.thread = threading.Thread(target=self.run, name="npc-engine-heartbeats", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.running.clear()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    @contextmanager
    def lent(self) -> Iterator[None]:
        """Lends the socket to the heartbeat thread while the block (one engine step) runs: the loop must not touch
        it meanwhile."""
        with self.lock:
            self.lending = True
        try:
            yield
        finally:
            self.lending = False
            with self.lock:  # a read in progress ends before the loop uses the socket again
                pass

    def run(self) -> None:
        while self.running.is_set():
            time.sleep(CHECK_S)
            with self.lock:
                if not self.lending:
                    continue
                try:
                    self.read()
                except Exception:
                    log.exception("answering heartbeats during a step failed")
