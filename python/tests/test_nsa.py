"""libattn.nsa_attention against naive PyTorch branches (float64)."""

import pytest

torch = pytest.importorskip("torch")

import libattn  # noqa: E402
from libattn import _nsa  # noqa: E402

pytestmark = pytest.mark.skipif(not _nsa.HAS_NSA, reason="no NSA in this build")

B, N, H, HK, D = 2, 301, 4, 2, 16


def masked_attention(q, k, v, mask):
    """Softmax attention in float64 with GQA; rows with no key give 0."""
    k, v = (x.double().repeat_interleave(H // HK, 2) for x in (k, v))
    s = torch.einsum("bnhd,bmhd->bhnm", q.double(), k) / D**0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num()
    return torch.einsum("bhnm,bmhd->bnhd", p, v)


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, h, D, generator=g) for h in (H, HK, HK))


def one_branch(i):
    g = torch.zeros(B, N, H, 3)
    g[..., i] = 1
    return g


def test_each_branch_matches_its_reference():
    q, k, v = inputs(1)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    exact = masked_attention(q, k, v, causal)
    # selection keeping every block, and a window over everything: exact causal
    o = libattn.nsa_attention(q, k, v, one_branch(1), sel_block=32, sel_count=10, query_block=32)
    assert rel(o, exact) < 1e-5
    o = libattn.nsa_attention(q, k, v, one_branch(2), window=N)
    assert rel(o, exact) < 1e-5
    # a short window: the last 40 keys
    i, j = torch.arange(N)[:, None], torch.arange(N)[None]
    o = libattn.nsa_attention(q, k, v, one_branch(2), window=40)
    assert rel(o, masked_attention(q, k, v, (j <= i) & (j > i - 40))) < 1e-5
    # compressed: means of l keys every s, seen once the whole span is past
    l, s = 32, 16
    mc = (N - l) // s + 1
    kc = torch.stack([k[:, t * s:t * s + l].mean(1) for t in range(mc)], 1)
    vc = torch.stack([v[:, t * s:t * s + l].mean(1) for t in range(mc)], 1)
    t = torch.arange(mc)[None]
    want = masked_attention(q, kc, vc, t * s + l - 1 <= i)
    o = libattn.nsa_attention(q, k, v, one_branch(0), cmp_block=l, cmp_stride=s)
    assert rel(o, want) < 1e-5


def test_gates_mix_the_branches_and_numpy_works():
    q, k, v = inputs(2)
    g = torch.rand(B, N, H, 3, generator=torch.Generator().manual_seed(3))
    kw = dict(sel_block=32, sel_count=3, query_block=32, window=50)
    mixed = libattn.nsa_attention(q, k, v, g, **kw)
    parts = sum(g[..., i:i + 1] * libattn.nsa_attention(q, k, v, one_branch(i), **kw)
                for i in range(3))
    assert rel(mixed, parts.double()) < 1e-5
    on = libattn.nsa_attention(q.numpy(), k.numpy(), v.numpy(), g.numpy(), **kw)
    assert rel(torch.from_numpy(on), mixed.double()) < 1e-6


def test_bad_input_raises():
    q, k, v = inputs(4)
    with pytest.raises(ValueError, match="cmp_stride"):
        libattn.nsa_attention(q, k, v, cmp_block=8, cmp_stride=16)
    with pytest.raises(ValueError, match="gates"):
        libattn.nsa_attention(q, k, v, torch.zeros(B, N, H, 3, dtype=torch.float64))
    with pytest.raises(libattn.AttnError):
        libattn.nsa_attention(q, k, v, torch.zeros(B, N, H, 2))
