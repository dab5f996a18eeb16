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
import planrec
from analysis import attributes as attributes_lib, diagnostics, ledger
from planrec import OUR_CHOICES, PAPER_SETTINGS, PRESETS, Config, PlanRec

PAPER_ML1M = {"auc": 0.8545, "recall@5": 0.3998, "recall@10": 0.5625, "ndcg@5": 0.3136, "ndcg@10": 0.3928}
METRICS = ("auc", "recall@5", "recall@10", "ndcg@5", "ndcg@10")
# The default run trains until validation NDCG@10 stops improving: at most DEFAULT_EPOCHS epochs,
# stopping after DEFAULT_PATIENCE epochs without a gain (docs/RESULTS.md, issue 18).
DEFAULT_EPOCHS = 20
DEFAULT_PATIENCE = 2


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
    p.add_argument("--protocol", choices=datalib.PROTOCOLS, default="leave-last",
                   help="leave-last (section 3.1): test on each user's last item; halves (Table 4(b)): train on "
                        "the first half of each user's sequence, test on the last item of the second half")
    p.add_argument("--users", choices=datalib.USER_GROUPS, default="all",
                   help="Table 4(b): keep the users whose interest consistency is at least (iid) or below (ood) "
                        "the mean; ml-1m and synthetic data")
    p.add_argument("--epochs", type=int, default=None,
                   help="maximum epochs; training stops earlier after --patience epochs without a gain "
                        f"(default: 10 on synthetic data, else {DEFAULT_EPOCHS})")
    p.add_argument("--batch-size", type=int, default=4096, help="scored (user, item) pairs per step, positives plus negatives (paper: 4096)")
    p.add_argument("--negatives", type=int, default=1, help="negatives drawn per positive each epoch")
    p.add_argument("--optimizer", choices=["adagrad", "adam"], default="adam",
                   help="optimizer (paper: adagrad; adam measured better, see docs/RESULTS.md)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (paper: 0.01)")
    p.add_argument("--paper-settings", action="store_true",
                   help="the paper's stated values wherever our defaults differ (section 3.1): Adagrad lr 0.01, "
                        "embedding size 8, unit loss weights, its encoder, u = the user's ID embedding, heads on e-hat")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named ablation of planrec.PRESETS (paper Tables 6-8); flags below override it")
    p.add_argument("--patience", type=int, default=DEFAULT_PATIENCE, help="epochs without validation NDCG@10 gain before stopping")
    p.add_argument("--chunk", type=int, default=datalib.CHUNK_POSITIONS,
                   help="our encoder: training positions per user-sequence chunk (data.train_sequences)")
    p.add_argument("--check-every", type=int, default=50, metavar="N",
                   help="read the loss terms from the device (and check them for finiteness) every N steps")
    p.add_argument("--seed", type=int, default=0, help="seed of initialization, sampling and evaluation masks")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    p.add_argument("--kernel", choices=["auto", "eager", "triton"], default="auto",
                   help="personalized SCM implementation: auto = Triton on CUDA, eager otherwise")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    # Model and ablation switches (paper Tables 5-8)
    p.add_argument("--structure", choices=["none", "shared", "personalized"], default=None,
                   help="none = VAE base, shared = +SSL, personalized = +PSL (full model with --n-mask-samples > 1); "
                        "default personalized")
    p.add_argument("--n-mask-samples", type=int, default=None, help=f"N_m sampled personalized structures (default {Config.n_mask_samples})")
    p.add_argument("--no-reconstruction-reg", action="store_true", help="ablation: reconstruct from z, not e-hat (RecR off)")
    p.add_argument("--no-dag-reg", action="store_true", help="ablation: drop the acyclicity loss, Eq. (10) (AcyR off)")
    p.add_argument("--no-dependency-reg", action="store_true", help="ablation: drop the structural loss, Eq. (9) (DepR off)")
    p.add_argument("--drop-dependencies", default=None, metavar="LIST",
                   help="comma-separated subset of u2u,u2i,i2u,i2i: those blocks of A are fixed at zero and never "
                        "in a mask (Table 6: u2i,i2u and u2u,i2i; i2u alone = user factors cause item factors)")
    p.add_argument("--attribute-prior", choices=["none", "user", "item", "both"], default="none",
                   help="disentanglement with prior (section 2.3, Table 5): tie factors to the data's user and/or item attributes")
    p.add_argument("--tie-private", action="store_true",
                   help="synthetic data: also tie the private factors (purchasing power, price) from ground_truth.npz")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override any planrec.Config field, e.g. --set n_factors=6 (repeatable)")
    # Run folder, resuming, evaluation
    p.add_argument("--out", default=None, help="run folder (default: runs/<data>-<preset or structure>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint on the validation and test sets")
    p.add_argument("--checkpoint", default=None, help="checkpoint file for --eval-only")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="with --eval-only: write DIR/structures.npz (shared A, per-user keep probabilities, ...)")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps (quick tries)")
    args = p.parse_args(argv)
    if args.eval_only and not args.checkpoint:
        p.error("--eval-only needs --checkpoint PATH (a best.pt or last.pt from a run folder)")
    if args.export and not args.eval_only:
        p.error("--export needs --eval-only --checkpoint PATH")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint}: no such file")
    for name, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--n-mask-samples", args.n_mask_samples),
                        ("--chunk", args.chunk), ("--check-every", args.check_every)):
        if value is not None and value < 1:
            p.error(f"{name} must be at least 1, got {value}")
    if args.negatives < 1 or args.batch_size % (1 + args.negatives):
        p.error(f"--batch-size ({args.batch_size}) must be a multiple of 1 + --negatives ({1 + args.negatives})")
    if args.min_interactions is not None and args.min_interactions < 0:
        p.error(f"--min-interactions must be at least 0, got {args.min_interactions}")
    if args.lr <= 0:
        p.error(f"--lr must be positive, got {args.lr}")
    if args.drop_dependencies is not None:
        try:
            planrec.dependency_blocks(args.drop_dependencies)
        except ValueError as err:
            p.error(f"--drop-dependencies: {err}")
    if args.tie_private and not args.data.startswith("synthetic"):
        p.error("--tie-private needs --data synthetic or synthetic-ood (only the synthetic world knows its private factors)")
    if args.tie_private and args.attribute_prior == "none":
        p.error("--tie-private ties the private factors in addition to the others: give --attribute-prior too")
    if args.epochs is None:
        args.epochs = 10 if args.data.startswith("synthetic") else DEFAULT_EPOCHS
    if args.out is None:
        args.out = f"runs/{args.data}-{args.preset or args.structure or 'personalized'}-seed{args.seed}"
    if args.paper_settings:
        args.optimizer, args.lr = "adagrad", 0.01
    args.config_overrides = parse_overrides(p, args.set)
    return args


def parse_overrides(parser, items):
    types = {f.name: f.type for f in fields(Config)}
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in types or types[name] is tuple:
            parser.error(f"--set {item!r}: expected NAME=VALUE with NAME one of "
                         f"{', '.join(n for n, t in types.items() if t is not tuple)}")
        kind = types[name]
        try:
            overrides[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            parser.error(f"--set {item!r}: {value!r} is not a valid {kind.__name__}")
    return overrides


def model_config(args, data):
    """Config from, in increasing priority: our defaults, --paper-settings, --preset, the flags, --set."""
    kw = dict(n_users=data.n_users, n_items=data.n_items)
    kw.update(PAPER_SETTINGS if args.paper_settings else {})
    kw.update(PRESETS[args.preset] if args.preset else {})
    if args.structure is not None:
        kw["structure"] = args.structure
    if args.n_mask_samples is not None:
        kw["n_mask_samples"] = args.n_mask_samples
    for flag, name in (("no_reconstruction_reg", "reconstruction_reg"), ("no_dag_reg", "dag_reg"),
                       ("no_dependency_reg", "dependency_reg")):
        if getattr(args, flag):
            kw[name] = False
    if args.drop_dependencies is not None:
        kw["drop_dependencies"] = args.drop_dependencies
    kw.update(args.config_overrides)
    if args.attribute_prior != "none":
        n_user_factors = kw.get("n_user_factors", Config.n_user_factors)
        n_item_factors = kw.get("n_factors", Config.n_factors) - n_user_factors
        kw["tied_attributes"] = attributes_lib.tied_attributes(data, args.attribute_prior, args.tie_private,
                                                n_user_factors, n_item_factors)
    try:
        return Config(**kw)
    except ValueError as err:
        sys.exit(f"error: {err}")


def data_options(args):
    """Keyword arguments of data.load_dataset that come from flags (stored in checkpoints)."""
    options = {} if args.min_interactions is None else {"min_interactions": args.min_interactions}
    if (args.protocol, args.users) != ("leave-last", "all"):
        options.update(protocol=args.protocol, users=args.users)
    return options


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA device; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pick_kernels(kernel, device):
    """({'scm_fn': ..., 'factor_mlps_fn': ...} for PlanRec, a name): the implementations of the
    personalized SCM solves and of g, each with the signature of its spec in planrec.py.
    auto: the CPU-tuned g of kernels/ everywhere, the fused Triton solves on CUDA; eager: the
    specs; triton: the Triton solves (on CUDA, or on the CPU under TRITON_INTERPRET=1)."""
    if kernel == "eager":
        return {"scm_fn": planrec.personalized_scm, "factor_mlps_fn": planrec.factor_mlps}, "eager"
    from kernels.factor_mlps import factor_mlps
    chosen = {"scm_fn": planrec.personalized_scm, "factor_mlps_fn": factor_mlps}
    if kernel == "auto" and device.type != "cuda":
        return chosen, "eager solves, tuned g"
    try:
        from kernels import personalized_scm as fused_personalized_scm
    except ImportError as err:
        if kernel == "auto":
            return chosen, "eager solves, tuned g"
        sys.exit(f"error: --kernel triton is not available ({err}); use --kernel eager")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("error: --kernel triton needs a CUDA device (or TRITON_INTERPRET=1 for the slow interpreter); "
                 "use --kernel eager on CPU")
    return {**chosen, "scm_fn": fused_personalized_scm}, "triton"


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def run_split(model, data, split, device, seed=0, extras=None, users_per_batch=64):
    """One pass over every user's evaluation candidates (column 0 is the positive): numpy arrays,
    'scores' [U, 101] and whatever extras(out, user, items) returns per batch (the analyses'
    statistics, analysis.diagnostics.SplitExtras). The personalized masks are sampled from a fixed
    seed so that evaluation is repeatable."""
    users, history, candidates = data.eval_split(split, model.context_len)   # what the encoder reads
    model.eval()
    parts = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(users), users_per_batch):
            sl = slice(start, start + users_per_batch)
            user, items = torch.as_tensor(users[sl], device=device), torch.as_tensor(candidates[sl], device=device)
            out = model(user, torch.as_tensor(history[sl], device=device), items)
            batch = {"scores": out["y"], **(extras(out, user, items) if extras else {})}
            for name, value in batch.items():
                parts.setdefault(name, []).append(value.float().cpu().numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def evaluate(model, data, split, device, seed=0, attributes=None):
    """(metrics, run_split's arrays): the ranking metrics, and the personalization and attribute
    statistics where the model has them."""
    extras = diagnostics.SplitExtras(model, attributes)
    result = run_split(model, data, split, device, seed, extras)
    return {**datalib.ranking_metrics(result["scores"]), **extras.summary(result)}, result


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


# What PlanRec.forward reads of a batch (data.RecData.train_sequences / train_epoch).
MODEL_INPUTS = ("user", "history", "items", "seq", "end", "segment")


def to_device(array, device):
    """A batch array as a tensor on `device`; to a GPU through pinned memory without blocking, so
    that building the next batch on the host overlaps the step."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def train_batches(model, data, args, np_rng):
    """One epoch's batches of args.batch_size scored pairs (positions x (1 + negatives)): user
    sequences for our encoder, which encodes each once (data.train_sequences), rows one by one for
    the paper's, whose history sees the target (data.train_epoch)."""
    positions = args.batch_size // (1 + args.negatives)
    if model.cfg.encoder == "paper":
        return data.train_epoch(positions, args.negatives, np_rng)
    return data.train_sequences(positions, args.negatives, np_rng, model.context_len, args.chunk)


class LossTerms:
    """The loss terms of an epoch, summed on the device: add() never waits for the device; read()
    (every --check-every steps and at the end of the epoch) does, and raises FloatingPointError
    naming the first step at which a term was not finite."""

    def __init__(self, epoch):
        self.epoch, self.names, self.count = epoch, None, 0

    def add(self, terms, step):
        values = torch.stack([v.detach() for v in terms.values()]).double()
        if self.names is None:
            self.names = list(terms)
            self.sums = torch.zeros_like(values)
            self.first_bad = torch.full_like(values, -1)       # step of the first non-finite value
            self.bad_value = torch.zeros_like(values)
        new_bad = (self.first_bad < 0) & ~torch.isfinite(values)
        self.first_bad = torch.where(new_bad, float(step), self.first_bad)
        self.bad_value = torch.where(new_bad, values, self.bad_value)
        self.sums += values
        self.count += 1

    def read(self):
        """{term: mean so far} (one wait for the device)."""
        if self.names is None:
            return {}
        sums, first_bad, bad_value = torch.stack([self.sums, self.first_bad, self.bad_value]).tolist()
        bad = [(step, i) for i, step in enumerate(first_bad) if step >= 0]
        if bad:
            step, i = min(bad)
            raise FloatingPointError(f"the loss term '{self.names[i]}' is {bad_value[i]} at epoch {self.epoch}, step "
                                     f"{int(step)}; the last good checkpoint is kept. Try a lower --lr.")
        return {name: total / self.count for name, total in zip(self.names, sums)}


def train_epoch(model, optimizer, data, args, np_rng, device, epoch, attributes=None):
    """One pass over every training position; returns the mean of each loss term and the number of
    training positions used (each once)."""
    model.train()
    n_steps = math.ceil(len(data.train_user) / (args.batch_size // (1 + args.negatives)))
    if args.max_steps:
        n_steps = min(n_steps, args.max_steps)
    terms_sum, positions = LossTerms(epoch), 0
    bar = tqdm(train_batches(model, data, args, np_rng), total=n_steps, desc=f"epoch {epoch}",
               leave=False, disable=None, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        if step >= n_steps:
            break
        inputs = {k: to_device(batch[k], device) for k in MODEL_INPUTS if k in batch}
        labels = torch.zeros(inputs["items"].shape, device=device)
        labels[:, 0] = 1.0
        out = model(**inputs)
        extra = {"attribute_targets": attributes(inputs["user"], inputs["items"])} if attributes is not None else {}
        loss, terms = model.loss(out, labels, **extra)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        terms_sum.add(terms, step)
        positions += len(batch["user"])
        if (step + 1) % args.check_every == 0:
            bar.set_postfix({k: f"{v:.4f}" for k, v in terms_sum.read().items() if k != "total"})
    bar.close()
    return terms_sum.read(), positions


def format_table(rows, header=("", *METRICS)):
    lines = [" | ".join(f"{h:>10}" for h in header)]
    for name, metrics in rows:
        lines.append(" | ".join([f"{name:>10}"] + [f"{metrics[m]:10.4f}" for m in METRICS]))
    return "\n".join(lines)


def write_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


def write_npz(path, arrays):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def load_data(name, root, options):
    """data.load_dataset, with the errors a user can cause (missing files offline, a malformed line)
    turned into one message."""
    try:
        return datalib.load_dataset(name, root=root, **options)
    except (OSError, RuntimeError, ValueError) as err:
        sys.exit(f"error: {err}")


def load_model(cfg, state, kernels, device, source):
    model = PlanRec(cfg, **kernels).to(device)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        sys.exit(f"error: {source} does not fit the model of its own config ({first}); "
                 "was it written by another version of planrec.py?")
    return model


def load_trained(checkpoint, data_dir, kernels, device):
    """A checkpoint with its data, model and attribute targets: (model, data, ckpt, attributes)."""
    ckpt = load_checkpoint(checkpoint)
    data = load_data(ckpt["data"], data_dir, ckpt.get("data_options", {}))
    try:
        cfg = Config(**ckpt["config"])
    except (TypeError, ValueError) as err:
        sys.exit(f"error: {checkpoint}: its config is not one this planrec.py knows ({err})")
    model = load_model(cfg, ckpt["model"], kernels, device, checkpoint)
    attributes = attributes_lib.AttributeTargets(data, cfg, device, ckpt.get("tie_private", False)) if cfg.tied_attributes else None
    return model, data, ckpt, attributes


def write_test_scores(out_dir, data, result):
    """out_dir/test_scores.npz: per-user test scores (and uncertainty), users in data order, for
    significance tests between runs (experiments.py)."""
    per_user = {"user_ids": data.raw_user_ids, "scores": result["scores"]}
    if "uncertainty" in result:
        per_user["uncertainty"] = result["uncertainty"]
    write_npz(Path(out_dir) / "test_scores.npz", per_user)


def describe_choices(cfg, args):
    """Two lines: where this run departs from the paper's stated settings, and our values where the
    paper is silent."""
    config = cfg.to_dict()
    differ = [f"{k}={config[k]!r} (paper {v!r})" for k, v in PAPER_SETTINGS.items() if config[k] != v]
    if cfg.w_personal_struct:
        differ.append(f"w_personal_struct={cfg.w_personal_struct} (ours: Eq. (9) on the personalized structures; "
                      "the paper has no such term)")
    if args.optimizer != "adagrad" or args.lr != 0.01:
        differ.insert(0, f"optimizer {args.optimizer} lr {args.lr} (paper adagrad lr 0.01)")
    if args.batch_size != 4096:
        differ.insert(0, f"batch {args.batch_size} (paper 4096)")
    ours = [f"{k}={config[k]}" for k in OUR_CHOICES] + [
        "g = one-hidden-layer GELU MLP per factor", "Y^c, Y* are probabilities",
        "N_m masks shared by a row's candidates", "KL and L_struct averaged over coordinates"]
    return ("departs from the paper's stated settings: " + (", ".join(differ) or "nowhere") + "\n"
            "our values where the paper is silent: " + ", ".join(ours))


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    kernels, kernel_name = pick_kernels(args.kernel, device)
    out_dir = Path(args.out)

    if args.eval_only:
        model, data, ckpt, attributes = load_trained(args.checkpoint, args.data_dir, kernels, device)
        results = {split: evaluate(model, data, split, device, ckpt["seed"], attributes)[0] for split in ("valid", "test")}
        print(format_table([("valid", results["valid"]), ("test", results["test"])]))
        print(json.dumps(results))
        if args.export:
            diagnostics.export_structures(model, data, device, args.export, seed=ckpt["seed"])
        return results

    data = load_data(args.data, args.data_dir, data_options(args))
    cfg = model_config(args, data)
    torch.manual_seed(args.seed)
    np_rng = np.random.default_rng(args.seed)
    model = PlanRec(cfg, **kernels).to(device)
    attributes = attributes_lib.AttributeTargets(data, cfg, device, args.tie_private) if cfg.tied_attributes else None
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
        model = load_model(cfg, ckpt["model"], kernels, device, last_path)
        optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr)
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], np_rng)
        history, best, bad_epochs = json.loads(ckpt["history"]), json.loads(ckpt["best"]), ckpt["bad_epochs"]
        start_epoch = ckpt["epoch"] + 1
        print(f"resumed {out_dir} after epoch {ckpt['epoch']}")
    out_dir.mkdir(parents=True, exist_ok=True)

    print(f"PlanRec on {args.data}: {data.n_users} users, {data.n_items} items, "
          f"{len(data.train_user)} training positions; device {device}, kernel {kernel_name}, "
          f"structure {cfg.structure}, N_m {cfg.n_mask_samples}, heads on {cfg.predict_from}, encoder {cfg.encoder}")
    print(describe_choices(cfg, args))
    if cfg.structure != "none":
        print(f"factors: {', '.join(planrec.factor_names(cfg))}" + (
            f"; dropped dependencies {cfg.drop_dependencies}, {int(model.support.sum())} allowed" if cfg.drop_dependencies else ""))
        if cfg.structure == "personalized" and model.k_A < cfg.k_A:
            print(f"K_A clipped from {cfg.k_A} to {model.k_A}: only {model.k_A} dependencies are allowed")

    for epoch in range(start_epoch, args.epochs + 1):
        if bad_epochs >= args.patience:
            break
        t0 = time.time()
        losses, positions = train_epoch(model, optimizer, data, args, np_rng, device, epoch, attributes)
        t1 = time.time()
        valid, _ = evaluate(model, data, "valid", device, args.seed, attributes)
        record = {"epoch": epoch, "loss": losses, "valid": valid, "train_positions": positions,
                  "train_s": t1 - t0, "eval_s": time.time() - t1}
        history.append(record)
        improved = best is None or valid["ndcg@10"] > best["valid"]["ndcg@10"]
        best, bad_epochs = (record, 0) if improved else (best, bad_epochs + 1)
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), config=cfg.to_dict(),
                     data=args.data, data_options=data_options(args), tie_private=args.tie_private, seed=args.seed,
                     epoch=epoch, rng=rng_state(np_rng), history=json.dumps(history), best=json.dumps(best),
                     bad_epochs=bad_epochs)
        if improved:
            save_checkpoint(best_path, **state)
        save_checkpoint(last_path, **state)
        print(f"epoch {epoch}: loss {losses['total']:.4f} (recommend {losses['recommend']:.4f}) | valid "
              + " ".join(f"{m} {valid[m]:.4f}" for m in METRICS)
              + f" | {record['train_s']:.0f}s train, {record['eval_s']:.0f}s eval" + (" *" if improved else ""))
        if "personalization" in valid:
            print("    " + diagnostics.short_personalization(valid["personalization"]))

    if not best_path.is_file():
        sys.exit(f"error: no best checkpoint in {out_dir}: nothing was trained (is --epochs lower than the resumed epoch?)")
    ckpt = load_checkpoint(best_path)
    model.load_state_dict(ckpt["model"])
    test, result = evaluate(model, data, "test", device, args.seed, attributes)
    write_test_scores(out_dir, data, result)
    popularity = datalib.ranking_metrics(datalib.popularity_scores(data, "test"))
    name = {"none": "VAE base", "shared": "+SSL", "personalized": "PlanRec"}[cfg.structure]
    rows = [(f"{name} ep{ckpt['epoch']}", test), ("popularity", popularity)]
    if args.data == "ml-1m":
        rows.insert(1, ("paper", PAPER_ML1M))
    print("\nTest metrics (best validation epoch):")
    print(format_table(rows))
    if "personalization" in test:
        print("personalization (test): " + diagnostics.short_personalization(test["personalization"]))
    for key, values in test.get("attributes", {}).items():
        print(f"attribute {key} (test): " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    summary = {"args": vars(args), "config": cfg.to_dict(), "kernel": kernel_name,
               "device": str(device), "best_epoch": ckpt["epoch"], "test": test, "popularity_test": popularity,
               "epochs": history, "wall_s": time.time() - started,
               # where the numbers come from (analysis.ledger.record_run reads these into the run's record)
               "commit": ledger.git_commit(), "machine": ledger.machine(str(device)),
               "command": ["python", "train.py", *map(str, sys.argv[1:] if argv is None else argv)]}
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
