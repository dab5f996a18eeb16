"""End-to-end tests of train.py on a tiny synthetic world (seconds, CPU, eager)."""

import json

import pytest
import torch

import data as datalib
import planrec
import train

TINY = ["--set", "n_factors=4", "--set", "n_user_factors=2", "--set", "factor_dim=4", "--set", "k_A=6",
        "--set", "k_e=3", "--n-mask-samples", "3", "--batch-size", "64", "--threads", "1", "--kernel", "eager"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    datalib.make_synthetic(folder, n_users=40, n_items=400, mean_len=12, seed=0)
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


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "63"], "multiple of"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
    (["--eval-only", "--checkpoint", "/nonexistent/best.pt"], "no such file"),
    (["--set", "n_factorz=3"], "expected NAME=VALUE"),
    (["--set", "n_factors=three"], "not a valid"),
    (["--data", "movielens"], "invalid choice"),
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
