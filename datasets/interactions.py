"""
Any interaction log: interactions.csv, a header line naming at least user,item,timestamp (any
order, other columns ignored; timestamp in unix time), one interaction per line; optionally
users.csv / items.csv, a header naming user / item and one column per attribute. Prepared like
Amazon-Book (repeated pairs dropped keeping the earliest, then the min_interactions-core; default
0 = none), with the attribute tables aligned to its users and items.

  python -m datasets.interactions --data-dir DIR [--min-interactions K] [--rebuild]
"""

import numpy as np
import pandas as pd

from datasets import common

FILE, USERS_FILE, ITEMS_FILE = "interactions.csv", "users.csv", "items.csv"
LOG_COLUMNS = ("user", "item", "timestamp")
HOW = (f"write {FILE}: a header line naming at least user,item,timestamp (any order; timestamp "
       f"in unix time), then one interaction per line; optionally {USERS_FILE} / {ITEMS_FILE} "
       f"with a header naming user / item and one column per attribute")


def find(root=None):
    return common.find_source(root, "interactions", FILE, HOW)


def attribute_arrays(path, side, ids):
    """One attribute table (users.csv or items.csv: a header, the id column named `side`, one
    column per attribute) aligned with `ids` (the log's ids in code order; '' for the padding
    item). Returns {'<side>_attr.<name>': array} plus 'vocab.<name>' for the categorical ones.
    Encoding: a column whose non-empty cells are all finite numbers is numeric -> float32, with
    missing values (an empty cell, or an id without a line) set to the mean of the table's values
    (our choice: a neutral regression target); any other column is categorical -> int64 codes,
    0 = missing, 1.. = the table's distinct values in sorted order, and vocab.<name>[code] names
    the code ('' for 0)."""
    table, first_line = common.read_csv(path)
    if side not in table:
        raise ValueError(f"{path}:1: header names no {side!r} column; expected a header naming "
                         f"{side} (the id, as in {FILE}) and one column per attribute")
    table_ids = common.nonempty_ids(table.pop(side), path, first_line, side)
    repeated = table_ids.duplicated().to_numpy()
    if repeated.any():
        row = int(np.argmax(repeated))
        raise ValueError(f"{path}:{first_line + row}: {side} {table_ids.iloc[row]!r} appears "
                         f"twice; each {side} needs one line")
    row = pd.Index(table_ids).get_indexer(ids)  # -1: no line for this id
    arrays = {}
    for name in table.columns:
        if ":" in name:
            raise ValueError(f"{path}:1: attribute column {name!r} contains ':', which attribute "
                             f"specs (side.name:kind:size) use as a separator; rename it")
        values = table[name].to_numpy(dtype=str)
        filled = values != ""
        numbers = common.finite_numbers(values[filled])
        mine = np.where(row >= 0, values[row] if len(values) else "", "")
        present = mine != ""
        if numbers is not None and len(numbers):
            column = np.full(len(ids), numbers.mean(), dtype=np.float32)
            column[present] = mine[present].astype(np.float64)
        else:
            vocab = np.unique(values[filled])
            column = np.zeros(len(ids), dtype=np.int64)
            column[present] = np.searchsorted(vocab, mine[present]) + 1
            arrays[f"vocab.{name}"] = np.concatenate([[""], vocab]).astype(str)
        arrays[f"{side}_attr.{name}"] = column
    return arrays


def prepare(folder, min_interactions=0):
    path = folder / FILE
    table, first_line = common.read_csv(path, LOG_COLUMNS, text=("user", "item"))
    arrays = common.log_arrays(table, path, first_line, min_interactions)
    user_attrs, item_attrs = (
        attribute_arrays(folder / f, side, arrays[f"{side}_ids"]) if (folder / f).is_file() else {}
        for f, side in ((USERS_FILE, "user"), (ITEMS_FILE, "item")))
    shared = sorted({k.split(".", 1)[1] for k in user_attrs} & {k.split(".", 1)[1] for k in item_attrs})
    if shared:
        raise ValueError(f"{folder / ITEMS_FILE}:1: column(s) {', '.join(shared)} also in "
                         f"{USERS_FILE}; attribute names must differ between the two tables "
                         f"(their vocabularies share one namespace)")
    return {**arrays, **user_attrs, **item_attrs}


def load(root=None, rebuild=False, min_interactions=None, download=None, **unknown):
    """(prepared arrays, source folder); download is ignored (nothing can be downloaded)."""
    if unknown:
        raise ValueError(f"interactions takes no option(s) {', '.join(sorted(unknown))}")
    k = common.check_min_interactions(0 if min_interactions is None else min_interactions)
    folder = find(root)
    sources = [folder / f for f in (FILE, USERS_FILE, ITEMS_FILE)]
    arrays = common.load_prepared("interactions", folder, sources, {"min_interactions": k},
                                  lambda: prepare(folder, k), rebuild)
    return arrays, folder


if __name__ == "__main__":
    common.main(__doc__, lambda args: ("interactions", load(args.data_dir, args.rebuild, args.min_interactions)[0]),
                **{"--min-interactions": {"type": int, "default": None, "help": "the k-core (default 0: none)"}})
