"""`npc-engine persona check|import`: lint persona files; turn a Character Card V2 into one."""
import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("persona", help="validate persona files or import character cards")
    actions = p.add_subparsers(dest="persona_command", required=True, metavar="ACTION")
    q = actions.add_parser("check", help="validate persona files; exit 1 listing every problem")
    q.add_argument("paths", nargs="+", metavar="PATH", help="persona files or folders")
    q = actions.add_parser("import", help="convert a Character Card V2 (JSON or PNG) to a persona file")
    q.add_argument("card", help="card file (.json, or .png with a 'chara' chunk)")
    q.add_argument("-o", "--output", required=True, help="persona file to write, e.g. personas/aria.toml")
    q.add_argument("--id", default=None, help="persona id (default: the output file name)")
    q.add_argument("--force", action="store_true", help="replace the output file if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return check(args.paths) if args.persona_command == "check" else import_card(args)


def check(paths: list[str]) -> int:
    from npc_engine.lint import check_paths

    files, issues = check_paths(paths)
    for issue in issues:
        print(issue)
    errors = [i for i in issues if not i.warning]
    warned = f", {len(issues) - len(errors)} warning(s)" if len(issues) > len(errors) else ""
    if errors:
        print(f"{len(errors)} problem(s) in {len({i.file for i in errors})} file(s){warned}")
        return 1
    print(f"{len(files)} persona file(s) OK{warned}")
    return 0


def import_card(args: argparse.Namespace) -> int:
    from npc_engine.cards import import_card

    imported = import_card(args.card, args.output, args.id, force=args.force)
    print(f"wrote {args.output}" + (f" ({imported.dropped_lines} long-text lines dropped)"
                                    if imported.dropped_lines else ""))
    return 0
