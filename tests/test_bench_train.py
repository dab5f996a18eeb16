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
