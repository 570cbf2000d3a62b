"""`npc-engine say`: ask a running service for one NPC line and stream it to stdout."""
import argparse
import sys
import time

from npc_engine.cli.serve import DEFAULT_ADDR


def add_parser(sub) -> None:
    p = sub.add_parser("say", help="ask a running service for one NPC line and stream it")
    p.add_argument("--npc", required=True, help="persona id")
    p.add_argument("--connect", default=DEFAULT_ADDR, help="service endpoint")
    p.add_argument("--session", default="default",
                   help="conversation key: calls with the same NPC and session share one history, as with the "
                        "Python client, whose default is also 'default'")
    p.add_argument("--deadline-ms", type=float, default=None,
                   help="answer within this many ms, with a fallback line if the model cannot (default: no deadline)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens in the line at most (default: the persona's)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the persona's)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one per line)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the line")
    p.add_argument("text", nargs="+", help="what the player says")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bridge import Client

    with Client.connect(args.connect) as client:
        try:
            rid = client.say(args.npc, " ".join(args.text), session=args.session, deadline_ms=args.deadline_ms,
                             max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        except ValueError as e:
            print(f"npc-engine say: {e}", file=sys.stderr)
            return 2
        end = time.monotonic() + args.timeout
        while time.monotonic() < end:
            for event in client.poll(budget_ms=10.0):
                if event.get("id") != rid:
                    continue
                if event["type"] == "token":
                    sys.stdout.write(event["text"])
                    sys.stdout.flush()
                elif event["type"] == "done":
                    flags = [name for name in ("fallback", "deflected", "cancelled") if event.get(name)]
                    sys.stdout.write(f"\n[{', '.join(flags)}] {event['text']}\n" if flags else "\n")
                    return 0
                elif event["type"] == "error":
                    hint = (f" (is `npc-engine serve` running at {args.connect}?)"
                            if event["code"] == "disconnected" else "")
                    print(f"\nnpc-engine say: {event['code']}: {event['message']}{hint}", file=sys.stderr)
                    return 1
            client.wait(0.02)
        print(f"\nnpc-engine say: no reply from {args.connect} within {args.timeout} s", file=sys.stderr)
        return 1
