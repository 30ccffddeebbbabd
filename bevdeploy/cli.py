"""``bevdeploy <verb>``: the command line. Thin: parse, call the public API, print one-line errors."""

from __future__ import annotations

import argparse
import os
import sys

EPILOG = """examples:
  bevdeploy demo                       check every op (Triton kernels vs references) and print a table
  bevdeploy bench ops                  time every op variant at BEVFormer/BEVDet shapes (GPU)
  bevdeploy bench ops --ops msda bev_pool_v2
"""


def _demo(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available() and "bevdeploy.ops" not in sys.modules:
        # No GPU: run the Triton kernels through Triton's interpreter (chosen before import).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from bevdeploy.ops.selfcheck import print_table, run_checks

    rows = run_checks(seed=args.seed)
    print_table(rows)
    failed = [r for r in rows if not r["ok"]]
    if failed:
        print(f"{len(failed)} check(s) failed", file=sys.stderr)
        return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.what == "ops":
        from bevdeploy.eval.bench_ops import run, to_markdown

        result = run(args.ops, args.out, command="bevdeploy " + " ".join(sys.argv[1:]))
        print(to_markdown(result))
        return 0
    raise SystemExit(f"bevdeploy bench: unknown target {args.what!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bevdeploy", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)

    demo = sub.add_parser("demo", help="run every op's kernels against its reference and print a check table")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="benchmarks on the GPU; results under bench/results/<gpu>/")
    bench.add_argument("what", choices=["ops"], help="what to benchmark")
    bench.add_argument("--ops", nargs="*", default=None, help="op names (default: all)")
    bench.add_argument("--out", default="bench/results", help="results folder (default: bench/results)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, NotImplementedError) as e:
        print(f"bevdeploy {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
