"""Tests for data.py: they write their own small files; only one test reads the shared ML-1M."""

import hashlib
import io
import os
import tempfile
import urllib.error
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import data

SHARED_ML1M = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m"
FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def write_ml(folder, ratings, users=None, movies=None):
    """ratings: (user, item, timestamp) rows in file order; users/movies default to covering them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if users is None:
        users = [f"{u}::{'MF'[u % 2]}::{data.ML1M_AGE_CODES[u % 7]}::{u % 21}::12345"
                 for u in sorted({r[0] for r in ratings})]
    if movies is None:
        movies = [f"{i}::Movie {i} ({1900 + i})::{'Comedy|Drama' if (i // 10) % 2 else 'Action'}"
                  for i in sorted({r[1] for r in ratings})]
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{3}::{t}\n" for u, i, t in ratings))
    (folder / "users.dat").write_text("\n".join(users) + "\n")
    (folder / "movies.dat").write_text("\n".join(movies) + "\n", encoding="latin-1")
    return folder


def load_quiet(folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small files never have the canonical counts
        return data._load_folder(folder, "test", None, **kw)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    # Every test runs in its own folder: ./data/... and the cache never touch the checkout.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PLANREC_DATA", raising=False)
    monkeypatch.delenv("PLANREC_CACHE", raising=False)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world") / "synthetic"
    data.make_synthetic(folder, n_users=80, n_items=160, mean_len=25, seed=3)
    return folder


@pytest.fixture(scope="module")
def world_data(small_world):
    return data._load_folder(small_world, "synthetic", None, seed=0)


# --- protocol ---------------------------------------------------------------------------------

def test_protocol_on_handmade_files(tmp_path):
    ratings = [(7, 30, 500), (7, 10, 100), (7, 20, 100), (7, 40, 900),  # tie: 10 before 20
               (2, 20, 5), (2, 50, 3), (2, 10, 4), (2, 40, 6), (2, 30, 7)]
    folder = write_ml(tmp_path / "ml", ratings)
    d = load_quiet(folder, n_eval_negatives=0)
    assert (d.n_users, d.n_items) == (2, 5)
    assert d.raw_user_ids.tolist() == [2, 7]
    assert d.raw_item_ids.tolist() == [0, 10, 20, 30, 40, 50]
    # user 2 (index 0): 50, 10, 20, 40, 30; user 7: 10, 20 (file order on the tie), 30, 40
    assert d.item_seq.tolist() == [5, 1, 2, 4, 3, 1, 2, 3, 4]
    assert d.user_offsets.tolist() == [0, 5, 9]
    assert d.train_user.tolist() == [0, 0, 1] and d.train_pos.tolist() == [1, 2, 6]
    assert d.valid_candidates[:, 0].tolist() == [4, 3] and d.test_candidates[:, 0].tolist() == [3, 4]
    # training part = positions 0..len-3: items 5,1,2 and 1,2
    assert d.item_train_count.tolist() == [0, 2, 2, 0, 0, 1]
    assert d.history([1], [8], length=4).tolist() == [[0, 1, 2, 3]]
    assert d.user_attrs["gender"].tolist() == [1, 0]  # UserID 2 -> 'M', 7 -> 'F' (write_ml)
    assert d.user_attrs["age"].tolist() == [2, 0]  # codes 25 and 1 -> band indices
    assert d.attr_vocab["genres"] == ["Action", "Comedy", "Drama"]
    assert d.item_attrs["genres"][0].tolist() == [0, 0, 0]
    assert d.item_attrs["genres"][1].tolist() == [0, 1, 1]  # MovieID 10: Comedy|Drama
    assert d.item_attrs["genres"][2].tolist() == [1, 0, 0]  # MovieID 20: Action
    assert d.item_attrs["genres"][5].tolist() == [0, 1, 1]  # MovieID 50: Comedy|Drama
    assert d.item_attrs["year"].tolist() == [0, 1910, 1920, 1930, 1940, 1950]


def reference_sequences(ratings):
    """Pure-Python protocol: per user (ascending id), items sorted by timestamp, stable."""
    by_user = {}
    for u, i, t in ratings:
        by_user.setdefault(u, []).append((t, i))
    return {u: [i for t, i in sorted(rows, key=lambda r: r[0])] for u, rows in sorted(by_user.items())}


@FAST
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 25), st.integers(0, 5)),
                min_size=1, max_size=80))
def test_sequences_and_histories_match_reference(rows):
    ratings = list({(u, i): (u, i, t) for u, i, t in rows}.values())  # one rating per pair
    ref = {u: s for u, s in reference_sequences(ratings).items() if len(s) >= 3}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_ml(tmp, ratings)
        if not ref:
            with pytest.raises(ValueError, match="no user"):
                load_quiet(folder, n_eval_negatives=0)
            return
        d = load_quiet(folder, n_eval_negatives=0)
    items = d.raw_item_ids
    assert d.raw_user_ids.tolist() == list(ref)
    for u, seq in enumerate(ref.values()):
        mine = d.item_seq[d.user_offsets[u]:d.user_offsets[u + 1]]
        assert items[mine].tolist() == seq
    # every training position: history = up to 3 previous items of the same user, left-padded
    hist = d.history(d.train_user, d.train_pos, length=3)
    for (u, p), h in zip(zip(d.train_user, d.train_pos), hist):
        t = p - d.user_offsets[u]
        assert 1 <= t <= d.user_offsets[u + 1] - d.user_offsets[u] - 3
        expected = d.item_seq[max(d.user_offsets[u], p - 3):p].tolist()
        assert h.tolist() == [0] * (3 - len(expected)) + expected
    assert len(d.train_pos) == sum(len(s) - 3 for s in ref.values())


def test_no_target_leaks_into_histories(world_data):
    d = world_data
    valid_item, test_item = d.valid_candidates[:, 0], d.test_candidates[:, 0]
    hist = d.history(d.train_user, d.train_pos)
    # the synthetic world never repeats an item for a user, so any occurrence would be a leak
    assert not (hist == valid_item[d.train_user, None]).any()
    assert not (hist == test_item[d.train_user, None]).any()
    assert (d.train_pos < d.user_offsets[d.train_user + 1] - 2).all()
    users, valid_hist, cands = d.eval_split("valid")
    assert cands is d.valid_candidates and users.tolist() == list(range(d.n_users))
    assert not (valid_hist == test_item[:, None]).any() and not (valid_hist == valid_item[:, None]).any()
    _, test_hist, _ = d.eval_split("test")
    assert (test_hist[:, -1] == valid_item).all()  # the test history ends with the validation item
    assert (test_hist[:, :-1] == valid_hist[:, 1:]).all()
    assert valid_hist.shape == (d.n_users, data.HISTORY_LEN)
    with pytest.raises(ValueError, match="valid.*test"):
        d.eval_split("train")


def test_histories_are_chronological_and_left_padded(small_world, world_data):
    d = world_data
    raw = np.loadtxt(small_world / "ratings.dat", delimiter=":", usecols=(0, 2, 6), dtype=np.int64)
    when = {(u, i): t for u, i, t in raw}
    hist = d.history(d.train_user, d.train_pos)
    users_raw, items_raw = d.raw_user_ids[d.train_user], d.raw_item_ids
    for row in np.random.default_rng(0).choice(len(hist), 300, replace=False):
        h = hist[row]
        real = h[h > 0]
        assert (h[:len(h) - len(real)] == 0).all()  # padding only on the left
        times = [when[(users_raw[row], items_raw[i])] for i in real]
        target_time = when[(users_raw[row], items_raw[d.item_seq[d.train_pos[row]]])]
        assert times == sorted(times) and (not times or times[-1] < target_time)
        assert len(real) == min(50, d.train_pos[row] - d.user_offsets[d.train_user[row]])
    with pytest.raises(ValueError, match="outside its user"):
        d.history([0], [d.user_offsets[1]])


# --- negatives --------------------------------------------------------------------------------

def test_training_batches_and_negatives(world_data):
    d = world_data
    seen = {(u, i) for u in range(d.n_users)
            for i in d.item_seq[d.user_offsets[u]:d.user_offsets[u + 1]]}
    epochs = []
    for _ in range(2):
        batches = list(d.train_epoch(256, 4, np.random.default_rng(len(epochs))))
        assert all(len(b["user"]) == 256 for b in batches[:-1]) and 0 < len(batches[-1]["user"]) <= 256
        items = np.concatenate([b["items"] for b in batches])
        users = np.concatenate([b["user"] for b in batches])
        assert items.shape == (len(d.train_pos), 5) and items.dtype == np.int64
        assert sorted(items[:, 0].tolist()) == sorted(d.item_seq[d.train_pos].tolist())
        assert ((items[:, 1:] >= 1) & (items[:, 1:] <= d.n_items)).all()
        assert not any((u, i) in seen for u, row in zip(users, items[:, 1:]) for i in row)
        b = batches[0]
        assert b["history"].shape == (256, data.HISTORY_LEN)
        assert all(k in b and b[k].dtype == np.int64 for k in ("user", "history", "items"))
        epochs.append(items)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled and redrawn every epoch
    again = np.concatenate([b["items"] for b in d.train_epoch(256, 4, np.random.default_rng(0))])
    assert np.array_equal(again, epochs[0])  # deterministic given the rng


def test_eval_candidates(world_data):
    d = world_data
    for cands in (d.valid_candidates, d.test_candidates):
        assert cands.shape == (d.n_users, 101)
        negatives = cands[:, 1:]
        assert (np.sort(negatives, axis=1)[:, 1:] != np.sort(negatives, axis=1)[:, :-1]).all()
        assert not d.interacted(np.arange(d.n_users)[:, None], negatives).any()
        assert ((negatives >= 1) & (negatives <= d.n_items)).all()
    assert d.interacted(np.arange(d.n_users), d.test_candidates[:, 0]).all()


def test_eval_negative_sampler_is_uniform():
    # one user who interacted with items 1..10 of 20: each of 11..20 should appear in 5/10 rows
    n_rows, n_items, k = 4000, 20, 5
    users = np.repeat(np.arange(n_rows), 10)
    keys = data._sorted_keys(users, np.tile(np.arange(1, 11), n_rows), n_items)
    neg = data._sample_eval_negatives(keys, np.full(n_rows, 10), n_items, k, np.random.default_rng(0))
    assert neg.min() >= 11
    freq = np.bincount(neg.ravel(), minlength=n_items + 1)[11:] / n_rows
    assert np.allclose(freq, k / 10, atol=0.03)
    with pytest.raises(ValueError, match="evaluation negatives"):
        data._sample_eval_negatives(keys, np.full(n_rows, 10), n_items, 11, np.random.default_rng(0))


# --- cache ------------------------------------------------------------------------------------

def cache_files(folder):
    return sorted(Path(folder).glob("planrec_cache_*.npz"))


def test_cache_hit_rebuild_and_invalidation(tmp_path, monkeypatch):
    folder = tmp_path / "w"
    data.make_synthetic(folder, n_users=40, n_items=150, mean_len=15, seed=1)
    load = lambda **kw: data._load_folder(folder, "synthetic", None, **{"n_eval_negatives": 20, **kw})
    first = load(seed=5)
    assert len(cache_files(folder)) == 1

    real_read = data.read_movielens
    calls = []
    monkeypatch.setattr(data, "read_movielens", lambda *a, **k: calls.append(1) or real_read(*a, **k))
    second = load(seed=5)
    assert calls == []  # served from the cache
    rebuilt = load(seed=5, rebuild=True)
    assert calls == [1]
    for other in (second, rebuilt):
        assert np.array_equal(first.test_candidates, other.test_candidates)
        assert np.array_equal(first.valid_candidates, other.valid_candidates)
        assert np.array_equal(first.item_seq, other.item_seq)
        assert first.attr_vocab == other.attr_vocab

    # a protocol setting changes -> another cache entry, built from the files
    load(seed=6)
    load(seed=5, n_eval_negatives=10)
    load(seed=5, history_len=20)
    monkeypatch.setattr(data, "PROTOCOL_VERSION", data.PROTOCOL_VERSION + 1)
    load(seed=5)
    assert len(calls) == 5 and len(cache_files(folder)) == 5

    # a source file changes, same size and mtime -> rebuilt (the key hashes content)
    ratings = folder / "ratings.dat"
    stat, text = ratings.stat(), ratings.read_text()
    u, i, r, t = text.splitlines()[0].split("::")
    ratings.write_text(text.replace(f"{u}::{i}::{r}::", f"{u}::{i}::{6 - int(r) if r != '3' else 4}::", 1))
    os.utime(ratings, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ratings.stat().st_size == stat.st_size
    load(seed=5)
    assert len(calls) == 6


def test_cache_falls_back_when_data_folder_is_read_only(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    data.make_synthetic(folder, n_users=30, n_items=150, mean_len=12, seed=2)
    folder.chmod(0o555)
    try:
        data._load_folder(folder, "synthetic", None, n_eval_negatives=20)
        assert cache_files(folder) == [] and len(cache_files(tmp_path / "data" / "cache")) == 1
        monkeypatch.setenv("PLANREC_CACHE", str(tmp_path / "mine"))
        data._load_folder(folder, "synthetic", None, seed=1, n_eval_negatives=20)
        assert len(cache_files(tmp_path / "mine")) == 1
    finally:
        folder.chmod(0o755)


def test_corrupt_cache_is_rebuilt(tmp_path):
    folder = tmp_path / "w"
    data.make_synthetic(folder, n_users=30, n_items=150, mean_len=12, seed=2)
    good = data._load_folder(folder, "synthetic", None, n_eval_negatives=20)
    cache_files(folder)[0].write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match="unreadable cache"):
        again = data._load_folder(folder, "synthetic", None, n_eval_negatives=20)
    assert np.array_equal(good.test_candidates, again.test_candidates)


# --- metrics ----------------------------------------------------------------------------------

def test_metrics_hand_computed():
    scores = np.array([[0.9, 0.1, 0.2, 0.3],   # rank 0
                       [0.5, 0.6, 0.5, 0.1],   # rank 2 (tie counts against the positive)
                       [0.0, 1.0, 2.0, 3.0]])  # rank 3
    m = data.ranking_metrics(scores, ks=(1, 3))
    assert list(m) == ["auc", "recall@1", "recall@3", "ndcg@1", "ndcg@3"]
    assert m["auc"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / np.log2(4)) / 3)
    assert list(data.ranking_metrics(scores)) == ["auc", "recall@5", "recall@10", "ndcg@5", "ndcg@10"]


def test_metrics_edge_cases():
    import torch
    const = data.ranking_metrics(np.ones((7, 101)))
    assert all(v == 0 for v in const.values())
    perfect = np.zeros((4, 101))
    perfect[:, 0] = 1
    assert all(v == pytest.approx(1) for v in data.ranking_metrics(perfect).values())
    t = torch.randn(5, 11, requires_grad=True)
    assert data.ranking_metrics(t) == data.ranking_metrics(t.detach().numpy())
    bad = np.zeros((3, 5))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        data.ranking_metrics(bad)
    with pytest.raises(ValueError, match="shape"):
        data.ranking_metrics(np.zeros(5))


score_rows = st.integers(1, 12).flatmap(lambda n: st.lists(
    st.lists(st.integers(-3, 3).map(float), min_size=n + 1, max_size=n + 1), min_size=1, max_size=6))


@settings(max_examples=150, deadline=None)
@given(score_rows, st.randoms(use_true_random=False))
def test_metric_properties(rows, rnd):
    scores = np.array(rows)
    m = data.ranking_metrics(scores)
    assert all(0.0 <= v <= 1.0 for v in m.values())
    for k in (5, 10):
        assert m[f"ndcg@{k}"] <= m[f"recall@{k}"] + 1e-12
    assert m["recall@5"] <= m["recall@10"] and m["ndcg@5"] <= m["ndcg@10"]
    # the order of the negatives does not matter
    shuffled = scores.copy()
    for row in shuffled:
        negatives = list(row[1:])
        rnd.shuffle(negatives)
        row[1:] = negatives
    assert data.ranking_metrics(shuffled) == pytest.approx(m)
    # raising one positive's score never lowers a metric
    better = scores.copy()
    better[rnd.randrange(len(better)), 0] += rnd.choice([0.5, 1.0, 10.0])
    mb = data.ranking_metrics(better)
    assert all(mb[k] >= m[k] - 1e-12 for k in m)
    # ties count against the positive: tying the best negative is no better than losing to it
    tied = scores.copy()
    tied[:, 0] = tied[:, 1:].max(axis=1)
    mt = data.ranking_metrics(tied)
    assert mt["recall@5"] == pytest.approx(np.mean(np.sum(tied[:, 1:] >= tied[:, :1], axis=1) < 5))
    assert mt["auc"] <= 1 - 1 / (scores.shape[1] - 1) + 1e-12


def test_popularity_scores(world_data):
    d = world_data
    s = data.popularity_scores(d, "valid")
    assert s.shape == (d.n_users, 101)
    assert np.array_equal(s, d.item_train_count[d.valid_candidates])
    m = data.ranking_metrics(data.popularity_scores(d))
    assert 0.5 < m["auc"] < 1  # popularity carries signal in the synthetic world
    with pytest.raises(ValueError):
        data.popularity_scores(d, "train")


# --- reading and errors -----------------------------------------------------------------------

GOOD = [(1, 1, 10), (1, 2, 11), (1, 3, 12), (2, 1, 10), (2, 3, 11), (2, 2, 12)]


@pytest.mark.parametrize("bad_line, expected", [
    ("1::2::3", "expected 4 '::'-separated fields"),
    ("1::2::3::4::5", "expected 4 '::'-separated fields"),
    ("1::x::3::4", "MovieID should be an integer"),
    ("1::2::3::4.5", "Timestamp should be an integer"),
    ("", "expected 4"),
])
def test_malformed_ratings_line(tmp_path, bad_line, expected):
    folder = write_ml(tmp_path / "ml", GOOD)
    lines = (folder / "ratings.dat").read_text().splitlines()
    lines.insert(2, bad_line)
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"ratings\.dat:3: .*{expected}"):
        data.read_movielens(folder, None)


@pytest.mark.parametrize("file, bad_line, expected", [
    ("users.dat", "2::X::25::3::123", "Gender should be F or M"),
    ("users.dat", "2::M::26::3::123", "Age should be one of the age codes"),
    ("users.dat", "2::M::25::3", "expected 5"),
    ("movies.dat", "2::Some title (1999)", "expected 3"),
    ("movies.dat", "two::Title (1999)::Drama", "MovieID should be an integer"),
])
def test_malformed_users_and_movies(tmp_path, file, bad_line, expected):
    folder = write_ml(tmp_path / "ml", GOOD)
    lines = (folder / file).read_text(encoding="latin-1").splitlines()
    lines[1] = bad_line
    (folder / file).write_text("\n".join(lines) + "\n", encoding="latin-1")
    with pytest.raises(ValueError, match=rf"{file}:2: .*{expected}"):
        data.read_movielens(folder, None)


def test_inconsistent_files(tmp_path):
    folder = write_ml(tmp_path / "ml", GOOD, users=["1::F::1::0::1"])
    with pytest.raises(ValueError, match=r"ratings\.dat:4: rates user 2, which is not in users\.dat"):
        data.read_movielens(folder, None)
    folder = write_ml(tmp_path / "ml2", GOOD, movies=["1::A (1990)::Drama", "2::B (1991)::Drama",
                                                       "2::C (1992)::Drama", "3::D (1993)::Drama"])
    with pytest.raises(ValueError, match=r"movies\.dat:3: MovieID 2 appears twice"):
        data.read_movielens(folder, None)
    (folder / "ratings.dat").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        data.read_movielens(folder, None)


def test_count_warning_and_short_users(tmp_path):
    folder = write_ml(tmp_path / "ml-1m", GOOD + [(3, 1, 5), (3, 2, 6)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ratings, users, movies = data.read_movielens(folder)
    assert len(caught) == 1 and "canonical MovieLens-1M has 1,000,209" in str(caught[0].message)
    assert ratings["user"].tolist() == [1, 1, 1, 2, 2, 2, 3, 3]
    with pytest.warns(UserWarning, match="dropping 1 users with fewer than 3"):
        d = data._load_folder(folder, "test", None, n_eval_negatives=0)
    assert d.raw_user_ids.tolist() == [1, 2]


def test_missing_files_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANREC_DATA", str(tmp_path / "env"))
    partial = tmp_path / "given"
    write_ml(partial, GOOD)
    (partial / "movies.dat").unlink()
    with pytest.raises(FileNotFoundError) as err:
        data.find_ml1m(partial, download=False)
    msg = str(err.value)
    for needle in (str(partial), str(partial / "ml-1m"), str(tmp_path / "env" / "ml-1m"),
                   str(Path("data") / "ml-1m"), "ratings.dat, users.dat and movies.dat", data.ML1M_URL):
        assert needle in msg
    # found in each place of the search order
    write_ml(tmp_path / "data" / "ml-1m", GOOD)
    assert data.find_ml1m(None, download=False) == Path("data") / "ml-1m"
    write_ml(tmp_path / "env" / "ml-1m", GOOD)
    assert data.find_ml1m(None, download=False) == tmp_path / "env" / "ml-1m"
    write_ml(tmp_path / "parent" / "ml-1m", GOOD)
    assert data.find_ml1m(tmp_path / "parent", download=False) == tmp_path / "parent" / "ml-1m"


class FakeResponse(io.BytesIO):
    def __init__(self, payload):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def fake_zip():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, text in (("ratings.dat", "1::1::5::10\n1::2::5::11\n1::3::5::12\n"),
                           ("users.dat", "1::F::1::10::48067\n"),
                           ("movies.dat", "1::A (1990)::Drama\n2::B (1991)::Drama\n3::C (1992)::Drama\n"),
                           ("README", "fake")):
            z.writestr(f"ml-1m/{name}", text)
    return buffer.getvalue()


def test_failing_download_leaves_nothing(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no network in this test")
    monkeypatch.setattr(data, "_urlopen", offline)
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(RuntimeError) as err:
        data.find_ml1m(cache / "ml-1m")
    assert data.ML1M_URL in str(err.value) and "no network" in str(err.value)
    assert "ratings.dat, users.dat and movies.dat" in str(err.value)
    assert list(cache.iterdir()) == []


def test_md5_mismatch_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_urlopen", lambda url, timeout=None: FakeResponse(fake_zip()))
    monkeypatch.setenv("PLANREC_DATA", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="MD5 mismatch") as err:
        data.find_ml1m()
    assert data.ML1M_URL in str(err.value) and str(tmp_path / "cache" / "ml-1m") in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_success_with_fake_archive(tmp_path, monkeypatch):
    payload = fake_zip()
    monkeypatch.setattr(data, "_urlopen", lambda url, timeout=None: FakeResponse(payload))
    monkeypatch.setattr(data, "ML1M_MD5", hashlib.md5(payload).hexdigest())
    folder = data.find_ml1m()
    assert folder == Path("data") / "ml-1m" and data._contains_ml1m(folder)
    assert sorted(p.name for p in Path("data").iterdir()) == ["ml-1m"]  # no temp files left
    ratings, _, _ = data.read_movielens(folder, None)
    assert ratings["item"].tolist() == [1, 2, 3]


# --- synthetic world --------------------------------------------------------------------------

def test_synthetic_world(tmp_path, small_world, world_data):
    d = world_data
    assert d.n_users == 80 and d.item_attrs["genres"].shape[1] <= len(data.SYNTHETIC_CATEGORIES)
    assert set(d.attr_vocab["genres"]) <= set(data.SYNTHETIC_CATEGORIES)
    assert (d.item_attrs["year"][1:] >= 1940).all()
    gt = data.load_ground_truth(small_world)
    nodes = list(gt["nodes"])
    edges = {(nodes[a], nodes[b]) for a, b in zip(*np.nonzero(gt["adjacency"]))}
    assert edges == set(data.SYNTHETIC_EDGES)
    assert (gt["user_edge_mask"].sum(axis=1) == 3 - (gt["user_deviation"] >= 0)).all()
    assert 0 < (gt["user_deviation"] >= 0).sum() < 80
    assert (gt["user_power_test"] == gt["user_power"]).all()  # IID world
    # users.dat carries the observable attributes
    assert np.array_equal(d.user_attrs["gender"], gt["user_group"][d.raw_user_ids - 1])
    assert np.array_equal(d.user_attrs["age"], gt["user_age_band"][d.raw_user_ids - 1])
    # deterministic given the seed, different with another seed
    data.make_synthetic(tmp_path / "same", n_users=80, n_items=160, mean_len=25, seed=3)
    data.make_synthetic(tmp_path / "other", n_users=80, n_items=160, mean_len=25, seed=4)
    for name in data.ML1M_FILES:
        assert (tmp_path / "same" / name).read_bytes() == (small_world / name).read_bytes()
    assert (tmp_path / "other" / "ratings.dat").read_bytes() != (small_world / "ratings.dat").read_bytes()


def test_synthetic_ood_shift(tmp_path, small_world, world_data):
    ood = data.make_synthetic(tmp_path / "ood", n_users=80, n_items=160, mean_len=25, seed=3,
                              ood_shift=True)
    gt = data.load_ground_truth(ood)
    assert (gt["user_power_test"] != gt["user_power"]).all()
    assert np.array_equal(gt["user_power"], data.load_ground_truth(small_world)["user_power"])
    d_ood, d_iid = data._load_folder(ood, "synthetic-ood", None), world_data
    # same world until the shift: identical sequences except each user's last (test) item
    assert np.array_equal(d_ood.user_offsets, d_iid.user_offsets)
    before_test = np.ones(len(d_iid.item_seq), dtype=bool)
    before_test[d_iid.user_offsets[1:] - 1] = False
    assert np.array_equal(d_ood.raw_item_ids[d_ood.item_seq[before_test]],
                          d_iid.raw_item_ids[d_iid.item_seq[before_test]])
    assert not np.array_equal(d_ood.raw_item_ids[d_ood.test_candidates[:, 0]],
                              d_iid.raw_item_ids[d_iid.test_candidates[:, 0]])


def test_load_dataset(tmp_path):
    d = data.load_dataset("synthetic", n_users=30, n_items=150, mean_len=12, n_eval_negatives=20)
    assert d.name == "synthetic" and d.n_users == 30
    assert data._contains_ml1m(Path("data") / "synthetic")
    assert (Path("data") / "synthetic" / "ground_truth.npz").is_file()
    again = data.load_dataset("synthetic", n_users=30, n_eval_negatives=20)  # existing world, matching setting
    assert np.array_equal(again.test_candidates, d.test_candidates)
    with pytest.raises(ValueError, match="other settings"):
        data.load_dataset("synthetic", n_users=31)
    with pytest.raises(ValueError, match="ml-1m, synthetic, synthetic-ood"):
        data.load_dataset("movielens")
    with pytest.raises(FileNotFoundError, match="searched"):
        data.load_dataset("ml-1m", root=tmp_path / "nothing", download=False)


# --- the real data ----------------------------------------------------------------------------

@pytest.mark.skipif(not data._contains_ml1m(SHARED_ML1M), reason=f"no ML-1M copy at {SHARED_ML1M}")
def test_real_ml1m_canonical_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANREC_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the canonical copy must not trigger the count warning
        d = data.load_movielens(SHARED_ML1M, download=False)
    assert (len(d.item_seq), d.n_users, d.n_items) == (1_000_209, 6_040, 3_706)
    assert len(d.train_pos) == 1_000_209 - 3 * 6_040
    assert d.valid_candidates.shape == d.test_candidates.shape == (6_040, 101)
    assert d.item_attrs["genres"].shape == (3_707, 18) and len(cache_files(tmp_path / "cache")) == 1
    assert not d.interacted(np.arange(d.n_users)[:, None], d.test_candidates[:, 1:]).any()
    assert set(np.unique(d.user_attrs["age"])) == set(range(7))
