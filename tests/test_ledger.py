"""The ledger (analysis/ledger.py) on hand-made run folders: the round trip of every number the
analyses read, the size of a record of ML-1M's size, atomic writes under a crash, the code
fingerprint that decides reuse, and the lookup of current, stale and missing records."""

import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import data as datalib
import planrec
import train
from analysis import ledger

ML1M_USERS, CANDIDATES, N = 6040, 101, 8


def copy_model_code(root):
    """A copy of the files that make up the model code (ledger.MODEL_CODE) under root."""
    for pattern in ledger.MODEL_CODE:
        for path in ledger.ROOT.glob(pattern):
            target = root / path.relative_to(ledger.ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    return root


def make_run_folder(folder, n_users=ML1M_USERS, structures=True, seed=0):
    """A finished run folder as train.main and export_structures write it, of a personalized
    model on ML-1M: a plausible spread of ranks (ties included), uncertainty in [0.5, 0.7] and keep
    probabilities that are means of 256 draws around a shared structure."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_users, CANDIDATES)).astype(np.float32)
    scores[:, 0] += rng.gamma(2.0, 1.0, n_users).astype(np.float32)
    scores[::7, 5] = scores[::7, 0]                                  # ties count against the positive
    uncertainty = (0.5 + 0.2 * rng.random((n_users, CANDIDATES))).astype(np.float32)
    user_ids = np.arange(1, n_users + 1)
    train.write_npz(folder / "test_scores.npz", {"user_ids": user_ids, "scores": scores, "uncertainty": uncertainty})
    if structures:
        logits = rng.normal(0, 2, (N, N)) + rng.normal(0, 0.5, (n_users, N, N))
        keep = rng.binomial(256, 1 / (1 + np.exp(-logits))) / 256
        keep[:, np.arange(N), np.arange(N)] = 0
        train.write_npz(folder / "structures.npz", {
            "factor_names": np.array([f"user_{k}" for k in range(4)] + [f"item_{k}" for k in range(4, 8)]),
            "user_ids": user_ids, "activeness": rng.integers(20, 2000, n_users), "shared_A": rng.normal(size=(N, N)).astype(np.float32),
            "keep_prob_A": keep.astype(np.float32), "keep_prob_e": rng.random((n_users, N)).astype(np.float32),
            "mask_logits_A": logits.astype(np.float32), "mask_logits_e": rng.normal(size=(n_users, N)).astype(np.float32),
            "uncertainty": uncertainty.mean(1)})
    args = train.parse_args(["--data", "ml-1m", "--seed", str(seed), "--out", str(folder)])
    metrics = datalib.ranking_metrics(scores)
    personalization = {"uncertainty_mean": 0.6, "uncertainty_p10": 0.52, "uncertainty_p50": 0.6, "uncertainty_p90": 0.68,
                       "personal_weight_mean": 0.4, "distinct_masks_mean": 7.9, "mask_on_shared_support": 0.7,
                       "dag": 1e-3, "acyclic": False, "acyclic_threshold": 0.3}
    epochs = [{"epoch": e, "loss": {"total": 1.0 / e, "recommend": 0.5 / e}, "train_s": 190.0, "eval_s": 20.0,
               "valid": {**metrics, "personalization": personalization}} for e in (1, 2, 3)]
    train.write_json(folder / "metrics.json", {
        "args": vars(args), "config": planrec.Config(n_users=n_users).to_dict(), "kernel": "eager solves, tuned g",
        "device": "cpu", "best_epoch": 3, "test": {**metrics, "personalization": personalization},
        "popularity_test": metrics, "epochs": epochs, "wall_s": 700.0})
    return folder, args


def identity_of(args, budget="full"):
    return ledger.identity(vars(args), planrec.Config().to_dict(), {"name": "ml-1m", "sha256": "0"}, budget)


def record(directory, folder, args, structures=True, provenance="trained", code=None, key="ml-1m-planrec-ui"):
    return ledger.record_run(directory, key, args.seed, identity_of(args), folder, structures, provenance,
                             code or ledger.code_fingerprint(), {"experiments": "test", "train": None})


def test_round_trip_keeps_every_number_the_analyses_read(tmp_path):
    folder, args = make_run_folder(tmp_path / "run")
    written = record(tmp_path / "ledger", folder, args)
    back = ledger.read_record(written.path)
    with np.load(folder / "test_scores.npz") as f:
        scores, uncertainty = f["scores"], f["uncertainty"]
    expected = datalib.per_user_metrics(scores)
    got = back.per_user_metrics()
    assert set(got) == set(expected)
    for m in expected:                                          # exactly: every table and permutation test
        np.testing.assert_array_equal(got[m], expected[m])
    np.testing.assert_array_equal(back.arrays["test_uncertainty"], uncertainty.mean(1))   # Figure 3, bit for bit
    structure = back.structure()
    with np.load(folder / "structures.npz") as s:
        for name in ("shared_A", "keep_prob_A", "factor_names", "user_ids"):
            np.testing.assert_array_equal(structure[name], s[name])
    stored = json.loads((folder / "metrics.json").read_text())
    assert back.meta["metrics"] == stored and back.meta["identity"] == identity_of(args)
    assert back.meta["code"] == ledger.code_fingerprint() and not back.meta["code_assumed"]
    assert back.meta["machine"]["threads"] >= 1 and back.meta["machine"]["torch"]
    assert back.meta["budget"] == "full" and back.meta["smoke_test"] is False
    # Compact: a record of ML-1M's size (6,040 users, 101 candidates, 8 factors)
    assert written.path.stat().st_size < 420_000                 # 383 KB, 366 of them keep_prob_A
    plain = record(tmp_path / "ledger", folder, args, structures=False, key="ml-1m-planrec")
    assert plain.path.stat().st_size < 40_000 and "structure.keep_prob_A" not in plain.arrays


def test_an_unchanged_run_is_not_rewritten_and_a_folder_of_old_is_marked(tmp_path):
    folder, args = make_run_folder(tmp_path / "run", n_users=50)
    first = record(tmp_path / "ledger", folder, args, provenance="folder")
    assert first.meta["code_assumed"] and first.meta["machine"] is None and first.meta["commit"] is None
    before = first.path.read_bytes()
    again = record(tmp_path / "ledger", folder, args, provenance="folder")
    assert again.path == first.path and again.path.read_bytes() == before      # the ledger changes only with runs


def test_a_crashed_write_leaves_no_record_that_is_read(tmp_path, monkeypatch):
    folder, args = make_run_folder(tmp_path / "run", n_users=50)
    directory = tmp_path / "ledger"
    good = record(directory, folder, args)
    good_bytes = good.path.read_bytes()
    match = lambda i: i == identity_of(args)
    # An error half way through overwriting it: the previous record stays, nothing else is left.
    calls = []
    original = np.lib.format.write_array

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(*a, **k)
    monkeypatch.setattr(np.lib.format, "write_array", failing)
    with pytest.raises(OSError, match="disk full"):
        ledger.write_record(good.path, {**good.meta, "wall_s": 1.0}, good.arrays)
    monkeypatch.undo()
    assert sorted(p.name for p in directory.iterdir()) == [good.path.name]
    assert good.path.read_bytes() == good_bytes
    # A process killed half way through writing a new record: its temporary file stays behind and
    # is never read; the lookup still finds the previous record.
    other = ledger.record_path(directory, "ml-1m-planrec-ui", args.seed, {**identity_of(args), "budget": "quick"})
    script = textwrap.dedent(f"""
        import os, numpy as np
        from analysis import ledger
        original, calls = np.lib.format.write_array, []
        def dying(f, a, **k):
            calls.append(1)
            if len(calls) == 2:
                f.write(b"half a member")
                f.flush()
                os._exit(9)
            return original(f, a, **k)
        np.lib.format.write_array = dying
        record = ledger.read_record({str(good.path)!r})
        ledger.write_record({str(other)!r}, {{**record.meta, "budget": "quick"}}, record.arrays)
    """)
    killed = subprocess.run([sys.executable, "-c", script], cwd=ledger.ROOT, capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    left = {p.name for p in directory.iterdir()}
    temporary = left - {good.path.name}
    assert good.path.name in left and len(temporary) == 1 and temporary.pop().endswith(".tmp") and not other.exists()
    state, found = ledger.lookup(directory, "ml-1m-planrec-ui", args.seed, lambda i: True, ledger.code_fingerprint())
    assert state == "current" and found.path == good.path
    assert ledger.lookup(directory, "ml-1m-planrec-ui", args.seed, match, ledger.code_fingerprint())[1].path == good.path
    assert [p.name for p in ledger.main([str(directory)])] == [good.path.name]


def test_the_code_fingerprint_changes_with_the_code_not_with_its_comments(tmp_path):
    root = copy_model_code(tmp_path / "repo")
    now = ledger.code_fingerprint(root)
    assert now == ledger.code_fingerprint() and "planrec.py" in now["files"]
    assert not any(f.startswith(("kernels/", "datasets/")) for f in now["files"])
    path = root / "planrec.py"
    source = path.read_text()
    path.write_text(source.replace('"""', '"""Another docstring line. ', 1) + "\n# a comment\n\n\n")
    assert ledger.code_fingerprint.__wrapped__(root) == now                 # docstrings, comments, blank lines
    path.write_text(source.replace("k_A: int = 28", "k_A: int = 27"))
    changed = ledger.code_fingerprint.__wrapped__(root)
    assert changed["hash"] != now["hash"] and ledger.code_differences(changed, now) == ["planrec.py"]
    (root / "analysis" / "attributes.py").write_text("X = 1\n")
    assert ledger.code_differences(ledger.code_fingerprint.__wrapped__(root), now) == ["analysis/attributes.py",
                                                                                   "planrec.py"]
    # a kernel computes planrec.py's math to float rounding (the kernel tests prove it): changing one
    # stales nothing, and a record that stored kernel hashes is compared on MODEL_CODE alone
    kernel = root / "kernels" / "factor_mlps.py"
    kernel.parent.mkdir(exist_ok=True)
    kernel.write_text((ledger.ROOT / "kernels" / "factor_mlps.py").read_text() + "\nG_CHUNK_ROWS = 7\n")
    assert ledger.code_differences(ledger.code_fingerprint.__wrapped__(root), changed) == ["analysis/attributes.py"]
    old_record = {"hash": "an older hash", "files": {**now["files"], "kernels/factor_mlps.py": "0123456789abcdef"}}
    assert ledger.same_code(old_record, now)


def test_the_data_fingerprint_covers_a_worlds_ground_truth(tmp_path):
    """--tie-private trains on ground-truth attributes that the prepared log does not hold, and
    datasets/*.py is not in the code fingerprint: the data fingerprint must see them change."""
    from datasets import synthetic
    synthetic.make_synthetic(tmp_path / "w", n_users=30, n_items=200, mean_len=12, seed=0)
    data = datalib.load_dataset("synthetic", tmp_path / "w")
    before = ledger.data_fingerprint(data)
    path = tmp_path / "w" / "ground_truth.npz"
    with np.load(path) as f:
        truth = {k: f[k] for k in f.files}
    truth["user_power"] = truth["user_power"][::-1].copy()
    np.savez(path, **truth)
    assert ledger.data_fingerprint(data)["sha256"] != before["sha256"]


def test_files_that_left_the_fingerprint_are_not_compared():
    now = ledger.code_fingerprint()
    assert not any(f.startswith("datasets/") for f in now["files"])      # the data fingerprint pins what they compute
    older = {"hash": "from-before", "files": {**now["files"], "datasets/ml1m.py": "x", "datasets/synthetic.py": "y"}}
    assert ledger.code_differences(older, now) == [] and ledger.same_code(older, now)
    changed = {"hash": "other", "files": {**older["files"], "planrec.py": "z"}}
    assert ledger.code_differences(changed, now) == ["planrec.py"] and not ledger.same_code(changed, now)
    gone = {"hash": "other", "files": {f: h for f, h in now["files"].items() if f != "train.py"}}
    assert ledger.code_differences(gone, now) == ["train.py"]


def test_lookup_tells_current_stale_and_missing(tmp_path):
    folder, args = make_run_folder(tmp_path / "run", n_users=50)
    directory, code = tmp_path / "ledger", ledger.code_fingerprint()
    other_code = {"hash": "0" * 16, "files": {**code["files"], "train.py": "0" * 16}}
    ident = identity_of(args)
    match = lambda i: i == ident
    assert ledger.lookup(directory, "ml-1m-planrec-ui", 0, match, code) == ("missing", None)
    stale = record(directory, folder, args, code=other_code)
    state, found = ledger.lookup(directory, "ml-1m-planrec-ui", 0, match, code)
    assert state == "stale" and found.path == stale.path and ledger.code_differences(found.meta["code"], code) == ["train.py"]
    current = record(directory, folder, args)                             # the same run, recorded with today's code
    assert current.path == stale.path                                      # replaces the stale record
    assert ledger.lookup(directory, "ml-1m-planrec-ui", 0, match, code)[0] == "current"
    assert ledger.lookup(directory, "ml-1m-planrec-ui", 1, match, code)[0] == "missing"           # other seed
    assert ledger.lookup(directory, "ml-1m-planrec-ui", 0, lambda i: i["args"]["lr"] == 0.5, code)[0] == "missing"


def test_identity_is_what_a_run_computes_not_where_or_how():
    args = train.parse_args(["--data", "ml-1m", "--seed", "0"])
    moved = train.parse_args(["--data", "ml-1m", "--seed", "0", "--out", "elsewhere", "--threads", "2",
                              "--data-dir", "/data", "--device", "cpu", "--kernel", "eager"])
    assert ledger.identity_hash(identity_of(args)) == ledger.identity_hash(identity_of(moved))
    for other in (["--lr", "0.02"], ["--seed", "1"], ["--max-steps", "60"], ["--preset", "vae_base"]):
        changed = train.parse_args(["--data", "ml-1m", "--seed", "0", *other])
        assert ledger.identity_hash(identity_of(changed)) != ledger.identity_hash(identity_of(args)), other
    assert ledger.identity_hash(identity_of(args, "quick")) != ledger.identity_hash(identity_of(args, "full"))


def test_rank_scores_have_the_per_user_metrics_of_their_rank():
    rank = np.array([0, 1, 4, 9, 10, 100], dtype=np.uint8)
    metrics = datalib.per_user_metrics(ledger.rank_scores(rank, CANDIDATES))
    np.testing.assert_array_equal(metrics["recall@10"], [1, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(metrics["ndcg@5"], [1, 1 / np.log2(3), 1 / np.log2(6), 0, 0, 0])
    np.testing.assert_allclose(metrics["auc"], 1 - rank / 100)
    np.testing.assert_array_equal(ledger.test_rank(ledger.rank_scores(rank, CANDIDATES)), rank)


# ------------------------------------------------------------------------------------------------
# planrec.py changed, the computation not: computes_the_same
# ------------------------------------------------------------------------------------------------

def head_commit():
    head = ledger.git_commit()
    assert head is not None, "these tests need the repository's git history"
    return head["head"]


def meta_with(config, planrec_hash="another planrec.py", commit=None, dirty=False, other=None):
    """A record's meta whose code differs from today's in planrec.py (and `other` files)."""
    now = ledger.code_fingerprint()
    files = {**now["files"], "planrec.py": planrec_hash, **{f: "differs" for f in (other or [])}}
    return {"code": {"hash": "old", "files": files}, "identity": {"config": config},
            "commit": {"head": commit or head_commit(), "model_code_dirty": dirty}}


def small_config(**kw):
    return ledger.plain(planrec.Config(n_users=40, n_items=60, **kw).to_dict())


def test_the_probe_is_repeatable_and_sees_every_setting():
    for kw in ({}, {"structure": "none"}, {"encoder": "paper", "embed_dim": 8}, {"n_mask_samples": 1},
               {"tied_attributes": ("user.age:class:3", "item.genres:multilabel:5", "item.year:regression:1")}):
        config = small_config(**kw)
        first = ledger.probe(planrec, config)
        assert first is not None and first == ledger.probe(planrec, config), kw
        # beta of Eq. (17) acts only where N_m > 1 samples have a variance
        uses_beta = config["structure"] == "personalized" and config["n_mask_samples"] > 1
        assert (ledger.probe(planrec, {**config, "beta": 0.003}) != first) == uses_beta
        assert ledger.probe(planrec, {**config, "w_kl": 0.2}) != first


def test_a_record_whose_planrec_computes_the_same_stays_current():
    """A textual change to planrec.py (a new option, off by default) leaves a record current when
    its commit's planrec.py computes what today's does for its Config; here the record's commit is
    HEAD, whose planrec.py computes today's numbers, and its stored planrec.py hash another one."""
    meta = meta_with(small_config())
    now = ledger.code_fingerprint()
    assert ledger.code_differences(meta["code"], now) == ["planrec.py"]
    assert not ledger.same_code(meta["code"], now) and ledger.computes_the_same(meta, now) and ledger.current(meta, now)
    # a field added since (the record does not name it) counts at its default
    config = small_config()
    del config["w_personal_rec"]
    assert ledger.computes_the_same(meta_with(config), now)
    assert ledger.same_identity({"args": {}, "config": config}, {"args": {}, "config": small_config()})
    assert not ledger.same_identity({"args": {}, "config": config}, {"args": {}, "config": small_config(w_personal_rec=1.0)})


def test_a_record_is_stale_when_planrec_computes_otherwise_or_other_files_differ(monkeypatch, tmp_path):
    now = ledger.code_fingerprint()
    assert not ledger.current(meta_with(small_config(), other=["train.py"]), now)        # the loop changed
    assert not ledger.current(meta_with(small_config(), dirty=True), now)                # uncommitted model code
    assert not ledger.current(meta_with(small_config(), commit="0" * 40), now)           # a commit git lacks
    # the record's commit computed another balance (Eq. (17) with 2 beta): stale
    source = (ledger.ROOT / "planrec.py").read_text()
    assert "uncertainty = torch.sigmoid(variance / beta)" in source
    changed = tmp_path / "planrec_changed.py"
    changed.write_text(source.replace("uncertainty = torch.sigmoid(variance / beta)",
                                      "uncertainty = torch.sigmoid(variance / (2 * beta))"))
    spec = importlib.util.spec_from_file_location("planrec_changed", changed)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(ledger, "planrec_at", lambda commit, root=None: module)
    ledger._probe_cached.cache_clear()
    try:
        assert not ledger.computes_the_same(meta_with(small_config(), commit="a" * 40), now)
        assert ledger.computes_the_same(meta_with(small_config(structure="shared"), commit="b" * 40), now)   # no Eq. (17)
    finally:
        ledger._probe_cached.cache_clear()


def test_a_gates_models_record_keeps_sigmoid_of_its_mask_logits(tmp_path):
    """export_structures draws keep_prob_A from Eq. (12)'s top-K for every model; for a model of our
    gates option (Config.mask_form) the record stores each entry's own keep probability instead."""
    folder, args = make_run_folder(tmp_path / "run", n_users=50)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["config"]["mask_form"] = "gates"
    (folder / "metrics.json").write_text(json.dumps(metrics))
    keep = record(tmp_path / "ledger", folder, args).structure()["keep_prob_A"]
    with np.load(folder / "structures.npz") as s:
        logits, drawn = s["mask_logits_A"].astype(np.float64), s["keep_prob_A"]
    expected = 1 / (1 + np.exp(-logits))
    expected[:, np.arange(N), np.arange(N)] = 0
    np.testing.assert_allclose(keep, expected, atol=1e-3)           # float16
    assert not np.allclose(keep, drawn, atol=1e-3)
    # a top-K model's record keeps the drawn probabilities
    metrics["config"]["mask_form"] = "topk"
    (folder / "metrics.json").write_text(json.dumps(metrics))
    np.testing.assert_array_equal(record(tmp_path / "ledger2", folder, args).structure()["keep_prob_A"],
                                  drawn.astype(np.float16).astype(np.float32))
