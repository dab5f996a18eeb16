"""Issue 19, item 5: the ledger's missing runs trained on one machine with a GPU, several processes
at once, inside one bounded device call, their records brought back in one file.

    python -m analysis.device_runs OUTDIR [EXPERIMENT ...] [--budget full] [--seeds 0 1 2] [--jobs 8]

On a GPU one training step of this model costs about 30 ms whatever the batch (docs/BENCHMARKS.md):
it is bound by launching many small kernels, not by the GPU, so several processes share one GPU
well, each on its own CPU cores. Before the call, here (the device machine has no network and sees
only the checkout):

    mkdir -p data && cp -r ../shared/data/ml-1m data/ml-1m          # data/ is ignored, never committed

The call (device tool): command `python3 -m analysis.device_runs "$OUT" table3 table8 ...`,
carry ["data/ml-1m"], timeout_s 600. Back here, from the reply's files_at:

    python -m analysis.device_runs --take FILES_AT/records.tar       # into ledger/, then commit it

Take them only where FILES_AT/summary.txt says the agreement check agrees (below): the check runs
beside the others, not before them, since one call has no time to wait for it.

What one call does, within --budget-s seconds of wall (so that a 600-s call ends with its files):
1. The agreement check (skip with --no-check): --check-run (planrec) seed 0 is trained again on
   this machine into a ledger of its own and compared with the ledger's records of every seed. It
   agrees when its test NDCG@10 differs from the record of the same seed by no more than the
   records' seed spread (max - min over seeds); summary.txt says so.
2. The runs the named experiments (default all) lack in the ledger (analysis.experiments --plan),
   real-dataset runs only (the synthetic ones take minutes on a CPU), in the experiments' order,
   --jobs at a time, each one `python -m analysis.experiments --runs KEY --seeds SEED` with
   `--device` and cores / jobs torch threads. A run starts only while --run-s seconds are left; one
   still training at the end is stopped.
Each finished record is added to OUTDIR/records.tar at once (the archive is rewritten whole), so a
call cut short still brings back what finished. A run stopped at the deadline is not lost: its
folder (last.pt, best.pt, metrics so far) goes to OUTDIR/partial-K.tar, at most PARTIAL_MIB each.
Extract those here into data/device-partial (ignored) and the next call, carrying it, resumes them
first (--resume-from data/device-partial). OUTDIR also gets check.tar (the check run's record,
whose name is the ledger's own seed-0 record: never take it), logs.tar.gz and summary.txt: 8 files
at most, what the device tool brings back.
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from analysis import experiments as ex, ledger

ROOT = Path(__file__).resolve().parents[1]
# Seconds kept at the end of the budget to write the archives and the summary.
CLOSING_S = 20
# The device tool brings back 8 files of at most 16 MiB: partial runs fill up to 4 archives of this size.
PARTIAL_MIB, PARTIAL_FILES = 15, 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the ledger's missing runs several at once on one GPU machine "
                                            "(issue 19, item 5), or take the records such a call brought back.")
    p.add_argument("out", nargs="?", help="output folder: records.tar, check.tar, partial-K.tar, logs.tar.gz, summary.txt")
    p.add_argument("experiments", nargs="*", help="experiments whose missing runs to train (default: all)")
    p.add_argument("--take", metavar="TAR", help="extract a records.tar into --ledger (never over a record there) and exit")
    p.add_argument("--budget", choices=sorted(ex.BUDGETS), default="full", help="the experiments' budget")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ledger", default=str(ledger.LEDGER), metavar="DIR",
                   help="the ledger read to find what is missing (never written by a training call)")
    p.add_argument("--data", choices=["ml-1m", "synthetic"], default="ml-1m")
    p.add_argument("--data-dir", default=None, help="the dataset folder (train.py's search when not given)")
    p.add_argument("--train-args", default="", metavar="ARGS", help="more train.py flags for every run")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where every run trains")
    p.add_argument("--jobs", type=int, default=8, help="runs at a time")
    p.add_argument("--budget-s", type=float, default=540, help="wall seconds for the whole call")
    p.add_argument("--run-s", type=float, default=420, help="no run starts with fewer seconds left than this")
    p.add_argument("--check-run", default="planrec", metavar="KEY", help="the configuration of the agreement check")
    p.add_argument("--no-check", action="store_true", help="skip the agreement check")
    p.add_argument("--resume-from", default=None, metavar="DIR",
                   help="run folders a cut-short call brought back (partial-K.tar, extracted): resumed first")
    p.add_argument("--work", default=None, metavar="DIR",
                   help="run folders and the call's ledgers (default: a new temporary folder, outside OUTDIR)")
    args = p.parse_args(argv)
    if args.take:
        return args
    if not args.out:
        p.error("OUTDIR is required (or --take TAR)")
    if args.jobs < 1 or args.budget_s <= CLOSING_S or args.run_s <= 0:
        p.error(f"need --jobs >= 1, --budget-s > {CLOSING_S} and --run-s > 0")
    if args.resume_from and not Path(args.resume_from).is_dir():
        p.error(f"--resume-from {args.resume_from}: no such folder (extract the partial-K.tar files into it)")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device here; use --device cpu to try the call on this machine")
    try:
        shlex.split(args.train_args)
    except ValueError as err:
        p.error(f"--train-args: {err}")
    return args


def experiments_argv(args, *more):
    """The analysis.experiments arguments every call of this one shares."""
    return ["--budget", args.budget, "--data", args.data, *(["--data-dir", args.data_dir] if args.data_dir else []),
            *more]


def missing_runs(args, work):
    """[(key, seed)] the experiments lack in args.ledger (analysis.experiments.run_state: new, resume
    or stale), real-dataset runs only, resumed ones first, else in the experiments' order."""
    plan_args = ex.parse_args([*(args.experiments or ["all"]), "--seeds", *map(str, args.seeds), "--out", str(work),
                               "--ledger", args.ledger, "--train-args", args.train_args, *experiments_argv(args)])
    setup, _, specs = ex.invocation(plan_args)
    code = ledger.code_fingerprint()
    runs = [(state != "resume", spec.key, seed) for spec in specs if spec.kind == "main" for seed in setup.seeds
            for state in [ex.run_state(setup, spec, seed, code)[0]] if state in ("new", "resume", "stale")]
    return [(key, seed) for _, key, seed in sorted(runs, key=lambda r: r[0])]     # sorted is stable


class Call:
    """One bounded call: a deadline, the runs' logs and results, and archives rewritten as runs end."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="device_runs-"))
        self.folders = self.work / "runs" / "runs"         # analysis.experiments --out work/runs puts them here
        self.ledgers = {"runs": self.work / "ledger", "check": self.work / "check-ledger"}
        self.logs = self.work / "logs"
        for d in (self.out, *self.ledgers.values(), self.logs, self.folders):
            d.mkdir(parents=True, exist_ok=True)
        for folder in sorted(Path(args.resume_from).glob("*/last.pt")) if args.resume_from else ():
            if not (self.folders / folder.parent.name).exists():
                shutil.copytree(folder.parent, self.folders / folder.parent.name)
        self.started = time.time()
        self.deadline = self.started + args.budget_s - CLOSING_S
        self.threads = max(1, (os.cpu_count() or 1) // args.jobs)
        self.results, self.lock = [], threading.Lock()

    def train(self, key, seed, which="runs"):
        """Train (or find) one run into ledger `which`; its line for the summary."""
        left = self.deadline - time.time()
        if left < self.args.run_s:
            line = f"{key} seed {seed}: not started ({left:.0f} s left, a run needs --run-s {self.args.run_s:.0f})"
        else:
            train_args = f"--threads {self.threads} --device {self.args.device} {self.args.train_args}".strip()
            argv = [sys.executable, "-m", "analysis.experiments", "--runs", key, "--seeds", str(seed), "--out",
                    str(self.work / which), "--ledger", str(self.ledgers[which]), "--train-args", train_args,
                    *experiments_argv(self.args)]
            log = self.logs / f"{which}-{key}-seed{seed}.log"
            t0 = time.time()
            with open(log, "w") as f:
                f.write(shlex.join(argv) + "\n")
                f.flush()
                try:
                    rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=left, cwd=ROOT).returncode
                except subprocess.TimeoutExpired:
                    rc = "stopped at the deadline"
            found = sorted(self.ledgers[which].glob(f"{key}-seed{seed}-*.npz"))
            line = f"{key} seed {seed}: rc {rc}, {time.time() - t0:.0f} s, "
            if found:
                metrics = ledger.read_record(found[-1], arrays=False).meta["metrics"]
                epoch_s = sorted(e["train_s"] + e["eval_s"] for e in metrics["epochs"])
                line += (f"test NDCG@10 {metrics['test']['ndcg@10']:.4f}, {len(epoch_s)} epochs of median "
                         f"{epoch_s[len(epoch_s) // 2]:.1f} s, {found[-1].name}")
            else:
                line += "no record"
        with self.lock:
            self.results.append((which, line))
            print(line, flush=True)
            self.write_archives()
        return line

    def write_archives(self):
        """records.tar (the runs' records), check.tar (the agreement check's, whose name is a CPU
        record's) and logs.tar.gz, each written beside and renamed, so that one is always whole."""
        for name, folder, pattern in (("records.tar", self.ledgers["runs"], "*.npz"),
                                      ("check.tar", self.ledgers["check"], "*.npz"),
                                      ("logs.tar.gz", self.logs, "*.log")):
            files = sorted(folder.glob(pattern))
            if not files:
                continue
            tmp = self.out / f".{name}.tmp"
            with tarfile.open(tmp, "w:gz" if name.endswith(".gz") else "w") as tar:
                for path in files:
                    tar.add(path, arcname=path.name)
            os.replace(tmp, self.out / name)

    def write_partials(self):
        """partial-K.tar: the folders of runs stopped before their record, to resume in the next call.
        Names of the folders that did not fit."""
        folders = [f.parent for f in sorted(self.folders.glob("*/last.pt"))
                   if not any(self.ledgers["runs"].glob(f"{f.parent.name}-*.npz"))]
        packs, left_out = [], []
        for folder in folders:
            size = sum(p.stat().st_size for p in folder.iterdir())
            pack = next((p for p in packs if p[0] + size <= PARTIAL_MIB * 2 ** 20), None)
            if pack is None and len(packs) < PARTIAL_FILES and size <= PARTIAL_MIB * 2 ** 20:
                pack = [0, []]
                packs.append(pack)
            if pack is None:
                left_out.append(folder.name)
                continue
            pack[0] += size
            pack[1].append(folder)
        for k, (_, members) in enumerate(packs, 1):
            tmp = self.out / f".partial-{k}.tar.tmp"
            with tarfile.open(tmp, "w") as tar:
                for folder in members:
                    tar.add(folder, arcname=folder.name)
            os.replace(tmp, self.out / f"partial-{k}.tar")
        return [f.name for _, members in packs for f in members], left_out


def agreement(args, check_ledger):
    """Text: the check run against the ledger's records of the same configuration, every seed."""
    found = sorted(Path(check_ledger).glob(f"{args.data}-{args.check_run}-seed0-*.npz"))
    if not found:
        return "agreement: not measured (the check run left no record)"
    mine = ledger.read_record(found[-1])
    code = ledger.code_fingerprint()
    records = {}
    for seed in args.seeds:
        state, record = ledger.lookup(args.ledger, mine.meta["key"], seed,
                                      lambda i: i["budget"] == mine.meta["budget"], code)
        if state == "current":
            records[seed] = record
    same = records.get(0)
    if same is None or same.path.name != found[-1].name:
        return (f"agreement: not measured (no current record of {mine.meta['key']} seed 0 with this identity in "
                f"{args.ledger})")
    n10 = lambda r: r.meta["metrics"]["test"]["ndcg@10"]
    values = [n10(r) for r in records.values()]
    spread, gap = max(values) - min(values), abs(n10(mine) - n10(same))
    p = ex.sign_flip_test(mine.per_user_metrics()["ndcg@10"], same.per_user_metrics()["ndcg@10"])
    where = lambda r: r.meta["machine"].get("gpu") or r.meta["machine"]["cpu"]
    lines = [f"agreement check: {mine.meta['key']} seed 0, budget {mine.meta['budget']}",
             f"  this call ({where(mine)}): test NDCG@10 {n10(mine):.4f}, {mine.meta['wall_s']:.0f} s",
             *(f"  ledger seed {s} ({where(r)}): {n10(r):.4f}, {r.meta['wall_s']:.0f} s" for s, r in records.items()),
             f"  |this - ledger seed 0| = {gap:.4f}; seed spread of the ledger (max - min over {len(values)} seeds) "
             f"= {spread:.4f}; paired sign-flip p over users {ex.fmt_p(p)}",
             "  verdict: " + ("agree (within the seed spread)" if gap <= spread else
                             "DO NOT agree (outside the seed spread): do not mix this machine's records with the ledger's")]
    if len(values) < 2:
        lines[-1] = "  verdict: not measured (one seed in the ledger gives no spread)"
    return "\n".join(lines)


def take(tar_path, ledger_dir):
    """Extract the records of a records.tar into the ledger, skipping any name already there."""
    ledger_dir = Path(ledger_dir)
    added = []
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if not member.isfile() or not name.endswith(".npz") or name != member.name:
                sys.exit(f"error: {tar_path}: {member.name!r} is not a ledger record; is this analysis.device_runs' records.tar?")
            if (ledger_dir / name).exists():
                print(f"kept   {name} (already in {ledger_dir})")
                continue
            with tar.extractfile(member) as src:
                data = src.read()
            tmp = ledger_dir / f".{name}.tmp"
            tmp.write_bytes(data)
            ledger.read_record(tmp, arrays=False)      # a record, readable, before it joins the ledger
            os.replace(tmp, ledger_dir / name)
            added.append(name)
            print(f"added  {name}")
    print(f"{len(added)} record(s) added to {ledger_dir}; commit them (git add {ledger_dir})")
    return added


def main(argv=None):
    args = parse_args(argv)
    if args.take:
        if not Path(args.take).is_file():
            sys.exit(f"error: --take {args.take}: no such file")
        return take(args.take, args.ledger)
    call = Call(args)
    runs = missing_runs(args, call.work / "runs")
    machine = ", ".join(f"{k} {v}" for k, v in ledger.machine(args.device).items())
    summary = [f"device_runs {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(call.started))}, commit "
               f"{(ledger.git_commit() or {}).get('head', 'unknown')[:10]}; {machine}",
               f"{len(runs)} missing run(s) of {' '.join(args.experiments) or 'all'} (budget {args.budget}, seeds "
               f"{' '.join(map(str, args.seeds))}); {args.jobs} at a time, {call.threads} torch thread(s) each; "
               f"budget {args.budget_s:.0f} s"]
    print("\n".join(summary), flush=True)     # the rest as it comes, then the whole summary again
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        check = None if args.no_check else pool.submit(call.train, f"{args.data}-{args.check_run}", 0, "check")
        for key, seed in runs:
            pool.submit(call.train, key, seed)
    summary += [line for which, line in call.results if which == "runs"]
    if check is not None:
        summary += ["check run: " + check.result(), agreement(args, call.ledgers["check"])]
    packed, left_out = call.write_partials()
    summary.append(f"done in {time.time() - call.started:.0f} s; records.tar: "
                   f"{len(list(call.ledgers['runs'].glob('*.npz')))} record(s)"
                   + (f"; stopped runs to resume (partial-K.tar): {' '.join(packed)}" if packed else "")
                   + (f"; stopped runs too large to bring back: {' '.join(left_out)}" if left_out else ""))
    text = "\n".join(summary) + "\n"
    (call.out / "summary.txt").write_text(text)
    call.write_archives()
    print(text)
    return text


if __name__ == "__main__":
    main()
