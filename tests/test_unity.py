"""The Unity package (bridge/unity): its Runtime sources compiled with Mono's C# compiler into the
console client of Tests~/, run against a live service through the C ABI (bridge/c); and the
Samples~ script compiled against a stub of UnityEngine. Skipped, with the reason, where mcs and mono
(Debian: apt-get install --no-install-recommends mono-mcs) or the C ABI's toolchain are missing."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from test_c_abi import build_library, free_port
from test_service import LONG, PLAIN_FALLBACKS, chatty_model_dir, personas_dir, service  # noqa: F401 (fixtures by name)

UNITY = Path(__file__).resolve().parents[1] / "bridge" / "unity"
RUNTIME = sorted(str(p) for p in (UNITY / "Runtime").glob("*.cs"))


@pytest.fixture(scope="module")
def endpoint(request) -> str:
    """The live service of test_service (asked for by name: its fixtures stay in that module)."""
    return request.getfixturevalue("service")


def mcs(*args: str) -> None:
    result = subprocess.run(["mcs", "-warnaserror+", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def console(tmp_path_factory) -> tuple[Path, dict]:
    """The console client and the environment that lets Mono find libnpc_bridge.so."""
    if shutil.which("mcs") is None or shutil.which("mono") is None:
        pytest.skip("Mono's C# compiler is not installed (apt-get install --no-install-recommends mono-mcs)")
    library = build_library()
    out = tmp_path_factory.mktemp("unity") / "client.exe"
    mcs(f"-out:{out}", *RUNTIME, str(UNITY / "Tests~" / "ConsoleClient.cs"))
    env = {**os.environ, "LD_LIBRARY_PATH": f"{library.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    return out, env


def run(console, endpoint: str, *args: str, timeout: float = 60) -> tuple[int, dict]:
    exe, env = console
    result = subprocess.run(["mono", str(exe), "--connect", endpoint, "--frame-ms", "2", *args],
                            capture_output=True, text=True, timeout=timeout, env=env)
    lines = result.stdout.split("\n")
    parsed = {"stderr": result.stderr}
    if lines[0].startswith("server: "):
        parsed["server"] = dict(item.split("=", 1) for item in lines.pop(0)[len("server: "):].split())
    assert lines[0].startswith("npc: "), result.stdout + result.stderr
    parsed["streamed"] = lines[0][len("npc: "):]
    for line in lines[1:]:
        key, _, value = line.partition(": ")
        if key == "done":
            parsed["done"] = dict(item.split("=") for item in value.split())
        elif key in ("text", "error"):
            parsed[key] = value
    return result.returncode, parsed


def test_the_sample_compiles_against_the_runtime(tmp_path):
    if shutil.which("mcs") is None:
        pytest.skip("Mono's C# compiler is not installed (apt-get install --no-install-recommends mono-mcs)")
    mcs("-target:library", f"-out:{tmp_path / 'sample.dll'}", *RUNTIME,
        str(UNITY / "Samples~" / "TalkToNpc" / "TalkToNpc.cs"), str(UNITY / "Tests~" / "UnityEngineStub.cs"))


def test_say_streams_tokens_then_done(console, endpoint):
    rc, out = run(console, endpoint, "--server", "--max-tokens", "12", "plain", "Hello", "there")
    assert rc == 0, out
    assert "plain" in out["server"]["npcs"].split(",") and "append" in out["server"]["caps"].split(",")
    assert out["server"]["max_text_chars"] == "2000"
    done = out["done"]
    assert (done["tokens"], done["fallback"], done["cancelled"], done["deflected"]) == ("12", "0", "0", "0")
    assert int(done["messages"]) >= 1 and int(done["prompt_tokens"]) > 0 and float(done["total_ms"]) > 0
    assert out["text"] == out["streamed"]
    assert "[connected]" in out["stderr"]


def test_a_line_sent_in_pieces_gets_the_same_answer(console, endpoint):
    args = ["--max-tokens", "8", "--seed", "3", "plain", "Can", "you", "mend", "my", "sword?"]
    rc, whole = run(console, endpoint, "--session", "cs-whole", *args)
    assert rc == 0, whole
    rc, pieces = run(console, endpoint, "--session", "cs-pieces", "--pieces", *args)
    assert rc == 0, pieces
    assert pieces["text"] == pieces["streamed"] == whole["text"]


def test_cancel_mid_stream(console, endpoint):
    rc, out = run(console, endpoint, "--max-tokens", str(LONG), "--cancel-after", "1", "plain", "Talk", "a", "lot")
    assert rc == 0, out
    assert out["done"]["cancelled"] == "1" and int(out["done"]["tokens"]) < LONG
    assert out["text"] == out["streamed"]


def test_deadline_fallback(console, endpoint):
    rc, out = run(console, endpoint, "--max-tokens", str(LONG), "--deadline-ms", "100", "plain", "Talk", "a", "lot")
    assert rc == 0, out
    assert out["done"]["fallback"] == "1" and out["text"] in PLAIN_FALLBACKS


def test_unknown_npc_is_an_error_event(console, endpoint):
    rc, out = run(console, endpoint, "nobody", "hi")
    assert rc == 1 and out["error"].startswith("UnknownNpc unknown_npc ")
    assert not out["error"].endswith("(client-side)")


def test_service_down_is_disconnected(console):
    rc, out = run(console, f"tcp://127.0.0.1:{free_port()}", "--heartbeat-s", "0.5", "plain", "hi", timeout=30)
    assert rc == 1
    assert out["error"].startswith("Disconnected disconnected ") and out["error"].endswith("(client-side)")


def test_help_and_bad_arguments(console):
    exe, env = console
    help_ = subprocess.run(["mono", str(exe), "--help"], capture_output=True, text=True, timeout=30, env=env)
    assert help_.returncode == 0 and help_.stdout.startswith("usage: ")
    bad = subprocess.run(["mono", str(exe), "--bogus", "plain"], capture_output=True, text=True, timeout=30, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("usage: ")
