"""CAB-style benchmark: every registered mechanism x 4 patterns x lengths.

    python -m libattn.bench                # quick suite (under 5 minutes on 2 cores)
    python -m libattn.bench --full         # longer lengths, forward + backward
    python -m libattn.bench --out DIR --lengths 512,2048 --mechanisms exact,window

For each mechanism (libattn.mechanisms.REGISTRY), pattern (non-causal self,
causal self, non-causal cross, causal cross) and length L it reports the
median forward time (and forward+backward with --full, where the mechanism
has a backward), the peak memory the call adds to the process (peak RSS
during the call minus RSS before it, Linux), the relative RMS error of
sampled query rows against exact attention computed in float64 by PyTorch,
and per mechanism and pattern the efficiency length: the length from which
it stays faster than exact attention (log-log interpolation between the
measured lengths; "<= L0" when faster at every length measured, from the
shortest L0; "not faster" when slower at the longest). A mechanism runs
the patterns its entry lists, and lengths up to its max_length if it has one
(LLA: O(T^2 D^2)); other cells are recorded with a note. Self patterns use
N = M = L; cross patterns N = L/2 queries against M = L keys (causal cross
aligns the diagonal bottom-right).
Inputs are synthetic with locality: q and k are an AR(1) sequence (lag-1
correlation 0.98) plus noise, v is Gaussian, so attention is concentrated
near the diagonal as in language data. PyTorch runs on one thread (inputs,
truth); libattn uses the default context (all cores). It also measures the Python call
overhead over the C call on a small op (the `attn` CLI times the C call).

Writes DIR/cab.json, DIR/cab.csv, DIR/time_vs_length.png and DIR/pareto.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
import timeit

import numpy as np
import torch

import libattn

from . import mechanisms as mech

QUICK_LENGTHS = [256, 1024, 4096, 8192]
FULL_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]


# ---------------------------------------------------------------- inputs and truth


def make_inputs(pattern, L, heads, dim, seed=0):
    causal, cross = mech.PATTERNS[pattern]
    N, M = (L // 2, L) if cross else (L, L)
    g = torch.Generator().manual_seed(seed + L)
    a = 0.98
    eps = torch.randn(M, heads, dim, generator=g)
    x = torch.empty(M, heads, dim)
    x[0] = eps[0]
    s = math.sqrt(1 - a * a)
    # AR(1) along the sequence, vectorised as a scan in chunks of 64
    for t in range(1, M):
        x[t] = a * x[t - 1] + s * eps[t]
    k = (x + 0.5 * torch.randn(M, heads, dim, generator=g))[None].contiguous()
    q = (x[M - N:] + 0.5 * torch.randn(N, heads, dim, generator=g))[None].contiguous()
    v = torch.randn(1, M, heads, dim, generator=g)
    return q, k, v, causal


def sample_rows(N, count=64):
    return torch.unique(torch.linspace(0, N - 1, min(N, count)).round().long())


def exact_rows(q, k, v, causal, rows):
    """Exact attention of the given query rows, float64 (PyTorch)."""
    N, M, D = q.shape[1], k.shape[1], q.shape[3]
    qs = q[:, rows].double()
    s = torch.einsum("bnhd,bmhd->bhnm", qs, k.double()) / math.sqrt(D)
    if causal:
        vis = torch.arange(M)[None, :] <= (rows[:, None] + M - N)
        s = s.masked_fill(~vis, -math.inf)
    return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v.double())


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item()


# ---------------------------------------------------------------- measuring


def _rss():
    try:
        with open("/proc/self/status") as f:
            d = {}
            for line in f:
                if line.startswith(("VmRSS", "VmHWM")):
                    key, val = line.split(":")
                    d[key] = int(val.split()[0]) * 1024
            return d.get("VmRSS"), d.get("VmHWM")
    except OSError:
        return None, None


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _mmap_threshold(nbytes):
    """glibc M_MMAP_THRESHOLD (fixing it also stops its dynamic growth)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes))
    except (OSError, AttributeError):
        pass


def peak_extra_bytes(fn):
    """Peak RSS during fn() minus RSS before it (None where /proc lacks it)."""
    if not _reset_peak():
        fn()
        return None
    before, _ = _rss()
    fn()
    _, peak = _rss()
    if before is None or peak is None:
        return None
    return max(0, peak - before)


def time_median(fn, min_time=0.3, max_reps=25, min_reps=3):
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time
                                    and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), len(times)


# ---------------------------------------------------------------- progress


class Progress:
    def __init__(self, total, stream=sys.stderr, width=30):
        self.total, self.done, self.stream, self.width = total, 0, stream, width
        self.t0 = time.perf_counter()
        self.tty = stream.isatty()

    def step(self, label):
        self.done += 1
        frac = self.done / max(1, self.total)
        fill = int(round(frac * self.width))
        el = time.perf_counter() - self.t0
        eta = el / frac - el if frac > 0 else 0
        line = (f"[{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total} "
                f"{el:5.0f}s eta {eta:4.0f}s  {label}")
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


# ---------------------------------------------------------------- overhead


def _attn_cli():
    here = os.path.dirname(os.path.abspath(libattn.__file__))
    for p in (os.path.join(here, "bin", "attn"),
              os.path.join(os.path.dirname(libattn.library_path), "attn")):
        if os.path.exists(p) and os.access(p, os.X_OK):
            return p
    return None


def _c_median_us(cli, n, heads, dim, threads):
    r = subprocess.run([cli, "bench", "--op", "attention", "--n", str(n), "--m", str(n),
                        "--heads", str(heads), "--kv-heads", str(heads), "--dim", str(dim),
                        "--repeats", "50", "--json", "--no-ceilings", "--no-check",
                        "--threads", str(threads)], capture_output=True, text=True, timeout=120)
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)["median_ms"] * 1e3
    return None


def _py_median_us(f, calls):
    clock = time.perf_counter_ns
    times = [0] * calls
    for i in range(calls):
        t0 = clock()
        f()
        times[i] = clock() - t0
    return float(np.median(times)) * 1e-3


def measure_overhead(n=16, heads=1, dim=32, trials=3, calls=20000):
    """Per-call median time of a Python call (numpy, torch, the torch
    autograd op) against the per-call median of the same C call timed by
    `attn bench` (same shape and threads). Each is measured `trials` times,
    alternating, and the smallest median kept (the cores are shared)."""
    ctx = libattn.default_context()
    out = {"shape": [1, n, heads, dim], "threads": ctx.threads}
    cli = _attn_cli()
    rng = np.random.default_rng(0)
    qn = rng.standard_normal((1, n, heads, dim), dtype=np.float32)
    qt = torch.from_numpy(qn.copy())
    from . import torch as lat

    cases = {
        "numpy": lambda: libattn.attention(qn, qn, qn),
        "torch": lambda: libattn.attention(qt, qt, qt),
        "torch_autograd_op": lambda: lat.attention(qt, qt, qt),
    }
    c_us = []
    py = {name: [] for name in cases}
    for _ in range(trials):
        if cli:
            c = _c_median_us(cli, n, heads, dim, ctx.threads)
            if c is not None:
                c_us.append(c)
        for name, f in cases.items():
            for _ in range(500):
                f()
            py[name].append(_py_median_us(f, calls if name != "torch_autograd_op" else calls // 10))
    out["c_us"] = min(c_us) if c_us else None
    for name in cases:
        out[f"{name}_us"] = min(py[name])
        out[f"{name}_overhead_us"] = None if not c_us else min(py[name]) - min(c_us)
    return out


# ---------------------------------------------------------------- the suite


def efficiency_lengths(records):
    """Per (mechanism, pattern): the length from which the mechanism's forward
    stays faster than exact attention: the crossing (log-log interpolation)
    after the last measured length at which it was not faster; the shortest
    length measured if it was faster everywhere; None if it is not faster at
    the longest length."""
    out = {}
    exact = {(r["pattern"], r["length"]): r["fwd_ms"] for r in records
             if r["mechanism"] == "exact" and r["fwd_ms"] is not None}
    keys = sorted({(r["mechanism"], r["pattern"]) for r in records if r["mechanism"] != "exact"})
    for m, p in keys:
        pts = sorted((r["length"], r["fwd_ms"]) for r in records
                     if r["mechanism"] == m and r["pattern"] == p and r["fwd_ms"] is not None
                     and (p, r["length"]) in exact)
        ratio = [(L, math.log(t / exact[(p, L)])) for L, t in pts]
        val = None
        if ratio and ratio[-1][1] < 0:
            i = len(ratio) - 1
            while i > 0 and ratio[i - 1][1] < 0:
                i -= 1
            if i == 0:
                val = float(ratio[0][0])
            else:
                (L0, r0), (L1, r1) = ratio[i - 1], ratio[i]
                f = r0 / (r0 - r1)
                val = float(math.exp(math.log(L0) + f * (math.log(L1) - math.log(L0))))
        out[(m, p)] = val
    return out


def run_suite(mechanisms, patterns, lengths, heads, dim, backward, progress=True):
    records = []
    cells = [(L, p, m) for L in lengths for p in patterns for m in mechanisms]
    bar = Progress(len(cells)) if progress else None
    cache = {}
    for L, p, name in cells:
        m = mech.REGISTRY[name]
        key = (p, L)
        if key not in cache:
            cache.clear()
            q, k, v, causal = make_inputs(p, L, heads, dim)
            rows = sample_rows(q.shape[1])
            cache[key] = (q, k, v, causal, rows, exact_rows(q, k, v, causal, rows))
        q, k, v, causal, rows, truth = cache[key]
        rec = {"mechanism": name, "family": m.family, "pattern": p, "length": L,
               "n": q.shape[1], "m": k.shape[1], "heads": heads, "dim": dim,
               "fwd_ms": None, "fwdbwd_ms": None, "peak_mib": None, "rel_err": None,
               "repeats": None, "note": ""}
        if p not in m.patterns:
            rec["note"] = "pattern not supported"
        elif m.max_length is not None and L > m.max_length:
            rec["note"] = f"skipped: L > max_length {m.max_length}"
        else:
            try:
                o = m.fn(q, k, v, causal)
                rec["rel_err"] = rel_rms(o[:, rows], truth)
                t, reps = time_median(lambda: m.fn(q, k, v, causal))
                rec["fwd_ms"], rec["repeats"] = t * 1e3, reps
                pk = peak_extra_bytes(lambda: m.fn(q, k, v, causal))
                rec["peak_mib"] = None if pk is None else pk / 2**20
            except (libattn.AttnError, ValueError, NotImplementedError) as e:
                rec["note"] = f"error: {e}"
            if backward and m.backward is not None and rec["fwd_ms"] is not None:
                qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
                do = torch.randn(q.shape[:3] + (v.shape[3],))

                def fb():
                    o = m.backward(qg, kg, vg, causal)
                    torch.autograd.grad(o, (qg, kg, vg), do)

                try:
                    t, _ = time_median(fb, min_time=0.3, max_reps=10)
                    rec["fwdbwd_ms"] = t * 1e3
                except NotImplementedError as e:
                    rec["note"] = f"fwd only: {e}"
                except (libattn.AttnError, ValueError) as e:
                    rec["note"] = f"backward error: {e}"
        records.append(rec)
        if bar:
            bar.step(f"{name} {p} L={L}")
    if bar:
        bar.close()
    eff = efficiency_lengths(records)
    for r in records:
        r["efficiency_length"] = eff.get((r["mechanism"], r["pattern"]))
    return records


# ---------------------------------------------------------------- outputs


CSV_FIELDS = ["mechanism", "family", "pattern", "length", "n", "m", "heads", "dim", "fwd_ms",
              "fwdbwd_ms", "peak_mib", "rel_err", "efficiency_length", "repeats", "note"]


def write_outputs(out_dir, records, meta):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "cab.json"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    with open(os.path.join(out_dir, "cab.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow(r)


def plot(out_dir, records, dpi=80):
    """time_vs_length.png (one panel per pattern) and pareto.png (error
    against speed-up over exact in the same pattern, at the longest length,
    one panel per family, with the Pareto front)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mechs = list(dict.fromkeys(r["mechanism"] for r in records))
    # 20 colours within each of two groups, solid (exact and sparse) and
    # dashed (linear): the registry's 23 mechanisms are told apart
    family = {r["mechanism"]: r["family"] for r in records}
    style = {m: "--" if family[m] == "linear" else "-" for m in mechs}
    colors = {}
    for ls in ("-", "--"):
        group = [m for m in mechs if style[m] == ls]
        colors.update((m, plt.cm.tab20(i % 20)) for i, m in enumerate(group))
    pats = list(dict.fromkeys(r["pattern"] for r in records))
    fig, axes = plt.subplots(1, len(pats), figsize=(3.2 * len(pats), 3.4), sharey=True,
                             squeeze=False)
    lines = {}
    for ax, p in zip(axes[0], pats):
        for m in mechs:
            pts = sorted((r["length"], r["fwd_ms"]) for r in records
                         if r["pattern"] == p and r["mechanism"] == m and r["fwd_ms"])
            if pts:
                lines[m], = ax.plot(*zip(*pts), marker="o", ls=style[m], ms=3, lw=1.1,
                                    color=colors[m], label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(p, fontsize=9)
        ax.set_xlabel("length L (keys)", fontsize=8)
        ax.grid(True, which="both", lw=0.3)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("forward ms (median)", fontsize=8)
    fig.tight_layout()
    # one legend for all the panels (each shows only the mechanisms that
    # support its pattern), beside them
    shown = [m for m in mechs if m in lines]
    fig.legend([lines[m] for m in shown], shown, loc="center left", bbox_to_anchor=(1.0, 0.5),
               fontsize=7, ncol=1 + len(shown) // 16, frameon=False)
    fig.savefig(os.path.join(out_dir, "time_vs_length.png"), dpi=dpi, bbox_inches="tight")
    plt.close(fig)

    Lmax = max(r["length"] for r in records)
    exact_ms = {r["pattern"]: r["fwd_ms"] for r in records
                if r["mechanism"] == "exact" and r["length"] == Lmax and r["fwd_ms"]}
    fams = [f for f in ("sparse", "linear") if any(r["family"] == f for r in records)]
    fams = fams or ["exact"]
    fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 3.6), squeeze=False)
    markers = dict(zip(pats, "osD^"))
    from matplotlib.ticker import FuncFormatter

    for ax, fam in zip(axes[0], fams):
        pts = [r for r in records if r["length"] == Lmax and r["fwd_ms"] and r["rel_err"]
               is not None and r["family"] in (fam, "exact") and r["pattern"] in exact_ms]
        xy = []
        for r in pts:
            x, y = exact_ms[r["pattern"]] / r["fwd_ms"], max(r["rel_err"], 1e-8)
            xy.append((x, y))
            ax.scatter(x, y, color=colors[r["mechanism"]], marker=markers.get(r["pattern"], "o"),
                       s=22)
        front, best = [], math.inf  # Pareto front: no point both faster and more accurate
        for x, y in sorted(xy, key=lambda t: -t[0]):
            if y < best:
                front.append((x, y))
                best = y
        if front:
            fx, fy = zip(*sorted(front))
            ax.plot(fx, fy, color="gray", lw=0.8, ls="--", zorder=0)
        for m in dict.fromkeys(r["mechanism"] for r in pts):
            ax.scatter([], [], color=colors[m], label=m, s=22)
        for p in pats:
            ax.scatter([], [], color="black", marker=markers[p], label=p, s=14)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}x" if f"{v:.3g}"[0] in "25" else ""))
        ax.set_xlabel(f"speed-up over exact, forward, L={Lmax}", fontsize=8)
        ax.set_ylabel("relative RMS error vs exact", fontsize=8)
        ax.set_title(f"{fam} (dashed: Pareto front)", fontsize=9)
        ax.grid(True, which="both", lw=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "pareto.png"), dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def summary_table(records):
    lines = ["| mechanism | pattern | L | fwd ms | fwd+bwd ms | peak MiB | rel err | eff. length |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        eff = r.get("efficiency_length")
        shortest = min(x["length"] for x in records)
        effs = ("" if r["mechanism"] == "exact" or r["fwd_ms"] is None else
                "not faster" if eff is None else
                f"<= {eff:.0f}" if eff == shortest else f"{eff:.0f}")
        lines.append(f"| {r['mechanism']} | {r['pattern']} | {r['length']} | "
                     f"{_fmt(r['fwd_ms'], '.3f')} | {_fmt(r['fwdbwd_ms'], '.2f')} | "
                     f"{_fmt(r['peak_mib'], '.1f')} | {_fmt(r['rel_err'], '.2e')} | {effs} |"
                     + (f" {r['note']}" if r["note"] else ""))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m libattn.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="lengths up to 16384, forward+backward")
    ap.add_argument("--lengths", help="comma-separated lengths (default: quick 256,1024,4096,8192)")
    ap.add_argument("--mechanisms", help="comma-separated names (default: every available one)")
    ap.add_argument("--patterns", help="comma-separated patterns (default: all four)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--backward", action="store_true", help="also time forward+backward")
    ap.add_argument("--out", default="bench-out", help="output directory (default bench-out)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-overhead", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the records as JSON lines")
    a = ap.parse_args(argv)
    # PyTorch only builds inputs and the float64 truth here: one thread, so
    # that its idle OpenMP workers do not spin on the cores libattn times on
    torch.set_num_threads(1)

    lengths = ([int(x) for x in a.lengths.split(",")] if a.lengths
               else FULL_LENGTHS if a.full else QUICK_LENGTHS)
    avail = mech.available()
    names = a.mechanisms.split(",") if a.mechanisms else list(avail)
    for n in names:
        if n not in avail:
            ap.error(f"unknown or unavailable mechanism {n!r}; available: {', '.join(avail)}")
    pats = a.patterns.split(",") if a.patterns else list(mech.PATTERNS)
    for p in pats:
        if p not in mech.PATTERNS:
            ap.error(f"unknown pattern {p!r}; known: {', '.join(mech.PATTERNS)}")
    if "exact" not in names:
        names = ["exact"] + names  # the reference for speed-ups and efficiency lengths
    t0 = time.perf_counter()
    ctx = libattn.default_context()
    meta = {"libattn": libattn.version(), "isa": ctx.isa, "threads": ctx.threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "lengths": lengths, "heads": a.heads, "dim": a.dim,
            "mechanisms": {n: mech.REGISTRY[n].description for n in names},
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta["loadavg_start"] = load
    if load is not None and load > 0.5:
        print(f"warning: load average {load:.2f} before the run: other work shares the cores, "
              "timings will be noisy", file=sys.stderr)
    print(f"libattn {meta['libattn']} ({ctx.isa}, {ctx.threads} threads); mechanisms: "
          f"{', '.join(names)}; lengths {lengths}; H={a.heads} D={a.dim}", file=sys.stderr)
    if not a.no_overhead:
        meta["overhead"] = ov = measure_overhead()
        if ov.get("c_us") is not None:
            print(f"Python call overhead over the C call (attention [1,16,1,32], median): "
                  f"C {ov['c_us']:.2f} us; numpy {ov['numpy_overhead_us']:.2f} us, torch "
                  f"{ov['torch_overhead_us']:.2f} us, torch autograd op "
                  f"{ov['torch_autograd_op_overhead_us']:.2f} us", file=sys.stderr)
    # From here every block of 64 KiB or more comes from mmap and goes back on
    # free, so that the pages an op touches show in its own peak RSS (a freed
    # output would otherwise be reused and the op would look free of memory).
    _mmap_threshold(64 << 10)
    records = run_suite(names, pats, lengths, a.heads, a.dim, a.backward or a.full)
    meta["seconds"] = time.perf_counter() - t0
    write_outputs(a.out, records, meta)
    if not a.no_plots:
        plot(a.out, records)
    meta["seconds"] = time.perf_counter() - t0
    meta["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    write_outputs(a.out, records, meta)
    if a.json:
        for r in records:
            print(json.dumps(r))
    else:
        print(summary_table(records))
    print(f"wrote {a.out}/cab.json, cab.csv" + ("" if a.no_plots else
          ", time_vs_length.png, pareto.png") + f" in {meta['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
