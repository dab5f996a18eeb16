"""
Finding, downloading and preparing each dataset, once, into the one prepared format
(datasets/common.py): the interaction log in source-file order, its ids and the user / item
attributes. One short module per dataset, each runnable:

  python -m datasets.ml1m [--data-dir DIR]           MovieLens-1M (downloaded when absent)
  python -m datasets.amazon_book [--data-dir DIR]    Amazon-Book 16-core from ratings_Books.csv
  python -m datasets.interactions --data-dir DIR     any interactions.csv (+ users.csv, items.csv)
  python -m datasets.synthetic [--data-dir DIR]      the synthetic world with known structure

data.py reads the prepared format (preparing it first when needed, through `load`) and applies
the paper's protocol.
"""

import importlib

# Each dataset's module, imported on use (so that `python -m datasets.<module>` runs it cleanly).
MODULES = {"ml-1m": "ml1m", "synthetic": "synthetic", "synthetic-ood": "synthetic",
           "amazon-book": "amazon_book", "interactions": "interactions"}
NAMES = tuple(MODULES)
WITH_GENRES = ("ml-1m", "synthetic", "synthetic-ood")  # item genres: Table 4(b)'s re-split works


def load(name, root=None, rebuild=False, **options):
    """(prepared arrays, source folder) of dataset `name`, prepared first when the prepared folder
    is missing or does not match the sources and settings (or rebuild=True). options: the
    dataset's own (download, min_interactions, make_synthetic's keywords)."""
    if name not in MODULES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")
    if MODULES[name] == "synthetic":
        options["name"] = name  # one module, two worlds
    return importlib.import_module(f"datasets.{MODULES[name]}").load(root=root, rebuild=rebuild, **options)
