"""experiments.py on tiny synthetic runs (seconds): every table builder, the statistics, the
structure-recovery metrics, the figures, the ledger (records read first, reports rebuilt from it
alone, stale records retrained), reuse and resume of run folders."""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import data as datalib
from datasets import synthetic
from analysis import experiments as ex, ledger
import train
from test_ledger import copy_model_code
from test_train import TINY

# The tiny model of test_train.py, without its N_m (the configurations set their own), trained for 2 steps.
TINY_MODEL = [a for i, a in enumerate(TINY) if "--n-mask-samples" not in TINY[max(i - 1, 0):i + 1]]
TINY_TRAINING = TINY_MODEL + ["--epochs", "1", "--max-steps", "2"]
TINY_WORLD = dict(n_users=40, n_items=400, mean_len=12, seed=0)
SEEDS = ["0", "1"]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("worlds")
    for world, options in ex.WORLDS.items():
        synthetic.make_synthetic(root / world, **TINY_WORLD, **options)
    return root


def experiment_argv(worlds, out, *names, ledger=None):
    """The experiments on the tiny worlds, with a ledger of their own (OUT/ledger unless given):
    never the repository's."""
    return [*names, "--budget", "quick", "--seeds", *SEEDS, "--out", str(out), "--data", "synthetic",
            "--data-dir", str(worlds / "synthetic"), "--synthetic-dir", str(worlds),
            "--train-args", " ".join(TINY_TRAINING), "--ledger", str(ledger or Path(out) / "ledger")]


@pytest.fixture(scope="module")
def everything(worlds, tmp_path_factory):
    """All experiments once on the tiny worlds (the synthetic world stands in for ML-1M)."""
    out = tmp_path_factory.mktemp("experiments")
    ex.main(experiment_argv(worlds, out, "all"))
    return out


def read(out, name):
    return json.loads((out / f"{name}.json").read_text())


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------

def test_permutation_test_identical_inputs_give_p_one():
    a = np.random.default_rng(0).random(50)
    assert ex.sign_flip_test(a, a.copy()) == 1.0


def test_permutation_test_constant_shift_gives_the_smallest_p():
    a = np.random.default_rng(1).random(40)
    p = ex.sign_flip_test(a + 0.1, a)
    assert p == pytest.approx(2 / (1 + ex.MIN_PERMUTATIONS))    # no sign vector reaches the observed mean
    assert ex.sign_flip_test(a, a + 0.1) == p                     # two-sided


def test_permutation_test_on_per_user_ndcg_finds_a_real_difference_and_not_a_null_one():
    """Per-user NDCG@10 of 2,000 users. The other model ranks a fifth of the users' positives as a
    reshuffle of ours (no difference in the mean), then moves the positive up two places for 10 %
    (a small true difference) or 30 % (a clear one) of the users."""
    rng = np.random.default_rng(5)
    rank = np.minimum(rng.geometric(0.08, 2000) - 1, 100)
    ndcg = lambda r: np.where(r < 10, 1.0 / np.log2(r + 2.0), 0.0)
    shuffled = rng.random(2000) < 0.2
    other = rank.copy()
    other[shuffled] = rng.permutation(rank[shuffled])
    none, small, clear = (ndcg(np.where(rng.random(2000) < share, np.maximum(other - 2, 0), other))
                          for share in (0.0, 0.1, 0.3))
    base = ndcg(rank)
    assert ex.sign_flip_test(none, base) > 0.9
    assert ex.sign_flip_test(clear, base) == pytest.approx(2 / (1 + ex.MIN_PERMUTATIONS))
    p = ex.sign_flip_test(small, base)
    assert p < 0.05
    # At this n the paired t-test has the same null: agreement within Monte Carlo error (s.e. 0.0016).
    assert p == pytest.approx(stats.ttest_rel(small, base).pvalue, abs=0.01)
    assert ex.sign_flip_test(small, base) == p                    # a fixed seed repeats exactly
    assert ex.sign_flip_test(small, base, seed=1) != p            # another seed: other sign vectors


def test_permutation_test_is_invariant_to_user_order():
    rng = np.random.default_rng(2)
    a, b = rng.random(60), rng.random(60) + 0.05
    order = rng.permutation(60)
    p = ex.sign_flip_test(a, b, seed=3)
    assert ex.sign_flip_test(a[order], b[order], seed=3) == p
    assert 0 < p < 1


def test_permutation_test_is_exact_for_few_users():
    """2**5 = 32 sign vectors <= 10,000: all are enumerated. d = (1, 2, 3, 4, 5): mean(s * d) >= 3
    only for all signs +1, so the two-sided p is 2 / 32."""
    assert ex.sign_flip_test(np.arange(1.0, 6.0), np.zeros(5)) == pytest.approx(2 / 32)


def test_permutation_test_rejects_unpaired_inputs():
    with pytest.raises(ValueError, match="paired"):
        ex.sign_flip_test(np.zeros(3), np.zeros(4))


def test_welch_test_matches_known_t_distribution_values():
    # Two groups of 6 with equal variance 3.5: df = 10; a shift of 2 standard errors gives t = 2,
    # whose two-sided p is 0.07339 (tables of Student's t).
    y = np.arange(6.0)
    t, df, p = ex.welch_t_test(y + 2 * math.sqrt(2 * 3.5 / 6), y)
    assert (t, df) == (pytest.approx(2.0), pytest.approx(10.0))
    assert p == pytest.approx(0.07339, abs=1e-4)
    assert ex.welch_t_test(y, y + 2 * math.sqrt(2 * 3.5 / 6))[0] == pytest.approx(-2.0)
    # Unequal sizes and variances: the Welch-Satterthwaite df.
    x, z = np.array([1.0, 2.0, 3.0, 5.0]), np.array([2.0, 3.0, 4.0, 9.0, 7.0, 1.0])
    vx, vz = x.var(ddof=1) / 4, z.var(ddof=1) / 6
    t, df, p = ex.welch_t_test(x, z)
    assert t == pytest.approx((x.mean() - z.mean()) / math.sqrt(vx + vz))
    assert df == pytest.approx((vx + vz) ** 2 / (vx ** 2 / 3 + vz ** 2 / 5))
    t, df, p = ex.welch_t_test([1, 2, 3, 4], [1, 2, 3, 4])
    assert t == 0 and p == pytest.approx(1.0)
    t, df, p = ex.welch_t_test(np.arange(30) + 10.0, np.arange(30.0))
    assert t > 0 and p < 1e-3


def test_welch_test_in_the_papers_figure3_regime_and_degenerate_inputs():
    rng = np.random.default_rng(6)
    t, df, p = ex.welch_t_test(rng.normal(0.6, 0.1, 3000), rng.normal(0.53, 0.1, 3040))
    assert t > 20 and 6000 < df < 6040 and 0 < p < 1e-100       # tiny p, not rounded to 0
    assert all(math.isnan(v) for v in ex.welch_t_test([1.0, 1.0, 1.0], [1.0, 1.0]))   # no variance
    assert all(math.isnan(v) for v in ex.welch_t_test([1.0], [1.0, 2.0]))             # one value


def test_correlations_on_hand_made_data():
    x = np.arange(20.0)
    r, p = ex.correlation(x, 3 * x + 1)
    assert r == pytest.approx(1.0, abs=1e-12) and p == 0.0
    r, p = ex.correlation(x, -x, rank=True)
    assert r == pytest.approx(-1.0) and p == 0.0
    # Pearson r = 2 / sqrt(14) on 12 points: t = r sqrt(10 / (1 - r^2)) = 2 with 10 df, p = 0.07339.
    u = np.arange(12.0) - 5.5
    v = np.array([1.0, -1.0] * 6) * np.array([1.0] * 6 + [-1.0] * 6)   # centred, orthogonal to u
    v -= v.mean()
    v -= (v @ u) / (u @ u) * u
    r_true = 2 / math.sqrt(14)
    r, p = ex.correlation(u, r_true * u / np.linalg.norm(u) + math.sqrt(1 - r_true ** 2) * v / np.linalg.norm(v))
    assert r == pytest.approx(r_true) and p == pytest.approx(0.07339, abs=1e-4)
    # Spearman is Pearson on ranks, ties averaged: [3, 1, 3, 2] ranks as [3.5, 1, 3.5, 2].
    a, b = [3, 1, 3, 2, 5], [10, 1, 20, 2, 30]
    r, p = ex.correlation(a, b, rank=True)
    assert r == pytest.approx(np.corrcoef([3.5, 1, 3.5, 2, 5], [3, 1, 4, 2, 5])[0, 1])
    r, p = ex.correlation(x, np.exp(x / 5) * np.array([1, 1.01] * 10), rank=True)
    assert r > 0.99 and p < 1e-10
    for rank in (False, True):                                    # undefined: nan, not a warning's value
        assert all(math.isnan(v) for v in ex.correlation(x, np.ones(20), rank=rank))
        assert all(math.isnan(v) for v in ex.correlation([1.0, 2.0], [2.0, 1.0], rank=rank))


def test_roc_auc_on_hand_made_scores_with_ties():
    # Positives 0.9 and 0.5 against negatives 0.5 and 0.1: 3 wins and one tie of 4 pairs.
    assert ex.roc_auc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)
    assert ex.roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert ex.roc_auc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert ex.roc_auc(np.ones(5), [1, 0, 1, 0, 0]) == 0.5           # all ties
    assert math.isnan(ex.roc_auc([1.0, 2.0], [1, 1])) and math.isnan(ex.roc_auc([1.0, 2.0], [0, 0]))
    rng = np.random.default_rng(7)                                   # against every pair, integer scores
    scores, labels = rng.integers(0, 4, 200).astype(float), rng.random(200) < 0.4
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    assert ex.roc_auc(scores, labels) == pytest.approx(((pos > neg) + 0.5 * (pos == neg)).mean())


def test_table_tests_the_per_user_metrics_that_average_to_ranking_metrics():
    scores = np.random.default_rng(4).random((30, 101))
    scores[:5, 0] = 2.0                                           # some users rank the positive first
    per_user = datalib.per_user_metrics(scores, ks=(5, 10))
    overall = datalib.ranking_metrics(scores)
    for m in ex.TESTED:
        assert per_user[m].shape == (30,) and per_user[m].mean() == pytest.approx(overall[m])


# ------------------------------------------------------------------------------------------------
# Interest consistency (section 3.3.2)
# ------------------------------------------------------------------------------------------------

def test_interest_consistency_equal_halves_vs_disjoint_categories():
    genres = np.zeros((7, 3))
    genres[[1, 2], 0] = 1          # items 1, 2: genre 0
    genres[[3, 4], 1] = 1          # items 3, 4: genre 1
    genres[5, 2] = 1               # item 5: genre 2
    genres[6, [0, 1]] = 1          # item 6: genres 0 and 1
    sequences = [[1, 3, 2, 4],     # halves (1, 3) and (2, 4): the same genre distribution
                 [1, 2, 3, 4],     # genre 0, then genre 1: disjoint
                 [1, 3, 5, 2, 4, 5],
                 [6, 1, 3]]        # (6) vs (1, 3): both half genre 0, half genre 1
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])])
    consistency = datalib.interest_consistency(np.concatenate(sequences), offsets, genres)
    np.testing.assert_allclose(consistency, [1.0, 0.0, 1.0, 1.0], atol=1e-12)
    partly = datalib.interest_consistency(np.array([1, 2, 1, 3]), np.array([0, 4]), genres)
    assert 0 < partly[0] < 1


# ------------------------------------------------------------------------------------------------
# Structure recovery metrics on hand-made matrices
# ------------------------------------------------------------------------------------------------

NAMES = ["user.gender", "user.age", "user.occupation", "user_3", "item.genres", "item.year", "item_6", "item_7"]


def truth_with(deviation):
    nodes = np.array(synthetic.SYNTHETIC_NODES)
    adjacency = np.zeros((7, 7), dtype=np.int8)
    for a, b in synthetic.SYNTHETIC_EDGES:
        adjacency[list(nodes).index(a), list(nodes).index(b)] = 1
    return {"nodes": nodes, "adjacency": adjacency, "edges": np.array(synthetic.SYNTHETIC_EDGES),
            "user_deviation": np.asarray(deviation)}


def test_structure_metrics_on_the_true_and_the_reversed_dag():
    deviation = np.array([-1, 0, 0, -1, 2, 2, -1, 1])
    truth = truth_with(deviation)
    A = np.zeros((8, 8))
    A[0, 4], A[1, 5] = 1.0, 0.8                       # group -> category, age -> era
    A[2, 3] = 0.1                                     # a weak edge, under the threshold
    keep = np.full((8, 8, 8), 0.5)
    keep[deviation == 0, 0, 4] = 0.1                  # users who dropped group -> category mask it more
    keep[deviation == 2, 1, 5] = 0.2                  # likewise age -> era
    m = ex.structure_metrics(A, NAMES, keep, np.arange(1, 9), truth)
    assert m["edge_auc"] == 1.0 and m["edge_auc_undirected"] == 1.0
    assert m["shd"] == 0 and m["n_true_edges"] == 2 and m["n_learned_edges"] == 2
    assert m["deviation_auc"] == 1.0
    assert m["block_share"]["u2i"] == pytest.approx(1.8 / 1.9)

    reversed_A = A.T.copy()                           # the right pairs, the wrong direction
    m = ex.structure_metrics(reversed_A, NAMES, np.full((8, 8, 8), 0.5), np.arange(1, 9), truth)
    assert m["edge_auc"] == 0.5                       # nothing on the user -> item entries
    assert m["edge_auc_undirected"] == 1.0
    assert m["shd"] == 2                              # two reversed edges
    assert m["deviation_auc"] == 0.5                  # identical masks: chance
    assert m["block_share"]["i2u"] == pytest.approx(1.8 / 1.9)


def test_shd_counts_missing_and_extra_edges():
    truth = truth_with(np.full(8, -1))
    A = np.zeros((8, 8))
    A[0, 4] = 1.0                                     # one true edge found, age -> era missing
    A[2, 5] = 0.9                                     # one edge that is not there
    m = ex.structure_metrics(A, NAMES, np.full((8, 8, 8), 0.5), np.arange(1, 9), truth)
    assert m["shd"] == 2 and math.isnan(m["deviation_auc"])   # nobody deviates: no AUC
    assert 0 < m["edge_auc"] < 1


# ------------------------------------------------------------------------------------------------
# The experiments end to end on tiny runs
# ------------------------------------------------------------------------------------------------

def test_list_names_every_experiment(capsys):
    ex.main(["--list"])
    out = capsys.readouterr().out
    assert all(e.name in out for e in ex.EXPERIMENTS) and "Table 2" in out and "Figure 4" in out


@pytest.mark.parametrize("argv, message", [
    (["table9", "--out", "x"], "unknown experiment"),
    (["table2"], "--out DIR is required"),
    (["table2", "--out", "x", "--seeds", "0", "0"], "distinct"),
    (["table2", "--out", "x", "--permutations", "100"], "at least 10000"),
    (["table2", "--out", "x", "--reuse-run", "ml-1m-planrec=runs/x"], "{seed}"),
    (["table2", "--out", "x", "--reuse-run", "nonsense=runs/x-{seed}"], "KEY=PATTERN"),
    (["table2", "--out", "x", "--train-args", "--seed 3"], "may not set"),
    ([], "at least one experiment"),
])
def test_bad_arguments_say_what_is_wrong(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ex.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def check_rows(rows, labels, n_seeds=2):
    assert [r["label"] for r in rows] == labels
    for r in rows:
        for m in ex.METRICS:
            v = r["metrics"][m]
            assert 0 <= v["min"] <= v["mean"] <= v["max"] <= 1
            assert len(v["per_seed"]) == (n_seeds if r["run"] else 1)
        for other in r["compared_with"]:
            assert set(r["p_values"][other]) == set(ex.TESTED)
            assert all(0 < p <= 1 for p in r["p_values"][other].values())


def test_table2_rows_p_values_and_csv(everything):
    numbers = read(everything, "table2")
    check_rows(numbers["rows"], ["VAE base", "popularity", "PlanRec"])
    planrec = numbers["rows"][2]
    assert planrec["compared_with"] == ["VAE base", "popularity"] and planrec["paper"]["ndcg@10"] == 0.3928
    # the row's metrics are those train.py wrote for the same runs
    written = [json.loads((everything / "runs" / f"synthetic-planrec-seed{s}" / "metrics.json").read_text())
               for s in SEEDS]
    assert planrec["metrics"]["ndcg@10"]["per_seed"] == pytest.approx([w["test"]["ndcg@10"] for w in written])
    with open(everything / "table2.csv") as f:
        lines = list(csv.DictReader(f))
    assert {(l["row"], l["source"], l["compared_with"]) for l in lines} >= {
        ("PlanRec", "ours", "VAE base"), ("PlanRec", "ours", "popularity"), ("PlanRec", "paper", "best baseline")}
    assert numbers["budget_flags"]["main"] == ["--epochs", "1", "--max-steps", "60"]


def test_tables_3_to_8(everything):
    check_rows(read(everything, "table3")["rows"], ["N_m = 1", "N_m = 2", "N_m = 4", "N_m = 8"])
    configs = [json.loads((everything / "runs" / f"synthetic-{k}-seed0" / "metrics.json").read_text())["config"]
               for k in ("psl", "nm2", "nm4", "planrec")]
    assert [c["n_mask_samples"] for c in configs] == [1, 2, 4, 8]
    table4 = read(everything, "table4")
    check_rows(table4["synthetic"], ["IID Base", "IID PlanRec", "OOD Base", "OOD PlanRec"])
    check_rows(table4["real"], ["IID Base", "IID PlanRec", "OOD Base", "OOD PlanRec"])
    assert table4["n_ood"] + table4["n_iid"] == 40 and table4["real"][2]["n_users"] == table4["n_ood"]
    check_rows(read(everything, "table5")["rows"], ["Base", "Base w. ui", "PlanRec", "PlanRec w. u", "PlanRec w. i",
                                                    "PlanRec w. ui"])
    attributes = read(everything, "table5")["attributes"]["PlanRec w. ui"]
    per_seed = [json.loads((everything / "runs" / f"synthetic-planrec-ui-seed{s}" / "metrics.json").read_text())
                ["test"]["attributes"] for s in SEEDS]
    assert attributes and all(attributes[name][k] == pytest.approx(np.mean([p[name][k] for p in per_seed]))
                              for name in attributes for k in attributes[name])
    check_rows(read(everything, "table6")["rows"], ["PlanRec", "w/o u2i", "w/o u2u & i2i"])
    check_rows(read(everything, "table7")["components"], ["VAE", "+SSL", "+PSL", "+Uncer"])
    regularizers = read(everything, "table8")["regularizers"]
    check_rows(regularizers, ["Base", "+RecR", "+AcyR", "+DepR"])
    assert regularizers[3]["compared_with"] == ["+AcyR"]
    for name in ("table3", "table4_synthetic", "table4_real", "table5", "table6", "table7", "table8"):
        assert (everything / f"{name}.csv").stat().st_size > 0


def test_figures_are_written(everything):
    for name in ("figure3.png", "figure4_structures.png", "figure4_genres.png", "structure_recovery.png"):
        assert (everything / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure3 = read(everything, "figure3")
    assert len(figure3["per_seed"]) == 2
    for stats in figure3["per_seed"]:
        for x in ("consistency", "activeness"):
            r, p = stats[x]["pearson"]
            assert -1 <= r <= 1 and 0 <= p <= 1
    assert figure3["activeness_test"]["n_high"] + figure3["activeness_test"]["n_low"] == 40
    figure4 = read(everything, "figure4")
    assert len(figure4["four_users"]) == 4 and "user.gender" in figure4["factor_names"]
    assert all(-1 <= s["spearman"] <= 1 for s in figure4["per_seed"])


def test_figure4_judges_the_papers_three_claims(everything):
    """Gender -> Genre against A's other entries, the rank correlation of genre distance with its
    masking, and the genres that differ by gender against what chance gives."""
    figure4 = read(everything, "figure4")
    names = figure4["factor_names"]
    g, c = names.index("user.gender"), names.index("item.genres")
    strength = np.mean([np.abs(np.load(everything / "runs" / f"synthetic-planrec-ui-seed{s}" / "structures.npz")
                               ["shared_A"]) for s in SEEDS], axis=0)
    off_diagonal = strength[~np.eye(len(names), dtype=bool)]
    entry, correlation, genres = figure4["claims"]
    assert all(claim["table"] == "figure4" for claim in figure4["claims"])
    assert entry["p"] == pytest.approx(np.sum(off_diagonal >= strength[g, c]) / off_diagonal.size)
    assert entry["p"] >= 1 / off_diagonal.size                      # the entry counts itself
    r = float(correlation["ours_text"].split("=")[1])
    assert -1 <= r <= 1 and 0 <= correlation["p"] <= 1
    assert correlation["verdict"] == ex.claim_verdict(1.0, r, correlation["p"], True)
    p_values = list(figure4["genre_p_values"].values())
    assert figure4["genres_differing"] == sum(p < 0.05 for p in p_values)
    assert genres["p"] == pytest.approx(stats.binomtest(figure4["genres_differing"], len(p_values), 0.05,
                                                        alternative="greater").pvalue)
    assert genres["verdict"] == ex.claim_verdict(1.0, 1.0, genres["p"], False)


def test_structure_recovery_reports_the_main_row_at_top_level(everything):
    numbers = read(everything, "structure-recovery-v1")
    rows = {r["row"]: r for r in numbers["rows"]}
    assert list(rows) == list(ex.SR_ROWS)
    main = rows["synth-sr-main"]["summary"]
    for key in ("edge_auc", "shd", "deviation_auc"):
        assert numbers[key] == pytest.approx(main[key]["mean"])
    assert 0 <= numbers["edge_auc"] <= 1 and numbers["shd"] >= 0
    # the i2u prior leaves nothing in the item -> user block; without it there is
    assert rows["synth-sr-main"]["block_share"]["i2u"] == 0 and rows["synth-sr-no-i2u"]["block_share"]["i2u"] > 0
    tie_all = json.loads((everything / "runs" / "synth-sr-tie-all-seed0" / "metrics.json").read_text())["args"]
    assert tie_all["tie_private"] and tie_all["drop_dependencies"] == "i2u" and tie_all["attribute_prior"] == "both"
    assert set(rows["synth-sr-main"]["per_seed"][0]["tied_factors"]) <= set(ex.FACTOR_NODES)
    report = (everything / "REPORT.md").read_text()
    assert "Why heads on e-hat alone invent" in report and "deviation AUC" in report


def test_report_has_every_experiment_in_the_paper_order(everything):
    report = (everything / "REPORT.md").read_text()
    positions = [report.index(e.title) for e in ex.EXPERIMENTS if e.in_all]   # structure-recovery runs only when named
    assert positions == sorted(positions)
    assert "--epochs 1 --max-steps 60" in report and "paper" in report


def test_quick_is_a_smoke_test_in_every_json_table_and_report(everything):
    for e in (e for e in ex.EXPERIMENTS if e.in_all):
        numbers = read(everything, e.name)
        assert (numbers["budget"], numbers["smoke_test"], numbers["seeds"]) == ("quick", True, [int(s) for s in SEEDS])
        assert ex.SMOKE_TEST_NOTE in numbers["markdown"] and len(numbers["records"]) >= 2
        assert all(r["budget"] == "quick" for r in numbers["records"].values())
    assert read(everything, "table2")["markdown"].count("SMOKE TEST (quick budget), not a result") == 1
    assert [read(everything, t)["markdown"].count("SMOKE TEST (quick budget), not a result") for t in ("table7", "table8")] == [1, 1]
    with open(everything / "table3.csv") as f:
        ours = [line for line in csv.DictReader(f) if line["source"] == "ours"]
    assert ours and all(line["smoke_test"] == "True" and line["budget"] == "quick" for line in ours)
    assert "not judged (smoke test)" in read(everything, "structure-recovery-v1")["markdown"]
    assert (everything / "REPORT.md").read_text().startswith(f"# PlanRec experiments\n\n{ex.SMOKE_TEST_NOTE}")
    row = dict(read(everything, "table6")["rows"][0], smoke_test=False)       # a table of other runs is no smoke test
    assert "SMOKE" not in ex.markdown_table("Table 6", [row])


def test_every_run_is_recorded_in_the_ledger(everything):
    records = sorted((everything / "ledger").glob("*.npz"))
    assert len(records) == 29 * len(SEEDS) and not list((everything / "ledger").glob("*.tmp"))
    planrec_ui = [ledger.read_record(p) for p in records if p.name.startswith("synthetic-planrec-ui-")]
    assert len(planrec_ui) == 2 and all(r.structure()["keep_prob_A"].shape == (40, 4, 4) for r in planrec_ui)
    meta = planrec_ui[0].meta
    assert meta["provenance"] == "trained" and meta["code"] == ledger.code_fingerprint() and meta["budget"] == "quick"
    assert meta["command"]["train"].startswith("python train.py --data synthetic --seed")
    assert meta["metrics"]["epochs"][0]["valid"]["personalization"]["uncertainty_mean"] > 0


def test_every_report_is_rebuilt_from_the_ledger_alone(everything, worlds, tmp_path, monkeypatch):
    """--from-ledger with the run folders gone: nothing is trained, and every JSON, CSV, figure and
    the report are those built when the runs were trained; the numbers are those of the run files."""
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail(f"--from-ledger trained {argv}"))
    hidden = tmp_path / "runs-hidden"
    shutil.move(everything / "runs", hidden)
    try:
        rebuilt = tmp_path / "rebuilt"
        ex.main(experiment_argv(worlds, rebuilt, "all", "--from-ledger", ledger=everything / "ledger"))
    finally:
        shutil.move(hidden, everything / "runs")
    assert not (rebuilt / "runs").exists()
    for e in (e for e in ex.EXPERIMENTS if e.in_all):
        built, again = read(everything, e.name), read(rebuilt, e.name)
        for numbers in (built, again):
            del numbers["command"], numbers["wall_s_build"]
        assert again == built, e.name
        for name in again["tables"] + again["figures"]:
            assert (rebuilt / name).read_bytes() == (everything / name).read_bytes(), name
    report = lambda out: [line for line in (out / "REPORT.md").read_text().splitlines() if not line.startswith("Last command")]
    assert report(rebuilt) == report(everything)
    # ... and the numbers are those of the run folders' own files.
    folder = everything / "runs" / "synthetic-planrec-seed0"
    data = ex.load_data("synthetic", str(worlds / "synthetic"))
    consistency = datalib.interest_consistency(data.item_seq, data.user_offsets, data.item_attrs["genres"])
    with np.load(folder / "test_scores.npz") as f:
        certainty = 1.0 - ex.min_max(f["uncertainty"].mean(1))
        ranking = datalib.ranking_metrics(f["scores"])
    assert read(rebuilt, "figure3")["per_seed"][0]["consistency"]["pearson"] == list(
        ex.correlation(ex.min_max(consistency), certainty))
    assert read(rebuilt, "table2")["rows"][2]["metrics"]["auc"]["per_seed"][0] == ranking["auc"]
    with np.load(everything / "runs" / "synth-sr-main-seed1" / "structures.npz") as s:
        truth = synthetic.load_ground_truth(worlds / "synthetic")
        direct = ex.structure_metrics(s["shared_A"], s["factor_names"], s["keep_prob_A"], s["user_ids"], truth)
    assert read(rebuilt, "structure-recovery-v1")["rows"][0]["per_seed"][1]["deviation_auc"] == direct["deviation_auc"]


def test_from_ledger_stops_listing_what_is_missing(everything, worlds, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail(f"--from-ledger trained {argv}"))
    argv = experiment_argv(worlds, tmp_path / "more", "table2", "--from-ledger", ledger=everything / "ledger")
    seeds = argv.index("--seeds")
    with pytest.raises(SystemExit, match=r"not built: table2 \(built: nothing\); 2 of 4 runs have no current record"
                                         r".*\n  synthetic-planrec seed 7: no record"):
        ex.main(argv[:seeds + 1] + ["0", "7"] + argv[seeds + 3:])
    rows = ex.main(argv[:seeds + 1] + ["0", "7"] + argv[seeds + 3:] + ["--plan"])
    assert sorted(state for _, state, *_ in rows) == ["ledger", "ledger", "missing", "missing"]


def test_from_ledger_builds_what_it_can_and_says_what_it_left_out(everything, worlds, tmp_path, monkeypatch):
    """With VAE's seed-1 record gone, figure3 (PlanRec only) is built as before; table2 is left out."""
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail(f"--from-ledger trained {argv}"))
    partial = tmp_path / "ledger"
    shutil.copytree(everything / "ledger", partial)
    [gone] = partial.glob("synthetic-vae-seed1-*.npz")
    gone.unlink()
    out = tmp_path / "partial"
    with pytest.raises(SystemExit, match=r"not built: table2 \(built: figure3\); 1 of 4 runs have no current record"
                                         r".*\n  synthetic-vae seed 1: no record"):
        ex.main(experiment_argv(worlds, out, "table2", "figure3", "--from-ledger", ledger=partial))
    assert not (out / "table2.json").exists()
    built, again = read(everything, "figure3"), read(out, "figure3")
    for numbers in (built, again):
        del numbers["command"], numbers["wall_s_build"], numbers["ledger"]
    assert again == built
    assert "Figure 3" in (out / "REPORT.md").read_text() and "Table 2" not in (out / "REPORT.md").read_text()


def test_plan_times_a_new_run_by_the_records_of_its_configuration(everything, worlds, tmp_path):
    argv = experiment_argv(worlds, tmp_path / "planned", "table2", "--plan", ledger=everything / "ledger")
    seeds = argv.index("--seeds")
    rows = ex.main(argv[:seeds + 1] + ["0", "7"] + argv[seeds + 3:])
    walls = {key: [ledger.read_record(p, arrays=False).meta["wall_s"] for p in (everything / "ledger").glob(f"{key}-seed*")]
             for key in ("synthetic-vae", "synthetic-planrec")}
    new = {where: (seconds, source) for where, state, seconds, source in rows if state == "new"}
    assert len(new) == 2
    for where, (seconds, source) in new.items():
        key = "synthetic-vae" if "synthetic-vae-seed7" in where else "synthetic-planrec"
        assert source == "median of 2 records" and seconds == pytest.approx(np.median(walls[key]))


def test_plan_times_a_configuration_without_records_by_the_nearest_one(everything, worlds, tmp_path):
    """nm2 and nm4 have no records here: they are PlanRec with another N_m, so PlanRec's records time
    them, not the VAE's; with no record of the same data at all, the rough constant."""
    partial = tmp_path / "ledger"
    partial.mkdir()
    for key in ("synthetic-planrec", "synthetic-vae"):
        for path in (everything / "ledger").glob(f"{key}-seed*.npz"):
            shutil.copy(path, partial)
    rows = ex.main(experiment_argv(worlds, tmp_path / "planned", "table3", "--plan", ledger=partial))
    planrec = np.median([ledger.run_seconds(ledger.read_record(p, arrays=False).meta["metrics"])
                         for p in partial.glob("synthetic-planrec-seed*")])
    nm = [(seconds, source) for where, state, seconds, source in rows if "-nm" in where]
    assert len(nm) == 4 and all(state == "new" for where, state, *_ in rows if "-nm" in where)
    for seconds, source in nm:
        assert seconds == pytest.approx(planrec)
        assert source.startswith("median of 2 records of synthetic-planrec, the nearest configuration"), source
    for path in partial.glob("*.npz"):
        path.unlink()
    rows = ex.main(experiment_argv(worlds, tmp_path / "planned", "table3", "--plan", ledger=partial))
    assert {(seconds, source) for _, _, seconds, source in rows} == {     # --data synthetic: the main runs' kind
        (ex.ESTIMATED_SECONDS[("main", "quick")], "rough constant")}


def test_a_record_of_other_model_code_is_not_reused(everything, worlds, tmp_path, monkeypatch):
    [path] = (everything / "ledger").glob("synthetic-vae-seed0-*.npz")
    record = ledger.read_record(path)
    changed = copy_model_code(tmp_path / "other-commit")
    planrec_py = changed / "planrec.py"
    planrec_py.write_text(planrec_py.read_text() + "\nEDGE_THRESHOLD = 0.5\n")
    other = ledger.code_fingerprint(changed)
    assert ledger.code_differences(other, ledger.code_fingerprint()) == ["planrec.py"]
    # as if trained by that code, uncommitted (computes_the_same cannot rebuild it: only the source counts)
    dirty = {**(record.meta["commit"] or {"head": "0" * 40}), "model_code_dirty": True}
    ledger.write_record(path, {**record.meta, "code": other, "commit": dirty}, record.arrays)

    states = {state: where for where, state, *_ in ex.main(experiment_argv(worlds, everything, "table2", "--plan"))}
    assert set(states) == {"ledger", "stale"} and "STALE: planrec.py differ" in states["stale"]
    with pytest.raises(SystemExit, match="synthetic-vae seed 0: STALE: planrec.py differ"):
        ex.main(experiment_argv(worlds, tmp_path / "rebuilt", "table2", "--from-ledger", ledger=everything / "ledger"))
    calls = []
    original = train.main
    monkeypatch.setattr(train, "main", lambda argv: calls.append(argv) or original(argv))
    ex.main(experiment_argv(worlds, everything, "table2"))
    assert len(calls) == 1 and "--resume" not in calls[0] and str(everything / "runs" / "synthetic-vae-seed0") in calls[0]
    assert ledger.read_record(path).meta["code"] == ledger.code_fingerprint()


def test_recorded_runs_are_not_trained_and_interrupted_ones_resumed(everything, worlds, monkeypatch, tmp_path):
    calls = []
    original = train.main
    monkeypatch.setattr(train, "main", lambda argv: calls.append(argv) or original(argv))
    interrupted = everything / "runs" / "synthetic-vae-seed1"
    shutil.move(interrupted, tmp_path / "gone")                 # the ledger is read first: no folder is needed
    ex.main(experiment_argv(worlds, everything, "table2"))
    assert calls == [] and not interrupted.exists()
    shutil.move(tmp_path / "gone", interrupted)
    (interrupted / "metrics.json").unlink()
    [path] = (everything / "ledger").glob("synthetic-vae-seed1-*.npz")
    path.unlink()
    ex.main(experiment_argv(worlds, everything, "table2"))
    assert len(calls) == 1 and "--resume" in calls[0] and str(interrupted) in calls[0]
    assert (interrupted / "metrics.json").is_file() and ledger.read_record(path).meta["provenance"] == "resumed"


def test_reuse_run_uses_other_folders_and_checks_the_model(everything, worlds, tmp_path):
    pattern = str(everything / "runs" / "synthetic-planrec-seed{seed}")
    out = tmp_path / "reused"
    argv = experiment_argv(worlds, out, "figure3") + ["--reuse-run", f"synthetic-planrec={pattern}"]
    ex.main(argv)
    assert not (out / "runs").exists() and read(out, "figure3")["per_seed"]
    # the same numbers and verdicts; a reused folder's budget reads "own flags" (and its claims say so)
    provenance = {"command": 0, "wall_s_build": 0, "records": 0, "ledger": 0}
    reused, original = read(out, "figure3") | provenance, read(everything, "figure3") | provenance
    assert [c.pop("budget") for c in reused["claims"][:2]] == ["own flags"] * 2
    assert [c.pop("budget") for c in original["claims"][:2]] == ["quick"] * 2
    assert reused == original
    assert {r.meta["provenance"] for r in map(ledger.read_record, (out / "ledger").glob("*.npz"))} == {"folder"}
    wrong = str(everything / "runs" / "synthetic-vae-seed{seed}")
    with pytest.raises(SystemExit, match="another configuration"):
        ex.main(experiment_argv(worlds, tmp_path / "wrong", "figure3") + ["--reuse-run", f"synthetic-planrec={wrong}"])


def test_missing_test_scores_are_regenerated_from_best_pt(everything, worlds):
    folder = everything / "runs" / "synthetic-planrec-seed0"
    with np.load(folder / "test_scores.npz") as f:
        before = {k: f[k] for k in f.files}
    (folder / "test_scores.npz").unlink()
    for path in (everything / "ledger").glob("synthetic-planrec-seed0-*.npz"):
        path.unlink()                                           # else the ledger is read, not the folder
    ex.main(experiment_argv(worlds, everything, "figure3"))
    with np.load(folder / "test_scores.npz") as f:
        np.testing.assert_array_equal(f["scores"], before["scores"])
        np.testing.assert_array_equal(f["uncertainty"], before["uncertainty"])


def test_runs_finds_or_trains_only_the_named_configurations_and_writes_no_report(everything, worlds, tmp_path,
                                                                                monkeypatch, capsys):
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail(f"a recorded run was trained: {argv}"))
    out = tmp_path / "just-runs"
    records = ex.main(experiment_argv(worlds, out, "--runs", "vae", "synthetic-planrec", ledger=everything / "ledger"))
    assert list(records) == ["synthetic-vae", "synthetic-planrec"]
    assert [r.meta["seed"] for r in records["synthetic-vae"]] == [0, 1]
    assert not (out / "REPORT.md").exists() and not list(out.glob("*.json"))
    # the printed table: each configuration's mean test NDCG@10, the second tested against the first
    printed = capsys.readouterr().out
    table2 = {r["label"]: r for r in read(everything, "table2")["rows"]}
    planrec_row = next(line for line in printed.splitlines() if line.startswith("| synthetic-planrec ("))
    assert f"{table2['PlanRec']['metrics']['ndcg@10']['mean']:.4f}" in planrec_row and "| synthetic-vae |" in planrec_row
    assert ex.fmt_p(table2["PlanRec"]["p_values"]["VAE base"]["ndcg@10"]) in planrec_row


def test_runs_of_other_users_get_a_table_each_instead_of_an_error(everything, worlds, tmp_path, monkeypatch, capsys):
    """Table 4 (b)'s IID and OOD halves score other users: no paired test between them."""
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail(f"a recorded run was trained: {argv}"))
    records = ex.main(experiment_argv(worlds, tmp_path / "out", "--runs", "vae-iid-halves", "planrec-iid-halves",
                                      "vae-ood-halves", ledger=everything / "ledger"))
    assert list(records) == ["synthetic-vae-iid-halves", "synthetic-planrec-iid-halves", "synthetic-vae-ood-halves"]
    printed = capsys.readouterr().out
    table4 = read(everything, "table4")
    titles = [line for line in printed.splitlines() if "--runs, seeds" in line]
    assert [t.split(" users of ")[1].split("**")[0] for t in titles] == ["synthetic-vae-iid-halves",
                                                                          "synthetic-vae-ood-halves"]
    assert f"the {table4['n_iid']} users of" in titles[0] and f"the {table4['n_ood']} users of" in titles[1]
    planrec_row = next(line for line in printed.splitlines() if line.startswith("| synthetic-planrec-iid-halves ("))
    assert "| synthetic-vae-iid-halves |" in planrec_row
    ood_row = next(line for line in printed.splitlines() if line.startswith("| synthetic-vae-ood-halves ("))
    assert "| synthetic-vae-iid-halves |" not in ood_row


def test_runs_rejects_an_unknown_configuration(capsys):
    with pytest.raises(SystemExit):
        ex.parse_args(["--runs", "planrec", "nonsense", "--out", "x"])
    assert "--runs: unknown configuration(s) ['nonsense']" in capsys.readouterr().err


def test_claim_verdicts():
    assert ex.claim_verdict(0.05, 0.01, 1e-4, smoke=False) == "holds"
    assert ex.claim_verdict(0.05, -0.01, 1e-4, smoke=False) == "does not hold"
    assert ex.claim_verdict(0.0, 0.01, 1e-4, smoke=False) == "does not hold"     # the paper has no difference
    assert ex.claim_verdict(0.05, 0.01, 0.2, smoke=False) == "within noise"
    assert ex.claim_verdict(0.05, 0.01, float("nan"), smoke=False) == "within noise"
    assert ex.claim_verdict(0.05, 0.01, 1e-4, smoke=True) == "not judged (smoke test)"


def test_a_claim_carries_a_welch_test_over_seeds_beside_the_test_over_users():
    def row(label, per_seed, compare=()):
        return {"label": label, "paper": {"ndcg@10": 0.3 + 0.1 * bool(compare)}, "compared_with": list(compare),
                "metrics": {"ndcg@10": {"mean": float(np.mean(per_seed)), "per_seed": per_seed}},
                "p_values": {o: {"ndcg@10": 1e-4} for o in compare}, "smoke_test": False,
                "seeds": list(range(len(per_seed))), "budget": "full"}
    base, better = [0.50, 0.52, 0.51], [0.55, 0.49, 0.60]
    [claim] = ex.table_claims([row("Base", base), row("+X", better, ["Base"])], "tableN")
    assert claim["p_seeds"] == pytest.approx(stats.ttest_ind(better, base, equal_var=False).pvalue)
    assert claim["verdict"] == "holds"                    # the verdict is the per-user test's alone
    assert f"| 1.0e-04 | {ex.fmt_p(claim['p_seeds'])} | holds |" in ex.claims_markdown([claim])
    [one_seed] = ex.table_claims([row("Base", [0.5]), row("+X", [0.6], ["Base"])], "tableN")
    assert one_seed["p_seeds"] is None and "| 1.0e-04 | — | holds |" in ex.claims_markdown([one_seed])


def test_every_table_states_the_papers_claims(everything):
    table2 = read(everything, "table2")
    [claim] = table2["claims"]              # PlanRec vs VAE base; the paper has no popularity row
    rows = {r["label"]: r for r in table2["rows"]}
    assert (claim["row"], claim["vs"]) == ("PlanRec", "VAE base")
    assert claim["paper_delta"] == pytest.approx(ex.PAPER["planrec"]["ndcg@10"] - ex.PAPER["vae"]["ndcg@10"])
    assert claim["ours_delta"] == pytest.approx(rows["PlanRec"]["metrics"]["ndcg@10"]["mean"]
                                                - rows["VAE base"]["metrics"]["ndcg@10"]["mean"])
    assert claim["p"] == rows["PlanRec"]["p_values"]["VAE base"]["ndcg@10"]
    assert claim["verdict"] == "not judged (smoke test)"                   # quick budget
    assert len(read(everything, "table7")["claims"]) == 3 and len(read(everything, "table8")["claims"]) == 3
    report = (everything / "REPORT.md").read_text()
    assert "## The paper's claims, all tables" in report and "| table2 | PlanRec > VAE base |" in report


def test_welch_contrast_test_is_welch_for_two_groups_and_sums_the_variances_of_four():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 0.02, 3), rng.normal(0.45, 0.05, 4)
    expected = stats.ttest_ind(a, b, equal_var=False)
    assert ex.welch_contrast_test([a, b], [1, -1]) == pytest.approx((expected.statistic, expected.df, expected.pvalue))
    # two groups without variance add their means to the contrast and nothing to its variance
    c, d = np.full(3, 0.30), np.full(3, 0.28)
    shifted = stats.ttest_ind(a, b + 0.02, equal_var=False)
    assert ex.welch_contrast_test([a, b, c, d], [1, -1, -1, 1]) == pytest.approx(
        (shifted.statistic, shifted.df, shifted.pvalue))
    assert np.isnan(ex.welch_contrast_test([a, b[:1]], [1, -1])[2])          # one seed
    assert np.isnan(ex.welch_contrast_test([c, d], [1, -1])[2])              # no variance


def test_tables_4_5_6_judge_the_papers_claims_across_rows(everything):
    [*_, across] = read(everything, "table6")["claims"]   # removing u2i costs more than removing u2u & i2i
    assert (across["row"], across["vs"]) == ("w/o u2u & i2i", "w/o u2i")
    assert across["paper_delta"] == pytest.approx(ex.PAPER["no-u2u-i2i"]["ndcg@10"] - ex.PAPER["no-u2i"]["ndcg@10"])

    def mean(rows, label):
        return {r["label"]: r for r in rows}[label]["metrics"]["ndcg@10"]["mean"]
    table5 = read(everything, "table5")
    [gap] = [c for c in table5["claims"] if "claim" in c]
    rows = table5["rows"]
    assert gap["ours_delta"] == pytest.approx((mean(rows, "Base w. ui") - mean(rows, "Base"))
                                              - (mean(rows, "PlanRec w. ui") - mean(rows, "PlanRec")))
    assert gap["paper_delta"] == pytest.approx((0.3498 - 0.3260) - (0.3993 - 0.3928))
    assert gap["paired_users"] and gap["verdict"] == "not judged (smoke test)" and 0 < gap["p"] <= 1
    table4 = read(everything, "table4")
    across = {(c["table"], c["claim"]): c for c in table4["claims"] if "claim" in c}
    assert len(across) == 6
    for part, paired in (("synthetic", True), ("real", False)):   # ML-1M's IID and OOD users are other people
        rows = table4[part]
        level = across[(f"table4_{part}", "OOD Base < IID Base")]
        assert level["ours_delta"] == pytest.approx(mean(rows, "OOD Base") - mean(rows, "IID Base"))
        gain = across[(f"table4_{part}", "PlanRec's gain over Base: OOD > IID")]
        assert gain["ours_delta"] == pytest.approx((mean(rows, "OOD PlanRec") - mean(rows, "OOD Base"))
                                                   - (mean(rows, "IID PlanRec") - mean(rows, "IID Base")))
        assert level["paired_users"] == gain["paired_users"] == paired
    assert across[("table4_real", "PlanRec's gain over Base: OOD > IID")]["paper_delta"] == pytest.approx(
        (0.3350 - 0.2923) - (0.3750 - 0.3575))
    report = (everything / "REPORT.md").read_text()
    assert "| table5 | gain of w. ui: Base's > PlanRec's | +0.0173 |" in report


def test_plan_lists_runs_without_training(worlds, tmp_path):
    rows = ex.main(experiment_argv(worlds, tmp_path / "planned", "table2", "--plan"))
    assert len(rows) == 4 and {state for _, state, _, _ in rows} == {"new"}
    assert {source for *_, source in rows} == {"rough constant"}        # an empty ledger times nothing
    assert not (tmp_path / "planned").exists()


def test_plan_times_a_resumed_record_by_its_epochs_not_its_last_process(everything, tmp_path):
    """A resumed run's wall_s is only its last process's; --plan's estimate (ledger.run_seconds) takes
    the sum of its epochs where that is larger."""
    [path] = sorted((everything / "ledger").glob("synthetic-planrec-seed0-*.npz"))
    record = ledger.read_record(path)
    meta = json.loads(json.dumps(record.meta))
    meta["metrics"]["epochs"] = [{**meta["metrics"]["epochs"][0], "train_s": 100.0, "eval_s": 10.0},
                                 {**meta["metrics"]["epochs"][0], "train_s": 200.0, "eval_s": 20.0}]
    (tmp_path / "ledger").mkdir()
    setup = ex.Setup(out=tmp_path, budget=meta["budget"], seeds=[0], data="synthetic", ledger=tmp_path / "ledger")
    spec = setup.main_spec("planrec")
    for wall, expected in ((1.5, 330.0), (400.0, 400.0)):     # resumed (epochs longer than its process), whole
        meta["metrics"]["wall_s"] = meta["wall_s"] = wall
        ledger.write_record(tmp_path / "ledger" / path.name, meta, record.arrays)
        assert ex.estimated_seconds(setup, spec, ex.ledger_metas(setup)) == (expected, "median of 1 record")
    assert ledger.run_seconds({"wall_s": None, "epochs": []}) is None


def test_the_converged_budget_stops_on_patience_3_far_below_its_cap(tmp_path):
    setup = ex.Setup(out=tmp_path, budget="converged", seeds=[0])
    spec = setup.main_spec("planrec")
    args = train.parse_args(setup.train_argv(spec, 0))
    assert (args.epochs, args.patience) == (100, 3)
    assert ex.budget_of(spec, vars(args)) == "converged"
    assert ex.budget_of(spec, vars(train.parse_args(["--data", "ml-1m"]))) == "full"


# ------------------------------------------------------------------------------------------------
# Issue 19: the paper's stated settings, one group at a time moved to ours
# ------------------------------------------------------------------------------------------------

def test_the_paper_settings_flags_are_what_paper_settings_applies(worlds):
    data = datalib.load_dataset("synthetic", str(worlds / "synthetic"))
    spelled = train.parse_args(["--data", "synthetic", *ex.paper_settings_flags()])
    flag = train.parse_args(["--data", "synthetic", "--paper-settings"])
    assert (spelled.optimizer, spelled.lr) == (flag.optimizer, flag.lr) == ("adagrad", 0.01)
    assert train.model_config(spelled, data) == train.model_config(flag, data)
    # each step moves exactly its own group to our default and keeps every other group the paper's
    ours = train.model_config(train.parse_args(["--data", "synthetic"]), data)
    paper = train.model_config(flag, data)
    differing = {name for name in ours.to_dict() if ours.to_dict()[name] != paper.to_dict()[name]}
    moved = {}
    for group in ex.PAPER_SETTING_GROUPS:
        args = train.parse_args(["--data", "synthetic", *ex.paper_settings_flags(group)])
        cfg = train.model_config(args, data).to_dict()
        moved[group] = {n for n in differing if cfg[n] == ours.to_dict()[n]} | ({"optimizer"} if args.optimizer == "adam" else set())
    assert moved == {"optimizer": {"optimizer"}, "loss-weights": {"w_reconstruct", "w_kl", "w_struct", "w_dag"},
                     "embedding": {"embed_dim"}, "encoder": {"encoder"}, "mask-input": {"mask_input"}}
    assert set().union(*moved.values()) == differing | {"optimizer"}     # together they are all the differences


def test_paper_settings_experiment_tests_each_step_against_the_paper_settings_and_popularity(everything, worlds, tmp_path):
    ledger_copy = tmp_path / "ledger"
    shutil.copytree(everything / "ledger", ledger_copy)      # PlanRec's runs are reused, not retrained
    out = tmp_path / "paper-settings"
    ex.main(experiment_argv(worlds, out, "paper-settings", ledger=ledger_copy))
    result = read(out, "paper-settings")
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == ["popularity", "paper's settings", *(f"our {g}" for g in ex.PAPER_SETTING_GROUPS),
                          "all ours (train.py defaults)"]
    for group in ex.PAPER_SETTING_GROUPS:
        row = rows[f"our {group}"]
        assert row["compared_with"] == ["paper's settings", "popularity"] and row["paper"] is None
        assert all(0 < row["p_values"][o]["ndcg@10"] <= 1 for o in row["compared_with"])
    steps = {s["group"]: s for s in result["steps"]}
    assert list(steps) == list(ex.PAPER_SETTING_GROUPS)
    for group, step in steps.items():
        mean = rows[f"our {group}"]["metrics"]["ndcg@10"]["mean"]
        assert step["ndcg@10"] == pytest.approx(mean)
        assert step["delta_vs_paper_settings"] == pytest.approx(mean - rows["paper's settings"]["metrics"]["ndcg@10"]["mean"])
    assert result["smoke_test"] and result["claims"] == []      # no claim of the paper is judged here
    assert "## What holds the paper's stated settings" in (out / "REPORT.md").read_text()
    # the runs of each step were trained with the paper's flags minus its own group
    records = {r["key"]: r for r in result["records"].values()}
    assert set(records) == {f"synthetic-{k}" for k in ex.MAIN_CONFIGS if k.startswith("paper-settings")} | {"synthetic-planrec"}


def test_figure3_judges_the_papers_three_claims(everything):
    figure3 = read(everything, "figure3")
    claims = figure3["claims"]
    assert [c["claim"].split(":")[0] for c in claims] == ["users of consistent interests get lower uncertainty",
                                                         "active users get lower uncertainty",
                                                         "high-activeness users (> 0.6) have more consistent interests (Welch t > 0)"]
    # the correlation claims are judged on the runs (smoke test here), the t-test on the data alone
    assert [c["verdict"] for c in claims[:2]] == ["not judged (smoke test)"] * 2
    test = figure3["activeness_test"]
    assert claims[2]["verdict"] == ex.claim_verdict(1.0, test["t"], test["p"], smoke=False)
    assert claims[2]["p"] == test["p"]
    report = (everything / "REPORT.md").read_text()
    assert "| figure3 | active users get lower uncertainty: Pearson r of activeness" in report


def test_claim_verdict_of_a_correlation_claim():
    """A positive-correlation claim: holds for r > 0 at p < 0.05, does not hold for r < 0 at p < 0.05."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=500)
    r, p = ex.correlation(x, x + rng.normal(size=500))
    assert r > 0 and p < 1e-6 and ex.claim_verdict(1.0, r, p, smoke=False) == "holds"
    r, p = ex.correlation(x, -x + rng.normal(size=500))
    assert ex.claim_verdict(1.0, r, p, smoke=False) == "does not hold"
    r, p = ex.correlation(x, rng.normal(size=500))
    assert p > 0.05 and ex.claim_verdict(1.0, r, p, smoke=False) == "within noise"


def test_a_record_of_a_commit_whose_planrec_computes_the_same_is_reused(everything, worlds, tmp_path, monkeypatch,
                                                                         capsys):
    """planrec.py differs in its source (here: a constant no run reads), the record's commit is clean
    and its planrec.py computes what today's does for the record's Config: current, not retrained."""
    ledger_copy = tmp_path / "ledger"
    shutil.copytree(everything / "ledger", ledger_copy)
    [path] = ledger_copy.glob("synthetic-vae-seed0-*.npz")
    record = ledger.read_record(path)
    changed = copy_model_code(tmp_path / "other-commit")
    planrec_py = changed / "planrec.py"
    planrec_py.write_text(planrec_py.read_text() + "\nEDGE_THRESHOLD = 0.5\n")
    clean = {"head": ledger.git_commit()["head"], "model_code_dirty": False}     # HEAD computes today's numbers
    ledger.write_record(path, {**record.meta, "code": ledger.code_fingerprint(changed), "commit": clean}, record.arrays)
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail(f"a current record was trained: {argv}"))
    states = {state for _, state, *_ in ex.main(experiment_argv(worlds, tmp_path / "out", "table2", "--plan",
                                                                ledger=ledger_copy))}
    assert states == {"ledger"}
    capsys.readouterr()
    ledger.main([str(ledger_copy)])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith(path.name))
    assert line.endswith("current (planrec.py differs, computes the same)")


REPO_LEDGER = Path(__file__).resolve().parents[1] / "ledger"      # read only: every other test has its own


def test_plan_finds_the_records_of_synthetic_runs_whose_world_is_not_generated_yet(tmp_path, monkeypatch):
    """A fresh --out has no worlds; --plan generates them (seconds), as a real run would, so that it
    finds the repository ledger's 18 records of the three-edge structure recovery instead of
    counting those runs as new."""
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail(f"--plan trained {argv}"))
    monkeypatch.setenv("PLANREC_CACHE", str(tmp_path / "cache"))
    rows = ex.main(["structure-recovery-v1", "--budget", "full", "--seeds", "0", "1", "2", "--plan",
                    "--out", str(tmp_path / "fresh"), "--ledger", str(REPO_LEDGER)])
    assert len(rows) == 18 and all(state == "ledger" and seconds == 0 for _, state, seconds, _ in rows)
