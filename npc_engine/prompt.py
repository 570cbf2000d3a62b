"""What the model sees: the two conversation formats, built here for training and serving alike.

Instruct models (the default voice, SmolLM2-135M-Instruct + the persona adapter) are prompted through
their own chat template: `chat_messages` gives the message list, `system_prompt` the persona's system
message (its stable, cached prefix). A conversation with the player:

    system     You are Brom Ironhand, town blacksmith. ... (system_prompt: who, facts, knowledge,
               people, style, banned topics with the exact deflection line, rules)
    user       What do you make?                     <- a player line, as typed
    assistant  Swords for the town guard.            <- an NPC line: spoken words only
    ...                                              <- generation: the template's assistant opening

A scene (several characters, issue 20) is the same list seen by one speaker: the system message adds
the situation and who is present; the speaker's own lines are assistant turns and every other line is
a user turn prefixed with its speaker, `Name: words`, or `Name to Other: words` when addressed to one
character (the player is `Player`). Consecutive lines of others merge into one user turn, one line
each. The persona adapter learned scenes in this shape (`npc_engine/train/npc_dialogue.py`): the
situation ends with "You are the host." or "The host is Name." when there is a host, `present` lists
"Name, role" of each other character and "the player" when the player takes part, and a seat's
transcript ends with its own last line. Emotion and action labels are not in the text: the
structured-output header (issue 19) carries them.

The embedded pair in `models/` keeps its own format, trained from scratch:

    <|persona|>{persona block}<|eot|>
    <|player|>{player line}<|eot|>
    <|npc|>{npc line}<|eot|>
    ...
    <|npc|>            <- generation starts here and stops at <|eot|>

The persona block is the stable prefix of every conversation with an NPC: it is what the service
caches. Speakers other than the player (another NPC in ambient chatter) use the `<|player|>` turn
with a `Name: ` prefix, so the model needs no extra roles.
"""
from dataclasses import dataclass, field

PERSONA = "<|persona|>"
PLAYER = "<|player|>"
NPC = "<|npc|>"
EOT = "<|eot|>"
SPECIAL_TOKENS = ["<|endoftext|>", PERSONA, PLAYER, NPC, EOT]


@dataclass
class PromptPersona:
    """What the model sees of a character. Every field but `facts` may be empty."""

    name: str = ""
    role: str = ""
    facts: list[str] = field(default_factory=list)
    style: str = ""
    knowledge: list[str] = field(default_factory=list)
    relationships: list[str] = field(default_factory=list)
    banned_topics: list[str] = field(default_factory=list)
    deflection: str = ""


@dataclass
class Turn:
    speaker: str  # "player", "npc" (the character speaking now), or another character's name (scenes)
    text: str
    to: str = ""  # scenes: the name of the one character addressed ("" or "all": everyone)


@dataclass
class Scene:
    situation: str
    present: list[str]  # the others in the room, e.g. "Tobin Reed, shepherd"; "the player" when they take part


PLAYER_NAME = "Player"
RULES = ("Never say or hint that you are an AI, a model, an assistant or in a game; you are {name}. "
         "Reply with one or two short spoken sentences, no narration.")


def system_prompt(p: PromptPersona, scene: Scene | None = None) -> str:
    """The persona as a system message: the stable prefix of every chat-template prompt for this NPC."""
    name = p.name or "this character"
    lines = [f"You are {p.name or 'a character'}" + (f", {p.role}" if p.role else "") + "."]
    if p.facts:
        lines += ["About you:", *(f"- {f}" for f in p.facts)]
    if p.knowledge:
        lines += ["What you know:", *(f"- {k}" for k in p.knowledge)]
    if p.relationships:
        lines += ["People you know:", *(f"- {r}" for r in p.relationships)]
    if p.style:
        lines.append(f"How you talk: {p.style}")
    topics = [t for t in p.banned_topics if t.strip()]
    if topics and p.deflection:
        lines.append(f"Never talk about {', '.join(topics)}. If asked about that, even by hint, say exactly: "
                     f"\"{p.deflection}\"")
    if scene is not None:
        lines.append(f"Scene: {scene.situation}")
        if scene.present:
            lines.append(f"Present: {'; '.join(scene.present)}.")
        lines.append(f"Others' lines are shown as \"Name: words\". Speak only as {name}, to the others by name.")
    lines.append(RULES.format(name=name))
    return "\n".join(lines)


def user_line(turn: Turn, scene: Scene | None) -> str:
    if scene is None and turn.speaker == "player":
        return turn.text.strip()
    who = PLAYER_NAME if turn.speaker == "player" else turn.speaker
    to = "" if turn.to in ("", "all") else f" to {turn.to}"
    return f"{who}{to}: {turn.text.strip()}"


def chat_messages(p: PromptPersona, turns: list[Turn], scene: Scene | None = None,
                  memories: list[str] = ()) -> list[dict[str, str]]:
    """The chat-template message list for the NPC `p` after `turns` (layout in the module docstring).
    `memories` (what the game told the NPC about this player) follow the persona in a second system message,
    so the persona's stays the cached prefix."""
    messages = [{"role": "system", "content": system_prompt(p, scene)}]
    if memories:
        messages.append({"role": "system", "content": "What you remember about the player:\n"
                         + "\n".join(f"- {m}" for m in memories)})
    for turn in turns:
        if turn.speaker == "npc":
            messages.append({"role": "assistant", "content": turn.text.strip()})
        elif messages[-1]["role"] == "user":
            messages[-1]["content"] += "\n" + user_line(turn, scene)
        else:
            messages.append({"role": "user", "content": user_line(turn, scene)})
    return messages


def memory_block(memories: list[str]) -> str:
    """What the NPC remembers about the player, in the embedded format: a second persona block that follows
    the persona's own (which stays the cached prefix); "" without memories."""
    return PERSONA + "\n".join(f"Remembers: {m}" for m in memories) + EOT if memories else ""


def persona_block(p: PromptPersona) -> str:
    lines = []
    if p.name:
        lines.append(f"Name: {p.name}" + (f", {p.role}" if p.role else ""))
    lines += [f"- {fact}" for fact in p.facts]
    lines += [f"Knows: {k}" for k in p.knowledge]
    lines += [f"Knows of: {r}" for r in p.relationships]
    if p.style:
        lines.append(f"Speaks: {p.style}")
    return PERSONA + "\n".join(lines) + EOT


def open_turn(turn: Turn) -> str:
    """A turn without its closing <|eot|>: what a player line still being typed adds to the prompt."""
    if turn.speaker not in ("player", "npc"):
        raise ValueError(f"turn speaker must be 'player' or 'npc', got {turn.speaker!r}")
    return (PLAYER if turn.speaker == "player" else NPC) + turn.text.strip()


def format_turn(turn: Turn) -> str:
    return open_turn(turn) + EOT


def build_prompt(p: PromptPersona, turns: list[Turn]) -> str:
    """The text fed to the model: persona block, turns, then the open NPC turn."""
    return persona_block(p) + "".join(format_turn(t) for t in turns) + NPC


def build_open_prompt(p: PromptPersona, turns: list[Turn], player_text: str) -> str:
    """The prompt while the player is still typing `player_text`: persona block, turns, then the open
    player turn. Once the text is complete, `build_prompt` with the full player turn extends it
    (up to the tokens of the last, possibly unfinished, word)."""
    return persona_block(p) + "".join(format_turn(t) for t in turns) + open_turn(Turn("player", player_text))


def training_text(p: PromptPersona, turns: list[Turn]) -> str:
    """A whole conversation as one training example (every NPC turn closed by <|eot|>)."""
    return persona_block(p) + "".join(format_turn(t) for t in turns)
