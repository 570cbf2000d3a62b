"""The C ABI (bridge/c): built with CMake into build/c/, driven through ctypes against a live service
on loopback: every call, every error path, CURVE, and memory that stays flat over 10,000 says.
Skipped, with the reason, where cmake, the compiler or the headers are missing (Debian: apt-get
install cmake g++ make libzmq3-dev cppzmq-dev libmsgpack-cxx-dev)."""
import ctypes
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.auth

from test_cpp_client import missing_toolchain
from test_service import LONG, PLAIN_FALLBACKS, chatty_model_dir, personas_dir, service, start_service, stop_service  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "c"
OK, ERR_ARGUMENT, ERR_BUFFER, ERR_TRANSPORT = 0, -1, -2, -3
TOKEN, DONE, ERROR, WELCOME, PONG, NPCS, CONNECTION = range(1, 8)
FALLBACK, CANCELLED, DEFLECTED, SYNTHETIC, CONNECTED = 1, 2, 4, 8, 16
LIST_NPCS, LIST_CAPS = 0, 1
c_str, c_ptr, c_size = ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t


class Options(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("endpoint", c_str), ("client_name", c_str), ("curve_server_key", c_str),
                ("curve_public_key", c_str), ("curve_secret_key", c_str), ("budget_ms", ctypes.c_double),
                ("ping_interval_s", ctypes.c_double), ("heartbeat_timeout_s", ctypes.c_double),
                ("deadline_grace_ms", ctypes.c_double)]


class SayOptions(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("priority", ctypes.c_int32), ("max_tokens", ctypes.c_int64),
                ("seed", ctypes.c_int64), ("temperature", ctypes.c_double), ("deadline_ms", ctypes.c_double),
                ("stream", ctypes.c_int32), ("open", ctypes.c_int32)]


class Stats(ctypes.Structure):
    COUNTS = ("drafted", "accepted", "target_forwards", "cached_prefix_tokens", "prompt_tokens")
    _fields_ = [("ttft_ms", ctypes.c_double), ("total_ms", ctypes.c_double)] + [(n, ctypes.c_int64) for n in COUNTS]


SIGNATURES = {  # name: (restype, argtypes)
    "npc_abi_version": (ctypes.c_int32, []),
    "npc_last_error": (c_str, []),
    "npc_options_init": (None, [ctypes.POINTER(Options)]),
    "npc_say_options_init": (None, [ctypes.POINTER(SayOptions)]),
    "npc_connect": (ctypes.c_int32, [ctypes.POINTER(Options), ctypes.POINTER(c_ptr)]),
    "npc_close": (None, [c_ptr]),
    "npc_connected": (ctypes.c_int32, [c_ptr]),
    "npc_server": (ctypes.c_int32, [c_ptr, ctypes.POINTER(c_ptr)]),
    "npc_say": (ctypes.c_int32, [c_ptr, c_str, c_str, c_str, c_str, ctypes.POINTER(SayOptions), c_str, c_size]),
    "npc_append": (ctypes.c_int32, [c_ptr, c_str, c_str, ctypes.c_int32]),
    "npc_cancel": (ctypes.c_int32, [c_ptr, c_str]),
    "npc_hello": (ctypes.c_int32, [c_ptr, c_str, c_size]),
    "npc_ping": (ctypes.c_int32, [c_ptr, c_str, c_size]),
    "npc_npcs": (ctypes.c_int32, [c_ptr, c_str, c_size]),
    "npc_poll": (ctypes.c_int32, [c_ptr, ctypes.c_double]),
    "npc_next_event": (c_ptr, [c_ptr]),
    "npc_wait": (ctypes.c_int32, [c_ptr, ctypes.c_int32]),
    "npc_event_free": (None, [c_ptr]),
    "npc_event_type": (ctypes.c_int32, [c_ptr]),
    "npc_event_seq": (ctypes.c_int64, [c_ptr]),
    "npc_event_tokens": (ctypes.c_int64, [c_ptr]),
    "npc_event_flags": (ctypes.c_uint32, [c_ptr]),
    "npc_event_stats": (None, [c_ptr, ctypes.POINTER(Stats)]),
    "npc_event_limit": (ctypes.c_int64, [c_ptr, c_str]),
    "npc_event_list_size": (c_size, [c_ptr, ctypes.c_int32]),
    "npc_event_list_item": (c_str, [c_ptr, ctypes.c_int32, c_size]),
    **{f"npc_event_{field}": (c_str, [c_ptr]) for field in ("type_name", "id", "text", "code", "message", "instance")},
}


def build_library() -> Path:
    """Configures and builds bridge/c with CMake into build/c/ (incremental); returns the library."""
    reason = missing_toolchain() or (None if shutil.which("cmake") else "cmake not installed")
    if reason:
        pytest.skip(reason)
    for command in (["cmake", "-S", str(REPO / "bridge" / "c"), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=RelWithDebInfo"],
                    ["cmake", "--build", str(BUILD)]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    return BUILD / "libnpc_bridge.so"


@pytest.fixture(scope="module")
def lib():
    lib = ctypes.CDLL(str(build_library()))
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def connect(lib, endpoint: str, **fields) -> int:
    options = Options()
    lib.npc_options_init(options)
    options.endpoint = endpoint.encode()
    for key, value in fields.items():
        setattr(options, key, value.encode() if isinstance(value, str) else value)
    handle = c_ptr()
    assert lib.npc_connect(options, ctypes.byref(handle)) == OK, lib.npc_last_error()
    return handle.value


def say_options(lib, **fields) -> SayOptions:
    options = SayOptions()
    lib.npc_say_options_init(options)
    for key, value in fields.items():
        setattr(options, key, value)
    return options


def say(lib, client: int, npc: str, text: str, session: str = "c-abi", rid: str | None = None, **fields) -> str:
    out = ctypes.create_string_buffer(64)
    status = lib.npc_say(client, npc.encode(), session.encode(), text.encode(), rid and rid.encode(),
                         say_options(lib, **fields), out, len(out))
    assert status == OK, lib.npc_last_error()
    return out.value.decode()


def event_dict(lib, e: int) -> dict:
    stats = Stats()
    lib.npc_event_stats(e, stats)
    lists = {name: [lib.npc_event_list_item(e, which, i).decode() for i in range(lib.npc_event_list_size(e, which))]
             for name, which in (("npcs", LIST_NPCS), ("caps", LIST_CAPS))}
    return {"kind": lib.npc_event_type(e), "type": lib.npc_event_type_name(e).decode(),
            **{f: getattr(lib, f"npc_event_{f}")(e).decode() for f in ("id", "text", "code", "message", "instance")},
            "seq": lib.npc_event_seq(e), "tokens": lib.npc_event_tokens(e), "flags": lib.npc_event_flags(e),
            "stats": {name: getattr(stats, name) for name, _ in Stats._fields_}, **lists,
            "max_text_chars": lib.npc_event_limit(e, b"max_text_chars")}


def drain(lib, client: int, budget_ms: float = 1.0) -> list[dict]:
    events = []
    for _ in range(lib.npc_poll(client, budget_ms)):
        e = lib.npc_next_event(client)
        events.append(event_dict(lib, e))
        lib.npc_event_free(e)
    assert lib.npc_next_event(client) is None
    return events


def events_until(lib, client: int, done, timeout: float = 60.0) -> list[dict]:
    """Polls like a game loop until done(events) is true."""
    events: list[dict] = []
    end = time.monotonic() + timeout
    while not done(events):
        assert time.monotonic() < end, f"gave up waiting; got {events}"
        assert lib.npc_wait(client, 20) == OK
        events += drain(lib, client)
    return events


def reply(lib, client: int, rid: str, timeout: float = 60.0) -> tuple[list[dict], dict]:
    """(token events, terminal event) of the request rid; checks seq order and one terminal event."""
    events = events_until(lib, client, lambda es: rid in terminal_ids(es), timeout)
    mine = [e for e in events if e["id"] == rid]
    tokens = [e for e in mine if e["kind"] == TOKEN]
    assert [t["seq"] for t in tokens] == list(range(len(tokens)))
    assert mine[-1]["kind"] in (DONE, ERROR) and len(mine) == len(tokens) + 1
    return tokens, mine[-1]


def terminal_ids(events: list[dict]) -> set[str]:
    return {e["id"] for e in events if e["kind"] in (DONE, ERROR)}


def streamed(tokens: list[dict]) -> str:
    return "".join(t["text"] for t in tokens)


@pytest.fixture
def client(lib, endpoint):
    handle = connect(lib, endpoint)
    events_until(lib, handle, lambda es: lib.npc_connected(handle) == 1)
    yield handle
    lib.npc_close(handle)


@pytest.fixture(scope="module")
def endpoint(request) -> str:
    """The live service of test_service (asked for by name: its fixtures stay in that module)."""
    return request.getfixturevalue("service")


def free_port() -> int:
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the header and the sources ----------------------------------------------------------------

def test_the_header_is_plain_c(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    source = tmp_path / "use.c"
    source.write_text('#include "npc_bridge.h"\nint main(void) { npc_options o; npc_options_init(&o); return 0; }\n')
    result = subprocess.run(["gcc", "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
                             f"-I{REPO / 'bridge' / 'c'}", str(source)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_library_includes_no_platform_headers():
    """Builds on Windows and macOS too: the C++ standard library, cppzmq and msgpack only."""
    allowed = {"npc_bridge.h", "npc_bridge.hpp", "zmq.hpp", "zmq_addon.hpp", "msgpack.hpp", "stddef.h", "stdint.h"}
    for path in (REPO / "bridge" / "c" / "npc_bridge.cpp", REPO / "bridge" / "c" / "npc_bridge.h",
                 REPO / "bridge" / "cpp" / "npc_bridge.hpp"):
        for line in path.read_text().splitlines():
            if line.lstrip("# ").startswith("include"):
                name = line.split("include", 1)[1].strip().strip('<>"')
                assert name in allowed or "." not in name, f"{path.name}: {line}"  # <string>, <chrono>, ...


def test_every_exported_function_is_declared_here(lib):
    if shutil.which("nm") is None:
        pytest.skip("nm not installed")
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(BUILD / "libnpc_bridge.so")], capture_output=True,
                             text=True, check=True).stdout.split()
    assert {s for s in symbols if s.startswith("npc_")} == set(SIGNATURES)


# ---- calls -------------------------------------------------------------------------------------

def test_defaults(lib):
    assert lib.npc_abi_version() == 1
    options, say_opts = Options(), SayOptions()
    lib.npc_options_init(options)
    lib.npc_say_options_init(say_opts)
    assert (options.size, options.endpoint, options.budget_ms, options.ping_interval_s, options.heartbeat_timeout_s,
            options.deadline_grace_ms) == (ctypes.sizeof(Options), None, 1.0, 1.0, 3.0, 1000.0)
    assert (say_opts.size, say_opts.priority, say_opts.max_tokens, say_opts.seed, say_opts.temperature,
            say_opts.deadline_ms, say_opts.stream, say_opts.open) == (ctypes.sizeof(SayOptions), 0, 0, -1, -1, 0, 1, 0)


def test_hello_caps_ping_npcs_and_server(lib, endpoint):
    handle = connect(lib, endpoint, client_name="c-abi-test")
    server = c_ptr()
    assert lib.npc_server(handle, ctypes.byref(server)) == OK and server.value is None  # nothing heard yet
    first = events_until(lib, handle, lambda es: es)
    assert first[0]["kind"] == CONNECTION and first[0]["flags"] == CONNECTED | SYNTHETIC
    assert lib.npc_connected(handle) == 1
    assert lib.npc_server(handle, ctypes.byref(server)) == OK
    welcome = event_dict(lib, server.value)
    lib.npc_event_free(server.value)
    assert welcome["kind"] == WELCOME and "plain" in welcome["npcs"] and "append" in welcome["caps"]
    assert welcome["max_text_chars"] == 2000 and welcome["instance"]
    ids = {}
    for call in ("hello", "ping", "npcs"):
        out = ctypes.create_string_buffer(64)
        assert getattr(lib, f"npc_{call}")(handle, out, len(out)) == OK
        ids[call] = out.value.decode()
    assert len(set(ids.values())) == 3
    events = events_until(lib, handle, lambda es: len(es) == 3)
    by_id = {e["id"]: e for e in events}
    assert by_id[ids["hello"]]["kind"] == WELCOME and by_id[ids["hello"]]["caps"] == welcome["caps"]
    assert by_id[ids["ping"]]["kind"] == PONG and by_id[ids["ping"]]["instance"] == welcome["instance"]
    assert by_id[ids["npcs"]]["kind"] == NPCS and by_id[ids["npcs"]]["npcs"] == welcome["npcs"]
    assert by_id[ids["npcs"]]["max_text_chars"] == -1  # not a welcome: no limits
    assert lib.npc_last_error() == b""
    lib.npc_close(handle)


def test_say_streams_tokens_then_done_with_stats(lib, client):
    rid = say(lib, client, "plain", "Hello there", max_tokens=12, temperature=0.7, seed=5)
    tokens, done = reply(lib, client, rid)
    assert done["kind"] == DONE and done["tokens"] == 12 and done["flags"] == 0
    assert tokens and done["text"] == streamed(tokens)
    stats = done["stats"]
    assert 0 < stats["ttft_ms"] <= stats["total_ms"]
    assert stats["prompt_tokens"] > 0 and stats["target_forwards"] > 0


def test_caller_ids_sessions_ambient_and_stream_off(lib, client):
    rid = say(lib, client, "plain", "Hello 🐉", session="c-quiet", rid="mine-é", max_tokens=6, seed=1, stream=0,
              priority=1)
    assert rid == "mine-é"
    tokens, done = reply(lib, client, rid)
    assert tokens == [] and done["kind"] == DONE and done["tokens"] == 6


def test_open_and_append_give_the_whole_line(lib, client):
    whole = reply(lib, client, say(lib, client, "plain", "Can you mend my sword?", session="c-whole",
                                   max_tokens=8, seed=3))[1]
    rid = say(lib, client, "plain", "Can you", session="c-pieces", max_tokens=8, seed=3, open=1)
    assert lib.npc_append(client, rid.encode(), b" mend", 0) == OK
    assert lib.npc_append(client, rid.encode(), b" my sword?", 1) == OK
    tokens, done = reply(lib, client, rid)
    assert done["text"] == streamed(tokens) == whole["text"] and done["tokens"] == 8
    assert lib.npc_append(client, rid.encode(), b"late", 1) == OK  # an ended say is left alone


def test_cancel_mid_stream(lib, client):
    rid = say(lib, client, "plain", "Talk a lot", max_tokens=LONG)
    streamed = events_until(lib, client, lambda es: any(e["kind"] == TOKEN for e in es))
    assert lib.npc_cancel(client, rid.encode()) == OK
    events = streamed + events_until(lib, client, lambda es: rid in terminal_ids(es))
    mine = [e for e in events if e["id"] == rid]  # tokens streamed before the cancel count too
    assert [e["seq"] for e in mine[:-1]] == list(range(len(mine) - 1))
    done = mine[-1]
    assert done["kind"] == DONE and done["flags"] == CANCELLED and done["tokens"] < LONG
    assert lib.npc_cancel(client, rid.encode()) == OK  # ended: ignored


def test_deadline_fallback(lib, client):
    _, done = reply(lib, client, say(lib, client, "plain", "Talk a lot", max_tokens=LONG, deadline_ms=100.0))
    assert done["flags"] == FALLBACK and done["text"] in PLAIN_FALLBACKS


def test_deflection(lib, client):
    _, done = reply(lib, client, say(lib, client, "blacksmith", "What about the war?"))
    assert done["flags"] == DEFLECTED and done["text"] == "I don't talk about that. Ask me about steel."


def test_service_errors_are_terminal_events(lib, client):
    for npc, fields, code in (("nobody", {}, "unknown_npc"), ("plain", {"max_tokens": 10**6}, "bad_request"),
                              ("plain", {"deadline_ms": -5.0}, "bad_request")):
        _, error = reply(lib, client, say(lib, client, npc, "hi", **fields))
        assert error["kind"] == ERROR and error["code"] == code and error["message"] and error["flags"] == 0
    _, error = reply(lib, client, say(lib, client, "plain", "x" * 2001))
    assert error["code"] == "too_large"


def test_argument_errors_send_nothing_and_say_why(lib, client):
    opts = say_options(lib)
    out = ctypes.create_string_buffer(64)

    def status(*args) -> tuple[int, str]:
        return lib.npc_say(client, *args), lib.npc_last_error().decode()

    running = say(lib, client, "plain", "Talk a lot", max_tokens=LONG)
    cases = [
        ((b"plain", None, None, None, opts, out, 64), ERR_ARGUMENT, "must not be NULL"),
        ((b"plain", None, b"\xff\xfe", None, opts, out, 64), ERR_ARGUMENT, "text is not valid UTF-8"),
        ((b"plain", b"s\xc3", b"hi", None, opts, out, 64), ERR_ARGUMENT, "session is not valid UTF-8"),
        ((b"plain", None, b"\xed\xa0\x80", None, opts, out, 64), ERR_ARGUMENT, "UTF-8"),  # a surrogate
        ((("é" * 65).encode(), None, b"hi", None, opts, out, 64), ERR_ARGUMENT, "npc must be 1 to 64 characters"),
        ((b"", None, b"hi", None, opts, out, 64), ERR_ARGUMENT, "npc must be 1 to 64"),
        ((b"plain", None, b"hi", b"~x", opts, out, 64), ERR_ARGUMENT, "'~'"),
        ((b"plain", None, b"hi", running.encode(), opts, out, 64), ERR_ARGUMENT, "still running"),
        ((b"plain", None, b"hi", b"x" * 129, opts, None, 0), ERR_ARGUMENT, "id must be 1 to 128"),
        ((b"plain", None, b"hi", None, say_options(lib, priority=2), out, 64), ERR_ARGUMENT, "priority"),
        ((b"plain", None, b"hi", None, say_options(lib, size=8), out, 64), ERR_ARGUMENT, "header and library differ"),
        ((b"plain", None, b"hi", b"fits-not", opts, out, 8), ERR_BUFFER, "needs 9 bytes"),
    ]
    for args, expected, message in cases:
        got, why = status(*args)
        assert got == expected and message in why, (args, got, why)
    assert say(lib, client, "plain", "hi", rid="fits-not", max_tokens=1) == "fits-not"  # the failed one was never sent
    assert lib.npc_append(client, running.encode(), b" more", 0) == ERR_ARGUMENT
    assert b"not open" in lib.npc_last_error()
    open_id = say(lib, client, "plain", "Hi", open=1)
    assert lib.npc_append(client, open_id.encode(), b"\xc0\xaf", 1) == ERR_ARGUMENT  # an overlong "/"
    assert lib.npc_append(client, None, b"x", 0) == ERR_ARGUMENT
    assert lib.npc_cancel(client, None) == ERR_ARGUMENT
    for call in (lib.npc_hello, lib.npc_ping, lib.npc_npcs):
        assert call(client, out, 2) == ERR_BUFFER and call(None, out, 64) == ERR_ARGUMENT
    assert lib.npc_poll(None, 1.0) == ERR_ARGUMENT and lib.npc_wait(None, 0) == ERR_ARGUMENT
    assert lib.npc_next_event(None) is None and lib.npc_connected(None) == 0
    assert lib.npc_server(None, ctypes.byref(c_ptr())) == ERR_ARGUMENT
    for rid in (running, open_id):
        lib.npc_cancel(client, rid.encode())
        assert reply(lib, client, rid)[1]["flags"] == CANCELLED
    assert lib.npc_last_error() == b""


def test_null_events_and_bad_lists_read_as_empty(lib):
    assert (lib.npc_event_type(None), lib.npc_event_type_name(None), lib.npc_event_id(None), lib.npc_event_seq(None),
            lib.npc_event_tokens(None), lib.npc_event_flags(None), lib.npc_event_limit(None, b"x"),
            lib.npc_event_list_size(None, LIST_NPCS)) == (0, b"", b"", -1, 0, 0, -1, 0)
    assert lib.npc_event_list_item(None, 7, 0) == b""
    stats = Stats(total_ms=5.0)
    lib.npc_event_stats(None, stats)
    assert (stats.ttft_ms, stats.total_ms) == (-1.0, 0.0)
    lib.npc_event_stats(None, None)
    lib.npc_event_free(None)
    lib.npc_close(None)


def test_connect_errors(lib):
    handle = c_ptr(1)
    options = Options()
    lib.npc_options_init(options)
    options.endpoint = b"nonsense"
    assert lib.npc_connect(options, ctypes.byref(handle)) == ERR_TRANSPORT and handle.value is None
    assert lib.npc_last_error()
    options.endpoint, options.curve_server_key = b"tcp://127.0.0.1:1", b"too short"
    assert lib.npc_connect(options, ctypes.byref(handle)) == ERR_ARGUMENT
    assert b"CURVE needs" in lib.npc_last_error()
    options.curve_public_key = options.curve_secret_key = b"too short"
    assert lib.npc_connect(options, ctypes.byref(handle)) == ERR_TRANSPORT
    options = Options()
    lib.npc_options_init(options)
    options.heartbeat_timeout_s = 0
    assert lib.npc_connect(options, ctypes.byref(handle)) == ERR_ARGUMENT
    options.size = 4
    assert lib.npc_connect(options, ctypes.byref(handle)) == ERR_ARGUMENT
    assert lib.npc_connect(None, None) == ERR_ARGUMENT
    assert lib.npc_connect(None, ctypes.byref(handle)) == OK  # all defaults: tcp://127.0.0.1:5555
    lib.npc_close(handle)


def test_open_say_before_the_welcome_is_refused(lib):
    handle = connect(lib, f"tcp://127.0.0.1:{free_port()}")
    out = ctypes.create_string_buffer(64)
    assert lib.npc_say(handle, b"plain", None, b"Hi", None, say_options(lib, open=1), out, 64) == ERR_ARGUMENT
    assert b"append" in lib.npc_last_error()
    lib.npc_close(handle)


def test_service_down_fails_every_say_with_disconnected(lib):
    handle = connect(lib, f"tcp://127.0.0.1:{free_port()}", ping_interval_s=0.1, heartbeat_timeout_s=0.3)
    rids = {say(lib, handle, "plain", "hi") for _ in range(3)}
    events = events_until(lib, handle, lambda es: len(es) == 3)
    assert {e["id"] for e in events} == rids
    assert all(e["kind"] == ERROR and e["code"] == "disconnected" and e["flags"] == SYNTHETIC for e in events)
    assert lib.npc_connected(handle) == 0
    lib.npc_close(handle)


def closing_service(port: int, stop: threading.Event) -> None:
    """A scripted service that answers hello and ping, and closes the connection of every say (as the
    service does to a connection it drops): the say is gone, yet the DEALER reconnects at once and
    pings are answered again by the same instance."""
    context = zmq.Context.instance()

    def bind() -> zmq.Socket:
        sock = context.socket(zmq.ROUTER)
        sock.linger = 0
        for _ in range(200):  # the closed socket's port frees up asynchronously
            try:
                sock.bind(f"tcp://127.0.0.1:{port}")
                return sock
            except zmq.ZMQError:
                time.sleep(0.01)
        raise RuntimeError(f"port {port} stayed busy")

    sock = bind()
    while not stop.is_set():
        if not sock.poll(20):
            continue
        client, _, body = sock.recv_multipart()
        msg = msgpack.unpackb(body)
        if msg["type"] == "say":
            sock.close()
            sock = bind()
            continue
        reply = {"type": "pong" if msg["type"] == "ping" else "welcome", "id": msg["id"], "instance": "same",
                 "npcs": ["plain"], "caps": ["stream"], "limits": {}, "protocol": [1, 1]}
        sock.send_multipart([client, b"NPC1", msgpack.packb(reply)])
    sock.close()


def test_a_closed_connection_fails_its_says_even_when_the_socket_reconnects(lib):
    port, stop = free_port(), threading.Event()
    thread = threading.Thread(target=closing_service, args=(port, stop))
    thread.start()
    try:
        handle = connect(lib, f"tcp://127.0.0.1:{port}", ping_interval_s=0.1, heartbeat_timeout_s=60.0)
        assert events_until(lib, handle, lambda es: es)[0]["flags"] == CONNECTED | SYNTHETIC
        rid = say(lib, handle, "plain", "hi")
        events = events_until(lib, handle, lambda es: rid in terminal_ids(es) and lib.npc_connected(handle))
        error = next(e for e in events if e["id"] == rid)
        assert error["code"] == "disconnected" and error["flags"] == SYNTHETIC
        assert [e["flags"] for e in events if e["kind"] == CONNECTION] == [SYNTHETIC, CONNECTED | SYNTHETIC]
        lib.npc_close(handle)
    finally:
        stop.set()
        thread.join()


def test_curve_admits_the_known_key_only(lib, request, tmp_path):
    keys = tmp_path / "keys"
    (keys / "clients").mkdir(parents=True)
    server_public_file, server_secret_file = zmq.auth.create_certificates(str(keys), "server")
    game_public_file, game_secret_file = zmq.auth.create_certificates(str(keys), "game")
    _, stranger_secret_file = zmq.auth.create_certificates(str(keys), "stranger")
    shutil.copy(game_public_file, keys / "clients")
    proc, endpoint = start_service(request.getfixturevalue("chatty_model_dir"), request.getfixturevalue("personas_dir"),
                                   "--curve-secret", server_secret_file, "--curve-clients", str(keys / "clients"))
    try:
        server_key = zmq.auth.load_certificate(server_public_file)[0].decode()
        clients = {}
        for name, secret_file in (("game", game_secret_file), ("stranger", stranger_secret_file)):
            public, secret = (k.decode() for k in zmq.auth.load_certificate(secret_file))
            clients[name] = connect(lib, endpoint, curve_server_key=server_key, curve_public_key=public,
                                    curve_secret_key=secret, ping_interval_s=0.2, heartbeat_timeout_s=1.0)
        _, done = reply(lib, clients["game"], say(lib, clients["game"], "plain", "hi", max_tokens=3))
        assert done["kind"] == DONE and done["tokens"] == 3
        _, error = reply(lib, clients["stranger"], say(lib, clients["stranger"], "plain", "hi"))
        assert error["code"] == "disconnected" and error["flags"] == SYNTHETIC
        for handle in clients.values():
            lib.npc_close(handle)
    finally:
        stop_service(proc)


# ---- memory ------------------------------------------------------------------------------------

def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_rss_stays_flat_over_10000_says(lib, client):
    """Each round: a streamed say, an open say appended and cancelled, a say to an unknown NPC, a
    ping; every event read through the accessors and freed."""
    def rounds(n: int) -> None:
        for i in range(n):
            streamed_id = say(lib, client, "plain", "hi", session=f"leak{i % 8}", max_tokens=2)
            open_id = say(lib, client, "plain", "Can", open=1)
            lib.npc_append(client, open_id.encode(), b" you " * 4, 0)
            lib.npc_cancel(client, open_id.encode())
            error_id = say(lib, client, "nobody", "x" * 200)
            lib.npc_ping(client, None, 0)
            pending = {streamed_id, open_id, error_id}
            events_until(lib, client, lambda es, pending=pending: pending <= terminal_ids(es))

    rounds(300)  # warm up: allocator pools, ZeroMQ buffers
    before = rss_bytes()
    rounds(3334)
    after = rss_bytes()
    assert after - before < 2 * 2**20, f"RSS grew {after - before} bytes over 10,002 says"
