"""`npc-engine` command line: one module per command, each with `add_parser(subparsers)` and `run(args)`.

Module top levels import only the standard library, so `--help`, `say` and `persona check` start without torch.
"""
import importlib
import sys

from npc_engine import __version__
from npc_engine.cli.common import Parser

# modules of npc_engine.cli, in the order `--help` lists their commands
COMMANDS = ("serve", "say", "chat", "persona", "generate", "bench", "train", "eval", "export_onnx", "import_gguf")
# exceptions that mean bad input (answered in one line); looked up only where their module is already loaded
USER_ERRORS = (("npc_engine.loading", "CheckpointError"), ("npc_engine.persona", "PersonaError"))
# optional dependencies (pyproject.toml extras) -> how to install them
EXTRAS = {"onnxruntime": "pip install 'npc-dialogue-engine[cpu]' (or [gpu] on an NVIDIA GPU)",
          "triton": "pip install 'npc-dialogue-engine[gpu]' (Linux x86-64 with an NVIDIA GPU)"}


def build_parser() -> Parser:
    parser = Parser(prog="npc-engine", description="Persona-conditioned NPC dialogue engine")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"npc_engine.cli.{name}").add_parser(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    loaded = [getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules]
    return (ValueError, OSError, *loaded)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except user_errors() as e:
        print(f"npc-engine {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name not in EXTRAS:
            raise
        print(f"npc-engine {args.command}: error: {e.name} is not installed: {EXTRAS[e.name]}", file=sys.stderr)
        return 2
