"""Persona files: the TOML schema (see personas/README.md), validation with file/line/field errors,
the prompt built from a persona, and a store that hot-reloads a directory of persona files.

tomllib reports no positions for values: the line of a field comes from npc_engine.toml_lines. A syntax
error carries its line from tomllib itself.
"""
import difflib
import os
import random
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from npc_engine.grammar import LABEL as HEADER_LABEL
from npc_engine.prompt import PromptPersona, Turn, build_open_prompt, build_prompt, persona_block
from npc_engine.toml_lines import key_lines, line_of

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

# key -> required
STRING_FIELDS = {"id": True, "name": True, "role": True, "style": False, "greeting": True,
                 "deflection": False, "model": False}
LIST_FIELDS = {"facts": True, "knowledge": False, "emotions": False, "actions": False,
               "banned_topics": False, "fallback_lines": True}
TABLE_FIELDS = {"relationships", "sampling"}
KNOWN_KEYS = set(STRING_FIELDS) | set(LIST_FIELDS) | TABLE_FIELDS

# the fields of npc_engine.sampling.SamplingParams a persona may override, with their checks
SAMPLING_FIELDS = {
    "temperature": ((int, float), lambda v: v >= 0, "a number >= 0"),
    "top_k": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "top_p": ((int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "seed": ((int,), lambda v: True, "an integer"),
    "max_tokens": ((int,), lambda v: v > 0, "an integer > 0"),
}


@dataclass
class PersonaIssue:
    file: str
    line: int
    field: str
    message: str
    warning: bool = False  # the file loads, but something in it will misbehave

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {'warning: ' if self.warning else ''}{self.message}"


class PersonaError(Exception):
    """One or more problems in persona files; `issues` holds every one found."""

    def __init__(self, issues: list[PersonaIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


@dataclass
class Persona:
    id: str
    name: str
    role: str
    facts: list[str]
    greeting: str
    fallback_lines: list[str]
    style: str = ""
    knowledge: list[str] = field(default_factory=list)
    relationships: dict[str, str] = field(default_factory=dict)  # other persona id -> description
    emotions: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    banned_topics: list[str] = field(default_factory=list)
    deflection: str = ""
    model: str | None = None
    sampling: dict = field(default_factory=dict)
    source: Path | None = None

    def to_prompt_persona(self) -> PromptPersona:
        # The model sees relationship descriptions only, so each one names the other character.
        return PromptPersona(name=self.name, role=self.role, facts=list(self.facts), style=self.style,
                             knowledge=list(self.knowledge),
                             relationships=list(self.relationships.values()),
                             banned_topics=list(self.banned_topics), deflection=self.deflection)

    def prefix(self) -> str:
        """The persona block: the stable, cacheable start of every prompt for this NPC."""
        return persona_block(self.to_prompt_persona())

    def prompt(self, turns: list[Turn]) -> str:
        return build_prompt(self.to_prompt_persona(), turns)

    def open_prompt(self, turns: list[Turn], player_text: str) -> str:
        """The prompt while the player is still typing `player_text` (prompt.build_open_prompt)."""
        return build_open_prompt(self.to_prompt_persona(), turns, player_text)

    def fallback_line(self, rng_or_index: random.Random | int) -> str:
        if isinstance(rng_or_index, int):
            return self.fallback_lines[rng_or_index % len(self.fallback_lines)]
        return rng_or_index.choice(self.fallback_lines)


# ---------------------------------------------------------------- validation

def _type_name(value) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             list: "an array", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")


def unknown_key(key: str, allowed: list[str]) -> str:
    """The message for a key not in `allowed`, suggesting the nearest one if any is near."""
    nearest = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {nearest[0]}?" if nearest else ""
    return f"unknown key{hint} (allowed: {', '.join(allowed)})"


def _check_persona_data(data: dict, issue) -> None:
    """Call `issue(path, message)` for every schema problem in a parsed persona file."""
    for key in data:
        if key not in KNOWN_KEYS:
            issue((key,), unknown_key(key, sorted(KNOWN_KEYS)))
    for key, required in STRING_FIELDS.items():
        if key not in data:
            if required:
                issue((key,), "required field is missing")
        elif not isinstance(data[key], str):
            issue((key,), f"expected a string, got {_type_name(data[key])}")
        elif required and not data[key].strip():
            issue((key,), "must not be empty")
    for key, required in LIST_FIELDS.items():
        if key not in data:
            if required:
                issue((key,), "required field is missing")
            continue
        value = data[key]
        if not isinstance(value, list):
            issue((key,), f"expected an array of strings, got {_type_name(value)}")
            continue
        if required and not value:
            issue((key,), "must hold at least one entry")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                issue((key, f"[{i}]"), f"expected a string, got {_type_name(item)}")
            elif not item.strip():
                issue((key, f"[{i}]"), "must not be empty")
            elif key in ("emotions", "actions") and not HEADER_LABEL.fullmatch(item):
                issue((key, f"[{i}]"), f"{item!r} cannot be written in a line header (npc_engine.grammar): no '[', "
                                       "'|', ']', '<', '>' or control characters")
    if isinstance(data.get("id"), str) and data["id"] and not ID_PATTERN.fullmatch(data["id"]):
        issue(("id",), f"{data['id']!r} is not a valid id (lowercase letters, digits, '_' and '-', "
                       "starting with a letter or digit, at most 64 characters)")
    if isinstance(data.get("banned_topics"), list) and data["banned_topics"] \
            and not (isinstance(data.get("deflection"), str) and data["deflection"].strip()):
        issue(("deflection",), "required when banned_topics is set: the line said instead")
    _check_relationships(data, issue)
    _check_sampling(data, issue)


def _check_relationships(data: dict, issue) -> None:
    relationships = data.get("relationships", {})
    if not isinstance(relationships, dict):
        issue(("relationships",), f"expected a table of id = \"description\", "
                                  f"got {_type_name(relationships)}")
        return
    for other, description in relationships.items():
        if not ID_PATTERN.fullmatch(other):
            issue(("relationships", other), f"{other!r} is not a valid persona id")
        elif other == data.get("id"):
            issue(("relationships", other), "a persona cannot have a relationship with itself")
        if not isinstance(description, str):
            issue(("relationships", other), f"expected a string, got {_type_name(description)}")
        elif not description.strip():
            issue(("relationships", other), "must not be empty")


def _check_sampling(data: dict, issue) -> None:
    sampling = data.get("sampling", {})
    if not isinstance(sampling, dict):
        issue(("sampling",), f"expected a table, got {_type_name(sampling)}")
        return
    for key, value in sampling.items():
        if key not in SAMPLING_FIELDS:
            issue(("sampling", key), unknown_key(key, list(SAMPLING_FIELDS)))
            continue
        types, valid, wanted = SAMPLING_FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, types) or not valid(value):
            issue(("sampling", key), f"expected {wanted}, got {value!r}")


def _field_name(path: tuple[str, ...]) -> str:
    return "".join(p if p.startswith("[") or i == 0 else f".{p}" for i, p in enumerate(path))


def parse_persona(text: str, source: Path) -> tuple[Persona | None, list[PersonaIssue]]:
    """Parse and validate one persona file's text; returns the persona or every issue found."""
    file = str(source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        line = int(m.group(1)) if m else max(1, len(text.splitlines()))
        message = re.sub(r"\s*\((at line \d+, column \d+|at end of document)\)", "", str(e))
        return None, [PersonaIssue(file, line, "(syntax)", f"invalid TOML: {message}")]
    lines = key_lines(text)
    issues: list[PersonaIssue] = []

    def issue(path: tuple[str, ...], message: str) -> None:
        key_path = tuple(p for p in path if not p.startswith("["))
        issues.append(PersonaIssue(file, line_of(lines, *key_path), _field_name(path), message))

    _check_persona_data(data, issue)
    if issues:
        return None, sorted(issues, key=lambda i: i.line)
    return Persona(**data, source=source), []


def load_persona_file(path: str | os.PathLike) -> Persona:
    """Load one persona file; raises PersonaError listing every problem in it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PersonaError([PersonaIssue(str(path), 1, "(file)", f"cannot read: {e}")]) from None
    persona, issues = parse_persona(text, path)
    if issues:
        raise PersonaError(issues)
    return persona


def _file_key_lines(path: Path | None) -> dict[tuple[str, ...], int]:
    try:
        return key_lines(path.read_text("utf-8")) if path else {}
    except (OSError, UnicodeDecodeError):
        return {}


def cast_issues(personas: list[Persona], known_ids: set[str] | None = None) -> list[PersonaIssue]:
    """Problems between persona files: duplicate ids, relationships to ids that do not exist.
    `known_ids` adds ids defined elsewhere (files not being checked)."""
    issues = []
    first_file: dict[str, Path] = {}
    ids = {p.id for p in personas} | (known_ids or set())
    for p in personas:
        lines = _file_key_lines(p.source)
        if p.id in first_file:
            issues.append(PersonaIssue(str(p.source), line_of(lines, "id"), "id",
                                       f"duplicate id {p.id!r}, already used by {first_file[p.id]}"))
        else:
            first_file[p.id] = p.source
        for other in p.relationships:
            if other not in ids:
                issues.append(PersonaIssue(str(p.source), line_of(lines, "relationships", other),
                                           f"relationships.{other}",
                                           f"no persona with id {other!r}"))
    return issues


def declared_id(path: Path) -> str | None:
    """The id a file declares, even when the file has other errors (so that other files pointing
    at it are not reported too)."""
    try:
        value = tomllib.loads(path.read_text("utf-8")).get("id")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return value if isinstance(value, str) else None


def persona_files(directory: str | os.PathLike) -> list[Path]:
    return sorted(p for p in Path(directory).glob("*.toml") if p.is_file())


def load_files(paths: list[Path]) -> tuple[list[Persona], list[PersonaIssue], set[str]]:
    """Each file on its own: the personas that load, the issues of the others and the ids those declare."""
    personas, issues, broken_ids = [], [], set()
    for path in paths:
        try:
            personas.append(load_persona_file(path))
        except PersonaError as e:
            issues += e.issues
            broken_ids.add(declared_id(path))
    return personas, issues, broken_ids - {None}


def load_persona_dir(directory: str | os.PathLike) -> dict[str, Persona]:
    """Load every *.toml in `directory`; raises PersonaError with the issues of all files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PersonaError([PersonaIssue(str(directory), 1, "(file)", "not a directory")])
    personas, issues, broken_ids = load_files(persona_files(directory))
    issues += cast_issues(personas, broken_ids)
    if issues:
        raise PersonaError(sorted(issues, key=lambda i: (i.file, i.line)))
    return {p.id: p for p in personas}


# ---------------------------------------------------------------- hot reload

class PersonaStore:
    """The personas of one directory, reloaded when files change.

    A file that fails to load keeps its previous version live and its error in `errors`.
    Readers (`get`, `ids`) see either the old or the new set, never a mix: the reload builds a new
    dict and swaps the reference.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"persona directory not found: {self.directory}")
        self.errors: dict[str, str] = {}
        self._signatures: dict[Path, tuple] = {}
        self._by_file: dict[Path, Persona] = {}
        self._parse_errors: dict[Path, str] = {}
        self._refused: set[Path] = set()
        self._personas: dict[str, Persona] = {}
        self.reload_if_changed()

    def get(self, npc_id: str) -> Persona:
        return self._personas[npc_id]

    def ids(self) -> list[str]:
        return sorted(self._personas)

    def _scan(self) -> dict[Path, tuple]:
        signatures = {}
        for path in persona_files(self.directory):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            signatures[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return signatures

    def describe(self, changed: list[str]) -> str:
        """'reloaded: a, b; removed: c' for ids that `reload_if_changed` returned."""
        live = set(self._personas)
        parts = [(verb, [i for i in changed if (i in live) == present])
                 for verb, present in (("reloaded", True), ("removed", False))]
        return "; ".join(f"{verb}: {', '.join(ids)}" for verb, ids in parts if ids)

    def reload_if_changed(self) -> list[str]:
        """Check file signatures (mtime, size, inode); load what changed. Returns the ids whose
        persona was added, replaced or removed."""
        if not self.directory.is_dir():
            return []
        signatures = self._scan()
        if signatures == self._signatures:
            return []
        # a file refused for a cross-file problem is retried: the change may have fixed it
        changed = {f for f, sig in signatures.items()
                   if self._signatures.get(f) != sig or f in self._refused}
        old_by_file = self._by_file
        by_file = {f: p for f, p in old_by_file.items() if f in signatures}
        parse_errors = {f: e for f, e in self._parse_errors.items() if f in signatures}
        for path in changed:
            try:
                by_file[path] = load_persona_file(path)
                parse_errors.pop(path, None)
            except PersonaError as e:
                parse_errors[path] = str(e)
        # unchanged files first, so a duplicate id is blamed on the file that introduced it
        ordered = sorted(by_file, key=lambda f: (f in changed, f))
        cross_errors: dict[Path, list[str]] = {}
        for issue in cast_issues([by_file[f] for f in ordered]):
            cross_errors.setdefault(Path(issue.file), []).append(str(issue))
        refused = {f for f in cross_errors if f in changed and f not in parse_errors}
        for path in refused:
            if path in old_by_file:
                by_file[path] = old_by_file[path]
            else:
                del by_file[path]
        personas: dict[str, Persona] = {}
        for path in ordered:
            if path in by_file:
                personas.setdefault(by_file[path].id, by_file[path])
        errors = {str(f): e for f, e in parse_errors.items()}
        for path, messages in cross_errors.items():
            errors[str(path)] = "\n".join(filter(None, [errors.get(str(path))] + messages))
        old = self._personas
        self._signatures, self._by_file, self._parse_errors = signatures, by_file, parse_errors
        self._refused = refused
        self._personas, self.errors = personas, errors
        return sorted(i for i in set(old) | set(personas) if old.get(i) is not personas.get(i))
