"""`npc-engine train`: the training stages in order, each one also runnable alone (see npc_engine/train/cli.py)."""
import argparse


def add_parser(sub) -> None:
    from npc_engine.train.cli import add_train_parser  # stdlib-only at its top level, like this module

    add_train_parser(sub).set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from npc_engine.train.cli import cmd_train

    return cmd_train(args)
