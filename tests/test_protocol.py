"""bridge.protocol: framing, decoding and validation shared by the service and the Python client."""
import re
from dataclasses import fields
from pathlib import Path

import msgpack
import pytest

from bridge import protocol
from bridge.protocol import Limits, ProtocolError

LIMITS = Limits()
SAY = {"type": "say", "id": "r1", "npc": "blacksmith", "session": "s", "text": "Hello"}
APPEND = {"type": "say.append", "id": "r1", "text": " there"}


def decode_error(frames: list[bytes], max_bytes: int = 1024) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        protocol.decode(frames, max_bytes)
    return e.value


def validate_error(msg: dict, limits: Limits = LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        protocol.validate(msg, limits)
    return e.value


def test_encode_decode_round_trip():
    msg = {"type": "token", "id": "a", "seq": 3, "text": "héllo ✓", "stats": {"x": 1.5, "y": None}}
    frames = protocol.encode(msg)
    assert frames[0] == b"NPC1"
    assert protocol.decode(frames, 1024) == msg


@pytest.mark.parametrize("frames, code", [
    ([b"NPC1"], "bad_request"),
    ([b"NPC1", b"\x80", b"extra"], "bad_request"),
    ([b"HTTP", msgpack.packb({})], "bad_request"),
    ([b"NPC2", msgpack.packb({"type": "ping", "id": "x"})], "version_mismatch"),
    ([b"NPC1", b"\xc1"], "bad_request"),  # a byte msgpack never uses
    ([b"NPC1", msgpack.packb([1, 2])], "bad_request"),
    ([b"NPC1", msgpack.packb({1: "a"})], "bad_request"),
    ([b"NPC1", msgpack.packb({"a": msgpack.ExtType(5, b"xx")})], "bad_request"),
    ([b"NPC1", msgpack.packb({"a": 1}) + b"\x01"], "bad_request"),  # trailing bytes
    ([b"NPC1", b"\xa2\xff\xfe"], "bad_request"),  # invalid UTF-8 string
    ([b"NPC1", b"\x81" * 3000 + b"\xc0"], "too_large"),
])
def test_decode_rejects(frames, code):
    err = decode_error(frames)
    assert err.code == code
    assert err.id is None


def test_binary_keys_are_refused_keeping_a_usable_id():
    msg = protocol.decode([b"NPC1", msgpack.packb({"type": "ping", "id": "q7", b"k": 1}, use_bin_type=True)], 1024)
    err = validate_error(msg)
    assert (err.code, err.id) == ("bad_request", "q7")


def test_validate_fills_say_defaults_and_drops_unknown_keys():
    out = protocol.validate({**SAY, "future_field": [1, 2], "priority": None}, LIMITS)
    assert out == {"type": "say", "id": "r1", "npc": "blacksmith", "session": "s", "text": "Hello",
                   "max_tokens": None, "temperature": None, "seed": None, "deadline_ms": None,
                   "priority": "player", "stream": True, "open": False}
    assert protocol.validate({**SAY, "open": True}, LIMITS)["open"] is True


def test_validate_say_append():
    assert protocol.validate({**APPEND, "extra": 1}, LIMITS) == {**APPEND, "final": False}
    assert protocol.validate({**APPEND, "text": "", "final": True}, LIMITS) == {**APPEND, "text": "", "final": True}
    assert protocol.validate({**APPEND, "final": None}, LIMITS)["final"] is False


@pytest.mark.parametrize("kind, code", [
    ("scene.start", "unsupported"), ("session.export", "bad_request"), ("SAY.APPEND", "unknown_type"),
    ("session.import", "bad_request"), ("shout", "unknown_type"), ("SAY", "unknown_type"),
    ("memory.add", "bad_request"), ("MEMORY.LIST", "unknown_type"),
])
def test_reserved_and_unknown_types(kind, code):
    err = validate_error({"type": kind, "id": "x"})
    assert (err.code, err.id) == (code, "x")


@pytest.mark.parametrize("msg, field", [
    ({"id": "x"}, "type"),
    ({"type": 3, "id": "x"}, "type"),
    ({"type": "ping"}, "id"),
    ({"type": "ping", "id": ""}, "id"),
    ({"type": "ping", "id": "x" * 129}, "id"),
    ({"type": "ping", "id": 7}, "id"),
    ({"type": "hello", "id": "x"}, "protocol"),
    ({"type": "hello", "id": "x", "protocol": [1]}, "protocol"),
    ({"type": "hello", "id": "x", "protocol": ["1", 0]}, "protocol"),
    ({"type": "hello", "id": "x", "protocol": [1, 0], "client": 5}, "client"),
    ({"type": "hello", "id": "x", "protocol": [1, 0], "caps": "stream"}, "caps"),
    ({**SAY, "npc": None}, "npc"),
    ({k: v for k, v in SAY.items() if k != "npc"}, "npc"),
    ({k: v for k, v in SAY.items() if k != "session"}, "session"),
    ({k: v for k, v in SAY.items() if k != "text"}, "text"),
    ({**SAY, "npc": ""}, "npc"),
    ({**SAY, "npc": "n" * 65}, "npc"),
    ({**SAY, "session": 12}, "session"),
    ({**SAY, "text": b"bytes"}, "text"),
    ({**SAY, "max_tokens": 0}, "max_tokens"),
    ({**SAY, "max_tokens": LIMITS.max_tokens + 1}, "max_tokens"),
    ({**SAY, "max_tokens": 5.0}, "max_tokens"),
    ({**SAY, "max_tokens": True}, "max_tokens"),
    ({**SAY, "temperature": -0.1}, "temperature"),
    ({**SAY, "temperature": float("nan")}, "temperature"),
    ({**SAY, "temperature": "hot"}, "temperature"),
    ({**SAY, "seed": -1}, "seed"),
    ({**SAY, "seed": 2**64 - 1}, "seed"),
    ({**SAY, "deadline_ms": 0}, "deadline_ms"),
    ({**SAY, "deadline_ms": LIMITS.max_deadline_ms + 1}, "deadline_ms"),
    ({**SAY, "priority": "boss"}, "priority"),
    ({**SAY, "priority": ["player"]}, "priority"),
    ({**SAY, "stream": 1}, "stream"),
    ({**SAY, "open": "yes"}, "open"),
    ({**APPEND, "id": None}, "id"),
    ({k: v for k, v in APPEND.items() if k != "text"}, "text"),
    ({**APPEND, "text": 5}, "text"),
    ({**APPEND, "text": None}, "text"),
    ({**APPEND, "final": 1}, "final"),
    ({**APPEND, "final": "true"}, "final"),
])
def test_bad_request_names_the_field(msg, field):
    err = validate_error(msg)
    assert err.code == "bad_request"
    assert f"'{field}'" in err.message
    expected_id = msg.get("id") if isinstance(msg.get("id"), str) and 0 < len(msg["id"]) <= 128 else None
    assert err.id == expected_id


def test_text_over_the_limit_is_too_large():
    err = validate_error({**SAY, "text": "x" * 11}, Limits(max_text_chars=10))
    assert (err.code, err.id) == ("too_large", "r1")
    err = validate_error({**APPEND, "text": "x" * 11}, Limits(max_text_chars=10))
    assert (err.code, err.id) == ("too_large", "r1")
    assert protocol.validate({**SAY, "text": "x" * 10}, Limits(max_text_chars=10))["text"] == "x" * 10


def test_empty_text_is_allowed():
    assert protocol.validate({**SAY, "text": ""}, LIMITS)["text"] == ""


def test_hello_versions():
    out = protocol.validate({"type": "hello", "id": "h", "protocol": [1, 7]}, LIMITS)
    assert out == {"type": "hello", "id": "h", "protocol": [1, 7], "client": "", "caps": []}
    err = validate_error({"type": "hello", "id": "h", "protocol": [2, 0]})
    assert (err.code, err.id) == ("version_mismatch", "h")


def test_limits_travel_as_plain_ints():
    wire = Limits().to_wire()
    assert set(wire) == {"max_message_bytes", "max_text_chars", "max_tokens", "max_inflight", "max_deadline_ms",
                         "max_open_ms", "max_blob_bytes", "max_memories", "max_memory_chars", "max_scene_cast",
                         "max_scenes", "max_itinerary", "max_guests"}
    assert all(type(v) is int for v in wire.values())
    assert Limits.from_wire({**wire, "max_text_chars": 10, "added_later": 1}) == Limits(max_text_chars=10)


# ---- bridge/PROTOCOL.md (normative) and bridge/protocol.py name the same things ----------------------------------

SPEC = (Path(__file__).resolve().parents[1] / "bridge" / "PROTOCOL.md").read_text()


def spec_section(number: int) -> str:
    return re.search(rf"^## {number}\. .*?(?=^## )", SPEC, re.M | re.S).group(0)


def table_keys(text: str) -> set[str]:
    """The backquoted first cell of each table row (`| `code` | ...`)."""
    return set(re.findall(r"^\s*\| `([a-z_.]+)` \|", text, re.M))


def test_spec_lists_every_message_type_error_code_cap_and_limit_of_the_code():
    assert SPEC.startswith(f"# npc-engine bridge protocol, version {protocol.VERSION[0]}.{protocol.VERSION[1]}\n")
    client_types = set(re.findall(r"^#{3,4} `([a-z_.]+)`", spec_section(4), re.M))
    assert client_types == set(protocol.CLIENT_TYPES)
    errors = spec_section(5)[spec_section(5).index("| code | when |"):]
    assert table_keys(errors) == set(protocol.ERROR_CODES)
    caps = spec_section(2)[spec_section(2).index("| cap | since |"):]
    assert table_keys(caps) == set(protocol.CAPS)
    welcome_limits = re.search(r"^\| `limits` \| map \| (.*)$", spec_section(5), re.M).group(1)
    assert set(re.findall(r"`(max_[a-z_]+)`", welcome_limits)) == {f.name for f in fields(Limits)}
    assert {f'"code": "{code}"' for code in protocol.CLIENT_ERROR_CODES} <= set(
        re.findall(r'"code": "[a-z_]+"', spec_section(8)))
