"""The CAB-style benchmark and the mechanism registry, on a tiny suite."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from libattn import bench, mechanisms  # noqa: E402


def test_every_mechanism_runs_every_pattern_and_exact_is_exact():
    for pat in mechanisms.PATTERNS:
        q, k, v, causal = bench.make_inputs(pat, 256, 2, 32)
        rows = bench.sample_rows(q.shape[1])
        truth = bench.exact_rows(q, k, v, causal, rows)
        for name, m in mechanisms.available().items():
            if pat not in m.patterns:
                continue
            o = m.fn(q, k, v, causal)
            assert o.shape == q.shape[:3] + (v.shape[3],)
            err = bench.rel_rms(o[:, rows], truth)
            assert err < (1e-5 if name in ("exact", "window") else 1.5), (name, pat, err)


def test_lightning_matches_naive_decayed_linear_attention():
    import libattn
    import torch.nn.functional as F

    if not libattn._lib.HAS_LINEAR:
        pytest.skip("no linear engine in this build")
    g = torch.Generator().manual_seed(21)
    B, T, H, D = 1, 77, 3, 16
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    gam = mechanisms.retention_log_decays(H).double().exp()
    t = torch.arange(T, dtype=torch.float64)
    decay = gam[:, None, None] ** (t[:, None] - t[None, :]).clamp(min=0)  # [H, T, T]
    decay = decay * torch.ones(T, T, dtype=torch.bool).tril()
    phi = lambda x: F.elu(x.double()) + 1  # noqa: E731
    s = torch.einsum("bthd,bshd->bhts", phi(q), phi(k)) * decay
    want = torch.einsum("bhts,bshd->bthd", s, v.double()) / (
        s.sum(-1).transpose(1, 2)[..., None] + 1e-6)
    o = mechanisms.REGISTRY["lightning"].fn(q, k, v, True)
    assert bench.rel_rms(o, want) < 1e-5
    with pytest.raises(ValueError, match="causal self"):
        mechanisms.REGISTRY["lightning"].fn(q, k, v, False)


def test_planners_full_budget_is_exact():
    import libattn

    if not libattn._lib.HAS_PLANNERS:
        pytest.skip("no planners in this build")
    for causal in (False, True):
        q, k, v, _ = bench.make_inputs("causal-self", 512, 2, 32)
        o = mechanisms.REGISTRY["exact"].fn(q, k, v, causal)
        for plan in (libattn.Plan.select(q, k, 64, 64, top_k=8, causal=causal),
                     libattn.Plan.select(q, k, 64, 64, mass=1.0, causal=causal),
                     libattn.Plan.psa(q, k, [1.0], 64, 64, causal=causal)):
            assert plan.density > 0.4
            assert bench.rel_rms(libattn.attention(q, k, v, causal=causal, plan=plan), o) < 1e-5
        sparse = libattn.Plan.select(q, k, 64, 64, top_k=2, causal=causal)
        assert sparse.density < 0.5
        st = libattn.Plan.static(512, 512, 64, 64, local=8)
        assert st.heads == 1 and st.density > 0.4


def test_registry_is_one_entry():
    calls = []

    def fn(q, k, v, causal):
        calls.append(causal)
        return mechanisms.REGISTRY["exact"].fn(q, k, v, causal)

    mechanisms.register(mechanisms.Mechanism("test_copy", "sparse", fn, "a copy of exact"))
    try:
        recs = bench.run_suite(["exact", "test_copy"], ["causal-self"], [128, 256], 2, 16,
                               backward=True, progress=False)
        assert len(recs) == 4 and calls
        assert all(r["fwd_ms"] > 0 and r["rel_err"] < 1e-5 for r in recs)
        assert all(r["fwdbwd_ms"] for r in recs if r["mechanism"] == "exact")
    finally:
        del mechanisms.REGISTRY["test_copy"]


def test_cli_writes_json_csv_plots(tmp_path):
    out = tmp_path / "cab"
    assert bench.main(["--lengths", "128,256", "--heads", "2", "--dim", "16", "--out", str(out),
                       "--no-overhead"]) == 0
    data = json.loads((out / "cab.json").read_text())
    n = len(mechanisms.available()) * 4 * 2
    assert len(data["records"]) == n
    assert len((out / "cab.csv").read_text().splitlines()) == n + 1
    for png in ("time_vs_length.png", "pareto.png"):
        assert os.path.getsize(out / png) > 1000


def test_overhead_measurement():
    ov = bench.measure_overhead(trials=1, calls=200)
    assert ov["numpy_us"] > 0 and ov["torch_us"] > 0
