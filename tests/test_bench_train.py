"""bench_train.py at toy sizes: it runs, prints its table, and its part-by-part profile adds up."""

import re

import pytest

from benchmarks import bench_train


def test_table_prints_every_structure(capsys):
    bench_train.main(["--rows", "4", "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    for structure in ("none", "shared", "personalized"):
        assert re.search(rf"^\s*{structure} \|\s+\d+ ms$", out, re.M), out


def test_parts_cover_the_step(capsys):
    bench_train.main(["--parts", "--rows", "4", "--steps", "2", "--warmup", "1", "--structures", "personalized"])
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 3 and cells[0] in ("step", "forward", "backward"):
            rows[(cells[0], cells[1])] = float(cells[2])
    forward_parts = {name: ms for (section, name), ms in rows.items() if section == "forward"}
    assert {"encoder, Eq. (2)-(6)", "g of Eq. (8) and (14)", "masks and solve, Eq. (12)-(13)",
            "MLP_mask, Eq. (11)", "MLP_R*, Eq. (15)"} <= set(forward_parts)
    # the timed parts are disjoint pieces of the forward (hooks are not nested), so they cannot exceed it
    assert sum(forward_parts.values()) <= rows[("step", "forward + loss")] * 1.05 + 0.5
    assert any(section == "backward" and "_ParentMaskedLinearBackward" in name for section, name in rows)


def test_parts_refuses_compare():
    with pytest.raises(SystemExit):
        bench_train.main(["--parts", "--compare", "HEAD"])


def test_probe_schedule_prints_each_epoch_and_the_test(tmp_path, capsys):
    from benchmarks import probe_schedule
    from datasets import synthetic
    from test_train import TINY
    synthetic.make_synthetic(tmp_path / "world", n_users=40, n_items=400, mean_len=12, seed=0)
    probe_schedule.main(["halving", "0.02", "2", "--data", "synthetic", "--data-dir", str(tmp_path / "world"), *TINY])
    lines = capsys.readouterr().out.strip().splitlines()[-3:]
    assert [re.match(r"halving lr 0.02 epoch (\d): valid NDCG@10 0\.\d{4} \(\d+ s\)$", l).group(1) for l in lines[:2]] == ["1", "2"]
    assert re.match(r"halving lr 0.02: test NDCG@10 0\.\d{4} \(\d+ s\)$", lines[2])
    assert probe_schedule.SCHEDULES["halving"](0.02, 30, 60, 10) == pytest.approx(0.02 / 8)
    assert probe_schedule.SCHEDULES["cosine"](0.01, 60, 60, 10) == pytest.approx(0.0, abs=1e-12)


def test_compare_times_a_commits_planrec_with_its_own_g_kernel(capsys):
    old = bench_train.load_planrec("HEAD")
    assert old.tuned_g is not None and old.tuned_g.__module__ == "factor_mlps_HEAD"
    assert bench_train.load_planrec().tuned_g is bench_train.factor_mlps
    bench_train.main(["--compare", "HEAD", "--rows", "4", "--steps", "1", "--warmup", "0", "--structures", "personalized"])
    assert re.search(r"^\s*personalized \|\s+\d+ ms \|\s+\d+ ms \| \d+\.\d\dx$", capsys.readouterr().out, re.M)
