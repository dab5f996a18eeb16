"""
MovieLens-1M: find it (or download the official GroupLens zip, MD5 checked), parse its three
'::'-separated latin-1 files and prepare them (datasets/common.py's format).

  python -m datasets.ml1m [--data-dir DIR] [--no-download] [--rebuild]

The same reader serves any folder in ML-1M's format (the synthetic worlds, test files).
"""

import csv
import hashlib
import io
import os
import re
import shutil
import tempfile
import urllib.request
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from datasets import common

URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
MD5 = "c4d9eecfca2ab87c1945afe126590906"
FILES = ("ratings.dat", "users.dat", "movies.dat")
COUNTS = {"ratings": 1_000_209, "users": 6_040, "movies": 3_706}  # movies = rated movies
AGE_CODES = (1, 18, 25, 35, 45, 50, 56)  # users.dat "Age" codes; we store the band index 0..6
AGE_BANDS = ("Under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
GENDERS = ("F", "M")  # gender attribute: 0 = F, 1 = M

# Tests replace this to simulate offline machines and corrupted downloads without the network.
_urlopen = urllib.request.urlopen


# ----------------------------------------------------------------------------------------------
# Finding and downloading

def contains_ml1m(folder):
    return all((Path(folder) / name).is_file() for name in FILES)


def _how_to_fix(problem, searched, target):
    return (f"{problem}\n"
            f"  searched: {', '.join(str(f) for f in searched)}\n"
            f"  fix: download {URL} (MD5 {MD5}), unzip it and put ratings.dat, users.dat "
            f"and movies.dat in {target}/ ; or point --data-dir (root=) at a folder holding them, "
            f"or set PLANREC_DATA=DIR so that DIR/ml-1m/ holds them.")


def _download(target, searched):
    """The official zip into target/, MD5 checked; nothing is left behind when anything fails."""
    target = Path(target)
    tmp_zip = tmp_dir = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not common.is_writable_dir(target.parent):
            raise PermissionError(f"{target.parent} is not writable")
        # Temporary files sit beside the target (same file system, so the final rename is atomic)
        # and are removed in `finally`: an interrupted download leaves nothing half-written.
        fd, tmp_zip = tempfile.mkstemp(prefix=".ml-1m-", suffix=".zip.part", dir=target.parent)
        md5 = hashlib.md5()
        with os.fdopen(fd, "wb") as out, _urlopen(URL, timeout=60) as response:
            total = int(getattr(response, "headers", {}).get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="ml-1m.zip") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    md5.update(chunk)
                    bar.update(len(chunk))
        if md5.hexdigest() != MD5:
            raise RuntimeError(f"MD5 mismatch: got {md5.hexdigest()}, expected {MD5} "
                               f"(corrupted transfer or a changed archive)")
        tmp_dir = tempfile.mkdtemp(prefix=".ml-1m-", dir=target.parent)
        with zipfile.ZipFile(tmp_zip) as archive:
            archive.extractall(tmp_dir)
        extracted = next((d for d in (Path(tmp_dir) / "ml-1m", Path(tmp_dir)) if contains_ml1m(d)), None)
        if extracted is None:
            raise RuntimeError("the archive does not contain ml-1m/{ratings,users,movies}.dat")
        common.move_into_place(extracted, target, last=FILES)
    except Exception as e:
        raise RuntimeError(_how_to_fix(f"MovieLens-1M was not found and downloading {URL} "
                                       f"into {target} failed: {type(e).__name__}: {e}",
                                       searched, target)) from e
    finally:
        if tmp_zip is not None and os.path.exists(tmp_zip):
            os.remove(tmp_zip)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def find(root=None, download=True):
    """Folder holding ratings.dat, users.dat, movies.dat. Looks in root (the --data-dir, or its
    ml-1m/ subfolder), then $PLANREC_DATA/ml-1m, then ./data/ml-1m; downloads if absent."""
    searched = common.search_path(root, "ml-1m")
    for folder in searched:
        if contains_ml1m(folder):
            return folder
    target = common.home_folder(root, "ml-1m")
    if not download:
        raise FileNotFoundError(_how_to_fix("MovieLens-1M was not found (download=False).",
                                            searched, target))
    _download(target, searched)
    return target


# ----------------------------------------------------------------------------------------------
# Reading the three ::-separated files

def _as_gender(value):
    return GENDERS.index(value)


def _as_age_band(value):
    return AGE_CODES.index(int(value))


RATINGS_FORMAT = ("UserID::MovieID::Rating::Timestamp", [(int, "an integer")] * 4)
USERS_FORMAT = ("UserID::Gender::Age::Occupation::Zip",
                [(int, "an integer"), (_as_gender, "F or M"),
                 (_as_age_band, f"one of the age codes {AGE_CODES}"), (int, "an integer"), (str, "text")])
MOVIES_FORMAT = ("MovieID::Title::Genres", [(int, "an integer"), (str, "text"), (str, "text")])


def _parse_strict(path, file_format):
    """Line-by-line parser that stops at the first malformed line with file:line: content and
    what was expected. Used for the small files, and to locate the error in ratings.dat."""
    layout, converters = file_format
    names = layout.split("::")
    text = Path(path).read_text(encoding="latin-1").rstrip()
    if not text:
        raise ValueError(f"{path}: the file is empty; expected lines {layout}")
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split("::")
        if len(fields) != len(names):
            raise ValueError(f"{path}:{lineno}: {line!r}: expected {len(names)} '::'-separated "
                             f"fields {layout}, found {len(fields)}")
        row = []
        for name, (convert, expected), value in zip(names, converters, fields):
            try:
                row.append(convert(value))
            except (ValueError, KeyError):
                raise ValueError(f"{path}:{lineno}: {line!r}: {name} should be {expected}, "
                                 f"found {value!r}") from None
        rows.append(row)
    return rows


def _read_ratings(path):
    # Fast path (1M lines in ~0.4 s): pandas' C parser, '::' turned into one tab. Anything it
    # rejects (a short or long line, a non-integer, a blank line) sends us to the strict parser,
    # which names the line.
    raw = Path(path).read_bytes().rstrip()
    try:
        table = pd.read_csv(io.BytesIO(raw.replace(b"::", b"\t")), sep="\t", header=None,
                            names=["user", "item", "rating", "timestamp"], dtype=np.int64,
                            na_filter=False, skip_blank_lines=False, quoting=csv.QUOTE_NONE, engine="c")
        ok = len(table) == raw.count(b"\n") + 1 and bool(raw)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        ok = False
    if not ok:
        table = pd.DataFrame(_parse_strict(path, RATINGS_FORMAT),
                             columns=["user", "item", "rating", "timestamp"], dtype=np.int64)
    return {k: table[k].to_numpy(np.int64) for k in table}


def _check_unique(path, ids, what):
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        line = np.flatnonzero(ids == dup)[1] + 1
        raise ValueError(f"{path}:{line}: {what} {dup} appears twice; each {what} needs one line")


def read_movielens(folder, expected_counts=COUNTS):
    """Parse ratings.dat, users.dat, movies.dat of an ML-1M-format folder into dicts of arrays:
    ratings {user, item, rating, timestamp} in file order; users {user_id, gender (0=F, 1=M),
    age (band index 0..6), occupation}; movies {movie_id, title, genres (list of lists), year}.
    Counts differing from expected_counts give one warning (None: no check, for other data)."""
    folder = Path(folder)
    ratings = _read_ratings(folder / "ratings.dat")
    user_rows = _parse_strict(folder / "users.dat", USERS_FORMAT)
    users = {k: np.array([r[j] for r in user_rows], dtype=np.int64)
             for j, k in enumerate(("user_id", "gender", "age", "occupation"))}
    movie_rows = _parse_strict(folder / "movies.dat", MOVIES_FORMAT)
    years = [re.search(r"\((\d{4})\)\s*$", r[1]) for r in movie_rows]
    movies = {"movie_id": np.array([r[0] for r in movie_rows], dtype=np.int64),
              "title": [r[1] for r in movie_rows],
              "genres": [[g for g in r[2].split("|") if g] for r in movie_rows],
              # 0 = unknown year (a title without "(YYYY)" at the end); our choice, not an error
              "year": np.array([int(m.group(1)) if m else 0 for m in years], dtype=np.int64)}
    _check_unique(folder / "users.dat", users["user_id"], "UserID")
    _check_unique(folder / "movies.dat", movies["movie_id"], "MovieID")
    for key, known, other in (("user", users["user_id"], "users.dat"),
                              ("item", movies["movie_id"], "movies.dat")):
        unknown = ~np.isin(ratings[key], known)
        if unknown.any():
            line = np.flatnonzero(unknown)[0]
            raise ValueError(f"{folder / 'ratings.dat'}:{line + 1}: rates {key} "
                             f"{ratings[key][line]}, which is not in {other}; the three files "
                             f"must come from the same copy of the data set")
    if expected_counts is not None:
        found = {"ratings": len(ratings["user"]), "users": len(np.unique(ratings["user"])),
                 "movies": len(np.unique(ratings["item"]))}
        if found != expected_counts:
            warnings.warn(f"{folder}: {found['ratings']:,} ratings, {found['users']:,} users, "
                          f"{found['movies']:,} rated movies; canonical MovieLens-1M has "
                          f"{expected_counts['ratings']:,}, {expected_counts['users']:,}, "
                          f"{expected_counts['movies']:,}. Continuing (a filtered copy?), but "
                          f"results will not be comparable to the paper's.")
    return ratings, users, movies


def prepare(folder, expected_counts=COUNTS):
    """The prepared format's arrays of an ML-1M-format folder: every rating (the rating value is
    dropped: implicit feedback), users and rated movies coded in ascending id order, user gender,
    age band, occupation, item genres (multi-hot over every genre in movies.dat) and year."""
    ratings, users, movies = read_movielens(folder, expected_counts)
    user_ids, user = np.unique(ratings["user"], return_inverse=True)
    item_ids, item = np.unique(ratings["item"], return_inverse=True)
    user_row = pd.Index(users["user_id"]).get_indexer(user_ids)  # every one is there (checked)
    movie_row = pd.Index(movies["movie_id"]).get_indexer(item_ids)
    genre_names = sorted({g for genres in movies["genres"] for g in genres})
    column = {g: j for j, g in enumerate(genre_names)}
    hits = [(i, column[g]) for i, row in enumerate(movie_row, 1) for g in movies["genres"][row]]
    genres = np.zeros((len(item_ids) + 1, len(genre_names)), dtype=np.float32)  # row 0: padding
    if hits:
        genres[tuple(np.array(hits).T)] = 1.0
    year = np.zeros(len(item_ids) + 1, dtype=np.float32)
    year[1:] = movies["year"][movie_row]
    return {"user": user.astype(np.int64), "item": item.astype(np.int64) + 1,
            "timestamp": ratings["timestamp"], "user_ids": user_ids,
            "item_ids": np.concatenate([[0], item_ids]),
            **{f"user_attr.{k}": users[k][user_row] for k in ("gender", "age", "occupation")},
            "item_attr.genres": genres, "item_attr.year": year,
            "vocab.genres": np.array(genre_names, dtype=str),
            "vocab.gender": np.array(GENDERS), "vocab.age": np.array(AGE_BANDS)}


def load(root=None, download=True, rebuild=False, min_interactions=None, **unknown):
    """(prepared arrays, source folder) of MovieLens-1M, prepared first when needed."""
    if unknown:
        raise ValueError(f"ml-1m takes no option(s) {', '.join(sorted(unknown))}")
    if min_interactions not in (0, None):
        raise ValueError("--min-interactions (min_interactions) applies to amazon-book and "
                         "interactions; ml-1m is used as it is (every user keeps all ratings)")
    folder = find(root, download)
    arrays = common.load_prepared("ml-1m", folder, [folder / f for f in FILES], {},
                                  lambda: prepare(folder), rebuild)
    return arrays, folder


if __name__ == "__main__":
    common.main(__doc__, lambda args: ("ml-1m", load(args.data_dir, not args.no_download, args.rebuild)[0]),
                **{"--no-download": {"action": "store_true", "help": "fail instead of downloading"}})
