"""The conversation-state messages of protocol 1.2 (cap `memory`): `session.export` / `session.import` move
conversations into and out of a game's save file, `memory.add` / `memory.list` / `memory.forget` manage
what an NPC remembers about a player. Every conversation is scoped by the client's CURVE key, as `say`'s
history is (PROTOCOL.md, "History"); the state itself is npc_engine.state."""
from bridge import protocol
from npc_engine.service.config import ServiceConfig, ServiceError
from npc_engine.service.handlers import answered_as
from npc_engine.service.transport import Incoming
from npc_engine.state import Key, Memory, State, StateError, StateLimits


def open_state(config: ServiceConfig) -> State:
    """The service's conversations: in `config.state_dir` when given (durable), else in memory only."""
    limits = StateLimits(history_turns=config.history_turns, history_bytes=config.history_bytes,
                         memories=config.limits.max_memories, memory_chars=config.limits.max_memory_chars,
                         conversations=config.max_sessions, total_bytes=config.history_total_bytes,
                         blob_bytes=config.limits.max_blob_bytes)
    try:
        return State(limits, config.state_dir)
    except StateError as e:
        raise ServiceError(f"--state {config.state_dir}: {e.message}") from None


def memory_map(memory: Memory) -> dict:
    return {"memory_id": memory.id, "text": memory.text}


class StateHandlers:
    """Mixed into Service, whose `state` (npc_engine.state.State), `personas` and `transport` they use."""

    def on_session_export(self, src: Incoming, msg: dict) -> None:
        with answered_as(msg["id"]):
            blob = self.state.export_blob(msg["session"], msg["npc"], scope=src.user)
        self.transport.send(src.client, {"type": "session.blob", "id": msg["id"], "blob": blob})

    def on_session_import(self, src: Incoming, msg: dict) -> None:
        with answered_as(msg["id"]):
            keys = self.state.import_blob(msg["blob"], msg["session"], scope=src.user)
        self.transport.send(src.client, {"type": "session.imported", "id": msg["id"], "npcs": [k.npc for k in keys]})

    def on_memory_add(self, src: Incoming, msg: dict) -> None:
        if msg["npc"] not in self.personas.ids():
            known = ", ".join(self.personas.ids()[:20])
            raise protocol.ProtocolError("unknown_npc", f"no NPC '{msg['npc']}' (known: {known})", msg["id"])
        with answered_as(msg["id"]):
            memory = self.state.add_memory(Key(msg["npc"], msg["session"], src.user), msg["text"])
        self.transport.send(src.client, {"type": "memory.added", "id": msg["id"], **memory_map(memory)})

    def on_memory_list(self, src: Incoming, msg: dict) -> None:
        memories = [memory_map(m) for m in self.state.list_memories(Key(msg["npc"], msg["session"], src.user))]
        self.transport.send(src.client, {"type": "memories", "id": msg["id"], "memories": memories})

    def on_memory_forget(self, src: Incoming, msg: dict) -> None:
        forgotten = self.state.forget_memory(Key(msg["npc"], msg["session"], src.user), msg["memory_id"])
        self.transport.send(src.client, {"type": "memory.forgotten", "id": msg["id"], "forgotten": forgotten})
