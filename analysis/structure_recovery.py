"""Structure recovery on the structured synthetic worlds (issue 20): metrics with power, edge scores
that no rescaling of A against g changes, and a ceiling fitted on the true attributes.

experiments.py's `structure-recovery` experiment trains the runs and calls these. Everything here is
numpy (scipy.stats.rankdata for ranks): no sklearn.

Edge scores of a trained model (`edge_scores`), each [N(parent), N(child)]:
    abs_A          |A[j, i]|, what the paper reads off the model.
    effective      |A[j, i]| * ||W1_i[j]||, W1_i[j] the first-layer weights of g_i (Eq. (8)) on parent
                   j's d inputs. Scaling A[j, i] by c and W1_i[j] by 1/c leaves g_i(A_i * e) unchanged and
                   this score too, while |A| moves by c. (A also enters Eq. (7), where no such
                   compensation exists, so the rescaling is a symmetry of Eq. (8) only.)
    loss_increase  how much the shared prediction's loss (BCE of MLP_R(e-hat) on validation
                   candidates, positives and their 100 negatives) grows when A[j, i] alone is set to
                   zero, in Eq. (7) and (8) both: a property of what the model computes, so no
                   reparameterization that keeps its predictions can change it.
"""

import json

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import logsumexp
from scipy.stats import rankdata

import planrec
from datasets.synthetic import raw_index, replay_preferences

# ------------------------------------------------------------------------------------------------
# Ranking metrics of one score vector against binary labels
# ------------------------------------------------------------------------------------------------


def auroc(scores, labels):
    """ROC AUC (the Mann-Whitney U over n_pos n_neg, ties counting one half); nan without both classes."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(scores, labels):
    """Average precision: sum over the distinct thresholds (highest first) of the recall gained times
    the precision there (tied scores enter together, as one threshold); nan without positives. A
    random score's expectation is about the share of positives."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if labels.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]                 # the last entry of each tie group
    tp, seen = np.cumsum(y)[last], np.arange(1, len(y) + 1)[last]
    recall_gain = np.diff(np.r_[0, tp]) / labels.sum()
    return float((recall_gain * tp / seen).sum())


def precision_at_k(scores, labels, k=None):
    """Share of true edges among the k best scores (default k = the number of true edges); a tie at
    the cut counts the tied entries by the share of them that fits (the expectation over orders)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    k = int(labels.sum()) if k is None else int(k)
    if k == 0:
        return float("nan")
    threshold = np.sort(scores)[::-1][k - 1]
    above, tied = scores > threshold, scores == threshold
    room = k - above.sum()
    return float((labels[above].sum() + room * labels[tied].mean()) / k)


METRICS = {"auroc": auroc, "auprc": auprc, "precision_at_k": precision_at_k}


def pooled(scores_per_seed, labels_per_seed, metric):
    """One metric over every seed's pairs together. AUROC and AUPRC rank the scores within each seed
    first (ranks scaled to 0..1), so that runs with differently scaled A pool fairly; precision at k
    is the hits of each seed's own top-k (k = its true edges) over all k."""
    if metric == "precision_at_k":
        hits = sum(precision_at_k(s, l) * np.sum(l) for s, l in zip(scores_per_seed, labels_per_seed))
        return float(hits / sum(np.sum(l) for l in labels_per_seed))
    ranked = [(rankdata(s) - 1) / max(len(s) - 1, 1) for s in scores_per_seed]
    return METRICS[metric](np.concatenate(ranked), np.concatenate(labels_per_seed))


def bootstrap_interval(scores_per_seed, labels_per_seed, metric, n_resamples=1000, level=0.95, seed=0):
    """Percentile bootstrap interval of `pooled`: the pairs of each seed resampled with replacement
    (stratified by seed and by label, so every resample keeps each seed's true edges count)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):   # an analysis, not a hot path: ~1,000 resamples of ~100 pairs
        s_b, l_b = [], []
        for s, l in zip(scores_per_seed, labels_per_seed):
            s, l = np.asarray(s, dtype=np.float64), np.asarray(l, dtype=bool)
            pick = np.concatenate([rng.choice(np.flatnonzero(l == v), (l == v).sum()) for v in (True, False) if (l == v).any()])
            s_b.append(s[pick]), l_b.append(l[pick])
        values.append(pooled(s_b, l_b, metric))
    values = np.asarray(values)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def pooled_summary(scores_per_seed, labels_per_seed, n_resamples=1000):
    """{metric: {'pooled', 'low', 'high', 'mean', 'per_seed'}} for AUROC, AUPRC and precision at k."""
    out = {}
    for name, fn in METRICS.items():
        low, high = bootstrap_interval(scores_per_seed, labels_per_seed, name, n_resamples)
        per_seed = [fn(s, l) for s, l in zip(scores_per_seed, labels_per_seed)]
        out[name] = {"pooled": pooled(scores_per_seed, labels_per_seed, name), "low": low, "high": high,
                     "mean": float(np.nanmean(per_seed)) if np.isfinite(per_seed).any() else float("nan"),
                     "per_seed": per_seed}
    base = np.mean(np.concatenate([np.asarray(l, dtype=float) for l in labels_per_seed]))
    out["chance"] = {"auroc": 0.5, "auprc": float(base), "precision_at_k": float(base)}
    return out


# ------------------------------------------------------------------------------------------------
# Which pairs are scored, and their truth
# ------------------------------------------------------------------------------------------------


def scored_pairs(factor_names, truth, allowed):
    """The scored (parent, child) factor pairs of one run and their labels.

    cross: ordered pairs of a user-side and an item-side tied factor that the model allows
           (allowed [N, N] bool): u -> i always, i -> u where the i2u prior is off, so that an edge
           learned backwards counts against the model. Label: the world's u -> i edge.
    all:   every allowed ordered pair of tied factors; labels: u -> i and u -> u edges.
    Returns {'cross': (pairs, labels), 'all': (pairs, labels)}."""
    names = [str(n) for n in factor_names]
    nodes = [str(n) for n in truth["nodes"]]
    adjacency = np.asarray(truth["adjacency"], dtype=bool)
    tied = [k for k, n in enumerate(names) if n in nodes]
    node = {k: nodes.index(names[k]) for k in tied}
    user = {k: names[k].startswith("user.") for k in tied}
    out = {}
    for kind in ("cross", "all"):
        pairs = [(p, c) for p in tied for c in tied if p != c and allowed[p, c]
                 and (kind == "all" or user[p] != user[c])]
        labels = np.array([adjacency[node[p], node[c]] and (kind == "all" or user[p]) for p, c in pairs], dtype=bool)
        out[kind] = (pairs, labels)
    return out


def deviation_auc(keep_prob_A, user_ids, factor_names, truth):
    """Mean over the world's u -> i edges of the ROC AUC with which the masking probability
    (1 - keep probability) of that edge's entry separates the users who ignore the edge from all
    others; ({edge: AUC}, mean). nan where no user keeps the model's masks (no personalized branch)."""
    if keep_prob_A is None:
        return {}, float("nan")
    names = [str(n) for n in factor_names]
    deviation = np.asarray(truth["user_deviation"])[raw_index(user_ids)]
    per_edge = {}
    for e, (parent, child) in enumerate(truth["edges"]):
        if str(parent) in names and str(child) in names:
            p, c = names.index(str(parent)), names.index(str(child))
            per_edge[f"{parent}->{child}"] = auroc(1.0 - keep_prob_A[:, p, c], deviation == e)
    defined = [v for v in per_edge.values() if np.isfinite(v)]
    return per_edge, float(np.mean(defined)) if defined else float("nan")


def deviation_ceiling(truth, sequences, users_per_chunk=256):
    """The deviation AUC of an oracle that knows the world: every user's attributes, every edge's
    strength and match, popularity and the previous-item bonus, but not who ignores which edge.
    Per user and edge it scores the log-likelihood ratio of the user's sequence under "ignores this
    edge" against "keeps every edge", replaying the generator's draw (softmax over the items not yet
    taken, make_structured_world); then deviation_auc's per-edge AUC of that score against the users
    who ignore the edge. No model can beat it on the same sequences, so it says how much the data
    allow. sequences: [n_users of the world, L] item indices (raw id - 1) in order, -1 for padding
    (anywhere); users with no item are left out. ({edge: AUC}, mean)."""
    params = json.loads(str(truth["params"]))
    world = replay_preferences(truth)
    uv, iv = world["user_values"], world["item_values"]
    # what each edge adds to a user's taste for each item, [edges, users, items]; ignoring it removes it
    parts = np.stack([strength * params["edge_scale"] * table[uv[:, u]][:, iv[:, i]]
                      for (u, i, strength), table in zip(world["edges"], world["match_tables"])])
    kept = parts.sum(0) + params["popularity_weight"] * world["log_popularity"][None, :]
    sequences = np.asarray(sequences)
    first_attr = iv[:, 0]
    loglik = np.zeros((len(kept), len(parts) + 1))      # [users, hypotheses]: keeps all, ignores edge e
    for start in range(0, len(kept), users_per_chunk):  # chunks of users; hypotheses and items vectorized
        rows = np.arange(start, min(start + users_per_chunk, len(kept)))
        logits = kept[rows, None, :] - np.concatenate([np.zeros((1, len(rows), kept.shape[1])), parts[:, rows]]).transpose(1, 0, 2)
        taken = np.zeros((len(rows), kept.shape[1]), dtype=bool)
        previous = np.full(len(rows), -1)
        for t in range(sequences.shape[1]):              # the draw is sequential: a loop over steps
            item = sequences[rows, t]
            active = item >= 0
            step = logits + params["sequence_weight"] * (first_attr[None, :] == previous[:, None])[:, None, :]
            step = np.where(taken[:, None, :], -np.inf, step)
            picked = step[np.arange(len(rows)), :, np.maximum(item, 0)]
            loglik[rows] += np.where(active[:, None], picked - logsumexp(step, axis=2), 0.0)
            taken[np.arange(len(rows))[active], item[active]] = True
            previous = np.where(active, first_attr[np.maximum(item, 0)], previous)
    present = (sequences >= 0).any(1)
    ratio = loglik[present, 1:] - loglik[present, :1]
    deviation = np.asarray(truth["user_deviation"])[present]
    per_edge = {f"{parent}->{child}": auroc(ratio[:, e], deviation == e) for e, (parent, child) in enumerate(truth["edges"])}
    defined = [v for v in per_edge.values() if np.isfinite(v)]
    return per_edge, float(np.mean(defined)) if defined else float("nan")


# ------------------------------------------------------------------------------------------------
# Edge scores of a trained model
# ------------------------------------------------------------------------------------------------


def effective_scores(A, w1, factor_dim):
    """|A[j, i]| * ||W1_i[j]||_F: A [N, N]; w1 [N(child), N*d, H], g's first layer (FactorMLPs.w1)."""
    A, w1 = np.asarray(A, dtype=np.float64), np.asarray(w1, dtype=np.float64)
    N = A.shape[0]
    norms = np.sqrt((w1.reshape(N, N, factor_dim, -1) ** 2).sum((2, 3)))       # [child, parent]
    return np.abs(A) * norms.T


@torch.no_grad()
def loss_increase_scores(model, data, device, n_users=300, seed=0):
    """[N, N]: the shared prediction's BCE on n_users' validation candidates (a fixed seeded subset;
    positive in column 0) with A[j, i] set to zero, minus the BCE with A intact. Entries the model
    does not allow (blocked, diagonal) are 0. The encoder runs once; each entry re-solves Eq. (7)-(8)."""
    users, history, candidates = data.eval_split("valid", model.context_len)
    pick = np.sort(np.random.default_rng(seed).permutation(len(users))[:n_users])
    model.eval()
    hist = torch.as_tensor(history[pick], device=device)
    items = torch.as_tensor(candidates[pick], device=device)
    out = model.encode(hist, items)
    labels = torch.zeros(items.shape, device=device)
    labels[:, 0] = 1
    weight = torch.ones_like(labels)
    weight[:, 0] = items.shape[1] - 1            # positives and negatives weigh alike (our choice)

    def loss(A):
        e = planrec.scm(out["z"], A)                                          # Eq. (7)
        e_hat = model.g(A, e)                                                 # Eq. (8)
        y = model.predict(model.predict_shared, e, e_hat).clamp(1e-7, 1 - 1e-7)
        return float(F.binary_cross_entropy(y, labels, weight=weight))

    A = model.shared_A().detach()
    base = loss(A)
    allowed = (model.support > 0).cpu().numpy()
    scores = np.zeros(A.shape)
    for j, i in zip(*np.nonzero(allowed)):     # an analysis over the N(N-1) entries, not a hot path
        zeroed = A.clone()
        zeroed[j, i] = 0
        scores[j, i] = loss(zeroed) - base
    return scores


def edge_scores(model, data, device, n_users=300, seed=0):
    """{'abs_A', 'effective', 'loss_increase'}: [N, N] arrays of one trained model (module docstring)."""
    A = model.shared_A().detach().cpu().numpy()
    return {"abs_A": np.abs(A),
            "effective": effective_scores(A, model.g.w1.detach().cpu().numpy(), model.cfg.factor_dim),
            "loss_increase": loss_increase_scores(model, data, device, n_users, seed)}


# ------------------------------------------------------------------------------------------------
# The ceiling: a linear structure fitted on the true attributes of the positive pairs
# ------------------------------------------------------------------------------------------------


def _one_hot(values, size):
    out = np.zeros((len(values), size))
    out[np.arange(len(values)), values] = 1.0
    return out


def ceiling_scores(truth, user_index, item_index):
    """[n_user_attrs, n_item_attrs] edge scores of a linear structure fitted on the true attributes
    of the positive pairs (user_index, item_index: indices into the truth's arrays): for each item
    attribute, least squares of its one-hot values on every user attribute's one-hot values (with an
    intercept); the score of u -> i is the share of i's variance that removing u's columns loses
    (the partial R^2, so a user attribute that only follows another one scores little)."""
    uv, iv = np.asarray(truth["user_values"])[user_index], np.asarray(truth["item_values"])[item_index]
    user_cards, item_cards = np.asarray(truth["user_cards"]), np.asarray(truth["item_cards"])
    blocks = [_one_hot(uv[:, k], c)[:, 1:] for k, c in enumerate(user_cards)]   # one level dropped
    ones = np.ones((len(uv), 1))
    scores = np.zeros((len(user_cards), len(item_cards)))

    def explained(X, Y):
        coef, *_ = np.linalg.lstsq(X, Y, rcond=None)
        return ((X @ coef - Y.mean(0)) ** 2).sum()

    for b, card in enumerate(item_cards):
        Y = _one_hot(iv[:, b], card)
        total = ((Y - Y.mean(0)) ** 2).sum() or 1.0
        full = explained(np.hstack([ones] + blocks), Y)
        for u in range(len(user_cards)):
            without = explained(np.hstack([ones] + blocks[:u] + blocks[u + 1:]), Y)
            scores[u, b] = (full - without) / total
    return scores


def ceiling_metrics(truth, user_index, item_index):
    """(scores [U, I], labels [U, I]) of the ceiling over the u -> i pairs."""
    scores = ceiling_scores(truth, user_index, item_index)
    nu = len(truth["user_cards"])
    labels = np.asarray(truth["adjacency"], dtype=bool)[:nu, nu:]
    return scores, labels
