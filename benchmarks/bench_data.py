"""
Speed of the data pipeline on MovieLens-1M, and the popularity baseline's metrics; or, with
--amazon-synthetic, speed and peak memory of the Amazon-Book path on a generated file of the real
one's size and skew.

  python -m benchmarks.bench_data --data-dir ../shared/data/ml-1m            # timings
  python -m benchmarks.bench_data --data-dir ../shared/data/ml-1m --popularity  # + popularity metrics
  python -m benchmarks.bench_data --amazon-synthetic data/amazon-synthetic --cleanup  # Amazon-Book path

Times (a) raw files -> prepared folder -> RecData (forced preparation), (b) prepared folder ->
RecData (the protocol, recomputed on every load), (c) one full training epoch of batches; prints
the median of --repeats runs (other processes share the CPU, so single runs are noisy). The
prepared folder goes where datasets/common.py puts it ($PLANREC_CACHE/<name>, else next to the
data, else ./data/prepared/<name>).

--amazon-synthetic DIR writes DIR/ratings_Books.csv if absent (in a child process, so that its
memory does not count): 22.5 million lines user,item,rating,timestamp in the real file's format
(14-character user ids, 10-character ASIN-like item ids, ratings 1.0-5.0, 10-digit unix times),
about 8 million users and 2.3 million items with power-law degrees (a random bipartite graph with
those degree sequences, so some (user, item) pairs repeat). Then it times (a) and (b) once each
(--repeats) with --min-interactions (default 16) and reports this process's peak resident memory
(ru_maxrss). Here (a) is raw CSV -> prepared arrays only (datasets/amazon_book.py: read, ids,
repeated pairs, 16-core, write) and (b) the prepared folder -> RecData (protocol, 2 x 100
evaluation negatives per user). DIR should be ignored by git (./data/ is); --cleanup deletes the
file and its prepared folder.
"""

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import data
from datasets import amazon_book, common

AMAZON_SHAPE = {"n_rows": 22_500_000, "n_users": 8_000_000, "n_items": 2_300_000}


def timed(fn, repeats):
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), seconds, result


def one_epoch(d, batch_size, n_negatives, seed):
    n = 0
    for batch in d.train_epoch(batch_size, n_negatives, np.random.default_rng(seed)):
        n += len(batch["user"])
    return n


def power_law_degrees(n, total, exponent, max_degree, rng):
    """n degrees >= 1 summing to total: Pareto(exponent) draws floored, capped, rescaled, then
    nudged one by one at random to hit total exactly."""
    degrees = np.minimum(np.floor((1 - rng.random(n)) ** (-1 / exponent)), max_degree)
    degrees = np.maximum(1, np.round(1 + (degrees - 1) * (total - n) / (degrees - 1).sum())).astype(np.int64)
    gap = total - int(degrees.sum())
    if gap > 0:  # grow in proportion to the degree: keeps the skew
        np.add.at(degrees, rng.choice(n, gap, p=degrees / degrees.sum()), 1)
    while gap < 0:
        can_shrink = np.flatnonzero(degrees > 1)
        picked = rng.choice(can_shrink, min(-gap, len(can_shrink)), replace=False)
        degrees[picked] -= 1
        gap += len(picked)
    return degrees


def digits(values, width, alphabet=b"0123456789"):
    """[n] non-negative ints -> [n, width] uint8 ASCII digits in base len(alphabet), most
    significant first."""
    symbols, base = np.frombuffer(alphabet, dtype=np.uint8), len(alphabet)
    return symbols[values[:, None] // base ** np.arange(width - 1, -1, -1, dtype=np.int64) % base]


def write_amazon_synthetic(path, n_rows, n_users, n_items, seed=0, chunk=1 << 20):
    """A ratings_Books.csv look-alike (see the module docstring); every line is 41 bytes."""
    rng = np.random.default_rng(seed)
    user_degree = power_law_degrees(n_users, n_rows, 1.5, 50_000, rng)
    item_degree = power_law_degrees(n_items, n_rows, 1.2, 30_000, rng)
    user = rng.permutation(np.repeat(np.arange(n_users, dtype=np.int32), user_degree))
    item = np.repeat(np.arange(n_items, dtype=np.int32), item_degree)  # random pairing via user
    # Distinct scrambled ids: multiplying by a number coprime to the modulus is a bijection.
    # Users: 'A' + a digit + 12 base-36 symbols (real ids look like A1..., A2..., A3...); items:
    # '0' + 9 decimal digits, like the ISBN-10 ASINs of books.
    scrambled_users = np.arange(n_users, dtype=np.int64) * 1_000_003 % 36 ** 12
    user_ids = np.concatenate([np.full((n_users, 1), ord("A"), dtype=np.uint8),
                               digits(np.arange(n_users) % 3 + 1, 1),
                               digits(scrambled_users, 12, b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")], axis=1)
    item_ids = np.concatenate([np.full((n_items, 1), ord("0"), dtype=np.uint8),
                               digits(np.arange(n_items, dtype=np.int64) * 7_919 % 10 ** 9, 9)], axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.part")
    with open(tmp, "wb") as f:
        for start in range(0, n_rows, chunk):
            rows = slice(start, min(start + chunk, n_rows))
            n = rows.stop - rows.start
            line = np.empty((n, 41), dtype=np.uint8)
            line[:, 0:14] = user_ids[user[rows]]
            line[:, 14] = ord(",")
            line[:, 15:25] = item_ids[item[rows]]
            line[:, 25] = ord(",")
            line[:, 26] = ord("1") + rng.integers(0, 5, n)
            line[:, 27:29] = np.frombuffer(b".0", dtype=np.uint8)
            line[:, 29] = ord(",")
            stamps = rng.integers(1_000_000_000, 1_406_000_000, n)  # 2001-09 .. 2014-07
            line[:, 30:40] = digits(stamps, 10)
            line[:, 40] = ord("\n")
            f.write(line.tobytes())
    tmp.replace(path)


def bench_amazon(args):
    folder = Path(args.amazon_synthetic)
    source = folder / amazon_book.FILE
    if not source.is_file():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "benchmarks.bench_data", "--write-amazon-synthetic", str(source)],
                       check=True, cwd=Path(__file__).resolve().parents[1])
        print(f"wrote {source} ({source.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s")
    prepare = lambda: amazon_book.load(folder, rebuild=True, min_interactions=args.min_interactions)
    rows = []
    t, runs, _ = timed(prepare, args.repeats)
    rows.append((f"(a) raw CSV -> prepared arrays ({args.min_interactions}-core)", t, runs))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB
    load = lambda: data.load_dataset("amazon-book", root=folder, seed=args.seed,
                                     min_interactions=args.min_interactions)
    t, runs, d = timed(load, args.repeats)
    rows.append(("(b) prepared -> RecData (protocol)", t, runs))
    print(f"data: {source} ({source.stat().st_size / 1e9:.2f} GB)  {d}")
    print(f"{'stage':<52} {'median s':>9}   runs (s)")
    for name, median, runs in rows:
        print(f"{name:<52} {median:>9.2f}   {', '.join(f'{r:.2f}' for r in runs)}")
    print(f"peak resident memory of this process after (a): {peak_gb:.2f} GiB")
    if args.cleanup:
        source.unlink()
        for prepared in common.prepared_dirs("amazon-book", folder):
            if (prepared / common.META_FILE).is_file():
                shutil.rmtree(prepared)
        if not any(folder.iterdir()):
            folder.rmdir()
        print(f"deleted {source} and its prepared folder")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="folder with ML-1M's three .dat files (or its parent)")
    parser.add_argument("--amazon-synthetic", default=None, metavar="DIR",
                        help="bench the Amazon-Book path on DIR/ratings_Books.csv, generated if absent")
    parser.add_argument("--min-interactions", type=int, default=16, help="k-core of --amazon-synthetic")
    parser.add_argument("--cleanup", action="store_true", help="delete the generated file and its prepared folder afterwards")
    parser.add_argument("--write-amazon-synthetic", default=None, metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=None, help="runs per stage (default 3; 1 with --amazon-synthetic)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--negatives", type=int, default=1, help="training negatives per positive")
    parser.add_argument("--seed", type=int, default=0, help="protocol seed (evaluation negatives)")
    parser.add_argument("--popularity", action="store_true", help="also score the popularity baseline")
    parser.add_argument("--no-download", action="store_true")
    args = parser.parse_args()
    if args.write_amazon_synthetic:
        return write_amazon_synthetic(args.write_amazon_synthetic, **AMAZON_SHAPE)
    if args.amazon_synthetic:
        args.repeats = args.repeats or 1
        return bench_amazon(args)
    args.repeats = args.repeats or 3

    load = lambda rebuild: data.load_dataset("ml-1m", args.data_dir, download=not args.no_download,
                                             seed=args.seed, rebuild=rebuild)
    rows = []
    t, runs, d = timed(lambda: load(True), args.repeats)
    rows.append(("(a) raw ML-1M -> prepared -> RecData", t, runs))
    t, runs, d = timed(lambda: load(False), args.repeats)
    rows.append(("(b) prepared -> RecData (protocol)", t, runs))
    t, runs, n = timed(lambda: one_epoch(d, args.batch_size, args.negatives, args.seed), args.repeats)
    rows.append((f"(c) one training epoch, batch {args.batch_size}, {args.negatives} negative(s)", t, runs))

    print(f"data: {d.folder}  {d}")
    print(f"epoch: {n:,} positives -> {n * (1 + args.negatives):,} scored examples "
          f"in {-(-n // args.batch_size)} batches")
    print(f"{'stage':<52} {'median s':>9}   runs (s)")
    for name, median, runs in rows:
        print(f"{name:<52} {median:>9.2f}   {', '.join(f'{r:.2f}' for r in runs)}")

    if args.popularity:
        print(f"\npopularity baseline (score = item's training count), seed {args.seed}, "
              f"{d.test_candidates.shape[1] - 1} negatives per user, pessimistic ties:")
        print(f"{'split':<6} " + " ".join(f"{k:>9}" for k in ("auc", "recall@5", "recall@10", "ndcg@5", "ndcg@10")))
        for split in ("valid", "test"):
            m = data.ranking_metrics(data.popularity_scores(d, split))
            print(f"{split:<6} " + " ".join(f"{v:>9.4f}" for v in m.values()))


if __name__ == "__main__":
    main()
