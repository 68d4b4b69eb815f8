"""The ``mmdit`` command: a thin layer over the library. One ``_add_<command>`` per command."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmdit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_inspect,):
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, OSError) as e:  # user-caused: bad path, wrong file, bad settings
        print(f"mmdit {args.command}: error: {e}", file=sys.stderr)
        return 2


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="what a checkpoint is: layout, family, inferred config, dtype, size")
    p.add_argument("path", help="a .safetensors file, an index.json, a diffusers folder or a hub repo id")

    def run(args):
        from .weights.inspect import describe
        print(describe(args.path))

    p.set_defaults(run=run)


if __name__ == "__main__":
    sys.exit(main())
