"""
A synthetic world with known latent structure (paper §3.3.2 uses one for the OOD study): written
in ML-1M's format with its ground truth (ground_truth.npz) beside it, then prepared like ML-1M.

  python -m datasets.synthetic [--data-dir DIR] [--ood] [--rebuild]

`load` generates the world first when its folder holds none (default ./data/<name>).
"""

import inspect
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from datasets import common, ml1m
from datasets.ml1m import AGE_CODES as ML1M_AGE_CODES, GENDERS

SYNTHETIC_NODES = ("user.group", "user.age", "user.power", "user.occupation",
                   "item.category", "item.price", "item.era")
# The shared DAG: which user attribute drives preferences over which item attribute.
# user.occupation has no edge on purpose: a distractor a structure learner should leave alone.
SYNTHETIC_EDGES = (("user.group", "item.category"), ("user.power", "item.price"),
                   ("user.age", "item.era"))
SYNTHETIC_CATEGORIES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi")
SYNTHETIC_ERAS = (1960, 1980)  # era 0: before 1960, 1: 1960-1979, 2: 1980 and later


def make_synthetic(folder, n_users=1000, n_items=500, mean_len=40, seed=0, deviating_share=0.2,
                   ood_shift=False, n_shifted=1, edge_weights=(1.5, 1.5, 1.0), popularity_weight=1.0,
                   sequence_weight=1.0):
    """Write a synthetic world in ML-1M format (ratings.dat, users.dat, movies.dat) and its
    ground truth (ground_truth.npz: DAG, attributes, each user's deviations) into folder.

    Users: group (-> users.dat gender), age band (-> age), purchasing power 0..2 (latent, not
    in users.dat: a private factor), occupation (distractor). Items: category (-> genres), price
    level 0..2 (latent), year (-> title) and its era. A user's taste for an item is the sum over
    the DAG's edges, each weighted by edge_weights: group-specific category affinity, closeness
    of price to power, closeness of era to the age band's favourite era; plus item popularity
    and a bonus for staying in the previous item's category (so the history matters). A
    deviating_share of users drops one edge at random (e.g. ignores price, like the paper's
    wealthy user). Each user's sequence is drawn item by item without repeats (Gumbel-max).
    ood_shift=True: the last n_shifted interactions (the test target with the default 1) are
    drawn under a changed purchasing power. All other draws are identical between the IID and
    the OOD world of one seed, so they differ only in those last interactions.
    Deterministic given seed."""
    folder = Path(folder)
    lengths_floor = 10  # our choice: every user has some training history
    if n_items < 120 or mean_len < lengths_floor or n_users < 1 or not 0 <= deviating_share <= 1:
        raise ValueError(f"need n_items >= 120 (100 evaluation negatives), mean_len >= "
                         f"{lengths_floor}, n_users >= 1, 0 <= deviating_share <= 1")
    rng = np.random.default_rng(seed)
    n_edges, n_cat = len(SYNTHETIC_EDGES), len(SYNTHETIC_CATEGORIES)

    group = rng.integers(0, 2, n_users)
    age = rng.integers(0, len(ML1M_AGE_CODES), n_users)
    power = rng.integers(0, 3, n_users)
    occupation = rng.integers(0, 21, n_users)
    power_shift = (power + rng.integers(1, 3, n_users)) % 3  # always a different level
    power_test = power_shift if ood_shift else power
    deviating = rng.random(n_users) < deviating_share
    dropped = rng.integers(0, n_edges, n_users)
    user_deviation = np.where(deviating, dropped, -1)  # index of the ignored edge, -1 = none
    edge_mask = np.ones((n_users, n_edges), dtype=bool)
    edge_mask[deviating, dropped[deviating]] = False

    category = rng.integers(0, n_cat, n_items)
    price = rng.integers(0, 3, n_items)
    year = rng.integers(1940, 2001, n_items)
    era = np.digitize(year, SYNTHETIC_ERAS)
    log_popularity = rng.normal(0.0, 1.0, n_items)
    category_affinity = rng.normal(0.0, 1.0, (2, n_cat))  # per group
    favourite_era = np.round((len(ML1M_AGE_CODES) - 1 - age) * 2 / (len(ML1M_AGE_CODES) - 1))

    def taste(user_power):
        w = np.asarray(edge_weights, dtype=np.float64) * edge_mask  # [n_users, n_edges]
        return (w[:, :1] * category_affinity[group][:, category]
                - w[:, 1:2] * np.abs(price[None, :] - user_power[:, None])
                - w[:, 2:3] * np.abs(era[None, :] - favourite_era[:, None])
                + popularity_weight * log_popularity[None, :])

    lengths = np.minimum(lengths_floor + rng.poisson(mean_len - lengths_floor, n_users),
                         n_items - 101)
    max_len = int(lengths.max())
    taste_train, taste_test = taste(power), taste(power_test)
    chosen = np.zeros((n_users, max_len), dtype=np.int64)
    taken = np.zeros((n_users, n_items), dtype=bool)
    previous_category = np.full(n_users, -1)
    rows = np.arange(n_users)
    for t in range(max_len):  # a loop over steps, vectorized over users and items
        shifted = t >= lengths - n_shifted
        logits = np.where(shifted[:, None], taste_test, taste_train)
        logits = logits + sequence_weight * (category[None, :] == previous_category[:, None])
        logits[taken] = -np.inf
        pick = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
        chosen[:, t], taken[rows, pick] = pick, True
        previous_category = category[pick]

    start = 946_684_800 + rng.integers(0, 90 * 86_400, n_users)  # from 2000-01-01
    timestamps = start[:, None] + np.cumsum(rng.integers(60, 3 * 86_400, (n_users, max_len)), axis=1)
    rating = rng.integers(1, 6, (n_users, max_len))  # ignored by the protocol (implicit feedback)
    # Write each user's lines in a shuffled order, so readers must sort by timestamp.
    file_order = rng.permuted(np.tile(np.arange(max_len), (n_users, 1)), axis=1)

    ratings_lines = []
    for u in range(n_users):
        for t in file_order[u][file_order[u] < lengths[u]]:
            ratings_lines.append(f"{u + 1}::{chosen[u, t] + 1}::{rating[u, t]}::{timestamps[u, t]}")
    users_lines = [f"{u + 1}::{GENDERS[group[u]]}::{ML1M_AGE_CODES[age[u]]}::{occupation[u]}::00000"
                   for u in range(n_users)]
    movies_lines = [f"{i + 1}::Item {i + 1} ({year[i]})::{SYNTHETIC_CATEGORIES[category[i]]}"
                    for i in range(n_items)]
    adjacency = np.zeros((len(SYNTHETIC_NODES), len(SYNTHETIC_NODES)), dtype=np.int8)
    for a, b in SYNTHETIC_EDGES:
        adjacency[SYNTHETIC_NODES.index(a), SYNTHETIC_NODES.index(b)] = 1
    params = {"n_users": n_users, "n_items": n_items, "mean_len": mean_len, "seed": seed,
              "deviating_share": deviating_share, "ood_shift": ood_shift, "n_shifted": n_shifted,
              "edge_weights": list(edge_weights), "popularity_weight": popularity_weight,
              "sequence_weight": sequence_weight}

    # Write everything into a temporary folder, then move it into place: no half-written world.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=folder.parent))
    try:
        for name, lines in (("ratings.dat", ratings_lines), ("users.dat", users_lines),
                            ("movies.dat", movies_lines)):
            (tmp / name).write_text("\n".join(lines) + "\n", encoding="latin-1")
        # Arrays are indexed by raw id - 1 (UserID u -> [u - 1]); align with RecData through
        # raw_user_ids / raw_item_ids.
        np.savez(tmp / "ground_truth.npz",
                 nodes=np.array(SYNTHETIC_NODES), adjacency=adjacency,
                 edges=np.array(SYNTHETIC_EDGES), category_names=np.array(SYNTHETIC_CATEGORIES),
                 user_id=np.arange(1, n_users + 1), user_group=group, user_age_band=age,
                 user_power=power, user_power_test=power_test, user_occupation=occupation,
                 user_edge_mask=edge_mask, user_deviation=user_deviation, user_length=lengths,
                 item_id=np.arange(1, n_items + 1), item_category=category, item_price=price,
                 item_year=year, item_era=era, item_log_popularity=log_popularity,
                 category_affinity=category_affinity, favourite_era=favourite_era,
                 params=np.array(json.dumps(params)))
        common.move_into_place(tmp, folder, last=("ground_truth.npz",) + ml1m.FILES)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_ground_truth(folder):
    """The synthetic world's ground truth as a dict of arrays (params is a JSON string)."""
    with np.load(Path(folder) / "ground_truth.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def load(name="synthetic", root=None, rebuild=False, download=None, min_interactions=None, **world):
    """(prepared arrays, folder) of the synthetic world `name` ('synthetic' or 'synthetic-ood',
    which sets ood_shift) in root (default ./data/<name>), generated first if the folder holds
    none. world: make_synthetic's keyword arguments, world_seed for its seed; a folder holding
    a world made with other values of them is an error. download is ignored (nothing to get)."""
    if min_interactions not in (0, None):
        raise ValueError(f"--min-interactions (min_interactions) applies to amazon-book and "
                         f"interactions; {name} is used as it is (every user keeps all ratings)")
    folder = Path(root).expanduser() if root is not None else Path("data") / name
    requested = json.loads(json.dumps({"ood_shift": name == "synthetic-ood", **world}))
    if "world_seed" in requested:
        requested["seed"] = requested.pop("world_seed")
    if not (ml1m.contains_ml1m(folder) and (folder / "ground_truth.npz").is_file()):
        make_synthetic(folder, **requested)
    else:
        made_with = json.loads(str(load_ground_truth(folder)["params"]))
        differing = {k: (made_with.get(k), v) for k, v in requested.items() if made_with.get(k) != v}
        if differing:
            raise ValueError(f"{folder} holds a synthetic world made with other settings "
                             f"(setting: (stored, requested)) {differing}; delete the folder "
                             f"or choose another --data-dir")
    arrays = common.load_prepared(name, folder, [folder / f for f in ml1m.FILES], {},
                                  lambda: ml1m.prepare(folder, expected_counts=None), rebuild)
    return arrays, folder


# ------------------------------------------------------------------------------------------------
# A world drawn per seed, for the structure-recovery experiment (issue 20): several user and item
# attributes, every one of them observable (users.csv / items.csv, so --attribute-prior ties them
# all), about 10 user -> item edges of mixed strengths, some user -> user edges, distractors. Written
# as a generic interaction log (--data interactions --data-dir FOLDER), its truth in ground_truth.npz.
# ------------------------------------------------------------------------------------------------

def _world_attributes(rng, count, prefix):
    """count attributes: (names, kinds 'class'/'ordinal', cardinalities)."""
    kinds = np.where(np.arange(count) % 2 == 0, "class", "ordinal")   # alternate kinds, our choice
    cards = rng.integers(3, 6, count)                                   # 3..5 values each
    return [f"{prefix}{k}" for k in range(count)], list(kinds), [int(c) for c in cards]


def draw_world_dag(seed, n_user_attrs=5, n_item_attrs=5, n_edges=10, n_user_edges=3,
                   strength_range=(0.5, 2.0)):
    """The DAG of world `seed`: (user names, item names, u2i edges [(u, i, strength)], u2u edges
    [(parent, child)]), attributes by index. The last user and the last item attribute are
    distractors (no user -> item edge touches them); every other user attribute has at least one
    item child and every other item attribute at least one user parent. User -> user edges go from
    a lower to a higher index (the attributes are drawn in index order)."""
    rng = np.random.default_rng([seed, 20])
    nu, ni = n_user_attrs - 1, n_item_attrs - 1                        # non-distractors
    if not (nu >= 1 and ni >= 1 and max(nu, ni) <= n_edges <= nu * ni):
        raise ValueError(f"need {max(nu, ni)} <= n_edges <= {nu * ni} for {n_user_attrs} user and "
                         f"{n_item_attrs} item attributes (one of each is a distractor)")
    if not 0 <= n_user_edges <= n_user_attrs * (n_user_attrs - 1) // 2:
        raise ValueError(f"n_user_edges must be in 0..{n_user_attrs * (n_user_attrs - 1) // 2}")
    pairs = [(u, i) for u in range(nu) for i in range(ni)]
    while True:   # rejection: every non-distractor attribute on some edge
        chosen = rng.choice(len(pairs), n_edges, replace=False)
        edges = [pairs[k] for k in sorted(chosen)]
        if {u for u, _ in edges} == set(range(nu)) and {i for _, i in edges} == set(range(ni)):
            break
    low, high = strength_range
    strengths = np.linspace(low, high, n_edges)[rng.permutation(n_edges)]   # mixed strengths, spread evenly
    upper = [(a, b) for a in range(n_user_attrs) for b in range(a + 1, n_user_attrs)]
    user_edges = [upper[k] for k in sorted(rng.choice(len(upper), n_user_edges, replace=False))]
    return ([f"ua{k}" for k in range(n_user_attrs)], [f"ia{k}" for k in range(n_item_attrs)],
            [(u, i, float(w)) for (u, i), w in zip(edges, strengths)], user_edges)


def structured_preferences(n_users, n_items, seed, n_user_attrs, n_item_attrs, n_edges, n_user_edges,
                           strength_range, edge_scale, user_edge_strength, deviating_share, popularity_weight):
    """Everything of make_structured_world's world `seed` before its sequences are drawn, as a dict:
    the DAG, the attributes, who ignores which edge, each edge's standardized match per pair of
    values (match_tables[e][user value, item value]), taste [users, items] and the generator `rng`
    where make_structured_world goes on drawing. Replaying it from ground_truth.npz's params gives
    the world's exact preferences (structure_recovery.deviation_ceiling reads them)."""
    user_names, item_names, edges, user_edges = draw_world_dag(seed, n_user_attrs, n_item_attrs, n_edges,
                                                               n_user_edges, strength_range)
    rng = np.random.default_rng([seed, 21])
    _, user_kinds, user_cards = _world_attributes(rng, n_user_attrs, "ua")
    _, item_kinds, item_cards = _world_attributes(rng, n_item_attrs, "ia")

    user_values = np.zeros((n_users, n_user_attrs), dtype=np.int64)
    for k in range(n_user_attrs):             # a loop over attributes, vectorized over users
        values = rng.integers(0, user_cards[k], n_users)
        parents = [p for p, c in user_edges if c == k]
        if parents:   # copy (a random map of) one of the parents, chosen per user
            mapped = np.stack([rng.integers(0, user_cards[k], user_cards[p])[user_values[:, p]] for p in parents], 1)
            mapped = mapped[np.arange(n_users), rng.integers(0, len(parents), n_users)]
            values = np.where(rng.random(n_users) < user_edge_strength, mapped, values)
        user_values[:, k] = values
    item_values = np.stack([rng.integers(0, c, n_items) for c in item_cards], 1)

    n_e = len(edges)
    deviating = rng.random(n_users) < deviating_share
    dropped = rng.integers(0, n_e, n_users)
    user_deviation = np.where(deviating, dropped, -1)
    edge_mask = np.ones((n_users, n_e), dtype=bool)
    edge_mask[deviating, dropped[deviating]] = False
    taste, match_tables = np.zeros((n_users, n_items)), []
    for e, (u, i, strength) in enumerate(edges):   # a loop over the ~10 edges, vectorized over pairs
        a, b = user_values[:, u], item_values[:, i]
        if user_kinds[u] == "ordinal" and item_kinds[i] == "ordinal":
            match = -np.abs(a[:, None] / (user_cards[u] - 1) - b[None, :] / (item_cards[i] - 1))
            table = -np.abs(np.arange(user_cards[u])[:, None] / (user_cards[u] - 1)
                            - np.arange(item_cards[i])[None, :] / (item_cards[i] - 1))
        else:
            table = rng.normal(0.0, 1.0, (user_cards[u], item_cards[i]))
            match = table[a][:, b]
        mean, std = match.mean(), (match.std() or 1.0)
        match = (match - mean) / std
        match_tables.append((table - mean) / std)   # the same floats as match, per pair of values
        taste += (strength * edge_scale) * edge_mask[:, e:e + 1] * match
    log_popularity = rng.normal(0.0, 1.0, n_items)
    taste += popularity_weight * log_popularity[None, :]

    return dict(rng=rng, taste=taste, user_names=user_names, item_names=item_names, edges=edges,
                user_edges=user_edges, user_kinds=user_kinds, item_kinds=item_kinds, user_cards=user_cards,
                item_cards=item_cards, user_values=user_values, item_values=item_values, edge_mask=edge_mask,
                user_deviation=user_deviation, match_tables=match_tables, log_popularity=log_popularity)


def replay_preferences(truth):
    """structured_preferences of the world whose ground truth (load_ground_truth) is given."""
    params = json.loads(str(truth["params"]))
    return structured_preferences(**{k: params[k] for k in inspect.signature(structured_preferences).parameters})


def make_structured_world(folder, n_users=5000, n_items=1000, mean_len=20, seed=0, n_user_attrs=5,
                          n_item_attrs=5, n_edges=10, n_user_edges=3, strength_range=(0.5, 2.0),
                          edge_scale=1.0, user_edge_strength=0.7, deviating_share=0.2,
                          popularity_weight=1.0, sequence_weight=0.5):
    """Write world `seed` (draw_world_dag) into folder as interactions.csv, users.csv, items.csv and
    ground_truth.npz; returns folder. Read it with --data interactions --data-dir folder.

    Attributes alternate between unordered classes (written as text, so they are classified) and
    ordered levels (numbers, regressed), 3..5 values each. Users draw their attributes in index
    order: with probability user_edge_strength a user's child attribute c copies a random map (one
    per edge) of the value of one of its user parents p, chosen uniformly per user, else c is
    uniform. Items draw theirs independently. A user's taste for an
    item is the sum over the user -> item edges of strength * edge_scale * match, each match
    standardized to mean 0 and variance 1 over all (user, item) pairs: for two ordered attributes
    the closeness -|a - b| of their levels on a common 0..1 scale (like purchasing power and price),
    otherwise a random affinity table of the pair of values (like group and category); plus item
    popularity and a bonus for the previous item's value of item attribute 0. edge_scale=0 is the
    floor world (no edge carries anything). A deviating_share of users ignores one edge at random,
    like the paper's wealthy user. Sequences are drawn item by item without repeats (Gumbel-max).
    Deterministic given its arguments."""
    folder = Path(folder)
    lengths_floor = 10  # our choice, as make_synthetic: every user has some training history
    if n_items < 120 or mean_len < lengths_floor or n_users < 1 or not 0 <= deviating_share <= 1:
        raise ValueError(f"need n_items >= 120 (100 evaluation negatives), mean_len >= {lengths_floor}, "
                         f"n_users >= 1, 0 <= deviating_share <= 1")
    if edge_scale < 0 or not 0 <= user_edge_strength <= 1 or strength_range[0] > strength_range[1]:
        raise ValueError("need edge_scale >= 0, 0 <= user_edge_strength <= 1 and a range low <= high")
    w = structured_preferences(n_users, n_items, seed, n_user_attrs, n_item_attrs, n_edges, n_user_edges,
                               strength_range, edge_scale, user_edge_strength, deviating_share, popularity_weight)
    rng, taste, user_values, item_values = w["rng"], w["taste"], w["user_values"], w["item_values"]
    user_names, item_names, edges, user_edges = w["user_names"], w["item_names"], w["edges"], w["user_edges"]
    user_kinds, item_kinds, user_cards, item_cards = w["user_kinds"], w["item_kinds"], w["user_cards"], w["item_cards"]
    edge_mask, user_deviation, log_popularity = w["edge_mask"], w["user_deviation"], w["log_popularity"]

    lengths = np.minimum(lengths_floor + rng.poisson(mean_len - lengths_floor, n_users), n_items - 101)
    max_len = int(lengths.max())
    chosen = np.zeros((n_users, max_len), dtype=np.int64)
    taken = np.zeros((n_users, n_items), dtype=bool)
    previous = np.full(n_users, -1)
    rows = np.arange(n_users)
    first_item_attr = item_values[:, 0]
    for t in range(max_len):  # a loop over steps, vectorized over users and items
        logits = taste + sequence_weight * (first_item_attr[None, :] == previous[:, None])
        logits[taken] = -np.inf
        pick = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
        chosen[:, t], taken[rows, pick] = pick, True
        previous = first_item_attr[pick]
    timestamps = 946_684_800 + np.cumsum(rng.integers(60, 3 * 86_400, (n_users, max_len)), axis=1)

    valid = np.arange(max_len)[None, :] < lengths[:, None]
    user_col, step = np.nonzero(valid)
    log_lines = ["user,item,timestamp"] + [f"u{u + 1},i{chosen[u, t] + 1},{timestamps[u, t]}"
                                           for u, t in zip(user_col, step)]
    text = lambda kind, v: f"c{v}" if kind == "class" else str(int(v))   # classes as text, levels as numbers
    users_lines = ["user," + ",".join(user_names)] + [
        f"u{u + 1}," + ",".join(text(user_kinds[k], user_values[u, k]) for k in range(n_user_attrs))
        for u in range(n_users)]
    items_lines = ["item," + ",".join(item_names)] + [
        f"i{i + 1}," + ",".join(text(item_kinds[k], item_values[i, k]) for k in range(n_item_attrs))
        for i in range(n_items)]

    nodes = [f"user.{n}" for n in user_names] + [f"item.{n}" for n in item_names]
    adjacency = np.zeros((len(nodes), len(nodes)), dtype=np.int8)
    strength = np.zeros((len(nodes), len(nodes)))
    for u, i, w in edges:
        adjacency[u, n_user_attrs + i], strength[u, n_user_attrs + i] = 1, w * edge_scale
    for p, c in user_edges:
        adjacency[p, c], strength[p, c] = 1, user_edge_strength
    params = {"kind": "structured", "n_users": n_users, "n_items": n_items, "mean_len": mean_len, "seed": seed,
              "n_user_attrs": n_user_attrs, "n_item_attrs": n_item_attrs, "n_edges": n_edges,
              "n_user_edges": n_user_edges, "strength_range": list(strength_range), "edge_scale": edge_scale,
              "user_edge_strength": user_edge_strength, "deviating_share": deviating_share,
              "popularity_weight": popularity_weight, "sequence_weight": sequence_weight}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".world-", dir=folder.parent))
    try:
        for name, lines in (("interactions.csv", log_lines), ("users.csv", users_lines), ("items.csv", items_lines)):
            (tmp / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        # Arrays indexed by raw id - 1 (user 'u7' -> [6]); edges index edge_parent/edge_child into nodes.
        np.savez(tmp / "ground_truth.npz", nodes=np.array(nodes), adjacency=adjacency, strength=strength,
                 edges=np.array([[nodes[u], nodes[n_user_attrs + i]] for u, i, _ in edges]),
                 edge_strength=np.array([w * edge_scale for *_, w in edges]),
                 user_edges=np.array([[nodes[p], nodes[c]] for p, c in user_edges]).reshape(-1, 2),
                 user_kinds=np.array(user_kinds), item_kinds=np.array(item_kinds),
                 user_cards=np.array(user_cards), item_cards=np.array(item_cards),
                 user_values=user_values, item_values=item_values, user_id=np.arange(1, n_users + 1),
                 user_edge_mask=edge_mask, user_deviation=user_deviation, user_length=lengths,
                 item_log_popularity=log_popularity, params=np.array(json.dumps(params)))
        common.move_into_place(tmp, folder, last=("ground_truth.npz", "interactions.csv"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def raw_index(ids):
    """Raw ids of a structured world ('u7', 'i12', as RecData.raw_user_ids / raw_item_ids hold
    them) -> indices into its ground-truth arrays (6, 11); '' (the padding item) -> -1."""
    return np.array([int(str(x)[1:]) - 1 if str(x) else -1 for x in ids], dtype=np.int64)



if __name__ == "__main__":
    name = lambda args: "synthetic-ood" if args.ood else "synthetic"
    common.main(__doc__, lambda args: (name(args), load(name(args), args.data_dir, args.rebuild)[0]),
                **{"--ood": {"action": "store_true", "help": "the OOD world (default ./data/synthetic-ood)"}})
