"""How much does a trained detector rely on its reconstruction side? Pixel AUROC of its
anomaly map with the decoder features (POUTA) or the reconstruction (vanilla) swapped out,
and of each MSS head: see pouta_core/diagnostics.py for what each column means.

Usage: .venv/bin/python bench/contrast_check.py --data-root D [--dataset mvtec] RUN_DIR...
(each RUN_DIR written by `pouta train`; its category is read from the checkpoint).
"""

from __future__ import annotations

import argparse
import sys

from pouta_core.config import ConfigError
from pouta_core.diagnostics import contrast_check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--dataset", default=None, help="default: the one the checkpoint was trained on")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    args = parser.parse_args(argv)
    for run in args.runs:
        try:
            r = contrast_check(run, args.data_root, args.dataset)
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        cols = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float))
        print(f"{run}: {r['category']} {r['variant']}  {cols}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
