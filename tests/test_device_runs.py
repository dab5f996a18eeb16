"""analysis/device_runs.py on the tiny synthetic world, on the CPU: the ledger's missing runs are
found, trained several at once and archived, the archive joins a ledger from which the report is
rebuilt without training, and the agreement check compares a retrained run with the ledger's."""

import tarfile

import pytest

from analysis import device_runs, experiments as ex, ledger
from test_experiments import TINY_TRAINING, experiment_argv, worlds  # noqa: F401 (a fixture)

TABLE6_KEYS = {f"synthetic-{k}" for k in ("planrec", "no-u2i", "no-u2u-i2i")}


def call_argv(worlds, out, ledger_dir, *more):
    return [str(out), "table6", "--data", "synthetic", "--data-dir", str(worlds / "synthetic"), "--budget", "quick",
            "--seeds", "0", "1", "--train-args", " ".join(TINY_TRAINING), "--device", "cpu", "--jobs", "2",
            "--ledger", str(ledger_dir), "--budget-s", "600", "--run-s", "1", *more]


def names(tar_path):
    with tarfile.open(tar_path) as tar:
        return sorted(m.name for m in tar.getmembers())


@pytest.fixture(scope="module")
def filled(worlds, tmp_path_factory):  # noqa: F811
    """An empty ledger, the call that trains table6's six missing runs, and the records taken into it."""
    root = tmp_path_factory.mktemp("device_runs")
    ledger_dir = root / "ledger"
    ledger_dir.mkdir()
    summary = device_runs.main(call_argv(worlds, root / "out", ledger_dir, "--no-check"))
    assert len(device_runs.take(root / "out" / "records.tar", ledger_dir)) == 6
    return root, ledger_dir, summary


def test_the_missing_runs_are_trained_archived_and_taken_into_the_ledger(filled, worlds):  # noqa: F811
    root, ledger_dir, summary = filled
    archived = names(root / "out" / "records.tar")
    assert len(archived) == 6
    assert {name.rsplit("-seed", 1)[0] for name in archived} == TABLE6_KEYS
    assert summary.count("test NDCG@10") == 6 and "6 missing run(s)" in summary
    assert device_runs.take(root / "out" / "records.tar", ledger_dir) == []        # the fixture took them
    assert sorted(p.name for p in ledger_dir.glob("*.npz")) == archived
    assert (root / "out" / "logs.tar.gz").is_file() and (root / "out" / "summary.txt").read_text() == summary
    # The report is rebuilt from the taken records alone: --from-ledger trains nothing and finds them all.
    runs = ex.main(experiment_argv(worlds, root / "report", "table6", ledger=ledger_dir) + ["--from-ledger"])
    assert {key for key in runs.records} == TABLE6_KEYS
    assert (root / "report" / "table6.json").is_file()


def test_nothing_missing_means_nothing_trained_and_the_check_agrees_with_the_same_machine(filled, worlds, tmp_path):  # noqa: F811
    _, ledger_dir, _ = filled
    before = sorted(ledger_dir.glob("*.npz"))
    summary = device_runs.main(call_argv(worlds, tmp_path, ledger_dir))
    assert "0 missing run(s)" in summary and not (tmp_path / "records.tar").exists()
    # The check run retrains planrec seed 0: the same identity, so the same record name as the ledger's,
    # and on the same machine and code the same numbers, inside any spread.
    seed0 = [p.name for p in before if p.name.startswith("synthetic-planrec-seed0-")]
    assert names(tmp_path / "check.tar") == seed0
    assert "|this - ledger seed 0| = 0.0000" in summary and "verdict: agree" in summary
    assert sorted(ledger_dir.glob("*.npz")) == before                              # the ledger is only read


def test_no_run_starts_without_the_time_it_needs(worlds, tmp_path):  # noqa: F811
    empty = tmp_path / "ledger"
    empty.mkdir()
    summary = device_runs.main(call_argv(worlds, tmp_path / "out", empty, "--no-check", "--run-s", "1000"))
    assert summary.count("not started") == 6 and not (tmp_path / "out" / "records.tar").exists()


def test_stopped_runs_are_packed_to_resume_and_a_call_resumes_them_first(filled, worlds, tmp_path, monkeypatch):  # noqa: F811
    """A folder with last.pt and no record is packed into partial-K.tar (one archive per PARTIAL_MIB,
    at most PARTIAL_FILES); extracted and passed to --resume-from, the next call plans it as a
    resume, before the new runs."""
    _, ledger_dir, _ = filled
    args = device_runs.parse_args(call_argv(worlds, tmp_path / "out", ledger_dir, "--work", str(tmp_path / "work")))
    call = device_runs.Call(args)
    for name, size in (("synthetic-vae-seed0", 300_000), ("synthetic-no-u2i-seed1", 300_000), ("synthetic-ssl-seed0", 900_000)):
        (call.folders / name).mkdir()
        (call.folders / name / "last.pt").write_bytes(b"x" * size)
    (call.ledgers["runs"] / "synthetic-vae-seed0-0123456789.npz").write_bytes(b"")  # this one finished
    monkeypatch.setattr(device_runs, "PARTIAL_MIB", 0.5)
    monkeypatch.setattr(device_runs, "PARTIAL_FILES", 1)
    packed, left_out = call.write_partials()
    assert packed == ["synthetic-no-u2i-seed1"] and left_out == ["synthetic-ssl-seed0"]
    assert names(tmp_path / "out" / "partial-1.tar") == ["synthetic-no-u2i-seed1", "synthetic-no-u2i-seed1/last.pt"]

    brought = tmp_path / "brought"
    with tarfile.open(tmp_path / "out" / "partial-1.tar") as tar:
        tar.extractall(brought, filter="data")
    empty = tmp_path / "empty-ledger"
    empty.mkdir()
    args = device_runs.parse_args(call_argv(worlds, tmp_path / "out2", empty, "--resume-from", str(brought)))
    call = device_runs.Call(args)
    assert (call.folders / "synthetic-no-u2i-seed1" / "last.pt").read_bytes() == b"x" * 300_000
    runs = device_runs.missing_runs(args, call.work / "runs")
    assert runs[0] == ("synthetic-no-u2i", 1) and len(runs) == 6


def test_take_refuses_what_is_not_a_records_archive(tmp_path):
    odd = tmp_path / "odd.tar"
    (tmp_path / "notes.txt").write_text("x")
    with tarfile.open(odd, "w") as tar:
        tar.add(tmp_path / "notes.txt", arcname="notes.txt")
    with pytest.raises(SystemExit, match="not a ledger record"):
        device_runs.take(odd, tmp_path)


def test_a_cuda_call_without_cuda_says_what_to_do(capsys, tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        device_runs.parse_args([str(tmp_path)])
    assert "--device cpu" in capsys.readouterr().err
