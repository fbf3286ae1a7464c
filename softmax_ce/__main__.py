"""The command line: python -m softmax_ce {bench,info,figures} [options]."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
softmax_ce: fused softmax + cross-entropy for PyTorch.

commands:
  bench   the benchmark and self-check: times softmax_ce against torch (eager and
          torch.compile) on a few representative cases, checks that every
          implementation agrees with torch, and compares each time with the
          memory-traffic floor (--full: the whole table of BENCHMARKS.md)
  info    what was built and which implementation serves each device
  figures the tutorial's figures, computed with the package's functions (PNG;
          needs matplotlib)

Run 'python -m softmax_ce COMMAND --help' for a command's options."""


def _info(args) -> int:
    import softmax_ce

    info = softmax_ce.build_info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"softmax_ce {info['version']} (torch {info['torch']})")
    if info["extension"]:
        print(f"  extension: built (CPU kernels: {info['cpu_isa']} variant; CUDA kernels: "
              f"{'built' if info['cuda_compiled'] else 'not built'})")
    else:
        print(f"  extension: not loaded ({info['extension_error']}); the pure-PyTorch reference "
              "serves every op")
        if info["extension_fix"]:
            print(f"  to build the kernels against this torch: {info['extension_fix']}")
    print(f"  cpu:  {info['cpu']}")
    print(f"  cuda: {info['cuda']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench import add_arguments as add_bench_arguments

    parser = argparse.ArgumentParser(
        prog="python -m softmax_ce", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = commands.add_parser(
        "bench", help="the benchmark and self-check",
        description="The benchmark and self-check (details: softmax_ce/bench/, BENCHMARKS.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(bench)
    info = commands.add_parser("info", help="what was built and which implementation serves",
                               description="What was built and which implementation serves "
                                           "each device.")
    info.add_argument("--json", action="store_true", help="print it as JSON")
    figures = commands.add_parser("figures", help="the tutorial's figures (needs matplotlib)",
                                  description="Writes bce_cost.png, softmax_example.png and "
                                              "ce_vs_mse_gradient.png to --out.")
    figures.add_argument("--out", default="figures", help="output folder (default: figures)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from .bench import run

        return run(args)
    if args.command == "figures":
        from .figures import write_figures

        for path in write_figures(args.out):
            print(path)
        return 0
    return _info(args)


if __name__ == "__main__":
    sys.exit(main())
