#!/usr/bin/env python3
"""libattn beside PyTorch's CPU attention, one shape at a time, alternating.

For each shape this runs `attn bench --op ... --json` (the libattn CLI) and then
torch.nn.functional.scaled_dot_product_attention on the same shape, f32, with
the same number of threads, and prints:

    shape | libattn ms | torch ms | ratio (torch_ms / libattn_ms) | % of FMA peak

Both sides are timed the same way: warm-up calls, then the median of repeats
(at least 3 and about 1 s, at most 50). The FMA peak is the one the libattn CLI
measures at its first run. Backward shapes time only the backward pass (torch:
autograd .backward() on a retained graph; libattn: attn_backward).

    .venv/bin/python bench/torch_peer.py [--attn build/attn] [--threads T] [--json]
    .venv/bin/python bench/torch_peer.py --op attention --n 2048 --dim 128 --causal
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - explained to the user
    sys.exit("torch_peer.py needs PyTorch: make bench-peer creates .venv with it")

MAX_REPEATS = 50

# The quick suite's forward shapes, and backward shapes:
# (op, n, m, heads, dim, causal)
DEFAULT_SHAPES = [
    ("attention", 4096, 4096, 8, 64, False),
    ("attention", 4096, 4096, 8, 64, True),
    ("attention", 4096, 4096, 8, 128, False),
    ("attention", 4096, 4096, 8, 128, True),
    ("attention", 512, 512, 8, 64, False),
    ("attention_bwd", 4096, 4096, 8, 64, False),
    ("attention_bwd", 4096, 4096, 8, 64, True),
    ("attention_bwd", 4096, 4096, 8, 128, False),
    ("attention_bwd", 4096, 4096, 8, 128, True),
]


def median(xs):
    xs = sorted(xs)
    k = len(xs)
    return xs[k // 2] if k % 2 else 0.5 * (xs[k // 2 - 1] + xs[k // 2])


def time_calls(fn, repeats=0, before=None):
    """Warm-up, then the median of repeats, in seconds (as the CLI does)."""
    best, spent, warm = math.inf, 0.0, 0
    while True:
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        best, spent, warm = min(best, t), spent + t, warm + 1
        if (warm == 1 and t >= 0.5) or (warm >= 2 and spent >= 0.1) or warm >= 20:
            break
    if repeats <= 0:
        repeats = min(MAX_REPEATS, max(3, math.ceil(1.0 / max(best, 1e-9))))
    times = []
    for _ in range(repeats):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def torch_seconds(op, batch, n, m, heads, dim, causal, repeats):
    g = torch.Generator().manual_seed(1)
    shape_q = (batch, heads, n, dim)  # SDPA's layout [B, H, N, D]
    shape_kv = (batch, heads, m, dim)
    q = torch.randn(shape_q, generator=g, dtype=torch.float32)
    k = torch.randn(shape_kv, generator=g, dtype=torch.float32)
    v = torch.randn(shape_kv, generator=g, dtype=torch.float32)
    if op == "attention":
        with torch.inference_mode():
            return time_calls(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                              repeats)
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float32)

    def clear():
        q.grad = k.grad = v.grad = None

    return time_calls(lambda: out.backward(dout, retain_graph=True), repeats, before=clear)


def attn_run(attn, op, batch, n, m, heads, dim, causal, threads, repeats, ceilings):
    cmd = [attn, "bench", "--op", op, "--batch", str(batch), "--n", str(n), "--m", str(m),
           "--heads", str(heads), "--dim", str(dim), "--threads", str(threads), "--json"]
    if causal:
        cmd.append("--causal")
    if repeats > 0:
        cmd += ["--repeats", str(repeats)]
    if not ceilings:
        cmd.append("--no-ceilings")
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    if not rows:
        raise RuntimeError(f"{' '.join(cmd)} printed no measurement")
    return rows[-1]


def fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attn", default=os.path.join(os.path.dirname(__file__), "..", "build", "attn"),
                    help="path of the attn CLI (default build/attn)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=0, help="timed calls (default: adapt)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate libattn and torch this many times per shape (median)")
    ap.add_argument("--json", action="store_true", help="one JSON object per shape per line")
    ap.add_argument("--op", choices=["attention", "attention_bwd"],
                    help="one shape instead of the default list")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--m", type=int)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    a = ap.parse_args()

    if a.threads < 1 or a.rounds < 1 or a.batch < 1 or a.n < 1 or a.heads < 1 or a.dim < 1:
        ap.error("threads, rounds, batch, n, heads and dim must be >= 1")
    if not os.access(a.attn, os.X_OK):
        sys.exit(f"torch_peer.py: no attn CLI at {a.attn} (run: make build)")
    if a.op:
        m = a.m or a.n
        if a.causal and m != a.n:
            ap.error("--causal with --m != --n: torch aligns the diagonal top-left, "
                     "libattn bottom-right; use n == m")
        shapes = [(a.op, a.n, m, a.heads, a.dim, a.causal)]
        batch = a.batch
    else:
        shapes = DEFAULT_SHAPES
        batch = a.batch

    torch.set_num_threads(a.threads)
    peak = None
    if not a.json:
        print(f"libattn vs torch {torch.__version__} CPU SDPA, f32, {a.threads} threads, "
              f"batch {batch}")
        print(f"{'op':<14}{'N':>6}{'M':>6}{'H':>4}{'D':>5} {'mask':<7}"
              f"{'libattn ms':>11}{'torch ms':>10}{'ratio':>7}{'libattn %pk':>12}"
              f"{'torch %pk':>10}{'rel_err':>10}", flush=True)
    failed = 0
    for op, n, m, heads, dim, causal in shapes:
        attn_ms, torch_ms, row = [], [], None
        try:
            for _ in range(a.rounds):
                row = attn_run(a.attn, op, batch, n, m, heads, dim, causal, a.threads,
                               a.repeats, ceilings=peak is None)
                if peak is None:
                    peak = row.get("peak_gflops")
                attn_ms.append(row["median_ms"])
                torch_ms.append(1e3 * torch_seconds(op, batch, n, m, heads, dim, causal,
                                                    a.repeats))
        except (RuntimeError, torch.cuda.OutOfMemoryError, MemoryError) as e:
            print(f"torch_peer.py: {op} n={n} m={m} h={heads} d={dim}: {e}", file=sys.stderr)
            failed += 1
            continue
        la, tt = median(attn_ms), median(torch_ms)
        flops = row["gflops"] * 1e9 * row["median_ms"] * 1e-3  # the CLI's count
        la_gf, tt_gf = flops / (la * 1e-3) * 1e-9, flops / (tt * 1e-3) * 1e-9
        pct = lambda gf: 100.0 * gf / peak if peak else None  # noqa: E731
        result = {
            "op": op, "batch": batch, "n": n, "m": m, "heads": heads, "dim": dim,
            "causal": causal, "threads": a.threads, "libattn_ms": la, "torch_ms": tt,
            "ratio": tt / la, "libattn_gflops": la_gf, "torch_gflops": tt_gf,
            "peak_gflops": peak, "libattn_pct_peak": pct(la_gf), "torch_pct_peak": pct(tt_gf),
            "libattn_rel_err": row.get("rel_err"), "libattn_isa": row.get("isa"),
            "torch_version": torch.__version__,
        }
        if a.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{op:<14}{n:>6}{m:>6}{heads:>4}{dim:>5} {'causal' if causal else 'none':<7}"
                  f"{la:>11.2f}{tt:>10.2f}{tt / la:>7.2f}{fmt(pct(la_gf), '.1f'):>12}"
                  f"{fmt(pct(tt_gf), '.1f'):>10}{fmt(row.get('rel_err'), '.1e'):>10}", flush=True)
    if not a.json and peak:
        print(f"ratio = torch ms / libattn ms (> 1: libattn faster); "
              f"%pk = percent of the measured FMA peak, {peak:.1f} GFLOP/s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
