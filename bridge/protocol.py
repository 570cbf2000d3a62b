"""Wire format of the npc-engine bridge, protocol 1 (the normative text is bridge/PROTOCOL.md).

Every message is two ZeroMQ frames: the tag `NPC1`, then a msgpack map with string keys. This
module holds what both ends share: constants, encoding, decoding and the validation of client
messages, so the service and the Python client reject exactly the same things.
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import msgpack

TAG = b"NPC1"
VERSION = (1, 2)  # (major, minor); the major is also in the tag
DEFAULT_ADDR = "tcp://127.0.0.1:5555"

CLIENT_TYPES = ("hello", "say", "say.append", "cancel", "ping", "npcs",
                "session.export", "session.import", "memory.add", "memory.list", "memory.forget",
                "scene.open", "scene.say", "scene.next", "scene.event", "scene.cast", "scene.close", "scene.state")
RESERVED_PREFIXES = ("scene.",)  # other scene.* types: later minor versions
PRIORITIES = ("player", "ambient")
CAPS = ("stream", "cancel", "deadline", "priority", "history", "fallback", "guard", "hot_reload", "append", "memory",
        "scene", "emotion")

ERROR_CODES = (
    "bad_request", "unknown_type", "unknown_npc", "too_large", "overloaded", "version_mismatch",
    "duplicate_id", "unsupported", "shutting_down", "internal", "open_timeout", "bad_blob", "blob_version",
    "too_many_members", "scene_not_found", "duplicate_scene", "bad_itinerary", "scene_busy", "not_in_cast",
    "no_speaker",
)
# Codes only a client library produces, never the service (see "Client-side events" in PROTOCOL.md).
CLIENT_ERROR_CODES = ("disconnected", "timeout")

MAX_ID_CHARS = 128
MAX_NPC_CHARS = 64
MAX_SESSION_CHARS = 128
MAX_NAME_CHARS = 128
MAX_SCENE_CHARS = 64
MAX_SITUATION_CHARS = 500
MAX_ROLE_CHARS = 200
MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class Limits:
    """Per-service limits, announced in `welcome` under `limits`."""

    max_message_bytes: int = 64 * 1024  # body frame; larger ones are answered `too_large`
    max_text_chars: int = 2000  # `say.text`, or all pieces of an appended say; longer ones are answered `too_large`
    max_tokens: int = 512  # upper bound of `say.max_tokens`
    max_inflight: int = 64  # unfinished `say` requests per client; more are answered `overloaded`
    max_deadline_ms: int = 600_000
    max_open_ms: int = 30_000  # an open `say` that gets no `say.append` for this long ends with `open_timeout`
    max_blob_bytes: int = 48 * 1024  # a state blob (session.export / session.import)
    max_memories: int = 16  # per (npc, session); one more forgets the oldest
    max_memory_chars: int = 200  # `memory.add.text`
    max_scene_cast: int = 8  # NPCs in one scene
    max_scenes: int = 256  # open scenes per CURVE key
    max_itinerary: int = 32  # items of a scene's itinerary
    max_guests: int = 64  # a scene's guest list

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, wire: dict) -> "Limits":
        """The limits of a `welcome`; keys added by later minor versions are ignored."""
        return cls(**{f.name: wire[f.name] for f in fields(cls) if isinstance(wire.get(f.name), int)})


class ProtocolError(Exception):
    """A message the receiver must answer with an `error` of this code."""

    def __init__(self, code: str, message: str, id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.id = id


def encode(msg: dict) -> list[bytes]:
    """The two frames (tag, body) of one message."""
    return [TAG, msgpack.packb(msg, use_bin_type=True)]


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def unpack(data: bytes) -> Any:
    """msgpack as the wire allows it: UTF-8 strings, string or bin map keys, no ext types; raises msgpack's
    exceptions or ValueError (UnicodeDecodeError included) otherwise."""
    return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_no_ext)


def decode(frames: list[bytes], max_bytes: int) -> dict:
    """Parse the frames that follow the routing identity into a message map.

    Raises ProtocolError (with `id` None: nothing trustworthy is known yet) for a wrong frame
    count, a foreign tag, an oversized body, bytes that are not one msgpack map with string or bin
    keys. `validate` refuses bin keys: the map is known by then, so the error can depend on its type.
    """
    if len(frames) != 2:
        raise ProtocolError("bad_request", f"expected 2 frames (tag, body), got {len(frames)}")
    tag, body = frames
    if tag != TAG:
        if len(tag) == 4 and tag[:3] == b"NPC":
            raise ProtocolError("version_mismatch", f"tag {tag!r} is not spoken here: this service speaks NPC1")
        raise ProtocolError("bad_request", "the first frame must be the protocol tag NPC1")
    if len(body) > max_bytes:
        raise ProtocolError("too_large", f"body is {len(body)} bytes, the limit is {max_bytes}")
    try:
        msg = unpack(body)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ProtocolError("bad_request", f"body is not valid msgpack: {type(e).__name__}: {e}"[:300]) from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_request", f"body must be a msgpack map, got {_kind(msg)}")
    return msg


def message_id(msg: dict) -> str | None:
    """The message's `id` when it is a usable one, else None (errors then carry a null id)."""
    mid = msg.get("id")
    return mid if isinstance(mid, str) and 0 < len(mid) <= MAX_ID_CHARS else None


def error(id: str | None, code: str, message: str) -> dict:
    return {"type": "error", "id": id, "code": code, "message": message}


def _kind(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", bytes: "bin", list: "array",
            dict: "map", type(None): "nil"}.get(type(value), type(value).__name__)


def _bad(msg_id: str | None, field: str, expected: str, value: Any) -> ProtocolError:
    shown = repr(value) if isinstance(value, (int, float, str)) and len(repr(value)) <= 40 else _kind(value)
    return ProtocolError("bad_request", f"field '{field}' must be {expected}, got {shown}", msg_id)


def _string(msg: dict, field: str, msg_id: str | None, max_chars: int, required: bool = True,
            default: str | None = None, min_chars: int = 1) -> str | None:
    if msg.get(field) is None and (field not in msg or not required):
        if required:
            raise ProtocolError("bad_request", f"missing field '{field}'", msg_id)
        return default
    value = msg[field]
    if not isinstance(value, str) or not min_chars <= len(value) <= max_chars:
        raise _bad(msg_id, field, f"a string of {min_chars} to {max_chars} characters", value)
    return value


def _int(msg: dict, field: str, msg_id: str | None, lo: int, hi: int) -> int | None:
    value = msg.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(msg_id, field, f"an integer in [{lo}, {hi}]", value)
    return value


def _number(msg: dict, field: str, msg_id: str | None, lo: float, hi: float, lo_open: bool = False) -> float | None:
    value = msg.get(field)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > hi or value < lo or (lo_open and value == lo):
        interval = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise _bad(msg_id, field, f"a number in {interval}", value)
    return float(value)


def validate(msg: dict, limits: Limits) -> dict:
    """Check a decoded client message; return it normalised (defaults filled in, extra keys dropped).

    Raises ProtocolError with the code the service answers: `bad_request` naming the field,
    `unknown_type`, `unsupported` (reserved types), `too_large` (text over the limit),
    `version_mismatch` (hello with another major version).
    """
    msg_id = message_id(msg)
    if not all(isinstance(k, str) for k in msg):
        raise ProtocolError("bad_request", "map keys must be strings", msg_id)
    kind = msg.get("type")
    if "type" not in msg:
        raise ProtocolError("bad_request", "missing field 'type'", msg_id)
    if not isinstance(kind, str):
        raise _bad(msg_id, "type", "a string", kind)
    if kind not in CLIENT_TYPES and kind.startswith(RESERVED_PREFIXES):
        raise ProtocolError("unsupported", f"message type '{kind[:64]}' is reserved and not served by this version",
                            msg_id)
    if kind not in CLIENT_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type '{kind[:64]}'", msg_id)
    out = {"type": kind, "id": _string(msg, "id", msg_id, MAX_ID_CHARS)}
    if kind == "hello":
        out.update(_hello(msg, msg_id))
    elif kind == "say":
        out.update(_say(msg, msg_id, limits))
    elif kind == "say.append":
        out.update(_append(msg, msg_id, limits))
    elif kind == "session.export":
        out["session"] = _string(msg, "session", msg_id, MAX_SESSION_CHARS)
        out["npc"] = _string(msg, "npc", msg_id, MAX_NPC_CHARS, required=False)
    elif kind == "session.import":
        out["blob"] = _blob(msg, msg_id, limits)
        out["session"] = _string(msg, "session", msg_id, MAX_SESSION_CHARS, required=False)
    elif kind.startswith("memory."):
        out["npc"] = _string(msg, "npc", msg_id, MAX_NPC_CHARS)
        out["session"] = _string(msg, "session", msg_id, MAX_SESSION_CHARS)
        if kind == "memory.add":
            out["text"] = _memory_text(msg, msg_id, limits)
        elif kind == "memory.forget":
            out["memory_id"] = _int(msg, "memory_id", msg_id, 1, MAX_SEED)
    elif kind.startswith("scene."):
        out.update(_scene(kind, msg, msg_id, limits))
    return out


def _hello(msg: dict, msg_id: str | None) -> dict:
    if "protocol" not in msg:
        raise ProtocolError("bad_request", "missing field 'protocol'", msg_id)
    version = msg["protocol"]
    if (not isinstance(version, list) or len(version) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**16 for v in version)):
        raise _bad(msg_id, "protocol", "an array [major, minor] of two integers", version)
    if version[0] != VERSION[0]:
        raise ProtocolError("version_mismatch",
                            f"client speaks protocol {version[0]}, this service speaks {VERSION[0]}", msg_id)
    caps = [] if msg.get("caps") is None else msg["caps"]
    if not isinstance(caps, list) or len(caps) > 64 or not all(isinstance(c, str) and len(c) <= 64 for c in caps):
        raise _bad(msg_id, "caps", "an array of at most 64 strings", caps)
    client = _string(msg, "client", msg_id, MAX_NAME_CHARS, False, "", 0)
    return {"protocol": list(version), "client": client, "caps": caps}


def _say(msg: dict, msg_id: str | None, limits: Limits) -> dict:
    out = {
        "npc": _string(msg, "npc", msg_id, MAX_NPC_CHARS),
        "session": _string(msg, "session", msg_id, MAX_SESSION_CHARS),
    }
    out["text"] = _text(msg, msg_id, limits)
    out["max_tokens"] = _int(msg, "max_tokens", msg_id, 1, limits.max_tokens)
    out["temperature"] = _number(msg, "temperature", msg_id, 0.0, MAX_TEMPERATURE)
    out["seed"] = _int(msg, "seed", msg_id, 0, MAX_SEED)
    out["deadline_ms"] = _number(msg, "deadline_ms", msg_id, 0.0, limits.max_deadline_ms, lo_open=True)
    priority = "player" if msg.get("priority") is None else msg["priority"]
    if priority not in PRIORITIES:
        raise _bad(msg_id, "priority", "'player' or 'ambient'", priority)
    out["priority"] = priority
    out["stream"] = _bool(msg, "stream", msg_id, True)
    out["open"] = _bool(msg, "open", msg_id, False)
    return out


def _scene(kind: str, msg: dict, msg_id: str | None, limits: Limits) -> dict:
    """The fields of a `scene.*` message (1.2, cap `scene`). Itinerary items and guests are checked by the
    service's scene (npc_engine.scenes) against its limits: `bad_itinerary`, `bad_request`."""
    out = {"scene": _string(msg, "scene", msg_id, MAX_SCENE_CHARS)}
    if kind == "scene.open":
        out["cast"] = _ids(msg, "cast", msg_id, required=True)
        out["situation"] = _string(msg, "situation", msg_id, MAX_SITUATION_CHARS)
        out["host"] = _string(msg, "host", msg_id, MAX_NPC_CHARS, required=False)
        for field in ("itinerary", "guests"):
            value = [] if msg.get(field) is None else msg[field]
            if not isinstance(value, list):
                raise ProtocolError("bad_itinerary" if field == "itinerary" else "bad_request",
                                    f"field '{field}' must be an array, got {_kind(value)}", msg_id)
            out[field] = value
        out["player"] = _bool(msg, "player", msg_id, True)
        out["player_role"] = _string(msg, "player_role", msg_id, MAX_ROLE_CHARS, False, "", 0)
    elif kind in ("scene.say", "scene.next"):
        if kind == "scene.say":
            out["text"] = _text(msg, msg_id, limits)
            if not out["text"].strip():
                raise ProtocolError("bad_request", "field 'text' must not be blank", msg_id)
        else:
            out["speaker"] = _string(msg, "speaker", msg_id, MAX_NPC_CHARS, required=False)
        out["to"] = _string(msg, "to", msg_id, MAX_NPC_CHARS, required=False)
        out["max_tokens"] = _int(msg, "max_tokens", msg_id, 1, limits.max_tokens)
        out["temperature"] = _number(msg, "temperature", msg_id, 0.0, MAX_TEMPERATURE)
        out["seed"] = _int(msg, "seed", msg_id, 0, MAX_SEED)
        out["deadline_ms"] = _number(msg, "deadline_ms", msg_id, 0.0, limits.max_deadline_ms, lo_open=True)
        out["stream"] = _bool(msg, "stream", msg_id, True)
    elif kind == "scene.event":
        out["text"] = _string(msg, "text", msg_id, MAX_SITUATION_CHARS, required=False)
        out["arrive"] = _string(msg, "arrive", msg_id, MAX_NPC_CHARS, required=False)
        out["leave"] = _string(msg, "leave", msg_id, MAX_NPC_CHARS, required=False)
        item = msg.get("itinerary")
        if item is not None and item != "next" and (isinstance(item, bool) or not isinstance(item, int) or item < 0):
            raise _bad(msg_id, "itinerary", "'next' or an item number >= 0", item)
        out["itinerary"] = item
        if all(out[k] is None for k in ("text", "arrive", "leave", "itinerary")):
            raise ProtocolError("bad_request", "scene.event needs one of 'text', 'arrive', 'leave', 'itinerary'",
                                msg_id)
    elif kind == "scene.cast":
        out["add"], out["remove"] = _ids(msg, "add", msg_id), _ids(msg, "remove", msg_id)
        if not out["add"] and not out["remove"]:
            raise ProtocolError("bad_request", "scene.cast needs 'add' or 'remove'", msg_id)
    return out


def _ids(msg: dict, field: str, msg_id: str | None, required: bool = False) -> list[str]:
    """An array of persona ids (at most 64; the service's limits are smaller)."""
    if msg.get(field) is None and not required:
        return []
    value = msg.get(field)
    if (not isinstance(value, list) or len(value) > 64
            or not all(isinstance(v, str) and 0 < len(v) <= MAX_NPC_CHARS for v in value)):
        if field not in msg:
            raise ProtocolError("bad_request", f"missing field '{field}'", msg_id)
        raise _bad(msg_id, field, f"an array of persona ids (strings of 1 to {MAX_NPC_CHARS} characters)", value)
    return value


def _append(msg: dict, msg_id: str | None, limits: Limits) -> dict:
    return {"text": _text(msg, msg_id, limits), "final": _bool(msg, "final", msg_id, False)}


def _text(msg: dict, msg_id: str | None, limits: Limits) -> str:
    if "text" not in msg:
        raise ProtocolError("bad_request", "missing field 'text'", msg_id)
    text = msg["text"]
    if not isinstance(text, str):
        raise _bad(msg_id, "text", "a string", text)
    if len(text) > limits.max_text_chars:
        raise ProtocolError("too_large", f"field 'text' has {len(text)} characters, the limit is "
                            f"{limits.max_text_chars}", msg_id)
    return text


def _blob(msg: dict, msg_id: str | None, limits: Limits) -> bytes:
    if "blob" not in msg:
        raise ProtocolError("bad_request", "missing field 'blob'", msg_id)
    blob = msg["blob"]
    if not isinstance(blob, bytes):
        raise ProtocolError("bad_blob", f"field 'blob' must be bin, as session.blob sent it; got {_kind(blob)}",
                            msg_id)
    if len(blob) > limits.max_blob_bytes:
        raise ProtocolError("too_large", f"field 'blob' has {len(blob)} bytes, the limit is {limits.max_blob_bytes}",
                            msg_id)
    return blob


def _memory_text(msg: dict, msg_id: str | None, limits: Limits) -> str:
    """The memory with runs of white space made one space (what the service keeps)."""
    if "text" not in msg:
        raise ProtocolError("bad_request", "missing field 'text'", msg_id)
    if not isinstance(msg["text"], str):
        raise _bad(msg_id, "text", "a string", msg["text"])
    text = " ".join(msg["text"].split())
    if not text:
        raise ProtocolError("bad_request", "field 'text' must not be blank", msg_id)
    if len(text) > limits.max_memory_chars:
        raise ProtocolError("too_large", f"field 'text' has {len(text)} characters, the limit is "
                            f"{limits.max_memory_chars}", msg_id)
    return text


def _bool(msg: dict, field: str, msg_id: str | None, default: bool) -> bool:
    value = default if msg.get(field) is None else msg[field]
    if not isinstance(value, bool):
        raise _bad(msg_id, field, "a bool", value)
    return value
