"""The fused LM head + divergence against the eager reference (and Liger-Kernel where installed).

    python benchmarks/fused_loss.py gpu [--tokens 8192] [--kinds gjsd fkl]   # on a CUDA device
    python benchmarks/fused_loss.py cpu [--vocab 32000 --hidden 256]          # peak memory on the CPU
    TRITON_INTERPRET=1 python benchmarks/fused_loss.py gpu --dry-run          # the GPU table, tiny, on CPU

``gpu``: forward + backward (student gradients) at N tokens for the Llama-3 shape (H = 4096,
V = 128256) and the Qwen shape (H = 2048, V = 151936), bf16 inputs: median time of >= 10 runs
after warm-up (triton.testing.do_bench) and peak memory above the inputs
(torch.cuda.max_memory_allocated). Methods: ``distill`` (Triton kernels), ``eager`` (full logits,
then ``distill.losses.divergence``) and ``liger`` (LigerFusedLinearJSD, gjsd only, when
importable). The matmul floor is 8 N H V FLOPs (the four matmuls of forward and backward), reported at the H100 bf16
spec (989 TFLOP/s) and as the time of the same four matmuls measured in this run.

``cpu``: each configuration in a fresh process; peak memory is the process's maximum resident
size above what it held once the inputs existed (resource.getrusage). glibc is told to map every
allocation above 64 KiB on its own (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident
set at once and the peak is that of live memory, not of heap fragmentation. Shows that the fused
path's peak grows with the chunk and not with N, against the reference at the same N.

Writes ``fused_loss_<device>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from environment import environment

from distill.losses import divergence, fused_linear_divergence

SHAPES = {"llama3": (4096, 128256), "qwen": (2048, 151936)}
H100_BF16_FLOPS = 989e12
RESULTS = Path(__file__).parent / "results"


def flops(n: int, h: int, v: int) -> float:
    """Student and teacher logits, student dX and dW (teacher hidden = student hidden)."""
    return 8.0 * n * h * v


def inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)

    def r(*shape, scale):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    xs = r(n, h, scale=1.0).requires_grad_()
    ws = r(v, h, scale=h**-0.5).requires_grad_()
    xt, wt = r(n, h, scale=1.0), r(v, h, scale=2 * h**-0.5)  # a sharper teacher
    return xs, ws, xt, wt


def method_fn(method: str, xs, ws, xt, wt, kind: str, chunk: int | None):
    """A closure running forward + backward once and returning the (detached) loss."""
    if method in ("distill", "distill-torch"):
        backend = "triton" if method == "distill" else "torch"

        def loss():
            return fused_linear_divergence(xs, ws, xt, wt, kind=kind, beta=0.5, chunk_size=chunk, backend=backend)
    elif method == "eager":
        def loss():
            return divergence(xs @ ws.T, (xt @ wt.T).detach(), kind=kind, beta=0.5, backend="torch")
    elif method == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_jsd

        def loss():
            return liger_fused_linear_jsd(xs, ws, xt, wt, None, 0.5)
    else:
        raise ValueError(method)

    def fn():
        xs.grad = ws.grad = None
        out = loss()
        out.backward()
        return out.detach()
    return fn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def matmul_floor_fn(xs, ws, xt, wt):
    """The four matmuls of the fused loss alone: the measured floor."""
    n, v = xs.shape[0], ws.shape[0]
    g = torch.randn(n, v, device=xs.device).to(xs.dtype)
    x, w, x_t, w_t = xs.detach(), ws.detach(), xt.detach(), wt.detach()

    def fn():
        x @ w.T
        x_t @ w_t.T
        g @ w
        g.T @ x
    return fn


def time_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=3, rep=10, return_mode="median"))
    times = []
    for i in range(4):
        t0 = time.perf_counter()
        fn()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_bytes(fn, device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def gpu(args) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        sys.exit("gpu: no CUDA device (use --dry-run with TRITON_INTERPRET=1 to check the script on a CPU)")
    shapes = {"tiny": (64, 1000)} if args.dry_run else SHAPES
    n = 96 if args.dry_run else args.tokens
    methods = ["eager", "distill"]
    try:
        import liger_kernel  # noqa: F401

        methods.append("liger")
    except ImportError:
        pass
    rows = []
    for shape, (h, v) in shapes.items():
        xs, ws, xt, wt = inputs(n, h, v, torch.bfloat16, device)
        floor_ms = time_ms(matmul_floor_fn(xs, ws, xt, wt), device)
        spec_ms = flops(n, h, v) / H100_BF16_FLOPS * 1e3
        for kind in args.kinds:
            reference = None  # eager's loss and gradients: every method is checked against them
            for method in methods:
                if method == "liger" and kind != "gjsd":
                    continue
                fn = method_fn(method, xs, ws, xt, wt, kind, None)
                try:
                    loss = fn()
                    grads = (xs.grad.clone(), ws.grad.clone())
                    ms, mem = time_ms(fn, device), peak_bytes(fn, device)
                except torch.OutOfMemoryError:
                    loss, grads, ms, mem = None, None, None, None
                    torch.cuda.empty_cache()
                if method == "eager" and loss is not None:
                    reference = (loss, grads)
                check = {}
                if reference is not None and loss is not None:
                    check = {"loss_rel_err_vs_eager": abs(float(loss) - float(reference[0])) / abs(float(reference[0])),
                             "grad_x_rel_err_vs_eager": rel_err(grads[0], reference[1][0]),
                             "grad_w_rel_err_vs_eager": rel_err(grads[1], reference[1][1])}
                rows.append({
                    "shape": shape, "N": n, "H": h, "V": v, "kind": kind, "method": method, "ms": ms,
                    "peak_gb": None if mem is None else mem / 1e9, "loss": None if loss is None else float(loss),
                    "fraction_of_spec_floor": None if ms is None else spec_ms / ms,
                    "fraction_of_measured_floor": None if ms is None else floor_ms / ms, **check,
                })
                print(rows[-1], flush=True)
                del grads
        rows.append({"shape": shape, "N": n, "H": h, "V": v, "method": "matmul floor (measured)", "ms": floor_ms,
                     "spec_floor_ms": spec_ms})
        del xs, ws, xt, wt
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu-dry-run"
    return {"device": name, "torch": torch.__version__, "dtype": "bfloat16", "rows": rows}


def cpu_child(method: str, n: int, h: int, v: int, chunk: int) -> dict:
    """One measurement in this (fresh) process."""
    torch.set_num_threads(2)
    xs, ws, xt, wt = inputs(n, h, v, torch.float32, "cpu")
    fn = method_fn(method, xs, ws, xt, wt, "gjsd", chunk)
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "N": n, "H": h, "V": v, "chunk": chunk if method != "eager" else None,
            "peak_mb": (peak - base) / 2**20, "seconds": seconds}


def cpu(args) -> dict:
    rows = []
    configs = [("eager", n, 0) for n in args.tokens_list]
    configs += [("distill-torch", n, c) for n in args.tokens_list for c in args.chunks]
    for method, n, chunk in configs:
        out = subprocess.run(
            [sys.executable, __file__, "cpu-child", method, str(n), str(args.hidden), str(args.vocab), str(chunk)],
            capture_output=True, text=True, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return {"device": platform.processor() or platform.machine(), "threads": 2, "dtype": "float32", "kind": "gjsd",
            "rows": rows}


def markdown(result: dict, mode: str) -> str:
    rows = result["rows"]
    if mode == "cpu":
        eager = {r["N"]: r["peak_mb"] for r in rows if r["method"] == "eager"}
        lines = [f"Peak memory above the inputs, fwd+bwd of gjsd, fp32, H = {rows[0]['H']}, V = {rows[0]['V']}, "
                 f"{result['device']} ({result['threads']} threads). Each row is a fresh process.", "",
                 "| method | N | chunk | peak (MB) | vs eager at this N | time (s) |", "|---|---|---|---|---|---|"]
        for r in rows:
            ratio = r["peak_mb"] / eager[r["N"]] if r["N"] in eager else float("nan")
            lines.append(f"| {r['method']} | {r['N']} | {r['chunk'] or '-'} | {r['peak_mb']:.0f} | {ratio:.2f} "
                         f"| {r['seconds']:.2f} |")
        return "\n".join(lines) + "\n"
    lines = [f"Forward + backward, bf16, {result['device']}, torch {result['torch']}.", "",
             "| shape | N | kind | method | time (ms) | peak (GB) | of spec floor | of measured floor "
             "| grad W rel. err. vs eager |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "kind" not in r:
            lines.append(f"| {r['shape']} | {r['N']} | - | {r['method']} | {r['ms']:.1f} | - | spec floor "
                         f"{r['spec_floor_ms']:.1f} ms | - | - |")
            continue
        oom = r["ms"] is None

        def f(x, fmt, oom=oom):
            return ("OOM" if oom else "-") if x is None else format(x, fmt)
        lines.append(f"| {r['shape']} | {r['N']} | {r['kind']} | {r['method']} | {f(r['ms'], '.1f')} | "
                     f"{f(r['peak_gb'], '.2f')} | {f(r['fraction_of_spec_floor'], '.2f')} | "
                     f"{f(r['fraction_of_measured_floor'], '.2f')} | {f(r.get('grad_w_rel_err_vs_eager'), '.1e')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "cpu-child":
        method, n, h, v, chunk = sys.argv[2], *map(int, sys.argv[3:7])
        print(json.dumps(cpu_child(method, n, h, v, chunk)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    g = sub.add_parser("gpu")
    g.add_argument("--tokens", type=int, default=8192)
    g.add_argument("--kinds", nargs="+", default=["gjsd", "fkl"])
    g.add_argument("--dry-run", action="store_true")
    c = sub.add_parser("cpu")
    c.add_argument("--tokens-list", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    c.add_argument("--chunks", type=int, nargs="+", default=[256, 1024])
    c.add_argument("--hidden", type=int, default=256)
    c.add_argument("--vocab", type=int, default=32000)
    for p in (g, c):
        p.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    result = gpu(args) if args.mode == "gpu" else cpu(args)
    tag = "cpu" if args.mode == "cpu" else result["device"].replace(" ", "_")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"environment": environment(), **result}
    (args.out / f"fused_loss_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result, args.mode)
    (args.out / f"fused_loss_{tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
