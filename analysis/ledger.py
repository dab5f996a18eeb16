"""The ledger: one small record per finished training run, committed with the code in ledger/, so
that a result outlives the machine that trained it and every analysis can be rebuilt from it
without training (`python -m analysis.experiments all --from-ledger --out DIR`).

A record is one file, ledger/<key>-seed<N>-<identity hash>.npz: an .npz with LZMA-compressed
members (np.load reads it), written atomically (a temporary file beside it, then a rename). Members:

    meta                  JSON text, below
    user_ids [U]          the dataset's own user ids, in data order
    test_rank [U]         uint8: how many of the user's negatives score at least as high as the test
                          positive. Every per-user metric of data.per_user_metrics (AUC, Recall@k,
                          NDCG@k; ties count against the positive) is a function of it, so
                          `Record.per_user_metrics()` gives them exactly, and the table means with them
    test_uncertainty [U]  float32: sigma(Var / beta) of Eq. (17) averaged over the user's candidates,
                          as Figure 3 averages it (personalized runs only)
    structure.shared_A [N, N] float32, structure.factor_names [N], structure.keep_prob_A [U, N, N]
                          float16 (exact: export_structures' keep probabilities are means of 256 0/1
                          draws), from structures.npz, for runs whose structures an analysis reads

meta holds: the run's identity (below), its budget and whether it is a smoke test, the model code's
fingerprint, the commit and machine it was trained on, the command, provenance, wall time, and the
run's whole metrics.json ("metrics": train.py's args and Config, per-epoch losses and validation
metrics with the personalization statistics, test metrics with attribute accuracies and
personalization, popularity baseline, wall_s). The scores themselves (101 floats per user) are not
kept: no analysis needs more than the rank of the positive.

Identity. A run is what determines its numbers apart from the code: train.py's arguments (all but
where it writes and how it computes: out, data_dir, threads, device, kernel, and the eval/resume
switches), the resolved planrec Config, a fingerprint of the dataset (sizes and a SHA-256 of its
sequences, splits, evaluation candidates and attributes) and the experiments budget. Its hash names
the file, so a run re-recorded with new code replaces its stale record (git keeps the old one).

Reuse. A record is reused where its identity matches and its code fingerprint equals the code's now.
The fingerprint is a SHA-256 per file of MODEL_CODE, the files that determine a run's numbers
(the model, the protocol and metrics, the training loop and evaluation, the attribute targets and
the exported statistics; not the dataset preparation, whose output the identity's data fingerprint
pins, and not kernels/, whose functions compute planrec.py's to float rounding, as the tests prove,
so that a faster kernel changes a run's floats as another machine does, not its math, and which
kernel ran is already no part of the identity), each parsed and unparsed without
docstrings, so comments, docstrings and formatting do not count and any change to the code does.
The commit is stored but not compared: a record from another commit is reused when those files
compute the same, and one from the same commit with uncommitted model changes is not. One more way
to be current: where planrec.py alone differs, a record of a clean commit is reused when that
commit's planrec.py and today's compute the same for the record's Config, on this machine
(`computes_the_same`: a float64 probe of initialization, a training step's loss terms and every
gradient, and an evaluation pass), so that an option added to the model, off by default, leaves the
records of every other configuration current; a Config field a record does not name counts at its
default (`fill_config`). A record whose code differs otherwise is stale: never reused, listed with
the files that differ (`--plan`). The
machine (CPU, GPU, torch, threads) is stored, not compared: one configuration trained elsewhere
counts, although its floats are not bit for bit those of this machine. A run folder finished
before this invocation is recorded with today's fingerprint unless its metrics.json carries its
own ("code"): experiments.py has always assumed such a folder comes from the current code, and the
record says so ("code_assumed": true).

    python -m analysis.ledger [DIR]      # list the records (default: the repository's ledger/)
"""

import ast
import dataclasses
import fnmatch
import hashlib
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.special import expit
import torch

import data as datalib

FORMAT = 1
ROOT = Path(__file__).resolve().parents[1]
LEDGER = ROOT / "ledger"
# Not datasets/*.py: what a preparation script computes is the data, and the data's own fingerprint
# is part of a run's identity, so a change to one dataset's script touches only that dataset's runs.
# Not kernels/*.py: each kernel computes a function of planrec.py to float rounding (tests/test_kernels.py,
# tests/test_factor_mlps.py prove it), like the same code on another machine; --kernel is no part of
# a run's identity either. Records made while kernels/ was in the fingerprint are compared on these files.
MODEL_CODE = ("planrec.py", "data.py", "train.py", "analysis/attributes.py", "analysis/diagnostics.py")
# train.py arguments that say where a run writes or how it is computed, not what it computes.
NOT_IDENTITY = ("out", "data_dir", "threads", "device", "kernel", "resume", "eval_only", "checkpoint", "export")


# ------------------------------------------------------------------------------------------------
# Fingerprints: code, data, identity
# ------------------------------------------------------------------------------------------------

def source_hash(path):
    """SHA-256 of a Python file's code without docstrings, comments and formatting."""
    tree = ast.parse(Path(path).read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()[:16]


@lru_cache(maxsize=None)
def code_fingerprint(root=ROOT):
    """{'hash': ..., 'files': {path: hash}} of MODEL_CODE under root. Cached: experiments.py takes
    it once at its start, the code Python has loaded, before any training."""
    root = Path(root)
    files = sorted({p for pattern in MODEL_CODE for p in root.glob(pattern)})
    hashes = {p.relative_to(root).as_posix(): source_hash(p) for p in files}
    return {"hash": hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16], "files": hashes}


def code_differences(stored, now):
    """The MODEL_CODE files whose hash differs between two fingerprints (added or removed too).
    Files that a stored fingerprint has and today's MODEL_CODE does not name (datasets/*.py, in
    records from before it left MODEL_CODE) are not compared."""
    a, b = stored.get("files", {}), now["files"]
    named = {f for f in a if any(fnmatch.fnmatch(f, pattern) for pattern in MODEL_CODE)}
    return sorted(f for f in named | set(b) if a.get(f) != b.get(f))


def same_code(stored, now):
    """Does a record's code fingerprint compute what today's does (no MODEL_CODE file differs)?"""
    return stored.get("hash") == now["hash"] or not code_differences(stored, now)


def fill_config(config, module=None):
    """A stored Config dict with the fields it does not name (added to the model since) at today's
    defaults; an option added later must default to what the code computed before, which
    computes_the_same checks where it matters."""
    module = module or _planrec_now()
    defaults = {f.name: f.default for f in dataclasses.fields(module.Config)}
    return {**plain(defaults), **config}


def _planrec_now():
    import planrec
    return planrec


@lru_cache(maxsize=None)
def planrec_at(commit, root=ROOT):
    """planrec.py of a git commit, imported under its own name; None where git cannot give it."""
    try:
        blob = subprocess.run(["git", "archive", commit, "planrec.py"], capture_output=True, check=True, cwd=root).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    folder = Path(tempfile.mkdtemp(prefix=f"planrec_{commit[:10]}_"))
    tarfile.open(fileobj=io.BytesIO(blob)).extractall(folder, filter="data")
    spec = importlib.util.spec_from_file_location(f"planrec_{commit[:10]}", folder / "planrec.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _probe_batch(module, cfg):
    """A fixed training batch (a sequence batch of data.train_sequences, or the rows of the
    paper's encoder) and an evaluation batch, on a tiny log of 5 users whose lengths cross several
    blocks of history_len, items and users drawn within cfg's sizes."""
    rng = np.random.default_rng(0)
    lengths = np.array([5, 3 * cfg.history_len + 7, cfg.history_len, 2 * cfg.history_len + 1, 12])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    user_of = np.repeat(np.arange(len(lengths)), lengths)
    t = np.arange(offsets[-1]) - offsets[user_of]
    train_pos = np.flatnonzero((t >= 1) & (t <= lengths[user_of] - 3))
    users = rng.choice(cfg.n_users, len(lengths), replace=False)
    log = datalib.RecData(
        name="probe", n_users=len(lengths), n_items=cfg.n_items, item_seq=rng.integers(1, cfg.n_items + 1, offsets[-1]),
        user_offsets=offsets, train_user=user_of[train_pos], train_pos=train_pos, valid_pos=offsets[1:] - 2,
        test_pos=offsets[1:] - 1, valid_candidates=np.zeros((len(lengths), 1), dtype=np.int64),
        test_candidates=np.zeros((len(lengths), 1), dtype=np.int64), item_train_count=np.zeros(cfg.n_items + 1, dtype=np.int64),
        user_attrs={}, item_attrs={}, raw_user_ids=np.arange(len(lengths)), raw_item_ids=np.arange(cfg.n_items + 1),
        history_len=cfg.history_len)
    context = module.context_length(cfg)
    rows = len(train_pos)
    batch = next(log.train_epoch(rows, 1, rng) if cfg.encoder == "paper"
                 else log.train_sequences(rows, 1, rng, context))
    batch["user"] = users[batch["user"]]
    history = log.history(np.arange(len(lengths)), log.test_pos, context)
    evaluation = {"user": users, "history": history, "items": rng.integers(1, cfg.n_items + 1, (len(lengths), 101))}
    return batch, evaluation


def _probe_attribute_targets(module, cfg, user, items):
    """Random targets of each tied attribute (seeded), shaped as AttributePredictors.loss takes them."""
    g = torch.Generator().manual_seed(1)
    targets = {}
    for side, name, kind, size in map(module.parse_attribute, cfg.tied_attributes):
        shape = tuple(user.shape) if side == "user" else tuple(items.shape)
        if kind == "class":
            targets[f"{side}.{name}"] = torch.randint(0, size, shape, generator=g)
        elif kind == "multilabel":
            targets[f"{side}.{name}"] = (torch.rand(*shape, size, generator=g) < 0.3).double()
        else:
            targets[f"{side}.{name}"] = torch.randn(shape, generator=g, dtype=torch.float64)
    return targets


def probe(module, config):
    """SHA-256 of what module's PlanRec computes for config in float64: its initialization (seeded),
    a training step's loss terms and the gradient of every parameter (seeded noise), and an
    evaluation pass (y and the uncertainty, with seeded masks), each rounded to float32. None where
    the module cannot build or run the model (another API). One thread: it is quick (0.2 s at
    ML-1M's sizes) and never competes with a training run for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = module.Config(**config)
        torch.manual_seed(0)
        model = module.PlanRec(cfg).double()
        batch, evaluation = _probe_batch(module, cfg)
        inputs = {k: torch.as_tensor(batch[k]) for k in ("user", "history", "items", "seq", "end", "segment") if k in batch}
        labels = torch.zeros(inputs["items"].shape, dtype=torch.float64)
        labels[:, 0] = 1.0
        extra = {"attribute_targets": _probe_attribute_targets(module, cfg, inputs["user"], inputs["items"])} \
            if cfg.tied_attributes else {}
        model.train()
        torch.manual_seed(1)
        loss, terms = model.loss(model(**inputs), labels, **extra)
        named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
        grads = torch.autograd.grad(loss, [q for _, q in named], allow_unused=True)
        model.eval()
        torch.manual_seed(2)
        with torch.no_grad():
            out = model(**{k: torch.as_tensor(v) for k, v in evaluation.items()})
    except Exception:       # noqa: BLE001 - another API or a failure: not provably the same
        return None
    finally:
        torch.set_num_threads(threads)
    digest = hashlib.sha256()
    values = [("term." + k, v.detach()) for k, v in sorted(terms.items())]
    values += [("init." + n, q.detach()) for n, q in named] + [("grad." + n, g) for (n, _), g in zip(named, grads)]
    values += [("eval." + k, out[k]) for k in ("y", "uncertainty") if k in out]
    for name, value in values:
        digest.update(name.encode())
        if value is not None:
            digest.update(np.ascontiguousarray(value.double().numpy().astype(np.float32)).tobytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=None)
def _probe_cached(commit, config_json):
    module = _planrec_now() if commit is None else planrec_at(commit)
    return None if module is None else probe(module, json.loads(config_json))


def computes_the_same(meta, now):
    """Is a record whose code differs from today's current all the same: planrec.py alone differs,
    the record's commit is clean (its planrec.py is that commit's) and, on this machine, that
    planrec.py and today's compute the same for the record's Config (probe; today's with the fields
    the record does not name at their defaults)."""
    commit = meta.get("commit") or {}
    if code_differences(meta["code"], now) != ["planrec.py"] or not commit.get("head") or commit.get("model_code_dirty"):
        return False
    config = meta["identity"]["config"]
    old = _probe_cached(commit["head"], json.dumps(config, sort_keys=True))
    return old is not None and old == _probe_cached(None, json.dumps(fill_config(config), sort_keys=True))


def current(meta, now):
    """Does a record count for today's code (same_code, or computes_the_same)?"""
    return same_code(meta["code"], now) or computes_the_same(meta, now)


def data_fingerprint(data):
    """Sizes and a SHA-256 of what a run reads from its dataset (data.RecData)."""
    digest = hashlib.sha256()
    arrays = [data.item_seq, data.user_offsets, data.train_pos, data.valid_pos, data.test_pos,
              data.valid_candidates, data.test_candidates, data.raw_user_ids]
    arrays += [attrs[k] for attrs in (data.user_attrs, data.item_attrs) for k in sorted(attrs)]
    # A synthetic world's ground truth: --tie-private trains on its private attributes (power, price),
    # which the prepared log does not hold, so the data fingerprint covers them, not datasets/*.py.
    truth = Path(data.folder) / "ground_truth.npz" if getattr(data, "folder", None) else None
    if truth is not None and truth.is_file():
        with np.load(truth, allow_pickle=False) as f:
            arrays += [f[k] for k in sorted(f.files)]
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return {"name": data.name, "n_users": int(data.n_users), "n_items": int(data.n_items),
            "n_interactions": int(len(data.item_seq)), "sha256": digest.hexdigest()[:16]}


def plain(value):
    """JSON-normalized: what a value reads back as from JSON (tuples as lists, ...)."""
    return json.loads(json.dumps(value))


def identity(args, config, data, budget):
    """A run's identity: train.py's args (a dict, without NOT_IDENTITY), the Config dict, the data
    fingerprint and the experiments budget it was trained under."""
    args = {k: v for k, v in plain(dict(args)).items() if k not in NOT_IDENTITY}
    return {"args": args, "config": plain(config), "data": plain(data), "budget": budget}


def same_identity(stored, wanted):
    """Is a stored identity the wanted one, the Config fields it does not name at today's defaults?"""
    return {**stored, "config": fill_config(stored["config"])} == wanted


def identity_hash(ident):
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]


def record_path(directory, key, seed, ident):
    return Path(directory) / f"{key}-seed{seed}-{identity_hash(ident)}.npz"


def file_sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Provenance: commit and machine
# ------------------------------------------------------------------------------------------------

def run_seconds(metrics):
    """A run's time in seconds from its metrics.json: its wall time, or the sum of its epochs' training
    and evaluation where larger, as for a run resumed from a checkpoint (its wall time is only its
    last process's); None when neither is known."""
    wall = metrics.get("wall_s") or 0.0
    return max(wall, sum(e["train_s"] + e["eval_s"] for e in metrics.get("epochs", []))) or None


def git_commit(root=ROOT):
    """{'head': full SHA, 'model_code_dirty': whether MODEL_CODE differs from it}, or None without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *MODEL_CODE], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"head": head, "model_code_dirty": dirty}


def machine(device="cpu"):
    """The machine a run is trained on, as this process sees it."""
    import torch
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads(), "device": device}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ------------------------------------------------------------------------------------------------
# Records: write atomically, read, find
# ------------------------------------------------------------------------------------------------

@dataclass
class Record:
    path: Path
    meta: dict
    arrays: dict

    @property
    def name(self):
        return self.path.name

    def per_user_metrics(self):
        """data.per_user_metrics of the run's test scores, exactly, from the positive's rank."""
        return datalib.per_user_metrics(rank_scores(self.arrays["test_rank"], self.meta["n_candidates"]))

    def structure(self):
        """The exported structures as analysis.diagnostics.export_structures wrote them (float32)."""
        out = {k.split(".", 1)[1]: v for k, v in self.arrays.items() if k.startswith("structure.")}
        if not out:
            raise KeyError(f"{self.path} holds no exported structures")
        if "keep_prob_A" in out:
            out["keep_prob_A"] = out["keep_prob_A"].astype(np.float32)
        return {**out, "user_ids": self.arrays["user_ids"]}


def test_rank(scores):
    """[U] how many negatives (columns 1..) score at least as high as the positive (column 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        raise ValueError("test scores contain NaN; the run diverged")
    rank = (scores[:, 1:] >= scores[:, :1]).sum(1)
    return rank.astype(np.min_scalar_type(scores.shape[1]))


def rank_scores(rank, n_candidates):
    """Scores [U, n_candidates] whose positive has exactly `rank` negatives at least as high: the
    same per-user metrics under data.per_user_metrics as the scores the rank came from."""
    rank = np.asarray(rank, dtype=np.int64)
    scores = np.full((len(rank), n_candidates), -1.0)
    scores[:, 0] = 0.0
    scores[:, 1:][np.arange(n_candidates - 1) < rank[:, None]] = 1.0
    return scores


def atomic_write(path, write):
    """write(file) into a temporary file beside path, flushed to disk, then renamed over path: a
    crash leaves the previous record, or none, never half of one (a leftover *.tmp is never read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_record(path, meta, arrays):
    """One record file: meta (JSON) and arrays as LZMA-compressed .npy members."""
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_LZMA) as z:
            for name, value in {"meta": np.array(json.dumps(meta)), **arrays}.items():
                with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    atomic_write(path, write)
    return Record(Path(path), plain(meta), dict(arrays))


def add_arrays(record, arrays):
    """record with arrays added to its file (same meta, so the same run and identity): results an
    analysis derives from a run folder that the folder will not outlive (structure recovery's edge
    scores need the checkpoint)."""
    return write_record(record.path, record.meta, {**record.arrays, **arrays})


def read_record(path, arrays=True):
    """The Record at path (arrays=False: meta only, which is quick)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            loaded = {k: f[k] for k in f.files if k != "meta"} if arrays else {}
    except Exception as err:    # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"{path} is not a readable ledger record ({err}); delete it or restore it from git") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: ledger format {meta.get('format')}, this code reads format {FORMAT}")
    return Record(Path(path), meta, loaded)


def lookup(directory, key, seed, matches, code):
    """The ledger's answer for one run: ('current', Record) for the newest record of key and seed
    whose identity satisfies matches(identity) and whose code fingerprint is code's; else
    ('stale', Record) for the newest such record of other code; else ('missing', None)."""
    found = [read_record(p, arrays=False) for p in sorted(Path(directory).glob(f"{key}-seed{seed}-*.npz"))]
    found = sorted((r for r in found if r.meta["key"] == key and r.meta["seed"] == seed and matches(r.meta["identity"])),
                   key=lambda r: r.meta["recorded_at"], reverse=True)
    for state in ("current", "stale"):
        chosen = [r for r in found if current(r.meta, code) == (state == "current")]
        if chosen:
            return state, read_record(chosen[0].path)
    return "missing", None


def gate_keep_probabilities(mask_logits_A):
    """[U, N, N] float16: each dependency's keep probability under planrec.gumbel_gates (Config.mask_form
    = "gates", our option), exactly sigmoid(logit), zero on the diagonal. export_structures draws
    its keep_prob_A from Eq. (12)'s top-K for every model (analysis/diagnostics.py), which for a
    gates model describes other masks than it samples: its record stores these instead."""
    keep = expit(np.asarray(mask_logits_A, dtype=np.float64))
    keep[:, np.arange(keep.shape[1]), np.arange(keep.shape[1])] = 0.0
    return keep.astype(np.float16)


def record_run(directory, key, seed, ident, folder, structures, provenance, code, command, extra=None):
    """Record a finished run folder of train.py (metrics.json, test_scores.npz and, with
    structures, structures.npz) into directory. provenance: 'trained' (by this process), 'resumed'
    (finished by this process) or 'folder' (finished before; its code, commit and machine are what
    its metrics.json says, else today's code is assumed and commit and machine are unknown). A record
    of the same run and code already there is returned as it is (the ledger only changes with runs)."""
    folder, path = Path(folder), record_path(directory, key, seed, ident)
    metrics, sha = json.loads((folder / "metrics.json").read_text()), file_sha(folder / "metrics.json")
    run_code = metrics.get("code") or code
    if path.is_file():
        old = read_record(path)
        if old.meta["metrics_sha256"] == sha and same_code(old.meta["code"], run_code):
            return old
    with np.load(folder / "test_scores.npz") as f:
        arrays = {"user_ids": f["user_ids"], "test_rank": test_rank(f["scores"])}
        n_candidates = int(f["scores"].shape[1])
        if "uncertainty" in f.files:
            arrays["test_uncertainty"] = f["uncertainty"].mean(1)        # float32, as Figure 3 averages it
    if structures:
        with np.load(folder / "structures.npz") as s:
            if not np.array_equal(s["user_ids"], arrays["user_ids"]):
                raise ValueError(f"{folder}: structures.npz and test_scores.npz hold other users")
            arrays["structure.shared_A"] = s["shared_A"].astype(np.float32)
            arrays["structure.factor_names"] = s["factor_names"]
            if "keep_prob_A" in s.files:
                arrays["structure.keep_prob_A"] = s["keep_prob_A"].astype(np.float16)
            if metrics["config"].get("mask_form") == "gates" and "mask_logits_A" in s.files:
                arrays["structure.keep_prob_A"] = gate_keep_probabilities(s["mask_logits_A"])
    here = provenance != "folder"
    meta = {"format": FORMAT, "key": key, "seed": seed, "identity": ident, "budget": ident["budget"],
            "smoke_test": ident["budget"] == "quick",
            "code": run_code, "code_assumed": not here and not metrics.get("code"),
            "commit": git_commit() if here else metrics.get("commit"),
            "machine": machine(metrics.get("device", "cpu")) if here else metrics.get("machine"),
            "command": command, "provenance": provenance, "folder": str(folder),
            "metrics_sha256": sha, "wall_s": metrics.get("wall_s"),
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "n_candidates": n_candidates,
            **(extra or {}), "metrics": metrics}
    return write_record(path, meta, arrays)


# ------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    directory = Path(argv[0]) if argv else LEDGER
    code = code_fingerprint()
    paths = sorted(directory.glob("*.npz"))
    print(f"{len(paths)} records in {directory}; model code {code['hash']}")
    for path in paths:
        meta = read_record(path, arrays=False).meta
        stale = [] if current(meta, code) else code_differences(meta["code"], code)
        same = " (planrec.py differs, computes the same)" if not stale and not same_code(meta["code"], code) else ""
        test = meta["metrics"]["test"]
        print(f"{path.name:50s} {meta['budget']:6s} N@10 {test['ndcg@10']:.4f}  {meta['wall_s'] or 0:6.0f} s  "
              f"{(meta['commit'] or {}).get('head', 'unknown')[:10]:10s} {path.stat().st_size / 1024:5.0f} KB  "
              + (f"STALE ({', '.join(stale)} differ)" if stale else "current" + same))
    return paths


if __name__ == "__main__":
    main()
