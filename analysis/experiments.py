"""Every analysis of the PlanRec paper (sections 3.2-3.4) as one command, plus a structure-recovery
test on the synthetic world that the paper could not run.

    python -m analysis.experiments --list
    python -m analysis.experiments table2 figure3 --budget quick --seeds 0 1 2 --out results/quick
    python -m analysis.experiments all --budget full --seeds 0 1 2 --out results/full
    python -m analysis.experiments all --budget quick --out results/quick --plan      # what would be trained
    python -m analysis.experiments all --budget full --from-ledger --out results/full  # rebuild, never train

The runs live in the ledger (ledger/, committed; analysis/ledger.py says what a record holds and
when one is reused). Each experiment reads the records of the runs it needs and trains only those
missing (or stale: trained by other model code) through train.py's own `main`, one run folder per
configuration and seed under OUT/runs/ (a finished folder is recorded as it is, an interrupted one
resumed with --resume); each run is recorded as soon as it finishes. The analyses read the records
only, so a report is the same whether its runs were trained now or long ago elsewhere, and
--from-ledger rebuilds every report, table and figure without training (an experiment with a run
missing is left out, and the command ends in an error listing the missing runs). Each experiment
then writes OUT/NAME.json (its numbers), a CSV per table, PNG figures, and rebuilds OUT/REPORT.md
from every OUT/*.json there, in the paper's order: our numbers (mean and min-max over seeds) beside
the paper's, with paired sign-flip permutation tests over users.

The quick budget is a smoke test of the pipeline: every table, JSON and report section made from it
says so, and no finding rests on it.

Everything the paper leaves open is marked "our choice" here and in the report.
"""

import argparse
import csv
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")            # figures are written to files, never shown
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data as datalib  # noqa: E402
from datasets.synthetic import load_ground_truth, make_synthetic  # noqa: E402
import planrec  # noqa: E402
import train  # noqa: E402
from analysis import diagnostics, ledger, structure_recovery as srlib  # noqa: E402
from datasets.synthetic import make_structured_world, raw_index  # noqa: E402

METRICS = train.METRICS
LABELS = {"auc": "AUC", "recall@5": "R@5", "recall@10": "R@10", "ndcg@5": "N@5", "ndcg@10": "N@10"}
TESTED = ("ndcg@10", "recall@10")      # the per-user metrics of the significance tests
MIN_PERMUTATIONS = 10_000

# Training budgets. "main" runs use the real dataset (ML-1M), "synthetic" runs the synthetic world.
# quick: a smoke test of the pipeline (every experiment together in about 90 minutes on 2 CPU cores;
# ML-1M models stay below the popularity baseline), labelled as such everywhere; full: train.py's
# defaults (3 epochs on ML-1M, 10 on the synthetic world; early stopping with patience 2).
SMOKE_TEST = "quick"
SMOKE_TEST_NOTE = ("**Smoke test (quick budget).** These runs are trained for a few steps to show that the pipeline "
                   "runs end to end; their numbers are not results and no finding rests on them.")
BUDGETS = {
    "quick": {"main": ("--epochs", "1", "--max-steps", "60"), "synthetic": ("--epochs", "4")},
    "full": {"main": (), "synthetic": ()},
    # issue 19: to convergence, with no time cap: early stopping with patience 3 and a cap (100
    # epochs) that no run of ours has come near (the default's 20 is near the VAE base's 18 epochs)
    "converged": {"main": ("--epochs", "100", "--patience", "3"), "synthetic": ("--epochs", "100", "--patience", "3")},
}
# Rough wall seconds per run on 2 quiet CPU cores, for --plan where the ledger has no record of the
# configuration to time it by: an ML-1M PlanRec epoch takes ~3.6 min and the default stops after ~11
# (issue 18, docs/RESULTS.md; the VAE base and +SSL are 3-5x faster per step); a synthetic epoch ~15 s.
ESTIMATED_SECONDS = {("main", "quick"): 60, ("main", "full"): 2400, ("main", "converged"): 3600,
                     ("synthetic", "quick"): 70, ("synthetic", "full"): 160, ("synthetic", "converged"): 300}

# ------------------------------------------------------------------------------------------------
# The paper's numbers (MovieLens rows; metric order AUC, R@5, R@10, N@5, N@10)
# ------------------------------------------------------------------------------------------------


def paper(*values):
    return dict(zip(METRICS, values))


PAPER = {
    "planrec": paper(0.8545, 0.3998, 0.5625, 0.3136, 0.3928),          # Tables 2, 3 (N_m = 8), 5-8
    "cvae": paper(0.8443, 0.3607, 0.5360, 0.2796, 0.3648),             # Table 2, the best baseline
    "vae": paper(0.8223, 0.3238, 0.4776, 0.2514, 0.3260),              # Tables 5 and 7, VAE base
    # The paper contradicts itself here: Table 3's N_m = 1 column is, digit for digit, Table 2's CVAE
    # row, and Table 7's +PSL column (N_m = 1 by its text) is Table 3's N_m = 2 column. We quote
    # each table as printed.
    "nm1": paper(0.8443, 0.3607, 0.5360, 0.2796, 0.3648),              # Table 3
    "nm2": paper(0.8491, 0.3849, 0.5571, 0.2992, 0.3830),
    "nm4": paper(0.8542, 0.3849, 0.5562, 0.3017, 0.3833),
    "ssl": paper(0.8423, 0.3533, 0.5305, 0.2733, 0.3594),              # Table 7
    "psl": paper(0.8491, 0.3849, 0.5571, 0.2992, 0.3830),
    "no-regs": paper(0.8324, 0.3437, 0.4951, 0.2723, 0.3460),          # Table 8
    "recr": paper(0.8443, 0.3761, 0.5297, 0.2976, 0.3721),
    "recr-acyr": paper(0.8478, 0.3820, 0.5400, 0.3066, 0.3783),
    "no-u2i": paper(0.8490, 0.3937, 0.5448, 0.3061, 0.3790),           # Table 6
    "no-u2u-i2i": paper(0.8532, 0.4002, 0.5490, 0.3167, 0.3867),
    "vae-ui": paper(0.8368, 0.3450, 0.5161, 0.2666, 0.3498),           # Table 5
    "planrec-u": paper(0.8556, 0.4088, 0.5639, 0.3205, 0.3976),
    "planrec-i": paper(0.8555, 0.4107, 0.5646, 0.3213, 0.3964),
    "planrec-ui": paper(0.8580, 0.4097, 0.5691, 0.3216, 0.3993),
    "synth-iid-vae": paper(0.7992, 0.2371, 0.3809, 0.1825, 0.2521),    # Table 4
    "synth-iid-planrec": paper(0.8172, 0.2630, 0.4008, 0.2199, 0.2865),
    "synth-ood-vae": paper(0.7794, 0.1973, 0.3336, 0.1608, 0.2260),
    "synth-ood-planrec": paper(0.8266, 0.2483, 0.4101, 0.1970, 0.2749),
    "ml-iid-vae": paper(0.8469, 0.3554, 0.5296, 0.2729, 0.3575),
    "ml-iid-planrec": paper(0.8439, 0.3757, 0.5504, 0.2900, 0.3750),
    "ml-ood-vae": paper(0.8178, 0.2793, 0.4448, 0.2120, 0.2923),
    "ml-ood-planrec": paper(0.8380, 0.3290, 0.5028, 0.2506, 0.3350),
}
PAPER_TABLE2_P = {"ndcg@10": 1.97e-4, "recall@10": 2.07e-4}   # PlanRec vs CVAE, two-sided
PAPER_FIGURE3_T = (26.17, 9.45e-143)                           # consistency, activeness > 0.6 vs <= 0.6
PAPER_FIGURE4_GENRES = (10, 13)                               # genres where male and female users differ, of all

# ------------------------------------------------------------------------------------------------
# The runs: which configurations exist, where their folders live, training them through train.py
# ------------------------------------------------------------------------------------------------

# Configurations on the real dataset: key suffix -> (train.py flags, what it is).
MAIN_CONFIGS = {
    "planrec": ((), "PlanRec, train.py defaults (N_m = 8)"),
    "vae": (("--preset", "vae_base"), "VAE base (no structure)"),
    "ssl": (("--preset", "ssl"), "+SSL (shared structure)"),
    "psl": (("--preset", "psl"), "+PSL (personalized, N_m = 1)"),
    "nm2": (("--n-mask-samples", "2"), "PlanRec with N_m = 2"),
    "nm4": (("--n-mask-samples", "4"), "PlanRec with N_m = 4"),
    "no-regs": (("--preset", "no_regs"), "PlanRec without RecR, AcyR, DepR"),
    "recr": (("--preset", "recr"), "+RecR"),
    "recr-acyr": (("--preset", "recr_acyr"), "+RecR +AcyR"),
    "no-u2i": (("--preset", "no_u2i"), "w/o u2i (u2i and i2u blocks of A zero)"),
    "no-u2u-i2i": (("--preset", "no_u2u_i2i"), "w/o u2u & i2i"),
    "vae-ui": (("--preset", "vae_base", "--attribute-prior", "both"), "VAE base with the attribute prior"),
    "planrec-u": (("--attribute-prior", "user"), "PlanRec, user attributes tied"),
    "planrec-i": (("--attribute-prior", "item"), "PlanRec, item attributes tied"),
    "planrec-ui": (("--attribute-prior", "both"), "PlanRec, user and item attributes tied"),
    # Table 4(b): two datasets of users split by interest consistency, each re-split in halves
    **{f"{model}-{group}-halves": (flags + ("--protocol", "halves", "--users", group),
                                   f"{what}, {group.upper()} users, first half trains, second half tests")
       for group in ("iid", "ood")
       for model, flags, what in (("vae", ("--preset", "vae_base"), "VAE base"), ("planrec", (), "PlanRec"))},
}
EXPORTED = {"planrec-ui"}    # runs whose structures.npz (shared A, keep probabilities) is needed

# Issue 19, what holds the paper's stated settings at the popularity level: those settings spelled
# out as flags, one group per value where our default differs (what --paper-settings applies; a test
# checks that they give its Config and optimizer), so that each group can be moved to our default
# alone. Group -> (the paper's flags, the paper's value, our default).
PAPER_SETTING_GROUPS = {
    "optimizer": (("--optimizer", "adagrad"), "Adagrad", "Adam (both lr 0.01)"),
    "loss-weights": (("--set", "w_reconstruct=1", "--set", "w_kl=1", "--set", "w_struct=1", "--set", "w_dag=1"),
                     "1 on every term of Eq. (18)", "0.1 on the reconstruction, KL, L_struct and L_dag"),
    "embedding": (("--set", "embed_dim=8"), "8", "16"),
    "encoder": (("--set", "encoder=paper"), "the paper's (history and target together, per candidate)",
                "ours (target attention, each sequence encoded once)"),
    "mask-input": (("--set", "mask_input=id"), "the user's ID embedding", "ID embedding + history summary"),
}


def paper_settings_flags(moved=None):
    """train.py flags of the paper's stated settings, with the group `moved` left at our default."""
    return tuple(flag for group, (flags, *_) in PAPER_SETTING_GROUPS.items() if group != moved for flag in flags)


MAIN_CONFIGS["paper-settings"] = (paper_settings_flags(), "the paper's stated settings (= --paper-settings)")
MAIN_CONFIGS.update({f"paper-settings-our-{group}": (paper_settings_flags(group), f"the paper's settings with our {group}")
                     for group in PAPER_SETTING_GROUPS})

# Configurations on the synthetic world: key -> (world, train.py flags, what it is).
SR_FLAGS = ("--attribute-prior", "both", "--drop-dependencies", "i2u")
SYNTHETIC_CONFIGS = {
    "synth-iid-vae": ("synthetic", ("--preset", "vae_base"), "Base (VAE), IID world"),
    "synth-iid-planrec": ("synthetic", (), "PlanRec, IID world"),
    "synth-ood-vae": ("synthetic-ood", ("--preset", "vae_base"), "Base (VAE), purchasing power shifted at test"),
    "synth-ood-planrec": ("synthetic-ood", (), "PlanRec, purchasing power shifted at test"),
    "synth-sr-main": ("synthetic", SR_FLAGS, "heads on e-hat (paper), attribute prior, i2u prior"),
    "synth-sr-heads-both": ("synthetic", SR_FLAGS + ("--preset", "heads_on_e_and_e_hat"),
                            "heads on [e ; e-hat] (ours), attribute prior, i2u prior"),
    "synth-sr-no-i2u": ("synthetic", ("--attribute-prior", "both"), "without the i2u direction prior"),
    "synth-sr-tie-all": ("synthetic", SR_FLAGS + ("--tie-private",), "all attributes tied (power, price too)"),
    "synth-sr-strong": ("synthetic-strong", SR_FLAGS, "stronger world: edge weights (3, 3, 2) (ours)"),
    "synth-sr-personal-struct": ("synthetic", SR_FLAGS + ("--set", "w_personal_struct=1.0"),
                                 "ours: Eq. (9) on the personalized structures too (weight 1), attribute prior, i2u prior"),
}
# The worlds: folder name under --synthetic-dir -> make_synthetic keyword arguments (default sizes).
WORLDS = {"synthetic": {}, "synthetic-ood": {"ood_shift": True}, "synthetic-strong": {"edge_weights": (3, 3, 2)}}
# Which train.py --data loads each world.
WORLD_DATA = {"synthetic": "synthetic", "synthetic-ood": "synthetic-ood", "synthetic-strong": "synthetic"}


@dataclass(frozen=True)
class RunSpec:
    key: str                 # folder name without the seed, e.g. "ml-1m-planrec"; --reuse-run names it
    data: str                # train.py --data
    data_dir: str | None     # train.py --data-dir
    flags: tuple             # train.py flags of the configuration
    kind: str                # "main" or "synthetic": which budget applies
    what: str
    export: bool = False     # also write structures.npz (analysis.diagnostics.export_structures)


@dataclass
class Setup:
    out: Path
    budget: str
    seeds: list
    ledger: Path = ledger.LEDGER
    from_ledger: bool = False                     # never train: every run must have a current record
    data: str = "ml-1m"
    data_dir: str | None = None
    synthetic_dir: Path | None = None
    train_args: list = field(default_factory=list)
    reuse: dict = field(default_factory=dict)     # run key -> folder pattern with {seed}
    permutations: int = MIN_PERMUTATIONS
    # structure recovery's drawn worlds (issue 20): the first world's seed (training seed k of --seeds
    # gets world seed world_seed + k), their size and edge strengths, and the rows to run
    world_seed: int = 0
    world_users: int = 5000
    world_items: int = 1000
    edge_scale: float = 1.0
    edge_strengths: tuple = (0.5, 2.0)
    sr_rows: tuple = ()
    sr_extra: tuple = ()       # train.py flags appended to every row's own (tuning: --epochs 6, --set ...)
    command: str = ""

    def main_spec(self, suffix):
        flags, what = MAIN_CONFIGS[suffix]
        return RunSpec(f"{self.data}-{suffix}", self.data, self.data_dir, flags, "main", what, suffix in EXPORTED)

    def world_dir(self, world):
        return str((self.synthetic_dir or self.out / "data") / world)

    def synthetic_spec(self, key):
        world, flags, what = SYNTHETIC_CONFIGS[key]
        return RunSpec(key, WORLD_DATA[world], self.world_dir(world), flags, "synthetic", what,
                       export=key.startswith("synth-sr-"))

    def folder(self, spec, seed):
        if spec.key in self.reuse:
            return Path(self.reuse[spec.key].format(seed=seed))
        return self.out / "runs" / f"{spec.key}-seed{seed}"

    def train_argv(self, spec, seed):
        # Budget first, then --train-args, then the configuration's own flags, so that a
        # configuration's defining flags (e.g. N_m) always win.
        argv = ["--data", spec.data, "--seed", str(seed), "--out", str(self.folder(spec, seed))]
        if spec.data_dir:
            argv += ["--data-dir", spec.data_dir]
        return argv + list(BUDGETS[self.budget][spec.kind]) + list(self.train_args) + list(spec.flags)


def ensure_world(setup, world):
    """Generate the synthetic world (default sizes) unless its folder holds one made the same way."""
    folder = Path(setup.world_dir(world))
    wanted = WORLDS[world]
    if not (folder / "ground_truth.npz").is_file():
        make_synthetic(folder, **wanted)
        return
    made = json.loads(str(load_ground_truth(folder)["params"]))
    expected = {"ood_shift": wanted.get("ood_shift", False),
                "edge_weights": list(wanted.get("edge_weights", (1.5, 1.5, 1.0)))}
    differing = {k: (made.get(k), v) for k, v in expected.items() if made.get(k) != v}
    if differing:
        sys.exit(f"error: {folder} holds a synthetic world made with other settings (stored, wanted) "
                 f"{differing}; delete it or pass another --synthetic-dir")


@lru_cache(maxsize=None)
def load_data(name, data_dir, options="{}"):
    return train.load_data(name, data_dir, json.loads(options))


# What must agree for a finished run folder to count as this configuration. The budget keys only
# for our own folders: a --reuse-run folder may come from another budget (the report says which).
TRAINING_KEYS = ("data", "seed", "optimizer", "lr", "batch_size", "negatives", "paper_settings", "tie_private")
BUDGET_KEYS = ("epochs", "max_steps", "patience")


def wanted_run(setup, spec, seed):
    """(train.py args, data, Config dict) of one run as this invocation would train it."""
    args = train.parse_args(setup.train_argv(spec, seed))
    data = load_data(spec.data, spec.data_dir, json.dumps(train.data_options(args), sort_keys=True))
    return args, data, ledger.plain(train.model_config(args, data).to_dict())


def budget_of(spec, args):
    """The budget whose flags a run's args (a dict) have, else 'own flags'."""
    for name, flags in BUDGETS.items():
        budget = train.parse_args(["--data", args["data"], *flags[spec.kind]])
        if all(args.get(k) == getattr(budget, k) for k in BUDGET_KEYS):
            return name
    return "own flags"


def run_identity(setup, spec, seed, stored_args=None, stored_config=None):
    """The ledger identity of one run: as this invocation would train it, or of a finished folder's
    own args and Config (a --reuse-run folder keeps its own budget)."""
    args, data, config = wanted_run(setup, spec, seed)
    if stored_args is None:
        return ledger.identity(vars(args), config, ledger.data_fingerprint(data), setup.budget)
    budget = budget_of(spec, stored_args) if spec.key in setup.reuse else setup.budget
    return ledger.identity(stored_args, stored_config, ledger.data_fingerprint(data), budget)


def same_model(ident, wanted):
    """Does a record count for a --reuse-run key: same Config, data and TRAINING_KEYS, any budget."""
    return (ledger.fill_config(ident["config"]) == wanted["config"] and ident["data"] == wanted["data"]
            and all(ident["args"].get(k) == wanted["args"].get(k) for k in TRAINING_KEYS))


def check_finished_run(setup, spec, seed, folder):
    stored = json.loads((folder / "metrics.json").read_text())
    args, _, config = wanted_run(setup, spec, seed)
    keys = TRAINING_KEYS + (() if spec.key in setup.reuse else BUDGET_KEYS)
    differing = {k: (stored["config"][k], v) for k, v in config.items() if k in stored["config"] and stored["config"][k] != v}
    differing.update({k: (stored["args"][k], getattr(args, k)) for k in keys
                      if k in stored["args"] and stored["args"][k] != getattr(args, k)})
    if differing:
        sys.exit(f"error: {folder} holds a run of another configuration than {spec.key} seed {seed} "
                 f"(setting: (stored, wanted)) {differing}; delete the folder, use another --out, or fix --reuse-run")
    return stored


def run_state(setup, spec, seed, code):
    """What this invocation does with one run: (state, Record or None, what to say). States:
    ledger      a current record (for a --reuse-run key: of the same model, any budget, unless its
                folder holds another finished run): read it, train nothing
    missing     (--from-ledger) no record;  stale: the record's model code differs from today's
                (--from-ledger: missing; else its folder, where it came from it, is trained anew)
    record      a finished run folder without a current record: check it and record it
    resume, new train (train.py --resume, or from scratch), then record
    UNFINISHED  a --reuse-run folder without metrics.json: stops the invocation"""
    folder = setup.folder(spec, seed)
    reused = spec.key in setup.reuse
    wanted = run_identity(setup, spec, seed)
    state, record = ledger.lookup(setup.ledger, spec.key, seed,
                                  (lambda i: same_model(i, wanted)) if reused else (lambda i: ledger.same_identity(i, wanted)),
                                  code)
    finished = (folder / "metrics.json").is_file()
    same_run = finished and record is not None and record.meta["metrics_sha256"] == ledger.file_sha(folder / "metrics.json")
    stale = f"STALE: {', '.join(ledger.code_differences(record.meta['code'], code))} differ" if state == "stale" else ""
    if state == "current" and (setup.from_ledger or not reused or not finished or same_run):
        return "ledger", record, record.name
    if setup.from_ledger:
        return ("stale" if state == "stale" else "missing"), record, f"{spec.key} seed {seed}: {stale or 'no record'}"
    if state == "stale" and same_run:
        if reused:
            sys.exit(f"error: --reuse-run {spec.key}: {folder} is the run of {record.name}, whose model code differs from "
                     f"today's ({stale}); retrain it or drop --reuse-run")
        return "stale", record, f"{folder} ({stale}: trained anew)"
    if finished:
        return "record", None, str(folder)
    if reused:
        return "UNFINISHED", None, f"{folder} (--reuse-run: stops the run)"
    return ("resume" if (folder / "last.pt").is_file() else "new"), None, str(folder)


def ensure_record(setup, spec, seed, code, command):
    """The current ledger record of one run, training or recording it first where needed (see
    run_state); (None, why) under --from-ledger when there is none."""
    state, record, detail = run_state(setup, spec, seed, code)
    if state == "ledger":
        return record, None
    if state in ("missing", "stale") and setup.from_ledger:
        return None, detail
    folder = setup.folder(spec, seed)
    if state == "UNFINISHED":
        sys.exit(f"error: --reuse-run {spec.key}: {folder} has no metrics.json (not finished?); "
                 "let the run finish or drop --reuse-run")
    if state == "stale":            # the folder holds the stale run: start it again from scratch
        for name in ("metrics.json", "test_scores.npz", "structures.npz", "last.pt", "best.pt"):
            (folder / name).unlink(missing_ok=True)
    provenance = ensure_run(setup, spec, seed)
    stored = json.loads((folder / "metrics.json").read_text())
    argv = setup.train_argv(spec, seed)
    ident = run_identity(setup, spec, seed, ledger.plain(stored["args"]), stored["config"])
    train_command = "python train.py " + shlex.join(argv) if provenance != "folder" else None
    return ledger.record_run(setup.ledger, spec.key, seed, ident, folder, spec.export, provenance, code,
                             {"experiments": command, "train": train_command},
                             {"what": spec.what, "kind": spec.kind}), None


def ensure_run(setup, spec, seed):
    """Train, resume or check one run folder; make sure it holds test_scores.npz (and structures.npz
    where needed). Returns how it was finished: 'trained', 'resumed' or 'folder' (before)."""
    folder = setup.folder(spec, seed)
    if (folder / "metrics.json").is_file():
        check_finished_run(setup, spec, seed, folder)
        provenance = "folder"
    else:
        resume = (folder / "last.pt").is_file()
        train.main(setup.train_argv(spec, seed) + (["--resume"] if resume else []))
        provenance = "resumed" if resume else "trained"
    if not (folder / "test_scores.npz").is_file():
        write_test_scores(folder, spec.data_dir)      # folders from before train.py wrote them
    if spec.export and not (folder / "structures.npz").is_file():
        model, data, ckpt, _, device = load_trained(folder, spec.data_dir)
        diagnostics.export_structures(model, data, device, folder, seed=ckpt["seed"])
    return provenance


def load_trained(folder, data_dir):
    """The best checkpoint of a run folder as train.py's eval-only path loads it:
    (model, data, ckpt, attributes, device)."""
    path = Path(folder) / "best.pt"
    if not path.is_file():
        sys.exit(f"error: {path} not found; is {folder} a run folder of train.py?")
    device = train.pick_device("auto")
    kernels, _ = train.pick_kernels("auto", device)
    return (*train.load_trained(path, data_dir, kernels, device), device)


def write_test_scores(folder, data_dir):
    """test_scores.npz as train.main writes it, from the folder's best.pt."""
    model, data, ckpt, attributes, device = load_trained(folder, data_dir)
    train.write_test_scores(folder, data, train.evaluate(model, data, "test", device, ckpt["seed"], attributes)[1])


class Runs:
    """The ledger records of one invocation: run key -> [Record per seed, in the order of --seeds]."""

    def __init__(self, setup, records):
        self.setup, self.records, self._per_user = setup, records, {}

    def __getitem__(self, key):
        if key not in self.records:
            raise KeyError(f"run {key} is not among the runs of this invocation")
        return self.records[key]

    def per_user(self, key):
        """[(user_ids, data.per_user_metrics of the test scores)] per seed, computed once per key
        (tables, claims and the grouping of --runs all read them)."""
        if key not in self._per_user:
            self._per_user[key] = [(r.arrays["user_ids"], r.per_user_metrics()) for r in self[key]]
        return self._per_user[key]

    def uncertainty(self, key):
        """[per-user test uncertainty [U]] per seed."""
        return [r.arrays["test_uncertainty"] for r in self[key]]

    def structures(self, key):
        return [r.structure() for r in self[key]]

    def metrics(self, key):
        """[metrics.json of the run] per seed."""
        return [r.meta["metrics"] for r in self[key]]

    def names(self, key):
        return [r.name for r in self[key]]

    def budget(self, key):
        return "/".join(sorted({r.meta["budget"] for r in self[key]}))

    def smoke_test(self, keys):
        """Is anything built from these runs a smoke test (this invocation's budget, or a record's)?"""
        return self.setup.budget == SMOKE_TEST or any(r.meta["smoke_test"] for k in keys for r in self[k])

    def training(self, key):
        """How the run was trained, from its own metrics.json: epochs run, step cap, wall time."""
        runs = self.metrics(key)
        args = runs[0]["args"]
        epochs = sorted({len(r["epochs"]) for r in runs})
        steps = f", max {args['max_steps']} steps/epoch" if args.get("max_steps") else ""
        wall = np.mean([ledger.run_seconds(r) or np.nan for r in runs])
        smoke = "; smoke test" if self.smoke_test([key]) else ""
        return f"{'/'.join(map(str, epochs))} of {args['epochs']} epochs{steps}; {wall:.0f} s{smoke}"


# ------------------------------------------------------------------------------------------------
# Statistics (scipy.stats; these wrappers only fix the conventions the reports rely on)
# ------------------------------------------------------------------------------------------------

def sign_flip_test(a, b, n_permutations=MIN_PERMUTATIONS, seed=0, batch=1000):
    """Two-sided paired sign-flip permutation test of mean(a - b) = 0 over users.

    The null distribution is mean(s * d) over n_permutations vectors s of independent random signs
    per user, d = a - b (a Monte Carlo test, so p carries Monte Carlo error of about
    sqrt(p (1 - p) / n_permutations)). Two-sided p is twice the smaller one-sided p, each
    (1 + #{null at least as extreme}) / (1 + n_permutations), capped at 1, so the smallest
    attainable p is 2 / (1 + n_permutations). The differences are sorted first, so for a given seed
    p depends only on their multiset: exactly invariant to the order of the users.

    scipy.stats.monte_carlo_test draws the sign-flipped samples s * |d| as its null (the same null as
    permutation_test(permutation_type="samples"), whose per-batch Python loop over users took about
    6 s for 6,040 users and 10,000 permutations, against 0.5 s here: issue 19's 2-minute rebuild).
    When 2**n_users <= n_permutations, permutation_test enumerates every sign vector instead: exact."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"sign_flip_test needs two paired 1-D arrays of one length, got {a.shape} and {b.shape}")
    d = np.sort(a - b)
    rng = np.random.default_rng(seed)
    if len(d) < 64 and 2 ** len(d) <= n_permutations:
        result = stats.permutation_test((d,), np.mean, permutation_type="samples", vectorized=True,
                                        n_resamples=n_permutations, batch=batch, alternative="two-sided", rng=rng)
        return float(result.pvalue)
    magnitude = np.abs(d)
    flipped = lambda size: np.where(rng.random(size) < 0.5, -magnitude, magnitude)
    result = stats.monte_carlo_test(d, flipped, lambda x, axis: x.mean(axis), vectorized=True,
                                    n_resamples=n_permutations, batch=batch, alternative="two-sided")
    return float(result.pvalue)


def correlation(x, y, rank=False):
    """Pearson r (Spearman's with rank=True) and its two-sided p-value (t with n - 2 df); nan for
    fewer than 3 points or a constant input."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan"), float("nan")
    result = stats.spearmanr(x, y) if rank else stats.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)


def welch_t_test(x, y):
    """Welch's two-sided t-test (unequal variances) of mean(x) = mean(y): (t, df, p); nan with fewer
    than 2 values in a group or no variance in either. The two-group case of welch_contrast_test."""
    return welch_contrast_test([x, y], (1, -1))


def welch_contrast_test(groups, weights):
    """Welch's two-sided test of sum_i w_i mean(group_i) = 0 with unequal variances: t = contrast /
    sqrt(sum w_i^2 s_i^2 / n_i), Welch-Satterthwaite degrees of freedom; (t, df, p); with two groups
    and weights (1, -1), scipy's ttest_ind(equal_var=False). nan with fewer than 2 values in a group
    or no variance."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups]
    if any(len(g) < 2 for g in groups):
        return float("nan"), float("nan"), float("nan")
    terms = np.array([w * w * g.var(ddof=1) / len(g) for g, w in zip(groups, weights)])
    if terms.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    t = sum(w * g.mean() for g, w in zip(groups, weights)) / np.sqrt(terms.sum())
    df = terms.sum() ** 2 / sum(v * v / (len(g) - 1) for v, g in zip(terms, groups))
    return float(t), float(df), float(2 * stats.t.sf(abs(t), df))


def roc_auc(scores, labels):
    """ROC AUC = U / (n_pos n_neg), U the Mann-Whitney statistic of the positives' scores (ties
    count one half); nan without both classes."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    u = stats.mannwhitneyu(scores[labels], scores[~labels], alternative="two-sided", method="asymptotic").statistic
    return float(u / (n_pos * n_neg))


def min_max(x):
    x = np.asarray(x, dtype=np.float64)
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


# ------------------------------------------------------------------------------------------------
# Tables: rows of runs, metrics over seeds, permutation tests, Markdown and CSV
# ------------------------------------------------------------------------------------------------

@dataclass
class Row:
    label: str
    run: str | None                 # run key; None for the popularity baseline
    paper: dict | None = None
    compare: tuple = ()             # labels of the rows it is tested against
    paper_p: dict | None = None     # the paper's p-values where it gives them


def table(setup, runs, rows, data=None, users=None, test_seed=0):
    """Metrics of each row (mean, min, max over seeds) on the users selected by the boolean mask
    `users` (all by default), and p-values of the paired sign-flip test against its comparison row
    on the per-user metrics averaged over seeds (our choice: one test over users, seeds averaged)."""
    built, per_user = [], {}
    for row in rows:
        if row.run is None:
            stored = [(data.raw_user_ids, datalib.per_user_metrics(datalib.popularity_scores(data, "test")))]
            training, records, seeds, budget = "training-set counts", [], [], None
        else:
            stored = runs.per_user(row.run)
            training, records, seeds, budget = runs.training(row.run), runs.names(row.run), list(setup.seeds), runs.budget(row.run)
        user_ids = [u for u, _ in stored]
        if any(not np.array_equal(u, user_ids[0]) for u in user_ids) or (per_user and not np.array_equal(
                user_ids[0], next(iter(per_user.values()))[1])):
            sys.exit(f"error: row {row.label}: its runs score other users than the table's other rows; "
                     "were they trained on other data?")
        mask = np.ones(len(user_ids[0]), dtype=bool) if users is None else users
        per_seed = [{m: float(values[m][mask].mean()) for m in METRICS} for _, values in stored]
        metrics = {m: {"mean": float(np.mean([p[m] for p in per_seed])), "min": float(min(p[m] for p in per_seed)),
                       "max": float(max(p[m] for p in per_seed)), "per_seed": [p[m] for p in per_seed]}
                   for m in METRICS}
        tested = {m: np.mean([values[m][mask] for _, values in stored], axis=0) for m in TESTED}
        per_user[row.label] = (tested, user_ids[0])
        compare = (row.compare,) if isinstance(row.compare, str) else tuple(row.compare)
        entry = {"label": row.label, "run": row.run, "seeds": seeds, "budget": budget,
                 "smoke_test": bool(row.run and runs.smoke_test([row.run])), "records": records,
                 "training": training, "n_users": int(mask.sum()), "metrics": metrics, "paper": row.paper,
                 "compared_with": list(compare),
                 "p_values": {other: {m: sign_flip_test(tested[m], per_user[other][0][m], setup.permutations, seed=test_seed)
                                      for m in TESTED} for other in compare},
                 "paper_p_values": row.paper_p}
        built.append(entry)
    return built


def fmt_p(p):
    return "—" if p is None or not np.isfinite(p) else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def delta_text(rows_by_label, row, other, metric="ndcg@10"):
    """'+0.0123 / +0.0668': the row minus the row `other`, ours beside the paper's."""
    base = rows_by_label[other]
    ours = row["metrics"][metric]["mean"] - base["metrics"][metric]["mean"]
    theirs = f"{row['paper'][metric] - base['paper'][metric]:+.4f}" if row["paper"] and base["paper"] else "—"
    return f"{ours:+.4f} / {theirs}"


def markdown_table(title, rows):
    by_label = {r["label"]: r for r in rows}
    head = ["row", *(LABELS[m] for m in METRICS), "vs", "ΔN@10 ours / paper", "p N@10", "p R@10", "training"]
    smoke = "SMOKE TEST (quick budget), not a result: " if any(r["smoke_test"] for r in rows) else ""
    lines = [f"**{smoke}{title}** (ours: mean over seeds, min-max in brackets; the paper's row below in italics)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n_seeds = len(r["seeds"]) or 1
        cells = [f"{r['label']} ({n_seeds} seed{'s' if n_seeds > 1 else ''}, {r['n_users']} users)"]
        for m in METRICS:
            v = r["metrics"][m]
            cells.append(f"{v['mean']:.4f}" + (f" [{v['min']:.4f}-{v['max']:.4f}]" if n_seeds > 1 else ""))
        others = r["compared_with"]
        cells += ["<br>".join(others), "<br>".join(delta_text(by_label, r, o) for o in others)]
        cells += ["<br>".join(fmt_p(r["p_values"][o][m]) for o in others) for m in TESTED]
        cells.append(r["training"])
        lines.append("| " + " | ".join(cells) + " |")
        if r["paper"]:
            pp = r["paper_p_values"] or {}
            lines.append("| " + " | ".join([f"*{r['label']}, paper*"] + [f"*{r['paper'][m]:.4f}*" for m in METRICS]
                                           + ["*best baseline*" if pp else "", ""]
                                           + [f"*{fmt_p(pp.get(m))}*" if pp else "" for m in TESTED] + [""]) + " |")
    return "\n".join(lines)


# A claim of the paper (a row above another in one of its tables) holds here when our difference
# has the paper's sign at p < CLAIM_ALPHA (paired sign-flip test on per-user NDCG@10, two-sided);
# 0.05 and one test per claim, with no correction for the number of claims, are our choices.
CLAIM_ALPHA = 0.05


def claim_verdict(paper_delta, ours_delta, p, smoke):
    """'holds', 'does not hold' (significant, the other way or where the paper has no difference),
    'within noise' (p >= CLAIM_ALPHA), or 'not judged (smoke test)'."""
    if smoke:
        return "not judged (smoke test)"
    if p is None or not np.isfinite(p) or p >= CLAIM_ALPHA:
        return "within noise"
    return "holds" if np.sign(ours_delta) == np.sign(paper_delta) != 0 else "does not hold"


def table_claims(rows, table_name):
    """The paper's claims in one table: every comparison the table tests (a row and its "vs" row)
    where the paper has both rows, with the paper's difference of NDCG@10, ours, our p and the verdict.
    p_seeds, beside it, is Welch's two-sided t-test of the two rows' per-seed test NDCG@10 (None
    under 2 seeds a row): the per-user p averages each user over the seeds, so it does not see how far
    a retrained model moves; p_seeds does, with little power at 3 seeds. The verdict uses p alone.
    Welch (unpaired, unequal variances) is our choice: it assumes nothing of how seed k of one row
    relates to seed k of the other."""
    by_label = {r["label"]: r for r in rows}
    claims = []
    for r in rows:
        for other in r["compared_with"]:
            base = by_label[other]
            if not (r["paper"] and base["paper"]):
                continue
            paper_delta = r["paper"]["ndcg@10"] - base["paper"]["ndcg@10"]
            ours_delta = r["metrics"]["ndcg@10"]["mean"] - base["metrics"]["ndcg@10"]["mean"]
            p = r["p_values"][other]["ndcg@10"]
            smoke = r["smoke_test"] or base["smoke_test"]
            p_seeds = welch_t_test(r["metrics"]["ndcg@10"]["per_seed"], base["metrics"]["ndcg@10"]["per_seed"])[2]
            claims.append({"table": table_name, "row": r["label"], "vs": other, "metric": "ndcg@10",
                           "paper_delta": paper_delta, "ours_delta": ours_delta, "p": p,
                           "p_seeds": p_seeds if np.isfinite(p_seeds) else None,
                           "seeds": r["seeds"], "budget": r["budget"], "smoke_test": bool(smoke),
                           "verdict": claim_verdict(paper_delta, ours_delta, p, smoke)})
    return claims


def gap_claim(setup, runs, table_name, claim, left, right, paper_delta):
    """The paper's claim that `left` exceeds `right` (or falls below it: the sign of paper_delta),
    each a (run key, base run key or None): a gain over a base row, or a row's level. Ours is
    left - right of NDCG@10 (each a mean over seeds). p (users): the paired sign-flip test of the
    per-user left and right (averaged over seeds) where both score the same users, else Welch's test
    over the two groups of users (Table 4 (b): IID and OOD users are different people). p (seeds):
    Welch's contrast test of the per-seed NDCG@10 of the two to four rows. Our choices, as for the
    tables' claims."""
    def per_user(key):
        stored = runs.per_user(key)
        return stored[0][0], np.mean([values["ndcg@10"] for _, values in stored], axis=0)

    def side(terms):
        (users, values), base = per_user(terms[0]), terms[1] and per_user(terms[1])
        if base and not np.array_equal(users, base[0]):
            sys.exit(f"error: {table_name}: runs {terms[0]} and {terms[1]} score other users")
        return users, values - base[1] if base else values

    (left_users, x), (right_users, y) = side(left), side(right)
    paired = np.array_equal(left_users, right_users)
    p = sign_flip_test(x, y, setup.permutations) if paired else welch_t_test(x, y)[2]
    keys = [k for k in (*left, *right) if k]
    weights = [w for (k, w) in zip((*left, *right), (1, -1, -1, 1)) if k]
    per_seed = [[float(values["ndcg@10"].mean()) for _, values in runs.per_user(k)] for k in keys]
    p_seeds = welch_contrast_test(per_seed, weights)[2]
    ours, smoke = float(x.mean() - y.mean()), runs.smoke_test(keys)
    return {"table": table_name, "claim": claim, "paper_text": f"{paper_delta:+.4f}", "ours_text": f"{ours:+.4f}",
            "p": p, "p_seeds": p_seeds if np.isfinite(p_seeds) else None, "paired_users": bool(paired),
            "paper_delta": paper_delta, "ours_delta": ours, "seeds": list(setup.seeds),
            "budget": "/".join(sorted({runs.budget(k) for k in keys})), "smoke_test": smoke,
            "verdict": claim_verdict(paper_delta, ours, p, smoke)}


def claims_markdown(claims):
    lines = ["| table | claim (paper) | paper ΔN@10 | ours ΔN@10 | p (users) | p (seeds) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in claims:
        if "claim" in c:        # a claim outside a table of metrics (figure3): its own words and values
            lines.append(f"| {c['table']} | {c['claim']} | {c['paper_text']} | {c['ours_text']} | {fmt_p(c['p'])} | "
                         f"{fmt_p(c.get('p_seeds'))} | {c['verdict']} |")
            continue
        direction = ">" if c["paper_delta"] > 0 else "<" if c["paper_delta"] < 0 else "="
        lines.append(f"| {c['table']} | {c['row']} {direction} {c['vs']} | {c['paper_delta']:+.4f} | "
                     f"{c['ours_delta']:+.4f} | {fmt_p(c['p'])} | {fmt_p(c.get('p_seeds'))} | {c['verdict']} |")
    return "\n".join(lines)


def write_table_csv(path, rows):
    """One line per (row, source, comparison): ours with mean/min/max and each p-value, the paper's
    numbers on their own line."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "source", "n_seeds", "n_users"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "min", "max")]
                        + ["compared_with"] + [f"p_{m}" for m in TESTED] + ["training", "budget", "smoke_test"])
        for r in rows:
            stats = [r["metrics"][m][s] for m in METRICS for s in ("mean", "min", "max")]
            start = [r["label"], "ours", len(r["seeds"]) or 1, r["n_users"]]
            for other in r["compared_with"] or [""]:
                p = r["p_values"].get(other, {})
                writer.writerow(start + stats + [other] + [p.get(m, "") for m in TESTED]
                                + [r["training"], r["budget"] or "", r["smoke_test"]])
            if r["paper"]:
                pp = r["paper_p_values"] or {}
                writer.writerow([r["label"], "paper", "", ""] + [x for m in METRICS for x in (r["paper"][m], "", "")]
                                + ["best baseline" if pp else ""] + [pp.get(m, "") for m in TESTED] + ["", "", ""])


@dataclass
class Section:
    """What one experiment produces: its Markdown section, its numbers, its tables and figures."""
    markdown: str
    numbers: dict
    tables: dict = field(default_factory=dict)      # CSV file name -> table rows
    figures: list = field(default_factory=list)
    claims: list = field(default_factory=list)      # the paper's claims judged outside a table (claim_verdict)
    records: list = field(default_factory=list)     # (key, Record) of runs outside the experiment's run lists


# ------------------------------------------------------------------------------------------------
# The experiments, in the order of the paper
# ------------------------------------------------------------------------------------------------

def table2(setup, runs):
    data = load_data(setup.data, setup.data_dir)
    rows = table(setup, runs, [
        Row("VAE base", f"{setup.data}-vae", PAPER["vae"]),
        Row("popularity", None, None),
        Row("PlanRec", f"{setup.data}-planrec", PAPER["planrec"], compare=("VAE base", "popularity"),
            paper_p=PAPER_TABLE2_P)], data)
    text = (f"{markdown_table(f'Table 2 ({setup.data})', rows)}\n\n"
            "The paper tests PlanRec against its best baseline (CVAE: N@10 0.3648, R@10 0.5360; its p-values are "
            "in PlanRec's paper row); we have no CVAE and test PlanRec against our VAE base and the popularity "
            "baseline. The paper's VAE-base numbers are its Table 7 row \"VAE\"; it reports no popularity baseline.")
    return Section(text, {"rows": rows}, {"table2.csv": rows})


def table3(setup, runs):
    keys = {1: "psl", 2: "nm2", 4: "nm4", 8: "planrec"}
    rows = table(setup, runs, [Row(f"N_m = {n}", f"{setup.data}-{k}", PAPER[f"nm{n}" if n < 8 else "planrec"],
                                   compare=() if n == 1 else "N_m = 1") for n, k in keys.items()])
    text = (f"{markdown_table(f'Table 3 ({setup.data}): number of sampled structures N_m', rows)}\n\n"
            "Each N_m > 1 is tested against N_m = 1 (no uncertainty estimate), the comparison the paper draws. "
            "N_m = 1 is the +PSL run of Table 7 (same configuration).")
    return Section(text, {"rows": rows}, {"table3.csv": rows})


def table4(setup, runs):
    synthetic = table(setup, runs, [
        Row("IID Base", "synth-iid-vae", PAPER["synth-iid-vae"]),
        Row("IID PlanRec", "synth-iid-planrec", PAPER["synth-iid-planrec"], compare="IID Base"),
        Row("OOD Base", "synth-ood-vae", PAPER["synth-ood-vae"]),
        Row("OOD PlanRec", "synth-ood-planrec", PAPER["synth-ood-planrec"], compare="OOD Base")])
    data = load_data(setup.data, setup.data_dir)
    consistency = datalib.interest_consistency(data.item_seq, data.user_offsets, data.item_attrs["genres"])
    ood = consistency < consistency.mean()
    d = setup.data
    real = table(setup, runs, [
        Row("IID Base", f"{d}-vae-iid-halves", PAPER["ml-iid-vae"]),
        Row("IID PlanRec", f"{d}-planrec-iid-halves", PAPER["ml-iid-planrec"], compare="IID Base")])
    real += table(setup, runs, [
        Row("OOD Base", f"{d}-vae-ood-halves", PAPER["ml-ood-vae"]),
        Row("OOD PlanRec", f"{d}-planrec-ood-halves", PAPER["ml-ood-planrec"], compare="OOD Base")])
    text = (f"{markdown_table('Table 4 (a): synthetic world, IID vs purchasing power shifted at test (OOD)', synthetic)}\n\n"
            f"{markdown_table(f'Table 4 (b): {d} users split by interest consistency, each group its own dataset', real)}\n\n"
            "(a) Base = the VAE base. Each world is trained and tested on its own (`--data synthetic` and "
            "`--data synthetic-ood`, generated with the same seed: they differ only in each user's test item, "
            "drawn under a changed purchasing power in the OOD world).\n\n"
            f"(b) As section 3.3.2: interest consistency per user = 1 - I(H; C) / log 2 over the whole sequence "
            f"split in the middle (`data.interest_consistency`; our reading of \"the mutual information of these "
            f"two distributions\"). Users below the mean ({consistency.mean():.3f}) form the OOD dataset "
            f"({int(ood.sum())} users), the rest the IID dataset ({int((~ood).sum())}); each dataset is trained "
            "and tested on its own (`train.py --protocol halves --users iid|ood`): the first half of each user's "
            "behaviours trains, the second half tests. **Our choice where the paper is vague:** one ranking per "
            "user, the last item of the second half against 100 sampled negatives with the 50 items before it "
            "as history; the validation item (model selection) is the last item of the first half, and no "
            "second-half item is ever a training target. Numbers are not comparable with Table 2's: fewer "
            "users, half the training data, and a test item far from the training part.")
    # The paper's claims across the IID and OOD columns (section 3.3.2): both models do worse in OOD,
    # and PlanRec's gain over Base is larger in OOD than in IID.
    claims = []
    for part, run_key, paper_key in (("table4_synthetic", "synth-{split}-{model}", "synth-{split}-{model}"),
                                     ("table4_real", d + "-{model}-{split}-halves", "ml-{split}-{model}")):
        run = lambda split, model: run_key.format(split=split, model=model)
        n10 = lambda split, model: PAPER[paper_key.format(split=split, model=model)]["ndcg@10"]
        for model, label in (("vae", "Base"), ("planrec", "PlanRec")):
            claims.append(gap_claim(setup, runs, part, f"OOD {label} < IID {label}", (run("ood", model), None),
                                    (run("iid", model), None), n10("ood", model) - n10("iid", model)))
        gain = lambda split: n10(split, "planrec") - n10(split, "vae")
        claims.append(gap_claim(setup, runs, part, "PlanRec's gain over Base: OOD > IID",
                                (run("ood", "planrec"), run("ood", "vae")), (run("iid", "planrec"), run("iid", "vae")),
                                gain("ood") - gain("iid")))
    text += ("\n\nThe claims across the columns (both models do worse in OOD; PlanRec gains more over Base in OOD "
             "than in IID) are tested on the per-user NDCG@10: paired over users in the synthetic worlds (the "
             "same users), Welch's test over the two groups of users on ML-1M (other users); the gain is a "
             "user's PlanRec minus Base NDCG@10.")
    numbers = {"synthetic": synthetic, "real": real, "consistency_mean": float(consistency.mean()),
               "n_ood": int(ood.sum()), "n_iid": int((~ood).sum())}
    return Section(text, numbers, {"table4_synthetic.csv": synthetic, "table4_real.csv": real}, claims=claims)


def table5(setup, runs):
    d = setup.data
    rows = table(setup, runs, [
        Row("Base", f"{d}-vae", PAPER["vae"]),
        Row("Base w. ui", f"{d}-vae-ui", PAPER["vae-ui"], compare="Base"),
        Row("PlanRec", f"{d}-planrec", PAPER["planrec"], compare="Base"),
        Row("PlanRec w. u", f"{d}-planrec-u", PAPER["planrec-u"], compare="PlanRec"),
        Row("PlanRec w. i", f"{d}-planrec-i", PAPER["planrec-i"], compare="PlanRec"),
        Row("PlanRec w. ui", f"{d}-planrec-ui", PAPER["planrec-ui"], compare="PlanRec")])
    def mean_attributes(key):         # how well the tied factors carry their attributes, mean over seeds
        per_seed = [m["test"].get("attributes", {}) for m in runs.metrics(key)]
        return {name: {k: float(np.mean([p[name][k] for p in per_seed])) for k in values}
                for name, values in per_seed[0].items()}

    attributes = {r: mean_attributes(f"{d}-{k}") for r, k in (("Base w. ui", "vae-ui"), ("PlanRec w. ui", "planrec-ui"))}
    seeds = f"mean over seeds {', '.join(map(str, setup.seeds))}" if len(setup.seeds) > 1 else f"seed {setup.seeds[0]}"
    lines = [f"- {row}, {seeds}: " + "; ".join(
        f"{name} " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()) for name, values in attrs.items())
        for row, attrs in attributes.items()]
    text = (f"{markdown_table(f'Table 5 ({d}): disentanglement with the attribute prior', rows)}\n\n"
            "w. u / w. i / w. ui = `--attribute-prior user / item / both`: a linear predictor on factor k learns "
            "the k-th attribute of its side (classes, multi-label genres, regression for ordered values). "
            "How well the tied factors carry their attributes on the test split (beside the majority / "
            "all-zero / mean baselines):\n\n" + "\n".join(lines))
    # The paper's second finding: the attributes help the Base more than they help PlanRec.
    n10 = lambda key: PAPER[key]["ndcg@10"]
    claims = [gap_claim(setup, runs, "table5", "gain of w. ui: Base's > PlanRec's", (f"{d}-vae-ui", f"{d}-vae"),
                        (f"{d}-planrec-ui", f"{d}-planrec"),
                        (n10("vae-ui") - n10("vae")) - (n10("planrec-ui") - n10("planrec")))]
    text += ("\n\nThe paper's finding that the attributes help the Base more than PlanRec is tested on the "
             "per-user gains (w. ui minus its model, NDCG@10), paired over users.")
    return Section(text, {"rows": rows, "attributes": attributes}, {"table5.csv": rows}, claims=claims)


def table6(setup, runs):
    d = setup.data
    rows = table(setup, runs, [
        Row("PlanRec", f"{d}-planrec", PAPER["planrec"]),
        Row("w/o u2i", f"{d}-no-u2i", PAPER["no-u2i"], compare="PlanRec"),
        # the paper's second claim ("removing u2i leads to a larger drop than removing u2u or i2i") is the
        # comparison of the two ablations with each other
        Row("w/o u2u & i2i", f"{d}-no-u2u-i2i", PAPER["no-u2u-i2i"], compare=("PlanRec", "w/o u2i"))])
    text = (f"{markdown_table(f'Table 6 ({d}): blocked dependencies', rows)}\n\n"
            "w/o u2i blocks both directions between user-side and item-side factors (`--preset no_u2i`: u2i,i2u); "
            "w/o u2u & i2i blocks the within-side dependencies (`--preset no_u2u_i2i`). Blocked entries of A are "
            "exactly zero and never in a mask; K_A is clipped to the allowed entries. Each ablation is tested "
            "against PlanRec (the paper: removing either kind of dependency costs accuracy), and w/o u2u & i2i "
            "against w/o u2i (the paper: removing u2i costs more).")
    return Section(text, {"rows": rows}, {"table6.csv": rows})


CUMULATIVE_NOTE = "Each row is tested against the row before it (the cumulative step it adds)."


def cumulative_table(setup, runs, name, title, part, steps, after):
    """Tables 7 and 8: steps [(label, run key, paper key)] added in turn, each row tested against
    the row before it; the rows are stored under `part`."""
    d = setup.data
    rows = table(setup, runs, [Row(label, f"{d}-{key}", PAPER[paper], compare=steps[k - 1][0] if k else ())
                               for k, (label, key, paper) in enumerate(steps)])
    text = f"{markdown_table(f'{title} ({d}): {part} added cumulatively', rows)}\n\n{CUMULATIVE_NOTE} {after}"
    return Section(text, {part: rows}, {f"{name}.csv": rows})


def table7(setup, runs):
    return cumulative_table(setup, runs, "table7", "Table 7", "components", [
        ("VAE", "vae", "vae"), ("+SSL", "ssl", "ssl"), ("+PSL", "psl", "psl"), ("+Uncer", "planrec", "planrec")],
        "+PSL samples one structure (N_m = 1); +Uncer is the full model (`planrec.PRESETS`: vae_base, ssl, psl, full).")


def table8(setup, runs):
    return cumulative_table(setup, runs, "table8", "Table 8", "regularizers", [
        ("Base", "no-regs", "no-regs"), ("+RecR", "recr", "recr"), ("+AcyR", "recr-acyr", "recr-acyr"),
        ("+DepR", "planrec", "planrec")],
        "Base is PlanRec without RecR, AcyR and DepR; +DepR is the full model (`planrec.PRESETS`: no_regs, recr, "
        "recr_acyr, full).")


def paper_settings(setup, runs):
    """Issue 19: from the paper's stated settings, each group moved to our default alone."""
    d = setup.data
    base, popularity = "paper's settings", "popularity"
    specs = [Row(popularity, None, None), Row(base, f"{d}-paper-settings", PAPER["planrec"], compare=popularity)]
    specs += [Row(f"our {group}", f"{d}-paper-settings-our-{group}", None, compare=(base, popularity))
              for group in PAPER_SETTING_GROUPS]
    specs.append(Row("all ours (train.py defaults)", f"{d}-planrec", None, compare=(base, popularity)))
    rows = table(setup, runs, specs, load_data(setup.data, setup.data_dir))
    by_label = {r["label"]: r for r in rows}
    n10 = lambda label: by_label[label]["metrics"]["ndcg@10"]["mean"]

    def lifted(label):
        """Above the popularity level: higher N@10 than popularity at p < CLAIM_ALPHA."""
        p = by_label[label]["p_values"][popularity]["ndcg@10"]
        return n10(label) > n10(popularity) and p < CLAIM_ALPHA

    steps = []
    for group, (flags, theirs, ours) in PAPER_SETTING_GROUPS.items():
        label = f"our {group}"
        p = by_label[label]["p_values"][base]["ndcg@10"]
        steps.append({"group": group, "paper": theirs, "ours": ours, "flags_of_the_paper_dropped": list(flags),
                      "ndcg@10": n10(label), "delta_vs_paper_settings": n10(label) - n10(base), "p_vs_paper_settings": p,
                      "above_popularity": lifted(label), "reaches_the_papers_row": n10(label) >= PAPER["planrec"]["ndcg@10"]})
    lines = [f"- **{s['group']}** ({s['paper']} -> {s['ours']}): N@10 {s['ndcg@10']:.4f}, "
             f"{s['delta_vs_paper_settings']:+.4f} against the paper's settings (p {fmt_p(s['p_vs_paper_settings'])}); "
             + ("above" if s["above_popularity"] else "not above") + " the popularity level"
             + ("; reaches the paper's row" if s["reaches_the_papers_row"] else "") for s in steps]
    summary = {"paper_settings_ndcg@10": n10(base), "paper_settings_above_popularity": lifted(base),
               "popularity_ndcg@10": n10(popularity), "papers_row_ndcg@10": PAPER["planrec"]["ndcg@10"],
               "lifting_groups": [s["group"] for s in steps if s["above_popularity"]] if not lifted(base) else [],
               "any_step_reaches_the_papers_row": any(s["reaches_the_papers_row"] for s in steps)}
    title = f"The paper's stated settings, one group at a time moved to ours ({d})"
    text = (f"{markdown_table(title, rows)}\n\n"
            "The paper's settings (section 3.1: Adagrad lr 0.01, batch 4,096, embedding size 8, unit loss weights, "
            "its encoder, u = the user's ID embedding) are `train.py --paper-settings`; each row below it moves one "
            "group of them to our default and keeps the rest (`analysis.experiments.PAPER_SETTING_GROUPS` lists the "
            "flags), and is tested against the paper's settings and against popularity. What we did not change: "
            "everything the paper leaves open (factor sizes, top-K, g) is ours in every row.\n\n"
            f"The paper's settings reach N@10 {n10(base):.4f} here ("
            + ("above" if lifted(base) else "not above") + f" popularity, {n10(popularity):.4f}); the paper reports "
            f"{PAPER['planrec']['ndcg@10']:.4f} with them.\n\n" + "\n".join(lines))
    return Section(text, {"rows": rows, "steps": steps, **summary}, {"paper_settings.csv": rows})


def figure3(setup, runs):
    data = load_data(setup.data, setup.data_dir)
    consistency = datalib.interest_consistency(data.item_seq, data.user_offsets, data.item_attrs["genres"])
    activeness = np.diff(data.user_offsets).astype(np.float64)    # paper: the number of behaviours
    key = f"{setup.data}-planrec"
    if any(not np.array_equal(user_ids, data.raw_user_ids) for user_ids, _ in runs.per_user(key)):
        sys.exit("error: figure3: the PlanRec runs score other users than the dataset holds")
    uncertainty = runs.uncertainty(key)                                # per user, averaged over the candidates
    per_seed = []
    for seed, u in zip(setup.seeds, uncertainty):
        certainty = 1.0 - min_max(u)                                   # 1 - normalized uncertainty, as the paper plots
        stats = {"seed": seed}
        for name, x in (("consistency", consistency), ("activeness", activeness)):
            x = min_max(x)
            stats[name] = {"pearson": correlation(x, certainty), "spearman": correlation(x, certainty, rank=True),
                           "slope_intercept": [float(v) for v in np.polyfit(x, certainty, 1)] if x.std() > 0 else None}
        per_seed.append(stats)
    active = min_max(activeness) > 0.6
    t, df, p = welch_t_test(consistency[active], consistency[~active])
    path = setup.out / "figure3.png"
    certainty = 1.0 - min_max(uncertainty[0])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, name, x, label in ((axes[0], "consistency", consistency, "interest consistency"),
                               (axes[1], "activeness", activeness, "activeness (number of behaviours)")):
        x = min_max(x)
        ax.scatter(x, certainty, s=4, alpha=0.3, label=f"users (n = {len(x)})")
        fit = per_seed[0][name]
        if fit["slope_intercept"]:
            grid = np.linspace(0, 1, 50)
            r, pr = fit["pearson"]
            ax.plot(grid, np.polyval(fit["slope_intercept"], grid), color="C3",
                    label=f"linear fit: Pearson r = {r:.3f} (p = {fmt_p(pr)})")
        ax.set(xlabel=f"{label}, min-max normalized (unitless, 0-1)",
               ylabel="1 - uncertainty, min-max normalized (unitless, 0-1)",
               title=f"1 - uncertainty vs {name} (seed {setup.seeds[0]})")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Figure 3 ({setup.data}): personalization uncertainty sigma(Var/beta) per user")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

    def summary(name, kind):
        values = [s[name][kind][0] for s in per_seed]
        ps = ", ".join(fmt_p(s[name][kind][1]) for s in per_seed)
        spread = f" [{min(values):+.3f}, {max(values):+.3f}]" if len(values) > 1 else ""
        return f"{np.mean(values):+.3f}{spread} (p per seed: {ps})"
    text = (f"![Figure 3]({path.name})\n\n"
            "| x | Pearson r with 1 - uncertainty | Spearman r with 1 - uncertainty |\n|---|---|---|\n"
            + "\n".join(f"| {name} | {summary(name, 'pearson')} | {summary(name, 'spearman')} |"
                        for name in ("consistency", "activeness"))
            + f"\n\nMean over seeds [min, max]; a positive r agrees with the paper (consistent / active users get "
            f"lower uncertainty). Uncertainty = sigma(Var / beta) of Eq. (17) averaged over the user's 101 test "
            f"candidates (our choice); consistency as in Table 4 (b); activeness = the length of the user's "
            f"sequence. The paper gives no r.\n\n"
            f"Interest consistency, normalized activeness > 0.6 ({int(active.sum())} users) vs <= 0.6 "
            f"({int((~active).sum())} users), Welch's two-sided t-test (our choice of t-test): t = {t:.2f}, "
            f"df = {df:.0f}, p = {fmt_p(p)}; paper: t = {PAPER_FIGURE3_T[0]}, p = {PAPER_FIGURE3_T[1]:.2e}.")
    # The paper's claims here, each one test: the correlations on the per-user certainty averaged over
    # seeds (our choice, as the tables average the per-user metrics), the t-test as above.
    smoke = runs.smoke_test([key])
    mean_certainty = np.mean([1.0 - min_max(u) for u in uncertainty], axis=0)
    claims = []
    for name, x, what in (("consistency", consistency, "users of consistent interests"),
                          ("activeness", activeness, "active users")):
        r, pr = correlation(min_max(x), mean_certainty)
        claims.append({"table": "figure3", "claim": f"{what} get lower uncertainty: Pearson r of {name} with 1 - uncertainty > 0",
                       "paper_text": "positive (plotted; no r given)", "ours_text": f"r = {r:+.3f}", "p": pr,
                       "seeds": setup.seeds, "budget": runs.budget(key), "smoke_test": smoke,
                       "verdict": claim_verdict(1.0, r, pr, smoke)})
    claims.append({"table": "figure3", "claim": "high-activeness users (> 0.6) have more consistent interests (Welch t > 0)",
                   "paper_text": f"t = {PAPER_FIGURE3_T[0]}", "ours_text": f"t = {t:.2f} ({int(active.sum())} vs "
                   f"{int((~active).sum())} users)", "p": p, "seeds": [], "budget": None, "smoke_test": False,
                   "verdict": claim_verdict(1.0, t, p, False)})
    text += ("\n\nThe claims are judged on the per-user 1 - uncertainty averaged over the seeds (one correlation "
             "each, Pearson, scipy's p); the t-test is a property of the data, not of a model.")
    numbers = {"per_seed": per_seed, "activeness_test": {"t": t, "df": df, "p": p, "n_high": int(active.sum()),
                                                         "n_low": int((~active).sum())},
               "paper_activeness_test": {"t": PAPER_FIGURE3_T[0], "p": PAPER_FIGURE3_T[1]}}
    return Section(text, numbers, figures=[path.name], claims=claims)


def figure4(setup, runs):
    data = load_data(setup.data, setup.data_dir)
    key = f"{setup.data}-planrec-ui"
    structures = runs.structures(key)
    names = [str(n) for n in structures[0]["factor_names"]]
    if "user.gender" not in names or "item.genres" not in names:
        sys.exit(f"error: figure4: the run {key} has no factors tied to user.gender and item.genres ({names})")
    g, c = names.index("user.gender"), names.index("item.genres")
    gender = data.user_attrs["gender"]
    user_genres = datalib.normalize_rows(datalib.genre_counts(data.item_seq, data.user_offsets,
                                                              data.item_attrs["genres"]))
    pooled = datalib.genre_counts(data.item_seq, data.user_offsets, data.item_attrs["genres"])
    by_gender = datalib.normalize_rows(np.stack([pooled[gender == k].sum(0) for k in (0, 1)]))
    distance = datalib.js_divergence(user_genres, by_gender[gender])           # our choice of distance
    per_seed, maskings = [], []
    for seed, s in zip(setup.seeds, structures):
        if not np.array_equal(s["user_ids"], data.raw_user_ids):
            sys.exit("error: figure4: the exported structures hold other users than the dataset")
        masking = 1.0 - s["keep_prob_A"][:, g, c]                       # the paper's masking probability
        maskings.append(masking)
        r, p = correlation(distance, masking, rank=True)
        per_seed.append({"seed": seed, "spearman": r, "p": p, "shared_A_gender_genres": float(s["shared_A"][g, c]),
                         "masking_mean": float(masking.mean())})
    # Per genre, do male and female users' genre shares differ? (the paper: 10 of 13 genres)
    genre_tests = [welch_t_test(user_genres[gender == 1, j], user_genres[gender == 0, j])[2]
                   for j in range(user_genres.shape[1])]
    genre_names = data.attr_vocab.get("genres", [str(j) for j in range(user_genres.shape[1])])

    s0 = structures[0]
    masking0 = maskings[0]
    chosen = []                      # per gender the users with the lowest and the highest masking probability
    for k in (1, 0):
        members = np.flatnonzero(gender == k)
        if len(members):
            chosen += [members[np.argmin(masking0[members])], members[np.argmax(masking0[members])]]
    gender_names = data.attr_vocab.get("gender", ["F", "M"])

    structure_path = setup.out / "figure4_structures.png"
    fig, axes = plt.subplots(1, 1 + len(chosen), figsize=(4.2 * (1 + len(chosen)), 4.4))
    short = [n.replace("user.", "u.").replace("item.", "i.") for n in names]
    panels = [(s0["shared_A"], "shared A (learned)", "A entry (unitless)", "coolwarm")]
    off_diagonal = np.where(np.eye(len(names), dtype=bool), np.nan, 1.0)   # no factor masks itself: blank
    panels += [(off_diagonal * (1.0 - s0["keep_prob_A"][u]), f"user #{data.raw_user_ids[u]} ({gender_names[gender[u]]})",
                "masking probability (0-1)", "viridis") for u in chosen]
    for ax, (matrix, title, unit, cmap) in zip(np.atleast_1d(axes), panels):
        limit = np.nanmax(np.abs(matrix)) or 1.0
        image = ax.imshow(matrix, cmap=cmap, vmin=-limit if cmap == "coolwarm" else 0, vmax=limit)
        ax.set_xticks(range(len(names)), short, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), short, fontsize=7)
        ax.set(xlabel="child factor (effect)", ylabel="parent factor (cause)", title=title)
        fig.colorbar(image, ax=ax, fraction=0.046, label=unit)
    fig.suptitle(f"Figure 4 ({setup.data}, seed {setup.seeds[0]}): shared structure and masking probabilities "
                 f"(1 - keep probability); Gender -> Genre = row {short[g]}, column {short[c]}")
    fig.tight_layout()
    fig.savefig(structure_path, dpi=110)
    plt.close(fig)

    # Genre distributions relative to all users' (the paper normalizes by the prior and drops the
    # five genres with the fewest items where there are more than ten genres).
    item_count = data.item_attrs["genres"][1:].sum(0)
    shown = np.sort(np.argsort(-item_count)[: len(item_count) - 5]) if len(item_count) > 10 else np.arange(len(item_count))
    prior = datalib.normalize_rows(pooled.sum(0))
    genres_path = setup.out / "figure4_genres.png"
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    x = np.arange(len(shown))
    for k, offset in ((0, -0.2), (1, 0.2)):
        left.bar(x + offset, by_gender[k, shown] / prior[shown], width=0.4, label=f"all {gender_names[k]} users")
    for u in chosen:
        left.plot(x, user_genres[u, shown] / prior[shown], marker="o", lw=1,
                  label=f"user #{data.raw_user_ids[u]} ({gender_names[gender[u]]}, masking {masking0[u]:.2f})")
    left.axhline(1.0, color="grey", lw=0.8)
    left.set_xticks(x, [genre_names[j] for j in shown], rotation=60, fontsize=8)
    left.set(ylabel="genre share / all users' share (ratio)", xlabel="genre",
             title="genre distributions by gender and of the four users")
    left.legend(fontsize=7)
    right.scatter(distance, masking0, s=4, alpha=0.3, label=f"users (n = {len(distance)})")
    right.set(xlabel="JS divergence of the user's genres from their gender's (bits)",
              ylabel="masking probability of Gender -> Genre (0-1)",
              title=f"seed {setup.seeds[0]}: Spearman r = {per_seed[0]['spearman']:.3f} (p = {fmt_p(per_seed[0]['p'])})")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(genres_path, dpi=110)
    plt.close(fig)

    rs = [s["spearman"] for s in per_seed]
    n_differ = int(np.sum(np.array(genre_tests) < 0.05))
    text = (f"![Figure 4, structures]({structure_path.name})\n\n![Figure 4, genres]({genres_path.name})\n\n"
            f"From the `--attribute-prior both` runs (Table 5, w. ui). The four users: per gender, the user with the "
            f"lowest and the highest masking probability of Gender -> Genre (our choice; the paper hand-picked "
            f"users with 0% and 10.92%). Shared A[Gender, Genre] per seed: "
            + ", ".join(f"{s['shared_A_gender_genres']:+.3f}" for s in per_seed)
            + f".\n\nOver all {len(distance)} users: Spearman r between the Jensen-Shannon divergence of a user's genre "
            f"distribution from their gender's pooled one and their masking probability of Gender -> Genre: "
            f"{np.mean(rs):+.3f}" + (f" [{min(rs):+.3f}, {max(rs):+.3f}]" if len(rs) > 1 else "") + " over seeds (p per seed: "
            + ", ".join(fmt_p(s["p"]) for s in per_seed)
            + "). The paper's four users suggest a positive r (users unlike their gender mask the dependency more).\n\n"
            f"Male vs female genre shares differ (Welch two-sided, p < 0.05) in {n_differ} of {len(genre_tests)} genres "
            f"(paper: {PAPER_FIGURE4_GENRES[0]} of {PAPER_FIGURE4_GENRES[1]}).")
    # The paper's claims of section 3.4.2, each one test (our choices, as for Figure 3's):
    # 1. the shared A holds Gender -> Genre "with high confidence": p = the share of the off-diagonal
    #    entries of A at least as strong (|A| averaged over seeds), the chance that an entry drawn at
    #    random ranks as high; 2. users whose genres are unlike their gender's mask it more: Spearman
    #    r over users of that distance with the masking probability averaged over seeds; 3. male and
    #    female users' genre shares differ in most genres: the count at p < 0.05 against Binomial(n,
    #    0.05), what independent genres without a difference would give.
    smoke = runs.smoke_test([key])
    mean_strength = np.mean([np.abs(s["shared_A"]) for s in structures], axis=0)
    strength, gc_strength = mean_strength[~np.eye(len(names), dtype=bool)], float(mean_strength[g, c])
    rank = int(np.sum(strength >= gc_strength))
    p_rank = rank / len(strength)
    r, p_r = correlation(distance, np.mean(maskings, axis=0), rank=True)
    p_genres = float(stats.binomtest(n_differ, len(genre_tests), 0.05, alternative="greater").pvalue)
    base = {"table": "figure4", "p_seeds": None, "seeds": list(setup.seeds), "budget": runs.budget(key),
            "smoke_test": smoke}
    claims = [
        {**base, "claim": "the shared A holds Gender -> Genre with high confidence (its magnitude among the strongest entries)",
         "paper_text": "high (plotted; no value given)",
         "ours_text": f"magnitude {gc_strength:.3f}, rank {rank} of {len(strength)}", "p": p_rank,
         "verdict": claim_verdict(1.0, 1.0, p_rank, smoke)},
        {**base, "claim": "users whose genres are unlike their gender's mask Gender -> Genre more "
                          "(Spearman r of JS divergence with masking probability > 0)",
         "paper_text": "positive (four users; no r given)", "ours_text": f"r = {r:+.3f}", "p": p_r,
         "verdict": claim_verdict(1.0, r, p_r, smoke)},
        {**base, "claim": "male and female users' genre shares differ (Welch, p < 0.05) in most genres",
         "paper_text": f"{PAPER_FIGURE4_GENRES[0] / PAPER_FIGURE4_GENRES[1]:.2f} of genres "
                       f"({PAPER_FIGURE4_GENRES[0]} of {PAPER_FIGURE4_GENRES[1]})",
         "ours_text": f"{n_differ / len(genre_tests):.2f} of genres ({n_differ} of {len(genre_tests)})", "p": p_genres,
         "seeds": [], "budget": None, "smoke_test": False, "verdict": claim_verdict(1.0, 1.0, p_genres, False)}]
    text += ("\n\nThe claims: A's Gender -> Genre entry against the other off-diagonal entries (p = the share at "
             "least as strong, magnitudes averaged over seeds); the rank correlation on the masking probability averaged "
             "over seeds (scipy's p); the count of differing genres against Binomial(genres, 0.05), a property of "
             "the data, not of a model.")
    numbers = {"per_seed": per_seed, "four_users": [int(data.raw_user_ids[u]) for u in chosen],
               "genre_p_values": dict(zip(genre_names, genre_tests)), "genres_differing": n_differ,
               "factor_names": names}
    return Section(text, numbers, figures=[structure_path.name, genres_path.name], claims=claims)


# Factor names of the tied synthetic attributes -> the world's nodes (data.SYNTHETIC_NODES). The
# world writes its user group as the gender and its item category as the genre.
FACTOR_NODES = {"user.gender": "user.group", "user.age": "user.age", "user.occupation": "user.occupation",
                "user.power": "user.power", "item.genres": "item.category", "item.year": "item.era",
                "item.price": "item.price"}
SHD_THRESHOLD_RATIO = 0.5   # our choice: an edge where |A| >= half the largest |A| among the tied factors


def structure_metrics(shared_A, factor_names, keep_prob_A, user_ids, truth):
    """How well a learned structure matches the synthetic world's truth.

    edge_auc             ROC AUC of |A[u, i]| over the (user-side tied, item-side tied) pairs, label
                         = the true edge u -> i. Directed: an edge learned item -> user scores nothing.
    edge_auc_undirected  the same with |A[u, i]| + |A[i, u]|: the pair is connected, either way round.
    shd                  structural Hamming distance among all tied factors after the threshold
                         SHD_THRESHOLD_RATIO * max |A| (a missing, extra or reversed edge counts 1).
    deviation_auc        for each true edge with both ends tied: ROC AUC with which the masking
                         probability (1 - keep probability) of that entry separates the users who dropped
                         the edge from all others; the mean over those edges.
    block_share          the share of sum |A| in the u2u, u2i, i2u, i2i blocks (all factors)."""
    names = [str(n) for n in factor_names]
    nodes = [str(n) for n in truth["nodes"]]
    tied = [k for k, n in enumerate(names) if n in FACTOR_NODES]
    node_of = {k: nodes.index(FACTOR_NODES[names[k]]) for k in tied}
    adjacency = np.asarray(truth["adjacency"], dtype=bool)
    magnitude = np.abs(np.asarray(shared_A, dtype=np.float64))
    users = [k for k in tied if names[k].startswith("user.")]
    items = [k for k in tied if names[k].startswith("item.")]
    pairs = [(u, i) for u in users for i in items]
    labels = np.array([adjacency[node_of[u], node_of[i]] for u, i in pairs], dtype=bool)
    directed = np.array([magnitude[u, i] for u, i in pairs])
    undirected = np.array([magnitude[u, i] + magnitude[i, u] for u, i in pairs])

    sub = magnitude[np.ix_(tied, tied)]
    learned = (sub >= SHD_THRESHOLD_RATIO * sub.max()) & (sub > planrec.EDGE_THRESHOLD)
    np.fill_diagonal(learned, False)
    true_sub = adjacency[np.ix_([node_of[k] for k in tied], [node_of[k] for k in tied])]
    upper = np.triu_indices(len(tied), 1)
    shd = int(((learned[upper] != true_sub[upper]) | (learned.T[upper] != true_sub.T[upper])).sum())

    deviation = np.asarray(truth["user_deviation"])[np.asarray(user_ids) - 1]
    index_of = {node: k for k, node in node_of.items()}
    per_edge = {}
    for e, (parent, child) in enumerate(truth["edges"]):
        p, c = index_of.get(nodes.index(str(parent))), index_of.get(nodes.index(str(child)))
        if p is not None and c is not None:
            per_edge[f"{parent}->{child}"] = roc_auc(1.0 - keep_prob_A[:, p, c], deviation == e)
    defined = [v for v in per_edge.values() if np.isfinite(v)]

    side = np.array([n.startswith("user") for n in names])
    total = magnitude.sum() or 1.0
    blocks = {"u2u": (side, side), "u2i": (side, ~side), "i2u": (~side, side), "i2i": (~side, ~side)}
    return {"edge_auc": roc_auc(directed, labels), "edge_auc_undirected": roc_auc(undirected, labels),
            "shd": shd, "n_true_edges": int(true_sub.sum()), "n_learned_edges": int(learned.sum()),
            "deviation_auc": float(np.mean(defined)) if defined else float("nan"), "deviation_auc_per_edge": per_edge,
            "block_share": {b: float(magnitude[np.ix_(r, c)].sum() / total) for b, (r, c) in blocks.items()},
            "tied_factors": [names[k] for k in tied]}


SR_ROWS = ("synth-sr-main", "synth-sr-heads-both", "synth-sr-no-i2u", "synth-sr-tie-all", "synth-sr-strong",
           "synth-sr-personal-struct")
SR_METRICS = ("edge_auc", "edge_auc_undirected", "shd", "deviation_auc")

MECHANISM = """**Why heads on e-hat alone invent item -> item and user -> user edges.** Eq. (15) predicts from
e-hat only, and Eq. (8) computes e-hat_i = g(A_i * e) from factor i's *parents*, never from e_i itself (A
has a zero diagonal). Under the true user -> item DAG the user-side factors have no parents, so their
e-hat is the constant g(0); an item-side factor's e-hat sees only its user-side parents. The item's own
information, which lives in the item-side z and e, would reach the prediction only through children that
item factors do not have in the true DAG: a model with the true structure could not tell one candidate from
another. Training therefore pushes A to give every informative factor a child: item -> item and user ->
user edges (and, without the i2u prior, item -> user edges, which is why the direction of the true edges is
not identified). The column "share of sum abs(A)" shows where the mass of A goes. Heads on [e ; e-hat] (our
option) remove that pressure, since e carries every factor to the prediction, but then the shared
prediction needs neither A nor g.

**Why deviation AUC stays near chance.** A user who ignores, say, price shows it in the history, and the
encoder q(z | u, i) reads the history: the deviation is absorbed into z before any mask acts. The masks get
only a straight-through gradient through the top-K of Eq. (12), and Eq. (17) gives the personalized
prediction at most half the weight (sigma(Var / beta) >= 1/2), scaling that gradient down further; no
term of the loss ties a mask to a particular dependency, and with K_A of the allowed entries kept, one
entry more or less changes little. So nothing makes the mask of the dropped edge differ between deviating
and other users. The issue's single-seed probe found the same (deviation AUC about 0.5 in every run,
although the histories alone separate the deviating users at AUC 0.96-1.00)."""


def structure_recovery(setup, runs):
    smoke = runs.smoke_test(SR_ROWS)
    truth = load_ground_truth(setup.world_dir("synthetic"))
    strong_truth = load_ground_truth(setup.world_dir("synthetic-strong"))
    rows = []
    for key in SR_ROWS:
        per_seed = []
        for seed, s, metrics in zip(setup.seeds, runs.structures(key), runs.metrics(key)):
            m = structure_metrics(s["shared_A"], s["factor_names"], s["keep_prob_A"], s["user_ids"],
                                  strong_truth if key == "synth-sr-strong" else truth)
            m["seed"] = seed
            m["ndcg@10"] = metrics["test"]["ndcg@10"]
            per_seed.append(m)
        summary = {name: {"mean": float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"),
                          "min": float(np.nanmin(v)) if np.isfinite(v).any() else float("nan"),
                          "max": float(np.nanmax(v)) if np.isfinite(v).any() else float("nan")}
                   for name in SR_METRICS + ("ndcg@10",) for v in [np.array([p[name] for p in per_seed], float)]}
        blocks = {b: float(np.mean([p["block_share"][b] for p in per_seed])) for b in ("u2u", "u2i", "i2u", "i2i")}
        rows.append({"row": key, "what": SYNTHETIC_CONFIGS[key][2], "flags": list(SYNTHETIC_CONFIGS[key][1]),
                     "seeds": list(setup.seeds), "budget": runs.budget(key), "records": runs.names(key),
                     "training": runs.training(key), "summary": summary,
                     "block_share": blocks, "per_seed": per_seed})
    main = rows[0]["summary"]

    # Figure: the true DAG among the tied factors beside the learned |A| of heads on e-hat and on [e ; e-hat].
    path = setup.out / "structure_recovery.png"
    panels = []
    for key in ("synth-sr-main", "synth-sr-heads-both"):
        s = runs.structures(key)[0]
        panels.append((key, np.abs(s["shared_A"]), [str(n) for n in s["factor_names"]]))
    names = panels[0][2]
    nodes = [str(n) for n in truth["nodes"]]
    true_A = np.zeros((len(names), len(names)))
    for a, na in enumerate(names):
        for b, nb in enumerate(names):
            if na in FACTOR_NODES and nb in FACTOR_NODES:
                true_A[a, b] = truth["adjacency"][nodes.index(FACTOR_NODES[na]), nodes.index(FACTOR_NODES[nb])]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.8))
    short = [n.replace("user.", "u.").replace("item.", "i.") for n in names]
    for ax, (title, matrix, unit) in zip(axes, [("true DAG among tied factors", true_A, "edge (0/1)")]
                                         + [(f"learned |A|: {SYNTHETIC_CONFIGS[k][2].split(',')[0]}", m, "|A| (unitless)")
                                            for k, m, _ in panels]):
        image = ax.imshow(matrix, cmap="Greys" if "true" in title else "viridis", vmin=0)
        ax.set_xticks(range(len(names)), short, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), short, fontsize=7)
        ax.set(xlabel="child factor (effect)", ylabel="parent factor (cause)", title=title)
        fig.colorbar(image, ax=ax, fraction=0.046, label=unit)
    fig.suptitle(f"Structure recovery on the synthetic world (seed {setup.seeds[0]}, attribute prior, i2u prior)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

    def cell(v, digits=3):
        if not np.isfinite(v["mean"]):
            return "—"
        spread = f" [{v['min']:.{digits}g}-{v['max']:.{digits}g}]" if len(setup.seeds) > 1 else ""
        return f"{v['mean']:.{digits}g}{spread}"
    head = ["row", "edge AUC (directed)", "edge AUC (undirected)", "SHD", "deviation AUC", "N@10",
            "share of sum abs(A): u2u / u2i / i2u / i2i", "training"]
    lines = (["**SMOKE TEST (quick budget), not a result**", ""] if smoke else []) + [
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["summary"]
        lines.append("| " + " | ".join([r["what"]] + [cell(s[m]) for m in SR_METRICS] + [cell(s["ndcg@10"])]
                                       + [" / ".join(f"{r['block_share'][b]:.2f}" for b in ("u2u", "u2i", "i2u", "i2i"))]
                                       + [r["training"]]) + " |")
    verdict = lambda ok: "not judged (smoke test)" if smoke else "met" if ok else "not met"
    goals = (f"Goals of the issue (mean of the main row): directed edge AUC >= 0.9: reached "
             f"{main['edge_auc']['mean']:.3f}, {verdict(main['edge_auc']['mean'] >= 0.9)}; "
             f"deviation AUC >= 0.7: reached {main['deviation_auc']['mean']:.3f}, "
             f"{verdict(main['deviation_auc']['mean'] >= 0.7)}.")
    text = ("**Structure recovery on the synthetic world (not in the paper)**: does the learned shared A find the "
            "world's DAG (user group -> category, purchasing power -> price, age -> era; occupation a distractor), "
            "and do the masks find the users who drop an edge? Every row ties factors to the attributes with "
            "`--attribute-prior both` (user: gender = group, age, occupation; item: genres = category, year ~ era); "
            "\"all attributes tied\" also ties power and price (`--tie-private`), otherwise the power -> price edge "
            "has no tied factors and only the other two edges are scored.\n\n"
            + "\n".join(lines) + f"\n\n![structure recovery]({path.name})\n\n" + goals + "\n\n"
            f"Mean over seeds [min-max]. Metrics (`structure_metrics`): directed edge AUC over the (user-side, "
            f"item-side) pairs of tied factors scored by |A[u, i]|; undirected by |A[u, i]| + |A[i, u]|; SHD among "
            f"the tied factors after keeping |A| >= {SHD_THRESHOLD_RATIO} x max |A| (our choice of threshold); "
            f"deviation AUC = how well 1 - keep probability of a true edge's entry separates the users who dropped "
            f"that edge (ground truth `user_deviation`) from all others, averaged over the scored edges. The JSON's "
            f"top-level edge_auc, shd, deviation_auc are the main row's (first) seed means. The last row (ours) "
            f"uses a world with stronger edges (`make_synthetic(edge_weights=(3, 3, 2))`) to show how much the "
            f"signal strength limits recovery; options on the model itself (an objective on the masks, other mask "
            f"inputs) would need planrec.py and are not tried here.\n\n" + MECHANISM)
    numbers = {"edge_auc": main["edge_auc"]["mean"], "edge_auc_undirected": main["edge_auc_undirected"]["mean"],
               "shd": main["shd"]["mean"], "deviation_auc": main["deviation_auc"]["mean"],
               "shd_threshold_ratio": SHD_THRESHOLD_RATIO, "rows": rows}
    return Section(text, numbers, figures=[path.name])


# ------------------------------------------------------------------------------------------------
# Structure recovery on drawn worlds (issue 20): a world per seed with ~10 user -> item edges, every
# attribute tied, metrics pooled over seeds, and our model options beside the paper's model
# ------------------------------------------------------------------------------------------------

# Every row: all 5 + 5 attributes tied to the 10 factors (n_factors 10, 5 user-side); K_A and K_e are
# ours (the paper gives no values for them): keep 60 of the 65 allowed entries and every factor, so a
# personalized structure drops a few dependencies rather than half of them. N_m = 2 (Table 3's
# smallest sampled value; the paper uses 8 on MovieLens) and SR_EPOCHS epochs: our choices, so that
# the experiment fits its time budget (at N_m = 8 an evaluation pass of 5,000 users takes ~6x longer).
# Our choices for every row, tuned on world 0 (SR_TUNING_WORLD_SEEDS; docs/EXPERIMENTS.md lists the
# tuning runs): 6 epochs (2 before issue 20's second round: A had not settled), 10 factors, N_m = 2.
SR_EPOCHS = 6
SR_MODEL = ("--attribute-prior", "both", "--set", "n_factors=10", "--set", "n_user_factors=5",
            "--set", "k_A=60", "--set", "k_e=10", "--n-mask-samples", "2", "--epochs", str(SR_EPOCHS))
SR_I2U = ("--drop-dependencies", "i2u")
SR_OPTION_FLAGS = {"sides": ("--set", "factor_sources=sides"), "additive": ("--set", "head_form=additive"),
                   "no-dep": ("--no-dependency-reg",), "personal": ("--set", "w_personal_rec=1.0"),
                   "narrow": ("--set", "factor_dim=2"), "tied": ("--set", "w_attribute=3.0"),
                   "gates": ("--set", "mask_form=gates", "--set", "w_keep=0.1")}


def sr_flags(*options, i2u=True):
    return SR_MODEL + (SR_I2U if i2u else ()) + sum((SR_OPTION_FLAGS[o] for o in options), ())


OURS = ("sides", "additive", "no-dep", "narrow", "tied")      # the options of sr-tied, our base row
# key -> (world: 'drawn' or 'floor' (every edge weight 0), train.py flags, what, ours?)
SR_DRAWN = {
    "sr-paper": ("drawn", sr_flags(), "paper's model", False),
    "sr-paper-no-dep": ("drawn", sr_flags("no-dep"), "paper's model without Eq. (9)", False),
    "sr-sides": ("drawn", sr_flags("sides"), "ours: side-separated factors", True),
    "sr-additive": ("drawn", sr_flags("additive"), "ours: heads additive over factors", True),
    "sr-sides-additive": ("drawn", sr_flags("sides", "additive"), "ours: both", True),
    "sr-sides-additive-no-dep": ("drawn", sr_flags("sides", "additive", "no-dep"), "ours: both, without Eq. (9)", True),
    "sr-narrow": ("drawn", sr_flags("sides", "additive", "no-dep", "narrow"),
                  "ours: both, without Eq. (9), narrow factors (d = 2)", True),
    "sr-tied": ("drawn", sr_flags(*OURS),
                "ours: both, without Eq. (9), narrow factors, attribute losses weighted 3 (not 0.1)", True),
    "sr-tied-with-dep": ("drawn", sr_flags(*(o for o in OURS if o != "no-dep")), "ours: sr-tied with Eq. (9)", True),
    "sr-personal": ("drawn", sr_flags(*OURS, "personal"), "ours: sr-tied + the masks' own objective (w_personal_rec 1)", True),
    "sr-gates": ("drawn", sr_flags(*OURS, "personal", "gates"),
                 "ours: sr-personal with independent keep/drop gates and a keep prior (mask_form gates, w_keep 0.1)", True),
    "sr-no-i2u": ("drawn", sr_flags(*OURS, i2u=False), "ours: sr-tied without the i2u prior (direction tested)", True),
    "sr-paper-floor": ("floor", sr_flags(), "paper's model, floor world (edge weights 0)", False),
    "sr-ours-floor": ("floor", sr_flags(*OURS, "personal"), "ours: sr-personal, floor world", True),
}
# The world seeds the options and SR_MODEL were chosen on (issue 20: goals are judged on others).
SR_TUNING_WORLD_SEEDS = (0,)
SR_SCORES = ("abs_A", "effective", "loss_increase")
SR_CEILING_PAIRS = 30_000      # positive pairs the ceiling is fitted on (a seeded subset), our choice


def sr_world(setup, kind, world_seed):
    """The drawn world of one seed (generated when absent): its folder."""
    scale = 0.0 if kind == "floor" else setup.edge_scale
    wanted = dict(n_users=setup.world_users, n_items=setup.world_items, seed=world_seed, edge_scale=scale,
                  strength_range=tuple(setup.edge_strengths))
    folder = Path(setup.world_dir(f"sr-{kind}-seed{world_seed}-{setup.world_users}u"))
    if (folder / "ground_truth.npz").is_file():
        made = json.loads(str(load_ground_truth(folder)["params"]))
        differing = {k: (made.get(k), v) for k, v in ledger.plain(wanted).items() if made.get(k) != v}
        if differing:
            sys.exit(f"error: {folder} holds a world made with other settings (stored, wanted) {differing}; "
                     f"delete it or pass another --synthetic-dir")
    else:
        make_structured_world(folder, **wanted)
    return folder


def sr_edge_scores(record, folder, data_dir):
    """srlib.edge_scores of a run: from its ledger record, else from the run folder (edge_scores.npz
    beside best.pt, or computed from best.pt), then stored in the record too, so that the report
    is rebuilt from the ledger alone once the folder is gone."""
    stored = {k.split(".", 1)[1]: v for k, v in record.arrays.items() if k.startswith("edge_scores.")}
    if stored:
        return stored
    cached = Path(folder) / "edge_scores.npz"
    if cached.is_file():
        with np.load(cached) as f:
            scores = {k: f[k] for k in f.files}
    elif (Path(folder) / "best.pt").is_file():
        model, data, _, _, device = load_trained(folder, data_dir)
        scores = srlib.edge_scores(model, data, device)
        train.write_npz(cached, scores)
    else:
        sys.exit(f"error: {record.path} holds no edge scores and {folder}/best.pt is gone; "
                 "run without --from-ledger to train it again")
    ledger.add_arrays(record, {f"edge_scores.{k}": np.asarray(v) for k, v in scores.items()})
    return scores


@lru_cache(maxsize=None)
def sr_ceiling(world_dir):
    """(scores, labels, deviation AUC) of the ceilings of one world: a linear structure on the true
    attributes of its training positives (srlib.ceiling_scores), and the oracle that knows the
    world's preferences and reads each user's training sequence (srlib.deviation_ceiling)."""
    data = load_data("interactions", world_dir)
    truth = load_ground_truth(world_dir)
    pick = np.random.default_rng(0).permutation(len(data.train_pos))[:SR_CEILING_PAIRS]
    world_user, world_item = raw_index(data.raw_user_ids), raw_index(data.raw_item_ids)
    scores, labels = srlib.ceiling_metrics(truth, world_user[data.train_user[pick]],
                                           world_item[data.item_seq[data.train_pos[pick]]])
    # each user's training sequence (everything before the validation item), left-padded with -1
    length = int((data.valid_pos - data.user_offsets[:-1]).max())
    sequences = np.full((len(truth["user_deviation"]), length), -1)
    sequences[world_user] = world_item[data.history(np.arange(data.n_users), data.valid_pos, length)]
    return scores, labels, srlib.deviation_ceiling(truth, sequences)[1]


def sr_run_numbers(record, folder, world_dir, truth):
    """One run's scored pairs, per edge score, and its deviation AUC and NDCG@10."""
    metrics = record.meta["metrics"]
    cfg = planrec.Config(**metrics["config"])
    allowed = planrec.dependency_support(cfg).numpy()
    s = ledger.read_record(record.path).structure()
    pairs = srlib.scored_pairs(s["factor_names"], truth, allowed)
    scores = sr_edge_scores(record, folder, world_dir)
    out = {"ndcg@10": metrics["test"]["ndcg@10"], "record": record.name}
    for kind, (index, labels) in pairs.items():
        out[kind] = {"labels": labels.tolist(), "pairs": [[int(p), int(c)] for p, c in index],
                     **{name: [float(scores[name][p, c]) for p, c in index] for name in SR_SCORES}}
    out["deviation_per_edge"], out["deviation_auc"] = srlib.deviation_auc(
        s.get("keep_prob_A"), s["user_ids"], s["factor_names"], truth)
    # sigma(Var / beta) of Eq. (17) at the best epoch's validation: 0.5 where the sampled masks all
    # predict alike, i.e. where the personalized structures make no difference
    best = [e for e in metrics["epochs"] if e["epoch"] == metrics["best_epoch"]]
    personal = best[0]["valid"].get("personalization", {}) if best else {}
    out["uncertainty_p50"] = personal.get("uncertainty_p50", float("nan"))
    out["uncertainty_p90"] = personal.get("uncertainty_p90", float("nan"))
    return out


def sr_extra_tag(setup):
    """'' for the rows as defined; '-x' and a hash of --sr-flags otherwise, so that a tuning run has
    its own folder and record key."""
    if not setup.sr_extra:
        return ""
    return "-x" + hashlib.sha256(" ".join(setup.sr_extra).encode()).hexdigest()[:6]


def structure_recovery_drawn(setup, runs):
    """Train (or read from the ledger) every row of SR_DRAWN on its seeds' worlds and score them."""
    code = ledger.code_fingerprint()
    rows_wanted = setup.sr_rows or tuple(SR_DRAWN)
    smoke = setup.budget == SMOKE_TEST
    world_seeds = [setup.world_seed + k for k in range(len(setup.seeds))]
    rows, missing, ceiling, used = [], [], {}, []
    for key in rows_wanted:
        kind, flags, what, ours = SR_DRAWN[key]
        flags = tuple(flags) + setup.sr_extra
        per_seed, records = [], []
        for seed, world_seed in zip(setup.seeds, world_seeds):
            world = sr_world(setup, kind, world_seed)
            spec = RunSpec(f"{key}{sr_extra_tag(setup)}-w{world_seed}", "interactions", str(world), flags, "synthetic",
                           what, export=True)
            record, why = ensure_record(setup, spec, seed, code, setup.command)
            if why:
                missing.append(why)
                continue
            smoke |= record.meta["smoke_test"]
            truth = load_ground_truth(world)
            m = sr_run_numbers(record, setup.folder(spec, seed), str(world), truth)
            m.update(seed=seed, world_seed=world_seed, wall_s=ledger.run_seconds(record.meta["metrics"]))
            per_seed.append(m)
            records.append(record)
            used.append(record)
            if kind == "drawn" and world_seed not in ceiling:
                ceiling[world_seed] = sr_ceiling(str(world))
        if per_seed:
            rows.append(sr_row(key, kind, flags, what, ours, per_seed, records))
    if missing:
        sys.exit("error: --from-ledger: no current record for\n  " + "\n  ".join(missing))
    ceiling_summary = dict(srlib.pooled_summary([c[0].ravel() for c in ceiling.values()],
                                                [c[1].ravel() for c in ceiling.values()]),
                           deviation_auc={"mean": float(np.mean([c[2] for c in ceiling.values()])),
                                          "per_world": [c[2] for c in ceiling.values()]}) if ceiling else None
    section = sr_section(setup, rows, ceiling_summary, world_seeds, smoke)
    section.records = [(r.meta["key"], r) for r in used]
    return section


def sr_row(key, kind, flags, what, ours, per_seed, records):
    summary = {kind_: {name: srlib.pooled_summary([p[kind_][name] for p in per_seed],
                                                  [p[kind_]["labels"] for p in per_seed])
                       for name in SR_SCORES} for kind_ in ("cross", "all")}
    deviation = [p["deviation_auc"] for p in per_seed]
    ndcg = [p["ndcg@10"] for p in per_seed]
    return {"row": key, "world": kind, "what": what, "ours": ours, "flags": list(flags),
            "records": [r.name for r in records], "wall_s": [p["wall_s"] for p in per_seed],
            "edge": summary, "deviation_auc": {"mean": float(np.nanmean(deviation)) if np.isfinite(deviation).any() else float("nan"),
                                               "per_seed": deviation},
            "ndcg@10": {"mean": float(np.mean(ndcg)), "per_seed": ndcg},
            "uncertainty_p50": float(np.mean([p["uncertainty_p50"] for p in per_seed])),
            "uncertainty_p90": float(np.mean([p["uncertainty_p90"] for p in per_seed])), "per_seed": per_seed}


def sr_section(setup, rows, ceiling, world_seeds, smoke):
    def cell(v, digits=3):
        if not np.isfinite(v["pooled"]):
            return "—"
        return f"{v['pooled']:.{digits}f} [{v['low']:.2f}, {v['high']:.2f}] (mean {v['mean']:.{digits}f})"
    head = ["row", "edge AUROC, abs(A)", "AUPRC, abs(A)", "P@k, abs(A)", "AUROC, effective", "AUROC, loss increase",
            "AUROC all pairs (+ u->u)", "deviation AUC", "uncertainty p50 / p90", "N@10", "wall s / run"]
    lines = (["**SMOKE TEST (quick budget), not a result**", ""] if smoke else []) + [
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e, a = r["edge"]["cross"], r["edge"]["all"]
        lines.append("| " + " | ".join([
            f"{r['what']} (`{r['row']}`)", cell(e["abs_A"]["auroc"]), cell(e["abs_A"]["auprc"]),
            cell(e["abs_A"]["precision_at_k"]), cell(e["effective"]["auroc"]), cell(e["loss_increase"]["auroc"]),
            cell(a["abs_A"]["auroc"]), f"{r['deviation_auc']['mean']:.3f}" if np.isfinite(r["deviation_auc"]["mean"]) else "—",
            f"{r['uncertainty_p50']:.3f} / {r['uncertainty_p90']:.3f}" if np.isfinite(r["uncertainty_p50"]) else "—",
            f"{r['ndcg@10']['mean']:.4f}", f"{np.mean(r['wall_s']):.0f}"]) + " |")
    if ceiling:
        lines.append("| ceiling: linear structure on the true attributes of positive pairs; deviation: the "
                     "oracle that knows the world's preferences | "
                     + " | ".join([cell(ceiling["auroc"]), cell(ceiling["auprc"]), cell(ceiling["precision_at_k"])]
                                  + ["", "", "", f"{ceiling['deviation_auc']['mean']:.3f}", "", "", ""]) + " |")
    by_key = {r["row"]: r for r in rows}
    candidates = [r for r in rows if r["ours"] and r["world"] == "drawn" and "--drop-dependencies" in r["flags"]]
    best = max(candidates, key=lambda r: r["edge"]["cross"]["abs_A"]["auroc"]["mean"]) if candidates else None
    paper = by_key.get("sr-paper")
    tuning = sorted(set(world_seeds) & set(SR_TUNING_WORLD_SEEDS))
    verdict = lambda ok: "not judged (smoke test)" if smoke else ("met" if ok else "not met")
    goals = []
    if best:
        auroc = best["edge"]["cross"]["abs_A"]["auroc"]["mean"]
        dev = best["deviation_auc"]["mean"]
        goals.append(f"Best row of ours: `{best['row']}` ({best['what']}). Edge AUROC (mean of seeds) {auroc:.3f} "
                     f"(goal >= 0.9: {verdict(auroc >= 0.9)}"
                     + (f"; these worlds include tuning seeds {tuning}" if tuning else "; no tuning seed among these worlds")
                     + f"); deviation AUC {dev:.3f} (goal >= 0.7: {verdict(np.isfinite(dev) and dev >= 0.7)}"
                     + (f"; the oracle that knows the world reaches {ceiling['deviation_auc']['mean']:.3f}" if ceiling else "")
                     + ")")
        if paper:
            gap = best["ndcg@10"]["mean"] - paper["ndcg@10"]["mean"]
            goals.append(f"NDCG@10 {best['ndcg@10']['mean']:.4f} vs the paper's model {paper['ndcg@10']['mean']:.4f} "
                         f"(difference {gap:+.4f}; goal within 0.02: {verdict(gap >= -0.02)})")
    text = ("**Structure recovery on drawn worlds (not in the paper).** Each world seed draws its own DAG "
            "(`datasets.synthetic.draw_world_dag`): 5 user and 5 item attributes (classes and ordered levels), "
            "10 user -> item edges with strengths spread over "
            f"{tuple(setup.edge_strengths)} x {setup.edge_scale} (the floor world: all 0), 3 user -> user edges, "
            "the last user and item attribute distractors, 20% of users ignoring one edge; "
            f"{setup.world_users} users, {setup.world_items} items, world seeds {world_seeds} (tuning seeds "
            f"{list(SR_TUNING_WORLD_SEEDS)}). Every attribute is tied to its own factor (`--attribute-prior both`, "
            "10 factors, 5 user-side).\n\n" + "\n".join(lines) + "\n\n" + ". ".join(goals) + ".\n\n"
            "Edge metrics pool the seeds (scores ranked within each seed, then one AUROC / AUPRC over all pairs; "
            "precision at k: each seed's top k = its number of true edges), with a 95% percentile bootstrap "
            "interval (pairs resampled within seed and label, 1,000 resamples) and the mean of the per-seed values. "
            "Scored pairs: every ordered (user-side, item-side) pair of factors the model allows, true = the world's "
            "user -> item edge; where the i2u prior is off the item -> user pairs are scored too, so a reversed edge "
            "counts against the model. \"All pairs\" adds the user -> user edges and every allowed pair. Scores: "
            "abs(A); effective = abs(A[j, i]) x norm of g_i's first-layer weights on parent j (unchanged by "
            "rescaling A[j, i] against g_i); loss increase = how much the shared prediction's BCE on 300 users' "
            "validation candidates grows when A[j, i] is zeroed (`analysis.structure_recovery`). Deviation AUC: "
            "per true edge, how well 1 - keep probability of its entry separates the users who ignore it; the mean "
            "over edges. Uncertainty: sigma(Var / beta) of Eq. (17) on the best epoch's validation candidates, median "
            "and 90th percentile; 0.5 means the sampled personalized structures all predict alike. The deviation "
            "AUC's ceiling is an oracle that knows every user's attributes and the world's preferences but "
            "not who ignores what, scoring each user and edge by the log-likelihood ratio of the user's training "
            "sequence with that edge ignored against with every edge kept (`deviation_ceiling`). Chance: AUROC 0.5, AUPRC and P@k = the share of true pairs (10/25 with the i2u prior).")
    numbers = {"best_row": best["row"] if best else None, "world_seeds": world_seeds,
               "tuning_world_seeds": list(SR_TUNING_WORLD_SEEDS), "world_users": setup.world_users,
               "edge_scale": setup.edge_scale, "edge_strengths": list(setup.edge_strengths),
               "edge_auroc": best["edge"]["cross"]["abs_A"]["auroc"]["mean"] if best else None,
               "edge_auroc_pooled": best["edge"]["cross"]["abs_A"]["auroc"]["pooled"] if best else None,
               "edge_auprc": best["edge"]["cross"]["abs_A"]["auprc"]["mean"] if best else None,
               "edge_auprc_pooled": best["edge"]["cross"]["abs_A"]["auprc"]["pooled"] if best else None,
               "deviation_auc": best["deviation_auc"]["mean"] if best else None,
               "ndcg@10": best["ndcg@10"]["mean"] if best else None,
               "paper_ndcg@10": paper["ndcg@10"]["mean"] if paper else None,
               "ceiling": ceiling, "rows": rows, "goals": goals}
    return Section(text, numbers)


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    what: str
    main_runs: tuple = ()
    synthetic_runs: tuple = ()
    build: object = None
    in_all: bool = True          # False: run only when named (structure-recovery, with its own worlds)


EXPERIMENTS = [
    Experiment("table2", "Table 2: overall performance", "ML-1M: PlanRec, VAE base and popularity, "
               "with paired permutation tests", ("planrec", "vae"), (), table2),
    Experiment("table3", "Table 3: number of sampled structures N_m", "ML-1M: PlanRec with N_m in {1, 2, 4, 8}",
               ("psl", "nm2", "nm4", "planrec"), (), table3),
    Experiment("table4", "Table 4: robustness to distribution shift", "Base vs PlanRec, IID vs OOD: synthetic "
               "world with the purchasing-power shift, and ML-1M users split by interest consistency",
               ("vae-iid-halves", "planrec-iid-halves", "vae-ood-halves", "planrec-ood-halves"),
               ("synth-iid-vae", "synth-iid-planrec", "synth-ood-vae", "synth-ood-planrec"), table4),
    Experiment("table5", "Table 5: disentanglement with the attribute prior", "ML-1M: Base, Base w. ui, PlanRec, "
               "w. u, w. i, w. ui (--attribute-prior)", ("vae", "vae-ui", "planrec", "planrec-u", "planrec-i",
                                                         "planrec-ui"), (), table5),
    Experiment("table6", "Table 6: blocked dependencies", "ML-1M: PlanRec, w/o u2i, w/o u2u & i2i",
               ("planrec", "no-u2i", "no-u2u-i2i"), (), table6),
    Experiment("table7", "Table 7: components added cumulatively", "ML-1M: VAE, +SSL, +PSL, +Uncer",
               ("vae", "ssl", "psl", "planrec"), (), table7),
    Experiment("table8", "Table 8: regularizers added cumulatively", "ML-1M: Base without regularizers, +RecR, "
               "+AcyR, +DepR", ("no-regs", "recr", "recr-acyr", "planrec"), (), table8),
    Experiment("paper-settings", "What holds the paper's stated settings at the popularity level (not in the paper)",
               "ML-1M: the paper's stated settings, and each group of them moved to our default alone (optimizer, "
               "loss weights, embedding size, encoder, mask input); meant for the converged budget; not part of `all`",
               ("paper-settings", *(f"paper-settings-our-{g}" for g in PAPER_SETTING_GROUPS), "planrec"), (),
               paper_settings, in_all=False),
    Experiment("figure3", "Figure 3: uncertainty vs interest consistency and activeness", "ML-1M: per-user "
               "uncertainty against interest consistency and activeness, correlations, and the activeness t-test",
               ("planrec",), (), figure3),
    Experiment("figure4", "Figure 4: shared and personalized structures", "ML-1M, attribute prior: heatmap of "
               "the shared A, masking probabilities of four users, genres by gender, and over all users the rank "
               "correlation of genre distance from the gender with masking of Gender -> Genre", ("planrec-ui",), (),
               figure4),
    Experiment("structure-recovery-v1", "Structure recovery on the synthetic world, three edges (not in the paper)",
               "synthetic world: learned A vs the true DAG (edge AUC, SHD) and masks vs the deviating users "
               "(deviation AUC), 6 rows x seeds", (), SR_ROWS, structure_recovery),
    Experiment("structure-recovery", "Structure recovery on drawn worlds (not in the paper)",
               "worlds drawn per seed (5 user and 5 item attributes, all tied, 10 user -> item edges of mixed "
               "strengths, 3 user -> user edges, distractors): learned A vs the true DAG (pooled AUROC, AUPRC, "
               "precision at k with bootstrap intervals; |A| and two scale-free scores) and masks vs the deviating "
               "users, for the paper's model and our options; not part of `all` (5,000-user worlds; 14 rows x 3 "
               "seeds took 49 min of training and 2-5 min of report on 2 cores of an Intel Xeon)",
               (), (), structure_recovery_drawn, in_all=False),
]
BY_NAME = {e.name: e for e in EXPERIMENTS}


def specs_for(setup, experiments):
    """Every run the experiments need, each once, in order."""
    specs = {}
    for experiment in experiments:
        for suffix in experiment.main_runs:
            spec = setup.main_spec(suffix)
            specs[spec.key] = spec
        for key in experiment.synthetic_runs:
            specs[key] = setup.synthetic_spec(key)
    return list(specs.values())


# ------------------------------------------------------------------------------------------------
# Writing: NAME.json, CSVs, figures, REPORT.md
# ------------------------------------------------------------------------------------------------

def clean_json(value):
    """JSON without NaN (as null), numpy scalars as Python numbers, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def budget_text(budget):
    flags = BUDGETS[budget]
    show = lambda f: "`" + " ".join(f) + "`" if f else "train.py's defaults"
    return (f"budget {budget}: {setup_name('main')} runs {show(flags['main'])}, synthetic runs {show(flags['synthetic'])}")


def setup_name(kind):
    return "real-dataset (ML-1M)" if kind == "main" else "synthetic"


def machine_text(record):
    m = record.meta["machine"]
    if not m:
        return "machine unknown (recorded from an earlier run folder)"
    return f"{m.get('gpu') or m['cpu']}, {m['device']}, {m['threads']} threads, torch {m['torch']}"


def write_experiment(setup, experiment, section, runs, command, wall_s):
    keys = [spec.key for spec in specs_for(setup, [experiment])]
    smoke = runs.smoke_test(keys)
    used = {r.name: {"key": k, "seed": r.meta["seed"], "budget": r.meta["budget"], "wall_s": ledger.run_seconds(r.meta["metrics"]),
                     "commit": (r.meta["commit"] or {}).get("head"), "machine": machine_text(r)}
            for k, r in [(k, r) for k in keys for r in runs[k]] + section.records}
    claims = [c for name, rows in section.tables.items() for c in table_claims(rows, name.removesuffix(".csv"))]
    claims += section.claims
    claims_text = (f"\n**The paper's claims here** (holds: our difference has the paper's sign at p < {CLAIM_ALPHA}):\n\n"
                   f"{claims_markdown(claims)}\n" if claims else "")
    numbers = {"experiment": experiment.name, "title": experiment.title, "reproduces": experiment.what,
               "budget": setup.budget, "smoke_test": smoke, "seeds": setup.seeds,
               "budget_flags": {k: list(v) for k, v in BUDGETS[setup.budget].items()},
               "train_args": setup.train_args, "data": setup.data, "permutations": setup.permutations,
               "commit": git_commit(), "command": command, "wall_s_build": wall_s, "ledger": str(setup.ledger),
               "records": used, "figures": section.figures, "tables": sorted(section.tables), **section.numbers,
               "claims": claims,
               "markdown": f"## {experiment.title}\n\n*{experiment.what}.*\n\n"
                           + (f"> {SMOKE_TEST_NOTE}\n\n" if smoke else "") + f"{section.markdown}\n{claims_text}"}
    for name, rows in section.tables.items():
        write_table_csv(setup.out / name, rows)
    train.write_json(setup.out / f"{experiment.name}.json", clean_json(numbers))


def write_report(setup, command):
    """REPORT.md from every NAME.json in the output folder, in the paper's order."""
    sections, used, smoke, claims = [], {}, False, []
    for experiment in EXPERIMENTS:
        path = setup.out / f"{experiment.name}.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            smoke |= stored["smoke_test"]
            claims += stored.get("claims", [])
            used.update(stored["records"])
            sections.append(stored["markdown"] + f"\n*{stored['budget']} budget"
                            + (" (smoke test)" if stored["smoke_test"] else "") + f", seeds {stored['seeds']}, commit "
                            f"{stored['commit']}; numbers in {path.name}.*\n")
    machines = {}
    for r in used.values():
        machines[r["machine"]] = machines.get(r["machine"], 0) + 1
    header = (f"# PlanRec experiments\n\n" + (f"{SMOKE_TEST_NOTE}\n\n" if smoke else "")
              + f"Last command: `{command}`  \nCommit {git_commit()}; report built on "
              f"{platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}.  \n"
              f"{budget_text(setup.budget)}" + (f"; extra train.py flags for every run: `{' '.join(setup.train_args)}`"
                                                 if setup.train_args else "")
              + f". Runs: {len(used)} ledger records (`{setup.ledger.name}/`, named in each NAME.json), "
              f"{sum(r['wall_s'] or 0 for r in used.values()) / 60:.1f} min of training and evaluation in all, on "
              + "; ".join(f"{m} ({n})" for m, n in sorted(machines.items()))
              + "; a row's \"training\" cell says how its own runs were trained (epochs run of the maximum, step cap, "
              "mean wall time).\n\n"
              "p-values: paired two-sided sign-flip permutation test over users of the per-user NDCG@10 / "
              f"Recall@10 (averaged over seeds) between a row and the row in its \"vs\" cell; {setup.permutations} "
              "random sign vectors, seeded; p = (1 + exceedances) / (1 + permutations).\n")
    if claims:
        counts = {v: sum(c["verdict"] == v for c in claims) for v in dict.fromkeys(c["verdict"] for c in claims)}
        header += (f"\n## The paper's claims, all tables\n\n{len(claims)} comparison{'s' * (len(claims) > 1)} the "
                   "paper's tables make, "
                   + ", ".join(f"{n} {v}" for v, n in counts.items())
                   + f" (holds: our difference of NDCG@10 has the paper's sign at p < {CLAIM_ALPHA}, paired sign-flip "
                   "test over users, or for a figure's claim our correlation or t-statistic has it, at the p of its "
                   "own test; a claim between two gains (Tables 4, 5) compares per-user gains, by Welch's test over "
                   "users where the two sides are other users; within noise: p >= that; one test per claim, "
                   "uncorrected). p (seeds): Welch's two-sided t-test of the two rows' per-seed NDCG@10 (for a "
                   "gain, Welch's test of the contrast of the rows' per-seed NDCG@10), which sees how far a "
                   "retrained model moves and the per-user test does not; it is shown, not used in the verdict.\n\n"
                   + claims_markdown(claims) + "\n")
    (setup.out / "REPORT.md").write_text(header + "\n" + "\n".join(sections))


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

EPILOG = """run keys (for --reuse-run; folders are OUT/runs/KEY-seedN):
  {main}
  {synthetic}
Reuse finished ML-1M runs of train.py, one flag per configuration, {{seed}} standing for the seed:
  --reuse-run ml-1m-planrec=runs/ml1m-default-seed{{seed}} --reuse-run ml-1m-vae=runs/ml1m-vae-seed{{seed}}
  --reuse-run ml-1m-ssl=runs/ml1m-ssl-seed{{seed}}
A reused folder must be finished (metrics.json) and of the same model; it may come from another budget
(the report's "training" cell says how each row was trained). test_scores.npz / structures.npz are
written into it when missing, and it is recorded into the ledger; under --from-ledger (or when the
folder is gone) a --reuse-run key takes the newest current record of the same model, any budget.

The ledger (--ledger, default the repository's ledger/; analysis/ledger.py): a run with a current
record (same identity, same model code) is read, never trained; every run trained or found finished
is recorded as soon as it is. Rebuild every report from it alone, training nothing:
  python -m analysis.experiments all --budget full --seeds 0 1 2 --from-ledger --out results/full
--plan says per run: ledger (current record), STALE (a record of other model code, files named),
record (a finished folder to record), resume, new; under --from-ledger: ledger, missing or stale."""


def parse_args(argv=None):
    names = ", ".join(e.name for e in EXPERIMENTS)
    p = argparse.ArgumentParser(
        description="Reproduce the analyses of the PlanRec paper (Tables 2-8, Figures 3-4) and a structure-recovery "
                    "test on the synthetic world.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG.format(main=" ".join(f"ml-1m-{k}" for k in MAIN_CONFIGS), synthetic=" ".join(SYNTHETIC_CONFIGS)))
    p.add_argument("experiments", nargs="*", metavar="NAME", help=f"experiments to run ({names}), or all")
    p.add_argument("--list", action="store_true", help="name every experiment with what it reproduces, and exit")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="quick",
                   help="quick: ML-1M runs " + " ".join(BUDGETS["quick"]["main"]) + ", synthetic runs "
                        + " ".join(BUDGETS["quick"]["synthetic"]) + " (about 90 min on 2 CPU cores for all): a "
                        "smoke test of the pipeline, labelled so in every table, JSON and report; full: train.py's defaults; "
                        "converged: " + " ".join(BUDGETS["converged"]["main"]) + " (to convergence, no time cap)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of every configuration")
    p.add_argument("--out", default=None, help="output folder (REPORT.md, NAME.json, CSVs, PNGs, runs/)")
    p.add_argument("--data", choices=["ml-1m", "synthetic"], default="ml-1m",
                   help="the dataset of the ML-1M experiments (synthetic: a stand-in for quick checks)")
    p.add_argument("--data-dir", default=None, help="its folder (train.py --data-dir; default: train.py's search)")
    p.add_argument("--synthetic-dir", default=None,
                   help="folder of the synthetic worlds synthetic/, synthetic-ood/, synthetic-strong/ "
                        "(default OUT/data; generated with make_synthetic's default sizes when absent)")
    p.add_argument("--reuse-run", action="append", default=[], metavar="KEY=PATTERN",
                   help="use finished run folders PATTERN (with {seed}) for the run KEY instead of OUT/runs/KEY-seedN")
    p.add_argument("--train-args", default="", metavar="ARGS",
                   help="extra train.py flags for every run, after the budget's (e.g. '--threads 2'); a "
                        "configuration's own flags still win")
    p.add_argument("--permutations", type=int, default=MIN_PERMUTATIONS, help="sign vectors per permutation test")
    p.add_argument("--plan", action="store_true", help="list the runs the experiments need (state, estimated "
                                                        "time) and exit without training")
    p.add_argument("--ledger", default=str(ledger.LEDGER), metavar="DIR",
                   help="the ledger of run records, read first and written as runs finish (default: the repository's)")
    p.add_argument("--runs", nargs="+", default=None, metavar="KEY",
                   help="train (or find in the ledger) only these configurations, in this order (e.g. planrec vae ssl, "
                        "or ml-1m-planrec, synth-sr-main), each for every --seeds; print their test metrics, each "
                        "tested against the first (paired sign-flip test), and build no report; no NAME needed")
    p.add_argument("--from-ledger", action="store_true",
                   help="never train: build every experiment whose runs all have a current record in the ledger; "
                        "leave out the others and end in an error listing the runs that have none")
    sr = p.add_argument_group("structure-recovery (drawn worlds, issue 20)")
    sr.add_argument("--world-seed", type=int, default=0, metavar="N",
                    help="world seed of the first training seed; training seed k of --seeds gets world N + k "
                         f"(tuning worlds: {', '.join(map(str, SR_TUNING_WORLD_SEEDS))})")
    sr.add_argument("--world-users", type=int, default=5000, metavar="N", help="users of each drawn world")
    sr.add_argument("--world-items", type=int, default=1000, metavar="N", help="items of each drawn world (>= 120)")
    sr.add_argument("--edge-scale", type=float, default=1.0, metavar="X",
                    help="multiplies every user -> item edge strength (0: every world is a floor world)")
    sr.add_argument("--edge-strengths", type=float, nargs=2, default=(0.5, 2.0), metavar=("LOW", "HIGH"),
                    help="the 10 edges' strengths, spread evenly over [LOW, HIGH] in a random order")
    sr.add_argument("--sr-rows", nargs="+", default=None, metavar="ROW",
                    help=f"the rows to run (default all): {', '.join(SR_DRAWN)}")
    sr.add_argument("--sr-flags", default="", metavar="FLAGS",
                    help="train.py flags appended to every row's own, which they override (e.g. '--epochs 6 --set "
                         "w_attribute=3'); for tuning on the tuning worlds: each row's flags are in its JSON")
    args = p.parse_args(argv)
    if args.list:
        return args
    if args.world_seed < 0 or args.world_users < 1 or args.world_items < 120:
        p.error(f"need --world-seed >= 0, --world-users >= 1 and --world-items >= 120 (100 evaluation negatives); "
                f"got {args.world_seed}, {args.world_users}, {args.world_items}")
    if args.edge_scale < 0 or not 0 <= args.edge_strengths[0] <= args.edge_strengths[1]:
        p.error(f"need --edge-scale >= 0 and 0 <= LOW <= HIGH for --edge-strengths; got {args.edge_scale}, "
                f"{args.edge_strengths[0]} {args.edge_strengths[1]}")
    unknown_rows = sorted(set(args.sr_rows or ()) - set(SR_DRAWN))
    if unknown_rows:
        p.error(f"--sr-rows: unknown row(s) {unknown_rows}; choose from {', '.join(SR_DRAWN)}")
    if args.runs:
        known_runs = {**{k: k for k in MAIN_CONFIGS}, **{f"{args.data}-{k}": k for k in MAIN_CONFIGS},
                      **{k: k for k in SYNTHETIC_CONFIGS}}
        unknown = [k for k in args.runs if k not in known_runs]
        if unknown:
            p.error(f"--runs: unknown configuration(s) {unknown}; choose from {', '.join(MAIN_CONFIGS)} "
                    f"(or ml-1m-KEY) or {', '.join(SYNTHETIC_CONFIGS)}")
        args.runs = list(dict.fromkeys(known_runs[k] for k in args.runs))
        if args.experiments:
            p.error("--runs trains (or finds) configurations and builds no report: name experiments or give --runs, not both")
    if not args.experiments and not args.runs:
        p.error("name at least one experiment (or all), or --runs KEY ...; --list shows them")
    wanted = [e.name for e in EXPERIMENTS if e.in_all] if "all" in args.experiments else args.experiments
    wanted = list(dict.fromkeys(wanted + [n for n in args.experiments if n != "all"]))
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown:
        p.error(f"unknown experiment(s) {unknown}; choose from {names}, or all")
    args.experiments = [n for n in BY_NAME if n in wanted]            # the paper's order
    if args.out is None:
        p.error("--out DIR is required (where the runs, REPORT.md and the numbers go)")
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    if args.permutations < MIN_PERMUTATIONS:
        p.error(f"--permutations must be at least {MIN_PERMUTATIONS}, got {args.permutations}")
    known = {f"{args.data}-{k}" for k in MAIN_CONFIGS} | set(SYNTHETIC_CONFIGS)
    args.reuse = {}
    for item in args.reuse_run:
        key, sep, pattern = item.partition("=")
        if not sep or key not in known or "{seed}" not in pattern:
            p.error(f"--reuse-run {item!r}: expected KEY=PATTERN with KEY one of {sorted(known)} and {{seed}} in PATTERN")
        args.reuse[key] = pattern
    try:
        args.train_args = shlex.split(args.train_args)
    except ValueError as err:
        p.error(f"--train-args: {err}")
    if {"--out", "--seed", "--data", "--data-dir", "--resume"} & set(args.train_args):
        p.error("--train-args may not set --out, --seed, --data, --data-dir or --resume (experiments.py sets them)")
    return args


def estimated_seconds(setup, spec, metas):
    """How long one run of spec takes: the median time (ledger.run_seconds) of the ledger's records
    of the same key and budget, any seed, any code (a record says how long its configuration took on
    its machine); else that of the nearest recorded configuration: same kind, budget and --data, the
    fewest train.py arguments and Config fields differing (nm2 is timed by planrec, not by the VAE);
    else a rough constant (ESTIMATED_SECONDS). metas: the ledger's records' meta (ledger_metas).
    Returns (seconds, where the estimate comes from)."""
    wanted = run_identity(setup, spec, setup.seeds[0])
    by_distance = {}
    for meta in metas:
        seconds, stored = ledger.run_seconds(meta["metrics"]), meta["identity"]
        if (meta["budget"] != setup.budget or meta.get("kind") != spec.kind or stored["args"]["data"] != spec.data
                or not seconds):
            continue
        differ = [k for part in ("args", "config") if wanted[part] for k in stored[part]
                  if k != "seed" and stored[part][k] != wanted[part].get(k)]
        by_distance.setdefault(0 if meta["key"] == spec.key else 1 + len(differ), []).append((seconds, meta["key"]))
    if not by_distance:
        return ESTIMATED_SECONDS[(spec.kind, setup.budget)], "rough constant"
    distance = min(by_distance)
    seconds, keys = zip(*by_distance[distance])
    source = f"median of {len(seconds)} record{'s' * (len(seconds) > 1)}"
    if distance:
        source += f" of {', '.join(sorted(set(keys)))}, the nearest configuration ({distance - 1} values differ)"
    return float(np.median(seconds)), source


def ledger_metas(setup):
    """The meta of every record in the ledger, read once for all of --plan's estimates."""
    return [ledger.read_record(path, arrays=False).meta for path in sorted(setup.ledger.glob("*.npz"))]


def plan(setup, specs, code):
    """[(record or folder, state, estimated seconds, where the estimate comes from)] of every run
    (run_state's states)."""
    rows, metas = [], ledger_metas(setup)
    for spec in specs:
        states = [run_state(setup, spec, seed, code) for seed in setup.seeds]
        to_train = [state in ("new", "resume", "stale") for state, _, _ in states]
        estimate = estimated_seconds(setup, spec, metas) if any(to_train) else None
        rows += [(where, state, *(estimate if train else (0, ""))) for (state, _, where), train in zip(states, to_train)]
    return rows


def invocation(args):
    """(Setup, experiments, run specs) of parsed arguments: what main builds and trains; --runs
    gives just those configurations, in the order given, and no experiments."""
    setup = Setup(out=Path(args.out), budget=args.budget, seeds=args.seeds, ledger=Path(args.ledger),
                  from_ledger=args.from_ledger, data=args.data, data_dir=args.data_dir,
                  synthetic_dir=Path(args.synthetic_dir) if args.synthetic_dir else None,
                  train_args=args.train_args, reuse=args.reuse, permutations=args.permutations,
                  world_seed=args.world_seed, world_users=args.world_users, world_items=args.world_items,
                  edge_scale=args.edge_scale, edge_strengths=tuple(args.edge_strengths),
                  sr_rows=tuple(args.sr_rows or ()), sr_extra=tuple(shlex.split(args.sr_flags)))
    if args.runs:
        return setup, [], [setup.synthetic_spec(k) if k in SYNTHETIC_CONFIGS else setup.main_spec(k) for k in args.runs]
    experiments = [BY_NAME[n] for n in args.experiments]
    return setup, experiments, specs_for(setup, experiments)


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for e in EXPERIMENTS:
            print(f"{e.name:20s} {e.title}: {e.what}")
        return None
    code = ledger.code_fingerprint()          # the model code this process runs, taken before any training
    setup, experiments, specs = invocation(args)
    command = "python -m analysis.experiments " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    setup.command = command
    # The synthetic worlds first (seconds each), --plan too: a run's identity, by which its record
    # is found, includes its data. Without synthetic runs --plan writes nothing.
    for world in sorted({SYNTHETIC_CONFIGS[s.key][0] for s in specs if s.key in SYNTHETIC_CONFIGS}):
        ensure_world(setup, world)
    if args.plan:
        rows = plan(setup, specs, code)
        for where, state, seconds, source in rows:
            print(f"{state:10s} ~{seconds / 60:5.1f} min  {where}" + (f"  ({source})" if source else ""))
        print(f"{sum(r[2] > 0 for r in rows)} of {len(rows)} runs to train, about {sum(r[2] for r in rows) / 60:.0f} "
              f"min on 2 CPU cores ({budget_text(setup.budget)}); ledger {setup.ledger}, model code {code['hash']}")
        return rows
    setup.out.mkdir(parents=True, exist_ok=True)
    records, missing = {}, []
    with tqdm(total=len(specs) * len(setup.seeds), desc="runs", unit="run", dynamic_ncols=True) as bar:
        for spec in specs:
            for seed in setup.seeds:
                bar.set_postfix_str(f"{spec.key} seed {seed}")
                record, why = ensure_record(setup, spec, seed, code, command)
                records.setdefault(spec.key, []).append(record)
                missing += [why] if why else []
                bar.update()
    missing_text = (f"{len(missing)} of {len(specs) * len(setup.seeds)} runs have no current record in {setup.ledger} "
                    f"({budget_text(setup.budget)}, model code {code['hash']}):\n  " + "\n  ".join(missing)
                    + "\nrun without --from-ledger to train them (--plan says how long)")
    if missing and args.runs:
        sys.exit("error: --from-ledger: " + missing_text)
    if args.runs:       # each configuration's test metrics, each tested against the first that scores its users
        runs, groups = Runs(setup, records), []       # [(user ids, keys)]: a paired test needs the same users
        for key in records:
            users = runs.per_user(key)[0][0]
            group = next((keys for ids, keys in groups if np.array_equal(ids, users)), None)
            group.append(key) if group is not None else groups.append((users, [key]))
        for users, (first, *others) in groups:
            rows = table(setup, runs, [Row(first, first)] + [Row(k, k, compare=first) for k in others])
            scope = f", the {len(users)} users of {first}" if len(groups) > 1 else ""
            print(markdown_table(f"--runs, seeds {setup.seeds}, from {setup.ledger}{scope}", rows))
        for key, found in records.items():
            print(f"{key}: " + ", ".join(r.name for r in found))
        return records
    # Under --from-ledger an experiment with a run missing is left out; the others are still built.
    incomplete = {key for key, found in records.items() if None in found}
    runs = Runs(setup, {key: found for key, found in records.items() if key not in incomplete})
    left_out = [e.name for e in experiments if {s.key for s in specs_for(setup, [e])} & incomplete]
    for experiment in (e for e in experiments if e.name not in left_out):
        started = time.time()
        section = experiment.build(setup, runs)
        write_experiment(setup, experiment, section, runs, command, time.time() - started)
        print(f"wrote {setup.out / (experiment.name + '.json')}")
    write_report(setup, command)
    print(f"wrote {setup.out / 'REPORT.md'}")
    if left_out:
        sys.exit(f"error: --from-ledger: not built: {', '.join(left_out)} (built: "
                 f"{', '.join(e.name for e in experiments if e.name not in left_out) or 'nothing'}); " + missing_text)
    return runs


if __name__ == "__main__":
    main()
