"""Scenes (issue 20). Without a service: state, events, validation codes, the next-speaker policy, the host's
cues and the prompt each speaker is shown (npc_engine.scenes, npc_engine.scene_policy). Served (protocol 1.2,
cap `scene`) on tests/fakes.ScriptedEngine over a real ROUTER socket: stable error codes, one terminal per line,
one line per scene, interruption, removal, the host's itinerary, deadlines, guard, close, 16 scenes beside 64
says, and the Python client."""
import time

import pytest

from npc_engine import prompt
from npc_engine.chat_template import ChatTemplate
from npc_engine.scene_policy import ambient, fit, host_notes, reply_to_player, scene_messages, view
from npc_engine.scenes import ALL, PLAYER, Flight, Member, SceneError, SceneLimits, Scenes

CAST = {"host": Member("host", "Greta Oakbarrel", "innkeeper"), "smith": Member("smith", "Brom Ironhand", "blacksmith"),
        "bard": Member("bard", "Pip Larkvale", "bard"), "guard": Member("guard", "Elsa Varn", "captain of the guard"),
        "merchant": Member("merchant", "Tamsin Reed", "spice merchant")}
ITINERARY = [{"text": "the arrival"}, {"text": "the toast", "at": "nine"}, {"text": "supper"}, "a song by the fire"]
ITEMS = ["the arrival", "the toast", "supper", "a song by the fire"]
GUESTS = [{"name": "Elsa Varn", "npc": "guard", "rsvp": "coming"},
          {"name": "Old Hob", "rsvp": "coming", "role": "miller"}, {"name": "Widow Fenn", "rsvp": "not_coming"},
          {"name": "Tamsin Reed", "npc": "merchant", "rsvp": "no_answer"}]
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def scenes(**limits) -> Scenes:
    return Scenes(lambda npc: CAST[npc], SceneLimits(**limits))


def party(s: Scenes | None = None, **kw):
    s = s or scenes()
    args = dict(cast=["host", "smith", "bard"], situation="Harvest night at the Gilded Tankard.", host="host",
                itinerary=ITINERARY, guests=GUESTS)
    return s.open("me", "party", **(args | kw))


def say(scene, pick, text="..."):
    """The picked speaker says `text` (its line went through flight and ended with done)."""
    scene.flight = Flight("k", pick.speaker, pick.to, pick.cue)
    scene.line_ended(text)


class CharTokenizer:
    """One token per character: prompt lengths are text lengths."""

    def __init__(self, template: ChatTemplate | None = None):
        self.chat_template = template

    def encode(self, text, add_special_tokens=True):
        return ([0] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i)


# ---- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, code", [
    (dict(cast=["host", "nobody"]), "unknown_npc"),
    (dict(cast=["host", "smith", "bard", "guard"]), "too_many_members"),
    (dict(cast=[]), "bad_request"),
    (dict(cast=["host", "host"]), "bad_request"),
    (dict(host="guard"), "bad_request"),
    (dict(itinerary=[{"text": ""}]), "bad_itinerary"),
    (dict(itinerary=[{"text": "toast", "at": 9}]), "bad_itinerary"),
    (dict(itinerary=[{"at": "nine"}]), "bad_itinerary"),
    (dict(itinerary=["x"] * 33), "bad_itinerary"),
    (dict(itinerary="the toast"), "bad_itinerary"),
    (dict(host=None), "bad_itinerary"),  # an itinerary needs a host
    (dict(guests=[{"name": "A", "rsvp": "maybe"}]), "bad_request"),
    (dict(guests=[{"name": "A"}, {"name": "A"}]), "bad_request"),
    (dict(guests=[{"name": "A", "npc": "nobody"}]), "unknown_npc"),
])
def test_open_refusals_have_stable_codes(kw, code):
    s = scenes(max_cast=3)
    with pytest.raises(SceneError) as e:
        party(s, **kw)
    assert e.value.code == code
    assert not s.scenes  # nothing half-opened


def test_scene_ids_and_lookup():
    s = scenes()
    party(s)
    with pytest.raises(SceneError) as e:
        party(s)
    assert e.value.code == "duplicate_scene"
    s.open("you", "party", ["smith"], "x")  # another scope: its own ids
    with pytest.raises(SceneError) as e:
        s.get("me", "nope")
    assert e.value.code == "scene_not_found"
    s.close("me", "party")
    with pytest.raises(SceneError) as e:
        s.get("me", "party")
    assert e.value.code == "scene_not_found"
    assert s.get("you", "party").cast == ["smith"]


def test_cast_changes():
    s = scenes(max_cast=4)
    scene = party(s)
    s.add(scene, ["guard"])
    assert scene.cast == ["host", "smith", "bard", "guard"]
    with pytest.raises(SceneError) as e:
        s.add(scene, ["merchant"])
    assert e.value.code == "too_many_members"
    with pytest.raises(SceneError) as e:
        s.add(scene, ["nobody"])
    assert e.value.code == "unknown_npc"
    with pytest.raises(SceneError) as e:
        scene.remove("merchant")
    assert e.value.code == "not_in_cast"
    scene.remove("smith")
    assert "smith" not in scene.cast


# ---- state the game reads --------------------------------------------------------------------------

def test_state_tracks_presence_rsvps_and_itinerary():
    scene = party()
    state = scene.to_wire()
    assert state["present"] == ["host", "smith", "bard", PLAYER]
    assert state["missing"] == ["Elsa Varn", "Old Hob"]  # said they would come; not Widow Fenn, not Tamsin
    assert [g["present"] for g in state["guests"]] == [False, False, False, False]
    scene.arrive("Old Hob")
    scenes_ = scenes()  # the guard joins through the cast
    scene2 = party(scenes_)
    scenes_.add(scene2, ["guard"])
    assert scene2.to_wire()["missing"] == ["Old Hob"]
    assert scene.to_wire()["missing"] == ["Elsa Varn"] and "Old Hob" in scene.to_wire()["present"]
    assert scene.advance() == 0 and scene.advance() == 1 and scene.to_wire()["position"] == 2
    assert scene.advance(3) == 3 and scene.position == 4
    with pytest.raises(SceneError) as e:
        scene.advance()  # past the end
    assert e.value.code == "bad_itinerary"
    with pytest.raises(SceneError) as e:
        scene.arrive("Nobody Known")
    assert e.value.code == "not_in_cast"


def test_transcript_keeps_speaker_and_addressee_and_is_capped():
    scene = party(scenes(max_transcript=5))
    scene.player_line("Hello, Brom!", "smith")
    with pytest.raises(SceneError) as e:
        scene.player_line("Hi", "guard")
    assert e.value.code == "not_in_cast"
    say(scene, reply_to_player(scene, "smith", "Hello, Brom!"), "Evening.")
    assert scene.to_wire()["transcript"][-2:] == [{"speaker": PLAYER, "to": "smith", "text": "Hello, Brom!"},
                                                 {"speaker": "smith", "to": PLAYER, "text": "Evening."}]
    for i in range(10):
        scene.event(f"the clock strikes {i}")
    assert len(scene.transcript) == 5 and scene.transcript[-1].text == "the clock strikes 9"


# ---- who speaks next ------------------------------------------------------------------------------

def test_addressed_npc_answers_the_player_even_with_host_cues():
    scene = party()
    assert scene.cues  # the host's welcome is due
    scene.player_line("Pip, play something!", "smith")  # the address wins over a name in the text
    assert ambient(scene).speaker == "smith" and ambient(scene).to == PLAYER


def test_unaddressed_player_line_goes_to_who_is_named_then_to_the_partner_then_host():
    scene = party()
    scene.cues.clear()
    scene.player_line("Pip, do you know any songs?")
    assert ambient(scene).speaker == "bard"
    say(scene, ambient(scene))
    scene.player_line("And another?")
    assert ambient(scene).speaker == "bard"  # the conversation partner
    fresh = party(scenes())
    fresh.cues.clear()
    fresh.player_line("Nice place.")
    assert ambient(fresh).speaker == "host"


def test_ambient_answers_the_addressee_then_rotates_by_recency():
    scene = party()
    scene.cues.clear()
    scene.flight = Flight("k", "smith", "bard")
    scene.line_ended("Pip, sing us one.")
    pick = ambient(scene)
    assert (pick.speaker, pick.to) == ("bard", "smith")
    say(scene, pick)
    spoken = [ambient(scene).speaker]
    say(scene, ambient(scene))
    spoken.append(ambient(scene).speaker)
    assert spoken[0] != "bard" and spoken[1] != spoken[0]  # never the last speaker; the quietest first
    assert spoken[0] == "host"


def test_turns_go_round_when_nobody_is_named():
    scene = party()
    scene.cues.clear()
    spoken = []
    for _ in range(9):
        pick = ambient(scene)
        spoken.append(pick.speaker)
        say(scene, pick, "A fine evening.")
    assert sorted(spoken) == sorted(["host", "smith", "bard"] * 3)  # nobody holds the floor
    assert all(e.to == ALL for e in scene.transcript)  # remarks to everyone, not a chain of answers


def test_the_host_named_by_the_game_acts_on_its_cue():
    scene = party()
    scene.cues.clear()
    scene.advance(1)
    assert ambient(scene, named="host").cue.item == 1
    assert ambient(scene, named="smith").cue is None


def test_relevance_beats_recency():
    scene = party()
    scene.cues.clear()
    scene.flight = Flight("k", "host", ALL)
    scene.line_ended("Has anyone seen Brom's new anvil?")
    assert ambient(scene).speaker == "smith"


def test_game_can_name_the_speaker_and_refusals():
    scene = party()
    pick = ambient(scene, named="bard", to="smith")
    assert (pick.speaker, pick.to, pick.cue) == ("bard", "smith", None)  # even over the host's cues
    for named, to, code in [("guard", None, "not_in_cast"), ("bard", "guard", "not_in_cast"),
                            (PLAYER, None, "bad_request"), ("bard", "bard", "bad_request")]:
        with pytest.raises(SceneError) as e:
            ambient(scene, named=named, to=to)
        assert e.value.code == code


def test_removed_member_never_speaks_again():
    scene = party()
    scene.cues.clear()
    scene.remove("smith")
    scene.flight = Flight("k", "host", "smith")
    scene.line_ended("Brom, Brom, where is Brom?")
    scene.player_line("Brom?")
    for _ in range(6):
        pick = ambient(scene)
        assert pick.speaker != "smith"
        say(scene, pick)
    with pytest.raises(SceneError):
        scene.player_line("Brom!", "smith")
    scene.remove("host")
    scene.remove("bard")
    with pytest.raises(SceneError) as e:
        ambient(scene)
    assert e.value.code == "no_speaker"


def test_removed_host_stops_steering():
    scene = party()
    scene.remove("host")
    assert scene.host is None and not scene.cues
    scene.advance()
    assert not scene.cues and ambient(scene).speaker != "host"


def test_a_line_that_did_not_end_leaves_no_trace():
    scene = party()
    pick = ambient(scene)
    scene.flight = Flight("k", pick.speaker, pick.to, pick.cue)
    scene.line_ended(None)  # cancelled or failed
    assert scene.transcript == [] and scene.cues[0] is pick.cue and scene.flight is None


# ---- the host runs the evening ---------------------------------------------------------------------

def test_host_welcomes_then_announces_items_in_order_and_names_missing_guests():
    scene = party()
    pick = ambient(scene)
    assert (pick.speaker, pick.cue.kind) == ("host", "welcome")
    assert any("Old Hob" in n and "missing" in n for n in host_notes(scene, pick.cue))
    say(scene, pick)
    announced = []
    for _ in ITINERARY:
        scene.advance()
        pick = ambient(scene)
        assert pick.speaker == "host" and pick.cue.kind == "item"
        notes = host_notes(scene, pick.cue)
        assert any(n.startswith("Now:") and ITEMS[pick.cue.item] in n for n in notes)
        assert any("Old Hob" in n and "promised" in n for n in notes)
        assert not any("Widow Fenn" in n and "promised" in n for n in notes)
        announced.append(pick.cue.item)
        say(scene, pick)
        assert ambient(scene).speaker != "host" or ambient(scene).cue is None  # the cue is done
    assert announced == [0, 1, 2, 3]


def test_only_the_latest_itinerary_point_is_announced():
    scene = party()
    scene.cues.clear()
    scene.advance()
    scene.advance()
    assert [c.item for c in scene.cues] == [1]


def test_toast_names_the_guests():
    scene = party()
    scene.arrive("Old Hob")
    scene.cues.clear()
    scene.advance(1)
    now = host_notes(scene, ambient(scene).cue)[-1]
    assert "toast" in now and all(n in now for n in ("Brom Ironhand", "Pip Larkvale", "Old Hob"))
    assert "Greta" not in now


def test_host_introduces_newcomers_by_name_and_role():
    s = scenes()
    scene = party(s, player_present=False, player_role="a traveller from the south road")
    scene.cues.clear()
    s.add(scene, ["guard"])
    scene.arrive(PLAYER)
    scene.arrive("Old Hob")
    cues = []
    for _ in range(3):
        pick = ambient(scene)
        assert pick.speaker == "host"
        cues.append(host_notes(scene, pick.cue)[-1])
        say(scene, pick)
    assert "Elsa Varn, captain of the guard" in cues[0]
    assert "the player, a traveller from the south road" in cues[1]
    assert "Old Hob, miller" in cues[2]
    assert ambient(scene).cue is None


def test_no_host_no_cues():
    scene = scenes().open("me", "gate", ["smith", "guard"], "Night at the gate.")
    assert not scene.cues and ambient(scene).cue is None


# ---- the prompt ---------------------------------------------------------------------------------

def persona(npc: str) -> prompt.PromptPersona:
    return prompt.PromptPersona(name=CAST[npc].name, role=CAST[npc].role, facts=["I am here."])


def test_prompt_is_the_training_scene_layout():
    scene = party()
    scene.player_line("Evening, Brom.", "smith")
    say(scene, reply_to_player(scene, "smith", ""), "Evening, stranger.")
    scene.event("The clock strikes nine.")
    scene.flight = Flight("k", "bard", "smith")
    scene.line_ended("Brom, your anvil rings all night!")
    messages = scene_messages(view(scene, "smith", persona("smith")))
    system = messages[0]["content"]
    assert system.startswith("You are Brom Ironhand, blacksmith.")
    assert "Scene: Harvest night at the Gilded Tankard. The host is Greta Oakbarrel." in system
    assert "Present: Greta Oakbarrel, innkeeper; Pip Larkvale, bard; the player." in system
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "Player to Brom Ironhand: Evening, Brom."
    assert messages[2]["content"] == "Evening, stranger."
    assert messages[3]["content"] == ("Narrator: The clock strikes nine.\n"
                                      "Pip Larkvale to Brom Ironhand: Brom, your anvil rings all night!")
    # the same system message the voice adapter's scene examples have
    assert system == prompt.system_prompt(persona("smith"), prompt.Scene(
        "Harvest night at the Gilded Tankard. The host is Greta Oakbarrel.",
        ["Greta Oakbarrel, innkeeper", "Pip Larkvale, bard", "the player"]))


def test_host_notes_follow_the_cached_system_message():
    scene = party()
    v = view(scene, "host", persona("host"), scene.cues[0])
    messages = scene_messages(v)
    assert "You are the host." in messages[0]["content"] and "Old Hob" not in messages[0]["content"]
    assert messages[1]["role"] == "system" and "Old Hob promised to come" in messages[1]["content"]
    assert scene_messages(view(scene, "smith", persona("smith")))[1:] == []  # guests get no notes


@pytest.mark.parametrize("template", [None, ChatTemplate(CHATML, {})])
def test_fitted_prompt_keeps_the_prefix_and_drops_oldest_lines(template):
    tok = CharTokenizer(template)
    scene = party()
    cached = fit(tok, view(scene, "host", persona("host"), scene.cues[0]), 4096)
    for i in range(20):
        scene.player_line(f"Line number {i} from the player, rather long to fill the prompt.")
    v = view(scene, "host", persona("host"), scene.cues[0])
    whole = fit(tok, v, 8192)
    assert whole.turns_left_out == 0 and whole.ids[:whole.prefix_len] == cached.ids[:cached.prefix_len]
    short = fit(tok, v, len(whole.ids) - 200, reserve=50)
    assert short.turns_left_out > 0 and len(short.ids) + 50 <= len(whole.ids) - 200
    assert short.ids[:short.prefix_len] == whole.ids[:whole.prefix_len]
    text = tok.decode(short.ids)
    assert "Line number 19" in text and "Line number 0 " not in text and "Old Hob" in text  # notes always stay
    with pytest.raises(SceneError) as e:
        fit(tok, v, 50)
    assert e.value.code == "too_large"


def test_a_small_context_gets_the_compact_view_the_speakers_directive_kept():
    tok = CharTokenizer()
    scene = party()
    scene.cues.clear()
    scene.advance(1)
    scene.player_line("Cheers!")
    v = view(scene, "host", persona("host"), scene.cues[0])
    whole = fit(tok, v, 8192)
    system = len(whole.ids) - len("Player: Cheers!") - 20
    small = fit(tok, v, system, reserve=4)
    text = tok.decode(small.ids)
    assert small.turns_left_out == 0 and "Player: Cheers!" in text  # the line kept, the extras gone
    assert "Present:" not in text and "Tonight's order" not in text and "Now: the toast" in text
    assert "Old Hob promised" in tok.decode(whole.ids) and "Present:" in tok.decode(whole.ids)


# ---- served: protocol 1.2 cap `scene` on the scripted engine -----------------------------------------

PERSONA = '''id = "{id}"
name = "{name}"
role = "{role}"
greeting = "Hello."
facts = ["I am {name}."]
fallback_lines = ["{name} has to think."]
{extra}
'''
PEOPLE = {"host": ("Greta Oakbarrel", "innkeeper", ""), "smith": ("Brom Ironhand", "blacksmith", ""),
          "bard": ("Pip Larkvale", "bard", 'banned_topics = ["the war"]\ndeflection = "No songs of that."'),
          "guard": ("Elsa Varn", "captain of the guard", ""), "merchant": ("Tamsin Reed", "spice merchant", "")}
STEP_S = 0.003


@pytest.fixture
def served(tmp_path, tiny_model_dir):
    """A service on the scripted engine (in a thread) with the five personas; yields (service, endpoint)."""
    from fakes import ScriptedEngine
    from npc_engine.persona import PersonaStore
    from npc_engine.service import Service, ServiceConfig
    from npc_engine.tokenizer import Tokenizer
    from test_service import running

    for npc, (name, role, extra) in PEOPLE.items():
        (tmp_path / f"{npc}.toml").write_text(PERSONA.format(id=npc, name=name, role=role, extra=extra))
    engine = ScriptedEngine(Tokenizer.from_dir(tiny_model_dir), step_s=STEP_S, max_batch=32,
                            script=" Aye, a fine night.")
    service = Service(engine, PersonaStore(tmp_path), ServiceConfig(bind="tcp://127.0.0.1:*"))
    with running(service) as endpoint:
        yield service, endpoint


def raw(endpoint):
    from test_service import Raw

    return Raw(endpoint)


def open_party(r, scene="party", **fields):
    msg = {"type": "scene.open", "id": f"open-{scene}", "scene": scene, "cast": ["host", "smith", "bard"],
           "situation": "Harvest night at the Gilded Tankard.", "host": "host",
           "itinerary": ITINERARY, "guests": GUESTS} | fields
    return r.request(msg, timeout=10)


def lines(r, ids: set[str], timeout: float = 30.0, got: dict | None = None, until=None) -> dict[str, dict]:
    """Read until every line in `ids` has its terminal message (or `until(message)`): {id: {"line", "tokens",
    "terminal"}}, continuing `got`. Checks that a line's `line` message comes first (if at all), seq order, and
    nothing after a terminal."""
    got = (got or {}) | {i: {"line": None, "tokens": [], "terminal": None} for i in ids - set(got or {})}
    end = time.monotonic() + timeout
    while any(g["terminal"] is None for g in got.values()):
        msg = r.recv(max(0.1, end - time.monotonic()))
        g = got[msg["id"]]
        assert g["terminal"] is None, f"message after the terminal one: {msg}"
        if msg["type"] == "line":
            assert g["line"] is None and not g["tokens"], msg
            g["line"] = msg
        elif msg["type"] == "token":
            assert g["line"] is not None and msg["seq"] == len(g["tokens"]), msg
            g["tokens"].append(msg)
        else:
            assert msg["type"] in ("done", "error"), msg
            g["terminal"] = msg
        if until is not None and until(msg):
            break
    return got


def until_reply(r, mid: str) -> list[dict]:
    """The messages up to and including the first one with id `mid`."""
    msgs = [r.recv(10)]
    while msgs[-1]["id"] != mid:
        msgs.append(r.recv(10))
    return msgs


def next_line(r, mid, scene="party", **fields) -> dict:
    r.send({"type": "scene.next", "id": mid, "scene": scene, **fields})
    return lines(r, {mid})[mid]


REFUSED = [
    ({"type": "scene.open", "scene": "x", "cast": ["host", "nobody"], "situation": "s"}, "unknown_npc"),
    ({"type": "scene.open", "scene": "x", "cast": list(PEOPLE) * 2, "situation": "s"}, "too_many_members"),
    ({"type": "scene.open", "scene": "x", "cast": ["smith"], "situation": "s", "host": "smith",
      "itinerary": [{"text": ""}]}, "bad_itinerary"),
    ({"type": "scene.open", "scene": "x", "cast": ["smith"], "situation": "s", "itinerary": ["a"]}, "bad_itinerary"),
    ({"type": "scene.open", "scene": "x", "cast": "smith", "situation": "s"}, "bad_request"),
    ({"type": "scene.open", "scene": "x", "cast": ["smith"]}, "bad_request"),
    ({"type": "scene.say", "scene": "nope", "text": "hi"}, "scene_not_found"),
    ({"type": "scene.next", "scene": "nope"}, "scene_not_found"),
    ({"type": "scene.state", "scene": "nope"}, "scene_not_found"),
    ({"type": "scene.event", "scene": "party"}, "bad_request"),
    ({"type": "scene.event", "scene": "party", "itinerary": 9}, "bad_itinerary"),
    ({"type": "scene.event", "scene": "party", "arrive": "Nobody"}, "not_in_cast"),
    ({"type": "scene.cast", "scene": "party", "add": ["nobody"]}, "unknown_npc"),
    ({"type": "scene.cast", "scene": "party", "add": ["guard", "merchant"]}, "too_many_members"),
    ({"type": "scene.cast", "scene": "party", "remove": ["guard"]}, "not_in_cast"),
    ({"type": "scene.say", "scene": "party", "text": "hi", "to": "guard"}, "not_in_cast"),
    ({"type": "scene.next", "scene": "party", "speaker": "guard"}, "not_in_cast"),
    ({"type": "scene.start", "scene": "party"}, "unsupported"),
    ({"type": "scene.open", "scene": "party", "cast": ["smith"], "situation": "s"}, "duplicate_scene"),
]


def test_scene_messages_are_validated_with_stable_codes_and_the_service_stays_up(served):
    service, endpoint = served
    service.scenes.limits.max_cast = 4
    r = raw(endpoint)
    before = open_party(r)
    for msg, code in REFUSED:
        assert r.request({"id": "bad", **msg}, timeout=10) | {"message": ""} == {
            "type": "error", "id": "bad", "code": code, "message": ""}, msg
    assert r.request({"type": "scene.state", "id": "open-party", "scene": "party"}, timeout=10) == before  # unchanged
    assert next_line(r, "after")["terminal"]["type"] == "done"
    r.close()


def test_a_line_announces_speaker_and_addressee_streams_and_ends_once(served):
    _, endpoint = served
    r = raw(endpoint)
    state = open_party(r)
    assert state["type"] == "scene.state" and state["missing"] == ["Elsa Varn", "Old Hob"]
    got = next_line(r, "l1")
    assert got["line"] | {"id": "l1"} == {"type": "line", "id": "l1", "scene": "party", "speaker": "host", "to": "all",
                                          "cue": "welcome", "item": None}
    done = got["terminal"]
    assert done["type"] == "done" and done["text"] == "".join(t["text"] for t in got["tokens"]) != ""
    assert (done["scene"], done["speaker"], done["to"]) == ("party", "host", "all")
    transcript = r.request({"type": "scene.state", "id": "s", "scene": "party"}, timeout=10)["transcript"]
    assert transcript == [{"speaker": "host", "to": "all", "text": done["text"]}]
    r.close()


def test_one_line_per_scene_a_player_line_interrupts_and_the_addressed_npc_answers(served):
    service, endpoint = served
    r = raw(endpoint)
    open_party(r)
    r.send({"type": "scene.next", "id": "amb", "scene": "party", "max_tokens": 500})
    r.send({"type": "scene.next", "id": "busy", "scene": "party"})
    got = lines(r, {"amb", "busy"}, until=lambda msg: msg["id"] == "busy")
    assert got["amb"]["line"] is not None and got["amb"]["terminal"] is None
    assert got.pop("busy")["terminal"]["code"] == "scene_busy"
    r.send({"type": "scene.say", "id": "p1", "scene": "party", "text": "Pip, play us a tune!", "to": "bard"})
    got = lines(r, {"amb", "p1"}, got=got)
    assert got["amb"]["terminal"]["cancelled"] is True
    assert (got["p1"]["line"]["speaker"], got["p1"]["line"]["to"]) == ("bard", "player")
    assert got["p1"]["terminal"]["speaker"] == "bard" and not got["p1"]["terminal"]["cancelled"]
    transcript = r.request({"type": "scene.state", "id": "s", "scene": "party"}, timeout=10)["transcript"]
    assert [(e["speaker"], e["to"]) for e in transcript] == [("player", "bard"), ("bard", "player")]  # no cut line
    assert not service.engine.active and not service.calls.by_key  # the interrupted line left the engine
    r.close()


def test_a_removed_member_never_speaks_again(served):
    _, endpoint = served
    r = raw(endpoint)
    open_party(r, guests=[], itinerary=[])
    next_line(r, "welcome")
    r.send({"type": "scene.next", "id": "brom", "scene": "party", "speaker": "smith", "max_tokens": 500})
    assert r.recv(10)["speaker"] == "smith"
    r.send({"type": "scene.cast", "id": "c", "scene": "party", "remove": ["smith"]})
    msgs = until_reply(r, "c")
    assert msgs[-2]["type"] == "done" and msgs[-2]["id"] == "brom" and msgs[-2]["cancelled"]  # its line ends first
    assert msgs[-1]["type"] == "scene.state" and msgs[-1]["cast"] == ["host", "bard"]
    r.send({"type": "scene.say", "id": "p", "scene": "party", "text": "Where did Brom Ironhand go?"})
    assert lines(r, {"p"})["p"]["line"]["speaker"] != "smith"
    for i in range(6):
        assert next_line(r, f"n{i}")["line"]["speaker"] in ("host", "bard")
    assert r.request({"type": "scene.next", "id": "x", "scene": "party", "speaker": "smith"}, timeout=10)["code"] == \
        "not_in_cast"
    r.close()


def test_host_announces_itinerary_in_order_naming_a_missing_guest(served):
    service, endpoint = served
    tokenizer = service.engine.tokenizer
    r = raw(endpoint)
    open_party(r)
    assert next_line(r, "welcome")["line"]["cue"] == "welcome"
    for i, item in enumerate(ITEMS):
        state = r.request({"type": "scene.event", "id": f"e{i}", "scene": "party", "itinerary": "next"}, timeout=10)
        assert state["position"] == i + 1
        got = next_line(r, f"item{i}")
        assert got["line"] | {"id": None} == {"type": "line", "id": None, "scene": "party", "speaker": "host",
                                              "to": "all", "cue": "item", "item": i}
        rid = max(service.engine.prompts, key=lambda k: int(k[1:]))
        shown = tokenizer.decode(service.engine.prompts[rid])
        assert item in shown and "Old Hob" in shown and "promised" in shown
        assert next_line(r, f"after{i}")["line"]["speaker"] != "host"  # the cue is done
    r.close()


def test_deadline_fallback_guard_close_and_a_vanished_client(served):
    service, endpoint = served
    r = raw(endpoint)
    open_party(r, guests=[], itinerary=[])
    late = next_line(r, "late", speaker="smith", deadline_ms=30, max_tokens=500)["terminal"]
    assert late["fallback"] and late["text"] == "Brom Ironhand has to think." and late["speaker"] == "smith"
    r.send({"type": "scene.say", "id": "war", "scene": "party", "text": "Sing of the war!", "to": "bard"})
    war = lines(r, {"war"})["war"]
    assert war["line"]["speaker"] == "bard" and war["terminal"]["deflected"] and war["terminal"]["text"] == \
        "No songs of that."
    transcript = r.request({"type": "scene.state", "id": "s", "scene": "party"}, timeout=10)["transcript"]
    assert [e["text"] for e in transcript][-3:] == ["Brom Ironhand has to think.", "Sing of the war!",
                                                    "No songs of that."]
    gone = raw(endpoint)
    gone.send({"type": "scene.next", "id": "g", "scene": "party", "max_tokens": 500})
    assert gone.recv(10)["type"] == "line"
    gone.close()  # scenes are the service's (per CURVE key), lines the connection's
    deadline = time.monotonic() + 5
    while r.request({"type": "scene.state", "id": "s", "scene": "party"}, timeout=10)["speaking"] is not None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r.send({"type": "scene.next", "id": "open", "scene": "party", "max_tokens": 500})
    assert r.recv(10)["type"] == "line"
    r.send({"type": "scene.close", "id": "c", "scene": "party"})
    msgs = until_reply(r, "c")
    assert msgs[-2]["id"] == "open" and msgs[-2]["cancelled"]
    assert msgs[-1] == {"type": "scene.closed", "id": "c", "scene": "party"}
    assert r.request({"type": "scene.state", "id": "s", "scene": "party"}, timeout=10)["code"] == "scene_not_found"
    assert service.scenes.scenes == {}
    r.close()


def test_sixteen_scenes_of_four_under_sixty_four_says_every_line_ends(served):
    service, endpoint = served
    game, crowd = raw(endpoint), raw(endpoint)
    for s in range(16):
        state = open_party(game, f"s{s}", cast=["host", "smith", "bard", "guard"], guests=[], itinerary=[])
        assert state["type"] == "scene.state"
    for i in range(64):
        crowd.say(f"say{i}", npc=list(PEOPLE)[i % 5], text="Evening.", max_tokens=8)
    said = {s: [] for s in range(16)}
    for round_ in range(3):
        for s in range(16):
            game.send({"type": "scene.next", "id": f"s{s}-{round_}", "scene": f"s{s}", "max_tokens": 6})
        got = lines(game, {f"s{s}-{round_}" for s in range(16)})
        for s in range(16):
            line = got[f"s{s}-{round_}"]
            assert line["terminal"]["type"] == "done" and not line["terminal"]["fallback"]
            said[s].append(line["line"]["speaker"])
    assert all(len(set(speakers)) >= 2 for speakers in said.values())  # turns go round, not one NPC talking
    from test_service import collect

    done = collect(crowd, {f"say{i}" for i in range(64)})
    assert all(t["type"] == "done" for _, t in done.values())
    game.close()
    crowd.close()


def test_python_client_runs_a_scene(served):
    from bridge import Client

    _, endpoint = served
    with Client.connect(endpoint) as client:
        with pytest.raises(ValueError, match="scene"):
            client.scene_next("party")  # before the welcome: the caps are not known yet
        client.reply(client.ping())
        with pytest.raises(ValueError, match="itinerary"):
            client.scene_event("party", itinerary=-1)  # what the service would refuse is refused at the call
        state = client.reply(client.open_scene("party", ["host", "smith", "bard"], "Harvest night.", host="host",
                                               itinerary=["the toast"], guests=[{"name": "Old Hob", "rsvp": "coming"}]))
        assert state["missing"] == ["Old Hob"]
        assert client.reply(client.scene_event("party", itinerary="next"))["position"] == 1
        def whole(lid: str) -> list[dict]:
            events = []
            while not events or events[-1]["type"] not in ("done", "error"):
                client.wait(1.0)
                events += [e for e in client.poll(5.0) if e.get("id") == lid]
            return events

        said = whole(client.scene_say("party", "Evening, Brom!", to="smith", deadline_ms=5000))
        assert said[0]["type"] == "line" and said[0]["speaker"] == "smith" and said[-1]["speaker"] == "smith"
        assert [whole(client.scene_next("party"))[0]["cue"] for _ in range(2)] == ["welcome", "item"]
        assert client.reply(client.close_scene("party"))["type"] == "scene.closed"
