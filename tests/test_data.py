"""Tests for data.py (the protocol) and datasets/ (preparation): they write their own small files;
only one test reads the shared ML-1M, and none downloads."""

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import data
from datasets import amazon_book, common, interactions, ml1m, synthetic

CANONICAL_COUNTS = "ignore:.*canonical MovieLens-1M has"  # small ML-1M-format files never have them
FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def write_ml(folder, ratings, users=None, movies=None):
    """ratings: (user, item, timestamp) rows in file order; users/movies default to covering them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if users is None:
        users = [f"{u}::{'MF'[u % 2]}::{ml1m.AGE_CODES[u % 7]}::{u % 21}::12345"
                 for u in sorted({r[0] for r in ratings})]
    if movies is None:
        movies = [f"{i}::Movie {i} ({1900 + i})::{'Comedy|Drama' if (i // 10) % 2 else 'Action'}"
                  for i in sorted({r[1] for r in ratings})]
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{3}::{t}\n" for u, i, t in ratings))
    (folder / "users.dat").write_text("\n".join(users) + "\n")
    (folder / "movies.dat").write_text("\n".join(movies) + "\n", encoding="latin-1")
    return folder


def load_ml(folder, **kw):
    """An ML-1M-format folder under the protocol (kw: load_dataset's); the count warning (small
    files never have the canonical counts) is left to the caller."""
    return data.load_dataset("ml-1m", root=folder, download=False, **kw)


def load_quiet(folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_ml(folder, **kw)


def nothing_prepared(*folders):
    """No prepared data, finished or half-written, under folders and ./data."""
    return not [p for f in (*folders, "data") for p in Path(f).rglob("*")
                if p.name in ("log.npz", "meta.json") or p.name.endswith((".part", ".old"))]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    # Every test runs in its own folder: ./data/... and prepared data never touch the checkout.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PLANREC_DATA", raising=False)
    monkeypatch.delenv("PLANREC_CACHE", raising=False)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world") / "synthetic"
    synthetic.make_synthetic(folder, n_users=80, n_items=160, mean_len=25, seed=3)
    return folder


@pytest.fixture(scope="module")
def world_data(small_world):
    return data.load_dataset("synthetic", root=small_world, seed=0)


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


def check_sequence_epoch(d, batches, rows_per_batch, n_negatives, context, chunk):
    """Every training position of the epoch is a row of exactly one batch, with its own history up
    to `context` items in its chunk, its own positive and unseen negatives; returns the positions
    in epoch order."""
    assert all(len(b["user"]) == rows_per_batch for b in batches[:-1]) and 0 < len(batches[-1]["user"]) <= rows_per_batch
    pos = np.concatenate([b["pos"] for b in batches])
    assert np.array_equal(np.sort(pos), d.train_pos)                      # each position exactly once
    for b in batches:
        assert all(b[k].dtype == np.int64 for k in ("history", "segment", "seq", "end", "user", "items", "pos"))
        history, segment = b["history"], b["segment"]
        assert history.shape == segment.shape and history.shape[0] == 1 and (b["seq"] == 0).all()
        assert (history > 0).all()                                        # chunks end to end, no padding
        # pieces of chunks: consecutive segment ids, each of one user, at most `chunk` rows
        assert (np.diff(segment[0]) >= 0).all() and (np.diff(segment[0]) <= 1).all()
        assert np.bincount(segment[0][b["end"] - 1]).max() <= chunk
        assert (d.train_user[np.searchsorted(d.train_pos, b["pos"])] == b["user"]).all()
        # a row's history is what lies before its end in its own segment: the up-to-`context` items
        # before its target, as data.history has them
        expected = d.history(b["user"], b["pos"], length=context)
        column = b["end"][:, None] - context + np.arange(context)
        inside = column >= 0
        got = np.where(inside, history[0][np.maximum(column, 0)], 0)
        own = inside & (segment[0][np.maximum(column, 0)] == segment[0][b["end"] - 1][:, None])
        assert np.array_equal(np.where(own, got, 0), expected)
        assert (b["items"][:, 0] == d.item_seq[b["pos"]]).all()
        assert b["items"].shape == (len(b["pos"]), 1 + n_negatives)
        assert not d.interacted(b["user"][:, None], b["items"][:, 1:]).any()
    return pos


@FAST
@given(rows=st.integers(1, 300), context=st.integers(1, 60), chunk=st.integers(1, 80), n_neg=st.integers(0, 2),
       seed=st.integers(0, 2**31 - 1))
def test_sequence_batches_use_every_position_once_with_its_own_history(world_data, rows, context, chunk, n_neg, seed):
    d = world_data
    batches = list(d.train_sequences(rows, n_neg, np.random.default_rng(seed), context, chunk))
    check_sequence_epoch(d, batches, rows, n_neg, context, chunk)


def test_sequence_batches_are_shuffled_and_deterministic(world_data):
    d = world_data
    epoch = lambda seed: list(d.train_sequences(256, 1, np.random.default_rng(seed), 148))
    first, again, other = epoch(0), epoch(0), epoch(1)
    pos = check_sequence_epoch(d, first, 256, 1, 148, data.CHUNK_POSITIONS)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
    assert not np.array_equal(pos, np.concatenate([b["pos"] for b in other]))
    # a batch mixes several users' chunks; short users are whole chunks
    assert np.mean([len(np.unique(b["user"])) for b in first]) > 2
    with pytest.raises(ValueError, match="rows_per_batch"):
        next(d.train_sequences(0, 1, np.random.default_rng(0), 148))


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


def reference_eval_negatives(interacted, n_items, k, rng):
    """The sampler's draws read one by one: per row the first k items that are new to the row and
    not the user's; rows with fewer are drawn again, all together, with twice the draws."""
    n_free = min(n_items - len(items) for items in interacted)
    size = int(np.ceil(1.5 * k * n_items / max(n_free, 1))) + 20
    out, todo = {}, list(range(len(interacted)))
    while todo:
        draws = rng.integers(1, n_items + 1, size=(len(todo), size))
        left = []
        for u, row in zip(todo, draws):
            chosen = []
            for item in row.tolist():
                if item not in interacted[u] and item not in chosen:
                    chosen.append(item)
            if len(chosen) >= k:
                out[u] = chosen[:k]
            else:
                left.append(u)
        todo, size = left, size * 2
    return np.array([out[u] for u in range(len(interacted))])


@pytest.mark.parametrize("n_items, k", [(30, 8), (130, 100), (70_000, 5)])
def test_eval_negative_sampler_matches_reference(n_items, k):
    rng = np.random.default_rng(n_items)
    interacted = [set(rng.choice(np.arange(1, n_items + 1), rng.integers(1, min(n_items - k, 25) + 1),
                                 replace=False).tolist()) for _ in range(60)]
    users = np.concatenate([np.full(len(items), u) for u, items in enumerate(interacted)])
    keys = data._sorted_keys(users, np.concatenate([sorted(items) for items in interacted]), n_items)
    lengths = np.array([len(items) for items in interacted])
    mine = data._sample_eval_negatives(keys, lengths, n_items, k, np.random.default_rng(7))
    assert np.array_equal(mine, reference_eval_negatives(interacted, n_items, k, np.random.default_rng(7)))


# --- the prepared folder ---------------------------------------------------------------------

def count_calls(monkeypatch, module, name):
    """Replace module.name by a wrapper that records each call; returns the list of calls."""
    real, calls = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def same_data(a, b):
    keys = ("item_seq", "user_offsets", "train_pos", "valid_candidates", "test_candidates",
            "item_train_count", "raw_user_ids", "raw_item_ids")
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in keys) and \
        a.attr_vocab == b.attr_vocab and all(np.array_equal(a.item_attrs[k], b.item_attrs[k]) for k in a.item_attrs)


def test_prepared_once_then_read(tmp_path, monkeypatch):
    folder = tmp_path / "w"
    synthetic.make_synthetic(folder, n_users=40, n_items=150, mean_len=15, seed=1)
    load = lambda **kw: data.load_dataset("synthetic", root=folder, **{"n_eval_negatives": 20, **kw})
    first = load(seed=5)
    assert sorted(p.name for p in (folder / "prepared").iterdir()) == ["log.npz", "meta.json"]
    assert not list(folder.glob(".prepared*"))  # no temporary left

    calls = count_calls(monkeypatch, ml1m, "read_movielens")
    second = load(seed=5)
    assert calls == []  # read from the prepared folder
    rebuilt = load(seed=5, rebuild=True)
    assert calls == [1]
    assert same_data(first, second) and same_data(first, rebuilt)

    # protocol settings are applied on every load: no new preparation, but their effect
    other_seed, fewer, short = load(seed=6), load(seed=5, n_eval_negatives=10), load(seed=5, history_len=20)
    assert calls == [1]
    assert np.array_equal(other_seed.item_seq, first.item_seq)
    assert not np.array_equal(other_seed.test_candidates, first.test_candidates)
    assert fewer.test_candidates.shape == (40, 11) and short.eval_split("test")[1].shape == (40, 20)
    # a new format version prepares again
    monkeypatch.setattr(common, "FORMAT_VERSION", common.FORMAT_VERSION + 1)
    assert same_data(load(seed=5), first) and calls == [1, 1]


def test_meta_records_sources_and_settings(tmp_path):
    rows = [f"{u},{i},{t}" for u, i, t in dense_rows(4, 30, 6)]
    folder = write_log(tmp_path / "log", "user,item,timestamp", rows)
    d = data.load_dataset("interactions", root=folder, min_interactions=1, n_eval_negatives=5)
    meta = json.loads((folder / "prepared" / "meta.json").read_text())
    stat = (folder / "interactions.csv").stat()
    assert meta["format"] == common.FORMAT_VERSION and meta["dataset"] == "interactions"
    assert meta["settings"] == {"min_interactions": 1}
    assert meta["sources"] == [{"name": "interactions.csv", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
                               {"name": "users.csv", "size": None, "mtime_ns": None},
                               {"name": "items.csv", "size": None, "mtime_ns": None}]
    assert meta["counts"] == {"interactions": 24, "users": 4, "items": len(d.raw_item_ids) - 1}
    # an optional table that appears is a changed source: prepared again, with the attribute
    (folder / "users.csv").write_text("user,tall\nU000,yes\n")
    again = data.load_dataset("interactions", root=folder, min_interactions=1, n_eval_negatives=5)
    assert again.user_attrs["tall"].tolist() == [1, 0, 0, 0] and again.attr_vocab["tall"] == ["", "yes"]


def test_changed_source_prepares_again(tmp_path, monkeypatch):
    folder = write_ml(tmp_path / "ml", GOOD + [(3, 1, 5), (3, 2, 6), (3, 3, 7)])
    first = load_quiet(folder, n_eval_negatives=0)
    calls = count_calls(monkeypatch, ml1m, "read_movielens")
    ratings = folder / "ratings.dat"
    ratings.write_text(ratings.read_text() + "3::4::3::8\n")  # another line: size and mtime change
    with open(folder / "movies.dat", "a", encoding="latin-1") as f:
        f.write("4::Movie 4 (1904)::Action\n")
    again = load_quiet(folder, n_eval_negatives=0)
    assert calls == [1] and len(again.item_seq) == len(first.item_seq) + 1 and again.n_items == 4
    # the same size but a new mtime (a copy, a touch, an edit in place) prepares again too
    stat = ratings.stat()
    os.utime(ratings, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    load_quiet(folder, n_eval_negatives=0)
    load_quiet(folder, n_eval_negatives=0)
    assert calls == [1, 1]


def test_interrupted_preparation_leaves_no_finished_folder(tmp_path, monkeypatch):
    folder = write_ml(tmp_path / "ml", GOOD)
    good = load_quiet(folder, n_eval_negatives=0)
    real_savez = np.savez

    def savez_then_interrupt(path, **arrays):  # half a file, then Ctrl-C
        Path(path).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt
    monkeypatch.setattr(common.np, "savez", savez_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_quiet(folder, n_eval_negatives=0, rebuild=True)
    # the old folder was never touched (the new one is renamed into place only when complete)
    assert sorted(p.name for p in folder.iterdir()) == ["movies.dat", "prepared", "ratings.dat", "users.dat"]
    (folder / "ratings.dat").write_text((folder / "ratings.dat").read_text() + "1::4::3::13\n")
    with open(folder / "movies.dat", "a", encoding="latin-1") as f:
        f.write("4::Movie 4 (1904)::Action\n")
    with pytest.raises(KeyboardInterrupt):
        load_quiet(folder, n_eval_negatives=0)
    # the stale folder stays stale: it does not match the sources, so it is never taken
    monkeypatch.setattr(common.np, "savez", real_savez)
    calls = count_calls(monkeypatch, ml1m, "read_movielens")
    d = load_quiet(folder, n_eval_negatives=0)
    assert calls == [1] and len(d.item_seq) == len(good.item_seq) + 1
    assert sorted(p.name for p in folder.iterdir()) == ["movies.dat", "prepared", "ratings.dat", "users.dat"]
    # a killed preparation leaves a temporary folder under another name: never read, and harmless
    killed = folder / ".prepared-x1y2.part"
    killed.mkdir()
    (killed / "meta.json").write_text((folder / "prepared" / "meta.json").read_text())
    (killed / "log.npz").write_bytes(b"half")
    assert same_data(load_quiet(folder, n_eval_negatives=0), d) and calls == [1]


def test_failed_read_writes_nothing(tmp_path):
    folder = write_ml(tmp_path / "ml", GOOD)
    (folder / "users.dat").write_text("1::F::1::0::1\n2::X::1::0::1\n")
    with pytest.raises(ValueError, match=r"users\.dat:2: .*Gender should be F or M"):
        load_quiet(folder)
    assert nothing_prepared(folder)


def test_prepared_folder_falls_back_when_data_folder_is_read_only(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    synthetic.make_synthetic(folder, n_users=30, n_items=150, mean_len=12, seed=2)
    folder.chmod(0o555)
    try:
        first = data.load_dataset("synthetic", root=folder, n_eval_negatives=20)
        assert not (folder / "prepared").exists()
        assert (tmp_path / "data" / "prepared" / "synthetic" / "meta.json").is_file()
        # an explicit place wins for writing; a matching prepared folder anywhere is read
        monkeypatch.setenv("PLANREC_CACHE", str(tmp_path / "mine"))
        calls = count_calls(monkeypatch, ml1m, "read_movielens")
        assert same_data(first, data.load_dataset("synthetic", root=folder, n_eval_negatives=20))
        assert calls == [] and not (tmp_path / "mine").exists()
        again = data.load_dataset("synthetic", root=folder, n_eval_negatives=20, rebuild=True)
        assert (tmp_path / "mine" / "synthetic" / "meta.json").is_file() and same_data(first, again)
    finally:
        folder.chmod(0o755)


@pytest.mark.filterwarnings(CANONICAL_COUNTS)
def test_unwritable_everywhere_warns_and_still_loads(tmp_path, monkeypatch):
    folder = write_ml(tmp_path / "ml", GOOD)
    monkeypatch.setattr(common, "is_writable_dir", lambda folder: False)
    with pytest.warns(UserWarning, match="could not write the prepared ml-1m .*set PLANREC_CACHE"):
        d = load_ml(folder, n_eval_negatives=0)
    assert d.n_users == 2 and nothing_prepared(folder)


def test_damaged_prepared_folder_is_prepared_again(tmp_path):
    folder = tmp_path / "w"
    synthetic.make_synthetic(folder, n_users=30, n_items=150, mean_len=12, seed=2)
    good = data.load_dataset("synthetic", root=folder, n_eval_negatives=20)
    log = folder / "prepared" / "log.npz"
    for damaged in (b"not a zip", log.read_bytes()[:len(log.read_bytes()) // 2]):  # and a truncated one
        log.write_bytes(damaged)
        with pytest.warns(UserWarning, match="unreadable prepared data"):
            again = data.load_dataset("synthetic", root=folder, n_eval_negatives=20)
        assert same_data(good, again)
    (folder / "prepared" / "meta.json").unlink()  # no meta: not a finished folder
    assert same_data(good, data.load_dataset("synthetic", root=folder, n_eval_negatives=20))
    assert (folder / "prepared" / "meta.json").is_file()


@pytest.mark.parametrize("module, args, expected", [
    ("interactions", [], "interactions: prepared 24 interactions, 4 users"),
    ("amazon_book", ["--min-interactions", "0"], "amazon-book: prepared 24 interactions, 4 users"),
    ("ml1m", ["--no-download"], "ml-1m: prepared 6 interactions, 2 users, 3 items; attributes: "
                                "user_attr.gender, user_attr.age, user_attr.occupation, item_attr.genres"),
])
def test_prepare_scripts_run(tmp_path, module, args, expected):
    rows = dense_rows(4, 30, 6)
    if module == "interactions":
        write_log(tmp_path, "user,item,timestamp", [f"{u},{i},{t}" for u, i, t in rows])
    elif module == "amazon_book":
        write_amazon(tmp_path, rows)
    else:
        write_ml(tmp_path, GOOD)
    done = subprocess.run([sys.executable, "-m", f"datasets.{module}", "--data-dir", str(tmp_path), *args],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert done.returncode == 0 and "Warning" not in done.stderr.replace("UserWarning: " + str(tmp_path), ""), done.stderr
    assert done.stdout.startswith(expected) and (tmp_path / "prepared" / "meta.json").is_file()


def test_prepare_script_errors_are_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "datasets.amazon_book", "--data-dir", str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("error: amazon-book: ratings_Books.csv was not found")
    assert "Traceback" not in done.stderr


# --- metrics ----------------------------------------------------------------------------------

# Three users' scores, positive first: ranks 0, 2 (a tie counts against the positive) and 3.
HAND_SCORES = np.array([[0.9, 0.1, 0.2, 0.3],
                        [0.5, 0.6, 0.5, 0.1],
                        [0.0, 1.0, 2.0, 3.0]])


def test_metrics_hand_computed():
    scores = HAND_SCORES
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


def test_per_user_metrics():
    scores = HAND_SCORES
    per_user = data.per_user_metrics(scores, ks=(1, 3))
    assert list(per_user) == ["auc", "recall@1", "recall@3", "ndcg@1", "ndcg@3"]
    assert all(v.shape == (3,) and v.dtype == np.float64 for v in per_user.values())
    np.testing.assert_allclose(per_user["auc"], [1, 1 / 3, 0])
    assert per_user["recall@1"].tolist() == [1, 0, 0] and per_user["recall@3"].tolist() == [1, 1, 0]
    np.testing.assert_allclose(per_user["ndcg@3"], [1, 1 / np.log2(4), 0])
    with pytest.raises(ValueError, match="NaN"):
        data.per_user_metrics(np.full((2, 3), np.nan))


score_rows = st.integers(1, 12).flatmap(lambda n: st.lists(
    st.lists(st.integers(-3, 3).map(float), min_size=n + 1, max_size=n + 1), min_size=1, max_size=6))


@settings(max_examples=150, deadline=None)
@given(score_rows, st.randoms(use_true_random=False))
def test_metric_properties(rows, rnd):
    scores = np.array(rows)
    m = data.ranking_metrics(scores)
    assert all(0.0 <= v <= 1.0 for v in m.values())
    # the means of the per-user values, the same floats
    assert m == {k: float(v.mean()) for k, v in data.per_user_metrics(scores).items()}
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
        ml1m.read_movielens(folder, None)


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
        ml1m.read_movielens(folder, None)


def test_inconsistent_files(tmp_path):
    folder = write_ml(tmp_path / "ml", GOOD, users=["1::F::1::0::1"])
    with pytest.raises(ValueError, match=r"ratings\.dat:4: rates user 2, which is not in users\.dat"):
        ml1m.read_movielens(folder, None)
    folder = write_ml(tmp_path / "ml2", GOOD, movies=["1::A (1990)::Drama", "2::B (1991)::Drama",
                                                       "2::C (1992)::Drama", "3::D (1993)::Drama"])
    with pytest.raises(ValueError, match=r"movies\.dat:3: MovieID 2 appears twice"):
        ml1m.read_movielens(folder, None)
    (folder / "ratings.dat").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        ml1m.read_movielens(folder, None)


@pytest.mark.filterwarnings(CANONICAL_COUNTS)
def test_count_warning_and_short_users(tmp_path):
    folder = write_ml(tmp_path / "ml-1m", GOOD + [(3, 1, 5), (3, 2, 6)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ratings, users, movies = ml1m.read_movielens(folder)
    assert len(caught) == 1 and "canonical MovieLens-1M has 1,000,209" in str(caught[0].message)
    assert ratings["user"].tolist() == [1, 1, 1, 2, 2, 2, 3, 3]
    with pytest.warns(UserWarning, match="dropping 1 users with fewer than 3"):
        d = load_ml(folder, n_eval_negatives=0)
    assert d.raw_user_ids.tolist() == [1, 2]


def test_missing_files_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANREC_DATA", str(tmp_path / "env"))
    partial = tmp_path / "given"
    write_ml(partial, GOOD)
    (partial / "movies.dat").unlink()
    with pytest.raises(FileNotFoundError) as err:
        ml1m.find(partial, download=False)
    msg = str(err.value)
    for needle in (str(partial), str(partial / "ml-1m"), str(tmp_path / "env" / "ml-1m"),
                   str(Path("data") / "ml-1m"), "ratings.dat, users.dat and movies.dat", ml1m.URL):
        assert needle in msg
    # found in each place of the search order
    write_ml(tmp_path / "data" / "ml-1m", GOOD)
    assert ml1m.find(None, download=False) == Path("data") / "ml-1m"
    write_ml(tmp_path / "env" / "ml-1m", GOOD)
    assert ml1m.find(None, download=False) == tmp_path / "env" / "ml-1m"
    write_ml(tmp_path / "parent" / "ml-1m", GOOD)
    assert ml1m.find(tmp_path / "parent", download=False) == tmp_path / "parent" / "ml-1m"


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
    monkeypatch.setattr(ml1m, "_urlopen", offline)
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(RuntimeError) as err:
        ml1m.find(cache / "ml-1m")
    assert ml1m.URL in str(err.value) and "no network" in str(err.value)
    assert "ratings.dat, users.dat and movies.dat" in str(err.value)
    assert list(cache.iterdir()) == []


def test_md5_mismatch_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ml1m, "_urlopen", lambda url, timeout=None: FakeResponse(fake_zip()))
    monkeypatch.setenv("PLANREC_DATA", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="MD5 mismatch") as err:
        ml1m.find()
    assert ml1m.URL in str(err.value) and str(tmp_path / "cache" / "ml-1m") in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_success_with_fake_archive(tmp_path, monkeypatch):
    payload = fake_zip()
    monkeypatch.setattr(ml1m, "_urlopen", lambda url, timeout=None: FakeResponse(payload))
    monkeypatch.setattr(ml1m, "MD5", hashlib.md5(payload).hexdigest())
    folder = ml1m.find()
    assert folder == Path("data") / "ml-1m" and ml1m.contains_ml1m(folder)
    assert sorted(p.name for p in Path("data").iterdir()) == ["ml-1m"]  # no temp files left
    ratings, _, _ = ml1m.read_movielens(folder, None)
    assert ratings["item"].tolist() == [1, 2, 3]
    # the one command on a fresh machine: find nothing, download, prepare, apply the protocol
    shutil.rmtree("data")
    with pytest.warns(UserWarning, match="canonical MovieLens-1M"):
        d = data.load_dataset("ml-1m", n_eval_negatives=0)
    assert (d.n_users, d.n_items, d.folder) == (1, 3, str(Path("data") / "ml-1m"))
    assert (Path("data") / "ml-1m" / "prepared" / "meta.json").is_file()


# --- synthetic world --------------------------------------------------------------------------

def test_synthetic_world(tmp_path, small_world, world_data):
    d = world_data
    assert d.n_users == 80 and d.item_attrs["genres"].shape[1] <= len(synthetic.SYNTHETIC_CATEGORIES)
    assert set(d.attr_vocab["genres"]) <= set(synthetic.SYNTHETIC_CATEGORIES)
    assert (d.item_attrs["year"][1:] >= 1940).all()
    gt = synthetic.load_ground_truth(small_world)
    nodes = list(gt["nodes"])
    edges = {(nodes[a], nodes[b]) for a, b in zip(*np.nonzero(gt["adjacency"]))}
    assert edges == set(synthetic.SYNTHETIC_EDGES)
    assert (gt["user_edge_mask"].sum(axis=1) == 3 - (gt["user_deviation"] >= 0)).all()
    assert 0 < (gt["user_deviation"] >= 0).sum() < 80
    assert (gt["user_power_test"] == gt["user_power"]).all()  # IID world
    # users.dat carries the observable attributes
    assert np.array_equal(d.user_attrs["gender"], gt["user_group"][d.raw_user_ids - 1])
    assert np.array_equal(d.user_attrs["age"], gt["user_age_band"][d.raw_user_ids - 1])
    # deterministic given the seed, different with another seed
    synthetic.make_synthetic(tmp_path / "same", n_users=80, n_items=160, mean_len=25, seed=3)
    synthetic.make_synthetic(tmp_path / "other", n_users=80, n_items=160, mean_len=25, seed=4)
    for name in ml1m.FILES:
        assert (tmp_path / "same" / name).read_bytes() == (small_world / name).read_bytes()
    assert (tmp_path / "other" / "ratings.dat").read_bytes() != (small_world / "ratings.dat").read_bytes()


def test_synthetic_ood_shift(tmp_path, small_world, world_data):
    ood = synthetic.make_synthetic(tmp_path / "ood", n_users=80, n_items=160, mean_len=25, seed=3,
                              ood_shift=True)
    gt = synthetic.load_ground_truth(ood)
    assert (gt["user_power_test"] != gt["user_power"]).all()
    assert np.array_equal(gt["user_power"], synthetic.load_ground_truth(small_world)["user_power"])
    d_ood, d_iid = data.load_dataset("synthetic-ood", root=ood), world_data
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
    assert ml1m.contains_ml1m(Path("data") / "synthetic")
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

def test_real_ml1m_canonical_counts(shared_ml1m, tmp_path, monkeypatch):
    monkeypatch.setenv("PLANREC_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the canonical copy must not trigger the count warning
        d = data.load_dataset("ml-1m", root=shared_ml1m, download=False)
    assert (len(d.item_seq), d.n_users, d.n_items) == (1_000_209, 6_040, 3_706)
    assert len(d.train_pos) == 1_000_209 - 3 * 6_040
    assert d.valid_candidates.shape == d.test_candidates.shape == (6_040, 101)
    assert d.item_attrs["genres"].shape == (3_707, 18)
    meta = json.loads((tmp_path / "cache" / "ml-1m" / "meta.json").read_text())
    assert meta["counts"] == {"interactions": 1_000_209, "users": 6_040, "items": 3_706}
    assert not d.interacted(np.arange(d.n_users)[:, None], d.test_candidates[:, 1:]).any()
    assert set(np.unique(d.user_attrs["age"])) == set(range(7))


def test_real_ml1m_sequence_batches(shared_ml1m, tmp_path, monkeypatch):
    """train.py's default epoch: 982,089 positions in 480 batches of 2,048 rows, each position once
    with its own history, about 17 chunks and 2,700 items per batch (context 148, chunks of 256)."""
    monkeypatch.setenv("PLANREC_CACHE", str(tmp_path / "cache"))
    d = load_quiet(shared_ml1m)
    batches = list(d.train_sequences(2048, 1, np.random.default_rng(0), 148))
    assert len(batches) == 480
    check_sequence_epoch(d, batches, 2048, 1, 148, data.CHUNK_POSITIONS)
    assert 2_000 < np.mean([b["history"].shape[1] for b in batches]) < 4_000
    assert 10 < np.mean([b["segment"].max() + 1 for b in batches]) < 30


# --- Amazon-Book and interaction logs (issue 11) ----------------------------------------------

def write_amazon(folder, rows, line_end="\n", final_newline=True):
    """rows: (user, item, timestamp) in file order -> folder/ratings_Books.csv (no header)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = line_end.join(f"{u},{i},{4.0},{t}" for u, i, t in rows) + (line_end if final_newline else "")
    (folder / amazon_book.FILE).write_bytes(text.encode())
    return folder


def write_log(folder, header, lines, users=None, items=None):
    """interactions.csv (plus optional users.csv / items.csv, each a list of lines, header first)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "interactions.csv").write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    for name, table in (("users.csv", users), ("items.csv", items)):
        if table is not None:
            (folder / name).write_text("\n".join(table) + "\n", encoding="utf-8")
    return folder


def dense_rows(n_users, n_items, per_user, seed=0, prefix="U"):
    """(user, item, timestamp) rows: each user rates per_user distinct items at distinct times."""
    rng = np.random.default_rng(seed)
    return [(f"{prefix}{u:03d}", f"B{i:05d}", int(1_000_000_000 + 1000 * u + t))
            for u in range(n_users)
            for t, i in enumerate(rng.choice(n_items, per_user, replace=False))]


def reference_k_core(pairs, k):
    """Peel one user or item with fewer than k interactions at a time, until none is left."""
    kept = list(pairs)
    while True:
        users, items = {}, {}
        for u, i in kept:
            users[u] = users.get(u, 0) + 1
            items[i] = items.get(i, 0) + 1
        weak = next(((side, x) for side, counts in (("u", users), ("i", items))
                     for x, n in counts.items() if n < k), None)
        if weak is None:
            return kept
        kept = [(u, i) for u, i in kept if (u if weak[0] == "u" else i) != weak[1]]


def is_k_core(pairs, k):
    users, items = {}, {}
    for u, i in pairs:
        users[u] = users.get(u, 0) + 1
        items[i] = items.get(i, 0) + 1
    return all(n >= k for n in users.values()) and all(n >= k for n in items.values())


pair_sets = st.sets(st.tuples(st.integers(0, 7), st.integers(0, 7)), max_size=40).map(sorted)


@FAST
@given(pair_sets, st.integers(0, 5))
def test_k_core_is_the_maximal_core(pairs, k):
    user = np.array([u for u, _ in pairs], dtype=np.int64)
    item = np.array([i for _, i in pairs], dtype=np.int64)
    rows = common.k_core(user, item, k)
    kept = [pairs[r] for r in rows]
    assert rows.tolist() == sorted(set(rows.tolist()))  # ascending, file order kept
    assert is_k_core(kept, k)  # every remaining user and item has >= k interactions
    assert kept == reference_k_core(pairs, k)
    # maximal: no removed interaction can be put back next to all the kept ones
    for removed in sorted(set(pairs) - set(kept)):
        assert not is_k_core(kept + [removed], k)


@FAST
@given(st.sets(st.tuples(st.integers(0, 3), st.integers(0, 3)), max_size=10).map(sorted),
       st.integers(1, 3))
def test_k_core_contains_every_core(pairs, k):
    # brute force over all subsets: every k-core lies inside the one k_core returns
    user = np.array([u for u, _ in pairs], dtype=np.int64)
    item = np.array([i for _, i in pairs], dtype=np.int64)
    kept = {pairs[r] for r in common.k_core(user, item, k)}
    for mask in range(1 << len(pairs)):
        subset = [p for b, p in enumerate(pairs) if mask >> b & 1]
        if is_k_core(subset, k):
            assert set(subset) <= kept


@FAST
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 3)), max_size=60))
def test_duplicate_pairs_keep_the_earliest(rows):
    user, item, timestamp = (np.array([r[j] for r in rows], dtype=np.int64) for j in range(3))
    first = {}
    for r, (u, i, t) in enumerate(rows):
        if (u, i) not in first or t < rows[first[(u, i)]][2]:  # ties: the earlier line stays
            first[(u, i)] = r
    assert common.drop_duplicate_pairs(user, item, timestamp).tolist() == sorted(first.values())


def test_amazon_book_protocol_duplicates_and_core(tmp_path):
    # A1 and A2 rate X1, X2, X3; A3 rates X1, X2 and X4, which nobody else rates. The 2-core
    # drops X4 only; then A3 has 2 interactions, too few for the protocol (train, valid, test).
    rows = [("A1", "X1", 30), ("A2", "X1", 10), ("A1", "X2", 20), ("A2", "X2", 20),
            ("A1", "X3", 10), ("A2", "X3", 30), ("A3", "X1", 5), ("A3", "X2", 6),
            ("A3", "X4", 7), ("A1", "X3", 5),  # repeated pair: the earlier time (5) counts
            ("A2", "X2", 1)]  # repeated pair, earlier than line 4
    folder = write_amazon(tmp_path / "ab", rows, line_end="\r\n", final_newline=False)
    with pytest.warns(UserWarning, match="dropping 1 users with fewer than 3 .*e.g. user 'A3'"):
        d = data.load_dataset("amazon-book", root=folder, min_interactions=2, n_eval_negatives=0)
    assert d.raw_user_ids.tolist() == ["A1", "A2"]
    assert d.raw_item_ids.tolist() == ["", "X1", "X2", "X3"]
    names = lambda u: d.raw_item_ids[d.item_seq[d.user_offsets[u]:d.user_offsets[u + 1]]].tolist()
    assert names(0) == ["X3", "X2", "X1"]  # A1: X3 at 5 (its repeat), X2 at 20, X1 at 30
    assert names(1) == ["X2", "X1", "X3"]  # A2: X2 at 1 (its repeat), X1 at 10, X3 at 30
    assert d.user_attrs == {} and d.item_attrs == {}
    # a third book for A3: A3 stays, X4 still goes
    write_amazon(folder, rows + [("A3", "X3", 8)])
    d = data.load_dataset("amazon-book", root=folder, min_interactions=2, n_eval_negatives=0)
    assert d.raw_user_ids.tolist() == ["A1", "A2", "A3"] and len(d.item_seq) == 9
    assert names(2) == ["X1", "X2", "X3"] and "X4" not in d.raw_item_ids


def test_amazon_book_default_16_core_and_settings(tmp_path, monkeypatch):
    # 40 U users rate 16 books each, cyclically: every book has 16 ratings, an exact 16-core.
    # 10 V users rate 15 books each: out at k = 16, in at k = 15.
    rows = [(f"U{u:02d}", f"B{(u + j) % 40:02d}", 100 * u + j) for u in range(40) for j in range(16)]
    rows += [(f"V{u}", f"B{(3 * u + j) % 40:02d}", 10_000 + j) for u in range(10) for j in range(15)]
    folder = write_amazon(tmp_path / "ab", rows)
    calls = count_calls(monkeypatch, amazon_book, "prepare")
    d = data.load_dataset("amazon-book", root=folder, n_eval_negatives=20)  # default k = 16
    assert (d.n_users, d.n_items, len(d.item_seq)) == (40, 40, 640)
    assert all(u.startswith("U") for u in d.raw_user_ids)
    data.load_dataset("amazon-book", root=folder, min_interactions=16, n_eval_negatives=5)
    assert len(calls) == 1  # k = 16 prepared once
    # the filter is a preparation setting: k = 15 prepares again, with the V users
    d15 = data.load_dataset("amazon-book", root=folder, min_interactions=15, n_eval_negatives=20)
    assert len(calls) == 2 and (d15.n_users, len(d15.item_seq)) == (50, 790)
    assert json.loads((folder / "prepared" / "meta.json").read_text())["settings"] == {"min_interactions": 15}
    # and the source: one changed line prepares again
    write_amazon(folder, rows[:-1] + [(rows[-1][0], rows[-1][1], rows[-1][2] + 1)])
    os.utime(folder / amazon_book.FILE, ns=(1, 1))  # the same size: the mtime tells
    data.load_dataset("amazon-book", root=folder, min_interactions=15, n_eval_negatives=20)
    assert len(calls) == 3


def test_csv_details(tmp_path):
    # quoted fields are read as CSV; blank lines at the end are no data; '\r\n' line ends
    rows = [("A,9", "X1", 1), ("A,9", "X2", 2), ("A,9", "X3", 3), ("B", "X1", 1), ("B", "X2", 2), ("B", "X3", 3)]
    folder = tmp_path / "ab"
    folder.mkdir()
    text = "\r\n".join(f'"{u}",{i},4.0,{t}' if "," in u else f"{u},{i},4.0,{t}" for u, i, t in rows)
    (folder / amazon_book.FILE).write_text(text + "\r\n\r\n\n")
    d = data.load_dataset("amazon-book", root=folder, min_interactions=0, n_eval_negatives=0)
    assert d.raw_user_ids.tolist() == ["A,9", "B"] and len(d.item_seq) == 6
    # ids that look like numbers or NA stay text, verbatim
    folder = write_log(tmp_path / "log", "user,item,timestamp", ["NA,007,1", "NA,null,2", "NA,7,3", "007,007,1"])
    with pytest.warns(UserWarning, match="dropping 1 users with fewer than 3 .*e.g. user '007'"):
        d = data.load_dataset("interactions", root=folder, n_eval_negatives=0)
    assert d.raw_user_ids.tolist() == ["NA"] and d.raw_item_ids.tolist() == ["", "007", "7", "null"]


def test_interactions_with_attributes(tmp_path):
    lines = [f"{i},{u},{t},x" for u, i, t in dense_rows(4, 30, 6)]  # item first, extra column
    users = ["user,country,age", "U000,fr,31", "U001,de,", "U002,fr,40", "U999,it,99"]  # no U003
    items = ["genre,item,price"] + [f"{'ab'[j % 2]},B{j:05d},{j}.5" for j in range(30) if j != 7]
    folder = write_log(tmp_path / "log", "item,user,timestamp,note", lines, users, items)
    d = data.load_dataset("interactions", root=folder, n_eval_negatives=5)
    assert d.raw_user_ids.tolist() == ["U000", "U001", "U002", "U003"]
    assert d.attr_vocab["country"] == ["", "de", "fr", "it"]  # the table's values, 0 = missing
    assert d.user_attrs["country"].tolist() == [2, 1, 2, 0] and d.user_attrs["country"].dtype == np.int64
    # numeric: float32; missing (an empty cell, or no line) = the mean of the table's values
    assert d.user_attrs["age"].dtype == np.float32
    assert d.user_attrs["age"].tolist() == pytest.approx([31, (31 + 40 + 99) / 3, 40, (31 + 40 + 99) / 3])
    price = dict(zip(d.raw_item_ids.tolist(), d.item_attrs["price"].tolist()))
    genre = dict(zip(d.raw_item_ids.tolist(), d.item_attrs["genre"].tolist()))
    mean_price = np.mean([j + 0.5 for j in range(30) if j != 7])
    for name in d.raw_item_ids[1:]:
        j = int(name[1:])
        assert price[name] == pytest.approx(mean_price if j == 7 else j + 0.5)
        assert genre[name] == (0 if j == 7 else 1 + j % 2)
    assert genre[""] == 0 and price[""] == pytest.approx(mean_price)  # the padding row
    assert d.attr_vocab["genre"] == ["", "a", "b"]
    # sequences come from the timestamps, whatever the column order
    rows = {u: [i for uu, i, _ in sorted(dense_rows(4, 30, 6), key=lambda r: r[2]) if uu == u]
            for u in d.raw_user_ids}
    for u, name in enumerate(d.raw_user_ids):
        assert d.raw_item_ids[d.item_seq[d.user_offsets[u]:d.user_offsets[u + 1]]].tolist() == rows[name]
    # no attribute tables: none stored; the default k for interactions is 0 (no filter)
    (folder / "users.csv").unlink()
    (folder / "items.csv").unlink()
    bare = data.load_dataset("interactions", root=folder, n_eval_negatives=5)
    assert bare.user_attrs == {} and bare.item_attrs == {} and len(bare.item_seq) == 24


def test_interactions_numeric_ids_and_float_timestamps(tmp_path):
    lines = ["7,10,1.5", "7,11,0.5", "7,12,2.5", "10,10,3", "10,12,1", "10,13,2"]
    folder = write_log(tmp_path / "log", "user,item,timestamp", lines)
    d = data.load_dataset("interactions", root=folder, n_eval_negatives=0)
    # ids are text: ordered as bytes ("10" < "7")
    assert d.raw_user_ids.tolist() == ["10", "7"]
    items = lambda u: d.raw_item_ids[d.item_seq[d.user_offsets[u]:d.user_offsets[u + 1]]].tolist()
    assert items(0) == ["12", "13", "10"] and items(1) == ["11", "10", "12"]


def run_and_expect(folder, name, message, exception=ValueError, **kw):
    with pytest.raises(exception) as err:
        data.load_dataset(name, root=folder, n_eval_negatives=0, **kw)
    assert re.search(message, str(err.value)), str(err.value)
    assert nothing_prepared(folder)  # nothing is written from a failed read


@pytest.mark.parametrize("bad_line, message", [
    ("A9,X9,4.0", r"ratings_Books\.csv:3: 'A9,X9,4\.0': expected 4 comma-separated fields "
                  r"user,item,rating,timestamp, found 3"),
    ("A9,X9,4.0,12,13", r"ratings_Books\.csv:3: 'A9,X9,4\.0,12,13': expected 4 comma-separated fields .*found 5"),
    ('"A,9",X9,4.0,12,13', r"ratings_Books\.csv:3: .*expected 4 .*, found 5"),
    ("", r"ratings_Books\.csv:3: '': expected 4 .* found 1"),
    ("A9,X9,4.0,yesterday", r"ratings_Books\.csv:3: timestamp should be a number \(unix time\), found 'yesterday'"),
    ("A9,X9,4.0,", r"ratings_Books\.csv:3: timestamp should be a number .*found ''"),
    ("A9,X9,4.0,inf", r"ratings_Books\.csv:3: timestamp should be a number .*found 'inf'"),
    (",X9,4.0,12", r"ratings_Books\.csv:3: user is empty; expected an id"),
])
def test_amazon_book_malformed_line(tmp_path, bad_line, message):
    folder = write_amazon(tmp_path / "ab", dense_rows(3, 10, 4))
    lines = (folder / amazon_book.FILE).read_text().splitlines()
    lines.insert(2, bad_line)
    (folder / amazon_book.FILE).write_text("\n".join(lines) + "\n")
    run_and_expect(folder, "amazon-book", message, min_interactions=0)


def test_log_errors(tmp_path):
    rows = [f"{u},{i},{t}" for u, i, t in dense_rows(3, 10, 4)]
    folder = write_log(tmp_path / "a", "user,item,time", rows)
    run_and_expect(folder, "interactions", r"interactions\.csv:1: header 'user,item,time' has no column "
                                           r"timestamp; expected a header line naming at least user, item, timestamp")
    folder = write_log(tmp_path / "b", "user,item,timestamp,user", [r + ",x" for r in rows])
    run_and_expect(folder, "interactions", r"interactions\.csv:1: header .* names user twice")
    folder = write_log(tmp_path / "c", "user,item,timestamp", rows[:5] + ["U9,B1,2020-01-01"] + rows[5:])
    run_and_expect(folder, "interactions", r"interactions\.csv:7: timestamp should be a number \(unix time\), "
                                           r"found '2020-01-01'")
    folder = write_log(tmp_path / "c2", "timestamp,note,item,user", [f"{t},x,{i},{u}" for u, i, t in dense_rows(3, 10, 4)]
                       + ["inf,y,B1,U9"])
    run_and_expect(folder, "interactions", r"interactions\.csv:14: timestamp should be a number .*found 'inf'")
    folder = write_log(tmp_path / "d", "user,item,timestamp", rows)
    run_and_expect(folder, "interactions", r"no interactions left of 12 lines after dropping repeated .* "
                                           r"5-core filter .*lower --min-interactions", min_interactions=5)
    folder = write_log(tmp_path / "e", "user,item,timestamp", [])
    run_and_expect(folder, "interactions", r"interactions\.csv: the file holds no interactions")
    (folder / "interactions.csv").write_text("")
    run_and_expect(folder, "interactions", r"interactions\.csv: the file is empty; expected a header line "
                                           r"naming the columns user, item, timestamp")
    folder = write_log(tmp_path / "f", "user,item,timestamp", rows, users=["id,age", "U000,3"])
    run_and_expect(folder, "interactions", r"users\.csv:1: header names no 'user' column")
    folder = write_log(tmp_path / "g", "user,item,timestamp", rows, users=["user,age", "U000,3", "U001,4", "U000,5"])
    run_and_expect(folder, "interactions", r"users\.csv:4: user 'U000' appears twice; each user needs one line")
    folder = write_log(tmp_path / "h", "user,item,timestamp", rows, users=["user,age", "U000,3"],
                       items=["item,age", "B00001,3"])
    run_and_expect(folder, "interactions", r"items\.csv:1: column\(s\) age also in users\.csv")
    folder = write_log(tmp_path / "i", "user,item,timestamp", rows, items=["item,a:b", "B00001,3"])
    run_and_expect(folder, "interactions", r"items\.csv:1: attribute column 'a:b' contains ':'")
    folder = write_log(tmp_path / "j", "user,item,timestamp", rows, items=["item,kind", "B00001,3,4"])
    run_and_expect(folder, "interactions", r"items\.csv:2: 'B00001,3,4': expected 2 comma-separated fields item,kind")
    with pytest.raises(ValueError, match="min_interactions must be an integer >= 0"):
        data.load_dataset("interactions", root=folder, min_interactions=-1)
    with pytest.raises(ValueError, match="applies to amazon-book and interactions; ml-1m"):
        data.load_dataset("ml-1m", root=folder, min_interactions=16, download=False)
    with pytest.raises(ValueError, match="interactions takes no option"):
        data.load_dataset("interactions", root=folder, n_users=3)


def test_missing_log_says_what_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANREC_DATA", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as err:
        data.load_dataset("amazon-book", root=tmp_path / "given")
    msg = str(err.value)
    for needle in ("ratings_Books.csv was not found", str(tmp_path / "given"),
                   str(tmp_path / "given" / "amazon-book"), str(tmp_path / "env" / "amazon-book"),
                   str(Path("data") / "amazon-book"), '"ratings only" file for Books', "McAuley",
                   amazon_book.PAGE, f"Put it in {tmp_path / 'given'}/"):
        assert needle in msg
    with pytest.raises(FileNotFoundError, match=r"interactions\.csv was not found(.|\n)*header line naming "
                                                r"at least user,item,timestamp(.|\n)*Put it in "):
        data.load_dataset("interactions")
    # found in $PLANREC_DATA/<name> and in ./data/<name>
    write_amazon(tmp_path / "env" / "amazon-book", dense_rows(3, 10, 4))
    assert amazon_book.find() == tmp_path / "env" / "amazon-book"
    write_log(Path("data") / "interactions", "user,item,timestamp", ["a,b,1"])
    assert interactions.find() == Path("data") / "interactions"


TRAIN_TINY = ["--set", "n_factors=4", "--set", "n_user_factors=2", "--set", "factor_dim=4",
              "--set", "k_A=6", "--set", "k_e=3", "--n-mask-samples", "2", "--batch-size", "64",
              "--threads", "1", "--kernel", "eager", "--epochs", "1", "--max-steps", "2"]


def test_amazon_book_trains_end_to_end(tmp_path, capsys):
    import train
    # user u rates books 4u .. 4u + 11 (mod 160): every book has exactly 3 ratings, a 3-core
    rows = [(f"U{u:03d}", f"B{(4 * u + j) % 160:05d}", 1_000_000_000 + 100 * u + j)
            for u in range(40) for j in range(12)]
    rows += [("Z1", "B00000", 5), ("U000", "Q1", 7)]  # both fall to the 3-core
    write_amazon(tmp_path, rows)
    summary = train.main(["--data", "amazon-book", "--data-dir", str(tmp_path), "--min-interactions", "3",
                          "--out", str(tmp_path / "run"), *TRAIN_TINY])
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith(f"PlanRec on amazon-book: 40 users, 160 items, {40 * 9} training positions")
    assert set(summary["test"]) >= {"auc", "ndcg@10"} and (tmp_path / "run" / "best.pt").is_file()


def test_interactions_attribute_prior_trains(tmp_path):
    import train
    rows = dense_rows(30, 150, 10)
    users = ["user,group,height"] + [f"U{u:03d},{'xyz'[u % 3]},{150 + u}" for u in range(30)]
    items = ["item,shelf"] + [f"B{i:05d},s{i % 4}" for i in range(150)]
    write_log(tmp_path, "user,item,timestamp", [f"{u},{i},{t}" for u, i, t in rows], users, items)
    summary = train.main(["--data", "interactions", "--data-dir", str(tmp_path), "--attribute-prior", "both",
                          "--out", str(tmp_path / "run"), *TRAIN_TINY])
    assert np.isfinite(summary["test"]["auc"])


# ----------------------------------------------------------------------------------------------
# Table 4(b): the halves protocol and the interest-consistency user groups

def _drifting_and_consistent(folder):
    """Users 1 and 3 stay with Action (items 1-9); users 2 and 4 switch between Action and
    Comedy|Drama (items 10-19) in the middle of their 8 ratings."""
    seqs = {1: [1, 2, 3, 4, 5, 6, 7, 8], 2: [1, 2, 3, 4, 10, 11, 12, 13],
            3: [2, 3, 4, 5, 6, 7, 8, 9], 4: [10, 11, 12, 14, 1, 2, 3, 5]}
    return write_ml(folder, [(u, i, 100 + t) for u, items in seqs.items() for t, i in enumerate(items)]), seqs


def test_halves_protocol_trains_on_the_first_half_and_tests_on_the_second(tmp_path):
    folder, seqs = _drifting_and_consistent(tmp_path / "ml")
    d = load_quiet(folder, n_eval_negatives=2, protocol="halves")
    t = d.train_pos - d.user_offsets[d.train_user]
    assert sorted(t.tolist()) == [1] * 4 + [2] * 4         # first half (4 items): t = 1, 2 train
    assert (d.valid_pos - d.user_offsets[:-1]).tolist() == [3] * 4    # its last item validates
    assert (d.test_pos - d.user_offsets[:-1]).tolist() == [7] * 4     # the last item tests
    for u, raw in enumerate(d.raw_user_ids):
        items = seqs[int(raw)]
        assert d.valid_candidates[u, 0] == d.item_seq[d.user_offsets[u] + 3]
        assert d.raw_item_ids[d.test_candidates[u, 0]] == items[7]
    users, history, candidates = d.eval_split("test")
    np.testing.assert_array_equal(history[:, -7:], d.item_seq.reshape(4, 8)[:, :7])   # 7 items before it
    assert (candidates[:, 1:] != candidates[:, :1]).all()
    # no second-half item is ever a training target, and popularity counts only the training part
    assert d.item_train_count.sum() == (t <= 2).sum() + 4    # t = 0 .. 2 of each user
    leave_last = load_quiet(folder, n_eval_negatives=2)
    assert sorted((leave_last.train_pos - leave_last.user_offsets[leave_last.train_user]).tolist()) == \
        sorted(list(range(1, 6)) * 4) and len(leave_last.train_pos) > len(d.train_pos)
    np.testing.assert_array_equal(leave_last.test_candidates[:, 0], d.test_candidates[:, 0])


def test_user_groups_split_by_interest_consistency(tmp_path):
    folder, _ = _drifting_and_consistent(tmp_path / "ml")
    groups = {g: load_quiet(folder, n_eval_negatives=1, protocol="halves", users=g)
              for g in data.USER_GROUPS}
    assert sorted(groups["all"].raw_user_ids.tolist()) == [1, 2, 3, 4]
    assert sorted(groups["iid"].raw_user_ids.tolist()) == [1, 3]     # consistency 1 >= the mean 0.5
    assert sorted(groups["ood"].raw_user_ids.tolist()) == [2, 4]     # consistency 0 < the mean
    assert groups["iid"].n_items == 9 and groups["ood"].n_items == 10  # items re-indexed per group
    assert groups["ood"].item_attrs["genres"].shape[0] == 11


@pytest.mark.filterwarnings(CANONICAL_COUNTS)
def test_halves_protocol_errors(tmp_path):
    folder, _ = _drifting_and_consistent(tmp_path / "ml")
    with pytest.raises(ValueError, match="unknown protocol 'thirds'"):
        load_quiet(folder, protocol="thirds")
    with pytest.raises(ValueError, match="unknown user group 'young'"):
        load_quiet(folder, users="young")
    short = write_ml(tmp_path / "short", [(1, i, i) for i in range(1, 6)] + [(2, i, i) for i in range(1, 9)]
                     + [(4, i, i) for i in range(9, 15)])
    with pytest.warns(UserWarning, match="dropping 1 users with fewer than 6"):
        d = load_ml(short, n_eval_negatives=2, protocol="halves")
    assert d.raw_user_ids.tolist() == [2, 4]
    with pytest.raises(ValueError, match="need item genres"):
        data.load_dataset("interactions", root=tmp_path, protocol="halves")
