"""The header-only C++ client (bridge/cpp): build the examples with make and run them against a live
service. Skipped, with the reason, where the compiler or the headers are missing (Debian:
apt-get install g++ make libzmq3-dev cppzmq-dev libmsgpack-cxx-dev)."""
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from test_service import LONG, PLAIN_FALLBACKS, chatty_model_dir, personas_dir, service  # noqa: F401 (fixtures by name)

CPP = Path(__file__).resolve().parents[1] / "bridge" / "cpp"
PROBE = "#include <zmq.hpp>\n#include <zmq_addon.hpp>\n#include <msgpack.hpp>\nint main() {}\n"


@pytest.fixture(scope="module")
def endpoint(request) -> str:
    """The live service of test_service (asked for by name: its fixtures stay in that module)."""
    return request.getfixturevalue("service")


def missing_toolchain() -> str | None:
    compiler = shutil.which("g++")
    if compiler is None or shutil.which("make") is None:
        return "g++ or make not installed"
    probe = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-DMSGPACK_NO_BOOST", "-x", "c++", "-"],
                           input=PROBE, capture_output=True, text=True)
    if probe.returncode != 0:
        return ("cppzmq/msgpack-cxx headers missing (apt-get install libzmq3-dev cppzmq-dev libmsgpack-cxx-dev): "
                + probe.stderr[:200])
    return None


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    reason = missing_toolchain()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("cpp") / "example"
    build = subprocess.run(["make", "-C", str(CPP), f"OUT={out}", "CXXFLAGS=-std=c++17 -O0 -Wall -Wextra"],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "warning" not in build.stderr, build.stderr
    return out


def run(example: Path, endpoint: str, *args: str, timeout: float = 60) -> tuple[int, dict]:
    result = subprocess.run([str(example), "--connect", endpoint, "--frame-ms", "2", *args],
                            capture_output=True, text=True, timeout=timeout)
    lines = result.stdout.split("\n")
    assert lines[0].startswith("npc: "), result.stdout
    parsed = {"streamed": lines[0][len("npc: "):], "stderr": result.stderr}
    for line in lines[1:]:
        key, _, value = line.partition(": ")
        if key == "done":
            parsed["done"] = dict(item.split("=") for item in value.split())
        elif key in ("text", "error"):
            parsed[key] = value
    return result.returncode, parsed


def test_cpp_client_streams_a_line(example, endpoint):
    rc, out = run(example, endpoint, "--max-tokens", "12", "plain", "Hello", "there")
    assert rc == 0, out
    done = out["done"]
    assert (done["tokens"], done["fallback"], done["cancelled"], done["deflected"]) == ("12", "0", "0", "0")
    assert int(done["messages"]) >= 1
    assert out["text"] == out["streamed"]
    assert "[connected]" in out["stderr"]


def test_cpp_client_sends_a_line_in_pieces(example, endpoint):
    args = ["--max-tokens", "8", "--seed", "3", "plain", "Can", "you", "mend", "my", "sword?"]
    rc, whole = run(example, endpoint, "--session", "cpp-whole", *args)
    assert rc == 0, whole
    rc, pieces = run(example, endpoint, "--session", "cpp-pieces", "--pieces", *args)
    assert rc == 0, pieces
    assert pieces["text"] == pieces["streamed"] == whole["text"]
    assert pieces["done"]["tokens"] == "8"


def test_cpp_client_cancels_mid_stream(example, endpoint):
    rc, out = run(example, endpoint, "--max-tokens", str(LONG), "--cancel-after", "1", "plain", "Talk", "a", "lot")
    assert rc == 0, out
    assert out["done"]["cancelled"] == "1" and int(out["done"]["tokens"]) < LONG
    assert out["text"] == out["streamed"]


def test_cpp_client_gets_the_fallback_at_the_deadline(example, endpoint):
    rc, out = run(example, endpoint, "--max-tokens", str(LONG), "--deadline-ms", "100", "plain", "Talk", "a", "lot")
    assert rc == 0, out
    assert out["done"]["fallback"] == "1"
    assert out["text"] in PLAIN_FALLBACKS


def test_cpp_client_reports_errors_and_deflections(example, endpoint):
    rc, out = run(example, endpoint, "nobody", "hi")
    assert rc == 1 and out["error"].startswith("unknown_npc ")
    rc, out = run(example, endpoint, "blacksmith", "What", "about", "the", "war?")
    assert rc == 0 and out["done"]["deflected"] == "1"
    assert out["text"] == "I don't talk about that. Ask me about steel."


def test_cpp_client_reports_a_missing_service(example):
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, out = run(example, f"tcp://127.0.0.1:{port}", "plain", "hi", timeout=30)
    assert rc == 1
    assert out["error"].startswith("disconnected ") and out["error"].endswith("(client-side)")


def test_cpp_example_answers_help_and_refuses_unknown_options(example):
    result = subprocess.run([str(example), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("usage: example ") and result.stderr == ""
    result = subprocess.run([str(example), "--bogus", "plain", "hi"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and result.stderr.startswith("unknown option --bogus")


def test_a_cpp_client_asks_for_protocol_1_2_only_with_caps_and_saves_remembers_and_runs_a_scene(example, endpoint):
    result = subprocess.run([str(example.parent / "save_and_scene"), "--connect", endpoint, "--session", "cpp-12",
                             "plain", "blacksmith", "host"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    out = dict(line.split(": ", 1) for line in result.stdout.strip().split("\n"))
    assert out["1.1 client"] == "protocol=1.1 memory=refused"  # no caps asked for: a 1.1 client, unchanged
    assert out["1.2 client"] == "protocol=1.2"
    assert out["memory.added"] == "1 The player saved my daughter."
    assert out["memories"] == "1"
    assert int(out["blob"].split()[0]) > 0
    assert out["imported"] == "plain"
    restored = dict(item.split("=") for item in out["restored"].split())
    a, b = restored["prompt_tokens"].split(",")
    assert a == b and int(a) > 0 and restored["same_text"] == "1"  # the imported conversation, token for token
    assert out["forgotten"] == "1"
    a, b = out["after forget"].split("=")[1].split(",")
    assert int(a) > int(b)  # the memory was in the prompt of the session that kept it
    assert out["damaged blob"] == "error bad_blob"

    assert out["scene.state"] == "cast=3 present=4 host=host missing=Mayor Aldous"
    assert out["say"] == "speaker=blacksmith to=player cue=- item=-"  # the addressed NPC answers, announced first
    said = dict(item.split("=") for item in out["say-end"].split())
    assert (said["type"], said["scene"], said["speaker"], said["terminals"]) == ("done", "cpp-12-scene", "blacksmith",
                                                                                "1")
    assert out["next"].startswith("speaker=host ") and out["next"].endswith(" cue=welcome item=-")
    assert out["moved to"] == "1"
    assert out["item"] == "speaker=host to=all cue=item item=0"  # the toast, announced by the host
    assert said["emotion"] in ("neutral", "angry", "proud", "sad")  # 1.2: each line's emotion, from the persona's list
    for key in ("next-end", "item-end"):
        ended = dict(item.split("=") for item in out[key].split())
        assert (ended["type"], ended["speaker"], ended["terminals"]) == ("done", "host", "1")
    assert out["cast"] == "blacksmith host"
    assert out["transcript"] == "player blacksmith host host"
    assert out["closed"] == "cpp-12-scene"
    assert out["after close"] == "error scene_not_found"
