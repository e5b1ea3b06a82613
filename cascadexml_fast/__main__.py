"""`python -m cascadexml_fast info|build-tree|train|evaluate|predict|demo` (also installed as the
`cascadexml-fast` command)."""
import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cascadexml-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="versions and which backends are present")
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    from .tree import add_build_tree_parser, run_build_tree

    add_build_tree_parser(commands)
    from .cli import add_parsers, run

    add_parsers(commands)
    args = parser.parse_args(argv)
    if args.command == "build-tree":
        return run_build_tree(args)
    if args.command in ("train", "evaluate", "predict", "demo"):
        return run(args)

    if args.command == "info":
        from . import info
        from ._info import format_info

        report = info()
        print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
