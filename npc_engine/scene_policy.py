"""Who speaks next in a scene, and what that speaker is shown.

Next speaker, in this order: the NPC the game names; after a player line the NPC it addresses, else the NPC
it names, else the one the player last talked with, else the host, else the quietest; then the host while it
has cues (welcome, introductions, the next itinerary item), also when the game names the host; else the NPC
the last line was addressed to (once: not to answer an answer); else relevance: an NPC the last line names
(both answer the last speaker); else recency: the one silent longest, with a remark to everyone, never the one
who spoke last while another can.

What the speaker sees is the scene layout of npc_engine.prompt (the one the voice adapter is trained on): its
persona and the scene (situation, who is present) as the system message, its own lines as its turns and every
other line as `Name: words` / `Name to Other: words`, game events as `Narrator: what happened`. The host also
gets its notes, the way the training scenes give them in the host's knowledge: the itinerary, who promised to
come and is missing, who sent regrets, and what to do now. They follow the system message (a second one, like
memories), so the speaker's system message stays the prefix the engine caches.
"""
import os
import re
from dataclasses import dataclass

from npc_engine import prompt
from npc_engine.prompt import PromptPersona, Turn
from npc_engine.scenes import ALL, PLAYER, Cue, Scene, SceneError

NARRATOR = "Narrator"
STOP = {"the", "of", "a", "an", "old", "young", "sir", "lady", "captain", "master", "mistress"}  # not a name


@dataclass
class Pick:
    speaker: str
    to: str
    cue: Cue | None = None


def mentioned(scene: Scene, text: str) -> list[str]:
    """Cast members named in `text` (full name or any word of it, e.g. a first name), in cast order."""
    words = set(re.findall(r"\w+", text.lower()))
    return [npc for npc, m in scene.members.items()
            if m.name and (m.name.lower() in text.lower() or words & set(re.findall(r"\w+", m.name.lower())) - STOP)]


def quietest(scene: Scene, candidates: list[str]) -> str:
    return min(candidates, key=lambda npc: (scene.last_spoke.get(npc, 0), scene.cast.index(npc)))


def reply_to_player(scene: Scene, to: str | None, text: str) -> Pick:
    """Who answers the player's latest line `text` (`to`: the NPC it was addressed to)."""
    if to is not None:
        return Pick(to, PLAYER)
    if named := mentioned(scene, text):
        return Pick(named[0], PLAYER)
    for e in reversed(scene.transcript):
        if e.speaker in scene.members and e.to == PLAYER or e.speaker == PLAYER and e.to in scene.members:
            return Pick(e.speaker if e.speaker != PLAYER else e.to, PLAYER)
    if scene.host is not None:
        return Pick(scene.host, PLAYER)
    return Pick(quietest(scene, scene.cast), PLAYER)


def ambient(scene: Scene, named: str | None = None, to: str | None = None) -> Pick:
    """Who says the next line nobody asked for (`named`: the game's choice; `to`: its addressee)."""
    if not scene.members:
        raise SceneError("no_speaker", f"scene '{scene.id}' has no cast left")
    for who in (named, to):
        if who is not None and who not in scene.members and who not in (PLAYER, ALL):
            raise SceneError("not_in_cast", f"scene '{scene.id}': '{who}' is not in the cast")
    if named == PLAYER or to == named and named is not None:
        raise SceneError("bad_request", "speaker: an NPC of the cast, other than the addressee")
    said = [e for e in scene.transcript if e.speaker]
    last, before = said[-1] if said else None, said[-2] if len(said) > 1 else None
    if named is None and last is not None and last.speaker == PLAYER:
        pick = reply_to_player(scene, last.to if last.to in scene.members else None, last.text)
        return Pick(pick.speaker, to or PLAYER)
    if scene.host is not None and scene.cues and named in (None, scene.host):
        return Pick(scene.host, to or ALL, scene.cues[0])
    reacts = named is not None  # the game's choice reacts to the last line
    if named is None:
        answered = before is not None and last is not None and (before.speaker, before.to) == (last.to, last.speaker)
        others = [n for n in scene.cast if last is None or n != last.speaker] or scene.cast
        relevant = [n for n in mentioned(scene, last.text) if n in others] if last is not None else []
        if last is not None and last.to in scene.members and last.to != last.speaker and not answered:
            named, reacts = last.to, True  # answer a line addressed to you, once: then others get a turn
        elif relevant:
            named, reacts = relevant[0], True  # named in the last line
        else:
            named = quietest(scene, others)  # a remark to everyone
    if to is None:
        to = last.speaker if reacts and last is not None and last.speaker != named and (
            last.speaker == PLAYER or last.speaker in scene.members) else ALL
    return Pick(named, to)


# ---- what the speaker is shown --------------------------------------------------------------------

def situation(scene: Scene, speaker: str) -> str:
    """The scene's situation as the training scenes give it to each seat."""
    if scene.host is None:
        return scene.situation
    host = " You are the host." if speaker == scene.host else f" The host is {scene.name(scene.host)}."
    return scene.situation + host


def present(scene: Scene, speaker: str) -> list[str]:
    others = [f"{m.name}, {m.role}" if m.role else m.name for npc, m in scene.members.items() if npc != speaker]
    guests = [f"{g.name}, {g.role}" if g.role else g.name for g in scene.guests if g.npc is None and g.arrived]
    return others + guests + (["the player"] if scene.player_present else [])


def turns(scene: Scene, speaker: str) -> list[Turn]:
    out = []
    for e in scene.transcript:
        to = scene.name(e.to)
        if not e.speaker:
            out.append(Turn(NARRATOR, e.text))
        elif e.speaker == speaker:
            out.append(Turn("npc", e.text, to))
        else:
            out.append(Turn(PLAYER if e.speaker == PLAYER else scene.name(e.speaker), e.text, to))
    return out


def described(scene: Scene, who: str) -> str:
    if who == PLAYER:
        return "the player" + (f", {scene.player_role}" if scene.player_role else ", a newcomer")
    if who in scene.members:
        m = scene.members[who]
        return f"{m.name}, {m.role}" if m.role else m.name
    g = next((g for g in scene.guests if g.name == who), None)
    return f"{g.name}, {g.role}" if g is not None and g.role else who


def host_notes(scene: Scene, cue: Cue | None) -> list[str]:
    """The host's notes: the itinerary, the guest list's news, and what to do now (the cue)."""
    notes = []
    items = [i.text + (f" at {i.at}" if i.at else "") for i in scene.itinerary]
    if items:
        notes.append(f"Tonight's order: {', then '.join(items)}.")
        if scene.position:
            notes.append(f"Done so far: {', '.join(items[:scene.position - 1]) or 'nothing'}; "
                         f"now: {items[scene.position - 1]}.")
    for g in scene.missing():
        notes.append(f"{g.name} promised to come, but has not arrived.")
    for g in scene.guests:
        if g.rsvp == "not_coming":
            notes.append(f"{g.name} sent word they cannot come.")
        elif g.rsvp == "no_answer" and not scene.guest_present(g):
            notes.append(f"{g.name} never answered the invitation.")
    if cue is None:
        return notes
    if cue.kind == "welcome":
        missing = [g.name for g in scene.missing()]
        notes.append("Now: welcome everyone" + (f", and say that {' and '.join(missing)} is still missing."
                                               if missing else "."))
    elif cue.kind == "introduce":
        notes.append(f"Now: introduce {described(scene, cue.who)} to the room, by name.")
    elif cue.kind == "item":
        item = scene.itinerary[cue.item]
        missing = [g.name for g in scene.missing()]
        also = f" Mention that {' and '.join(missing)} promised to come and is not here." if missing else ""
        if "toast" in item.text.lower():
            guests = [scene.name(n) for n in scene.cast if n != scene.host]
            guests += [g.name for g in scene.present_guests() if g.npc is None]
            notes.append(f"Now: {item.text}. Raise a toast to the guests by name: {', '.join(guests) or 'everyone'}."
                         + also)
        else:
            notes.append(f"Now: announce {item.text}" + (f" ({item.at})" if item.at else "") + " to everyone." + also)
    return notes


@dataclass
class View:
    """What one speaker is shown: its persona, the scene, the transcript, and the host's notes."""

    persona: PromptPersona
    scene: prompt.Scene
    turns: list[Turn]
    notes: list[str]


def view(scene: Scene, speaker: str, persona: PromptPersona, cue: Cue | None = None) -> View:
    notes = host_notes(scene, cue) if speaker == scene.host else []
    return View(persona, prompt.Scene(situation(scene, speaker), present(scene, speaker)), turns(scene, speaker), notes)


def scene_messages(v: View, turns: list[Turn] | None = None) -> list[dict[str, str]]:
    """The chat-template message list of `v` (optionally with fewer turns): the speaker's scene system message,
    the host's notes as a second system message, then the transcript."""
    messages = prompt.chat_messages(v.persona, v.turns if turns is None else turns, v.scene)
    if v.notes:
        notes = "Your notes as host:\n" + "\n".join(f"- {n}" for n in v.notes)
        messages.insert(1, {"role": "system", "content": notes})
    return messages


def embedded_text(v: View, turns: list[Turn]) -> tuple[str, str]:
    """(prefix, prompt) in the embedded pair's format: the persona block, a scene block (situation, present,
    notes), then the turns, other speakers as `<|player|>Name: words`, ending in the open NPC turn."""
    block = prompt.persona_block(v.persona)
    scene = [f"Scene: {v.scene.situation}"] + ([f"Present: {'; '.join(v.scene.present)}."] if v.scene.present else [])
    text = block + prompt.PERSONA + "\n".join(scene + [f"Note: {n}" for n in v.notes]) + prompt.EOT
    for t in turns:
        text += prompt.NPC + t.text.strip() if t.speaker == "npc" else prompt.PLAYER + prompt.user_line(t, v.scene)
        text += prompt.EOT
    return block, text + prompt.NPC


@dataclass
class ScenePrompt:
    ids: list[int]
    prefix_len: int  # the speaker's system message (or persona block): the prefix the engine caches
    turns_left_out: int


def prompt_text(tokenizer, v: View, turns: list[Turn]) -> tuple[str, str]:
    """(cached prefix, whole prompt) for the tokenizer's format."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return embedded_text(v, turns)
    system = scene_messages(View(v.persona, v.scene, [], []))
    prefix = os.path.commonprefix([template.render(system),
                                   template.render(system + [{"role": "user", "content": "?"}], True)])
    return prefix, template.render(scene_messages(v, turns), add_generation_prompt=True)


def compact(v: View) -> View:
    """What a small context still takes: the situation without who is present, and of the host's notes only what
    to do now (which names whom it is about)."""
    return View(v.persona, prompt.Scene(v.scene.situation, []), v.turns, [n for n in v.notes if n.startswith("Now:")])


def fit(tokenizer, v: View, max_len: int, reserve: int = 0) -> ScenePrompt:
    """The speaker's prompt, its oldest transcript lines left out while it and `reserve` reply tokens exceed
    `max_len`. When that leaves no line of the transcript, the compact view is tried too, and the one keeping
    more lines wins. SceneError `too_large` when neither fits even without the transcript."""
    full = fit_turns(tokenizer, v, max_len, reserve)
    if full is not None and (full.turns_left_out < len(v.turns) or not v.turns):
        return full
    fitted = [p for p in (full, fit_turns(tokenizer, compact(v), max_len, reserve)) if p is not None]
    if not fitted:
        raise SceneError("too_large", f"the scene prompt does not fit the model's {max_len} tokens even without the "
                         "transcript")
    return min(fitted, key=lambda p: p.turns_left_out)


def fit_turns(tokenizer, v: View, max_len: int, reserve: int) -> ScenePrompt | None:
    """`v` without its oldest lines as needed (see fit); None when it does not fit even without any."""
    chat = getattr(tokenizer, "chat_template", None) is not None
    turns = list(v.turns)
    while True:
        prefix, text = prompt_text(tokenizer, v, turns)
        ids = tokenizer.encode(prefix, add_special_tokens=not chat)
        prefix_len = len(ids)
        ids += tokenizer.encode(text[len(prefix):], add_special_tokens=False)
        if len(ids) + reserve <= max_len or not turns:
            break
        turns = turns[1:]
    return ScenePrompt(ids, prefix_len, len(v.turns) - len(turns)) if len(ids) < max_len else None
