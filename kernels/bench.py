"""Benchmark of kernels.personalized_scm: fused Triton vs eager vs torch.compile vs CUDA graphs.

    python -m kernels.bench                       # the full grid of issue 5 (CUDA)
    python -m kernels.bench --B 4096 --Nm 8 --N 8 --d 8 --csv out.csv
    python -m kernels.bench --no-compile          # skip the torch.compile rows (slow to compile)
    python -m kernels.bench --poison              # fused with the NaN fill the tests use
    python -m kernels.bench --sweep               # the fused kernel's rows/examples per program x warps
    python -m kernels.bench --ablations --no-compile --B 65536 --Nm 8 --N 8 --d 8 --modes fwd
                                                  # what bounds the kernel (issue 21)

Implementations ("impl" column). The first five get IDENTICAL inputs, the noise included
(uniform_A, uniform_e drawn once per shape), so each computes the same function on the same
data:
    fused               kernels.personalized_scm (Triton, one launch each way)
    eager_solve         planrec.personalized_scm as the model runs it (torch.linalg.solve, whose
                        error check is a device-to-host sync on CUDA)
    eager_solve_ex      the same with torch.linalg.solve_ex (no host sync)
    compile             torch.compile(eager_solve_ex, dynamic=False)
    compile_cudagraphs  torch.compile(eager_solve_ex, mode="reduce-overhead", dynamic=False):
                        CUDA graphs replay the whole op without per-kernel launch overhead
The model's own path draws the noise inside the op; two more rows time that:
    fused_philox        the fused kernel with a seed: Philox noise drawn in the kernel
    eager_rand          planrec.personalized_scm drawing its noise with torch.rand
One more row times the fused op inside a compiled graph (with the torch.compile rows):
    fused_cudagraphs    torch.compile(kernels.personalized_scm, mode="reduce-overhead"): the
                        registered op replayed from a CUDA graph, without the host's per-call cost
Ablations (--ablations, or named in --impls; forward only): the model path (fused_philox) with one
part of the work removed, to say what bounds the kernel. All but the first compute WRONG
results on purpose, so they are checked only for their mask counts ("ablation" in the check
column); the difference to fused_philox is the cost of the part removed:
    fused_philox_nogather       rows and columns of register tiles read by masked sums instead
                                of tl.gather (correct, checked like fused_philox; fwd and fwdbwd)
    ablate_fixed_mask           no top-K: the first k candidates (the noise still drawn)
    ablate_no_solve             no elimination: e* = mask_e * z
    ablate_fixed_mask_no_solve  neither: noise, loads and stores only
(uniforms given vs drawn is fused vs fused_philox.) report_ablations prints the differences.

Before an implementation is timed at a shape, its outputs (and, for fwdbwd, its gradients) are
checked at that exact shape against eager_solve on the same inputs (fused_philox against
eager_solve fed with the kernel's Philox uniforms; eager_rand by its mask counts and the solve
residual). A wrong implementation is reported ("WRONG: ...") and not timed. The masks must agree
on all but a tiny fraction of rows (an exact float tie at the K-th place, ~1e-6 per row, may be
broken differently by torch.topk); values are compared on the rows where they agree.

For every row: the median time (triton.testing.do_bench, return_mode="median", grad_to_none on
the inputs so no repetition pays gradient accumulation) of the forward ("fwd", under no_grad)
and of forward + backward ("fwdbwd", upstream gradients on all three outputs, gradients for z,
logits_A and logits_e; A is fixed, as in the model); the fewest bytes the op must move; and the
achieved fraction of the device's copy bandwidth, measured in the same run with a 1 GiB
device-to-device copy (read + write counted).

Fewest bytes (float32, 4 bytes each), the model's path:
    fwd    = read z, logits_A, logits_e, A + write e*, mask_A, mask_e
           = 4 (B N d + B N^2 + B N + N^2) + 4 B S (N d + N^2 + N)
    fwdbwd = fwd + read the upstream gradients 4 B S (N d + N^2 + N)
                 + read z, logits_A, logits_e again and write their gradients 8 (B N d + B N^2 + B N)
Rows whose noise is an input add one read of the uniforms, 4 B S (N^2 + N).

The CSV is written row by row (flushed), so a run cut short keeps every finished row. After
each shape the registers and spills of every compiled variant of the fused kernels are printed
("kernel variant:" lines).

Without CUDA the fused kernel cannot run (the Triton interpreter is a correctness tool, not a
performance path) and there is no device copy bandwidth: the script then times the eager
function on the CPU over a small grid with time.perf_counter medians and says so.
"""

import argparse
import csv
import importlib
import itertools
import os
import statistics
import time

import torch

import planrec

FULL_GRID = dict(B=[1024, 4096, 16384, 65536], Nm=[1, 4, 8, 16], N=[4, 8, 16], d=[8, 32])
CPU_GRID = dict(B=[256, 1024], Nm=[1, 8], N=[4, 8], d=[8])
FIELDS = ["device", "B", "N_m", "N", "d", "k_A", "k_e", "mode", "impl", "median_ms", "min_bytes",
          "achieved_GBps", "frac_copy_bw", "speedup_vs_eager", "check", "note"]
SAME_INPUT_IMPLS = ["fused", "eager_solve", "eager_solve_ex", "compile", "compile_cudagraphs", "fused_cudagraphs"]
MODEL_PATH_IMPLS = ["fused_philox", "eager_rand"]
# launch variants of the model path (kernels.personalized_scm.Blocks fields), see the docstring
ABLATIONS = {"fused_philox_nogather": dict(gather=False),
             "ablate_fixed_mask": dict(ablation=1),
             "ablate_no_solve": dict(ablation=2),
             "ablate_fixed_mask_no_solve": dict(ablation=3)}
ABLATION_IMPLS = list(ABLATIONS)
TAU = 1.0
SEED = 1234


def ks(N):
    """The model's proportions: half of the off-diagonal dependencies, 3/4 of the factors."""
    return max(1, N * (N - 1) // 2), max(1, (3 * N) // 4)


def min_bytes(B, S, N, d, mode, noise_is_input):
    inputs = B * N * d + B * N * N + B * N
    outputs = B * S * (N * d + N * N + N)
    total = 4 * (inputs + N * N + outputs)
    if mode == "fwdbwd":
        total += 4 * outputs + 8 * inputs
    if noise_is_input:
        total += 4 * B * S * (N * N + N)
    return total


def eager_solve_ex(z, A, logits_A, logits_e, n_samples, k_A, k_e, tau=1.0, uniform_A=None, uniform_e=None):
    """planrec.personalized_scm with torch.linalg.solve_ex: no device-to-host sync for the error check."""
    mask_A, mask_e = planrec.sample_masks(logits_A, logits_e, n_samples, k_A, k_e, tau, uniform_A, uniform_e)
    N = z.shape[1]
    system = torch.eye(N, dtype=z.dtype, device=z.device) - (mask_A * A).transpose(-1, -2)
    e_star = torch.linalg.solve_ex(system, mask_e[..., None] * z[:, None], check_errors=False)[0]
    return e_star, mask_A, mask_e


def make_case(B, S, N, d, device):
    """One set of inputs per shape, shared by every implementation and both modes."""
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(B, N, d, generator=g)
    A = torch.randn(N, N, generator=g)
    A = A * (0.5 / A.norm())                      # cond(I - (M*A)^T) <= 3
    la = torch.randn(B, N, N, generator=g)
    le = torch.randn(B, N, generator=g)
    uA = torch.rand(B, S, N, N, generator=g).clamp_(min=torch.finfo(torch.float32).tiny)
    ue = torch.rand(B, S, N, generator=g).clamp_(min=torch.finfo(torch.float32).tiny)
    up = [torch.randn(B, S, N, d, generator=g), torch.randn(B, S, N, N, generator=g),
          torch.randn(B, S, N, generator=g)]
    z, A, la, le, uA, ue = (t.to(device) for t in (z, A, la, le, uA, ue))
    for t in (z, la, le):
        t.requires_grad_()
    return dict(z=z, A=A, la=la, le=le, uA=uA, ue=ue, up=[u.to(device) for u in up])


def seeded(impl):
    """Rows whose noise the kernel draws from SEED (the model path and its variants)."""
    return impl == "fused_philox" or impl in ABLATIONS


def fused_variant(blocks):
    """kernels.personalized_scm's plain path with launch Blocks (the sweep's and the ablations' rows)."""
    kmod = importlib.import_module("kernels.personalized_scm")

    def fn(z, A, la, le, S, k_A, k_e, tau=1.0, uA=None, ue=None, seed=None):
        return kmod.PersonalizedSCMFunction.apply(z, A, la, le, S, k_A, k_e, float(tau), uA, ue,
                                                  SEED if seed is None else seed, blocks)
    return fn


def call(impl, fn, case, S, N):
    k_A, k_e = ks(N)
    c = case
    if seeded(impl):
        return fn(c["z"], c["A"], c["la"], c["le"], S, k_A, k_e, TAU, seed=SEED)
    if impl == "eager_rand":
        return fn(c["z"], c["A"], c["la"], c["le"], S, k_A, k_e, TAU)
    return fn(c["z"], c["A"], c["la"], c["le"], S, k_A, k_e, TAU, c["uA"], c["ue"])


def _new_cudagraph_step(impl):
    """Under CUDA graphs (mode="reduce-overhead") each call starts a new step, so the graph may
    overwrite the previous call's outputs instead of keeping them alive."""
    mark_step = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    if impl.endswith("cudagraphs") and mark_step is not None:
        mark_step()


def runner(impl, fn, case, S, N, mode):
    def run():
        _new_cudagraph_step(impl)
        if mode == "fwd":
            with torch.no_grad():
                call(impl, fn, case, S, N)
        else:
            torch.autograd.backward(call(impl, fn, case, S, N), case["up"])
    return run


def _outputs_and_grads(impl, fn, case, S, N, mode):
    inputs = [case["z"], case["la"], case["le"]]
    if mode == "fwd":
        with torch.no_grad():
            return [t.detach().clone() for t in call(impl, fn, case, S, N)], None
    _new_cudagraph_step(impl)
    out = call(impl, fn, case, S, N)
    grads = torch.autograd.grad(out, inputs, case["up"])
    return [t.detach().clone() for t in out], [g.detach().clone() for g in grads]


def _close(got, want, mask, name):
    """max |got - want| on the rows in `mask` against 1e-4 of the largest reference value (an
    error of a wrong formula is O(1) relative; float32 solves with cond <= 3 are ~1e-6)."""
    got, want = got[mask].float(), want[mask].float()
    if want.numel() == 0:
        return None
    scale = max(want.abs().max().item(), 1.0 if name.startswith("grad_logits") else 1e-3)
    err = (got - want).abs().max().item()
    if not err <= 1e-4 * scale:        # also catches NaN
        return f"{name} off by {err:.3g} (scale {scale:.3g})"
    return None


def check(impl, fn, case, S, N, mode, reference):
    """None if impl agrees with the reference at this shape, else what is wrong."""
    out, grads = _outputs_and_grads(impl, fn, case, S, N, mode)
    k_A, k_e = ks(N)
    mask_A, mask_e = out[1], out[2]
    counts_ok = (torch.all(mask_A.sum((-1, -2)) == k_A) and torch.all(mask_e.sum(-1) == k_e)
                 and torch.all(torch.diagonal(mask_A, dim1=-2, dim2=-1) == 0))
    if not counts_ok:
        return "masks do not have exactly k_A / k_e ones off the diagonal"
    if impl.startswith("ablate_"):    # wrong on purpose: only the counts are checked
        return None
    if impl == "eager_rand":          # its code is the reference: check what it must satisfy
        system = torch.eye(N, device=mask_A.device) - (mask_A * case["A"]).transpose(-1, -2)
        residual = (system @ out[0] - mask_e[..., None] * case["z"].detach()[:, None]).abs().max().item()
        return None if residual <= 1e-4 * max(case["z"].abs().max().item(), 1.0) else f"solve residual {residual:.3g}"
    ref_out, ref_grads = reference
    same_row = (mask_A == ref_out[1]).all(-1).all(-1) & (mask_e == ref_out[2]).all(-1)    # [B, S]
    if (~same_row).float().mean().item() > 1e-4:
        return f"masks differ on {(~same_row).sum().item()} of {same_row.numel()} rows"
    problems = [_close(out[0], ref_out[0], same_row, "e_star")]
    if grads is not None:
        same_example = same_row.all(-1)
        problems += [_close(g, r, same_example, name)
                     for g, r, name in zip(grads, ref_grads, ["grad_z", "grad_logits_A", "grad_logits_e"])]
    problems = [p for p in problems if p]
    return "; ".join(problems) or None


def copy_bandwidth(do_bench):
    n = 1 << 28                                   # 1 GiB of float32
    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / (ms * 1e-3)


def set_dynamo_limits(limit):
    """Raise the recompile limit under whichever name this torch has (recompile_limit from 2.7 on,
    cache_size_limit before). Each shape also starts from torch._dynamo.reset(), so the limit
    only matters when one shape needs several graphs (fwd under no_grad, fwdbwd)."""
    import torch._dynamo
    config = torch._dynamo.config
    for names in (("recompile_limit", "cache_size_limit"),
                  ("accumulated_recompile_limit", "accumulated_cache_size_limit")):
        for name in names:
            if hasattr(config, name):
                setattr(config, name, limit)
                break


def implementations(args, kmod):
    impls = {"fused": kmod.personalized_scm, "eager_solve": planrec.personalized_scm,
             "eager_solve_ex": eager_solve_ex}
    if not args.no_compile:
        impls["compile"] = torch.compile(eager_solve_ex, dynamic=False)
        impls["compile_cudagraphs"] = torch.compile(eager_solve_ex, mode="reduce-overhead", dynamic=False)
        impls["fused_cudagraphs"] = torch.compile(kmod.personalized_scm, mode="reduce-overhead", dynamic=False)
    impls["fused_philox"] = kmod.personalized_scm
    impls["eager_rand"] = planrec.personalized_scm
    for name, fields in ABLATIONS.items():
        if fields.get("gather") is False and not kmod.HAS_GATHER:
            continue                    # without tl.gather the default already is the masked sums
        impls[name] = fused_variant(kmod.Blocks(**fields))
    wanted = args.impls or [k for k in impls if k not in ABLATIONS or args.ablations]
    return {k: v for k, v in impls.items() if k in wanted}


def bench_cuda(grid, args, writer):
    import triton.testing
    kmod = importlib.import_module("kernels.personalized_scm")
    kmod.POISON_OUTPUTS = args.poison
    do_bench = triton.testing.do_bench
    name = torch.cuda.get_device_name()
    bw = copy_bandwidth(do_bench)
    print(f"device: {name}; copy bandwidth {bw / 1e9:.0f} GB/s (1 GiB device-to-device copy, read + write)")
    if not args.no_compile:
        set_dynamo_limits(64)

    def time_ms(run, grad_to_none):
        return do_bench(run, grad_to_none=grad_to_none, return_mode="median")
    rows = []
    reported = set()
    for B, S, N, d in itertools.product(grid["B"], grid["Nm"], grid["N"], grid["d"]):
        if not args.no_compile:
            torch._dynamo.reset()           # compile this shape afresh (static shapes, no recompile limit)
        impls = implementations(args, kmod)
        rows += measure_shape(B, S, N, d, impls, args.modes, "cuda", time_ms, bw, name, writer,
                              header=not rows)
        for line in kmod.compiled_variant_report():
            if line not in reported:
                reported.add(line)
                print(f"kernel variant: {line}")
        torch.cuda.empty_cache()
    return rows


def measure_shape(B, S, N, d, impls, modes, device, time_ms, copy_bw, device_name, writer, header=False):
    """Check, then time, every implementation at one shape on the same inputs; returns the rows
    (also passed to `writer` as they finish). time_ms(run, grad_to_none) -> median ms."""
    kmod = importlib.import_module("kernels.personalized_scm")
    k_A, k_e = ks(N)
    case = make_case(B, S, N, d, device)
    rows = []
    for mode in modes:
        reference = _outputs_and_grads("eager_solve", planrec.personalized_scm, case, S, N, mode)
        philox_reference = None
        if any(seeded(impl) for impl in impls):
            uA, ue = kmod.philox_uniforms(B, S, N, SEED, device)
            philox_reference = _outputs_and_grads("eager_solve", planrec.personalized_scm,
                                                  dict(case, uA=uA, ue=ue), S, N, mode)
        times, shape_rows = {}, []
        for impl, fn in impls.items():
            if mode == "fwdbwd" and impl.startswith("ablate_"):
                continue                  # the ablations change the forward only
            note, verdict, ms = "", "ok", float("nan")
            try:
                problem = check(impl, fn, case, S, N, mode, philox_reference if seeded(impl) else reference)
                if problem:
                    verdict, note = "WRONG", problem
                    print(f"WRONG: {impl} B={B} N_m={S} N={N} d={d} {mode}: {problem}")
                else:
                    ms = time_ms(runner(impl, fn, case, S, N, mode), [case["z"], case["la"], case["le"]])
                    if impl.startswith("ablate_"):
                        verdict, note = "ablation", "wrong on purpose: mask counts checked only"
            except torch.cuda.OutOfMemoryError:
                verdict, note = "not run", "out of memory"
            except Exception as exc:       # one failing baseline must not lose the other rows
                message = str(exc).splitlines()[0][:160] if str(exc) else ""
                verdict, note = "failed", f"{type(exc).__name__}: {message}"
                print(f"failed: {impl} B={B} N_m={S} N={N} d={d} {mode}: {note}")
            if device == "cuda":
                torch.cuda.empty_cache()
            times[impl] = ms
            nbytes = min_bytes(B, S, N, d, mode, noise_is_input=impl in SAME_INPUT_IMPLS)
            shape_rows.append(dict(device=device_name, B=B, N_m=S, N=N, d=d, k_A=k_A, k_e=k_e, mode=mode,
                                   impl=impl, median_ms=ms, min_bytes=nbytes,
                                   achieved_GBps=nbytes / (ms * 1e-3) / 1e9,
                                   frac_copy_bw=nbytes / (ms * 1e-3) / copy_bw, check=verdict, note=note))
        for r in shape_rows:
            base = times.get("eager_rand" if seeded(r["impl"]) or r["impl"] in MODEL_PATH_IMPLS else "eager_solve",
                             float("nan"))
            r["speedup_vs_eager"] = base / r["median_ms"]
            writer(r)
        print_rows(shape_rows, header=header and not rows)
        rows += shape_rows
    return rows


SWEEP = dict(rows=(8, 16, 32, 64), examples=(1, 2, 4, 8), warps=(1, 2, 4, 8))


def sweep_blocks(shapes, writer, device="cuda", time_ms=None, copy_bw=None, grid=SWEEP):
    """The fused kernel's launch parameters: forward rows per program x warps (fwd), then
    backward examples per program x warps with the default forward (fwdbwd), at each (B, N_m, N, d)
    of `shapes`. Each variant is checked against eager_solve before it is timed, like every other
    row. Returns the rows and one "best" line per shape and mode."""
    kmod = importlib.import_module("kernels.personalized_scm")
    name = torch.cuda.get_device_name() if device == "cuda" else device
    if time_ms is None:
        import triton.testing
        copy_bw = copy_bandwidth(triton.testing.do_bench)

        def time_ms(run, grad_to_none):
            return triton.testing.do_bench(run, grad_to_none=grad_to_none, return_mode="median")
    print(f"device: {name}; copy bandwidth {copy_bw / 1e9:.0f} GB/s; default launch: {kmod.NUM_WARPS} warps forward, "
          f"{kmod.BACKWARD_NUM_WARPS} backward, "
          f"about {kmod.TILE_ELEMENTS} elements per tile")

    fused_with = fused_variant
    rows, best_lines = [], []
    for B, S, N, d in shapes:
        variants = {"fwd": {f"fused rows={r} warps={w}": kmod.Blocks(rows=r, warps=w)
                            for r in grid["rows"] for w in grid["warps"]},
                    "fwdbwd": {f"fused examples={e} bwarps={w}": kmod.Blocks(examples=e, backward_warps=w)
                               for e in grid["examples"] for w in grid["warps"]}}
        for mode, blocks in variants.items():
            impls = {"eager_solve": planrec.personalized_scm, "fused": kmod.personalized_scm}
            impls.update({label: fused_with(b) for label, b in blocks.items()})
            shape_rows = measure_shape(B, S, N, d, impls, [mode], device, time_ms, copy_bw, name, writer,
                                       header=not rows)
            rows += shape_rows
            timed = [r for r in shape_rows if r["impl"].startswith("fused ") and r["check"] == "ok"]
            default = next(r for r in shape_rows if r["impl"] == "fused")
            if timed:
                best = min(timed, key=lambda r: r["median_ms"])
                best_lines.append(f"sweep best {mode:6s} B={B} N_m={S} N={N} d={d}: {best['impl']} "
                                  f"{best['median_ms']:.4f} ms vs default {default['median_ms']:.4f} ms "
                                  f"({default['median_ms'] / best['median_ms']:.2f}x)")
                print(best_lines[-1])
        for line in kmod.compiled_variant_report():
            print(f"kernel variant: {line}")
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, best_lines


def bench_cpu(grid, args, writer):
    print("no CUDA device: timing the eager function only, on the CPU. The fused Triton kernel needs a GPU "
          "(under TRITON_INTERPRET=1 it runs in Python, which measures nothing), and there is no device "
          "copy bandwidth to compare against.")
    name = f"cpu ({os.cpu_count()} threads: {torch.get_num_threads()})"
    rows = []
    for B, S, N, d in itertools.product(grid["B"], grid["Nm"], grid["N"], grid["d"]):
        k_A, k_e = ks(N)
        case = make_case(B, S, N, d, "cpu")
        for mode in args.modes:
            run = runner("eager_rand", planrec.personalized_scm, case, S, N, mode)
            for _ in range(3):
                run()
            samples = []
            for _ in range(args.cpu_reps):
                for t in (case["z"], case["la"], case["le"]):
                    t.grad = None
                t0 = time.perf_counter()
                run()
                samples.append(time.perf_counter() - t0)
            ms = statistics.median(samples) * 1e3
            nbytes = min_bytes(B, S, N, d, mode, noise_is_input=False)
            row = dict(device=name, B=B, N_m=S, N=N, d=d, k_A=k_A, k_e=k_e, mode=mode, impl="eager_rand",
                       median_ms=ms, min_bytes=nbytes, achieved_GBps=nbytes / (ms * 1e-3) / 1e9,
                       frac_copy_bw=float("nan"), speedup_vs_eager=1.0, check="reference",
                       note=f"median of {args.cpu_reps} time.perf_counter runs")
            writer(row)
            rows.append(row)
            print_rows([row], header=len(rows) == 1)
    return rows


def print_rows(rows, header):
    if header:
        print(f"{'B':>6} {'N_m':>3} {'N':>3} {'d':>3} {'mode':>6} {'impl':>18} {'ms':>10} {'MB':>9} "
              f"{'GB/s':>8} {'copy%':>6} {'x eager':>8}")
    for r in rows:
        print(f"{r['B']:>6} {r['N_m']:>3} {r['N']:>3} {r['d']:>3} {r['mode']:>6} {r['impl']:>18} "
              f"{r['median_ms']:>10.4f} {r['min_bytes'] / 1e6:>9.2f} {r['achieved_GBps']:>8.2f} "
              f"{100 * r['frac_copy_bw']:>6.1f} {r['speedup_vs_eager']:>8.2f} {r['check']} {r['note']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, nargs="+")
    p.add_argument("--Nm", type=int, nargs="+")
    p.add_argument("--N", type=int, nargs="+")
    p.add_argument("--d", type=int, nargs="+")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--impls", nargs="+", choices=SAME_INPUT_IMPLS + MODEL_PATH_IMPLS + ABLATION_IMPLS,
                   help="CUDA: only these implementations (default: all but the ablations)")
    p.add_argument("--ablations", action="store_true",
                   help="CUDA: add the ablation rows (what bounds the kernel; see the docstring)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--poison", action="store_true", help="fused: NaN-fill the output buffers first, as the tests do")
    p.add_argument("--sweep", action="store_true",
                   help="CUDA: time the fused kernel's launch parameters (rows or examples per program, warps) at "
                        "--B (default 4096 65536) and the first --Nm/--N/--d (default 8)")
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
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        f.flush()

        def writer(row):              # row by row: a run cut short keeps what it measured
            w.writerow(row)
            f.flush()
        if args.sweep and not cuda:
            raise SystemExit("--sweep times the compiled kernel and needs a CUDA device")
        if args.sweep:
            shapes = [(B, (args.Nm or [8])[0], (args.N or [8])[0], (args.d or [8])[0]) for B in args.B or [4096, 65536]]
            rows, _ = sweep_blocks(shapes, writer)
        else:
            rows = bench_cuda(grid, args, writer) if cuda else bench_cpu(grid, args, writer)
    print(f"wrote {len(rows)} rows to {args.csv}")
    if cuda and not args.sweep:
        report_goals(rows)
        report_ablations(rows)


def report_goals(rows):
    """The issue's goals, where the grid contains their rows."""
    def ms(B, S, N, d, mode, impl):
        for r in rows:
            if (r["B"], r["N_m"], r["N"], r["d"], r["mode"], r["impl"]) == (B, S, N, d, mode, impl):
                return r["median_ms"]
        return float("nan")
    for fused, eager, compiled, label in [("fused", "eager_solve", "compile", "same inputs"),
                                          ("fused_philox", "eager_rand", None, "model path, noise in the op")]:
        f = ms(4096, 8, 8, 8, "fwd", fused)
        line = f"goal fwd    B=4096 N_m=8 N=8 d=8 ({label}): fused {ms(4096, 8, 8, 8, 'fwd', eager) / f:.1f}x eager (goal 10x)"
        if compiled:
            line += (f", {ms(4096, 8, 8, 8, 'fwd', compiled) / f:.1f}x torch.compile (goal 2x), "
                     f"{ms(4096, 8, 8, 8, 'fwd', 'compile_cudagraphs') / f:.1f}x compile+CUDA graphs, "
                     f"{ms(4096, 8, 8, 8, 'fwd', 'eager_solve_ex') / f:.1f}x eager solve_ex")
        print(line)
        f = ms(4096, 8, 8, 8, "fwdbwd", fused)
        print(f"goal fwdbwd B=4096 N_m=8 N=8 d=8 ({label}): fused {ms(4096, 8, 8, 8, 'fwdbwd', eager) / f:.1f}x eager "
              "(goal 5x)")
    for mode in ("fwd", "fwdbwd"):
        graphed = ms(4096, 8, 8, 8, mode, "fused_cudagraphs")
        if graphed == graphed:          # not NaN: the row was measured
            print(f"goal {mode:6s} B=4096 N_m=8 N=8 d=8 (same inputs): the fused op replayed from a CUDA graph "
                  f"{ms(4096, 8, 8, 8, mode, 'eager_solve') / graphed:.1f}x eager, "
                  f"{ms(4096, 8, 8, 8, mode, 'compile_cudagraphs') / graphed:.1f}x compile+CUDA graphs, "
                  f"{ms(4096, 8, 8, 8, mode, 'fused') / graphed:.1f}x the fused op called eagerly")
    for r in rows:
        if r["B"] == 65536 and r["mode"] == "fwd" and r["impl"] in ("fused", "fused_philox"):
            print(f"goal fwd    B=65536 N_m={r['N_m']} N={r['N']} d={r['d']} {r['impl']}: "
                  f"{100 * r['frac_copy_bw']:.0f}% of copy bandwidth (goal 50%)")


def report_ablations(rows):
    """One line per forward shape with ablation rows: the time of each part of the model path's
    forward (fused_philox minus the ablation without it), and the floor the rest leaves."""
    lines = []
    fwd = {}
    for r in rows:
        if r["mode"] == "fwd" and r["check"] in ("ok", "ablation"):
            fwd.setdefault((r["B"], r["N_m"], r["N"], r["d"]), {})[r["impl"]] = r
    for (B, S, N, d), impls in sorted(fwd.items()):
        if "fused_philox" not in impls or not any(k.startswith("ablate_") for k in impls):
            continue
        full = impls["fused_philox"]["median_ms"]
        parts = [f"fused_philox {full:.4f} ms ({100 * impls['fused_philox']['frac_copy_bw']:.1f}% of copy bw)"]
        if "fused" in impls:
            parts.append(f"Philox vs uniforms read {full - impls['fused']['median_ms']:+.4f} ms")
        for impl, label in [("ablate_fixed_mask", "top-K"), ("ablate_no_solve", "solve")]:
            if impl in impls:
                parts.append(f"{label} {full - impls[impl]['median_ms']:.4f} ms")
        if "ablate_fixed_mask_no_solve" in impls:
            rest = impls["ablate_fixed_mask_no_solve"]
            parts.append(f"neither: {rest['median_ms']:.4f} ms ({100 * rest['frac_copy_bw']:.1f}% of copy bw)")
        if "fused_philox_nogather" in impls:
            parts.append(f"masked sums instead of tl.gather {impls['fused_philox_nogather']['median_ms'] - full:+.4f} ms")
        lines.append(f"ablation fwd B={B} N_m={S} N={N} d={d}: " + "; ".join(parts))
        print(lines[-1])
    return lines


if __name__ == "__main__":
    main()
