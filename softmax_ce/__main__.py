"""Command line: ``python -m softmax_ce bench [...]`` (the benchmark and self-check) and
``python -m softmax_ce info`` (what is built and which implementation serves each device)."""

import json
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    if command == "info":
        import softmax_ce

        print(json.dumps(softmax_ce.build_info(), indent=1))
        return 0
    print(f"unknown command {command!r}; use 'bench' or 'info'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
