"""End-to-end tests of train.py on a tiny synthetic world (seconds, CPU, eager)."""

import json
import sys

import numpy as np

import pytest
import torch

import data as datalib
import planrec
import train
from analysis import attributes as attributes_lib, diagnostics
from datasets import ml1m, synthetic

TINY = ["--set", "n_factors=4", "--set", "n_user_factors=2", "--set", "factor_dim=4", "--set", "k_A=6",
        "--set", "k_e=3", "--n-mask-samples", "3", "--batch-size", "64", "--threads", "1", "--kernel", "eager"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    synthetic.make_synthetic(folder, n_users=40, n_items=400, mean_len=12, seed=0)
    return folder


def run(world, out, *extra):
    return train.main(["--data", "synthetic", "--data-dir", str(world), "--out", str(out), "--optimizer", "adam",
                       "--lr", "0.01", "--patience", "10", *TINY, *extra])


def test_two_epochs_lower_the_loss_and_write_metrics(world, tmp_path):
    summary = run(world, tmp_path / "run", "--epochs", "2")
    losses = [epoch["loss"]["total"] for epoch in summary["epochs"]]
    assert len(losses) == 2 and losses[1] < losses[0]
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(train.METRICS) <= set(written["test"])
    assert all(0.0 <= written["test"][m] <= 1.0 for m in train.METRICS)
    assert written["test"] == summary["test"]
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()


def test_same_seed_gives_the_same_metrics(world, tmp_path):
    a = run(world, tmp_path / "a", "--epochs", "1", "--seed", "3")
    b = run(world, tmp_path / "b", "--epochs", "1", "--seed", "3")
    assert a["test"] == b["test"] and a["epochs"][0]["loss"] == b["epochs"][0]["loss"]


def test_killed_run_resumes_to_the_uninterrupted_result(world, tmp_path):
    whole = run(world, tmp_path / "whole", "--epochs", "3")
    # A run killed during epoch 2 has last.pt from epoch 1, exactly what a 1-epoch run leaves.
    run(world, tmp_path / "killed", "--epochs", "1")
    resumed = run(world, tmp_path / "killed", "--epochs", "3", "--resume")
    assert [e["loss"] for e in resumed["epochs"]] == [e["loss"] for e in whole["epochs"]]
    assert [e["valid"] for e in resumed["epochs"]] == [e["valid"] for e in whole["epochs"]]
    assert resumed["test"] == whole["test"]


def test_eval_only_reproduces_the_checkpoint_metrics(world, tmp_path):
    summary = run(world, tmp_path / "run", "--epochs", "2")
    results = train.main(["--eval-only", "--checkpoint", str(tmp_path / "run" / "best.pt"),
                          "--data-dir", str(world), "--kernel", "eager"])
    assert results["test"] == summary["test"]
    best = next(e for e in summary["epochs"] if e["epoch"] == summary["best_epoch"])
    assert results["valid"] == best["valid"]


def test_checkpoints_load_with_weights_only(world, tmp_path):
    run(world, tmp_path / "run", "--epochs", "1")
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    model = planrec.PlanRec(planrec.Config(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])


def test_non_finite_loss_stops_with_the_term_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    run(world, tmp_path / "run", "--epochs", "1")
    good = (tmp_path / "run" / "last.pt").read_bytes()
    original = planrec.PlanRec.loss

    def poisoned(self, out, labels):
        total, terms = original(self, out, labels)
        terms["kl"] = terms["kl"] * float("nan")
        return total, terms

    monkeypatch.setattr(planrec.PlanRec, "loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"'kl'.*epoch 2, step 0"):
        run(world, tmp_path / "run", "--epochs", "2", "--resume")
    assert (tmp_path / "run" / "last.pt").read_bytes() == good


def test_metrics_record_the_training_positions_of_every_epoch(world, tmp_path):
    summary = run(world, tmp_path / "run", "--epochs", "2")
    n_train = len(datalib.load_dataset("synthetic", root=world).train_pos)
    assert [e["train_positions"] for e in summary["epochs"]] == [n_train, n_train]
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["train_positions"] for e in written["epochs"]] == [n_train, n_train]
    # the paper's encoder trains on rows one by one (its history sees the target), the same positions
    paper = run(world, tmp_path / "paper", "--epochs", "1", "--set", "encoder=paper")
    assert paper["epochs"][0]["train_positions"] == n_train


def small_epoch_setup(world, *extra):
    args = train.parse_args(["--data", "synthetic", *TINY, *extra])
    d = datalib.load_dataset("synthetic", root=world)
    torch.manual_seed(0)
    model = planrec.PlanRec(train.model_config(args, d))
    return args, d, model, torch.optim.Adam(model.parameters(), lr=0.01)


def test_the_loop_reads_the_device_only_every_n_steps(world, monkeypatch):
    """No host synchronization per step: between the reads of LossTerms (every --check-every steps
    and at the end of the epoch) neither train.py nor the model turns a tensor into a Python number."""
    args, d, model, optimizer = small_epoch_setup(world, "--check-every", "4")
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.endswith(("train.py", "planrec.py")):
                reads.append((frame.f_code.co_name, _name))
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    n_steps = -(-len(d.train_pos) // (64 // 2))
    assert n_steps >= 9
    losses, positions = train.train_epoch(model, optimizer, d, args, np.random.default_rng(0), torch.device("cpu"), 1)
    monkeypatch.undo()
    assert positions == len(d.train_pos) and set(losses) >= {"total", "recommend", "kl"}
    assert reads and {where for where, _ in reads} == {"read"}
    assert reads == [("read", "tolist")] * (n_steps // 4 + 1)


def test_a_non_finite_term_is_reported_at_its_first_step_when_read_later(world, monkeypatch):
    args, d, model, optimizer = small_epoch_setup(world, "--check-every", "5")
    original, calls = planrec.PlanRec.loss, []

    def poisoned(self, out, labels):
        total, terms = original(self, out, labels)
        calls.append(1)
        if len(calls) >= 3:                      # steps 2, 3, ...: 'recommend' is infinite
            terms["recommend"] = terms["recommend"] + float("inf")
        return total, terms

    monkeypatch.setattr(planrec.PlanRec, "loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"'recommend' is inf at epoch 1, step 2;"):
        train.train_epoch(model, optimizer, d, args, np.random.default_rng(0), torch.device("cpu"), 1)
    assert len(calls) == 5                       # noticed at the first read, after step 4


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "63"], "multiple of"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
    (["--eval-only", "--checkpoint", "/nonexistent/best.pt"], "no such file"),
    (["--set", "n_factorz=3"], "expected NAME=VALUE"),
    (["--set", "n_factors=three"], "not a valid"),
    (["--data", "movielens"], "invalid choice"),
    (["--drop-dependencies", "u2i,x2y"], "unknown block"),
    (["--tie-private"], "--tie-private needs --data synthetic"),
    (["--data", "synthetic", "--tie-private"], "give --attribute-prior"),
    (["--export", "x"], "--export needs --eval-only"),
    (["--preset", "nonsense"], "invalid choice"),
])
def test_bad_flags_say_what_is_wrong(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_without_a_checkpoint_says_so(world, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        run(world, tmp_path / "empty", "--epochs", "1", "--resume")


def test_unreadable_checkpoint_says_so(tmp_path):
    bad = tmp_path / "best.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        train.main(["--eval-only", "--checkpoint", str(bad)])


# ------------------------------------------------------------------------------------------------
# Issue 8: the paper's settings, attribute prior, blocked dependencies, diagnostics, export, errors
# ------------------------------------------------------------------------------------------------

class FakeData:
    n_users, n_items, name = 7, 11, "ml-1m"     # ML-1M: age is an ordered attribute
    user_attrs = {"gender": np.array([0, 1, 0, 1, 1, 0, 1]), "age": np.arange(7) % 3}
    item_attrs = {"genres": np.eye(3, dtype=np.float32)[np.arange(12) % 3], "year": np.arange(12, dtype=np.float32)}


def test_paper_settings_are_section_3_1():
    args = train.parse_args(["--paper-settings"])
    cfg = train.model_config(args, FakeData)
    assert (args.optimizer, args.lr, args.batch_size) == ("adagrad", 0.01, 4096)
    assert (cfg.embed_dim, cfg.encoder, cfg.mask_input, cfg.predict_from) == (8, "paper", "id", "e_hat")
    assert cfg.w_reconstruct == cfg.w_kl == cfg.w_struct == cfg.w_dag == 1.0
    line = train.describe_choices(cfg, args)
    assert "nowhere" in line.splitlines()[0] and "k_A=28" in line
    # the default departs, and says where
    args = train.parse_args([])
    cfg = train.model_config(args, FakeData)
    assert cfg.predict_from == "e_hat" and "optimizer adam" in train.describe_choices(cfg, args)


def test_presets_and_flags_compose():
    cfg = train.model_config(train.parse_args(["--preset", "vae_base"]), FakeData)
    assert cfg.structure == "none"
    cfg = train.model_config(train.parse_args(["--preset", "no_u2i", "--no-dag-reg"]), FakeData)
    assert cfg.drop_dependencies == "u2i,i2u" and not cfg.dag_reg
    cfg = train.model_config(train.parse_args(["--preset", "vae_base", "--structure", "shared"]), FakeData)
    assert cfg.structure == "shared"


def test_attribute_prior_ties_attributes_by_kind():
    cfg = train.model_config(train.parse_args(["--attribute-prior", "both"]), FakeData)
    assert cfg.tied_attributes == ("user.gender:class:2", "user.age:regression:1",
                                   "item.genres:multilabel:3", "item.year:regression:1")
    cfg = train.model_config(train.parse_args(["--attribute-prior", "item"]), FakeData)
    assert all(s.startswith("item.") for s in cfg.tied_attributes)
    targets = attributes_lib.AttributeTargets(FakeData, cfg, torch.device("cpu"))
    year = targets.tables["item.year"][1:]
    assert abs(float(year.mean())) < 1e-6 and abs(float(year.std(unbiased=False)) - 1) < 1e-5


def test_attribute_prior_blocked_dependencies_diagnostics_and_export(world, tmp_path):
    summary = run(world, tmp_path / "run", "--epochs", "1", "--attribute-prior", "both", "--tie-private",
                  "--drop-dependencies", "i2u", "--set", "n_factors=6", "--set", "n_user_factors=3", "--set", "k_A=20")
    cfg = planrec.Config(**summary["config"])
    assert planrec.factor_names(cfg)[:3] == ["user.gender", "user.age", "user.occupation"]
    assert summary["test"]["attributes"]["user.gender"]["accuracy"] >= 0
    p = summary["test"]["personalization"]
    assert set(p) >= {"uncertainty_mean", "uncertainty_p10", "uncertainty_p50", "uncertainty_p90",
                      "personal_weight_mean", "distinct_masks_mean", "mask_on_shared_support", "dag", "acyclic"}
    assert 0.5 <= p["uncertainty_p10"] <= p["uncertainty_p50"] <= p["uncertainty_p90"] <= 1
    assert p["personal_weight_mean"] == pytest.approx(1 - p["uncertainty_mean"])
    assert 1 <= p["distinct_masks_mean"] <= 3 and 0 <= p["mask_on_shared_support"] <= 1
    assert "personalization" in summary["epochs"][0]["valid"]
    results = train.main(["--eval-only", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data-dir", str(world),
                          "--kernel", "eager", "--export", str(tmp_path / "export")])
    assert results["test"]["attributes"] == summary["test"]["attributes"]
    with np.load(tmp_path / "export" / "structures.npz") as f:
        s = {k: f[k] for k in f.files}
    U, N = 40, 6
    support = planrec.dependency_support(cfg).numpy()
    k_A = min(cfg.k_A, int(support.sum()))            # K_A is clipped to the allowed entries
    assert s["shared_A"].shape == (N, N) and (s["shared_A"][~support] == 0).all()
    assert list(s["factor_names"]) == planrec.factor_names(cfg) and len(s["user_ids"]) == U
    assert s["keep_prob_A"].shape == (U, N, N) and s["keep_prob_e"].shape == (U, N)
    np.testing.assert_allclose(s["keep_prob_A"].sum((1, 2)), k_A, rtol=1e-5)
    np.testing.assert_allclose(s["keep_prob_e"].sum(1), cfg.k_e, rtol=1e-5)
    assert (s["keep_prob_A"][:, ~support] == 0).all()
    assert s["uncertainty"].shape == (U,) and ((s["uncertainty"] >= 0.5) & (s["uncertainty"] <= 1)).all()
    assert s["activeness"].sum() > 0 and s["mask_logits_A"].shape == (U, N, N)


def test_distinct_masks_counts_first_occurrences():
    mask_A = torch.zeros(2, 4, 3, 3)
    mask_e = torch.zeros(2, 4, 3)
    mask_A[0, 1, 0, 1] = 1          # row 0: samples 0, 2, 3 equal; sample 1 differs -> 2
    mask_e[1, :, 0] = 1
    mask_e[1, 2, 1] = 1             # row 1: samples 0, 1, 3 equal, 2 differs -> 2
    mask_e[1, 3, 2] = 1             # ... and 3 differs too -> 3
    assert diagnostics.distinct_masks(mask_A, mask_e).tolist() == [2.0, 3.0]


def test_missing_movielens_offline_is_one_message(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(ml1m, "_urlopen", offline)
    monkeypatch.delenv("PLANREC_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", "ml-1m", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "run")])
    assert str(exit_info.value.code).startswith("error: ") and "ml-1m" in str(exit_info.value.code).lower()


def test_checkpoint_of_another_model_is_one_message(world, tmp_path):
    run(world, tmp_path / "run", "--epochs", "1")
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    ckpt["config"]["factor_dim"] = 5                # the weights no longer fit the config
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="does not fit the model"):
        train.main(["--eval-only", "--checkpoint", str(tmp_path / "other.pt"), "--data-dir", str(world), "--kernel", "eager"])
