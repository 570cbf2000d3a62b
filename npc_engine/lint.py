"""`npc-engine persona check`: every error in persona files and folders, then warnings for files that
load but will misbehave: a banned topic that the persona's own text mentions (the model repeats its
persona, and the guard replaces each line that says the topic with the deflection)."""
import os
from pathlib import Path

from npc_engine.guard import banned_topic
from npc_engine.persona import (
    Persona,
    PersonaIssue,
    cast_issues,
    declared_id,
    load_files,
    persona_files,
)
from npc_engine.toml_lines import key_lines, line_of

# the persona's own text, where a banned topic should not appear (deflection may name it: it is the answer)
OWN_TEXT_FIELDS = ("name", "role", "style", "greeting", "facts", "knowledge", "relationships", "fallback_lines")


def own_text(persona: Persona) -> list[tuple[tuple[str, ...], str, str]]:
    """(key path, field name, text) of every piece of the persona's own text."""
    pieces = []
    for key in OWN_TEXT_FIELDS:
        value = getattr(persona, key)
        if isinstance(value, str):
            pieces.append(((key,), key, value))
        elif isinstance(value, dict):
            pieces += [((key, k), f"{key}.{k}", v) for k, v in value.items()]
        else:
            pieces += [((key,), f"{key}[{i}]", v) for i, v in enumerate(value)]
    return pieces


def topic_warnings(persona: Persona, text: str) -> list[PersonaIssue]:
    """A warning for each piece of own text that mentions a banned topic, naming where both are."""
    lines = key_lines(text)
    file_lines = text.splitlines()
    topics_line = line_of(lines, "banned_topics")
    warnings = []
    for path, field, piece in own_text(persona):
        if topic := banned_topic(persona, piece):
            at = line_of(lines, *path)
            # an array item usually has a line of its own below its key
            at = next((n for n in range(at, len(file_lines) + 1) if piece[:40] in file_lines[n - 1]), at)
            index = persona.banned_topics.index(topic)
            warnings.append(PersonaIssue(str(persona.source), at, field,
                                         f"mentions banned_topics[{index}] {topic!r} (line {topics_line}): the model "
                                         "will repeat it, and every line that does is replaced by the deflection",
                                         warning=True))
    return warnings


def check_paths(paths: list[str | os.PathLike]) -> tuple[list[Path], list[PersonaIssue]]:
    """Validate persona files and directories. Relationships may point at personas in the same directory
    as a checked file. Returns (files checked, errors and warnings by file and line)."""
    files: list[Path] = []
    issues: list[PersonaIssue] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += persona_files(path)
        elif path.is_file():
            files.append(path)
        else:
            issues.append(PersonaIssue(str(path), 1, "(file)", "no such file or directory"))
    files = list(dict.fromkeys(files))
    personas, load_issues, other_ids = load_files(files)
    issues += load_issues
    checked = {f.resolve() for f in files}
    for directory in {f.resolve().parent for f in files}:
        other_ids |= {declared_id(f) for f in persona_files(directory) if f.resolve() not in checked}
    issues += cast_issues(personas, other_ids - {None})
    for persona in personas:
        issues += topic_warnings(persona, persona.source.read_text("utf-8"))
    return files, sorted(issues, key=lambda i: (i.file, i.line))
