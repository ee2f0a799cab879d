"""Command-line interface: ``cellformers demo``."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cellformers`` command."""
    parser = argparse.ArgumentParser(prog="cellformers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="pretrain a small scGPT on scanpy's PBMC data, embed, plot a UMAP and compare with PCA",
    )
    demo.add_argument("--outdir", default="cellformers_demo", help="folder for the UMAP image")
    demo.add_argument("--minutes", type=float, default=1.0, help="training time budget")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if argv is None and "OMP_WAIT_POLICY" not in os.environ:
        # OpenMP reads this once, when torch loads: restart with idle threads sleeping instead of
        # spinning, which avoids per-operation stalls on machines with shared vCPUs.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "cellformers.cli", *sys.argv[1:]])

    if args.command == "demo":
        if args.minutes <= 0:
            parser.error("--minutes must be positive")
        from ._demo import run_demo

        run_demo(args.outdir, minutes=args.minutes, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
