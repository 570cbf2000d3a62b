"""`npc-engine chat`: talk to one NPC in the terminal with the local engine."""
import argparse
import sys

from npc_engine.cli.common import VOICE_HELP, add_model_args, check_device, voice_args
from npc_engine.paths import PERSONAS_DIR


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="talk to one NPC in the terminal")
    p.add_argument("--npc", required=True, help="persona id")
    p.add_argument("--personas", default=str(PERSONAS_DIR), help="persona folder")
    add_model_args(p, None, VOICE_HELP.replace("(default: ", "(default: the persona's `model`, else "))
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the persona's, else 0.8; as a say's `temperature`)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens per reply at most (default: the persona's, else 64; as a say's `max_tokens`)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one per reply)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    from bridge.protocol import Limits
    from npc_engine.chat import run_chat
    from npc_engine.dialogue import sampling_params
    from npc_engine.engine import Engine
    from npc_engine.persona import PersonaStore

    store = PersonaStore(args.personas)
    for file, error in store.errors.items():
        print(f"[{file} not loaded]\n{error}", file=sys.stderr)
    if args.npc not in store.ids():
        raise ValueError(f"no persona with id {args.npc!r} in {args.personas} "
                         f"(known: {', '.join(store.ids()) or 'none'})")
    model, adapter = voice_args(args.model or store.get(args.npc).model, args.adapter)
    engine = Engine.load(model, args.draft, args.device, args.dtype, backend=args.backend,
                         onnx_provider=args.onnx_provider, adapter=adapter, compiled=args.compile,
                         draft_tree=args.draft_tree)

    run_chat(engine, store, args.npc, lambda persona: sampling_params(
        persona, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
        max_tokens_limit=Limits().max_tokens))
    return 0
