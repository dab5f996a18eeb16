"""Print the test metrics of finished runs as Markdown tables: `python -m analysis.summarize_runs runs/*/`.

Runs are grouped by everything in their arguments except the seed and the run folder; each group
gets one row with the mean and the spread (min-max) over its seeds. A second table shows what the
personalized branch does on the test split (metrics.json's "personalization"), where runs have it."""

import json
import sys
from pathlib import Path

import numpy as np

from train import METRICS

PERSONALIZATION = ("uncertainty_mean", "uncertainty_p10", "uncertainty_p90", "personal_weight_mean",
                   "distinct_masks_mean", "mask_on_shared_support", "dag")


def main(folders):
    groups = {}
    for folder in folders:
        path = Path(folder) / "metrics.json"
        if not path.is_file():
            sys.exit(f"error: {path} not found; is {folder} a finished run folder?")
        run = json.loads(path.read_text())
        key = json.dumps({k: v for k, v in run["args"].items() if k not in ("seed", "out", "resume", "threads")},
                         sort_keys=True)
        groups.setdefault(key, []).append(run)
    print("| run | seeds | " + " | ".join(METRICS) + " | wall time (s) |")
    print("|---|---|" + "---|" * len(METRICS) + "---|")
    for key, runs in groups.items():
        name = Path(runs[0]["args"]["out"]).name.rsplit("-seed", 1)[0]
        seeds = ",".join(str(r["args"]["seed"]) for r in runs)
        cells = []
        for m in METRICS:
            values = np.array([r["test"][m] for r in runs])
            cells.append(f"{values.mean():.4f}" + (f" ({values.min():.4f}-{values.max():.4f})" if len(runs) > 1 else ""))
        walls = " / ".join(f"{r['wall_s']:.0f}" for r in runs)
        print(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {walls} |")
    personalized = {key: runs for key, runs in groups.items() if "personalization" in runs[0]["test"]}
    if personalized:
        print("\nPersonalization on the test split (mean over seeds; per seed in brackets where it varies):\n")
        print("| run | " + " | ".join(PERSONALIZATION) + " | acyclic |")
        print("|---|" + "---|" * (len(PERSONALIZATION) + 1))
        for key, runs in personalized.items():
            name = Path(runs[0]["args"]["out"]).name.rsplit("-seed", 1)[0]
            cells = []
            for m in PERSONALIZATION:
                values = np.array([r["test"]["personalization"][m] for r in runs])
                cells.append(f"{values.mean():.3f}" + (" (" + ", ".join(f"{v:.3f}" for v in values) + ")" if len(runs) > 1 else ""))
            acyclic = ", ".join("yes" if r["test"]["personalization"]["acyclic"] else "no" for r in runs)
            print(f"| {name} | " + " | ".join(cells) + f" | {acyclic} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m analysis.summarize_runs RUN_FOLDER [RUN_FOLDER ...]")
    main(sys.argv[1:])
