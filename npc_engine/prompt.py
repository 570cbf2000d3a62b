"""The one definition of the conversation format the embedded model is trained on.

Training (`npc_engine.train`) and serving (`npc_engine.persona`) both build text with these
functions, so the model sees at inference exactly the layout it learned. A prompt is:

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


@dataclass
class Turn:
    speaker: str  # "player" or "npc"
    text: str


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
