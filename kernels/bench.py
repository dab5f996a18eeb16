"""Benchmark of kernels.personalized_scm: fused Triton vs eager vs torch.compile(eager).

    python -m kernels.bench                       # the full grid of issue 5 (CUDA)
    python -m kernels.bench --B 4096 --Nm 8 --N 8 --d 8 --csv out.csv
    python -m kernels.bench --no-compile          # skip torch.compile (compiling every shape is slow)
    python -m kernels.bench --poison              # fused with the NaN fill the tests use

For every row: the median time (triton.testing.do_bench, return_mode="median") of the forward
("fwd") and of forward + backward ("fwdbwd", upstream gradients on all three outputs, gradients
for z, logits_A and logits_e; A is fixed, as in the model), the fewest bytes the op must move,
and the achieved fraction of the device's copy bandwidth, measured in the same run with a
1 GiB device-to-device copy (read + write counted).

Fewest bytes (float32, 4 bytes each):
    fwd    = read z, logits_A, logits_e, A + write e*, mask_A, mask_e
           = 4 (B N d + B N^2 + B N + N^2) + 4 B S (N d + N^2 + N)
    fwdbwd = fwd + read the upstream gradients 4 B S (N d + N^2 + N)
                 + read z, logits_A, logits_e again and write their gradients 8 (B N d + B N^2 + B N)

Without CUDA the fused kernel cannot run (the Triton interpreter is a correctness tool, not a
performance path) and there is no device copy bandwidth: the script then times the eager
function on the CPU over a small grid with time.perf_counter medians and says so.
"""

import argparse
import csv
import itertools
import os
import statistics
import sys
import time

import torch

import planrec

FULL_GRID = dict(B=[1024, 4096, 16384, 65536], Nm=[1, 4, 8, 16], N=[4, 8, 16], d=[8, 32])
CPU_GRID = dict(B=[256, 1024], Nm=[1, 8], N=[4, 8], d=[8])
FIELDS = ["device", "B", "N_m", "N", "d", "k_A", "k_e", "mode", "impl", "median_ms", "min_bytes",
          "achieved_GBps", "frac_copy_bw", "speedup_vs_eager", "note"]


def ks(N):
    """The model's proportions: half of the off-diagonal dependencies, 3/4 of the factors."""
    return max(1, N * (N - 1) // 2), max(1, (3 * N) // 4)


def min_bytes(B, S, N, d, mode):
    inputs = B * N * d + B * N * N + B * N
    outputs = B * S * (N * d + N * N + N)
    fwd = 4 * (inputs + N * N + outputs)
    if mode == "fwd":
        return fwd
    return fwd + 4 * outputs + 8 * inputs


def make_case(B, S, N, d, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(B, N, d, generator=g)
    A = torch.randn(N, N, generator=g)
    A = A * (0.5 / A.norm())
    la = torch.randn(B, N, N, generator=g)
    le = torch.randn(B, N, generator=g)
    z, A, la, le = (t.to(device) for t in (z, A, la, le))
    if grad:
        for t in (z, la, le):
            t.requires_grad_()
    up = [torch.randn(B, S, N, d, device=device), torch.randn(B, S, N, N, device=device),
          torch.randn(B, S, N, device=device)]
    return z, A, la, le, up


def runner(fn, case, S, N, mode):
    z, A, la, le, up = case
    k_A, k_e = ks(N)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(z, A, la, le, S, k_A, k_e, 1.0)
    else:
        def run():
            out = fn(z, A, la, le, S, k_A, k_e, 1.0)
            torch.autograd.backward(out, up)
    return run


def copy_bandwidth(do_bench):
    n = 1 << 28                                   # 1 GiB of float32
    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / (ms * 1e-3)


def bench_cuda(grid, args):
    import triton.testing
    from kernels import personalized_scm as fused
    kmod = sys.modules["kernels.personalized_scm"]
    kmod.POISON_OUTPUTS = args.poison
    do_bench = triton.testing.do_bench
    name = torch.cuda.get_device_name()
    bw = copy_bandwidth(do_bench)
    print(f"device: {name}; copy bandwidth {bw / 1e9:.0f} GB/s (1 GiB device-to-device copy, read + write)")
    impls = {"fused": fused, "eager": planrec.personalized_scm}
    if not args.no_compile:
        import torch._dynamo
        torch._dynamo.config.recompile_limit = 1024
        torch._dynamo.config.accumulated_recompile_limit = 4096
        impls["compile"] = torch.compile(planrec.personalized_scm)
    rows = []
    for B, S, N, d in itertools.product(grid["B"], grid["Nm"], grid["N"], grid["d"]):
        k_A, k_e = ks(N)
        for mode in args.modes:
            case = make_case(B, S, N, d, "cuda", grad=(mode == "fwdbwd"))
            nbytes = min_bytes(B, S, N, d, mode)
            times = {}
            for impl, fn in impls.items():
                note = ""
                try:
                    ms = do_bench(runner(fn, case, S, N, mode), return_mode="median")
                except torch.cuda.OutOfMemoryError:
                    ms, note = float("nan"), "out of memory"
                torch.cuda.empty_cache()
                times[impl] = ms
                rows.append(dict(device=name, B=B, N_m=S, N=N, d=d, k_A=k_A, k_e=k_e, mode=mode, impl=impl,
                                 median_ms=ms, min_bytes=nbytes, achieved_GBps=nbytes / (ms * 1e-3) / 1e9,
                                 frac_copy_bw=nbytes / (ms * 1e-3) / bw, note=note))
            for r in rows[-len(impls):]:
                r["speedup_vs_eager"] = times["eager"] / r["median_ms"]
            del case
            torch.cuda.empty_cache()
            print_rows(rows[-len(impls):], header=len(rows) == len(impls))
    return rows


def bench_cpu(grid, args):
    print("no CUDA device: timing the eager function only, on the CPU. The fused Triton kernel needs a GPU "
          "(under TRITON_INTERPRET=1 it runs in Python, which measures nothing), and there is no device "
          "copy bandwidth to compare against.")
    name = f"cpu ({os.cpu_count()} threads: {torch.get_num_threads()})"
    rows = []
    for B, S, N, d in itertools.product(grid["B"], grid["Nm"], grid["N"], grid["d"]):
        k_A, k_e = ks(N)
        for mode in args.modes:
            case = make_case(B, S, N, d, "cpu", grad=(mode == "fwdbwd"))
            run = runner(planrec.personalized_scm, case, S, N, mode)
            for _ in range(3):
                run()
            samples = []
            for _ in range(args.cpu_reps):
                t0 = time.perf_counter()
                run()
                samples.append(time.perf_counter() - t0)
            ms = statistics.median(samples) * 1e3
            nbytes = min_bytes(B, S, N, d, mode)
            rows.append(dict(device=name, B=B, N_m=S, N=N, d=d, k_A=k_A, k_e=k_e, mode=mode, impl="eager",
                             median_ms=ms, min_bytes=nbytes, achieved_GBps=nbytes / (ms * 1e-3) / 1e9,
                             frac_copy_bw=float("nan"), speedup_vs_eager=1.0,
                             note=f"median of {args.cpu_reps} time.perf_counter runs"))
            print_rows(rows[-1:], header=len(rows) == 1)
    return rows


def print_rows(rows, header):
    if header:
        print(f"{'B':>6} {'N_m':>3} {'N':>3} {'d':>3} {'mode':>6} {'impl':>8} {'ms':>10} {'MB':>9} "
              f"{'GB/s':>8} {'copy%':>6} {'x eager':>8}")
    for r in rows:
        print(f"{r['B']:>6} {r['N_m']:>3} {r['N']:>3} {r['d']:>3} {r['mode']:>6} {r['impl']:>8} "
              f"{r['median_ms']:>10.4f} {r['min_bytes'] / 1e6:>9.2f} {r['achieved_GBps']:>8.2f} "
              f"{100 * r['frac_copy_bw']:>6.1f} {r['speedup_vs_eager']:>8.2f} {r['note']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, nargs="+")
    p.add_argument("--Nm", type=int, nargs="+")
    p.add_argument("--N", type=int, nargs="+")
    p.add_argument("--d", type=int, nargs="+")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the eager function")
    p.add_argument("--poison", action="store_true", help="fused: NaN-fill the output buffers first, as the tests do")
    p.add_argument("--cpu-reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU path: torch threads (1 is steadier on a shared machine; default: torch's)")
    p.add_argument("--csv", default="bench_out/personalized_scm.csv")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    grid = dict(FULL_GRID if cuda else CPU_GRID)
    for key in grid:
        if getattr(args, key) is not None:
            grid[key] = getattr(args, key)
    rows = bench_cuda(grid, args) if cuda else bench_cpu(grid, args)
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.csv}")
    if cuda:
        report_goals(rows)


def report_goals(rows):
    """The issue's goals, where the grid contains their rows."""
    def t(B, S, N, d, mode, impl):
        for r in rows:
            if (r["B"], r["N_m"], r["N"], r["d"], r["mode"], r["impl"]) == (B, S, N, d, mode, impl):
                return r
        return None
    f, e, c = (t(4096, 8, 8, 8, "fwd", i) for i in ("fused", "eager", "compile"))
    if f and e:
        print(f"goal fwd  B=4096 N_m=8 N=8 d=8: fused {e['median_ms'] / f['median_ms']:.1f}x eager (goal 10x)"
              + (f", {c['median_ms'] / f['median_ms']:.1f}x torch.compile (goal 2x)" if c else ""))
    f, e = t(4096, 8, 8, 8, "fwdbwd", "fused"), t(4096, 8, 8, 8, "fwdbwd", "eager")
    if f and e:
        print(f"goal fwdbwd B=4096 N_m=8 N=8 d=8: fused {e['median_ms'] / f['median_ms']:.1f}x eager (goal 5x)")
    for r in rows:
        if r["B"] == 65536 and r["mode"] == "fwd" and r["impl"] == "fused":
            print(f"goal fwd  B=65536 N_m={r['N_m']} N={r['N']} d={r['d']}: {100 * r['frac_copy_bw']:.0f}% "
                  "of copy bandwidth (goal 50%)")


if __name__ == "__main__":
    main()
