"""
Speed of the data pipeline on MovieLens-1M, and the popularity baseline's metrics.

  python bench_data.py --data-dir ../shared/data/ml-1m            # timings
  python bench_data.py --data-dir ../shared/data/ml-1m --popularity  # + popularity metrics

Times (a) raw files -> cached arrays (forced rebuild), (b) loading from the cache, (c) one full
training epoch of batches; prints the median of --repeats runs (other processes share the CPU, so
single runs are noisy). The cache goes where data.py puts it ($PLANREC_CACHE, else next to the
data, else ./data/cache).
"""

import argparse
import statistics
import time

import numpy as np

import data


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="folder with ML-1M's three .dat files (or its parent)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--negatives", type=int, default=1, help="training negatives per positive")
    parser.add_argument("--seed", type=int, default=0, help="protocol seed (evaluation negatives)")
    parser.add_argument("--popularity", action="store_true", help="also score the popularity baseline")
    parser.add_argument("--no-download", action="store_true")
    args = parser.parse_args()

    load = lambda rebuild: data.load_movielens(args.data_dir, download=not args.no_download,
                                               seed=args.seed, rebuild=rebuild)
    rows = []
    t, runs, d = timed(lambda: load(True), args.repeats)
    rows.append(("(a) raw ML-1M -> cached arrays (rebuild)", t, runs))
    t, runs, d = timed(lambda: load(False), args.repeats)
    rows.append(("(b) load from cache", t, runs))
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
