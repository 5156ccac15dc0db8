"""The fused LM head + divergence against the eager reference (and Liger-Kernel where installed).

``gpu`` (on a CUDA device; ``dry_run`` checks it tiny on a CPU with TRITON_INTERPRET=1): forward +
backward (student gradients) at N tokens for the Llama-3 shape (H = 4096, V = 128256) and the Qwen
shape (H = 2048, V = 151936), bf16 inputs: median time of >= 10 runs after warm-up
(triton.testing.do_bench) and peak memory above the inputs (torch.cuda.max_memory_allocated).
Methods: ``distill`` (Triton kernels), ``eager`` (full logits, then ``distill.losses.divergence``),
``liger`` (LigerFusedLinearJSD) and ``liger-chunked`` (chunked_loss.LigerFusedLinearJSDLoss), gjsd
only, when importable. The matmul floor is 8 N H V FLOPs
(the four matmuls of forward and backward), reported at the H100 bf16 spec (989 TFLOP/s) and as
the time of the same four matmuls measured in this run.

``cpu``: (1) each configuration in a fresh process; peak memory is the process's maximum resident
size (VmHWM) above what it held once the inputs existed. glibc is told to map every
allocation above 64 KiB on its own (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident
set at once and the peak is that of live memory, not of heap fragmentation. Shows that the fused
path's peak grows with the chunk and not with N, against the reference at the same N. (2) In this
process: the fused path's time against the reference's at one shape (medians of interleaved
repeats), and for every divergence the fused path's loss and gradients in float32 against the
reference in float64.

Writes ``fused_loss_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import distill.fused_loss as fused  # through the module: tests plant a slower or wrong loss here
import distill.losses as losses
from benchmarks.environment import environment
from benchmarks.metrics import metric, peak_rss_mb, write_json
from distill.losses import KINDS

SHAPES = {"llama3": (4096, 128256), "qwen": (2048, 151936)}
H100_BF16_FLOPS = 989e12
RESULTS = Path(__file__).parent / "results"


# Twice the difference in peak memory above the inputs that CPU models alone make (MB).
WORKSPACE_MB = 30.0


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
            return fused.fused_linear_divergence(xs, ws, xt, wt, kind=kind, beta=0.5, chunk_size=chunk,
                                                  backend=backend)
    elif method == "eager":
        def loss():
            return losses.divergence(xs @ ws.T, (xt @ wt.T).detach(), kind=kind, beta=0.5, backend="torch")
    elif method == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_jsd

        def loss():
            return liger_fused_linear_jsd(xs, ws, xt, wt, None, 0.5)
    elif method == "liger-chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        fn_loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5)
        labels = torch.zeros(xs.shape[0], dtype=torch.long, device=xs.device)  # unused at weight_hard_loss 0

        def loss():
            return fn_loss(xs, ws, xt, wt, labels, None, None)
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


def gpu(tokens: int, kinds: list[str], dry_run: bool) -> dict:
    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    if device == "cpu" and not dry_run:
        sys.exit("fused_loss gpu: no CUDA device (dry_run=true with TRITON_INTERPRET=1 checks it on a CPU)")
    shapes = {"tiny": (64, 1000)} if dry_run else SHAPES
    n = 96 if dry_run else tokens
    methods = ["eager", "distill"]
    try:  # every fused distillation loss of Liger-Kernel that is installed (generalized JSD only)
        import liger_kernel.transformers.functional  # noqa: F401

        methods.append("liger")
        import liger_kernel.chunked_loss  # noqa: F401

        methods.append("liger-chunked")
    except ImportError:
        pass
    rows = []
    for shape, (h, v) in shapes.items():
        xs, ws, xt, wt = inputs(n, h, v, torch.bfloat16, device)
        floor_ms = time_ms(matmul_floor_fn(xs, ws, xt, wt), device)
        spec_ms = flops(n, h, v) / H100_BF16_FLOPS * 1e3
        for kind in kinds:
            reference = None  # eager's loss and gradients: every method is checked against them
            for method in methods:
                if method.startswith("liger") and kind != "gjsd":
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
    peak = peak_rss_mb() * 2**20
    return {"method": method, "N": n, "H": h, "V": v, "chunk": chunk if method != "eager" else None,
            "peak_mb": (peak - base) / 2**20, "seconds": seconds}


def memory_rows(tokens: list[int], chunks: list[int], hidden: int, vocab: int) -> list[dict]:
    """Peak memory of the reference and of the fused path, each configuration in a fresh process."""
    rows = []
    configs = [("eager", n, 0) for n in tokens] + [("distill-torch", n, c) for n in tokens for c in chunks]
    for method, n, chunk in configs:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.fused_loss", method, str(n), str(hidden), str(vocab), str(chunk)],
            capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1],
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


def accuracy(seed: int, n: int = 256, h: int = 64, v: int = 1000, chunk: int = 64) -> dict[str, float]:
    """Per divergence: the largest relative error of the fused path's float32 loss and gradients
    against the reference computed in float64."""
    out = {}
    for kind in KINDS:
        xs, ws, xt, wt = inputs(n, h, v, torch.float32, "cpu", seed)
        fn = method_fn("distill-torch", xs, ws, xt, wt, kind, chunk)
        loss, gx, gw = fn(), xs.grad.clone(), ws.grad.clone()
        x64, w64 = xs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
        ref = losses.divergence(x64 @ w64.T, xt.double() @ wt.double().T, kind=kind, beta=0.5, backend="torch")
        ref.backward()
        ref = ref.detach()
        out[kind] = max(abs(float(loss) - float(ref)) / abs(float(ref)), rel_err(gx, x64.grad), rel_err(gw, w64.grad))
    return out


def speed(seed: int, n: int, h: int, v: int, chunk: int, repeats: int) -> dict[str, float]:
    """Median seconds of forward + backward (gjsd, float32) of the fused path and of the reference,
    interleaved in this process."""
    xs, ws, xt, wt = inputs(n, h, v, torch.float32, "cpu", seed)
    fns = {m: method_fn(m, xs, ws, xt, wt, "gjsd", chunk) for m in ("eager", "distill-torch")}
    times: dict[str, list[float]] = {m: [] for m in fns}
    for i in range(repeats + 1):
        for m, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i:  # the first round warms up
                times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(t) for m, t in times.items()}


def markdown(result: dict, mode: str) -> str:
    rows = result["rows"]
    if mode == "cpu":
        sp = result["speed"]
        lines = [f"float32 on the CPU ({result['threads']} threads). Forward + backward of gjsd at N = {sp['N']}, "
                 f"H = {sp['H']}, V = {sp['V']} (chunk {sp['chunk']}), medians of interleaved runs: fused "
                 f"{sp['median_s']['distill-torch']:.3f} s, eager {sp['median_s']['eager']:.3f} s "
                 f"(fused / eager {sp['median_s']['distill-torch'] / sp['median_s']['eager']:.2f}).", "",
                 "Largest relative error of the fused path's loss and gradients (float32) against the reference in "
                 "float64 (N = 256, H = 64, V = 1000): "
                 + ", ".join(f"{k} {e:.1e}" for k, e in result["float64_error"].items()) + "."]
        if rows:
            eager = {r["N"]: r["peak_mb"] for r in rows if r["method"] == "eager"}
            lines += ["", f"Peak memory above the inputs, fwd+bwd of gjsd, H = {rows[0]['H']}, V = {rows[0]['V']}. "
                      "Each row is a fresh process.", "",
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


def plot_memory(rows: list[dict], path: Path) -> None:
    """Peak memory against N: full logits and the fused path per chunk size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, pick in [("full logits", lambda r: r["method"] == "eager")] + [
            (f"fused, chunk {c}", lambda r, c=c: r["method"] == "distill-torch" and r["chunk"] == c)
            for c in sorted({r["chunk"] for r in rows if r["chunk"]})]:
        pts = sorted((r["N"], r["peak_mb"]) for r in rows if pick(r))
        ax.plot([n for n, _ in pts], [m for _, m in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("peak memory above inputs (MB)")
    ax.set_title(f"fwd + bwd of gjsd, H = {rows[0]['H']}, V = {rows[0]['V']}, CPU", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: Path, seed: int = 0, mode: str = "cpu", tokens: list[int] | None = None, chunks: list[int] | None = None,
        hidden: int = 256, vocab: int = 32000, speed_tokens: int = 1024, repeats: int = 5, gpu_tokens: int = 8192,
        kinds: list[str] | None = None, dry_run: bool = False, memory: bool = True) -> dict:
    if mode == "gpu":
        result = gpu(gpu_tokens, kinds or ["gjsd", "fkl"], dry_run)
        metrics = {}
        for r in result["rows"]:
            eager = next((e for e in result["rows"] if e.get("kind") == r.get("kind") and e["shape"] == r["shape"]
                          and e["method"] == "eager"), None)
            if r["method"] != "distill" or r["ms"] is None or eager is None or eager["ms"] is None:
                continue
            name = f"{r['shape']} {r['kind']}"
            metrics[f"{name} distill over eager time"] = metric(r["ms"] / eager["ms"], "lower", "ratio")
            if r["peak_gb"] is not None and eager["peak_gb"]:
                metrics[f"{name} distill over eager memory"] = metric(r["peak_gb"] / eager["peak_gb"], "lower",
                                                                      "memory")
        tag = result["device"].replace(" ", "_")
    else:
        tokens, chunks = tokens or [1024, 2048, 4096, 8192], chunks or [256, 1024]
        rows = memory_rows(tokens, chunks, hidden, vocab) if memory else []
        times = speed(seed, speed_tokens, hidden, vocab, chunks[0], repeats)
        errors = accuracy(seed)
        result = {"device": "cpu", "threads": torch.get_num_threads(), "dtype": "float32", "kind": "gjsd",
                  "rows": rows, "speed": {"N": speed_tokens, "H": hidden, "V": vocab, "chunk": chunks[0],
                                          "median_s": times}, "float64_error": errors}
        metrics = {f"{kind} error vs float64": metric(e, "lower", "quality", floor=1e-5) for kind, e in errors.items()}
        metrics["fused over eager time"] = metric(times["distill-torch"] / times["eager"], "lower", "ratio")
        if rows:
            eager = {r["N"]: r["peak_mb"] for r in rows if r["method"] == "eager"}
            n = max(tokens)
            for c in chunks:
                fused = next(r["peak_mb"] for r in rows if r["method"] == "distill-torch" and r["N"] == n
                             and r["chunk"] == c)
                # Resolution: the math library's and the allocator's workspaces differ between CPU
                # models (452 MB on an AMD EPYC, 467 MB on an Intel Xeon here, the same code), so
                # a change of less than WORKSPACE_MB above the inputs says nothing about the loss.
                metrics[f"fused chunk {c} over eager memory at N={n}"] = metric(
                    fused / eager[n], "lower", "memory", floor=max(0.02 * fused / eager[n], WORKSPACE_MB / eager[n]))
        tag = "cpu"
    result = {"environment": environment(), **result, "metrics": metrics}
    write_json(out / f"fused_loss_{tag}.json", result)
    (out / f"fused_loss_{tag}.md").write_text(markdown(result, mode))
    if mode == "cpu" and result["rows"]:
        plot_memory(result["rows"], out / f"fused_loss_{tag}.png")
    return result


if __name__ == "__main__":  # one memory measurement in a fresh process (memory_rows)
    method, n, h, v, chunk = sys.argv[1], *map(int, sys.argv[2:6])
    print(json.dumps(cpu_child(method, n, h, v, chunk)))
