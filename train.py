"""Train and evaluate PlanRec: `python train.py --data ml-1m`.

Trains with the paper's settings (section 3.1) unless a flag or a documented default says
otherwise, selects the epoch with the best validation NDCG@10, and prints the test metrics of
that checkpoint beside the paper's PlanRec row and the popularity baseline. Everything a run
produces goes to its run folder (--out): best.pt, last.pt, metrics.json.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data as datalib
from planrec import PAPER_SETTINGS, Config, PlanRec, personalized_scm as eager_personalized_scm

PAPER_ML1M = {"auc": 0.8545, "recall@5": 0.3998, "recall@10": 0.5625, "ndcg@5": 0.3136, "ndcg@10": 0.3928}
METRICS = ("auc", "recall@5", "recall@10", "ndcg@5", "ndcg@10")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train and evaluate PlanRec (Zhang et al., TPAMI).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=datalib.DATASETS, default="ml-1m",
                   help="dataset: MovieLens-1M, the synthetic world (IID or with the OOD purchasing-power shift), "
                        "Amazon-Book (16-core) or any interaction log (see data.py)")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset files (else $PLANREC_DATA, ./data)")
    p.add_argument("--min-interactions", type=int, default=None, metavar="K",
                   help="k-core filter: keep users and items with at least K interactions "
                        "(default: 16 for amazon-book, none otherwise)")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: 3 on ml-1m, 10 on synthetic)")
    p.add_argument("--batch-size", type=int, default=4096, help="scored (user, item) pairs per step, positives plus negatives")
    p.add_argument("--negatives", type=int, default=1, help="negatives drawn per positive each epoch")
    p.add_argument("--optimizer", choices=["adagrad", "adam"], default="adam",
                   help="optimizer (paper: adagrad; adam measured better, see RESULTS.md)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (paper: 0.01)")
    p.add_argument("--paper-settings", action="store_true",
                   help="use the paper's stated values wherever our defaults differ (Adagrad, embedding size 8, "
                        "unit loss weights, predictions from e-hat alone)")
    p.add_argument("--patience", type=int, default=2, help="epochs without validation NDCG@10 gain before stopping")
    p.add_argument("--seed", type=int, default=0, help="seed of initialization, sampling and evaluation masks")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    p.add_argument("--kernel", choices=["auto", "eager", "triton"], default="auto",
                   help="personalized SCM implementation: auto = Triton on CUDA, eager otherwise")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    # Model and ablation switches (paper Tables 7 and 8)
    p.add_argument("--structure", choices=["none", "shared", "personalized"], default="personalized",
                   help="none = VAE base, shared = +SSL, personalized = +PSL (full model with --n-mask-samples > 1)")
    p.add_argument("--n-mask-samples", type=int, default=Config.n_mask_samples, help="N_m sampled personalized structures")
    p.add_argument("--no-reconstruction-reg", action="store_true", help="ablation: reconstruct from z, not e-hat (RecR off)")
    p.add_argument("--no-dag-reg", action="store_true", help="ablation: drop the acyclicity loss, Eq. (10) (AcyR off)")
    p.add_argument("--no-dependency-reg", action="store_true", help="ablation: drop the structural loss, Eq. (9) (DepR off)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override any planrec.Config field, e.g. --set n_factors=6 (repeatable)")
    # Run folder, resuming, evaluation
    p.add_argument("--out", default=None, help="run folder (default: runs/<data>-<structure>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint on the validation and test sets")
    p.add_argument("--checkpoint", default=None, help="checkpoint file for --eval-only")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps (quick tries)")
    args = p.parse_args(argv)
    if args.eval_only and not args.checkpoint:
        p.error("--eval-only needs --checkpoint PATH (a best.pt or last.pt from a run folder)")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint}: no such file")
    for name, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--n-mask-samples", args.n_mask_samples)):
        if value is not None and value < 1:
            p.error(f"{name} must be at least 1, got {value}")
    if args.negatives < 1 or args.batch_size % (1 + args.negatives):
        p.error(f"--batch-size ({args.batch_size}) must be a multiple of 1 + --negatives ({1 + args.negatives})")
    if args.min_interactions is not None and args.min_interactions < 0:
        p.error(f"--min-interactions must be at least 0, got {args.min_interactions}")
    if args.lr <= 0:
        p.error(f"--lr must be positive, got {args.lr}")
    if args.epochs is None:
        args.epochs = 10 if args.data.startswith("synthetic") else 3
    if args.out is None:
        args.out = f"runs/{args.data}-{args.structure}-seed{args.seed}"
    if args.paper_settings:
        args.optimizer = "adagrad"
    args.config_overrides = {**(PAPER_SETTINGS if args.paper_settings else {}), **parse_overrides(p, args.set)}
    return args


def parse_overrides(parser, items):
    types = {f.name: f.type for f in fields(Config)}
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            parser.error(f"--set {item!r}: expected NAME=VALUE with NAME one of {', '.join(types)}")
        kind = types[name]
        try:
            overrides[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            parser.error(f"--set {item!r}: {value!r} is not a valid {kind.__name__}")
    return overrides


def model_config(args, data):
    kw = dict(n_users=data.n_users, n_items=data.n_items, structure=args.structure,
              n_mask_samples=args.n_mask_samples, reconstruction_reg=not args.no_reconstruction_reg,
              dag_reg=not args.no_dag_reg, dependency_reg=not args.no_dependency_reg)
    kw.update(args.config_overrides)
    return Config(**kw)


def data_options(args):
    """Keyword arguments of data.load_dataset that come from flags (stored in checkpoints)."""
    return {} if args.min_interactions is None else {"min_interactions": args.min_interactions}


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA device; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pick_scm(kernel, device):
    """The personalized SCM implementation: both share planrec.personalized_scm's signature."""
    if kernel == "eager" or (kernel == "auto" and device.type != "cuda"):
        return eager_personalized_scm, "eager"
    try:
        from kernels import personalized_scm as fused_personalized_scm
    except ImportError as err:
        if kernel == "auto":
            return eager_personalized_scm, "eager"
        sys.exit(f"error: --kernel triton is not available ({err}); use --kernel eager")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("error: --kernel triton needs a CUDA device (or TRITON_INTERPRET=1 for the slow interpreter); "
                 "use --kernel eager on CPU")
    return fused_personalized_scm, "triton"


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def score_split(model, data, split, device, seed=0, users_per_batch=64):
    """Scores [n_users, 101] of every user's evaluation candidates (column 0 is the positive).

    The personalized masks are sampled from a fixed seed so that evaluation is repeatable."""
    users, history, candidates = data.eval_split(split)
    model.eval()
    scores = np.empty(candidates.shape, dtype=np.float32)
    uncertainty = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(users), users_per_batch):
            sl = slice(start, start + users_per_batch)
            out = model(torch.as_tensor(users[sl], device=device), torch.as_tensor(history[sl], device=device),
                        torch.as_tensor(candidates[sl], device=device))
            scores[sl] = out["y"].float().cpu().numpy()
            if "uncertainty" in out:
                uncertainty.append(out["uncertainty"][:, 0].float().cpu().numpy())
    return scores, (np.concatenate(uncertainty) if uncertainty else None)


def evaluate(model, data, split, device, seed=0):
    scores, uncertainty = score_split(model, data, split, device, seed)
    metrics = datalib.ranking_metrics(scores)
    if uncertainty is not None:
        metrics["mean_uncertainty"] = float(uncertainty.mean())
    return metrics


# ------------------------------------------------------------------------------------------------
# Checkpoints: written atomically, loadable with weights_only=True
# ------------------------------------------------------------------------------------------------

def atomic_write(path, write):
    """write(tmp_path) into a temporary file beside path, then rename it over path: a crash
    leaves the previous file intact and never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, **state):
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # noqa: BLE001 - any unreadable file gets the same advice
        sys.exit(f"error: cannot read checkpoint {path}: {err}. Is it a best.pt/last.pt written by train.py?")


def rng_state(np_rng):
    state = {"torch": torch.get_rng_state(), "numpy": json.dumps(np_rng.bit_generator.state)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, np_rng):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_rng.bit_generator.state = json.loads(state["numpy"])


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def make_optimizer(name, params, lr):
    return torch.optim.Adagrad(params, lr=lr) if name == "adagrad" else torch.optim.Adam(params, lr=lr)


def train_epoch(model, optimizer, data, args, np_rng, device, epoch):
    """One pass over every training position; returns the mean of each loss term."""
    model.train()
    positions = args.batch_size // (1 + args.negatives)
    n_steps = math.ceil(len(data.train_user) / positions)
    if args.max_steps:
        n_steps = min(n_steps, args.max_steps)
    sums, count = {}, 0
    bar = tqdm(data.train_epoch(positions, args.negatives, np_rng), total=n_steps, desc=f"epoch {epoch}",
               leave=False, disable=None, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        if step >= n_steps:
            break
        items = torch.as_tensor(batch["items"], device=device)
        labels = torch.zeros(items.shape, device=device)
        labels[:, 0] = 1.0
        out = model(torch.as_tensor(batch["user"], device=device), torch.as_tensor(batch["history"], device=device), items)
        loss, terms = model.loss(out, labels)
        for name, value in terms.items():
            if not torch.isfinite(value):
                raise FloatingPointError(f"the loss term '{name}' is {value.item()} at epoch {epoch}, step {step}; "
                                         "the last good checkpoint is kept. Try a lower --lr.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.item()
        count += 1
        if step % 10 == 0:
            bar.set_postfix({k: f"{v / count:.4f}" for k, v in sums.items() if k != "total"})
    bar.close()
    return {k: v / count for k, v in sums.items()}


def format_table(rows, header=("", *METRICS)):
    lines = [" | ".join(f"{h:>10}" for h in header)]
    for name, metrics in rows:
        lines.append(" | ".join([f"{name:>10}"] + [f"{metrics[m]:10.4f}" for m in METRICS]))
    return "\n".join(lines)


def write_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    scm_fn, kernel_name = pick_scm(args.kernel, device)
    out_dir = Path(args.out)

    if args.eval_only:
        ckpt = load_checkpoint(args.checkpoint)
        data = datalib.load_dataset(ckpt["data"], root=args.data_dir, **ckpt.get("data_options", {}))
        model = PlanRec(Config(**ckpt["config"]), scm_fn=scm_fn).to(device)
        model.load_state_dict(ckpt["model"])
        results = {split: evaluate(model, data, split, device, seed=ckpt["seed"]) for split in ("valid", "test")}
        print(format_table([("valid", results["valid"]), ("test", results["test"])]))
        print(json.dumps(results))
        return results

    data = datalib.load_dataset(args.data, root=args.data_dir, **data_options(args))
    cfg = model_config(args, data)
    torch.manual_seed(args.seed)
    np_rng = np.random.default_rng(args.seed)
    model = PlanRec(cfg, scm_fn=scm_fn).to(device)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr)
    history, best, start_epoch, bad_epochs = [], None, 1, 0

    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if args.resume:
        if not last_path.is_file():
            sys.exit(f"error: --resume: no checkpoint at {last_path}; start the run without --resume")
        ckpt = load_checkpoint(last_path)
        if ckpt["config"] != cfg.to_dict():
            sys.exit(f"error: --resume: the flags give a different model than the run in {out_dir}; "
                     "resume with the run's original flags")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], np_rng)
        history, best, bad_epochs = json.loads(ckpt["history"]), json.loads(ckpt["best"]), ckpt["bad_epochs"]
        start_epoch = ckpt["epoch"] + 1
        print(f"resumed {out_dir} after epoch {ckpt['epoch']}")
    out_dir.mkdir(parents=True, exist_ok=True)

    print(f"PlanRec on {args.data}: {data.n_users} users, {data.n_items} items, "
          f"{len(data.train_user)} training positions; device {device}, kernel {kernel_name}, "
          f"structure {cfg.structure}, N_m {cfg.n_mask_samples}")
    for epoch in range(start_epoch, args.epochs + 1):
        if bad_epochs >= args.patience:
            break
        t0 = time.time()
        losses = train_epoch(model, optimizer, data, args, np_rng, device, epoch)
        t1 = time.time()
        valid = evaluate(model, data, "valid", device, seed=args.seed)
        record = {"epoch": epoch, "loss": losses, "valid": valid, "train_s": t1 - t0, "eval_s": time.time() - t1}
        history.append(record)
        improved = best is None or valid["ndcg@10"] > best["valid"]["ndcg@10"]
        if improved:
            best, bad_epochs = record, 0
        else:
            bad_epochs += 1
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), config=cfg.to_dict(),
                     data=args.data, data_options=data_options(args), seed=args.seed, epoch=epoch, rng=rng_state(np_rng),
                     history=json.dumps(history), best=json.dumps(best), bad_epochs=bad_epochs)
        if improved:
            save_checkpoint(best_path, **state)
        save_checkpoint(last_path, **state)
        print(f"epoch {epoch}: loss {losses['total']:.4f} (recommend {losses['recommend']:.4f}) | valid "
              + " ".join(f"{m} {valid[m]:.4f}" for m in METRICS)
              + f" | {record['train_s']:.0f}s train, {record['eval_s']:.0f}s eval" + (" *" if improved else ""))

    if not best_path.is_file():
        sys.exit(f"error: no best checkpoint in {out_dir}: nothing was trained (is --epochs lower than the resumed epoch?)")
    ckpt = load_checkpoint(best_path)
    model.load_state_dict(ckpt["model"])
    test = evaluate(model, data, "test", device, seed=args.seed)
    popularity = datalib.ranking_metrics(datalib.popularity_scores(data, "test"))
    name = {"none": "VAE base", "shared": "+SSL", "personalized": "PlanRec"}[cfg.structure]
    rows = [(f"{name} ep{ckpt['epoch']}", test), ("popularity", popularity)]
    if args.data == "ml-1m":
        rows.insert(1, ("paper", PAPER_ML1M))
    print("\nTest metrics (best validation epoch):")
    print(format_table(rows))
    summary = {"args": {k: v for k, v in vars(args).items()}, "config": cfg.to_dict(), "kernel": kernel_name,
               "device": str(device), "best_epoch": ckpt["epoch"], "test": test, "popularity_test": popularity,
               "epochs": history, "wall_s": time.time() - started}
    write_json(out_dir / "metrics.json", summary)
    print(f"wrote {out_dir / 'metrics.json'} ({summary['wall_s']:.0f}s)")
    return summary


if __name__ == "__main__":
    try:
        main()
    except FloatingPointError as err:
        sys.exit(f"error: {err}")
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
