"""Print the test metrics of finished runs as a Markdown table: `python summarize_runs.py runs/*/`.

Runs are grouped by everything in their arguments except the seed and the run folder; each group
gets one row with the mean and the spread (min-max) over its seeds."""

import json
import sys
from pathlib import Path

import numpy as np

from train import METRICS


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


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python summarize_runs.py RUN_FOLDER [RUN_FOLDER ...]")
    main(sys.argv[1:])
