"""Where keys stand in a TOML file's text: tomllib reports no positions for values, so the line of a field is
found by scanning the text for its key or table header."""
import re

_KEY_PART = r'(?:[A-Za-z0-9_-]+|"[^"\n]*"|\'[^\'\n]*\')'
_KEY_PATH = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER_RE = re.compile(rf"^\s*\[\[?\s*({_KEY_PATH})\s*\]\]?")
_ASSIGN_RE = re.compile(rf"^\s*({_KEY_PATH})\s*=")


def _split_key_path(text: str) -> tuple[str, ...]:
    return tuple(part.strip("\"'") for part in re.findall(_KEY_PART, text))


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path (table headers included) to the 1-based line where it first appears."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_multiline_string = False
    for number, line in enumerate(text.splitlines(), start=1):
        quotes = line.count('"""') + line.count("'''")
        if in_multiline_string:
            in_multiline_string = quotes % 2 == 0
            continue
        if (m := _HEADER_RE.match(line)) and not _ASSIGN_RE.match(line):
            table = _split_key_path(m.group(1))
            lines.setdefault(table, number)
        elif m := _ASSIGN_RE.match(line):
            lines.setdefault(table + _split_key_path(m.group(1)), number)
        in_multiline_string = quotes % 2 == 1
    return lines


def line_of(lines: dict[tuple[str, ...], int], *path: str) -> int:
    """Line of the longest prefix of `path` present in the file (an inline table keeps its keys on
    the line of the table's key); line 1 when the key is absent."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return 1
