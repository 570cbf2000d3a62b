"""`npc-engine chat`: talk to one NPC in the terminal with the local engine, replies streamed.

Made for persona authors: the persona file is reloaded when it changes between turns, and the prompt,
history, sampling parameters, guard and fallback are the service's (npc_engine.dialogue), so a
persona tuned here speaks the same way to a game. Unlike the service, chat shows the raw reply and
then what the game would see instead; for a persona that lists emotions, the line's emotion and action follow it.
"""
import itertools
import random
import sys
from collections.abc import Callable
from typing import TextIO

from npc_engine.dialogue import LineStream, fallback_line, fit_prompt
from npc_engine.guard import banned_topic
from npc_engine.persona import Persona, PersonaStore
from npc_engine.prompt import Turn
from npc_engine.sampling import SamplingParams
from npc_engine.state import Key, State

HELP = "/reset clears the conversation, /quit (or an empty line) leaves"


def generate_reply(engine, persona: Persona, history: list[Turn], text: str, params: SamplingParams, rid: str,
                   on_text: Callable[[str], None]) -> LineStream:
    """Run one NPC reply to `text` to completion on `engine`, passing text pieces to `on_text` as they come. A
    persona that lists emotions gets the service's line header (npc_engine.header): `line.header.result()`."""
    prompt = fit_prompt(engine.tokenizer, persona, history, text, engine.max_prompt_len(), params.max_tokens)
    header = engine.header_matcher(persona.emotions, persona.actions)
    engine.submit(rid, prompt.ids, params, prefix_len=prompt.prefix_len, header=header)
    line = LineStream(engine.tokenizer, persona, hold_back=False, header=header)
    while True:
        for event in engine.step():
            if event.rid != rid:
                continue
            if piece := line.push(event.token_ids):
                on_text(piece)
            if event.finished:
                if rest := line.finish():  # bytes held back for a character that never completed
                    on_text(rest)
                return line


def run_chat(engine, store: PersonaStore, npc_id: str, params_for: Callable[[Persona], SamplingParams],
             read_line: Callable[[str], str] = input, out: TextIO = sys.stdout) -> list[Turn]:
    """The chat loop; returns the conversation as shown (greeting first). `params_for(persona)` gives
    its SamplingParams (npc_engine.dialogue.sampling_params)."""
    persona = store.get(npc_id)
    key = Key(npc_id, "chat")
    history, shown = State(), [Turn("npc", persona.greeting)]  # kept as the service keeps it
    rng = random.Random()
    out.write(f"[{persona.name}, {persona.role} — {HELP}]\n{persona.name}: {persona.greeting}\n")
    shown_errors: dict[str, str] = {}
    for n in itertools.count():
        try:
            text = read_line("you> ").strip()
        except EOFError:
            break
        if not text or text == "/quit":
            break
        if text == "/reset":
            history, shown = State(), [Turn("npc", persona.greeting)]
            out.write("[conversation cleared]\n")
            continue
        if npc_id in store.reload_if_changed():
            if npc_id in store.ids():
                persona = store.get(npc_id)
                out.write(f"[{persona.source} reloaded]\n")
            else:
                out.write(f"[{persona.source} was removed; talking to the loaded version]\n")
        if store.errors != shown_errors:
            for file, error in store.errors.items():
                out.write(f"[{file} has errors; its last good version is used]\n{error}\n")
            shown_errors = store.errors
        out.write(f"{persona.name}: ")
        if topic := banned_topic(persona, text):
            reply = persona.deflection
            out.write(f"{reply}\n[guard: the player touched the banned topic {topic!r}]\n")
        else:
            params = params_for(persona)
            line = generate_reply(engine, persona, history.history(key), text, params, f"chat-{n}",
                                  lambda piece: (out.write(piece), out.flush()))
            out.write("\n")
            if line.header is not None:  # what a game's `done` would carry (emotion, action)
                emotion, action = line.header.result()
                out.write(f"(emotion: {emotion}{f', action: {action}' if action else ''})\n")
            reply = line.text
            if line.topic:
                reply = persona.deflection
                out.write(f"[guard: the reply touched {line.topic!r}; the game would show: {reply}]\n")
            elif not reply.strip():
                reply = fallback_line(persona, params.seed, rng)
                out.write(f"[empty reply; the game would show: {reply}]\n")
        history.remember(key, text, reply)
        shown += [Turn("player", text), Turn("npc", reply.strip())]
    return shown
