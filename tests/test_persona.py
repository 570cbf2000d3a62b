import dataclasses
import os
import random
import re
from pathlib import Path

import pytest

from npc_engine.lint import check_paths
from npc_engine.persona import (
    KNOWN_KEYS,
    LIST_FIELDS,
    SAMPLING_FIELDS,
    STRING_FIELDS,
    PersonaError,
    PersonaStore,
    load_persona_dir,
    load_persona_file,
)
from npc_engine.prompt import EOT, NPC, PromptPersona, Turn, build_prompt, persona_block
from npc_engine.sampling import SamplingParams

PERSONAS = Path(__file__).resolve().parents[1] / "personas"

VALID = '''id = "smith"
name = "Brom"
role = "blacksmith"
greeting = "Hm."
facts = ["I forge swords."]
fallback_lines = ["Hm."]
'''


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def issues_of(path) -> list[str]:
    with pytest.raises(PersonaError) as e:
        load_persona_file(path)
    return [str(i) for i in e.value.issues]


# ---------------------------------------------------------------- the shipped cast

def test_shipped_cast_validates():
    cast = load_persona_dir(PERSONAS)
    assert len(cast) >= 8 and "host" in cast
    files, issues = check_paths([PERSONAS])
    assert issues == [] and len(files) == len(cast)
    for p in cast.values():
        assert 4 <= len(p.facts) <= 8, p.id
        assert 2 <= len(p.banned_topics) <= 3 and p.deflection, p.id
        assert len(p.fallback_lines) >= 3 and p.greeting, p.id
        assert p.relationships, p.id
        SamplingParams(**p.sampling)  # every override is a valid SamplingParams field and value


def test_readme_field_table_is_the_schema():
    readme = (PERSONAS / "README.md").read_text()
    documented = dict(re.findall(r"^\| `([a-z_]+)` \| [^|]+ \| ([^|]+) \|", readme, re.M))
    assert set(documented) == KNOWN_KEYS
    required = {k for k, needed in (STRING_FIELDS | LIST_FIELDS).items() if needed}
    assert {k for k, column in documented.items() if column.strip().startswith("yes")} == required
    sampling = re.search(r"^\| `sampling` .*$", readme, re.M).group(0)
    assert set(re.findall(r"`([a-z_]+)`", sampling)) - {"sampling"} == set(SAMPLING_FIELDS)


def test_readme_example_validates(tmp_path):
    readme = (PERSONAS / "README.md").read_text()
    example = re.search(r"## Complete example\s+```toml\n(.*?)```", readme, re.S).group(1)
    path = write(tmp_path, "blacksmith.toml", example)
    (tmp_path / "host.toml").write_text(VALID.replace('"smith"', '"host"'))
    (tmp_path / "guard_captain.toml").write_text(VALID.replace('"smith"', '"guard_captain"'))
    p = load_persona_file(path)
    assert p.id == "blacksmith" and p.sampling == {"temperature": 0.7, "max_tokens": 48}
    assert check_paths([path])[1] == []


def test_sampling_fields_match_sampling_params():
    assert set(SAMPLING_FIELDS) <= {f.name for f in dataclasses.fields(SamplingParams)}


# ---------------------------------------------------------------- prompt

def test_prompt_uses_the_conditioning_format():
    p = load_persona_dir(PERSONAS)["blacksmith"]
    turns = [Turn("player", "Who are you?"), Turn("npc", "Brom."), Turn("player", "What do you make?")]
    expected = PromptPersona(name=p.name, role=p.role, facts=p.facts, style=p.style,
                             knowledge=p.knowledge, relationships=list(p.relationships.values()),
                             banned_topics=p.banned_topics, deflection=p.deflection)
    assert p.to_prompt_persona() == expected
    assert p.prefix() == persona_block(expected)
    assert p.prompt(turns) == build_prompt(expected, turns)
    assert p.prompt(turns).startswith(p.prefix()) and p.prompt([]).startswith(p.prefix())
    assert "Captain Elsa Varn buys every sword" in p.prefix()


def test_open_prompt_is_the_prompt_without_its_last_player_turn_closed():
    p = load_persona_dir(PERSONAS)["blacksmith"]
    turns = [Turn("player", "Who are you?"), Turn("npc", "Brom.")]
    for typed in ("", "What do you ", "  What do you make?  "):
        assert p.open_prompt(turns, typed) + EOT + NPC == p.prompt(turns + [Turn("player", typed)])


def test_fallback_line_by_index_and_rng():
    p = load_persona_dir(PERSONAS)["host"]
    n = len(p.fallback_lines)
    assert p.fallback_line(0) == p.fallback_lines[0]
    assert p.fallback_line(n + 1) == p.fallback_lines[1]
    assert p.fallback_line(random.Random(3)) == random.Random(3).choice(p.fallback_lines)


# ---------------------------------------------------------------- errors: file, line, field

def test_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "a.toml", 'id = "a"\nname = \n')
    [issue] = issues_of(path)
    assert issue.startswith(f"{path}:2: (syntax): invalid TOML")


def test_unknown_keys(tmp_path):
    path = write(tmp_path, "a.toml", VALID + 'colour = "red"\n[sampling]\ntop_q = 0.5\n')
    assert issues_of(path) == [
        f"{path}:7: colour: unknown key (allowed: actions, banned_topics, deflection, emotions, "
        "facts, fallback_lines, greeting, id, knowledge, model, name, relationships, role, "
        "sampling, style)",
        f"{path}:9: sampling.top_q: unknown key; did you mean top_p? (allowed: temperature, top_k, top_p, seed, "
        "max_tokens)",
    ]


def test_unknown_key_suggests_the_nearest(tmp_path):
    path = write(tmp_path, "a.toml", VALID.replace("fallback_lines", "fallback_line"))
    assert any(i.startswith(f"{path}:6: fallback_line: unknown key; did you mean fallback_lines? (")
               for i in issues_of(path))


def test_wrong_types_all_reported(tmp_path):
    text = VALID.replace('name = "Brom"', "name = 3").replace(
        'facts = ["I forge swords."]', 'facts = [\n  "ok",\n  5,\n  "",\n]')
    text += 'knowledge = "not a list"\n[relationships]\nhost = 1\n[sampling]\ntemperature = -1\n'
    path = write(tmp_path, "a.toml", text)
    assert issues_of(path) == [
        f"{path}:2: name: expected a string, got an integer",
        f"{path}:5: facts[1]: expected a string, got an integer",
        f"{path}:5: facts[2]: must not be empty",
        f"{path}:11: knowledge: expected an array of strings, got a string",
        f"{path}:13: relationships.host: expected a string, got an integer",
        f"{path}:15: sampling.temperature: expected a number >= 0, got -1",
    ]


def test_key_lines_skip_multiline_strings(tmp_path):
    text = VALID + 'style = """\nknowledge = "looks like a key"\n"""\nknowledge = 5\n'
    path = write(tmp_path, "a.toml", text)
    assert issues_of(path) == [f"{path}:10: knowledge: expected an array of strings, got an integer"]


def test_missing_required_fields(tmp_path):
    path = write(tmp_path, "a.toml", 'id = "a"\nname = "A"\nbanned_topics = ["war"]\n')
    assert issues_of(path) == [
        f"{path}:1: role: required field is missing",
        f"{path}:1: greeting: required field is missing",
        f"{path}:1: facts: required field is missing",
        f"{path}:1: fallback_lines: required field is missing",
        f"{path}:1: deflection: required when banned_topics is set: the line said instead",
    ]


def test_invalid_id_and_inline_table_line(tmp_path):
    text = VALID.replace('"smith"', '"Bad Id"') + 'relationships = { host = 1 }\n'
    path = write(tmp_path, "a.toml", text)
    bad_id, relationship = issues_of(path)
    assert bad_id.startswith(f"{path}:1: id: 'Bad Id' is not a valid id")
    assert relationship == f"{path}:7: relationships.host: expected a string, got an integer"


def test_duplicate_ids_across_files(tmp_path):
    write(tmp_path, "a.toml", VALID)
    second = write(tmp_path, "b.toml", "# the same smith again\n" + VALID)
    with pytest.raises(PersonaError) as e:
        load_persona_dir(tmp_path)
    assert [str(i) for i in e.value.issues] == [
        f"{second}:2: id: duplicate id 'smith', already used by {tmp_path / 'a.toml'}"]


def test_dangling_relationship(tmp_path):
    write(tmp_path, "host.toml", VALID.replace('"smith"', '"host"'))
    path = write(tmp_path, "smith.toml", VALID + '[relationships]\nhost = "Greta."\nghost = "Boo."\n')
    with pytest.raises(PersonaError) as e:
        load_persona_dir(tmp_path)
    assert [str(i) for i in e.value.issues] == [
        f"{path}:9: relationships.ghost: no persona with id 'ghost'"]
    # checking the one file alone still resolves ids defined next to it
    files, issues = check_paths([path])
    assert files == [path] and [str(i) for i in issues] == [str(e.value.issues[0])]


def test_banned_topic_in_own_text_warns_naming_both_places(tmp_path, capsys):
    from npc_engine.cli import main

    facts = 'facts = [\n    "I forge swords.",\n    "I fought in the Wars.",\n]'
    text = VALID.replace('facts = ["I forge swords."]', facts)
    text += 'banned_topics = ["brother", "war"]\ndeflection = "No."\n[relationships]\nhost = "My brother Tom."\n'
    path = write(tmp_path, "smith.toml", text)
    write(tmp_path, "host.toml", VALID.replace('"smith"', '"host"'))
    load_persona_file(path)  # a warning, not an error: the file still loads
    assert [str(i) for i in check_paths([path])[1]] == [
        f"{path}:7: facts[1]: warning: mentions banned_topics[1] 'war' (line 10): the model will repeat it, "
        "and every line that does is replaced by the deflection",
        f"{path}:13: relationships.host: warning: mentions banned_topics[0] 'brother' (line 10): the model will "
        "repeat it, and every line that does is replaced by the deflection",
    ]
    assert main(["persona", "check", str(path)]) == 0
    assert capsys.readouterr().out.endswith("1 persona file(s) OK, 2 warning(s)\n")


def test_load_dir_collects_errors_of_every_file(tmp_path):
    write(tmp_path, "a.toml", VALID.replace("name = \"Brom\"\n", ""))
    write(tmp_path, "b.toml", VALID.replace('"smith"', '"b"').replace('greeting = "Hm."\n', ""))
    with pytest.raises(PersonaError) as e:
        load_persona_dir(tmp_path)
    assert [(Path(i.file).name, i.field) for i in e.value.issues] == [("a.toml", "name"),
                                                                        ("b.toml", "greeting")]


# ---------------------------------------------------------------- CLI

def test_persona_check_exit_codes(tmp_path, capsys):
    from npc_engine.cli import main
    assert main(["persona", "check", str(PERSONAS)]) == 0
    bad = write(tmp_path, "bad.toml", VALID.replace('name = "Brom"', "name = 3"))
    assert main(["persona", "check", str(PERSONAS), str(bad)]) == 1
    assert f"{bad}:2: name: expected a string, got an integer" in capsys.readouterr().out
    assert main(["persona", "check", str(tmp_path / "missing.toml")]) == 1


def test_chat_command_unknown_npc(capsys):
    from npc_engine.cli import main
    assert main(["chat", "--npc", "nobody", "--personas", str(PERSONAS)]) == 2
    assert "no persona with id 'nobody'" in capsys.readouterr().err


# ---------------------------------------------------------------- hot reload

def bump_mtime(path: Path) -> None:
    # Filesystems with coarse timestamps could give a rewrite the same mtime; force a new one.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def small_cast(directory: Path) -> None:
    write(directory, "host.toml", VALID.replace('"smith"', '"host"').replace('"Brom"', '"Greta"'))
    write(directory, "smith.toml", VALID + '[relationships]\nhost = "Greta feeds me."\n')


def test_store_swaps_edited_added_and_removed_files(tmp_path):
    small_cast(tmp_path)
    store = PersonaStore(tmp_path)
    assert store.ids() == ["host", "smith"] and store.errors == {}
    assert store.reload_if_changed() == []
    old_host, smith = store.get("host"), store.get("smith")

    host = tmp_path / "host.toml"
    host.write_text(host.read_text().replace('"Greta"', '"Greta Stoutbarrel"'))
    bump_mtime(host)
    assert store.reload_if_changed() == ["host"]
    assert store.get("host").name == "Greta Stoutbarrel" and old_host.name == "Greta"
    assert store.get("smith") is smith

    write(tmp_path, "extra.toml", VALID.replace('"smith"', '"extra"'))
    assert store.reload_if_changed() == ["extra"] and "extra" in store.ids()
    (tmp_path / "extra.toml").unlink()
    host.write_text(host.read_text().replace('"Greta Stoutbarrel"', '"Greta"'))
    bump_mtime(host)
    assert store.reload_if_changed() == ["extra", "host"]
    assert store.describe(["extra", "host"]) == "reloaded: host; removed: extra"
    with pytest.raises(KeyError):
        store.get("extra")


def test_service_logs_a_deleted_persona_as_removed(tmp_path, caplog):
    from types import SimpleNamespace

    from npc_engine.service import Service

    small_cast(tmp_path)
    write(tmp_path, "extra.toml", VALID.replace('"smith"', '"extra"'))
    store = PersonaStore(tmp_path)
    service = Service(SimpleNamespace(tokenizer=None, max_prompt_len=lambda: 1024), store)
    (tmp_path / "extra.toml").unlink()
    with caplog.at_level("INFO", logger="npc_engine.service"):
        service.reload_personas()
    assert "personas removed: extra" in caplog.messages


def test_store_keeps_old_version_on_error(tmp_path):
    small_cast(tmp_path)
    store = PersonaStore(tmp_path)
    smith = tmp_path / "smith.toml"
    good = store.get("smith")

    smith.write_text(smith.read_text().replace('name = "Brom"', "name = 7"))
    bump_mtime(smith)
    assert store.reload_if_changed() == []
    assert store.get("smith") is good
    assert store.errors == {str(smith): f"{smith}:2: name: expected a string, got an integer"}

    # a valid file pointing at an id that does not exist is refused too
    smith.write_text(smith.read_text().replace("name = 7", 'name = "Brom II"')
                     .replace("[relationships]", '[relationships]\nghost = "Boo."'))
    bump_mtime(smith)
    assert store.reload_if_changed() == []
    assert store.get("smith") is good
    assert store.errors == {str(smith): f"{smith}:8: relationships.ghost: no persona with id 'ghost'"}

    # ...and retried when the missing persona appears
    write(tmp_path, "ghost.toml", VALID.replace('"smith"', '"ghost"'))
    assert store.reload_if_changed() == ["ghost", "smith"]
    assert store.get("smith").name == "Brom II" and store.errors == {}


def test_store_duplicate_id_blames_the_new_file(tmp_path):
    write(tmp_path, "z_first.toml", VALID)
    store = PersonaStore(tmp_path)
    first = store.get("smith")
    copy = write(tmp_path, "a_copy.toml", VALID.replace('"Brom"', '"Other"'))
    assert store.reload_if_changed() == []
    assert store.get("smith") is first
    assert "duplicate id 'smith'" in store.errors[str(copy)] and len(store.errors) == 1


def test_store_starts_with_broken_files(tmp_path):
    write(tmp_path, "good.toml", VALID)
    bad = write(tmp_path, "bad.toml", "id = ")
    store = PersonaStore(tmp_path)
    assert store.ids() == ["smith"] and list(store.errors) == [str(bad)]
    with pytest.raises(FileNotFoundError):
        PersonaStore(tmp_path / "nope")


# ---------------------------------------------------------------- chat

def test_chat_streams_replies_keeps_history_and_guards(tiny_model_dir, tmp_path):
    import io

    from npc_engine.chat import run_chat
    from npc_engine.engine import Engine

    small_cast(tmp_path)
    smith = tmp_path / "smith.toml"
    smith.write_text(smith.read_text().replace('[relationships]', 'banned_topics = ["war"]\n'
                                               'deflection = "Ask me about steel."\n[relationships]'))
    store = PersonaStore(tmp_path)
    engine = Engine.load(tiny_model_dir, draft="ngram", device="cpu", max_batch=2, max_seq=256)
    params = SamplingParams(temperature=0.0, max_tokens=6)
    lines = iter(["What do you make?", "Tell me of the war.", "And your name?", "/quit"])
    out = io.StringIO()
    submitted = []
    submit = engine.submit
    engine.submit = lambda rid, ids, p, prefix_len=0, **kw: (submitted.append((ids, prefix_len)),
                                                             submit(rid, ids, p, prefix_len, **kw))[1]
    turns = run_chat(engine, store, "smith", lambda p: params, lambda _: next(lines), out)

    persona = store.get("smith")
    assert [t.speaker for t in turns] == ["npc", "player", "npc", "player", "npc", "player", "npc"]
    assert turns[0].text == "Hm." and turns[4].text == "Ask me about steel."
    assert len(submitted) == 2  # the banned question never reached the model
    for (ids, prefix_len), n_turns in zip(submitted, (2, 6)):
        assert ids == engine.tokenizer.encode(persona.prompt(turns[1:n_turns]))  # the greeting is not history
        assert prefix_len == len(engine.tokenizer.encode(persona.prefix())) and prefix_len < len(ids)
    # the streamed text is the reply kept in the history (or its replacement, when one was needed)
    text = out.getvalue()
    for reply in (turns[2].text, turns[6].text):
        assert reply and reply in text
    assert "[guard: the player touched the banned topic 'war']" in text


def test_chat_writes_the_line_header_like_the_service_and_shows_emotion_and_action(tiny_model_dir, tmp_path):
    import io
    import re

    from npc_engine.chat import run_chat
    from npc_engine.engine import Engine

    write(tmp_path, "smith.toml", VALID + 'emotions = ["wary", "happy"]\nactions = ["point", "nod"]\n')
    store = PersonaStore(tmp_path)
    engine = Engine.load(tiny_model_dir, draft="ngram", device="cpu", max_batch=2, max_seq=256)
    headers = []
    submit = engine.submit
    engine.submit = lambda rid, ids, p, prefix_len=0, header=None, **kw: (headers.append(header),
                                                                          submit(rid, ids, p, prefix_len, header=header,
                                                                                 **kw))[1]
    lines = iter(["What do you make?", "/quit"])
    out = io.StringIO()
    turns = run_chat(engine, store, "smith", lambda p: SamplingParams(temperature=0.0, max_tokens=12),
                     lambda _: next(lines), out)
    (header,) = headers
    assert header is not None and header.emotions == ["wary", "happy"]
    emotion, action = header.result()
    assert emotion in ("wary", "happy") and action in ("point", "nod", None)
    shown = out.getvalue().splitlines()
    assert shown[2] == f"Brom: {turns[2].text}" and "[" not in turns[2].text  # the header is not spoken text
    assert shown[3] == f"(emotion: {emotion}{f', action: {action}' if action else ''})"
    assert re.fullmatch(r"\(emotion: (wary|happy)(, action: (point|nod))?\)", shown[3])


def test_chat_guards_the_reply_and_falls_back_on_empty(tiny_model_dir, tmp_path):
    import io

    from fakes import ScriptedEngine
    from npc_engine.chat import run_chat
    from npc_engine.tokenizer import Tokenizer

    small_cast(tmp_path)
    smith = tmp_path / "smith.toml"
    smith.write_text(smith.read_text().replace('fallback_lines = ["Hm."]', 'fallback_lines = ["Later."]\n'
                                               'banned_topics = ["guard"]\ndeflection = "No."'))
    store = PersonaStore(tmp_path)
    engine = ScriptedEngine(Tokenizer.from_dir(tiny_model_dir),
                            ["I forge swords.", "I forge swords for the town guard.", ""], tokens_per_step=2)
    lines = iter(["Hello?", "For whom?", "And?", ""])

    def read_line(prompt: str) -> str:
        line = next(lines)
        if line == "And?":  # the author edits the persona mid-conversation
            smith.write_text(smith.read_text().replace('"Brom"', '"Brom II"'))
            bump_mtime(smith)
        return line

    out = io.StringIO()
    turns = run_chat(engine, store, "smith", lambda p: SamplingParams(), read_line, out)
    assert [t.text for t in turns[2::2]] == ["I forge swords.", "No.", "Later."]
    assert out.getvalue().splitlines()[2:] == [
        "Brom: I forge swords.",
        "Brom: I forge swords for the town guard.",
        "[guard: the reply touched 'guard'; the game would show: No.]",
        f"[{smith} reloaded]",
        "Brom II: ",
        "[empty reply; the game would show: Later.]",
    ]
