"""Time one training step (forward + backward + optimizer step) of the eager model, per structure.

    python -m bench_train                       # this checkout: none, shared, personalized
    python -m bench_train --compare 6b35fe2     # and that commit's planrec.py, side by side

The batch is what `train.py --data ml-1m` feeds the model: 4,096 scored pairs = 2,048 (user,
history) rows x (1 positive + 1 negative), 50-item histories, ML-1M's numbers of users and items.
Steps of the compared implementations alternate, so both see the same machine load; the table
reports medians and the ratio. A benchmark prints, it never asserts a time.
"""

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tarfile
import tempfile
import io
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def load_planrec(commit=None):
    """This checkout's planrec module, or the planrec.py of a git commit (imported under its own name)."""
    if commit is None:
        path = HERE / "planrec.py"
    else:
        try:
            blob = subprocess.run(["git", "-C", str(HERE), "archive", commit, "planrec.py"],
                                  check=True, capture_output=True).stdout
        except subprocess.CalledProcessError as err:
            sys.exit(f"error: cannot read planrec.py at commit {commit!r}: {err.stderr.decode().strip()}")
        folder = Path(tempfile.mkdtemp(prefix=f"bench_train_{commit}_"))
        tarfile.open(fileobj=io.BytesIO(blob)).extractall(folder, filter="data")
        path = folder / "planrec.py"
    spec = importlib.util.spec_from_file_location(f"planrec_{commit or 'here'}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_batch(rows, candidates, n_users, n_items, history_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(0, n_users, (rows,), generator=g)
    history = torch.randint(1, n_items + 1, (rows, history_len), generator=g)
    lengths = torch.randint(1, history_len + 1, (rows,), generator=g)    # left padding, as data.py makes it
    history[torch.arange(history_len)[None, :] < (history_len - lengths)[:, None]] = 0
    items = torch.randint(1, n_items + 1, (rows, candidates), generator=g)
    labels = torch.zeros(rows, candidates)
    labels[:, 0] = 1
    return user, history, items, labels


def build(module, structure, overrides):
    fields = module.Config.__dataclass_fields__
    kw = {k: v for k, v in dict(structure=structure, **overrides).items() if k in fields}
    torch.manual_seed(0)
    model = module.PlanRec(module.Config(**kw))
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def step(model, optimizer, batch):
    user, history, items, labels = batch
    out = model(user, history, items)
    loss, _ = model.loss(out, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", default=None, metavar="COMMIT", help="also time this commit's planrec.py")
    p.add_argument("--structures", nargs="+", default=["none", "shared", "personalized"],
                   choices=["none", "shared", "personalized"])
    p.add_argument("--steps", type=int, default=7, help="timed steps per implementation and structure")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rows", type=int, default=2048, help="(user, history) rows per step")
    p.add_argument("--candidates", type=int, default=2, help="scored items per row (1 positive + negatives)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="Config override for both implementations (numbers and strings), e.g. predict_from=both")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"predict_from": "e_hat"}      # the paper's heads; the old default read [e ; e-hat]
    for item in args.set:
        name, _, value = item.partition("=")
        for cast in (int, float, str):
            try:
                overrides[name] = cast(value)
                break
            except ValueError:
                pass
    implementations = {"this checkout": load_planrec()}
    if args.compare:
        implementations[args.compare] = load_planrec(args.compare)
    here = implementations["this checkout"]
    cfg = here.Config()
    batch = make_batch(args.rows, args.candidates, cfg.n_users, cfg.n_items, cfg.history_len)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.rows} rows x "
          f"{args.candidates} candidates; median of {args.steps} steps (forward + backward + Adam step)")
    print(f"{'structure':>13} | " + " | ".join(f"{name:>15}" for name in implementations)
          + (" | ratio (old / new)" if args.compare else ""))
    for structure in args.structures:
        models = {name: build(module, structure, overrides) for name, module in implementations.items()}
        times = {name: [] for name in implementations}
        for i in range(args.warmup + args.steps):
            for name, (model, optimizer) in models.items():   # alternate: same load for both
                t0 = time.perf_counter()
                step(model, optimizer, batch)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
        line = f"{structure:>13} | " + " | ".join(f"{medians[name]:12.0f} ms" for name in implementations)
        if args.compare:
            line += f" | {medians[args.compare] / medians['this checkout']:.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
