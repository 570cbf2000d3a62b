"""The documents a newcomer reads name only what the code has: commands and options that the parsers
know, and benchmarks/README.md sections that exist where code comments cite them."""
import argparse
import re
import shlex
from pathlib import Path

import pytest

from demo_game.__main__ import build_parser as demo_parser
from npc_engine.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "personas/README.md", "models/README.md", "benchmarks/README.md", "demo_game/README.md",
        "bridge/README.md", "bridge/PROTOCOL.md"]
COMMAND_RE = re.compile(r"^(?:npc-engine|python3? -m npc_engine|python3? -m demo_game)(?= |$)")


def commands(text: str) -> list[str]:
    """Command lines (code blocks, indented or fenced; continuation lines joined) and inline code spans, a
    line's `# comment` dropped."""
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    spans = re.findall(r"`([^`\n]+)`", text)
    found = [c.split("  #")[0].split(" # ")[0].strip() for c in lines + spans]
    return [c for c in found if COMMAND_RE.match(c)]


def commands_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def unknown_options(line: str) -> list[str]:
    """The words of `line` that name no command or option of the parser it runs."""
    words = shlex.split(line)
    rest = [w.strip("[]") for w in (words[3:] if words[1:2] == ["-m"] else words[1:])]  # `[--opt X]`: optional
    parser = demo_parser() if "demo_game" in line else build_parser()
    while rest and rest[0] in commands_of(parser):
        parser, rest = commands_of(parser)[rest[0]], rest[1:]
    if rest and commands_of(parser) and not rest[0].startswith("-"):
        return [rest[0]]
    known = {o for a in parser._actions for o in a.option_strings}
    return [w for w in (w.split("=")[0] for w in rest) if w.startswith("-") and w not in known]


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_use_only_real_commands_and_options(doc):
    unknown = {line: unknown_options(line) for line in commands((REPO / doc).read_text())}
    assert not {line: words for line, words in unknown.items() if words}


def test_readme_shows_commands_at_all():
    assert len(commands((REPO / "README.md").read_text())) > 10


def test_benchmark_sections_cited_in_code_exist():
    headings = set(re.findall(r"^#+ (.+)$", (REPO / "benchmarks" / "README.md").read_text(), re.M))
    headings |= {h.split(" (")[0] for h in headings}  # "Kernels (bench_kernels)" may be cited as "Kernels"
    cited = set()
    for path in [*REPO.glob("npc_engine/**/*.py"), *REPO.glob("kernels/*.py"), *REPO.glob("bridge/*.py")]:
        text = re.sub(r"\s*\n\s*(?:#\s*)?", " ", path.read_text())  # citations wrap across comment lines
        cited |= set(re.findall(r'benchmarks/README\.md,? "([^"]+)"', text))
    assert cited and cited <= headings, cited - headings
