"""
The paper's protocol (§3.1 "Evaluation Protocol" / "Implementation Details", DIN/NCF-style
ranking) on a prepared dataset (datasets/: MovieLens-1M, the synthetic worlds, Amazon-Book, any
interactions.csv), its training batches and evaluation candidates, the ranking metrics and the
popularity baseline.

  - every rating is an implicit positive interaction;
  - per user, interactions are sorted by timestamp (stable: ties keep file order);
  - the last interaction is the test target, scored against 100 sampled items the user never
    consumed; AUC, Recall@5/10, NDCG@5/10;
  - the user feature is the last 50 clicked items (HISTORY_LEN), left-padded with item 0;
  - the second-to-last interaction is a validation target. The paper has NO validation set; we
    add one for model selection (our choice) so that the test target is never used to tune.

Table 4(b)'s protocol (§3.3.2), data with item genres only, `protocol="halves"`: each user's
sequence is split in the middle (the first L // 2 items, the rest), "the first half of behaviors
for training, and the second half of behaviors for testing". The paper does not say how the second
half is scored; our choice keeps one ranking per user like the protocol above: the test target is
the user's last item (the end of the second half, 50 items of history before it, mostly second
half), the validation target the last item of the first half, and no second-half item is ever a
training target. `users="iid"|"ood"` keeps only the users whose interest consistency
(`interest_consistency`) is at least / below the mean over all users, the paper's two datasets.

Only the preparation (parsing, filters) is stored, by datasets/; the protocol's arrays are
recomputed on every load: 0.75 s for ML-1M, 6 s for Amazon-Book's 16-core on the 2-core dev
machine (bench_data.py), for no cache to keep in step with the code.
"""

import warnings
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

import datasets

HISTORY_LEN = 50  # paper: "the embeddings of the last 50 clicked items as the user feature"
# Training positions per sequence chunk in train_sequences (our choice): longer chunks repeat fewer
# items before their first target (planrec.context_length, 148 by default), shorter ones mix more users
# into a batch (2,048 positions: about 16 chunks on ML-1M at 256).
CHUNK_POSITIONS = 256
N_EVAL_NEGATIVES = 100  # paper: "one hundred randomly sampled items that the user did not consume"
PROTOCOLS = ("leave-last", "halves")
USER_GROUPS = ("all", "iid", "ood")  # Table 4(b): users split by interest consistency
# Fewest interactions a user needs: leave-last, a training item, a validation and a test target;
# halves, a first half of at least 3 (history, training target, validation target).
MIN_INTERACTIONS = {"leave-last": 3, "halves": 6}
DATASETS = datasets.NAMES


def load_dataset(name, root=None, seed=0, n_eval_negatives=N_EVAL_NEGATIVES, history_len=HISTORY_LEN,
                 rebuild=False, protocol="leave-last", users="all", **options):
    """RecData of dataset `name` (DATASETS) under the protocol. root: the --data-dir. seed: the
    protocol's seed (evaluation negatives), not a synthetic world's (world_seed). options: the
    dataset's own (download, min_interactions, make_synthetic's keywords). The dataset is
    prepared first when needed (ML-1M downloaded); rebuild=True prepares it again."""
    check_resplit(protocol, users)  # before any download
    if (protocol, users) != ("leave-last", "all") and name in DATASETS and name not in datasets.WITH_GENRES:
        raise ValueError(f"{name}: the halves protocol and the interest-consistency user groups "
                         f"need item genres; use ml-1m or a synthetic world")
    log, folder = datasets.load(name, root, rebuild=rebuild, **options)
    if users != "all":
        log = _user_group(log, users, folder)
    return _split(name, log, folder, seed, n_eval_negatives, history_len, protocol)


def check_resplit(protocol, users):
    """Table 4(b)'s settings: raise a ValueError naming the choices for an unknown one."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if users not in USER_GROUPS:
        raise ValueError(f"unknown user group {users!r}; choose one of {', '.join(USER_GROUPS)}")


def _sequences(log, minimum, folder):
    """(raw_users, raw_items, item_seq, user_offsets) of a prepared log, users with fewer than
    `minimum` interactions dropped (a warning), the rest re-indexed 0.. and items 1.. in code (=
    id) order; raw_*: each one's prepared code; item_seq, user_offsets: as in RecData."""
    user, item, timestamp = log["user"], log["item"], log["timestamp"]
    counts = np.bincount(user)
    short = np.flatnonzero((counts > 0) & (counts < minimum))
    if len(short):
        warnings.warn(f"{folder}: dropping {len(short)} users with fewer than {minimum} "
                      f"interactions (no room for train/validation/test), e.g. user "
                      f"{log['user_ids'][short[0]].item()!r}")
        keep = counts[user] >= minimum
        user, item, timestamp = user[keep], item[keep], timestamp[keep]
    if len(user) == 0:
        raise ValueError(f"{folder}: no user has {minimum} or more ratings")
    # The users and items left, re-indexed densely in code order (np.unique's inverse, in O(n)).
    user_left, item_left = np.bincount(user) > 0, np.bincount(item) > 0
    raw_users, raw_items = np.flatnonzero(user_left), np.flatnonzero(item_left)
    user, item = np.cumsum(user_left)[user] - 1, np.cumsum(item_left)[item] - 1
    order = np.lexsort((timestamp, user))  # lexsort is stable: equal timestamps keep file order
    lengths = np.bincount(user, minlength=len(raw_users))
    user_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return raw_users, raw_items, (item[order] + 1).astype(np.int64), user_offsets


def _split(name, log, folder, seed, n_eval_negatives, history_len, protocol):
    """RecData of a prepared log under `protocol` (see the module docstring)."""
    raw_users, raw_items, item_seq, user_offsets = _sequences(log, MIN_INTERACTIONS[protocol], folder)
    n_users, n_items = len(raw_users), len(raw_items)
    lengths = np.diff(user_offsets)
    user_of_pos = np.repeat(np.arange(n_users), lengths)
    t = np.arange(len(item_seq)) - user_offsets[user_of_pos]  # position within the user's sequence
    test_pos = user_offsets[1:] - 1  # both protocols test on each user's last item
    if protocol == "leave-last":
        valid_pos = user_offsets[1:] - 2
        in_train_part = t <= lengths[user_of_pos] - 3  # last two are validation and test
    else:  # halves: train on the first half but its last item (validation); test in the second
        half = lengths // 2
        valid_pos = user_offsets[:-1] + half - 1
        in_train_part = t <= half[user_of_pos] - 2
    # Every training position with some history is a positive (DIN-style; the paper does not spell
    # out how training examples are formed, our choice). t=0 has no history: it is history only.
    train_pos = np.flatnonzero(in_train_part & (t >= 1))

    # Evaluation candidates are drawn from the protocol seed alone, so every model and run is
    # scored on the same items. The paper says "one hundred randomly sampled items that the user
    # did not consume"; without replacement, and independent draws for validation and test, are
    # our choice.
    keys = _sorted_keys(user_of_pos, item_seq, n_items)
    rng = np.random.default_rng(seed)
    valid_neg = _sample_eval_negatives(keys, lengths, n_items, n_eval_negatives, rng)
    test_neg = _sample_eval_negatives(keys, lengths, n_items, n_eval_negatives, rng)

    items = np.concatenate([[0], raw_items])  # each item's prepared code; 0 is the padding item
    prefixed = lambda p: {k[len(p):]: v for k, v in log.items() if k.startswith(p)}
    return RecData(
        name=name, n_users=n_users, n_items=n_items, item_seq=item_seq, user_offsets=user_offsets,
        train_user=user_of_pos[train_pos], train_pos=train_pos, valid_pos=valid_pos, test_pos=test_pos,
        valid_candidates=np.column_stack([item_seq[valid_pos], valid_neg]),
        test_candidates=np.column_stack([item_seq[test_pos], test_neg]),
        item_train_count=np.bincount(item_seq[in_train_part], minlength=n_items + 1).astype(np.int64),
        user_attrs={k: v[raw_users] for k, v in prefixed("user_attr.").items()},
        item_attrs={k: v[items] for k, v in prefixed("item_attr.").items()},
        raw_user_ids=log["user_ids"][raw_users], raw_item_ids=log["item_ids"][items],
        history_len=history_len, attr_vocab={k: [str(x) for x in v] for k, v in prefixed("vocab.").items()},
        folder=str(folder))


def _user_group(log, users, folder):
    """The prepared log of only the users whose interest consistency over their whole sequence is
    at least ("iid") / below ("ood") the mean over all users."""
    raw_users, raw_items, item_seq, user_offsets = _sequences(log, MIN_INTERACTIONS["leave-last"], folder)
    genres = log["item_attr.genres"][np.concatenate([[0], raw_items])]
    consistency = interest_consistency(item_seq, user_offsets, genres)
    iid = consistency >= consistency.mean()
    keep = np.isin(log["user"], raw_users[iid if users == "iid" else ~iid])
    return {**log, **{k: log[k][keep] for k in ("user", "item", "timestamp")}}


def _sorted_keys(users, items, n_items):
    # One int64 per (user, item) pair; sorted, so membership is a binary search.
    return np.sort(users * (n_items + 1) + items)


def _contains(sorted_keys, keys):
    i = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[i] == keys


def _sample_eval_negatives(sorted_keys, lengths, n_items, k, rng):
    """[n_users, k] items drawn uniformly WITHOUT replacement from the items each user never
    interacted with. Vectorized rejection: draw with replacement, drop the user's items and
    repeats, keep the first k (an ordered sample without replacement, hence uniform); rows with
    fewer than k survivors are redrawn from scratch with a bigger buffer."""
    n_users = len(lengths)
    n_free = n_items - lengths
    if k > 0 and n_free.min() < k:
        u = int(np.argmin(n_free))
        raise ValueError(f"user index {u} interacted with {lengths[u]} of {n_items} items, leaving "
                         f"{n_free[u]} to draw {k} evaluation negatives from; use fewer "
                         f"n_eval_negatives or more items")
    out = np.zeros((n_users, k), dtype=np.int64)
    todo = np.arange(n_users)
    # Enough draws that most rows succeed at once: k / (free share) plus slack for repeats.
    size = int(np.ceil(1.5 * k * n_items / max(n_free.min(), 1))) + 20
    while len(todo) and k > 0:
        draws = rng.integers(1, n_items + 1, size=(len(todo), size))
        # Each row's draws in sorted order (a stable sort: the first occurrence of an item comes
        # first; 16-bit items when they fit, which numpy sorts by radix): a later equal one is a
        # repeat, and the search for the user's own items runs over ascending keys (cache-friendly).
        order = np.argsort(draws.astype(np.uint16) if n_items < 1 << 16 else draws, axis=1, kind="stable")
        sorted_draws = np.take_along_axis(draws, order, axis=1)
        rejected = _contains(sorted_keys, todo[:, None] * (n_items + 1) + sorted_draws)
        rejected[:, 1:] |= sorted_draws[:, 1:] == sorted_draws[:, :-1]
        keep = np.empty_like(rejected)
        np.put_along_axis(keep, order, ~rejected, axis=1)
        n_kept = np.cumsum(keep, axis=1, dtype=np.int32)
        done = n_kept[:, -1] >= k
        first_k = keep[done] & (n_kept[done] <= k)  # k per row, in draw order
        out[todo[done]] = draws[done][first_k].reshape(-1, k)
        todo, size = todo[~done], size * 2
    return out


@dataclass(repr=False)
class RecData:
    name: str
    n_users: int  # users re-indexed 0..n_users-1 in order of original id (UserID, or UTF-8 byte order)
    n_items: int  # items re-indexed 1..n_items in order of original id; 0 is padding
    item_seq: np.ndarray  # [n_interactions] each user's items in time order, users concatenated
    user_offsets: np.ndarray  # [n_users + 1] user u is item_seq[user_offsets[u]:user_offsets[u+1]]
    train_user: np.ndarray  # [n_train] user of each training target
    train_pos: np.ndarray  # [n_train] index into item_seq of each training target (t >= 1)
    valid_pos: np.ndarray  # [n_users] index into item_seq of each user's validation target
    test_pos: np.ndarray  # [n_users] index into item_seq of each user's test target
    valid_candidates: np.ndarray  # [n_users, 1 + n_eval_negatives], column 0 = validation item
    test_candidates: np.ndarray  # [n_users, 1 + n_eval_negatives], column 0 = test item
    item_train_count: np.ndarray  # [n_items + 1] interactions per item in the training part
    # ML-1M: user gender (0=F, 1=M), age (band index 0..6), occupation: [n_users] int64; item
    # genres [n_items + 1, n_genres] float32 multi-hot, year [n_items + 1] float32. interactions:
    # users.csv / items.csv columns, int64 codes (categorical) or float32 (numeric), see
    # datasets/interactions.py. Integer attributes are classes, float ones are regressed (train.py).
    user_attrs: dict
    item_attrs: dict
    raw_user_ids: np.ndarray  # [n_users] original UserID (int64; str for the CSV logs)
    raw_item_ids: np.ndarray  # [n_items + 1] original MovieID (0, or '' for the CSV logs: padding)
    history_len: int = HISTORY_LEN
    attr_vocab: dict = field(default_factory=dict)  # names of genres columns, gender/age/categorical codes
    folder: str = ""  # where the source files are (the synthetic ground truth lives there too)

    def __repr__(self):
        return (f"RecData({self.name!r}: {self.n_users} users, {self.n_items} items, "
                f"{len(self.item_seq)} interactions, {len(self.train_pos)} training positions, "
                f"{self.test_candidates.shape[1] - 1} evaluation negatives)")

    @cached_property
    def _interaction_keys(self):
        lengths = np.diff(self.user_offsets)
        return _sorted_keys(np.repeat(np.arange(self.n_users), lengths), self.item_seq, self.n_items)

    def interacted(self, user, items):
        """Boolean array shaped like `items`: did `user` (broadcast) interact with it, any split."""
        user, items = np.asarray(user), np.asarray(items)
        return _contains(self._interaction_keys, user * (self.n_items + 1) + items)

    def history(self, user, pos, length=None):
        """[len(pos), length] int64: the up-to-`length` items user[j] interacted with before
        item_seq[pos[j]], oldest first, left-padded with 0. pos must belong to that user."""
        length = self.history_len if length is None else length
        user, pos = np.asarray(user, dtype=np.int64), np.asarray(pos, dtype=np.int64)
        start = self.user_offsets[user]
        if ((pos < start) | (pos >= self.user_offsets[user + 1])).any():
            raise ValueError("history(): some pos lies outside its user's sequence; pass the "
                             "user of each position (e.g. train_user with train_pos)")
        idx = pos[:, None] - length + np.arange(length)
        mine = idx >= start[:, None]  # earlier entries belong to the previous user: padding
        return np.where(mine, self.item_seq[np.maximum(idx, 0)], 0)

    def eval_split(self, split, length=None):
        """(users [n_users], history [n_users, length], candidates [n_users, 1 + n_neg]).
        The history is the up-to-`length` (default history_len) items before the target: under
        leave-last, the test history includes the validation item and the validation history
        excludes both targets. An encoder that reads further back than its window (planrec's
        context_length) needs length = that much."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        users = np.arange(self.n_users, dtype=np.int64)
        target_pos = self.valid_pos if split == "valid" else self.test_pos
        candidates = self.valid_candidates if split == "valid" else self.test_candidates
        return users, self.history(users, target_pos, length), candidates

    def sample_negatives(self, user, n, rng):
        """[len(user), n] items drawn uniformly from items each user never interacted with (any
        split): draw, then redraw only the collisions until there are none. With replacement
        across the n columns (our choice; n is 1 by default)."""
        user = np.asarray(user, dtype=np.int64)
        items = rng.integers(1, self.n_items + 1, size=(len(user), n))
        rows, cols = np.nonzero(self.interacted(user[:, None], items))
        while len(rows):
            items[rows, cols] = rng.integers(1, self.n_items + 1, size=len(rows))
            still = self.interacted(user[rows], items[rows, cols])
            rows, cols = rows[still], cols[still]
        return items

    def train_epoch(self, batch_size, n_negatives, rng):
        """One epoch over all training positions in an rng-shuffled order. Yields dicts of int64
        arrays: user [b], history [b, history_len], items [b, 1 + n_negatives] with the positive
        target in column 0 and fresh negatives (shared history) after it."""
        if batch_size < 1 or n_negatives < 0:
            raise ValueError(f"need batch_size >= 1 and n_negatives >= 0, got {batch_size}, "
                             f"{n_negatives}")
        order = rng.permutation(len(self.train_pos))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            user, pos = self.train_user[idx], self.train_pos[idx]
            items = np.empty((len(idx), 1 + n_negatives), dtype=np.int64)
            items[:, 0] = self.item_seq[pos]
            items[:, 1:] = self.sample_negatives(user, n_negatives, rng)
            yield {"user": user, "history": self.history(user, pos), "items": items}

    def train_sequences(self, rows_per_batch, n_negatives, rng, context, chunk=CHUNK_POSITIONS):
        """One epoch over all training positions, batched as user sequences, for an encoder that
        encodes each sequence once (planrec's target_attention; train_epoch gives the same rows
        one by one). Each user's training positions are cut into chunks of at most `chunk`
        consecutive ones (as even as can be), the chunks shuffled (rng), and each batch takes the
        next `rows_per_batch` positions of the shuffled chunks (a chunk that straddles two batches
        is cut in two): every training position is a row of exactly one batch, with fresh
        negatives. A chunk's items run from `context` items before its first target (what the
        encoder reads: planrec.context_length) to the item before its last target; the chunks of a
        batch lie end to end in one row. Yields dicts of int64 arrays, the keyword arguments of
        planrec.PlanRec.forward:
          history [1, T], segment [1, T]: the chunks' items end to end, and which chunk each is;
          seq [b], end [b]: row j's target follows history[seq[j], end[j] - 1], so its history
            is what lies before that in its chunk (all zeros in seq: one row);
          user [b], items [b, 1 + n_negatives] as in train_epoch, and pos [b], the target's index
            into item_seq."""
        if rows_per_batch < 1 or n_negatives < 0 or context < 1 or chunk < 1:
            raise ValueError(f"need rows_per_batch, context, chunk >= 1 and n_negatives >= 0, got "
                             f"{rows_per_batch}, {context}, {chunk}, {n_negatives}")
        # Each user's training positions are consecutive entries of train_pos (sorted), its chunks
        # consecutive runs of them: sizes base or base + 1.
        counts = np.bincount(self.train_user, minlength=self.n_users)
        n_chunks = -(-counts // chunk)
        base, extra = counts // np.maximum(n_chunks, 1), counts % np.maximum(n_chunks, 1)
        user = np.repeat(np.arange(self.n_users), n_chunks)
        k = np.arange(len(user)) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)   # chunk k of its user
        size = base[user] + (k < extra[user])
        start = (np.cumsum(counts) - counts)[user] + k * base[user] + np.minimum(k, extra[user])
        # Shuffle the chunks; rows = their positions in that order (indices into train_pos).
        order = rng.permutation(len(user))
        size, start = size[order], start[order]
        offset = np.cumsum(size) - size
        rows = np.repeat(start - offset, size) + np.arange(size.sum())
        chunk_of_row = np.repeat(np.arange(len(size)), size)
        for first in range(0, len(rows), rows_per_batch):
            idx, chunk_id = rows[first:first + rows_per_batch], chunk_of_row[first:first + rows_per_batch]
            u, pos = self.train_user[idx], self.train_pos[idx]
            # the batch's pieces of chunks: consecutive rows with one chunk id
            head = np.flatnonzero(np.r_[True, chunk_id[1:] != chunk_id[:-1]])
            tail = np.r_[head[1:], len(idx)] - 1
            begin = np.maximum(self.user_offsets[u[head]], pos[head] - context)   # first item, into item_seq
            length = pos[tail] - begin                                            # through the item before the last target
            at = np.cumsum(length) - length                                       # where each piece starts in the row
            history = self.item_seq[np.repeat(begin - at, length) + np.arange(length.sum())]
            piece = np.repeat(np.arange(len(head)), np.diff(np.r_[head, len(idx)]))
            items = np.empty((len(idx), 1 + n_negatives), dtype=np.int64)
            items[:, 0] = self.item_seq[pos]
            items[:, 1:] = self.sample_negatives(u, n_negatives, rng)
            yield {"history": history[None], "segment": np.repeat(np.arange(len(head)), length)[None],
                   "seq": np.zeros(len(idx), dtype=np.int64), "end": at[piece] + pos - begin[piece],
                   "user": u, "items": items, "pos": pos}


# ----------------------------------------------------------------------------------------------
# Users: genre distributions and interest consistency (section 3.3.2)

def genre_counts(item_seq, user_offsets, item_genres, halves=False):
    """[U, G] genre mass of each user's interactions ([U, 2, G] for the two halves of the sequence,
    split in the middle, the second half one longer for odd lengths). An item spreads one unit
    evenly over its genres (our choice for multi-genre movies)."""
    item_genres = np.asarray(item_genres, dtype=np.float64)
    weight = item_genres / np.maximum(item_genres.sum(1, keepdims=True), 1.0)
    lengths = np.diff(user_offsets)
    n_users = len(lengths)
    user = np.repeat(np.arange(n_users), lengths)
    bucket = user
    if halves:
        position = np.arange(len(item_seq)) - user_offsets[user]
        bucket = 2 * user + (position >= lengths[user] // 2)
    n_buckets = 2 * n_users if halves else n_users
    counts = np.stack([np.bincount(bucket, weights=weight[item_seq, g], minlength=n_buckets)
                       for g in range(item_genres.shape[1])], 1)
    return counts.reshape(n_users, 2, -1) if halves else counts


def normalize_rows(counts):
    return counts / np.maximum(counts.sum(-1, keepdims=True), 1e-12)


def js_divergence(p, q):
    """Jensen-Shannon divergence of distributions in the last axis, in bits (0..1)."""
    m = 0.5 * (p + q)
    kl = lambda a: np.where(a > 0, a * np.log2(np.where(a > 0, a, 1.0) / np.where(m > 0, m, 1.0)), 0.0).sum(-1)
    return 0.5 * kl(p) + 0.5 * kl(q)


def interest_consistency(item_seq, user_offsets, item_genres):
    """[U] in 0..1: 1 - I(H; C) / log 2, where I(H; C) is the mutual information between which half
    of the user's sequence an interaction comes from (H, the halves weighted equally) and its genre
    (C). Section 3.3.2 asks for "the mutual information of these two distributions" as a score that
    is high for consistent users; I(H; C) is zero exactly when the halves' genre distributions are
    equal and log 2 when they share no genre, so we use one minus it (our choice). I(H; C) with
    equal weights is the Jensen-Shannon divergence of the two halves' distributions."""
    halves = normalize_rows(genre_counts(item_seq, user_offsets, item_genres, halves=True))
    return 1.0 - js_divergence(halves[:, 0], halves[:, 1])


# ----------------------------------------------------------------------------------------------
# Metrics and the popularity baseline

def per_user_metrics(scores, ks=(5, 10)):
    """{'auc', 'recall@k'..., 'ndcg@k'...: [n_users] float64} from scores [n_users, 1 +
    n_negatives], column 0 the positive. Ties count against the positive (pessimistic), so a
    constant scorer gets auc 0 and recall 0."""
    if hasattr(scores, "detach"):  # a torch tensor, without importing torch here
        scores = scores.detach().cpu().numpy()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be [n_users, 1 + n_negatives] with at least one negative, "
                         f"got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError(f"scores contain NaN in {int(np.isnan(scores).any(axis=1).sum())} rows; "
                         f"the model diverged or a score was never written")
    positive, negatives = scores[:, :1], scores[:, 1:]
    rank = (negatives >= positive).sum(axis=1)  # 0 = the positive is on top
    return {"auc": (negatives < positive).mean(axis=1),
            **{f"recall@{k}": (rank < k).astype(np.float64) for k in ks},
            **{f"ndcg@{k}": np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0) for k in ks}}


def ranking_metrics(scores, ks=(5, 10)):
    """The means over users of per_user_metrics, as floats."""
    return {k: float(v.mean()) for k, v in per_user_metrics(scores, ks).items()}


def popularity_scores(data, split="test"):
    """[n_users, 1 + n_negatives]: each candidate's interaction count in the training part."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    candidates = data.valid_candidates if split == "valid" else data.test_candidates
    return data.item_train_count[candidates].astype(np.float64)
