"""
What every preparation script shares: the prepared format and where it is kept, finding a
dataset's files, reading comma-separated files with pandas (errors name file:line), and the two
filters of interaction logs (repeated pairs, the k-core).

The prepared format: one folder per dataset holding log.npz and meta.json.
  log.npz   user [n] int64         user code 0..n_users-1 (codes in ascending id order);
                                   rows in the source file's order
            item [n] int64         item code 1..n_items (ascending id order; 0 is padding)
            timestamp [n]          unix time, int64 (float64 when the source has fractions)
            user_ids [n_users]     each code's id (int64 for ML-1M-format data, else str)
            item_ids [n_items + 1] likewise; [0] is the padding item's (0 or '')
            user_attr.<name> [n_users(, K)], item_attr.<name> [n_items + 1(, K)] (row 0: padding)
            vocab.<name>           names of a categorical attribute's codes, or of a multi-hot
                                   attribute's columns
  meta.json format, dataset, settings (e.g. min_interactions), sources (name, size, mtime_ns
            of each source file), counts.
The folder is written under a temporary name and renamed into place, so a folder under the final
name is always complete; a meta.json that does not match the sources or settings of the current
call gets the dataset prepared again.
"""

import csv
import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

FORMAT_VERSION = 1  # bump whenever log.npz changes meaning: every prepared folder is redone
LOG_FILE, META_FILE = "log.npz", "meta.json"


# ----------------------------------------------------------------------------------------------
# Where things are

def search_path(root, subfolder):
    """Where a dataset's files may be: root (the --data-dir) or root/subfolder, then
    $PLANREC_DATA/subfolder, then ./data/subfolder."""
    folders = []
    if root is not None:
        root = Path(root).expanduser()
        folders += [root, root / subfolder]  # root may be the dataset's folder or its parent
    if os.environ.get("PLANREC_DATA"):
        folders.append(Path(os.environ["PLANREC_DATA"]).expanduser() / subfolder)
    return folders + [Path("data") / subfolder]


def home_folder(root, subfolder):
    """Where a dataset's files belong when none was found: root, else the first default place."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("PLANREC_DATA"):
        return Path(os.environ["PLANREC_DATA"]).expanduser() / subfolder
    return Path("data") / subfolder


def find_source(root, name, wanted, how):
    """Folder holding the file `wanted` of dataset `name`, along search_path; nothing is
    downloaded: a missing file says where it was looked for, how to get it (`how`), where to put it."""
    searched = search_path(root, name)
    for folder in searched:
        if (folder / wanted).is_file():
            return folder
    raise FileNotFoundError(
        f"{name}: {wanted} was not found\n"
        f"  searched: {', '.join(str(f) for f in searched)}\n"
        f"  fix: {how}. Put it in {home_folder(root, name)}/ ; or point --data-dir (root=) at the "
        f"folder holding it, or set PLANREC_DATA=DIR so that DIR/{name}/ holds it.")


def is_writable_dir(folder):
    # Mode bits too, not just os.access: running as root, os.access says yes even for a folder
    # deliberately marked read-only (like the shared data copy), and we must not write there.
    folder = Path(folder)
    return folder.is_dir() and os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def move_into_place(src_dir, dst_dir, last=()):
    """Move src_dir's files into dst_dir; one atomic rename when dst_dir is absent or empty,
    otherwise file by file (each os.replace is atomic), the files in `last` moved last."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    try:
        os.replace(src_dir, dst_dir)
        os.chmod(dst_dir, 0o755)  # mkdtemp made it private
        return
    except OSError:
        pass
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(src_dir.iterdir(), key=lambda f: (f.name in last, f.name)):
        os.replace(f, dst_dir / f.name)


def prepared_dirs(name, source_folder):
    # $PLANREC_CACHE/<name> when set (an explicit choice wins, our choice), else next to the
    # data, else ./data/prepared/<name> (the data folder may be read-only, like the shared copy).
    dirs = [Path(os.environ["PLANREC_CACHE"]).expanduser() / name] if os.environ.get("PLANREC_CACHE") else []
    return dirs + [Path(source_folder) / "prepared", Path("data") / "prepared" / name]


# ----------------------------------------------------------------------------------------------
# The prepared format

def source_identity(paths):
    """Name, size and mtime_ns of each source file (None for an absent optional one): cheap to
    check on every load. An edit that keeps both size and mtime goes unnoticed; rebuild=True
    (--rebuild) prepares again regardless."""
    def identity(path):
        if not path.is_file():
            return {"name": path.name, "size": None, "mtime_ns": None}
        stat = path.stat()
        return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return [identity(Path(p)) for p in paths]


def write_prepared(folder, arrays, meta):
    """Write log.npz and meta.json into a temporary folder beside `folder`, then rename it into
    place: a half-written folder never carries the final name."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", suffix=".part", dir=folder.parent))
    stale = None
    try:
        np.savez(tmp / LOG_FILE, **arrays)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp made it private; prepared data is fine to share
        if folder.exists():  # os.replace cannot replace a non-empty folder: move the old one aside
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", suffix=".old", dir=folder.parent))
            os.replace(folder, stale / folder.name)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    return folder


def read_prepared(folder, expected_meta):
    """log.npz's arrays when folder/meta.json matches expected_meta, else None."""
    try:
        meta = json.loads((Path(folder) / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if any(meta.get(k) != v for k, v in expected_meta.items()):
        return None
    try:
        with np.load(Path(folder) / LOG_FILE, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # damaged: prepare again
        warnings.warn(f"ignoring unreadable prepared data {folder} ({e}); preparing again")
        return None


def load_prepared(name, source_folder, sources, settings, prepare, rebuild=False):
    """The prepared arrays of dataset `name` from the first of prepared_dirs whose meta matches
    the sources and settings; otherwise prepare() (-> dict of arrays), written to the first
    writable place once it has succeeded. rebuild=True prepares again regardless."""
    expected = {"format": FORMAT_VERSION, "dataset": name, "settings": settings,
                "sources": source_identity(sources)}
    expected = json.loads(json.dumps(expected))  # tuples -> lists, as read back from meta.json
    dirs = prepared_dirs(name, source_folder)
    if not rebuild:
        for folder in dirs:
            arrays = read_prepared(folder, expected)
            if arrays is not None:
                return arrays
    arrays = prepare()
    meta = {**expected, "counts": {"interactions": len(arrays["user"]),
                                   "users": len(arrays["user_ids"]), "items": len(arrays["item_ids"]) - 1}}
    for folder in dirs:
        try:
            if folder.parent != Path(source_folder):
                folder.parent.mkdir(parents=True, exist_ok=True)
            if is_writable_dir(folder.parent):
                write_prepared(folder, arrays, meta)
                return arrays
        except OSError:
            pass
    warnings.warn(f"could not write the prepared {name} to any of {[str(d) for d in dirs]}; "
                  f"set PLANREC_CACHE to a writable folder")
    return arrays


# ----------------------------------------------------------------------------------------------
# Comma-separated files

def _lines(path, numbers):
    """{line number: its text} for the wanted 1-based line numbers, in one pass over the file."""
    wanted, found = set(numbers), {}
    with open(path, encoding="utf-8", errors="backslashreplace", newline="") as f:
        for number, line in enumerate(f, 1):
            if number in wanted:
                found[number] = line.rstrip("\r\n")
                if len(found) == len(wanted):
                    break
    return found


def _field_count_error(path, line, text, names):
    found = len(next(csv.reader([text]), [])) or 1  # a blank line is one empty field
    return ValueError(f"{path}:{line}: {text!r}: expected {len(names)} comma-separated fields "
                      f"{','.join(names)}, found {found}")


def read_csv(path, wanted=None, names=None, text=None):
    """A comma-separated file as a pandas DataFrame and the file line of its row 0. Cells are
    kept verbatim ('' for an empty one, no NA guessing); the columns in `text` (default: all)
    are read as str, the others as pandas infers (int64, float64, or str for anything else).
    names=None: the first line is a header naming the columns (any order; `wanted` must be
    among them). Otherwise there is no header and each line has exactly these fields. A line
    with another number of fields raises ValueError naming file:line, its text and the layout."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    header = head.split(b"\n", 1)[0].decode("utf-8-sig", "replace").rstrip("\r")
    if names is None:
        if not header.strip():
            raise ValueError(f"{path}: the file is empty; expected a header line naming the "
                             f"columns {', '.join(wanted or ())}".rstrip())
        names = [n.strip() for n in next(csv.reader([header]))]
        repeated = sorted({n for n in names if names.count(n) > 1})
        missing = [c for c in (wanted or ()) if c not in names]
        if repeated or missing or "" in names:
            problem = (f"names {', '.join(repeated)} twice" if repeated else
                       f"has no column {', '.join(missing)}" if missing else "has an empty name")
            raise ValueError(f"{path}:1: header {header!r} {problem}; expected a header line "
                             f"naming at least {', '.join(wanted or ('the columns',))} (any order)")
        skip, first_line = 1, 2
    else:
        if not head.strip() and len(head) < 1 << 16:
            raise ValueError(f"{path}: the file is empty; expected lines {','.join(names)}")
        skip, first_line = 0, 1
    text = names if text is None else text
    # pandas takes the first data line's field count as the layout (extra fields would become an
    # index), so that line is checked here; later ones with too many fields make pandas fail.
    first = _lines(path, [first_line]).get(first_line, "")
    if first and len(next(csv.reader([first]), [])) > len(names):
        raise _field_count_error(path, first_line, first, names)
    try:
        with warnings.catch_warnings():  # mixed types in a column are dealt with below
            warnings.simplefilter("ignore", pd.errors.DtypeWarning)
            table = pd.read_csv(path, header=None, names=names, skiprows=skip, na_filter=False,
                                skip_blank_lines=False, dtype={c: str for c in text}, index_col=False,
                                encoding="utf-8", encoding_errors="backslashreplace")
    except pd.errors.EmptyDataError:  # a header and nothing else
        table = pd.DataFrame({c: pd.Series([], dtype=str) for c in names})
    except pd.errors.ParserError as e:  # pandas names the line of a line with too many fields
        match = re.search(r"Expected \d+ fields in line (\d+)", str(e))
        if match is None:
            raise ValueError(f"{path}: not readable as comma-separated fields {','.join(names)} "
                             f"({e})") from None
        line = int(match.group(1))
        raise _field_count_error(path, line, _lines(path, [line]).get(line, ""), names) from None
    # A line with too few fields comes back with '' in its last cells: check the lines whose last
    # cell is empty. Blank lines at the very end are no data (our choice, like most readers).
    is_text = lambda c: not pd.api.types.is_numeric_dtype(table[c])
    short = (table[names[-1]] == "").to_numpy() if is_text(names[-1]) else np.zeros(len(table), bool)
    if short.any():
        blank = np.logical_and.reduce([(table[c] == "").to_numpy() if is_text(c) else
                                       np.zeros(len(table), bool) for c in names])
        n_rows = len(table) - int(np.argmin(blank[::-1])) if not blank.all() else 0
        table, short = table.iloc[:n_rows], short[:n_rows]
        suspects = (first_line + np.flatnonzero(short)).tolist()
        texts = _lines(path, suspects)
        for line in suspects:
            if len(next(csv.reader([texts.get(line, "")]), [])) != len(names):
                raise _field_count_error(path, line, texts.get(line, ""), names)
    return table, first_line


def nonempty_ids(values, path, first_line, name):
    """Raise ValueError naming the line of the first empty id in `values` (a column)."""
    empty = (values == "").to_numpy()
    if empty.any():
        raise ValueError(f"{path}:{first_line + int(np.argmax(empty))}: {name} is empty; expected an id")
    return values


def finite_numbers(values):
    """A str array as int64 when all are integers, else float64 when all are finite numbers,
    else None."""
    values = np.asarray(values, dtype=str)
    try:
        return values.astype(np.int64)
    except (ValueError, OverflowError):
        pass
    try:
        numbers = values.astype(np.float64)
    except ValueError:
        return None
    return numbers if np.isfinite(numbers).all() else None


def timestamps(table, path, first_line, name="timestamp"):
    """table[name] as int64 (all integers) or float64 unix times; otherwise ValueError naming the
    first line whose value is not a finite number."""
    values = table[name]
    numbers = (values if pd.api.types.is_numeric_dtype(values) else
               pd.to_numeric(values, errors="coerce")).to_numpy()
    bad = ~np.isfinite(numbers) if numbers.dtype.kind == "f" else np.zeros(len(numbers), bool)
    if bad.any():
        line = first_line + int(np.argmax(bad))
        text = _lines(path, [line]).get(line, "")  # the cell as written ('inf', '', 'yesterday')
        raw = next(csv.reader([text]), [""] * len(table.columns))[list(table.columns).index(name)]
        raise ValueError(f"{path}:{line}: {name} should be a number (unix time), found {raw!r}")
    return numbers


# ----------------------------------------------------------------------------------------------
# Interaction logs: codes, repeated pairs, the k-core

def check_min_interactions(k):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"min_interactions must be an integer >= 0, got {k!r}")
    return int(k)


def drop_duplicate_pairs(user, item, timestamp):
    """Ascending indices of the interactions to keep: of each (user, item) pair only the earliest
    (equal timestamps: the first in the file). user, item: non-negative int codes."""
    key = user.astype(np.int64) * (int(item.max()) + 1 if len(item) else 1) + item
    # Repeats are rare: find the repeated keys with a plain sort (fast), then order only the
    # rows involved (a full lexsort of 22.5M rows costs ~10 s).
    sorted_keys = np.sort(key)
    repeated = np.unique(sorted_keys[1:][sorted_keys[1:] == sorted_keys[:-1]])
    if len(repeated) == 0:
        return np.arange(len(key))
    at = np.minimum(np.searchsorted(repeated, key), len(repeated) - 1)
    involved = np.flatnonzero(repeated[at] == key)
    order = involved[np.lexsort((timestamp[involved], key[involved]))]  # stable: file order on ties
    keep = np.ones(len(key), dtype=bool)
    keep[order[1:][key[order[1:]] == key[order[:-1]]]] = False
    return np.flatnonzero(keep)


def k_core(user, item, k):
    """Ascending indices of the interactions in the maximal k-core: the largest subset in which
    every user and every item has at least k interactions. Peeling everything below k, round
    after round until nothing changes, reaches it (whatever is peeled can belong to no k-core).
    Vectorized: a round is two bincounts over the interactions still kept."""
    rows = np.arange(len(user))
    if k <= 1:  # every user and item in the log has at least one interaction
        return rows
    while True:
        keep = (np.bincount(user)[user] >= k) & (np.bincount(item)[item] >= k)
        if keep.all():
            return rows
        rows, user, item = rows[keep], user[keep], item[keep]


def log_arrays(table, path, first_line, min_interactions):
    """The prepared format's log from a table with columns user, item (str) and timestamp:
    repeated (user, item) pairs dropped keeping the earliest, then the maximal
    min_interactions-core. Ids are text, coded in sorted (UTF-8 byte) order."""
    timestamp = timestamps(table, path, first_line)
    user, user_names = pd.factorize(nonempty_ids(table["user"], path, first_line, "user"), sort=True)
    item, item_names = pd.factorize(nonempty_ids(table["item"], path, first_line, "item"), sort=True)
    n_rows = len(user)
    rows = drop_duplicate_pairs(user, item, timestamp)
    rows = rows[k_core(user[rows], item[rows], min_interactions)]
    if len(rows) == 0:
        raise ValueError(
            f"{path}: no interactions left of {n_rows:,} lines after dropping repeated "
            f"(user, item) pairs and the {min_interactions}-core filter (every user and item "
            f"needs at least {min_interactions} interactions); lower --min-interactions"
            if n_rows else f"{path}: the file holds no interactions")
    kept_users, user = np.unique(user[rows], return_inverse=True)
    kept_items, item = np.unique(item[rows], return_inverse=True)
    return {"user": user.astype(np.int64), "item": item.astype(np.int64) + 1,
            "timestamp": timestamp[rows],
            "user_ids": np.asarray(user_names.take(kept_users), dtype=str),
            "item_ids": np.concatenate([[""], np.asarray(item_names.take(kept_items), dtype=str)])}


def main(description, prepare, **extra):
    """A preparation script: --data-dir, --rebuild and the `extra` options (flag -> argparse
    keywords); prepare(args) -> (name, prepared arrays). Errors a user can cause are one line."""
    import argparse
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="folder holding the dataset's files (or its parent)")
    parser.add_argument("--rebuild", action="store_true", help="prepare again even if prepared")
    for flag, options in extra.items():
        parser.add_argument(flag, **options)
    args = parser.parse_args()
    try:
        name, arrays = prepare(args)
    except (OSError, ValueError, RuntimeError) as err:
        raise SystemExit(f"error: {err}")
    print(f"{name}: prepared {len(arrays['user']):,} interactions, {len(arrays['user_ids']):,} "
          f"users, {len(arrays['item_ids']) - 1:,} items; attributes: "
          f"{', '.join(k for k in arrays if '_attr.' in k) or 'none'}")
