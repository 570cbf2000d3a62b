"""`npc-engine chat`: talk to one NPC in the terminal with the local engine, replies streamed.

Made for persona authors: the persona file is reloaded when it changes between turns, and the
banned-topic guard runs as the service runs it (on the player's text, then on the reply).
"""
import itertools
import sys
from typing import Callable, TextIO

from npc_engine.guard import banned_topic
from npc_engine.persona import Persona, PersonaStore
from npc_engine.prompt import Turn

HELP = "/reset clears the conversation, /quit (or an empty line) leaves"


def fit_turns(engine, persona: Persona, turns: list[Turn], max_tokens: int) -> list[int]:
    """Prompt ids for `turns`, dropping the oldest turns until prompt and reply fit the engine."""
    limit = engine.max_prompt_len() - max_tokens
    while True:
        ids = engine.tokenizer.encode(persona.prompt(turns))
        if len(ids) <= limit or not turns:
            return ids
        turns = turns[1:]


def generate_reply(engine, persona: Persona, turns: list[Turn], params, rid: str,
                   on_text: Callable[[str], None]) -> str:
    """Run one NPC reply to completion on `engine`, passing text pieces to `on_text` as they come."""
    from npc_engine.tokenizer import IncrementalDecoder

    prompt = fit_turns(engine, persona, turns, params.max_tokens)
    prefix_len = len(engine.tokenizer.encode(persona.prefix()))
    engine.submit(rid, prompt, params, prefix_len=prefix_len)
    decoder = IncrementalDecoder(engine.tokenizer)
    streamed = ""
    while True:
        for event in engine.step():
            if event.rid != rid:
                continue
            for token in event.token_ids:
                if piece := decoder.push(token):
                    streamed += piece
                    on_text(piece)
            if event.finished:
                if rest := decoder.flush():  # bytes held back for a character that never completed
                    streamed += rest
                    on_text(rest)
                return streamed.strip()


def run_chat(engine, store: PersonaStore, npc_id: str, params_for: Callable[[Persona], object],
             read_line: Callable[[str], str] = input, out: TextIO = sys.stdout) -> list[Turn]:
    """The chat loop; returns the conversation. `params_for(persona)` gives its SamplingParams."""
    persona = store.get(npc_id)
    turns = [Turn("npc", persona.greeting)]
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
            turns = [Turn("npc", persona.greeting)]
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
        turns.append(Turn("player", text))
        out.write(f"{persona.name}: ")
        if topic := banned_topic(persona, text):
            reply = persona.deflection
            out.write(f"{reply}\n[guard: the player touched the banned topic {topic!r}]\n")
        else:
            reply = generate_reply(engine, persona, turns, params_for(persona), f"chat-{n}",
                                   lambda piece: (out.write(piece), out.flush()))
            out.write("\n")
            if topic := banned_topic(persona, reply):
                reply = persona.deflection
                out.write(f"[guard: the reply touched {topic!r}; the game would show: {reply}]\n")
            elif not reply:
                reply = persona.fallback_line(n)
                out.write(f"[empty reply; the game would show: {reply}]\n")
        turns.append(Turn("npc", reply))
    return turns


def cmd_chat(args) -> int:
    from npc_engine.cli import DEFAULT_MODEL
    from npc_engine.engine import Engine
    from npc_engine.sampling import SamplingParams

    store = PersonaStore(args.personas)
    for file, error in store.errors.items():
        print(f"[{file} not loaded]\n{error}", file=sys.stderr)
    if args.npc not in store.ids():
        raise ValueError(f"no persona with id {args.npc!r} in {args.personas} "
                         f"(known: {', '.join(store.ids()) or 'none'})")
    model = args.model or store.get(args.npc).model or DEFAULT_MODEL
    engine = Engine.load(model, args.draft, args.device, args.dtype, backend=args.backend, onnx_provider=args.onnx_provider)

    def params_for(persona: Persona) -> SamplingParams:
        return SamplingParams(**{"temperature": args.temperature, "max_tokens": args.max_tokens,
                                 "seed": args.seed, **persona.sampling})

    run_chat(engine, store, args.npc, params_for)
    return 0
