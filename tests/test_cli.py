"""The command line: light commands start without torch, bad setups fail in one line before any model loads."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from npc_engine.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "triton", "transformers", "onnxruntime")
# runs the real entry point, then reports which heavy modules it imported
PROBE = """import runpy, sys
sys.argv = ["npc-engine", *sys.argv[1:]]
try:
    runpy.run_module("npc_engine", run_name="__main__")
except SystemExit as e:
    code = e.code
print("HEAVY:", ",".join(m for m in {heavy!r} if m in sys.modules), "EXIT:", code, file=sys.stderr)
"""


def probe(*argv: str) -> tuple[subprocess.CompletedProcess, list[str], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    heavy, code = last.removeprefix("HEAVY: ").split(" EXIT: ")
    return proc, [m for m in heavy.split(",") if m], code


def dead_endpoint() -> str:
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
    return f"tcp://127.0.0.1:{port}"


@pytest.mark.parametrize("argv", [["--help"], ["say", "--help"], ["persona", "check", "personas"],
                                  ["--version"]])
def test_light_commands_import_neither_torch_nor_triton(argv):
    proc, heavy, code = probe(*argv)
    assert heavy == [] and code in ("0", "None"), proc.stderr


def test_say_without_a_service_names_the_address_and_imports_no_torch():
    address = dead_endpoint()
    proc, heavy, code = probe("say", "--connect", address, "--npc", "host", "--timeout", "30", "Hello")
    assert heavy == [] and code == "1"
    assert "disconnected" in proc.stderr and address in proc.stderr and "npc-engine serve" in proc.stderr


def test_version(capsys):
    from npc_engine import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"npc-engine {__version__}"


def test_every_command_module_follows_the_convention():
    import importlib

    for name in COMMANDS:
        module = importlib.import_module(f"npc_engine.cli.{name}")
        assert callable(module.add_parser) and callable(module.run), name


def subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from subparsers(sub)


def test_every_option_has_help():
    missing = [f"{name} {action.option_strings[0]}" for name, sub in subparsers(build_parser())
               for action in sub._actions
               if action.option_strings and action.help is None]
    assert missing == []


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "timed runs after one warm-up; the median is reported (default: 5)" in out and "(default: cpu)" in out


def test_say_and_client_share_the_session_default():
    import inspect

    from bridge import Client

    args = build_parser().parse_args(["say", "--npc", "host", "Hi"])
    assert args.session == inspect.signature(Client.say).parameters["session"].default == "default"


def test_cli_copies_of_library_defaults_agree():
    from bridge import protocol
    from npc_engine import onnx_export

    parser = build_parser()
    assert parser.parse_args(["serve"]).bind == protocol.DEFAULT_ADDR
    args = parser.parse_args(["export-onnx", "--model", "m", "-o", "o"])
    assert args.opset == onnx_export.DEFAULT_OPSET and args.dtype in onnx_export.EXPORT_DTYPES
    dtypes = next(a for a in dict(subparsers(parser))["export-onnx"]._actions if a.dest == "dtype").choices
    assert list(dtypes) == list(onnx_export.EXPORT_DTYPES)


@pytest.mark.parametrize("command", ["generate", "bench", "serve", "chat"])
def test_cuda_without_cuda_is_one_line(command, monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    extra = {"generate": ["--prompt", "Hi"], "chat": ["--npc", "host"]}.get(command, [])
    assert main([command, "--device", "cuda", "--model", str(tmp_path / "absent"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda" in err and "--device cpu" in err


def test_serve_refuses_a_busy_port_before_loading_the_model(tmp_path, capsys):
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as busy:
        port = busy.bind_to_random_port("tcp://127.0.0.1")
        assert main(["serve", "--bind", f"tcp://127.0.0.1:{port}", "--model", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert f"cannot bind tcp://127.0.0.1:{port}" in err and "--bind" in err and "absent" not in err


@pytest.mark.skipif(not (REPO / "models" / "npc-target").is_dir(), reason="the embedded model is not in models/")
def test_bench_measures_a_full_persona_line(capsys):
    import json

    # the embedded model ends this line after a few tokens; bench must still time --max-tokens of them
    argv = ["bench", "--model", str(REPO / "models" / "npc-target"), "--draft", "ngram", "--k", "4", "--repeats", "1",
            "--max-tokens", "12", "--personas", str(REPO / "personas"), "--json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["drafter"] for r in rows] == ["none", "ngram"] and all(r["tokens"] == 12 for r in rows)
    assert main([*argv, "--npc", "nobody"]) == 2
    assert "no persona with id 'nobody'" in capsys.readouterr().err


def test_a_missing_optional_dependency_names_its_extra(monkeypatch, capsys):
    import npc_engine.cli.generate as generate

    def needs_onnxruntime(args):
        import onnxruntime  # noqa: F401

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    monkeypatch.setattr(generate, "run", needs_onnxruntime)
    assert main(["generate", "--prompt", "Hi", "--backend", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime is not installed" in err and "[cpu]" in err
