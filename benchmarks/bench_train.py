"""Time one training step (forward + backward + optimizer step) of the eager model, per structure.

    python -m benchmarks.bench_train                       # this checkout: none, shared, personalized
    python -m benchmarks.bench_train --compare 6b35fe2     # and that commit's planrec.py and g kernel, side by side
    python -m benchmarks.bench_train --parts               # where one step's time goes, part by part

The batch is what `train.py --data ml-1m` feeds the model: 4,096 scored pairs = 2,048 training
rows x (1 positive + 1 negative), ML-1M's numbers of users and items. A model whose encoder reads
each row's own 50-item window (the paper's, and every commit before issue 18) gets 2,048 (user,
history) rows; our encoder gets the same 2,048 rows as a sequence batch (data.train_sequences):
chunks of user sequences end to end, each encoded once, drawn from a synthetic log whose user
lengths follow ML-1M's (log-normal, median 96). Steps of the compared implementations alternate,
so both see the same machine load; the table reports medians and the ratio. A benchmark prints,
it never asserts a time.
"""

import argparse
import collections
import importlib.util
import inspect
import statistics
import subprocess
import sys
import tarfile
import tempfile
import io
import time
from pathlib import Path

import numpy as np
import torch

import data as datalib
from kernels.factor_mlps import factor_mlps

HERE = Path(__file__).resolve().parents[1]   # the repository root


def import_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_planrec(commit=None):
    """This checkout's planrec module, or the planrec.py of a git commit (imported under its own
    name), with the CPU-tuned g that goes with it as `module.tuned_g`: this checkout's, or the
    commit's kernels/factor_mlps.py (None where the commit has none)."""
    if commit is None:
        module = import_file("planrec_here", HERE / "planrec.py")
        module.tuned_g = factor_mlps
        return module
    folder = Path(tempfile.mkdtemp(prefix=f"bench_train_{commit}_"))
    for name in ("planrec.py", "kernels/factor_mlps.py"):
        try:
            blob = subprocess.run(["git", "-C", str(HERE), "archive", commit, name],
                                  check=True, capture_output=True).stdout
        except subprocess.CalledProcessError as err:
            if name == "planrec.py":
                sys.exit(f"error: cannot read planrec.py at commit {commit!r}: {err.stderr.decode().strip()}")
            continue
        tarfile.open(fileobj=io.BytesIO(blob)).extractall(folder, filter="data")
    module = import_file(f"planrec_{commit}", folder / "planrec.py")
    kernel = folder / "kernels" / "factor_mlps.py"
    module.tuned_g = import_file(f"factor_mlps_{commit}", kernel).factor_mlps if kernel.is_file() else None
    return module


def make_batch(rows, candidates, n_users, n_items, history_len, seed=0):
    """(inputs of PlanRec.forward, labels): `rows` (user, history) rows of random items."""
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(0, n_users, (rows,), generator=g)
    history = torch.randint(1, n_items + 1, (rows, history_len), generator=g)
    lengths = torch.randint(1, history_len + 1, (rows,), generator=g)    # left padding, as data.py makes it
    history[torch.arange(history_len)[None, :] < (history_len - lengths)[:, None]] = 0
    items = torch.randint(1, n_items + 1, (rows, candidates), generator=g)
    return {"user": user, "history": history, "items": items}, labels_for(items)


def labels_for(items):
    labels = torch.zeros(items.shape)
    labels[:, 0] = 1
    return labels


def synthetic_log(n_users, n_items, seed=0):
    """A RecData under the leave-last protocol with ML-1M's numbers of users and items and user
    lengths like ML-1M's (log-normal: median 96, about 20 to 2,300 items), items drawn at random."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(96), 1.15, n_users), 20, 2314).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    user_of = np.repeat(np.arange(n_users), lengths)
    t = np.arange(offsets[-1]) - offsets[user_of]
    train_pos = np.flatnonzero((t >= 1) & (t <= lengths[user_of] - 3))
    empty = np.zeros((n_users, 1), dtype=np.int64)
    return datalib.RecData(
        name="synthetic-ml1m-lengths", n_users=n_users, n_items=n_items,
        item_seq=rng.integers(1, n_items + 1, offsets[-1]), user_offsets=offsets,
        train_user=user_of[train_pos], train_pos=train_pos, valid_pos=offsets[1:] - 2, test_pos=offsets[1:] - 1,
        valid_candidates=empty, test_candidates=empty, item_train_count=np.zeros(n_items + 1, dtype=np.int64),
        user_attrs={}, item_attrs={}, raw_user_ids=np.arange(n_users), raw_item_ids=np.arange(n_items + 1))


def make_sequence_batch(rows, candidates, n_users, n_items, context, seed=0):
    """(inputs of PlanRec.forward, labels): the first batch of `rows` training rows of an epoch of
    data.train_sequences over synthetic_log (1 positive + candidates - 1 negatives per row)."""
    log = synthetic_log(n_users, n_items, seed)
    batch = next(log.train_sequences(rows, candidates - 1, np.random.default_rng(seed), context))
    inputs = {k: torch.from_numpy(batch[k]) for k in ("user", "history", "items", "seq", "end", "segment")}
    return inputs, labels_for(inputs["items"])


def batch_for(module, model, rows, candidates):
    """The batch `model` trains on: a sequence batch where its encoder encodes each sequence once
    (this checkout's target_attention), else rows with their own windows."""
    cfg = model.cfg
    if "train_sequences" in datalib.RecData.__dict__ and hasattr(module, "context_length") and cfg.encoder != "paper":
        return make_sequence_batch(rows, candidates, cfg.n_users, cfg.n_items, module.context_length(cfg))
    return make_batch(rows, candidates, cfg.n_users, cfg.n_items, cfg.history_len)


def describe(batch):
    inputs, _ = batch
    if "seq" not in inputs:
        return f"{len(inputs['user'])} rows of {inputs['history'].shape[1]}-item histories"
    return (f"{len(inputs['user'])} rows in {int(inputs['segment'].max()) + 1} sequence chunks of "
            f"{inputs['history'].shape[1]} items in all")


def build(module, structure, overrides):
    fields = module.Config.__dataclass_fields__
    kw = {k: v for k, v in dict(structure=structure, **overrides).items() if k in fields}
    # each model with its own commit's CPU-tuned g of kernels/ (train.py's default on CPU); an older
    # commit's planrec.py knows no factor_mlps_fn and carries its own g
    takes_g = "factor_mlps_fn" in inspect.signature(module.PlanRec).parameters
    fast = {"factor_mlps_fn": module.tuned_g} if takes_g and module.tuned_g is not None else {}
    torch.manual_seed(0)
    model = module.PlanRec(module.Config(**kw), **fast)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def step(model, optimizer, batch):
    """One training step; returns the seconds of its phases: forward + loss, backward, optimizer."""
    inputs, labels = batch
    t0 = time.perf_counter()
    out = model(**inputs)
    loss, _ = model.loss(out, labels)
    t1 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t2 = time.perf_counter()
    optimizer.step()
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def time_parts(model, optimizer, batch, steps, top=12):
    """Where one step of this checkout's model goes. First `steps` plain steps: the wall-clock time
    of each forward part (hooks around the modules of Algorithm 1 and the solve) and of forward,
    backward and optimizer. Then `steps` steps under torch.profiler: each autograd node's total CPU
    time in the backward (the profiler slows every op a little, so these run high). Returns
    [(section, part, ms per step)], medians over the steps."""
    parts = collections.defaultdict(float)
    started = {}
    labels = {"encoder": "encoder, Eq. (2)-(6)", "g": "g of Eq. (8) and (14)", "mask_mlp": "MLP_mask, Eq. (11)",
              "predict_shared": "MLP_R, Eq. (15)", "predict_personal": "MLP_R*, Eq. (15)", "decoder": "decoder (loss)"}
    hooks = []
    for attr, name in labels.items():
        if hasattr(model, attr):
            module = getattr(model, attr)
            hooks.append(module.register_forward_pre_hook(
                lambda *_, name=name: started.__setitem__(name, time.perf_counter())))
            hooks.append(module.register_forward_hook(
                lambda *_, name=name: parts.__setitem__(name, parts[name] + time.perf_counter() - started[name])))
    solve = model.scm_fn

    def timed_solve(*args, **kwargs):
        t0 = time.perf_counter()
        result = solve(*args, **kwargs)
        parts["masks and solve, Eq. (12)-(13)"] += time.perf_counter() - t0
        return result

    model.scm_fn = timed_solve
    totals = ("forward + loss", "backward", "optimizer")
    per_step = collections.defaultdict(list)
    for _ in range(steps):
        parts.clear()
        phases = step(model, optimizer, batch)
        for key, seconds in [("whole step", sum(phases)), *zip(totals, phases), *parts.items()]:
            per_step[key].append(seconds)
    model.scm_fn = solve
    for hook in hooks:
        hook.remove()
    from torch.profiler import profile
    with profile() as prof:
        for _ in range(steps):
            step(model, optimizer, batch)
    prefix = "autograd::engine::evaluate_function: "
    nodes = sorted((e for e in prof.key_averages() if e.key.startswith(prefix)), key=lambda e: -e.cpu_time_total)
    medians = {key: 1000 * statistics.median(v) for key, v in per_step.items()}
    totals = ("whole step",) + totals
    rows = [("step", key, medians[key]) for key in totals]
    rows += sorted((("forward", key, ms) for key, ms in medians.items() if key not in totals), key=lambda r: -r[2])
    rows += [("backward", e.key[len(prefix):] + " (profiled)", e.cpu_time_total / 1000 / steps) for e in nodes[:top]]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", default=None, metavar="COMMIT",
                   help="also time this commit's planrec.py with its kernels/factor_mlps.py")
    p.add_argument("--structures", nargs="+", default=["none", "shared", "personalized"],
                   choices=["none", "shared", "personalized"])
    p.add_argument("--steps", type=int, default=7, help="timed steps per implementation and structure")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rows", type=int, default=2048, help="(user, history) rows per step")
    p.add_argument("--candidates", type=int, default=2, help="scored items per row (1 positive + negatives)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--parts", action="store_true",
                   help="instead of the table, where one step of this checkout's model goes: forward parts "
                        "timed by the clock, backward autograd nodes by torch.profiler")
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
    if args.parts and args.compare:
        p.error("--parts profiles this checkout only; leave out --compare")
    implementations = {"this checkout": load_planrec()}
    if args.compare:
        implementations[args.compare] = load_planrec(args.compare)
    here = implementations["this checkout"]

    if args.parts:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.rows} rows x "
              f"{args.candidates} candidates; medians of {args.steps} steps after {args.warmup} warm-up steps")
        for structure in args.structures:
            model, optimizer = build(here, structure, overrides)
            batch = batch_for(here, model, args.rows, args.candidates)
            print(f"\n{structure}: {describe(batch)}", end="")
            for _ in range(args.warmup):
                step(model, optimizer, batch)
            print(f"\n{'section':>9} | {'part':<58} | ms per step")
            for section, name, ms in time_parts(model, optimizer, batch, args.steps):
                print(f"{section:>9} | {name:<58} | {ms:8.1f}")
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.rows} rows x "
          f"{args.candidates} candidates; median of {args.steps} steps (forward + backward + Adam step)")
    print(f"{'structure':>13} | " + " | ".join(f"{name:>15}" for name in implementations)
          + (" | ratio (old / new)" if args.compare else ""))
    batches = {}
    for structure in args.structures:
        models = {name: build(module, structure, overrides) for name, module in implementations.items()}
        batches = {name: batch_for(implementations[name], model, args.rows, args.candidates)
                   for name, (model, _) in models.items()}
        times = {name: [] for name in implementations}
        for i in range(args.warmup + args.steps):
            for name, (model, optimizer) in models.items():   # alternate: same load for both
                seconds = sum(step(model, optimizer, batches[name]))
                if i >= args.warmup:
                    times[name].append(seconds)
        medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
        line = f"{structure:>13} | " + " | ".join(f"{medians[name]:12.0f} ms" for name in implementations)
        if args.compare:
            line += f" | {medians[args.compare] / medians['this checkout']:.2f}x"
        print(line, flush=True)
    for name, batch in batches.items():
        print(f"{name}: {describe(batch)}")


if __name__ == "__main__":
    main()
