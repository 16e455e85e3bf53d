"""The `nanoseek` command: one entry point, one subcommand per pipeline stage.

Each subcommand lives in the module that owns the feature; that module exposes `HELP` (one line),
`add_arguments(parser)` and `run(args) -> int`. Modules keep heavy imports inside `run` so that
`nanoseek --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from nanoseek.errors import NanoseekError

# name -> module implementing it. Only implemented subcommands are listed (no stubs).
COMMANDS: dict[str, str] = {
    "convert": "nanoseek.checkpoint.convert",
    "cost": "nanoseek.cost",
    "pretrain": "nanoseek.recipes.pretrain",
    "sft": "nanoseek.recipes.sft",
    "grpo": "nanoseek.recipes.grpo",
    "sample": "nanoseek.recipes.sample",
    "distill": "nanoseek.recipes.distill",
    "tokenizer": "nanoseek.tokenizer_cli",
    "generate": "nanoseek.inference.cli_generate",
    "chat": "nanoseek.inference.cli_chat",
    "serve": "nanoseek.inference.server",
    "eval": "nanoseek.eval.cli",
    "demo": "nanoseek.recipes.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoseek",
        description="DeepSeek-V3/R1 in miniature: train, post-train, serve and cost DeepSeek-style models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except (NanoseekError, FileNotFoundError) as e:
        # Errors a user can meet are one line; internal bugs (other exceptions) still raise.
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nanoseek {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
