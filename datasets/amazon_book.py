"""
Amazon-Book: the "ratings only" Books file of the Amazon review data (McAuley et al., 2014
release), ratings_Books.csv, 22,507,155 lines user,item,rating,timestamp without a header. Not
downloadable here and not ours to redistribute: the user supplies it. Prepared as every line an
implicit interaction (the rating is dropped), repeated (user, item) pairs dropped keeping the
earliest, then the maximal 16-core (paper: Amazon-Book 16-core).

  python -m datasets.amazon_book [--data-dir DIR] [--min-interactions K] [--rebuild]
"""

from datasets import common

FILE = "ratings_Books.csv"
PAGE = "http://jmcauley.ucsd.edu/data/amazon/"
COLUMNS = ("user", "item", "rating", "timestamp")
MIN_INTERACTIONS = 16  # paper: "Amazon-Book 16-core"
HOW = (f"download the \"ratings only\" file for Books of the public Amazon review data by "
       f"McAuley et al. (2014 release, {PAGE}), {FILE}: lines user,item,rating,timestamp without "
       f"a header; its licence does not let us ship it")


def find(root=None):
    return common.find_source(root, "amazon-book", FILE, HOW)


def prepare(folder, min_interactions=MIN_INTERACTIONS):
    path = folder / FILE
    table, first_line = common.read_csv(path, names=COLUMNS, text=("user", "item"))
    return common.log_arrays(table, path, first_line, min_interactions)


def load(root=None, rebuild=False, min_interactions=None, download=None, **unknown):
    """(prepared arrays, source folder); download is ignored (nothing can be downloaded)."""
    if unknown:
        raise ValueError(f"amazon-book takes no option(s) {', '.join(sorted(unknown))}")
    k = common.check_min_interactions(MIN_INTERACTIONS if min_interactions is None else min_interactions)
    folder = find(root)
    arrays = common.load_prepared("amazon-book", folder, [folder / FILE], {"min_interactions": k},
                                  lambda: prepare(folder, k), rebuild)
    return arrays, folder


if __name__ == "__main__":
    common.main(__doc__, lambda args: ("amazon-book", load(args.data_dir, args.rebuild, args.min_interactions)[0]),
                **{"--min-interactions": {"type": int, "default": None, "help": "the k-core (default 16)"}})
