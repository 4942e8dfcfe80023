"""Every anomaly-map and image-score option (pouta_core/model/scoring.py) on trained run
folders, without retraining: validation decides, test is reported (issue 19).

For each run (a `pouta train` folder; its category is read from the checkpoint) and each
option, the model's maps are computed once per map option; the image score options are then
computed from those maps exactly as inference does (`Scorer`), the normalisation from the
validation good images, which are scored leave-one-out. Prints one JSON object per run and
option, then a table: per category, variant and option, the mean (and spread over seeds) of
image AUROC, image F1-max and pixel AUROC / AP on validation and test, and which option the
validation figures choose.

Usage: .venv/bin/python bench/scoring_options.py --data-root D [--dataset mvtec] [--out F.jsonl] RUN_DIR...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

import numpy as np
import torch

from pouta_core import checkpoint as ckpt
from pouta_core.api import load_category
from pouta_core.inference import predict
from pouta_core.metrics import auroc, average_precision, f1_max
from pouta_core.model.scoring import Scorer

# (name, map_heads_weight, image_score, image_score_topk, score_norm)
OPTIONS = [
    ("paper", 0.0, "pooled_max", 0.01, "none"),
    ("topk1", 0.0, "topk_mean", 0.01, "none"),
    ("topk5", 0.0, "topk_mean", 0.05, "none"),
    ("norm", 0.0, "pooled_max", 0.01, "pixel"),
    ("topk1+norm", 0.0, "topk_mean", 0.01, "pixel"),
    ("heads", 0.2, "pooled_max", 0.01, "none"),
    ("heads+topk1", 0.2, "topk_mean", 0.01, "none"),
    ("heads+norm", 0.2, "pooled_max", 0.01, "pixel"),
]
SHOWN = ("image_auroc", "image_f1max", "pixel_auroc", "pixel_ap")


def pixel_metrics(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    truth = masks.ravel() > 0
    return {"pixel_auroc": auroc(maps.ravel(), truth), "pixel_ap": average_precision(maps.ravel(), truth)}


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"image_auroc": auroc(scores, labels), "image_f1max": f1_max(scores, labels)[0]}


def score_run(run: str, data_root: str, dataset: str | None) -> list[dict]:
    model, config, state = ckpt.load_model(run)
    category = state["category"]
    data = load_category(data_root, dataset or state.get("dataset", "mvtec"), category, config, progress=False)
    splits = {"val": data.val_set, "test": data.test_set}
    rows = []
    for weight in sorted({o[1] for o in OPTIONS}):
        mapped, _, _ = ckpt.load_model(run, scoring=[f"map_heads_weight={weight}"])
        if weight and not mapped.scorer.heads_weight:
            continue     # a variant without MSS heads: the same map as weight 0
        maps = {k: predict(mapped, s.images)[1] for k, s in splits.items()}
        pixels = {k: pixel_metrics(maps[k], s.masks[:, 0].numpy()) for k, s in splits.items()}
        for name, w, score, topk, norm in OPTIONS:
            if w != weight:
                continue
            scorer = Scorer(image_size=config.image_size, image_score=score, topk=topk, norm=norm)
            val_scores = scorer.calibrate(maps["val"], data.val_set.labels.numpy())   # leave-one-out
            with torch.no_grad():
                test_scores = scorer(torch.from_numpy(maps["test"])[:, None]).numpy()
            row = {"run": str(run), "category": category, "variant": config.variant, "seed": config.seed,
                   "option": name}
            for split, scores in (("val", val_scores), ("test", test_scores)):
                m = {**image_metrics(scores, splits[split].labels.numpy()), **pixels[split]}
                row.update({f"{split}_{k}": v for k, v in m.items()})
            rows.append(row)
    return rows


def table(rows: list[dict]) -> None:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["category"], r["variant"], r["option"])].append(r)
    cols = [f"{s}_{k}" for s in ("val", "test") for k in SHOWN]
    print("mean+-spread over seeds; validation decides, test is reported")
    print(f"{'category':9} {'variant':8} {'option':12} {'n':>2} " + " ".join(f"{c:>21}" for c in cols))
    for (cat, var, opt), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                      [o[0] for o in OPTIONS].index(kv[0][2]))):
        cells = [f"{mean(r[c] for r in rs):.4f}+-{pstdev([r[c] for r in rs]):.4f}" for c in cols]
        print(f"{cat:9} {var:8} {opt:12} {len(rs):>2} " + " ".join(f"{c:>21}" for c in cells))
    for var in sorted({k[1] for k in groups}):
        overall = defaultdict(list)
        for (_, v, opt), rs in groups.items():
            if v == var:
                overall[opt].append(mean(r["val_image_auroc"] for r in rs))
        best = max(overall, key=lambda o: mean(overall[o]))
        print(f"{var}: mean over categories of validation image AUROC: "
              + ", ".join(f"{o} {mean(v):.4f}" for o, v in overall.items()) + f"; validation chooses {best}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--dataset", default=None, help="default: the one the checkpoint was trained on")
    parser.add_argument("--out", help="also write the rows to this JSON-lines file")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        got = score_run(run, args.data_root, args.dataset)
        for r in got:
            print(json.dumps(r), flush=True)
        rows += got
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
