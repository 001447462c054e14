"""The bindings of GLA, SSD, the Mamba scan, the grid mechanisms, PARO,
SpAtten and CATANet against naive PyTorch references (float64), with numpy
and torch inputs, a non-contiguous input, bad input, and gradients: the C
backwards of float32 inputs against PyTorch autograd of the plain
implementation in float64 (relative error < 1e-4), and gradcheck of the
libattn.torch functions on float64 (eps 1e-6, atol 1e-6)."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import libattn  # noqa: E402
import libattn.torch as lat  # noqa: E402
from libattn import _grid, _ssm, _tokens, mechanisms  # noqa: E402
from attn_testutil import kinds, noncontig, rel, rnd  # noqa: E402
from torch.autograd import gradcheck  # noqa: E402

F = torch.nn.functional
need_grid = pytest.mark.skipif(not _grid.HAS_GRID, reason="no grid mechanisms in this build")


def logits_ref(q, k, scale=None, softcap=0.0):
    """Scaled (and soft-capped) logits [B, H, N, M] in float64, H == Hk."""
    s = torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) * (scale or q.shape[3] ** -0.5)
    return softcap * torch.tanh(s / softcap) if softcap else s


def attn_ref(q, k, v, mask=None, bias=None, scale=None, softcap=0.0):
    """Softmax attention in float64 with GQA; mask [.., N, M] bool, bias
    added to the logits; rows with no key give 0."""
    H, Hk, D = q.shape[2], k.shape[2], q.shape[3]
    k, v = (x.double().repeat_interleave(H // Hk, 2) for x in (k, v))
    s = logits_ref(q, k, scale, softcap)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1).nan_to_num(), v)


# ---------------------------------------------------------------- GLA, SSD, Mamba


def gla_ref(q, k, v, g, scale=None, S=None):
    B, T, H, D = q.shape
    k, v = (x.double().repeat_interleave(H // k.shape[2], 2) for x in (k, v))
    g = g.double()
    if g.dim() == 3:
        g = g[..., None].expand(B, T, H, D)
    S = torch.zeros(B, H, D, v.shape[3], dtype=torch.float64) if S is None else S.double()
    out = []
    for t in range(T):
        S = g[:, t].exp()[..., None] * S + torch.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
        out.append(torch.einsum("bhd,bhde->bhe", q[:, t].double(), S) * (scale or D ** -0.5))
    return torch.stack(out, 1), S


@pytest.mark.parametrize("per_key", [True, False])
def test_gla_matches_recurrence(per_key):
    B, T, H, Hk, D, Dv = 2, 45, 4, 2, 8, 6
    q, k, v = rnd(B, T, H, D, seed=1), rnd(B, T, Hk, D, seed=2), rnd(B, T, Hk, Dv, seed=3)
    g = F.logsigmoid(rnd(B, T, H, D, seed=4) + 2) if per_key else F.logsigmoid(rnd(B, T, H, seed=4))
    want, S = gla_ref(q, k, v, g)
    kinds(lambda *a: libattn.gla_attention(*a), (q, k, v, g), want, nc=0)
    # two halves through the state give the whole
    o1, s1 = libattn.gla_attention(q[:, :20], k[:, :20], v[:, :20], g[:, :20], return_state=True)
    o2, s2 = libattn.gla_attention(q[:, 20:], k[:, 20:], v[:, 20:], g[:, 20:], state_in=s1,
                                   return_state=True)
    assert rel(torch.cat([o1, o2], 1), want) < 1e-5 and rel(s2, S) < 1e-5
    with pytest.raises(libattn.AttnError, match="g->shape"):
        libattn.gla_attention(q, k, v, torch.zeros(B, T, H, D + 1))
    with pytest.raises(ValueError, match="g: expected"):
        libattn.gla_attention(q, k, v, torch.zeros(T, H))


def test_gla_gradcheck():
    d = dict(dtype=torch.float64)
    q, k, v = (rnd(1, 9, 2, 3, seed=s, **d).requires_grad_() for s in (1, 2, 3))
    for g in (F.logsigmoid(rnd(1, 9, 2, 3, seed=4, **d)), F.logsigmoid(rnd(1, 9, 2, seed=5, **d))):
        assert gradcheck(lat.gla_attention, (q, k, v, g.requires_grad_()), eps=1e-6, atol=1e-6)


def ssd_ref(x, dt, a, bm, cm, dskip=None, S=None):
    B, T, H, P = x.shape
    G, N = bm.shape[2], bm.shape[3]
    bm, cm = (z.double().repeat_interleave(H // G, 2) for z in (bm, cm))
    x, dt, a = x.double(), dt.double(), a.double()
    S = torch.zeros(B, H, N, P, dtype=torch.float64) if S is None else S.double()
    ys = []
    for t in range(T):
        S = (dt[:, t] * a).exp()[..., None, None] * S + torch.einsum(
            "bhn,bhp->bhnp", bm[:, t], dt[:, t, :, None] * x[:, t])
        y = torch.einsum("bhn,bhnp->bhp", cm[:, t], S)
        if dskip is not None:
            y = y + dskip.double()[:, None] * x[:, t]
        ys.append(y)
    return torch.stack(ys, 1), S


def ssd_inputs(B=2, T=33, H=4, P=5, G=2, N=6, dtype=torch.float32):
    d = dict(dtype=dtype)
    return (rnd(B, T, H, P, seed=1, **d), F.softplus(rnd(B, T, H, seed=2, **d)),
            -rnd(H, seed=3, **d).abs() - 0.1, rnd(B, T, G, N, seed=4, **d),
            rnd(B, T, G, N, seed=5, **d), rnd(H, seed=6, **d))


@pytest.mark.skipif(not _ssm.HAS_SSD, reason="no SSD in this build")
def test_ssd_forward_state_backward():
    x, dt, a, bm, cm, ds = ssd_inputs()
    want, S = ssd_ref(x, dt, a, bm, cm, ds)
    kinds(lambda *z: libattn.ssd(*z), (x, dt, a, bm, cm, ds), want, nc=3)
    y1, s1 = libattn.ssd(x[:, :10], dt[:, :10], a, bm[:, :10], cm[:, :10], ds, return_state=True)
    y2, s2 = libattn.ssd(x[:, 10:], dt[:, 10:], a, bm[:, 10:], cm[:, 10:], ds, state_in=s1,
                         return_state=True)
    assert rel(torch.cat([y1, y2], 1), want) < 1e-5 and rel(s2, S) < 1e-5
    # the backward against autograd through the reference (float64)
    leaves = [z.double().requires_grad_() for z in (x, dt, a, bm, cm, ds)]
    dy = rnd(*want.shape, seed=9)
    ssd_ref(*leaves)[0].backward(dy.double())
    got = libattn.ssd_backward(x, dt, a, bm, cm, dy, ds)
    assert len(got) == 6
    for name, gc, leaf in zip("x dt a bm cm dskip".split(), got, leaves):
        assert gc.shape == leaf.shape and rel(gc, leaf.grad) < 1e-4, name
    # and through libattn.torch.ssd (no dskip)
    xs = [z.clone().requires_grad_() for z in (x, dt, a, bm, cm)]
    leaves = [z.double().requires_grad_() for z in (x, dt, a, bm, cm)]
    ssd_ref(*leaves)[0].backward(dy.double())
    lat.ssd(*xs).backward(dy)
    for gx, leaf in zip(xs, leaves):
        assert rel(gx.grad, leaf.grad) < 1e-4
    with pytest.raises(libattn.AttnError, match="dt->shape"):
        libattn.ssd(x, dt[:, 1:], a, bm, cm)
    with pytest.raises(libattn.AttnError, match="groups"):
        three = [z[:, :, :1].expand(-1, -1, 3, -1) for z in (bm, cm)]
        libattn.ssd(x, dt, a, *three)


@pytest.mark.skipif(not (_ssm.HAS_SSD and _ssm.HAS_MAMBA), reason="no SSD or Mamba scan")
def test_ssd_and_mamba_gradcheck():
    """float64 in, but both ops compute in float32 inside (their copies of
    the inputs are f32, as their C comments say): a coarser step and
    tolerance than the other gradchecks."""
    d = dict(dtype=torch.float64)
    args = [z.requires_grad_() for z in ssd_inputs(1, 7, 2, 3, 1, 4, dtype=torch.float64)]
    assert gradcheck(lat.ssd, args, eps=1e-3, atol=1e-3, rtol=1e-3)
    B, T, E, N = 1, 7, 3, 4
    args = [rnd(B, T, E, seed=1, **d), F.softplus(rnd(B, T, E, seed=2, **d)),
            -rnd(E, N, seed=3, **d).abs(), rnd(B, T, N, seed=4, **d), rnd(B, T, N, seed=5, **d),
            rnd(E, seed=6, **d)]
    assert gradcheck(lat.mamba_scan, [z.requires_grad_() for z in args], eps=1e-3, atol=1e-3,
                     rtol=1e-3)


def mamba_ref(x, delta, a, bm, cm, dskip=None):
    B, T, E = x.shape
    x, delta, a, bm, cm = (z.double() for z in (x, delta, a, bm, cm))
    h = torch.zeros(B, E, a.shape[1], dtype=torch.float64)
    ys = []
    for t in range(T):
        h = (delta[:, t, :, None] * a).exp() * h + delta[:, t, :, None] * bm[:, t, None, :] * \
            x[:, t, :, None]
        y = (cm[:, t, None, :] * h).sum(-1)
        if dskip is not None:
            y = y + dskip.double() * x[:, t]
        ys.append(y)
    return torch.stack(ys, 1), h


@pytest.mark.skipif(not _ssm.HAS_MAMBA, reason="no Mamba scan in this build")
def test_mamba_scan_forward_state_backward():
    B, T, E, N = 2, 29, 6, 5
    x, bm, cm = rnd(B, T, E, seed=1), rnd(B, T, N, seed=2), rnd(B, T, N, seed=3)
    delta, a, ds = F.softplus(rnd(B, T, E, seed=4)), -rnd(E, N, seed=5).abs(), rnd(E, seed=6)
    want, h = mamba_ref(x, delta, a, bm, cm, ds)
    kinds(lambda *z: libattn.mamba_scan(*z), (x, delta, a, bm, cm, ds), want, nc=0)
    y, s = libattn.mamba_scan(x, delta, a, bm, cm, ds, return_state=True)
    assert s.shape == (B, E, N, 1) and rel(s[..., 0], h) < 1e-5
    leaves = [z.double().requires_grad_() for z in (x, delta, a, bm, cm, ds)]
    dy = rnd(B, T, E, seed=9)
    mamba_ref(*leaves)[0].backward(dy.double())
    xs = [z.clone().requires_grad_() for z in (x, delta, a, bm, cm, ds)]
    lat.mamba_scan(*xs).backward(dy)
    for name, z, leaf in zip("x delta a bm cm dskip".split(), xs, leaves):
        assert rel(z.grad, leaf.grad) < 1e-4, name
    with pytest.raises(libattn.AttnError, match="a->shape"):
        libattn.mamba_scan(x, delta, a[:3], bm, cm)


# ---------------------------------------------------------------- grids


def coords(grid):
    f, h, w = (1,) + tuple(grid) if len(grid) == 2 else grid
    t = torch.arange(f * h * w)
    return t // (h * w), (t // w) % h, t % w


def pool_ref(x, grid, r):
    f, h, w = (1,) + tuple(grid) if len(grid) == 2 else grid
    rf, rh, rw = (1,) + tuple(r) if len(r) == 2 else r
    B, _, Hh, D = x.shape
    y = x.double().reshape(B, f // rf, rf, h // rh, rh, w // rw, rw, Hh, D).mean((2, 4, 6))
    return y.reshape(B, -1, Hh, D)


def qkv(B=2, T=24, H=4, Hk=2, D=8, Dv=6, N=None, seed=0, dtype=torch.float32):
    return (rnd(B, N or T, H, D, seed=seed + 1, dtype=dtype),
            rnd(B, T, Hk, D, seed=seed + 2, dtype=dtype), rnd(B, T, Hk, Dv, seed=seed + 3,
                                                              dtype=dtype))


@need_grid
def test_grid_pool_sra_and_pooled_cross():
    q, k, v = qkv(T=24, N=10)  # cross: 10 queries, keys on a 4 x 6 grid
    kinds(lambda x: libattn.grid_pool(x, (4, 6), (2, 3)), (k,), pool_ref(k, (4, 6), (2, 3)))
    want = attn_ref(q, pool_ref(k, (4, 6), (2, 3)), pool_ref(v, (4, 6), (2, 3)))
    kinds(lambda *a: libattn.sra_attention(*a, (4, 6), (2, 3)), (q, k, v), want, nc=1)
    o, lse = libattn.sra_attention(q, k, v, (1, 4, 6), (1, 2, 3), return_lse=True)
    assert lse.shape == (2, 4, 10) and rel(o, want) < 1e-5
    # CrossLMM: queries on a 2 x 3 x 4 video grid, pooled by (1, 1, 2)
    q2 = rnd(2, 24, 4, 8, seed=7)
    want = attn_ref(pool_ref(q2, (2, 3, 4), (1, 1, 2)), k, v)
    kinds(lambda *a: libattn.pooled_cross_attention(*a, (2, 3, 4), (1, 1, 2)), (q2, k, v), want)
    with pytest.raises(libattn.AttnError, match="ratio"):
        libattn.sra_attention(q, k, v, (4, 6), (3, 3))
    with pytest.raises(libattn.AttnError, match=r"k->shape\[1\]"):
        libattn.sra_attention(q, k, v, (5, 6), (1, 1))
    with pytest.raises(TypeError, match="grid"):
        libattn.pooled_cross_attention(q2, k, v, 24, (1, 1))


@pytest.mark.skipif(not _grid.HAS_POOLED_CROSS_BACKWARD, reason="no pooled-cross backward")
def test_pooled_cross_backward():
    """CrossLMM's backward against autograd of mean-pooled queries attending
    to the keys: queries on a 2 x 3 x 4 video grid pooled by (2, 1, 2), GQA."""
    grid, ratio = (2, 3, 4), (2, 1, 2)
    q = rnd(2, 24, 4, 8, seed=7)
    _, k, v = qkv(T=17)
    o, lse = libattn.pooled_cross_attention(q, k, v, grid, ratio, return_lse=True)
    dout = rnd(*o.shape, seed=8)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    want = attn_ref(pool_ref(leaves[0], grid, ratio), leaves[1], leaves[2])
    (want * dout.double()).sum().backward()
    assert o.shape == (2, 6, 4, 6) and rel(o, want.detach()) < 1e-5
    got = libattn.pooled_cross_attention_backward(q, k, v, o, lse, dout, grid, ratio)
    for g, leaf in zip(got, leaves):
        assert g.shape == leaf.shape and g.dtype == torch.float32 and rel(g, leaf.grad) < 1e-4
    arrays = [x.numpy() for x in (q, k, v, o, lse, dout)]
    gn = libattn.pooled_cross_attention_backward(*arrays, grid, ratio)
    assert isinstance(gn[0], np.ndarray) and all(rel(a, b) < 1e-6 for a, b in zip(gn, got))
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    (lat.pooled_cross_attention(*xs, grid, ratio) * dout).sum().backward()
    for x, leaf in zip(xs, leaves):
        assert rel(x.grad, leaf.grad) < 1e-4
    d = [x.requires_grad_() for x in qkv(1, 7, 2, 1, 3, 2, N=12, dtype=torch.float64)]
    assert gradcheck(lambda *a: lat.pooled_cross_attention(*a, (3, 4), (3, 2)), d, eps=1e-6,
                     atol=1e-6)
    with pytest.raises(libattn.AttnError, match="dout"):
        libattn.pooled_cross_attention_backward(q, k, v, o, lse, dout[:, 1:], grid, ratio)
    with pytest.raises(libattn.AttnError, match="lse"):
        libattn.pooled_cross_attention_backward(q, k, v, o, lse[:, :, 1:], dout, grid, ratio)


@need_grid
def test_sra_gradcheck():
    q, k, v = (x.requires_grad_() for x in qkv(1, 12, 2, 1, 3, 2, N=5, dtype=torch.float64))
    assert gradcheck(lambda *a: lat.sra_attention(*a, (3, 4), (1, 2)), (q, k, v), eps=1e-6,
                     atol=1e-6)


def nbhd_mask(grid, radius):
    f, y, x = coords(grid)
    rf, rh, rw = (0,) + tuple(radius) if len(radius) == 2 else radius
    return (((f[:, None] - f[None]).abs() <= rf) & ((y[:, None] - y[None]).abs() <= rh) &
            ((x[:, None] - x[None]).abs() <= rw))


@need_grid
def test_neighborhood_forward_backward():
    q, k, v = qkv(T=35)
    for grid, radius in (((5, 7), (1, 2)), ((5, 7, 1), (2, 0, 0))):
        want = attn_ref(q, k, v, nbhd_mask(grid, radius))
        kinds(lambda *a: libattn.neighborhood_attention(*a, grid, radius, block=8), (q, k, v),
              want, nc=2)
    plan = libattn.neighborhood_plan((5, 7), (1, 2), 16, 16)
    assert 0 < plan.density < 1
    o, lse = libattn.neighborhood_attention(q, k, v, (5, 7), (1, 2), plan=plan, return_lse=True)
    assert rel(o, attn_ref(q, k, v, nbhd_mask((5, 7), (1, 2)))) < 1e-5
    dq, dk, dv = libattn.neighborhood_attention_backward(q, k, v, o, lse, torch.ones_like(o),
                                                         (5, 7), (1, 2), plan=plan)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    attn_ref(*leaves, nbhd_mask((5, 7), (1, 2))).sum().backward()
    for g, leaf in zip((dq, dk, dv), leaves):
        assert rel(g, leaf.grad) < 1e-4
    with pytest.raises(libattn.AttnError, match="radius"):
        libattn.neighborhood_attention(q, k, v, (5, 7), (-1, 1))
    d = qkv(1, 12, 2, 2, 3, 2, dtype=torch.float64)
    assert gradcheck(lambda *a: lat.neighborhood_attention(*a, (3, 4), (1, 1), block=4),
                     tuple(x.requires_grad_() for x in d), eps=1e-6, atol=1e-6)


def window_of(grid, win):
    f, y, x = coords(grid)
    G = (1,) + tuple(grid) if len(grid) == 2 else grid
    W = (1,) + tuple(win) if len(win) == 2 else win
    wid = ((f // W[0]) * (G[1] // W[1]) + y // W[1]) * (G[2] // W[2]) + x // W[2]
    pos = ((f % W[0]) * W[1] + y % W[1]) * W[2] + x % W[2]
    return wid, pos


@need_grid
def test_hilo_and_global_context():
    grid, win = (4, 6), (2, 3)
    q, k, v = qkv(T=24, Hk=4)
    wid, pos = window_of(grid, win)
    same = wid[:, None] == wid[None]
    lo = 1
    hi = attn_ref(q[:, :, :3], k[:, :, :3], v[:, :, :3], same)
    low = attn_ref(q[:, :, 3:], pool_ref(k[:, :, 3:], grid, win), pool_ref(v[:, :, 3:], grid, win))
    want = torch.cat([hi, low], 2)
    kinds(lambda *a: libattn.hilo_attention(*a, grid, win, lo), (q, k, v), want, nc=0)
    with pytest.raises(libattn.AttnError, match="lo_heads"):
        libattn.hilo_attention(q, k, v, grid, win, 5)
    qg = rnd(2, 6, 4, 8, seed=11)
    want_l = attn_ref(q, k, v, same)
    want_g = attn_ref(qg[:, pos], k, v, same)
    ol, og = kinds(lambda *a: libattn.global_context_attention(*a, grid, win), (q, qg, k, v),
                   want_l, nc=2)
    assert rel(og, want_g) < 1e-5
    with pytest.raises(libattn.AttnError, match="q_global"):
        libattn.global_context_attention(q, qg[:, :5], k, v, grid, win)


need_windows = pytest.mark.skipif(not _grid.HAS_WINDOW_BACKWARD,
                                  reason="no HiLo / Global Context backward in this build")


def hilo_ref(q, k, v, grid, win, lo, softcap=0.0):
    """HiLo in float64: Hi heads within their window, Lo heads to pooled keys."""
    wid, _ = window_of(grid, win)
    hi = q.shape[2] - lo
    parts = []
    if hi:
        parts.append(attn_ref(q[:, :, :hi], k[:, :, :hi], v[:, :, :hi], wid[:, None] == wid[None],
                              softcap=softcap))
    if lo:
        parts.append(attn_ref(q[:, :, hi:], pool_ref(k[:, :, hi:], grid, win),
                              pool_ref(v[:, :, hi:], grid, win), softcap=softcap))
    return torch.cat(parts, 2)


def hilo_lse_ref(q, k, grid, win, lo, softcap=0.0):
    """HiLo's LSE [B, H, T]: Hi heads over their window, Lo heads over pooled keys."""
    wid, _ = window_of(grid, win)
    hi = q.shape[2] - lo
    parts = []
    if hi:
        s = logits_ref(q[:, :, :hi], k[:, :, :hi], softcap=softcap)
        parts.append(s.masked_fill(wid[:, None] != wid[None], -math.inf).logsumexp(-1))
    if lo:
        s = logits_ref(q[:, :, hi:], pool_ref(k[:, :, hi:], grid, win), softcap=softcap)
        parts.append(s.logsumexp(-1))
    return torch.cat(parts, 1)


def gc_ref(q, qg, k, v, grid, win, softcap=0.0):
    """Global Context in float64: (o_local, o_global), and their LSEs."""
    wid, pos = window_of(grid, win)
    same = wid[:, None] == wid[None]
    outs = tuple(attn_ref(x, k, v, same, softcap=softcap) for x in (q, qg[:, pos]))
    lses = tuple(logits_ref(x, k, softcap=softcap).masked_fill(~same, -math.inf).logsumexp(-1)
                 for x in (q, qg[:, pos]))
    return outs, lses


@need_windows
@pytest.mark.parametrize("grid, win, lo", [((6, 10), (2, 5), 0), ((6, 10), (2, 5), 1),
                                           ((6, 10), (2, 5), 3), ((2, 4, 6), (2, 2, 3), 1)])
def test_hilo_backward_matches_autograd(grid, win, lo):
    T = math.prod(grid)
    q, k, v = qkv(B=2, T=T, H=3, Hk=3, D=8, Dv=6)
    o, lse = libattn.hilo_attention(q, k, v, grid, win, lo, softcap=4.0, return_lse=True)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    want = hilo_ref(*leaves, grid, win, lo, softcap=4.0)
    assert rel(o, want) < 1e-5
    assert lse.dtype == torch.float32 and rel(lse, hilo_lse_ref(q, k, grid, win, lo, 4.0)) < 1e-5
    do = rnd(*o.shape, seed=9)
    (want * do.double()).sum().backward()
    grads = libattn.hilo_attention_backward(q, k, v, o, lse, do, grid, win, lo, softcap=4.0)
    for g, leaf, name in zip(grads, leaves, "qkv"):
        assert g.dtype == torch.float32 and rel(g, leaf.grad) < 1e-4, name
    # numpy in, numpy out; the same gradients
    npg = libattn.hilo_attention_backward(*(x.numpy() for x in (q, k, v, o, lse, do)), grid, win,
                                          lo, softcap=4.0)
    for g, gt in zip(npg, grads):
        assert isinstance(g, np.ndarray) and rel(g, gt) < 1e-6
    # autograd through libattn.torch gives the same
    lq, lk, lv = (x.clone().requires_grad_() for x in (q, k, v))
    (lat.hilo_attention(lq, lk, lv, grid, win, lo, softcap=4.0) * do).sum().backward()
    for leaf, gt in zip((lq, lk, lv), grads):
        assert rel(leaf.grad, gt) < 1e-6
    with pytest.raises(libattn.AttnError, match="dout"):
        libattn.hilo_attention_backward(q, k, v, o, lse, do[..., :-1], grid, win, lo)
    with pytest.raises(libattn.AttnError, match="lse"):
        libattn.hilo_attention_backward(q, k, v, o, lse[:, :, 1:], do, grid, win, lo)


@need_windows
@pytest.mark.parametrize("grid, win", [((6, 10), (2, 5)), ((2, 4, 6), (2, 2, 3))])
def test_global_context_backward_matches_autograd(grid, win):
    T, wtok = math.prod(grid), math.prod(win)
    q, k, v = qkv(B=2, T=T, H=2, Hk=2, D=8, Dv=6)
    qg = rnd(2, wtok, 2, 8, seed=11)
    ol, og, ll, lg = libattn.global_context_attention(q, qg, k, v, grid, win, softcap=4.0,
                                                      return_lse=True)
    leaves = [x.double().requires_grad_() for x in (q, qg, k, v)]
    (wl, wg), (rll, rlg) = gc_ref(*leaves, grid, win, softcap=4.0)
    assert rel(ol, wl) < 1e-5 and rel(og, wg) < 1e-5
    assert rel(ll, rll) < 1e-5 and rel(lg, rlg) < 1e-5
    dl, dg = rnd(*ol.shape, seed=12), rnd(*og.shape, seed=13)
    ((wl * dl.double()).sum() + (wg * dg.double()).sum()).backward()
    grads = libattn.global_context_attention_backward(q, qg, k, v, ol, og, ll, lg, dl, dg, grid,
                                                      win, softcap=4.0)
    for g, leaf, name in zip(grads, leaves, ("q", "q_global", "k", "v")):
        assert g.shape == leaf.shape and rel(g, leaf.grad) < 1e-4, name
    # autograd through libattn.torch: both outputs differentiable
    lq, lg_, lk, lv = (x.clone().requires_grad_() for x in (q, qg, k, v))
    a, b = lat.global_context_attention(lq, lg_, lk, lv, grid, win, softcap=4.0)
    ((a * dl).sum() + (b * dg).sum()).backward()
    for leaf, gt in zip((lq, lg_, lk, lv), grads):
        assert rel(leaf.grad, gt) < 1e-6
    with pytest.raises(libattn.AttnError, match="dout_global"):
        libattn.global_context_attention_backward(q, qg, k, v, ol, og, ll, lg, dl, dg[:, :-1],
                                                  grid, win)
    with pytest.raises(libattn.AttnError, match="q_global"):
        libattn.global_context_attention_backward(q, qg[:, :-1], k, v, ol, og, ll, lg, dl, dg,
                                                  grid, win)


@need_windows
def test_hilo_and_global_context_gradcheck():
    d = qkv(1, 12, 3, 3, 3, 2, dtype=torch.float64)
    q, k, v = (x.requires_grad_() for x in d)
    assert gradcheck(lambda *a: lat.hilo_attention(*a, (3, 4), (1, 2), 1, softcap=2.0),
                     (q, k, v), eps=1e-6, atol=1e-6)
    qg = rnd(1, 2, 3, 3, seed=5, dtype=torch.float64).requires_grad_()
    assert gradcheck(lambda q, qg, k, v: lat.global_context_attention(q, qg, k, v, (3, 4), (1, 2)),
                     (q, qg, k, v), eps=1e-6, atol=1e-6)


@need_windows
@pytest.mark.parametrize("name", ["hilo", "global_context"])
def test_registry_window_backwards(name):
    """The registry's differentiable forms (GQA kv heads, the grid and
    windows the benchmark picks) against autograd of the references."""
    m = mechanisms.REGISTRY[name]
    assert m.backward is not None
    q, k, v = qkv(B=1, T=128, H=2, Hk=1, D=8, Dv=6)
    do = rnd(1, 128, 2, 6, seed=14)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    (m.backward(*leaves, False) * do).sum().backward()
    refs = [x.double().requires_grad_() for x in (q, k, v)]
    g = mechanisms.grid_of(128)
    w = mechanisms._clip(g, mechanisms.GRID_WIN)
    assert math.prod(g) // math.prod(w) > 1  # several windows
    qr, kr, vr = refs[0], refs[1].repeat_interleave(2, 2), refs[2].repeat_interleave(2, 2)
    if name == "hilo":
        want = hilo_ref(qr, kr, vr, g, w, 1)
    else:
        wid, pos = window_of(g, w)
        qw = qr[:, torch.from_numpy(_grid.grid_window_index(g, w))]
        qg = qw.reshape(1, -1, math.prod(w), 2, 8).mean(1)
        (ol, og), _ = gc_ref(qr, qg, kr, vr, g, w)
        want = 0.5 * (ol + og)
    assert rel(m.fn(q, k, v, False), want) < 1e-5
    (want * do.double()).sum().backward()
    for leaf, r in zip(leaves, refs):
        assert rel(leaf.grad, r.grad) < 1e-4


@need_grid
def test_reorderings_and_paro():
    grid = (2, 3, 4)
    ref = np.arange(24).reshape(grid)
    for perm in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        assert np.array_equal(libattn.grid_axis_index(grid, perm), ref.transpose(perm).ravel())
    widx = libattn.grid_window_index((4, 6), (2, 3))
    wid, pos = window_of((4, 6), (2, 3))
    assert np.array_equal(widx, np.lexsort((pos.numpy(), wid.numpy())))
    x = rnd(2, 24, 3, 5, seed=1)
    idx = torch.randperm(24, generator=torch.Generator().manual_seed(2))
    g = kinds(lambda a: libattn.gather_tokens(a, idx), (x,), x[:, idx])
    kinds(lambda a: libattn.scatter_tokens(a, idx), (g,), x)
    with pytest.raises(libattn.AttnError, match="idx"):
        libattn.gather_tokens(x, np.zeros(24))
    with pytest.raises(libattn.AttnError, match="perm"):
        libattn.grid_axis_index(grid, (0, 0, 1))
    # PARO: the axis order whose sampled rows concentrate the most mass
    T, H, D, block, keep, samples = 24, 3, 4, 4, 2, 5
    q, k = rnd(1, T, H, D, seed=3), rnd(1, T, 1, D, seed=4)
    order = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    want = []
    for h in range(H):
        conc = []
        for perm in order:
            i = torch.from_numpy(ref.transpose(perm).ravel())
            rows = [a * T // samples for a in range(samples)]
            s = (q[0, i[rows], h].double() @ k[0, i, 0].double().T / D ** 0.5).softmax(-1)
            mass = s.reshape(samples, T // block, block).sum(-1).sort(-1, descending=True)[0]
            conc.append(mass[:, :keep].sum().item())
        want.append(order[int(np.argmax(conc))])
    got = libattn.paro_choose(q, k, grid, block=block, keep=keep, samples=samples)
    assert got.shape == (H, 3) and [tuple(p) for p in got.tolist()] == want
    assert np.array_equal(libattn.paro_choose(noncontig(q), k.numpy(), grid, block=block,
                                              keep=keep, samples=samples), got)
    with pytest.raises(libattn.AttnError, match="block"):
        libattn.paro_choose(q, k, grid, block=0)


# ---------------------------------------------------------------- SpAtten, CATANet


@pytest.mark.skipif(not _tokens.HAS_SPATTEN, reason="no SpAtten in this build")
@pytest.mark.parametrize("causal", [False, True])
def test_spatten_importance_top_select(causal):
    q, k, v = qkv(N=17, T=29)
    o, lse = libattn.attention(q, k, v, causal=causal, return_lse=True)
    mask = torch.ones(17, 29, dtype=torch.bool).tril(29 - 17) if causal else None
    kr = k.double().repeat_interleave(2, 2)
    s = torch.einsum("bnhd,bmhd->bhnm", q.double(), kr) / 8 ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    want = s.softmax(-1).sum((1, 2))  # [B, M]
    imp = kinds(lambda a, b, c: libattn.token_importance(a, b, c, causal=causal), (q, k, lse),
                want, tol=1e-6)
    assert imp.dtype == torch.float64
    acc = np.zeros((2, 29))
    libattn.token_importance(q.numpy(), k.numpy(), lse.numpy(), causal=causal, importance=acc)
    libattn.token_importance(q.numpy(), k.numpy(), lse.numpy(), causal=causal, importance=acc)
    assert rel(acc, 2 * want) < 1e-6  # accumulates (the cascade across layers)
    keep = 7
    top = libattn.top_tokens(imp[0], keep)
    ref = np.sort(np.argsort(-imp[0].numpy(), kind="stable")[:keep])
    assert isinstance(top, torch.Tensor) and np.array_equal(top.numpy(), ref)
    both = libattn.top_tokens(imp.numpy(), keep)
    assert both.shape == (2, keep) and np.array_equal(both[0], ref)
    kinds(lambda x: libattn.select_tokens(x, top), (v,), v[:, top])
    hi = libattn.head_importance(o)
    assert rel(hi, o.double().pow(2).sum((1, 3)).sqrt()) < 1e-6
    with pytest.raises(libattn.AttnError, match="lse"):
        libattn.token_importance(q, k, lse[:, :1])
    with pytest.raises(ValueError, match="importance"):
        libattn.token_importance(q, k, lse, importance=np.zeros((2, 28)))
    with pytest.raises(libattn.AttnError, match="keep"):
        libattn.top_tokens(imp[0], 30)
    with pytest.raises(libattn.AttnError, match="idx"):
        libattn.select_tokens(v, [0, 29])


@pytest.mark.skipif(not _tokens.HAS_CATANET, reason="no CATANet in this build")
def test_catanet_groups_intra_inter():
    N, G = 40, 5
    q, k, v = qkv(B=1, T=N, H=4, Hk=2)
    feats = rnd(1, N, 1, 3, seed=8)
    centres = rnd(1, G, 1, 3, seed=9)
    centres[0, 4] = 50.0  # far from every token: an empty group, left out
    grp = ((feats[0, :, 0, None] - centres[0, None, :, 0]) ** 2).sum(-1).argmin(1)
    want_i = attn_ref(q, k, v, grp[:, None] == grp[None])
    live = [g for g in range(G) if (grp == g).any()]
    km = torch.stack([k[:, grp == g].double().mean(1) for g in live], 1)
    vm = torch.stack([v[:, grp == g].double().mean(1) for g in live], 1)
    size = torch.tensor([(grp == g).sum().item() for g in live], dtype=torch.float64)
    want_x = attn_ref(q, km, vm, bias=size.log())
    oi, ox, got = kinds(lambda *a: libattn.catanet_attention(*a, return_groups=True),
                        (q, k, v, feats, centres), want_i, nc=1)
    assert rel(ox, want_x) < 1e-5 and torch.equal(got, grp)
    with pytest.raises(libattn.AttnError, match="feats"):
        libattn.catanet_attention(q, k, v, feats[:, 1:], centres)


def catanet_inputs(N, G, H=4, Hk=2, D=8, Dv=6, dtype=torch.float32):
    """q, k, v, feats, centres and the groups: centre G - 2 far from every
    token (an empty group), centre G - 1 on token 7 alone (a group of one)."""
    q, k, v = qkv(B=1, T=N, H=H, Hk=Hk, D=D, Dv=Dv, dtype=dtype)
    feats = rnd(1, N, 1, 3, seed=8, dtype=dtype)
    centres = rnd(1, G, 1, 3, seed=9, dtype=dtype)
    centres[0, G - 2] = 50.0
    centres[0, G - 1] = feats[0, 7] = 20.0
    grp = ((feats[0, :, 0, None] - centres[0, None, :, 0]) ** 2).sum(-1).argmin(1)
    assert not (grp == G - 2).any() and (grp == G - 1).sum() == 1
    return q, k, v, feats, centres, grp


def catanet_ref(q, k, v, grp, scale=None):
    """CATANet's two branches in plain PyTorch (float64, differentiable in
    q, k, v) for the fixed groups grp [N]; and their LSEs [1, H, N]."""
    live = grp.unique().tolist()
    same = grp[:, None] == grp[None]
    km = torch.stack([k[:, grp == g].double().mean(1) for g in live], 1)
    vm = torch.stack([v[:, grp == g].double().mean(1) for g in live], 1)
    bias = torch.tensor([(grp == g).sum().item() for g in live], dtype=torch.float64).log()
    H, D = q.shape[2], q.shape[3]
    sc = scale or D ** -0.5

    def logits(keys):
        return torch.einsum("bnhd,bmhd->bhnm", q.double(),
                            keys.double().repeat_interleave(H // keys.shape[2], 2)) * sc

    lse_i = logits(k).masked_fill(~same, -math.inf).logsumexp(-1)
    lse_x = (logits(km) + bias).logsumexp(-1)
    return (attn_ref(q, k, v, same, scale=scale), attn_ref(q, km, vm, bias=bias, scale=scale),
            lse_i, lse_x)


@pytest.mark.skipif(not _tokens.HAS_CATANET_BACKWARD, reason="no CATANet backward")
def test_catanet_lse_and_backward():
    """The LSEs against logsumexp, and the backward (groups held fixed)
    against autograd of catanet_ref: GQA, odd sizes, an empty group and a
    group of one token."""
    q, k, v, feats, centres, grp = catanet_inputs(N=37, G=6, D=7, Dv=5)
    oi, ox, li, lx, got_grp = libattn.catanet_attention(q, k, v, feats, centres, return_lse=True,
                                                         return_groups=True)
    assert torch.equal(got_grp, grp) and li.shape == lx.shape == (1, 4, 37)
    assert li.dtype == lx.dtype == torch.float32
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    want_i, want_x, lse_i, lse_x = catanet_ref(*leaves, grp)
    assert rel(oi, want_i.detach()) < 1e-5 and rel(ox, want_x.detach()) < 1e-5
    assert rel(li, lse_i.detach()) < 1e-5 and rel(lx, lse_x.detach()) < 1e-5
    doi, dox = rnd(*oi.shape, seed=10), rnd(*ox.shape, seed=11)
    ((want_i * doi.double()).sum() + (want_x * dox.double()).sum()).backward()
    got = libattn.catanet_attention_backward(q, k, v, feats, centres, oi, ox, li, lx, doi, dox)
    for g, leaf in zip(got, leaves):
        assert g.shape == leaf.shape and g.dtype == torch.float32 and rel(g, leaf.grad) < 1e-4
    arrays = [x.numpy() for x in (q, k, v, feats, centres, oi, ox, li, lx, doi, dox)]
    gn = libattn.catanet_attention_backward(*arrays)
    assert isinstance(gn[0], np.ndarray) and all(rel(a, b) < 1e-6 for a, b in zip(gn, got))
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    ti, tx = lat.catanet_attention(*xs, feats, centres)
    ((ti * doi).sum() + (tx * dox).sum()).backward()
    for x, leaf in zip(xs, leaves):
        assert rel(x.grad, leaf.grad) < 1e-4
    with pytest.raises(libattn.AttnError, match="dout_intra"):
        libattn.catanet_attention_backward(q, k, v, feats, centres, oi, ox, li, lx, doi[:, 1:],
                                           dox)
    with pytest.raises(libattn.AttnError, match="lse_inter"):
        libattn.catanet_attention_backward(q, k, v, feats, centres, oi, ox, li, lx[:, :1], doi,
                                           dox)


@pytest.mark.skipif(not _tokens.HAS_CATANET_BACKWARD, reason="no CATANet backward")
def test_catanet_gradcheck():
    """float64 on the reference backend, feats fixed (the groups do not move)."""
    q, k, v, feats, centres, _ = catanet_inputs(N=13, G=5, H=2, Hk=1, D=3, Dv=2,
                                                dtype=torch.float64)
    assert gradcheck(lambda *a: lat.catanet_attention(*a, feats, centres, scale=0.7),
                     tuple(x.requires_grad_() for x in (q, k, v)), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- registry entries


def test_grid_of_and_clip():
    assert mechanisms.grid_of(8192) == (64, 128) and mechanisms.grid_of(4096) == (64, 64)
    assert mechanisms.grid_of(13) == (1, 13) and mechanisms.grid_of(12) == (3, 4)
    assert mechanisms._clip((64, 128), 8) == (8, 8) and mechanisms._clip((3, 13), 8) == (3, 1)


def test_gla_and_ssd_entries_match_their_recurrences():
    if not libattn._lib.HAS_LINEAR or not _ssm.HAS_SSD:
        pytest.skip("no linear engine or SSD in this build")
    B, T, H, D = 1, 50, 2, 8
    q, k, v = (rnd(B, T, H, D, seed=s) for s in (1, 2, 3))
    phi = lambda x: F.elu(x.double()) + 1  # noqa: E731
    va = torch.cat([v, torch.ones(B, T, H, 1)], -1)
    oa, _ = gla_ref(phi(q), phi(k), va, F.logsigmoid(k.double()) / 16, scale=1.0)
    want = oa[..., :-1] / (oa[..., -1:] + 1e-6)
    assert rel(mechanisms.REGISTRY["gla"].fn(q, k, v, True), want) < 1e-5
    # causal cross: the first keys as a state
    assert rel(mechanisms.REGISTRY["gla"].fn(q[:, 20:], k, v, True), want[:, 20:]) < 1e-5
    x, dt, a, bm, cm = mechanisms.ssd_inputs(q, k, v)
    ya, _ = ssd_ref(x, dt, a, bm, cm)
    want = ya[..., :-1] / (ya[..., -1:] + 1e-6)
    assert rel(mechanisms.REGISTRY["ssd"].fn(q, k, v, True), want) < 1e-5
    assert rel(mechanisms.REGISTRY["ssd"].fn(q[:, 20:], k, v, True), want[:, 20:]) < 1e-5
    for name in ("gla", "ssd"):
        with pytest.raises(ValueError, match="causal"):
            mechanisms.REGISTRY[name].fn(q, k, v, False)


def crosslmm_plain(q, k, v):
    """The crosslmm entry in plain PyTorch: queries pooled on grid_of(N)
    by the clipped ratio, attention, each query its patch's output."""
    g = mechanisms.grid_of(q.shape[1])
    r = mechanisms._clip(g, mechanisms.CROSS_RATIO)
    return attn_ref(pool_ref(q, g, r), k, v)[:, mechanisms._patch_of_token(g, r)]


def catanet_plain(q, k, v):
    """The catanet entry in plain PyTorch, per sequence: features the keys
    averaged over heads (float32, as the entry), centres evenly spaced
    tokens, the groups held fixed."""
    N = q.shape[1]
    G = max(1, -(-N // mechanisms.CATANET_GROUP))
    out = []
    for b in range(q.shape[0]):
        feats = k[b].detach().float().mean(1).double()
        centres = feats[torch.linspace(0, N - 1, G).round().long()]
        grp = ((feats[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        oi, ox, _, _ = catanet_ref(q[b:b + 1], k[b:b + 1], v[b:b + 1], grp)
        out.append(0.5 * (oi + ox))
    return torch.cat(out)


@pytest.mark.parametrize("name,plain", [("crosslmm", crosslmm_plain), ("catanet", catanet_plain)])
def test_crosslmm_and_catanet_entries_differentiate(name, plain):
    m = mechanisms.REGISTRY[name]
    if not m.available() or m.backward is None:
        pytest.skip(f"no {name} backward in this build")
    q, k, v = qkv(B=2, T=300, H=2, Hk=1, D=8, Dv=8)  # catanet: 3 groups of ~128
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o = m.backward(*xs, False)
    assert rel(o.detach(), m.fn(q, k, v, False)) < 1e-6
    do = rnd(*o.shape, seed=5)
    (o * do).sum().backward()
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    want = plain(*leaves)
    assert rel(o.detach(), want.detach()) < 1e-5
    (want * do.double()).sum().backward()
    for x, leaf in zip(xs, leaves):
        assert rel(x.grad, leaf.grad) < 1e-4


def test_new_entries_declare_their_patterns():
    new = {"gla", "ssd", "sra", "crosslmm", "neighborhood", "hilo", "global_context", "paro",
           "spatten", "catanet"}
    assert new <= set(mechanisms.REGISTRY)
    for name in new:
        m = mechanisms.REGISTRY[name]
        assert m.encoder == ("noncausal-self" in m.patterns), name
        if m.family == "linear":
            assert all(p.startswith("causal") for p in m.patterns)
