"""Structure recovery (issue 20): the drawn worlds, the metrics, the scale-free edge scores and our
model options (off by default; side-separated factors, additive heads, the masks' own objective)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import stats

import data as datalib
import planrec
from analysis import experiments as ex, structure_recovery as sr
from datasets import synthetic

SMALL = dict(n_users=300, n_items=200, mean_len=15)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return synthetic.make_structured_world(tmp_path_factory.mktemp("drawn") / "w", seed=3, **SMALL)


# ------------------------------------------------------------------------------------------------
# The world generator
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 7])
def test_each_seed_draws_the_dag_it_says(seed):
    users, items, edges, user_edges = synthetic.draw_world_dag(seed)
    assert len(users) == len(items) == 5 and len(edges) == 10 and len(user_edges) == 3
    assert len({(u, i) for u, i, _ in edges}) == 10
    assert {u for u, _, _ in edges} == set(range(4)) and {i for _, i, _ in edges} == set(range(4))  # distractors: 4
    strengths = sorted(w for *_, w in edges)
    assert strengths[0] == 0.5 and strengths[-1] == 2.0 and len(set(strengths)) == 10          # mixed strengths
    assert all(p < c for p, c in user_edges)                                                  # drawn in order: a DAG
    assert synthetic.draw_world_dag(seed) == (users, items, edges, user_edges)


def test_seeds_draw_different_dags():
    dags = {tuple((u, i) for u, i, _ in synthetic.draw_world_dag(s)[2]) for s in range(6)}
    assert len(dags) > 3


def test_world_files_truth_and_determinism(tmp_path, small_world):
    truth = synthetic.load_ground_truth(small_world)
    _, _, edges, user_edges = synthetic.draw_world_dag(3)
    nodes = [str(n) for n in truth["nodes"]]
    A = truth["adjacency"]
    assert A.sum() == len(edges) + len(user_edges) and A[5:, :].sum() == 0                 # nothing from items
    assert all(A[u, 5 + i] == 1 for u, i, _ in edges) and all(A[p, c] == 1 for p, c in user_edges)
    assert [list(e) for e in truth["edges"]] == [[nodes[u], nodes[5 + i]] for u, i, _ in edges]
    deviating = truth["user_deviation"] >= 0
    assert 0.1 < deviating.mean() < 0.3
    assert not truth["user_edge_mask"][deviating, truth["user_deviation"][deviating]].any()
    assert truth["user_edge_mask"][~deviating].all()
    again = synthetic.make_structured_world(tmp_path / "again", seed=3, **SMALL)
    for name in ("interactions.csv", "users.csv", "items.csv"):
        assert (again / name).read_bytes() == (small_world / name).read_bytes()
    other = synthetic.make_structured_world(tmp_path / "other", seed=4, **SMALL)
    assert (other / "interactions.csv").read_bytes() != (small_world / "interactions.csv").read_bytes()
    floor = synthetic.load_ground_truth(synthetic.make_structured_world(tmp_path / "floor", seed=3, edge_scale=0.0, **SMALL))
    assert (floor["adjacency"] == A).all() and not floor["edge_strength"].any()


def test_world_reads_as_an_interaction_log_with_every_attribute(small_world):
    d = datalib.load_dataset("interactions", root=str(small_world), n_eval_negatives=20)
    truth = synthetic.load_ground_truth(small_world)
    assert list(d.user_attrs) == [f"ua{k}" for k in range(5)] and list(d.item_attrs) == [f"ia{k}" for k in range(5)]
    kinds = list(truth["user_kinds"])
    for k, kind in enumerate(kinds):                   # classes as codes 1.., ordered levels as numbers
        column = d.user_attrs[f"ua{k}"]
        expected = truth["user_values"][synthetic.raw_index(d.raw_user_ids), k]
        assert np.array_equal(column, expected + 1 if kind == "class" else expected.astype(np.float32))


def test_the_world_carries_its_edges(small_world, tmp_path):
    """The edges show in the data: the ceiling (linear, true attributes of the positives) ranks the
    true user -> item edges first; user -> user edges make their attributes dependent."""
    d = datalib.load_dataset("interactions", root=str(small_world), n_eval_negatives=20)
    truth = synthetic.load_ground_truth(small_world)
    users = synthetic.raw_index(d.raw_user_ids)[d.train_user]
    items = synthetic.raw_index(d.raw_item_ids)[d.item_seq[d.train_pos]]
    scores, labels = sr.ceiling_metrics(truth, users, items)
    assert sr.auroc(scores.ravel(), labels.ravel()) > 0.9
    values = truth["user_values"]
    for p, c in [(int(s[0].split("ua")[1]), int(s[1].split("ua")[1])) for s in truth["user_edges"]]:
        table = np.zeros((values[:, p].max() + 1, values[:, c].max() + 1))
        np.add.at(table, (values[:, p], values[:, c]), 1)
        assert stats.chi2_contingency(table + 1e-9).pvalue < 1e-3


def test_replaying_a_world_from_its_params_gives_its_preferences(small_world):
    truth = synthetic.load_ground_truth(small_world)
    w = synthetic.replay_preferences(truth)
    for key in ("user_values", "item_values", "user_deviation", "user_edge_mask"):
        assert np.array_equal(w["edge_mask" if key == "user_edge_mask" else key], truth[key])
    assert np.array_equal(w["log_popularity"], truth["item_log_popularity"])
    # taste is the sum over edges of strength x (the match table at the user's and the item's values)
    uv, iv = w["user_values"], w["item_values"]
    rebuilt = sum(s * w["edge_mask"][:, e:e + 1] * table[uv[:, u]][:, iv[:, i]]
                  for e, ((u, i, s), table) in enumerate(zip(w["edges"], w["match_tables"])))
    assert np.allclose(rebuilt + w["log_popularity"][None, :], w["taste"])


def test_the_deviation_oracle_finds_who_ignores_an_edge_and_nothing_on_the_floor(tmp_path):
    """The oracle knows the world but not who deviates: on a world with strong edges and many
    deviators its log-likelihood ratios separate them; on the floor world ignoring an edge changes
    nothing, so every score ties (AUC 0.5); scores follow the users' own sequences only."""
    strong = synthetic.make_structured_world(tmp_path / "strong", seed=5, deviating_share=0.5, edge_scale=2.0, **SMALL)
    *_, auc = ex.sr_ceiling(str(strong))
    assert auc > 0.8
    floor = synthetic.make_structured_world(tmp_path / "floor", seed=5, deviating_share=0.5, edge_scale=0.0, **SMALL)
    *_, auc_floor = ex.sr_ceiling(str(floor))
    assert auc_floor == 0.5
    truth = synthetic.load_ground_truth(strong)
    n_users = len(truth["user_deviation"])
    empty = np.full((n_users, 3), -1)
    per_edge, mean = sr.deviation_ceiling(truth, empty)      # no sequence, no user: nothing defined
    assert np.isnan(mean) and all(np.isnan(v) for v in per_edge.values())


def test_world_errors_are_plain_messages(tmp_path):
    with pytest.raises(ValueError, match="n_items >= 120"):
        synthetic.make_structured_world(tmp_path / "w", n_items=50)
    with pytest.raises(ValueError, match="n_edges"):
        synthetic.draw_world_dag(0, n_edges=17)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------

def test_auroc_auprc_precision_on_known_cases():
    assert sr.auroc([4, 3, 2, 1], [1, 1, 0, 0]) == 1.0 and sr.auroc([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0
    assert sr.auroc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5
    assert sr.auroc([3, 2, 2, 1], [1, 1, 0, 0]) == 0.875          # one tie between classes: one half
    assert sr.auprc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert sr.auprc([1, 1, 1, 1], [1, 0, 1, 0]) == pytest.approx(0.5)   # one threshold: the base rate
    assert sr.auprc([4, 3, 2, 1], [0, 0, 0, 1]) == pytest.approx(0.25)
    assert sr.precision_at_k([4, 3, 2, 1], [1, 0, 1, 0]) == 0.5
    assert sr.precision_at_k([4, 2, 2, 1], [1, 0, 1, 0]) == 0.75        # the tie at the cut counts by half
    assert np.isnan(sr.auroc([1, 2], [1, 1])) and np.isnan(sr.auprc([1, 2], [0, 0]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.booleans()), min_size=2, max_size=30))
def test_auroc_agrees_with_mann_whitney_and_flips(pairs):
    scores, labels = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    if labels.all() or not labels.any():
        return
    a = sr.auroc(scores, labels)
    assert a == pytest.approx(ex.roc_auc(scores, labels)) and a + sr.auroc(-scores, labels) == pytest.approx(1)
    assert 0 <= sr.auprc(scores, labels) <= 1


def test_pooling_is_rank_based_and_the_bootstrap_covers_it():
    rng = np.random.default_rng(0)
    labels = [rng.random(25) < 0.4 for _ in range(3)]
    scores = [l + rng.normal(0, 0.8, 25) for l in labels]
    rescaled = [s * 10 ** k + k for k, s in enumerate(scores)]           # each seed on its own scale
    for metric in ("auroc", "auprc", "precision_at_k"):
        assert sr.pooled(scores, labels, metric) == pytest.approx(sr.pooled(rescaled, labels, metric))
        low, high = sr.bootstrap_interval(scores, labels, metric, n_resamples=200)
        assert low <= sr.pooled(scores, labels, metric) <= high
        assert (low, high) == sr.bootstrap_interval(scores, labels, metric, n_resamples=200)   # seeded
    perfect = sr.pooled_summary([l.astype(float) for l in labels], labels, n_resamples=100)
    assert perfect["auroc"]["pooled"] == perfect["auroc"]["low"] == 1.0 and perfect["precision_at_k"]["pooled"] == 1.0


def test_scored_pairs_test_direction_only_without_the_i2u_prior():
    truth = {"nodes": np.array(["user.a", "user.b", "item.x", "item.y"]),
             "adjacency": np.array([[0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]])}
    names = ["user.a", "user.b", "item.x", "item.y"]
    with_prior = planrec.dependency_support(planrec.Config(n_factors=4, n_user_factors=2, k_A=4, k_e=2, drop_dependencies="i2u")).numpy()
    pairs, labels = sr.scored_pairs(names, truth, with_prior)["cross"]
    assert pairs == [(0, 2), (0, 3), (1, 2), (1, 3)] and labels.tolist() == [True, False, False, True]
    pairs, labels = sr.scored_pairs(names, truth, np.ones((4, 4), bool))["cross"]
    assert len(pairs) == 8 and labels.sum() == 2 and (2, 0) in pairs          # x -> a scored, as false
    pairs, labels = sr.scored_pairs(names, truth, with_prior)["all"]
    assert labels.sum() == 3 and (0, 1) in pairs                              # the user -> user edge too


# ------------------------------------------------------------------------------------------------
# Scale-free edge scores
# ------------------------------------------------------------------------------------------------

def test_effective_score_is_invariant_to_rescaling_A_against_g():
    torch.manual_seed(0)
    N, d, H = 4, 3, 5
    g = planrec.FactorMLPs(N, d, H)
    A = torch.randn(N, N) * (1 - torch.eye(N))
    e = torch.randn(7, N, d)
    j, i, c = 1, 3, 8.0
    A2, w1 = A.clone(), g.w1.detach().clone()
    A2[j, i] *= c
    w1[i, j * d:(j + 1) * d] /= c
    out = planrec.factor_mlps(A, e, g.w1, g.b1, g.w2, g.b2)
    torch.testing.assert_close(planrec.factor_mlps(A2, e, w1, g.b1, g.w2, g.b2), out)    # the same g(A_i * e)
    before = sr.effective_scores(A.numpy(), g.w1.detach().numpy(), d)
    after = sr.effective_scores(A2.numpy(), w1.numpy(), d)
    assert abs(A2[j, i]) == pytest.approx(c * abs(A[j, i]))                               # |A| moves ...
    np.testing.assert_allclose(after, before, rtol=1e-5)                                   # ... this score does not


class EvalData:
    """What loss_increase_scores reads of a RecData: eval_split."""
    def __init__(self, history, candidates):
        self.history, self.candidates = history, candidates

    def eval_split(self, split, length=None):
        return np.arange(len(self.history)), self.history, self.candidates


def sides_model():
    cfg = planrec.Config(n_users=6, n_items=40, embed_dim=8, n_factors=4, n_user_factors=2, factor_dim=3,
                         g_hidden=5, head_hidden=6, ffn_dim=8, history_len=4, n_mask_samples=2, k_A=2, k_e=4,
                         structure="shared", factor_sources="sides", head_form="additive",
                         drop_dependencies="u2u,i2u")
    torch.manual_seed(0)
    return planrec.PlanRec(cfg)


def test_loss_increase_is_invariant_to_a_rescaling_that_keeps_the_predictions():
    """User factor j has no parents (u2u, i2u dropped), so scaling z_j by c, its effects A[j, :] by
    1/c and its additive head's e-weights by 1/c computes exactly the same predictions: |A[j, :]|
    shrinks by c, the loss increase of every entry stays."""
    model = sides_model()
    with torch.no_grad():
        model.dependency_matrix.mul_(10).mul_(model.support)
    rng = np.random.default_rng(0)
    data = EvalData(rng.integers(1, 41, (6, model.context_len)), rng.integers(1, 41, (6, 5)))
    before = sr.loss_increase_scores(model, data, torch.device("cpu"), n_users=6)
    j, c, d = 1, 4.0, model.cfg.factor_dim
    with torch.no_grad():
        rows = slice(j * d, (j + 1) * d)                        # the mean of user factor j in side_factors.user_fc
        model.side_factors.user_fc.weight[rows] *= c
        model.side_factors.user_fc.bias[rows] *= c
        model.dependency_matrix[j] /= c
        model.predict_shared.w1[j, :d] /= c                     # h_j reads [e_j ; e-hat_j]
    after = sr.loss_increase_scores(model, data, torch.device("cpu"), n_users=6)
    assert (before[j] != 0).any()
    np.testing.assert_allclose(after, before, atol=1e-6)
    assert np.all(after[~model.support.bool().numpy()] == 0)


# ------------------------------------------------------------------------------------------------
# Our model options: off by default, and what each one guarantees
# ------------------------------------------------------------------------------------------------

TINY = dict(n_users=6, n_items=40, embed_dim=8, n_factors=4, n_user_factors=2, factor_dim=3, g_hidden=5,
            head_hidden=6, ffn_dim=8, history_len=4, n_mask_samples=3, k_A=6, k_e=3)


def forward_loss(model, seed=1):
    g = torch.Generator().manual_seed(5)
    history = torch.randint(1, 41, (3, model.context_len), generator=g)
    items = torch.randint(1, 41, (3, 4), generator=g)
    torch.manual_seed(seed)
    out = model(torch.arange(3), history, items)
    return out, model.loss(out, torch.zeros(3, 4))


def test_options_are_off_by_default_and_the_default_model_is_unchanged():
    cfg = planrec.Config(**TINY)
    assert (cfg.factor_sources, cfg.head_form, cfg.w_personal_rec) == ("joint", "joint", 0.0)
    torch.manual_seed(0)
    default = planrec.PlanRec(cfg)
    assert not any(isinstance(m, (planrec.SideFactors, planrec.AdditiveHeads)) for m in default.modules())
    # With the side factors on, every other part is initialized bit-identically (they are created last),
    # and switching the option off again computes exactly the default model.
    torch.manual_seed(0)
    sides = planrec.PlanRec(planrec.Config(**TINY, factor_sources="sides"))
    shared = {k: v for k, v in sides.state_dict().items() if not k.startswith("side_factors.")}
    assert shared.keys() == default.state_dict().keys()
    assert all(torch.equal(v, default.state_dict()[k]) for k, v in shared.items())
    (out_d, (loss_d, _)) = forward_loss(default)
    sides.cfg.factor_sources = "joint"
    (out_s, (loss_s, _)) = forward_loss(sides)
    assert torch.equal(out_d["y"], out_s["y"]) and torch.equal(loss_d, loss_s)
    # the masks' objective at weight 0 is the default; at weight 1 it adds one term and detaches z
    personal = planrec.PlanRec(planrec.Config(**TINY, w_personal_rec=1.0))
    personal.load_state_dict(default.state_dict())
    out_p, (loss_p, terms_p) = forward_loss(personal)
    assert torch.equal(out_p["y"], out_d["y"]) and "recommend_personal" in terms_p and "y_personal" not in out_d
    assert float(loss_p.detach()) == pytest.approx(float(loss_d.detach()) + float(terms_p["recommend_personal"].detach()), rel=1e-6)


def test_side_separated_user_factors_do_not_depend_on_the_target_item():
    for encoder in ("target_attention", "paper"):
        torch.manual_seed(0)
        model = planrec.PlanRec(planrec.Config(**TINY, encoder=encoder, factor_sources="sides")).eval()
        history = torch.randint(1, 41, (2, model.context_len))
        items = torch.tensor([[1, 7, 30], [2, 7, 39]])
        mean = model.encode(history, items)["mean"]
        Nu = model.cfg.n_user_factors
        assert torch.equal(mean[:, :1, :Nu].expand(-1, 3, -1, -1), mean[:, :, :Nu])     # user factors: one per row
        assert not torch.equal(mean[:, 0, Nu:], mean[:, 1, Nu:])
        other = model.encode(torch.randint(1, 41, (2, model.context_len)), items)["mean"]
        torch.testing.assert_close(other[:, :, Nu:], mean[:, :, Nu:])                 # item factors: the item only
        torch.testing.assert_close(mean[0, 1, Nu:], mean[1, 1, Nu:])                  # item 7 in both rows


def test_additive_heads_never_let_two_factors_interact():
    torch.manual_seed(0)
    head = planrec.AdditiveHeads(4, 3, 5)
    e, e_hat = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    change = lambda x, k: x.index_add(1, torch.tensor([k]), torch.ones(2, 1, 3))
    # the mixed second difference over factors 0 and 2 vanishes: logit = sum_k h_k(factor k)
    mixed = head(change(change(e, 0), 2), e_hat) - head(change(e, 0), e_hat) - head(change(e, 2), e_hat) + head(e, e_hat)
    torch.testing.assert_close(mixed, torch.zeros(2), atol=1e-5, rtol=0)
    model = planrec.PlanRec(planrec.Config(**TINY, head_form="additive"))
    out, (loss, _) = forward_loss(model)
    assert out["y"].shape == (3, 4) and torch.isfinite(loss)


@pytest.mark.parametrize("kw, message", [(dict(factor_sources="both"), "factor_sources"),
                                         (dict(head_form="sum"), "head_form"), (dict(w_personal_rec=-1), "w_personal_rec")])
def test_bad_option_values_are_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        planrec.Config(**kw)


@pytest.mark.parametrize("argv, message", [
    (["--world-users", "0"], "--world-users"), (["--world-items", "50"], "--world-items"),
    (["--edge-scale", "-1"], "--edge-scale"), (["--edge-strengths", "2", "1"], "LOW <= HIGH"),
    (["--sr-rows", "nonsense"], "unknown row"),
])
def test_bad_world_flags_say_what_is_wrong(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ex.parse_args(["structure-recovery", "--out", "x", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_sr_flags_are_appended_to_every_rows_flags_and_override_them(tmp_path):
    """--sr-flags (tuning): train.py flags after each row's own, so that they win, in the row's JSON
    and in the run's record; a run with other extra flags is another run (its own record)."""
    import json
    from analysis import ledger
    argv = ["structure-recovery", "--budget", "full", "--seeds", "0", "--world-seed", "0", "--world-users", "60",
            "--world-items", "150", "--sr-rows", "sr-tied", "--sr-flags", "--epochs 1 --set w_attribute=5",
            "--out", str(tmp_path / "out"), "--ledger", str(tmp_path / "ledger"),
            "--synthetic-dir", str(tmp_path / "worlds"), "--train-args", "--threads 1 --max-steps 2"]
    ex.main(argv)
    report = json.loads((tmp_path / "out" / "structure-recovery.json").read_text())
    [row] = report["rows"]
    assert report["ceiling"]["deviation_auc"]["per_world"] and 0 <= report["ceiling"]["deviation_auc"]["mean"] <= 1
    assert "the oracle that knows the world reaches" in report["markdown"]
    assert row["flags"] == [*ex.SR_DRAWN["sr-tied"][1], "--epochs", "1", "--set", "w_attribute=5"]
    [record] = [ledger.read_record(p) for p in (tmp_path / "ledger").glob("sr-tied-x*-w0-*.npz")]
    assert record.meta["metrics"]["config"]["w_attribute"] == 5.0
    assert record.meta["metrics"]["args"]["epochs"] == 1 and len(record.meta["metrics"]["epochs"]) == 1
    ex.main(argv[:argv.index("--sr-flags")] + argv[argv.index("--sr-flags") + 2:])   # the row as defined
    assert len(list((tmp_path / "ledger").glob("sr-tied-w0-*.npz"))) == 1          # its own key and folder
    assert (tmp_path / "out" / "runs" / "sr-tied-w0-seed0").is_dir() and record.meta["key"].startswith("sr-tied-x")
    # the record now carries the edge scores: the report is rebuilt with the run folders gone
    [record] = [ledger.read_record(p) for p in (tmp_path / "ledger").glob("sr-tied-x*-w0-*.npz")]
    assert {"edge_scores.abs_A", "edge_scores.effective", "edge_scores.loss_increase"} <= set(record.arrays)
    assert list(report["records"]) == [p.name for p in (tmp_path / "ledger").glob("sr-tied-x*-w0-*.npz")]
    assert "Runs: 1 ledger records" in (tmp_path / "out" / "REPORT.md").read_text()
    import shutil
    shutil.rmtree(tmp_path / "out")
    ex.main(argv + ["--from-ledger"])
    again = json.loads((tmp_path / "out" / "structure-recovery.json").read_text())
    assert again["rows"][0]["edge"] == row["edge"] and again["ceiling"] == report["ceiling"]
