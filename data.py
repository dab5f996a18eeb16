"""
Data for PlanRec: MovieLens-1M, a synthetic world with known latent structure, Amazon-Book
(16-core, from the user's copy of the public ratings file) and any interaction log
(interactions.csv), turned into training batches and ranking-evaluation candidates under the
paper's protocol (§3.1), plus the ranking metrics and the popularity baseline.

Amazon-Book and interaction logs: repeated (user, item) pairs are dropped keeping the earliest,
then the maximal k-core is kept (every user and item with at least k interactions; k = 16 for
Amazon-Book as in the paper), then the protocol below applies unchanged.

Protocol (paper §3.1 "Evaluation Protocol" / "Implementation Details", DIN/NCF-style ranking):
  - every rating is an implicit positive interaction;
  - per user, interactions are sorted by timestamp (stable: ties keep file order);
  - the last interaction is the test target, scored against 100 sampled items the user never
    consumed; AUC, Recall@5/10, NDCG@5/10;
  - the user feature is the last 50 clicked items (HISTORY_LEN), left-padded with item 0;
  - the second-to-last interaction is a validation target. The paper has NO validation set; we
    add one for model selection (our choice) so that the test target is never used to tune.

Table 4(b)'s protocol (§3.3.2), ML-1M-format data only, `protocol="halves"`: each user's sequence
is split in the middle (the first L // 2 items, the rest), "the first half of behaviors for
training, and the second half of behaviors for testing". The paper does not say how the second
half is scored; our choice keeps one ranking per user like the protocol above: the test target is
the user's last item (the end of the second half, 50 items of history before it, mostly second
half), the validation target the last item of the first half, and no second-half item is ever a
training target. `users="iid"|"ood"` keeps only the users whose interest consistency
(`interest_consistency`) is at least / below the mean over all users, the paper's two datasets.

Everything derived (sequences, splits, evaluation candidates, attributes) is cached in one .npz
keyed by the content of the source files and the protocol settings.
"""

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm import tqdm

HISTORY_LEN = 50  # paper: "the embeddings of the last 50 clicked items as the user feature"
ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
ML1M_MD5 = "c4d9eecfca2ab87c1945afe126590906"
ML1M_FILES = ("ratings.dat", "users.dat", "movies.dat")
ML1M_COUNTS = {"ratings": 1_000_209, "users": 6_040, "movies": 3_706}  # movies = rated movies
ML1M_AGE_CODES = (1, 18, 25, 35, 45, 50, 56)  # users.dat "Age" codes; we store the band index 0..6
ML1M_AGE_BANDS = ("Under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
GENDERS = ("F", "M")  # gender attribute: 0 = F, 1 = M
MIN_INTERACTIONS = 3  # a user needs a training item, a validation target and a test target
# protocol "halves": a first half of at least 3 (history, training target, validation target)
MIN_INTERACTIONS_HALVES = 6
PROTOCOLS = ("leave-last", "halves")
USER_GROUPS = ("all", "iid", "ood")  # Table 4(b): users split by interest consistency
PROTOCOL_VERSION = 2  # bump whenever the derived arrays change meaning; invalidates every cache


def check_resplit(protocol, users):
    """Table 4(b)'s settings: raise a ValueError naming the choices for an unknown one."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if users not in USER_GROUPS:
        raise ValueError(f"unknown user group {users!r}; choose one of {', '.join(USER_GROUPS)}")
DATASETS = ("ml-1m", "synthetic", "synthetic-ood", "amazon-book", "interactions")
# Amazon-Book: the "ratings only" Books file of the Amazon review data (McAuley et al., 2014
# release); 22,507,155 lines user,item,rating,timestamp, no header. Not downloadable here and
# not ours to redistribute: the user supplies it.
AMAZON_BOOK_FILE = "ratings_Books.csv"
AMAZON_BOOK_PAGE = "http://jmcauley.ucsd.edu/data/amazon/"
AMAZON_BOOK_COLUMNS = ("user", "item", "rating", "timestamp")  # rating is ignored: implicit feedback
INTERACTIONS_FILE, USERS_FILE, ITEMS_FILE = "interactions.csv", "users.csv", "items.csv"
LOG_COLUMNS = ("user", "item", "timestamp")
DEFAULT_MIN_INTERACTIONS = {"amazon-book": 16, "interactions": 0}  # paper: Amazon-Book 16-core
FULL_HASH_BYTES = 64 << 20  # source files up to this size are content-hashed for the cache key
FINGERPRINT_BLOCKS = 64  # larger ones: size, mtime and this many sampled 64 KiB blocks

# Tests replace this to simulate offline machines and corrupted downloads without the network.
_urlopen = urllib.request.urlopen


# ----------------------------------------------------------------------------------------------
# Finding and downloading MovieLens-1M

def _contains_ml1m(folder):
    return all((Path(folder) / name).is_file() for name in ML1M_FILES)


def _search_path(root, subfolder):
    """Where a dataset's files may be: root (the --data-dir) or root/subfolder, then
    $PLANREC_DATA/subfolder, then ./data/subfolder."""
    folders = []
    if root is not None:
        root = Path(root).expanduser()
        folders += [root, root / subfolder]  # root may be the dataset's folder or its parent
    if os.environ.get("PLANREC_DATA"):
        folders.append(Path(os.environ["PLANREC_DATA"]).expanduser() / subfolder)
    folders.append(Path("data") / subfolder)
    return folders


def _home_folder(root, subfolder):
    """Where a dataset's files belong when none was found: root, else the first default place."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("PLANREC_DATA"):
        return Path(os.environ["PLANREC_DATA"]).expanduser() / subfolder
    return Path("data") / subfolder


def _ml1m_search_path(root):
    return _search_path(root, "ml-1m")


def _download_target(root):
    return _home_folder(root, "ml-1m")


def _how_to_fix(problem, searched, target):
    return (f"{problem}\n"
            f"  searched: {', '.join(str(f) for f in searched)}\n"
            f"  fix: download {ML1M_URL} (MD5 {ML1M_MD5}), unzip it and put ratings.dat, users.dat "
            f"and movies.dat in {target}/ ; or point --data-dir (root=) at a folder holding them, "
            f"or set PLANREC_DATA=DIR so that DIR/ml-1m/ holds them.")


def _is_writable_dir(folder):
    # Mode bits too, not just os.access: running as root, os.access says yes even for a folder
    # deliberately marked read-only (like the shared data copy), and we must not write there.
    folder = Path(folder)
    return folder.is_dir() and os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def _move_into_place(src_dir, dst_dir, last=ML1M_FILES):
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
    files = sorted(src_dir.iterdir(), key=lambda f: (f.name in last, f.name))
    for f in files:
        os.replace(f, dst_dir / f.name)


def _download_ml1m(target, searched):
    target = Path(target)
    tmp_zip = tmp_dir = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not _is_writable_dir(target.parent):
            raise PermissionError(f"{target.parent} is not writable")
        # Temporary files sit beside the target (same file system, so the final rename is atomic)
        # and are removed in `finally`: an interrupted download leaves nothing half-written.
        fd, tmp_zip = tempfile.mkstemp(prefix=".ml-1m-", suffix=".zip.part", dir=target.parent)
        md5 = hashlib.md5()
        with os.fdopen(fd, "wb") as out, _urlopen(ML1M_URL, timeout=60) as response:
            total = int(getattr(response, "headers", {}).get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="ml-1m.zip") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    md5.update(chunk)
                    bar.update(len(chunk))
        if md5.hexdigest() != ML1M_MD5:
            raise RuntimeError(f"MD5 mismatch: got {md5.hexdigest()}, expected {ML1M_MD5} "
                               f"(corrupted transfer or a changed archive)")
        tmp_dir = tempfile.mkdtemp(prefix=".ml-1m-", dir=target.parent)
        with zipfile.ZipFile(tmp_zip) as archive:
            archive.extractall(tmp_dir)
        extracted = next((d for d in (Path(tmp_dir) / "ml-1m", Path(tmp_dir)) if _contains_ml1m(d)),
                         None)
        if extracted is None:
            raise RuntimeError("the archive does not contain ml-1m/{ratings,users,movies}.dat")
        _move_into_place(extracted, target)
    except Exception as e:
        raise RuntimeError(_how_to_fix(f"MovieLens-1M was not found and downloading {ML1M_URL} "
                                       f"into {target} failed: {type(e).__name__}: {e}",
                                       searched, target)) from e
    finally:
        if tmp_zip is not None and os.path.exists(tmp_zip):
            os.remove(tmp_zip)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def find_ml1m(root=None, download=True):
    """Folder holding ratings.dat, users.dat, movies.dat. Looks in root (the --data-dir, or its
    ml-1m/ subfolder), then $PLANREC_DATA/ml-1m, then ./data/ml-1m; downloads if absent."""
    searched = _ml1m_search_path(root)
    for folder in searched:
        if _contains_ml1m(folder):
            return folder
    target = _download_target(root)
    if not download:
        raise FileNotFoundError(_how_to_fix("MovieLens-1M was not found (download=False).",
                                            searched, target))
    _download_ml1m(target, searched)
    return target


# ----------------------------------------------------------------------------------------------
# Reading the three ::-separated files

def _as_int(value):
    return int(value)


def _as_gender(value):
    return GENDERS.index(value)


def _as_age_band(value):
    return ML1M_AGE_CODES.index(int(value))


RATINGS_FORMAT = ("UserID::MovieID::Rating::Timestamp", [(_as_int, "an integer")] * 4)
USERS_FORMAT = ("UserID::Gender::Age::Occupation::Zip",
                [(_as_int, "an integer"), (_as_gender, "F or M"),
                 (_as_age_band, f"one of the age codes {ML1M_AGE_CODES}"),
                 (_as_int, "an integer"), (str, "text")])
MOVIES_FORMAT = ("MovieID::Title::Genres", [(_as_int, "an integer"), (str, "text"), (str, "text")])


def _parse_strict(path, file_format, encoding):
    """Line-by-line parser that stops at the first malformed line with file:line: content and
    what was expected. Used for the small files, and to locate the error in ratings.dat."""
    layout, converters = file_format
    names = layout.split("::")
    text = Path(path).read_text(encoding=encoding).rstrip()
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
    # Fast path (1M lines in ~0.5 s): numpy's C parser on the whole file. Anything it rejects,
    # or blank lines it would silently skip, sends us to the strict parser to name the line.
    raw = Path(path).read_bytes().rstrip()
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n")
    n_lines = raw.count(b"\n") + 1
    try:
        if not raw:
            raise ValueError("empty file")
        table = np.loadtxt(io.BytesIO(raw.replace(b"::", b"\t")), delimiter="\t", dtype=np.int64,
                           comments=None, ndmin=2)
        ok = table.shape == (n_lines, 4)
    except ValueError as e:
        ok, reason = False, e
    if not ok:
        table = np.array(_parse_strict(path, RATINGS_FORMAT, "latin-1"), dtype=np.int64)
        if table.shape != (n_lines, 4):  # strict parser found nothing; should not happen
            raise ValueError(f"{path}: could not parse as {RATINGS_FORMAT[0]} ({reason})")
    return {"user": table[:, 0], "item": table[:, 1], "rating": table[:, 2],
            "timestamp": table[:, 3]}


def _check_unique(path, ids, what):
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        line = np.flatnonzero(ids == dup)[1] + 1
        raise ValueError(f"{path}:{line}: {what} {dup} appears twice; each {what} needs one line")


def read_movielens(folder, expected_counts=ML1M_COUNTS):
    """Parse ratings.dat, users.dat, movies.dat of an ML-1M-format folder into dicts of arrays:
    ratings {user, item, rating, timestamp} in file order; users {user_id, gender (0=F, 1=M),
    age (band index 0..6), occupation}; movies {movie_id, title, genres (list of lists), year}.
    Counts differing from expected_counts give one warning (None: no check, for other data)."""
    folder = Path(folder)
    ratings = _read_ratings(folder / "ratings.dat")
    user_rows = _parse_strict(folder / "users.dat", USERS_FORMAT, "latin-1")
    users = {"user_id": np.array([r[0] for r in user_rows], dtype=np.int64),
             "gender": np.array([r[1] for r in user_rows], dtype=np.int64),
             "age": np.array([r[2] for r in user_rows], dtype=np.int64),
             "occupation": np.array([r[3] for r in user_rows], dtype=np.int64)}
    movie_rows = _parse_strict(folder / "movies.dat", MOVIES_FORMAT, "latin-1")
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


# ----------------------------------------------------------------------------------------------
# Comma-separated interaction logs: Amazon-Book and the generic interactions.csv
#
# The reader works on the whole file as one byte array: the separators are found with numpy, every
# line is checked to have the expected number of fields, and the wanted columns are copied into
# fixed-width byte-string arrays ('S<w>'). The same reader serves the 0.9 GB Amazon file and the
# small attribute tables. Plain CSV only: no quoting, fields are taken verbatim (no trimming),
# '\n' or '\r\n' line ends, UTF-8.

NEWLINE, COMMA, CARRIAGE_RETURN = 10, 44, 13
SEPARATOR_CHUNK = 1 << 26  # bytes scanned per step: bounds the temporaries of the separator scan
MAX_COLUMN_BYTES = 2 << 30  # one fixed-width column of a huge file must fit comfortably in memory


def _read_bytes(path):
    """The file as a uint8 array ending in exactly one newline (trailing blank lines dropped)."""
    size = path.stat().st_size
    buf = np.empty(size + 1, dtype=np.uint8)
    with open(path, "rb") as f:
        if f.readinto(memoryview(buf)[:size]) != size:
            raise OSError(f"{path}: the file changed while it was read")
    end = size
    while end and int(buf[end - 1]) in b" \t\r\n":
        end -= 1
    buf[end] = NEWLINE
    return buf[:end + 1]


def _separator_positions(body):
    parts = [np.flatnonzero((part == COMMA) | (part == NEWLINE)) + start
             for start in range(0, len(body), SEPARATOR_CHUNK)
             for part in [body[start:start + SEPARATOR_CHUNK]]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _fixed_width(body, start, end, path, first_line, name):
    """Fields body[start:end] as one 'S<w>' array (w = the longest; shorter ones NUL-padded,
    which numpy's bytes strings ignore). One vectorized pass per byte column."""
    lengths = end - start
    width = max(int(lengths.max()), 1) if len(lengths) else 1
    if len(lengths) * width > MAX_COLUMN_BYTES:
        row = int(np.argmax(lengths))
        raise ValueError(f"{path}:{first_line + row}: {name} is {width} bytes long; this reader "
                         f"stores a column at the width of its longest field, which would take "
                         f"{len(lengths) * width / 2**30:.1f} GiB for {len(lengths):,} lines")
    out = np.zeros((len(lengths), width), dtype=np.uint8)
    for k in range(width):
        pos = start + k
        out[:, k] = np.where(pos < end, body[np.minimum(pos, end)], 0)  # body[end] exists: a separator
    return out.view(f"S{width}").ravel()


def read_csv(path, wanted=None, names=None):
    """Read a plain comma-separated file into {column name: [n_rows] 'S<w>' bytes array} and the
    file line number of row 0. names=None: the first line is a header naming the columns (any
    order; columns not in `wanted` are ignored; wanted=None keeps all). Otherwise the file has no
    header and exactly len(names) fields per line. A line with another number of fields raises
    ValueError naming file:line, its text and the layout expected."""
    path = Path(path)
    buf = _read_bytes(path)
    if names is None:
        header_end = buf[:1 << 20].tobytes().find(b"\n")  # the first MiB, not a scan of the file
        if header_end < 0:
            header_end = int(np.argmax(buf == NEWLINE))
        header = buf[:header_end].tobytes().decode("utf-8-sig", "replace").rstrip("\r")
        if not header:
            raise ValueError(f"{path}: the file is empty; expected a header line naming the "
                             f"columns {', '.join(wanted or ())}".rstrip())
        names = [n.strip() for n in header.split(",")]
        repeated = sorted({n for n in names if names.count(n) > 1})
        missing = [c for c in (wanted or ()) if c not in names]
        if repeated or missing or "" in names:
            problem = (f"names {', '.join(repeated)} twice" if repeated else
                       f"has no column {', '.join(missing)}" if missing else "has an empty name")
            raise ValueError(f"{path}:1: header {header!r} {problem}; expected a header line "
                             f"naming at least {', '.join(wanted or ('the columns',))} (any order)")
        body, first_line = buf[header_end + 1:], 2
    else:
        if len(buf) == 1:
            raise ValueError(f"{path}: the file is empty; expected lines {','.join(names)}")
        body, first_line = buf, 1
    n_fields, layout = len(names), ",".join(names)
    wanted = list(names) if wanted is None else list(wanted)
    if len(body) == 0:
        return {name: np.zeros(0, dtype="S1") for name in wanted}, first_line

    separators = _separator_positions(body)
    is_newline = body[separators] == NEWLINE
    n_rows = int(is_newline.sum())
    if len(separators) != n_rows * n_fields or not is_newline[n_fields - 1::n_fields].all():
        line_ends = np.flatnonzero(is_newline)
        fields = np.diff(line_ends, prepend=-1)  # separators per line, its newline included
        bad = int(np.flatnonzero(fields != n_fields)[0])
        start = separators[line_ends[bad - 1]] + 1 if bad else 0
        text = body[start:separators[line_ends[bad]]].tobytes().decode("utf-8", "replace").rstrip("\r")
        hint = " (quoted fields are not supported)" if '"' in text else ""
        raise ValueError(f"{path}:{first_line + bad}: {text!r}: expected {n_fields} comma-separated "
                         f"fields {layout}{hint}, found {fields[bad]}")
    grid = separators.reshape(n_rows, n_fields)
    del separators, is_newline
    columns = {}
    for j, name in enumerate(names):
        if name not in wanted:
            continue
        start = grid[:, j - 1] + 1 if j else np.concatenate([[0], grid[:-1, -1] + 1])
        end = grid[:, j]
        if j == n_fields - 1:  # '\r\n' line ends
            end = end - ((end > start) & (body[end - 1] == CARRIAGE_RETURN))
        columns[name] = _fixed_width(body, start, end, path, first_line, name)
    return columns, first_line


def _nonempty_ids(values, path, first_line, name):
    empty = values == b""
    if empty.any():
        raise ValueError(f"{path}:{first_line + int(np.argmax(empty))}: {name} is empty; "
                         f"expected an id")
    return values


def _finite_numbers(values):
    """values ('S' array) as int64 when all are integers, else float64 when all are finite
    numbers, else None."""
    try:
        return values.astype(np.int64)
    except (ValueError, OverflowError):
        pass
    try:
        numbers = values.astype(np.float64)
    except ValueError:
        return None
    return numbers if np.isfinite(numbers).all() else None


def _timestamps(values, path, first_line, name="timestamp"):
    numbers = _finite_numbers(values)
    if numbers is not None:
        return numbers
    # The error path: find the first bad line, a block at a time, then within the block.
    block = 1 << 16
    start = next(s for s in range(0, len(values), block) if _finite_numbers(values[s:s + block]) is None)
    row = next(r for r in range(start, start + block) if _finite_numbers(values[r:r + 1]) is None)
    raise ValueError(f"{path}:{first_line + row}: {name} should be a number (unix time), "
                     f"found {values[row].decode('utf-8', 'replace')!r}")


def _as_text(values):
    """'S' array -> str array (ASCII fast path; other UTF-8 decoded, undecodable bytes escaped)."""
    try:
        return values.astype(str)
    except UnicodeDecodeError:
        return np.char.decode(values, "utf-8", errors="backslashreplace")


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
    involved = np.flatnonzero(_contains(repeated, key))
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


def _attribute_arrays(path, side, ids):
    """One optional attribute table (users.csv or items.csv: a header, the id column named
    `side`, one column per attribute) aligned with `ids` (the data's raw ids in RecData order,
    'S' bytes; b"" for the item padding row). Returns {'<side>_attr.<name>': array} plus
    'vocab.<name>' for the categorical ones. Encoding: a column whose non-empty cells are all
    finite numbers is numeric -> float32, with missing values (an empty cell, or an id without
    a line) set to the mean of the table's values (our choice: a neutral regression target);
    any other column is categorical -> int64 codes, 0 = missing, 1.. = the table's distinct
    values in sorted order, and vocab.<name>[code] names the code ('' for 0)."""
    columns, first_line = read_csv(path, None)
    if side not in columns:
        raise ValueError(f"{path}:1: header names no {side!r} column; expected a header naming "
                         f"{side} (the id, as in interactions.csv) and one column per attribute")
    table_ids = _nonempty_ids(columns.pop(side), path, first_line, side)
    order = np.argsort(table_ids, kind="stable")
    sorted_ids = table_ids[order]
    repeated = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if len(repeated):
        row = int(order[repeated[0] + 1])
        raise ValueError(f"{path}:{first_line + row}: {side} {table_ids[row].decode('utf-8', 'backslashreplace')!r} "
                         f"appears twice; each {side} needs one line")
    at = np.minimum(np.searchsorted(sorted_ids, ids), max(len(sorted_ids) - 1, 0))
    found = sorted_ids[at] == ids if len(sorted_ids) else np.zeros(len(ids), dtype=bool)
    row = order[at] if len(sorted_ids) else at
    arrays = {}
    for name, values in columns.items():
        if ":" in name:
            raise ValueError(f"{path}:1: attribute column {name!r} contains ':', which attribute "
                             f"specs (side.name:kind:size) use as a separator; rename it")
        filled = values != b""
        numbers = _finite_numbers(values[filled])
        mine = values[row] if len(values) else np.zeros(len(ids), dtype="S1")
        present = found & (mine != b"")
        if numbers is not None and len(numbers):
            column = np.full(len(ids), numbers.mean(), dtype=np.float32)
            column[present] = mine[present].astype(np.float64)
        else:
            vocab = np.unique(values[filled])
            column = np.zeros(len(ids), dtype=np.int64)
            column[present] = np.searchsorted(vocab, mine[present]) + 1
            arrays[f"vocab.{name}"] = np.concatenate([[""], _as_text(vocab)]).astype(str)
        arrays[f"{side}_attr.{name}"] = column
    return arrays


def _build_log(name, folder, min_interactions, seed, n_eval_negatives):
    """Everything derived from an interaction log (amazon-book or interactions), as the cache
    stores it: duplicates dropped, the k-core, then the same protocol as ML-1M."""
    if name == "amazon-book":
        path = Path(folder) / AMAZON_BOOK_FILE
        columns, first_line = read_csv(path, LOG_COLUMNS, names=AMAZON_BOOK_COLUMNS)
    else:
        path = Path(folder) / INTERACTIONS_FILE
        columns, first_line = read_csv(path, LOG_COLUMNS)
    timestamp = _timestamps(columns.pop("timestamp"), path, first_line)
    # Ids are compared as bytes; sorted unique ids give users and items in ascending id order.
    user_names, user = np.unique(_nonempty_ids(columns.pop("user"), path, first_line, "user"),
                                 return_inverse=True)
    item_names, item = np.unique(_nonempty_ids(columns.pop("item"), path, first_line, "item"),
                                 return_inverse=True)
    n_rows = len(user)
    rows = drop_duplicate_pairs(user, item, timestamp)
    rows = rows[k_core(user[rows], item[rows], min_interactions)]
    if len(rows) == 0:
        raise ValueError(
            f"{path}: no interactions left of {n_rows:,} lines after dropping repeated "
            f"(user, item) pairs and the {min_interactions}-core filter (every user and item "
            f"needs at least {min_interactions} interactions); lower --min-interactions"
            if n_rows else f"{path}: the file holds no interactions")
    arrays = _protocol_arrays(user[rows], item[rows], timestamp[rows], seed, n_eval_negatives, path,
                              user_names)
    user_ids = user_names[arrays["raw_user_ids"]]
    item_ids = np.concatenate([[b""], item_names[arrays["raw_item_ids"][1:]]])
    arrays["raw_user_ids"], arrays["raw_item_ids"] = _as_text(user_ids), _as_text(item_ids)
    if name == "interactions":
        user_attrs, item_attrs = (
            _attribute_arrays(Path(folder) / f, side, ids) if (Path(folder) / f).is_file() else {}
            for f, side, ids in ((USERS_FILE, "user", user_ids), (ITEMS_FILE, "item", item_ids)))
        shared = sorted({k.split(".", 1)[1] for k in user_attrs} & {k.split(".", 1)[1] for k in item_attrs})
        if shared:
            raise ValueError(f"{Path(folder) / ITEMS_FILE}:1: column(s) {', '.join(shared)} also "
                             f"in {USERS_FILE}; attribute names must differ between the two "
                             f"tables (their vocabularies share one namespace)")
        arrays.update(user_attrs)
        arrays.update(item_attrs)
    return arrays


# ----------------------------------------------------------------------------------------------
# The protocol: sequences, splits, negatives

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
        keep = ~_contains(sorted_keys, todo[:, None] * (n_items + 1) + draws)
        # Mark repeats within a row: a stable sort keeps the first occurrence in front.
        order = np.argsort(draws, axis=1, kind="stable")
        sorted_draws = np.take_along_axis(draws, order, axis=1)
        repeat = np.zeros_like(keep)
        np.put_along_axis(repeat, order[:, 1:], sorted_draws[:, 1:] == sorted_draws[:, :-1], axis=1)
        keep &= ~repeat
        done = keep.sum(axis=1) >= k
        first_k = np.argsort(~keep[done], axis=1, kind="stable")[:, :k]
        out[todo[done]] = np.take_along_axis(draws[done], first_k, axis=1)
        todo, size = todo[~done], size * 2
    return out


def _protocol_arrays(user_raw, item_raw, timestamp, seed, n_eval_negatives, folder, user_names=None,
                     protocol="leave-last"):
    """The protocol's arrays from one interaction log (parallel arrays in file order; raw ids
    any sortable integers): users and items re-indexed in ascending raw id, sequences, splits,
    evaluation candidates, raw_user_ids / raw_item_ids. Shared by every dataset. user_names:
    the ids' text by raw id, for messages (None: the raw ids are the ids, as in ML-1M).
    protocol: "leave-last" (§3.1) or "halves" (Table 4(b), see the module docstring; checked by
    check_resplit)."""
    minimum = MIN_INTERACTIONS if protocol == "leave-last" else MIN_INTERACTIONS_HALVES
    uniq_users, counts = np.unique(user_raw, return_counts=True)
    if (counts < minimum).any():
        short = uniq_users[counts < minimum]
        example = (f"UserID {short[0]}" if user_names is None else
                   f"user {user_names[short[0]].decode('utf-8', 'backslashreplace')!r}")
        warnings.warn(f"{folder}: dropping {len(short)} users with fewer than {minimum} "
                      f"interactions (no room for train/validation/test), e.g. {example}")
        keep = ~np.isin(user_raw, short)
        user_raw, item_raw, timestamp = user_raw[keep], item_raw[keep], timestamp[keep]
    if len(user_raw) == 0:
        raise ValueError(f"{folder}: no user has {minimum} or more ratings")
    raw_user_ids, user = np.unique(user_raw, return_inverse=True)
    raw_items, item = np.unique(item_raw, return_inverse=True)
    item = item + 1  # 0 is padding
    n_users, n_items = len(raw_user_ids), len(raw_items)

    # lexsort is stable, so equal timestamps keep their order in the file.
    order = np.lexsort((timestamp, user))
    item_seq = item[order].astype(np.int64)
    lengths = np.bincount(user, minlength=n_users)
    user_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
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
    sorted_keys = _sorted_keys(user_of_pos, item_seq, n_items)

    # Evaluation candidates are drawn once per (data, seed) and cached, so every model and run
    # is scored on the same items. The paper says "one hundred randomly sampled items that the
    # user did not consume"; without replacement, and independent draws for validation and test,
    # are our choice.
    rng = np.random.default_rng(seed)
    valid_neg = _sample_eval_negatives(sorted_keys, lengths, n_items, n_eval_negatives, rng)
    test_neg = _sample_eval_negatives(sorted_keys, lengths, n_items, n_eval_negatives, rng)

    return {
        "n_users": np.int64(n_users), "n_items": np.int64(n_items),
        "item_seq": item_seq, "user_offsets": user_offsets,
        "train_user": user_of_pos[train_pos].astype(np.int64), "train_pos": train_pos.astype(np.int64),
        "valid_pos": valid_pos.astype(np.int64), "test_pos": test_pos.astype(np.int64),
        "valid_candidates": np.column_stack([item_seq[valid_pos], valid_neg]),
        "test_candidates": np.column_stack([item_seq[test_pos], test_neg]),
        "item_train_count": np.bincount(item_seq[in_train_part], minlength=n_items + 1).astype(np.int64),
        "raw_user_ids": raw_user_ids.astype(np.int64),
        "raw_item_ids": np.concatenate([[0], raw_items]).astype(np.int64),
    }


def _genres(movies, raw_items, genre_names):
    """[len(raw_items) + 1, n_genres] float32 multi-hot genres of the re-indexed items (row 0:
    padding)."""
    movie_sorter = np.argsort(movies["movie_id"])
    movie_row = movie_sorter[np.searchsorted(movies["movie_id"], raw_items, sorter=movie_sorter)]
    column = {g: j for j, g in enumerate(genre_names)}
    genres = np.zeros((len(raw_items) + 1, len(genre_names)), dtype=np.float32)
    for i, row in enumerate(movie_row, 1):  # ~4k items, once per build
        genres[i, [column[g] for g in movies["genres"][row]]] = 1.0
    return genres, movie_row


def _build(ratings, users, movies, seed, n_eval_negatives, folder, protocol="leave-last", user_group="all"):
    """Everything derived from ML-1M-format tables, as a dict of arrays (what the cache stores).
    protocol and user_group as check_resplit accepts them."""
    genre_names = sorted({g for genres in movies["genres"] for g in genres})
    if user_group != "all":  # interest consistency over every user's whole sequence, then the group
        every = _protocol_arrays(ratings["user"], ratings["item"], ratings["timestamp"], seed, 0, folder)
        genres, _ = _genres(movies, every["raw_item_ids"][1:], genre_names)
        consistency = interest_consistency(every["item_seq"], every["user_offsets"], genres)
        iid = consistency >= consistency.mean()
        chosen = every["raw_user_ids"][iid if user_group == "iid" else ~iid]
        keep = np.isin(ratings["user"], chosen)
        ratings = {k: v[keep] for k, v in ratings.items()}
    arrays = _protocol_arrays(ratings["user"], ratings["item"], ratings["timestamp"], seed,
                              n_eval_negatives, folder, protocol=protocol)
    raw_user_ids, raw_items = arrays["raw_user_ids"], arrays["raw_item_ids"][1:]
    n_items = len(raw_items)
    # Attributes, aligned with the re-indexed users and items.
    user_sorter = np.argsort(users["user_id"])
    user_row = user_sorter[np.searchsorted(users["user_id"], raw_user_ids, sorter=user_sorter)]
    genres, movie_row = _genres(movies, raw_items, genre_names)
    year = np.zeros(n_items + 1, dtype=np.float32)
    year[1:] = movies["year"][movie_row]
    return {
        **arrays,
        "user_attr.gender": users["gender"][user_row], "user_attr.age": users["age"][user_row],
        "user_attr.occupation": users["occupation"][user_row],
        "item_attr.genres": genres, "item_attr.year": year,
        "vocab.genres": np.array(genre_names, dtype=str),
        "vocab.gender": np.array(GENDERS), "vocab.age": np.array(ML1M_AGE_BANDS),
    }


@dataclass(repr=False)
class RecData:
    name: str
    n_users: int  # users re-indexed 0..n_users-1 in order of original id (UserID, or bytes order)
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
    # _attribute_arrays. Integer attributes are classes, float ones are regressed (train.py).
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

    def eval_split(self, split):
        """(users [n_users], history [n_users, history_len], candidates [n_users, 1 + n_neg]).
        The history is the items before the target: under leave-last, the test history includes
        the validation item and the validation history excludes both targets."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        users = np.arange(self.n_users, dtype=np.int64)
        target_pos = self.valid_pos if split == "valid" else self.test_pos
        candidates = self.valid_candidates if split == "valid" else self.test_candidates
        return users, self.history(users, target_pos), candidates

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


# ----------------------------------------------------------------------------------------------
# Loading with a cache

def _fingerprint(h, path):
    """Feed one source file's identity into the hash h (an absent optional file counts too).
    Up to FULL_HASH_BYTES: its name and whole content. A content hash, not size+mtime: it costs
    ~0.05 s for ML-1M, survives copies and touches (no spurious rebuilds) and catches same-size
    edits within one mtime tick (no stale cache). Larger files (ratings_Books.csv is ~0.9 GB;
    hashing it all would cost seconds on every cached load, more when it is not in the page
    cache) are keyed by name, size, mtime_ns and FINGERPRINT_BLOCKS blocks of 64 KiB spread
    evenly over the file, head and tail included: a copy or a touch rebuilds (minutes, but
    never stale), and an edit that keeps size and mtime and misses every block goes unnoticed."""
    path = Path(path)
    h.update(path.name.encode())
    if not path.is_file():
        h.update(b"\0absent")
        return
    stat = path.stat()
    if stat.st_size <= FULL_HASH_BYTES:
        h.update(path.read_bytes())
        return
    h.update(f"\0size={stat.st_size} mtime_ns={stat.st_mtime_ns}".encode())
    block = 1 << 16
    with open(path, "rb") as f:
        for offset in np.linspace(0, stat.st_size - block, FINGERPRINT_BLOCKS).astype(np.int64):
            f.seek(int(offset))
            h.update(f.read(block))


def _cache_key(sources, settings):
    h = hashlib.blake2b(digest_size=8)
    for path in sources:
        _fingerprint(h, path)
    h.update(json.dumps({**settings, "protocol_version": PROTOCOL_VERSION}, sort_keys=True).encode())
    return h.hexdigest()


def _cache_dirs(folder):
    # $PLANREC_CACHE when set (an explicit choice wins, our choice), else next to the data, else
    # ./data/cache (the data folder may be read-only, like the shared copy).
    dirs = [Path(os.environ["PLANREC_CACHE"]).expanduser()] if os.environ.get("PLANREC_CACHE") else []
    return dirs + [Path(folder), Path("data") / "cache"]


def _write_cache(arrays, filename, folder):
    for directory in _cache_dirs(folder):
        tmp = None
        try:
            if directory != Path(folder):
                directory.mkdir(parents=True, exist_ok=True)
            if not _is_writable_dir(directory):
                continue
            fd, tmp = tempfile.mkstemp(prefix=".planrec_cache-", suffix=".npz.part", dir=directory)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is fine to share
            os.replace(tmp, directory / filename)
            return directory / filename
        except OSError:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
    warnings.warn(f"could not write the cache {filename} to any of "
                  f"{[str(d) for d in _cache_dirs(folder)]}; set PLANREC_CACHE to a writable folder")
    return None


def _from_arrays(arrays, name, folder, history_len):
    prefixed = lambda p: {k[len(p):]: arrays[k] for k in arrays if k.startswith(p)}
    return RecData(
        name=name, n_users=int(arrays["n_users"]), n_items=int(arrays["n_items"]),
        item_seq=arrays["item_seq"], user_offsets=arrays["user_offsets"],
        train_user=arrays["train_user"], train_pos=arrays["train_pos"],
        valid_pos=arrays["valid_pos"], test_pos=arrays["test_pos"],
        valid_candidates=arrays["valid_candidates"], test_candidates=arrays["test_candidates"],
        item_train_count=arrays["item_train_count"],
        user_attrs=prefixed("user_attr."), item_attrs=prefixed("item_attr."),
        raw_user_ids=arrays["raw_user_ids"], raw_item_ids=arrays["raw_item_ids"],
        history_len=history_len, attr_vocab={k: [str(x) for x in v] for k, v in prefixed("vocab.").items()},
        folder=str(folder))


def _load_cached(name, folder, sources, settings, build, history_len, rebuild):
    """RecData from the cache keyed by the source files and the settings; otherwise build()
    (-> dict of arrays), cached only once it has succeeded."""
    filename = f"planrec_cache_{name}_{_cache_key(sources, settings)}.npz"
    if not rebuild:
        for directory in _cache_dirs(folder):
            if (directory / filename).is_file():
                try:
                    with np.load(directory / filename, allow_pickle=False) as f:
                        arrays = {k: f[k] for k in f.files}
                    return _from_arrays(arrays, name, folder, history_len)
                except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                    warnings.warn(f"ignoring unreadable cache {directory / filename} ({e}); rebuilding")
    arrays = build()
    _write_cache(arrays, filename, folder)
    return _from_arrays(arrays, name, folder, history_len)


def _load_folder(folder, name, expected_counts, seed=0, n_eval_negatives=100,
                 history_len=HISTORY_LEN, rebuild=False, protocol="leave-last", users="all"):
    """An ML-1M-format folder (ML-1M itself, the synthetic worlds) under the protocol."""
    check_resplit(protocol, users)
    settings = {"name": name, "seed": seed, "n_eval_negatives": n_eval_negatives,
                "history_len": history_len}
    if (protocol, users) != ("leave-last", "all"):  # the default's key is the same formula as before
        settings.update(protocol=protocol, users=users)
    build = lambda: _build(*read_movielens(folder, expected_counts), seed, n_eval_negatives, folder,
                           protocol, users)
    return _load_cached(name, folder, [Path(folder) / f for f in ML1M_FILES], settings, build,
                        history_len, rebuild)


def load_movielens(root=None, download=True, seed=0, n_eval_negatives=100,
                   history_len=HISTORY_LEN, rebuild=False, protocol="leave-last", users="all"):
    """MovieLens-1M under the protocol, from the cache when the files and settings match.
    rebuild=True ignores (and overwrites) an existing cache. protocol / users: Table 4(b)'s
    re-split (module docstring)."""
    check_resplit(protocol, users)   # before any download
    folder = find_ml1m(root, download)
    return _load_folder(folder, "ml-1m", ML1M_COUNTS, seed, n_eval_negatives, history_len, rebuild,
                        protocol, users)


def find_log(name, root=None):
    """Folder holding the log of 'amazon-book' (ratings_Books.csv) or 'interactions'
    (interactions.csv): root (the --data-dir) or root/<name>, then $PLANREC_DATA/<name>, then
    ./data/<name>. Nothing is downloaded: a missing file says where to get it and put it."""
    wanted = AMAZON_BOOK_FILE if name == "amazon-book" else INTERACTIONS_FILE
    searched = _search_path(root, name)
    for folder in searched:
        if (folder / wanted).is_file():
            return folder
    target = _home_folder(root, name)
    if name == "amazon-book":
        how = (f"download the \"ratings only\" file for Books of the public Amazon review data "
               f"by McAuley et al. (2014 release, {AMAZON_BOOK_PAGE}), {AMAZON_BOOK_FILE}: lines "
               f"user,item,rating,timestamp without a header; its licence does not let us ship it")
    else:
        how = (f"write {INTERACTIONS_FILE}: a header line naming at least user,item,timestamp "
               f"(any order; timestamp in unix time), then one interaction per line; optionally "
               f"{USERS_FILE} / {ITEMS_FILE} with a header naming user / item and one column per "
               f"attribute")
    raise FileNotFoundError(
        f"{name}: {wanted} was not found\n"
        f"  searched: {', '.join(str(f) for f in searched)}\n"
        f"  fix: {how}. Put it in {target}/ ; or point --data-dir (root=) at the folder holding "
        f"it, or set PLANREC_DATA=DIR so that DIR/{name}/ holds it.")


def load_log(name, root=None, seed=0, min_interactions=None, n_eval_negatives=100,
             history_len=HISTORY_LEN, rebuild=False):
    """'amazon-book' or 'interactions' under the protocol: every line an implicit interaction,
    repeated (user, item) pairs dropped keeping the earliest, the maximal min_interactions-core
    (default 16 for amazon-book, 0 = none for interactions), then the ML-1M protocol. Cached
    like ML-1M; the key covers the files (see _fingerprint) and min_interactions."""
    if min_interactions is None:
        min_interactions = DEFAULT_MIN_INTERACTIONS[name]
    if isinstance(min_interactions, bool) or not isinstance(min_interactions, (int, np.integer)) \
            or min_interactions < 0:
        raise ValueError(f"min_interactions must be an integer >= 0, got {min_interactions!r}")
    folder = find_log(name, root)
    sources = ([folder / AMAZON_BOOK_FILE] if name == "amazon-book" else
               [folder / f for f in (INTERACTIONS_FILE, USERS_FILE, ITEMS_FILE)])
    settings = {"name": name, "seed": seed, "n_eval_negatives": n_eval_negatives,
                "history_len": history_len, "min_interactions": int(min_interactions)}
    build = lambda: _build_log(name, folder, int(min_interactions), seed, n_eval_negatives)
    return _load_cached(name, folder, sources, settings, build, history_len, rebuild)


def load_dataset(name, root=None, seed=0, **kw):
    """'ml-1m' -> load_movielens(root, seed=seed, **kw). 'synthetic' / 'synthetic-ood' -> the
    synthetic world in root (default ./data/<name>), generated first if the folder holds none;
    make_synthetic's keyword arguments (n_users, n_items, world_seed, ...) pass through **kw.
    'amazon-book' / 'interactions' -> load_log(name, root, seed, min_interactions=...).
    seed is the protocol seed (evaluation negatives), not the world's."""
    protocol = {k: kw.pop(k) for k in ("n_eval_negatives", "history_len", "rebuild") if k in kw}
    resplit = {k: kw.pop(k) for k in ("protocol", "users") if k in kw}
    if name in ("amazon-book", "interactions"):
        if resplit.get("protocol", "leave-last") != "leave-last" or resplit.get("users", "all") != "all":
            raise ValueError(f"{name}: the halves protocol and the interest-consistency user groups "
                             f"need item genres; use ml-1m or a synthetic world")
        kw.pop("download", None)  # nothing is ever downloaded for these
        if set(kw) - {"min_interactions"}:
            raise ValueError(f"{name} takes no option(s) {', '.join(sorted(set(kw) - {'min_interactions'}))}")
        return load_log(name, root, seed=seed, **kw, **protocol)
    if kw.pop("min_interactions", 0) not in (0, None):
        raise ValueError(f"--min-interactions (min_interactions) applies to amazon-book and "
                         f"interactions; {name} is used as it is (every user keeps all ratings)")
    if name == "ml-1m":
        return load_movielens(root, seed=seed, **protocol, **resplit, **kw)
    if name in ("synthetic", "synthetic-ood"):
        folder = Path(root).expanduser() if root is not None else Path("data") / name
        kw.pop("download", None)  # nothing to download: the world is generated locally
        requested = json.loads(json.dumps({"ood_shift": name == "synthetic-ood", **kw}))
        if "world_seed" in requested:
            requested["seed"] = requested.pop("world_seed")
        if not (_contains_ml1m(folder) and (folder / "ground_truth.npz").is_file()):
            make_synthetic(folder, **requested)
        else:
            made_with = json.loads(str(load_ground_truth(folder)["params"]))
            differing = {k: (made_with.get(k), v) for k, v in requested.items() if made_with.get(k) != v}
            if differing:
                raise ValueError(f"{folder} holds a synthetic world made with other settings "
                                 f"(setting: (stored, requested)) {differing}; delete the folder "
                                 f"or choose another --data-dir")
        return _load_folder(folder, name, None, seed, **protocol, **resplit)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


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

def ranking_metrics(scores, ks=(5, 10)):
    """scores [n_users, 1 + n_negatives], column 0 the positive. Ties count against the
    positive (pessimistic), so a constant scorer gets auc 0 and recall 0."""
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
    metrics = {"auc": float((negatives < positive).mean(axis=1).mean())}
    for k in ks:
        metrics[f"recall@{k}"] = float((rank < k).mean())
    for k in ks:
        metrics[f"ndcg@{k}"] = float(np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0).mean())
    return metrics


def popularity_scores(data, split="test"):
    """[n_users, 1 + n_negatives]: each candidate's interaction count in the training part."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    candidates = data.valid_candidates if split == "valid" else data.test_candidates
    return data.item_train_count[candidates].astype(np.float64)


# ----------------------------------------------------------------------------------------------
# A synthetic world with known latent structure (paper §3.3.2 uses one for the OOD study)

SYNTHETIC_NODES = ("user.group", "user.age", "user.power", "user.occupation",
                   "item.category", "item.price", "item.era")
# The shared DAG: which user attribute drives preferences over which item attribute.
# user.occupation has no edge on purpose: a distractor a structure learner should leave alone.
SYNTHETIC_EDGES = (("user.group", "item.category"), ("user.power", "item.price"),
                   ("user.age", "item.era"))
SYNTHETIC_CATEGORIES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi")
SYNTHETIC_ERAS = (1960, 1980)  # era 0: before 1960, 1: 1960-1979, 2: 1980 and later


def make_synthetic(folder, n_users=1000, n_items=500, mean_len=40, seed=0, deviating_share=0.2,
                   ood_shift=False, n_shifted=1, edge_weights=(1.5, 1.5, 1.0), popularity_weight=1.0,
                   sequence_weight=1.0):
    """Write a synthetic world in ML-1M format (ratings.dat, users.dat, movies.dat) and its
    ground truth (ground_truth.npz: DAG, attributes, each user's deviations) into folder.

    Users: group (-> users.dat gender), age band (-> age), purchasing power 0..2 (latent, not
    in users.dat: a private factor), occupation (distractor). Items: category (-> genres), price
    level 0..2 (latent), year (-> title) and its era. A user's taste for an item is the sum over
    the DAG's edges, each weighted by edge_weights: group-specific category affinity, closeness
    of price to power, closeness of era to the age band's favourite era; plus item popularity
    and a bonus for staying in the previous item's category (so the history matters). A
    deviating_share of users drops one edge at random (e.g. ignores price, like the paper's
    wealthy user). Each user's sequence is drawn item by item without repeats (Gumbel-max).
    ood_shift=True: the last n_shifted interactions (the test target with the default 1) are
    drawn under a changed purchasing power. All other draws are identical between the IID and
    the OOD world of one seed, so they differ only in those last interactions.
    Deterministic given seed."""
    folder = Path(folder)
    lengths_floor = 10  # our choice: every user has some training history
    if n_items < 120 or mean_len < lengths_floor or n_users < 1 or not 0 <= deviating_share <= 1:
        raise ValueError(f"need n_items >= 120 (100 evaluation negatives), mean_len >= "
                         f"{lengths_floor}, n_users >= 1, 0 <= deviating_share <= 1")
    rng = np.random.default_rng(seed)
    n_edges, n_cat = len(SYNTHETIC_EDGES), len(SYNTHETIC_CATEGORIES)

    group = rng.integers(0, 2, n_users)
    age = rng.integers(0, len(ML1M_AGE_CODES), n_users)
    power = rng.integers(0, 3, n_users)
    occupation = rng.integers(0, 21, n_users)
    power_shift = (power + rng.integers(1, 3, n_users)) % 3  # always a different level
    power_test = power_shift if ood_shift else power
    deviating = rng.random(n_users) < deviating_share
    dropped = rng.integers(0, n_edges, n_users)
    user_deviation = np.where(deviating, dropped, -1)  # index of the ignored edge, -1 = none
    edge_mask = np.ones((n_users, n_edges), dtype=bool)
    edge_mask[deviating, dropped[deviating]] = False

    category = rng.integers(0, n_cat, n_items)
    price = rng.integers(0, 3, n_items)
    year = rng.integers(1940, 2001, n_items)
    era = np.digitize(year, SYNTHETIC_ERAS)
    log_popularity = rng.normal(0.0, 1.0, n_items)
    category_affinity = rng.normal(0.0, 1.0, (2, n_cat))  # per group
    favourite_era = np.round((len(ML1M_AGE_CODES) - 1 - age) * 2 / (len(ML1M_AGE_CODES) - 1))

    def taste(user_power):
        w = np.asarray(edge_weights, dtype=np.float64) * edge_mask  # [n_users, n_edges]
        return (w[:, :1] * category_affinity[group][:, category]
                - w[:, 1:2] * np.abs(price[None, :] - user_power[:, None])
                - w[:, 2:3] * np.abs(era[None, :] - favourite_era[:, None])
                + popularity_weight * log_popularity[None, :])

    lengths = np.minimum(lengths_floor + rng.poisson(mean_len - lengths_floor, n_users),
                         n_items - 101)
    max_len = int(lengths.max())
    taste_train, taste_test = taste(power), taste(power_test)
    chosen = np.zeros((n_users, max_len), dtype=np.int64)
    taken = np.zeros((n_users, n_items), dtype=bool)
    previous_category = np.full(n_users, -1)
    rows = np.arange(n_users)
    for t in range(max_len):  # a loop over steps, vectorized over users and items
        shifted = t >= lengths - n_shifted
        logits = np.where(shifted[:, None], taste_test, taste_train)
        logits = logits + sequence_weight * (category[None, :] == previous_category[:, None])
        logits[taken] = -np.inf
        pick = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
        chosen[:, t], taken[rows, pick] = pick, True
        previous_category = category[pick]

    start = 946_684_800 + rng.integers(0, 90 * 86_400, n_users)  # from 2000-01-01
    timestamps = start[:, None] + np.cumsum(rng.integers(60, 3 * 86_400, (n_users, max_len)), axis=1)
    rating = rng.integers(1, 6, (n_users, max_len))  # ignored by the protocol (implicit feedback)
    # Write each user's lines in a shuffled order, so readers must sort by timestamp.
    file_order = rng.permuted(np.tile(np.arange(max_len), (n_users, 1)), axis=1)

    ratings_lines = []
    for u in range(n_users):
        for t in file_order[u][file_order[u] < lengths[u]]:
            ratings_lines.append(f"{u + 1}::{chosen[u, t] + 1}::{rating[u, t]}::{timestamps[u, t]}")
    users_lines = [f"{u + 1}::{GENDERS[group[u]]}::{ML1M_AGE_CODES[age[u]]}::{occupation[u]}::00000"
                   for u in range(n_users)]
    movies_lines = [f"{i + 1}::Item {i + 1} ({year[i]})::{SYNTHETIC_CATEGORIES[category[i]]}"
                    for i in range(n_items)]
    adjacency = np.zeros((len(SYNTHETIC_NODES), len(SYNTHETIC_NODES)), dtype=np.int8)
    for a, b in SYNTHETIC_EDGES:
        adjacency[SYNTHETIC_NODES.index(a), SYNTHETIC_NODES.index(b)] = 1
    params = {"n_users": n_users, "n_items": n_items, "mean_len": mean_len, "seed": seed,
              "deviating_share": deviating_share, "ood_shift": ood_shift, "n_shifted": n_shifted,
              "edge_weights": list(edge_weights), "popularity_weight": popularity_weight,
              "sequence_weight": sequence_weight}

    # Write everything into a temporary folder, then move it into place: no half-written world.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=folder.parent))
    try:
        for name, lines in (("ratings.dat", ratings_lines), ("users.dat", users_lines),
                            ("movies.dat", movies_lines)):
            (tmp / name).write_text("\n".join(lines) + "\n", encoding="latin-1")
        # Arrays are indexed by raw id - 1 (UserID u -> [u - 1]); align with RecData through
        # raw_user_ids / raw_item_ids.
        np.savez(tmp / "ground_truth.npz",
                 nodes=np.array(SYNTHETIC_NODES), adjacency=adjacency,
                 edges=np.array(SYNTHETIC_EDGES), category_names=np.array(SYNTHETIC_CATEGORIES),
                 user_id=np.arange(1, n_users + 1), user_group=group, user_age_band=age,
                 user_power=power, user_power_test=power_test, user_occupation=occupation,
                 user_edge_mask=edge_mask, user_deviation=user_deviation, user_length=lengths,
                 item_id=np.arange(1, n_items + 1), item_category=category, item_price=price,
                 item_year=year, item_era=era, item_log_popularity=log_popularity,
                 category_affinity=category_affinity, favourite_era=favourite_era,
                 params=np.array(json.dumps(params)))
        _move_into_place(tmp, folder, last=("ground_truth.npz",) + ML1M_FILES)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_ground_truth(folder):
    """The synthetic world's ground truth as a dict of arrays (params is a JSON string)."""
    with np.load(Path(folder) / "ground_truth.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
