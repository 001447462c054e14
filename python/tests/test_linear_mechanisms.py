"""The bindings of LightNet, random-feature attention (RFA), WERSA, Local
Linear Attention, the decode steps (attn_linear_decode, attn_mamba_step) and
the NSA backward, against naive PyTorch references in float64: numpy and
torch inputs, a non-contiguous input, bad input whose error names the
argument, gradients against autograd through the reference, and gradcheck
in float64 (a coarse step and tolerance where the C computes in f32 inside:
LightNet, RFA and WERSA make f32 copies of their inputs on every backend)."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import libattn  # noqa: E402
import libattn.torch as lat  # noqa: E402
from libattn import _linmech, _nsa, mechanisms  # noqa: E402
from attn_testutil import kinds, noncontig, rel, rnd  # noqa: E402
from torch.autograd import gradcheck  # noqa: E402

F = torch.nn.functional
LOOSE = dict(eps=1e-3, atol=2e-3, rtol=2e-3)  # gradcheck of ops that run in f32 inside


def qkv(B=2, T=37, H=4, Hk=2, D=8, Dv=6, seed=0, dtype=torch.float32):
    return (rnd(B, T, H, D, seed=seed + 1, dtype=dtype),
            rnd(B, T, Hk, D, seed=seed + 2, dtype=dtype),
            rnd(B, T, Hk, Dv, seed=seed + 3, dtype=dtype))


def heads(x, H):
    return x.double().repeat_interleave(H // x.shape[2], 2)


def grads_match(fn_c, fn_ref, args, dout, tol=1e-4):
    """Gradients of sum(fn(args) * dout): the C backward (fn_c through
    libattn.torch) against autograd through the float64 reference."""
    xs = [a.clone().requires_grad_() for a in args]
    ref = [a.double().requires_grad_() for a in args]
    (fn_c(*xs) * dout).sum().backward()
    (fn_ref(*ref) * dout.double()).sum().backward()
    for i, (x, r) in enumerate(zip(xs, ref)):
        assert rel(x.grad, r.grad) < tol, (i, rel(x.grad, r.grad))


# ---------------------------------------------------------------- LightNet


def lightnet_ref(q, k, v, scale=None):
    """S_t[x] = sum_{j<=t} e^{k_jx} v_j / sum_{j<=t} e^{k_jx}, o_t = scale q_t S_t."""
    H, D = q.shape[2], q.shape[3]
    k, v = heads(k, H), heads(v, H)
    e = (k - k.amax(1, keepdim=True)).exp()
    num = torch.cumsum(e[..., None] * v[..., None, :], 1)  # [B, T, H, D, Dv]
    S = num / torch.cumsum(e, 1)[..., None]
    return torch.einsum("bthd,bthde->bthe", q.double(), S) * (scale or D ** -0.5)


@pytest.mark.skipif(not _linmech.HAS_LIGHTNET, reason="no LightNet in this build")
def test_lightnet_forward_backward():
    q, k, v = qkv()
    kinds(lambda *a: libattn.lightnet_attention(*a), (q, k, v), lightnet_ref(q, k, v), nc=1)
    assert rel(libattn.lightnet_attention(q, k, v, scale=0.5), lightnet_ref(q, k, v, 0.5)) < 1e-5
    grads_match(lat.lightnet_attention, lightnet_ref, (q, k, v), rnd(2, 37, 4, 6, seed=9))
    dq, dk, dv = libattn.lightnet_attention_backward(q.numpy(), k.numpy(), v.numpy(),
                                                     np.ones((2, 37, 4, 6), np.float32))
    assert isinstance(dk, np.ndarray) and dk.shape == k.shape
    with pytest.raises(libattn.AttnError, match=r"v->shape"):
        libattn.lightnet_attention(q, k, v[:, :30])
    d = qkv(1, 6, 2, 1, 3, 2, dtype=torch.float64)
    assert gradcheck(lat.lightnet_attention, [x.requires_grad_() for x in d], **LOOSE)


# ---------------------------------------------------------------- RFA


M64 = (1 << 64) - 1


def rfa_draw(seed, f, d):
    """The C library's features (mech_rfa_draw): splitmix64 from
    seed ^ 0x5EEDF00D, Box-Muller pairs, rounded to float32."""
    s = (seed ^ 0x5EEDF00D) & M64

    def nxt():
        nonlocal s
        s = (s + 0x9E3779B97F4A7C15) & M64
        z = s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    w = np.empty(f * d)
    for i in range(0, f * d, 2):
        u1 = ((nxt() >> 11) + 0.5) / 9007199254740992.0
        u2 = (nxt() >> 11) / 9007199254740992.0
        r = math.sqrt(-2.0 * math.log(u1))
        w[i] = r * math.cos(2 * math.pi * u2)
        if i + 1 < f * d:
            w[i + 1] = r * math.sin(2 * math.pi * u2)
    return torch.from_numpy(w.astype(np.float32).astype(np.float64)).reshape(f, d)


def rfa_ref(q, k, v, nfeat, causal=True, seed=0, eps=1e-6):
    """Positive random features phi(x) = e^{w.x' - |x'|^2/2 - m} / sqrt(F),
    x' = x D^(-1/4), m the row's max for queries and one max over all keys
    (the C's range shifts, which cancel but for eps), then normalised linear
    attention."""
    H, D = q.shape[2], q.shape[3]
    w = rfa_draw(seed, nfeat, D)
    c = D ** -0.25

    def u(x):
        x = x.double() * c
        return x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)

    uq, uk = u(q), u(k)
    fq = (uq - uq.amax(-1, keepdim=True)).exp() / math.sqrt(nfeat)
    fk = heads((uk - uk.max()).exp() / math.sqrt(nfeat), H)
    v = heads(v, H)
    kv = torch.einsum("bthf,bthe->bthfe", fk, v)
    if causal:
        S, z = torch.cumsum(kv, 1), torch.cumsum(fk, 1)
    else:
        S, z = kv.sum(1, keepdim=True), fk.sum(1, keepdim=True)
    num = torch.einsum("bthf,bthfe->bthe", fq, S.expand(-1, q.shape[1], -1, -1, -1))
    den = (fq * z).sum(-1, keepdim=True)
    return num / (den + eps)


@pytest.mark.skipif(not _linmech.HAS_RFA, reason="no RFA in this build")
@pytest.mark.parametrize("causal", [True, False])
def test_rfa_matches_the_drawn_features(causal):
    q, k, v = qkv(T=29)
    nf = 24
    want = rfa_ref(q, k, v, nf, causal)
    kinds(lambda *a: libattn.rfa_attention(*a, features=nf, causal=causal), (q, k, v), want,
          tol=1e-4, nc=2)
    # another seed, other features; the default (2 D) count
    ctx = libattn.Context(seed=7)
    o = libattn.rfa_attention(q, k, v, features=nf, causal=causal, ctx=ctx)
    assert rel(o, rfa_ref(q, k, v, nf, causal, seed=7)) < 1e-4 and rel(o, want) > 1e-2
    assert rel(libattn.rfa_attention(q, k, v, causal=causal), rfa_ref(q, k, v, 16, causal)) < 1e-4
    grads_match(lambda *a: lat.rfa_attention(*a, features=nf, causal=causal),
                lambda *a: rfa_ref(*a, nf, causal), (q, k, v), rnd(2, 29, 4, 6, seed=9), tol=1e-3)
    with pytest.raises(libattn.AttnError, match="features"):
        libattn.rfa_attention(q, k, v, features=0)
    with pytest.raises(libattn.AttnError, match=r"k->shape"):
        libattn.rfa_attention(q[:, :20], k, v)


@pytest.mark.skipif(not _linmech.HAS_RFA, reason="no RFA in this build")
def test_rfa_gradcheck():
    d = qkv(1, 5, 2, 1, 3, 2, dtype=torch.float64)
    assert gradcheck(lambda *a: lat.rfa_attention(*a, features=4, causal=True),
                     [x.requires_grad_() for x in d], **LOOSE)


# ---------------------------------------------------------------- WERSA


def haar(x, w):
    """x~ = sum_l w[l-1] (c_{l-1} - c_l) + w[L] c_L, c_l[t] the mean of the
    2^l tokens ending at t (zeros before the first)."""
    T, L = x.shape[1], len(w) - 1
    cum = torch.cumsum(F.pad(x.double(), (0, 0, 0, 0, 1, 0)), 1)  # cum[t] = sum_{s < t}
    t = torch.arange(T)
    cs = [x.double()]
    for lv in range(1, L + 1):
        n = 2 ** lv
        cs.append((cum[:, t + 1] - cum[:, (t + 1 - n).clamp(min=0)]) / n)
    out = w[L] * cs[L]
    for lv in range(1, L + 1):
        out = out + w[lv - 1] * (cs[lv - 1] - cs[lv])
    return out


def wersa_ref(q, k, v, w, nfeat, causal=True):
    return rfa_ref(haar(q, w), haar(k, w), v, nfeat, causal)


@pytest.mark.skipif(not _linmech.HAS_WERSA, reason="no WERSA in this build")
@pytest.mark.parametrize("causal", [True, False])
def test_wersa_filter_features_backward(causal):
    q, k, v = qkv(T=41)
    w, nf = torch.tensor([1.0, 0.8, 0.6, 0.4]), 16
    want = wersa_ref(q, k, v, w, nf, causal)
    kinds(lambda *a: libattn.wersa_attention(*a, w, features=nf, causal=causal), (q, k, v),
          want, tol=1e-4, nc=0)
    # all weights 1: the filter is the identity, WERSA is RFA
    assert rel(libattn.wersa_attention(q, k, v, [1.0] * 4, features=nf, causal=causal),
               libattn.rfa_attention(q, k, v, features=nf, causal=causal)) < 1e-6
    # gradients of q, k, v and the level weights
    xs = [x.clone().requires_grad_() for x in (q, k, v, w)]
    ref = [x.double().requires_grad_() for x in (q, k, v, w)]
    dout = rnd(2, 41, 4, 6, seed=9)
    (lat.wersa_attention(*xs[:3], xs[3], features=nf, causal=causal) * dout).sum().backward()
    (wersa_ref(*ref, nf, causal) * dout.double()).sum().backward()
    for name, x, r in zip("q k v weights".split(), xs, ref):
        assert rel(x.grad, r.grad) < 1e-3, name
    got = libattn.wersa_attention_backward(q.numpy(), k.numpy(), v.numpy(), dout.numpy(),
                                           w.numpy(), features=nf, causal=causal)
    assert len(got) == 4 and rel(got[3], ref[3].grad) < 1e-3
    with pytest.raises(libattn.AttnError, match=r"weights\[1\]"):
        libattn.wersa_attention(q, k, v, [1.0, math.nan], features=nf)
    with pytest.raises(ValueError, match="weights"):
        libattn.wersa_attention(q, k, v, [1.0, 1.0], levels=3)


@pytest.mark.skipif(not _linmech.HAS_WERSA, reason="no WERSA in this build")
def test_wersa_gradcheck():
    d = list(qkv(1, 6, 2, 1, 3, 2, dtype=torch.float64))
    w = torch.tensor([1.0, 0.7, 0.5], dtype=torch.float64)
    assert gradcheck(lambda *a: lat.wersa_attention(*a, features=4, causal=True),
                     [x.requires_grad_() for x in d + [w]], **LOOSE)


# ---------------------------------------------------------------- LLA


def lla_ref(q, k, v, lam, causal=True, scale=None):
    H, D = q.shape[2], q.shape[3]
    q, k, v = q.double(), heads(k, H), heads(v, H)
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * (scale or D ** -0.5)
    if causal:
        T = q.shape[1]
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    s = s.softmax(-1)
    kk, vv = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, M, *]
    mu = s @ kk  # [B, H, N, D]
    sig = torch.einsum("bhnm,bhmd,bhme->bhnde", s, kk, kk) - mu[..., :, None] * mu[..., None, :]
    sig = sig + lam * torch.eye(D, dtype=torch.float64)
    rho = torch.linalg.solve(sig, q.transpose(1, 2) - mu)
    c = torch.einsum("bhmd,bhnd->bhnm", kk, rho) - (mu * rho).sum(-1, keepdim=True)
    return ((s * (1 + c)) @ vv).transpose(1, 2)


@pytest.mark.skipif(not _linmech.HAS_LLA, reason="no LLA in this build")
@pytest.mark.parametrize("causal", [True, False])
def test_lla_matches_local_regression(causal):
    q, k, v = qkv(T=45)
    want = lla_ref(q, k, v, 0.5, causal)
    kinds(lambda *a: libattn.lla_attention(*a, lam=0.5, causal=causal, block=16), (q, k, v),
          want, tol=1e-4, nc=1)
    assert rel(libattn.lla_attention(q, k, v, lam=0.1, causal=causal),
               lla_ref(q, k, v, 0.1, causal)) < 1e-4
    # a huge ridge: softmax attention
    sm = lla_ref(q, k, v, 1e9, causal)
    assert rel(libattn.lla_attention(q, k, v, lam=1e9, causal=causal), sm) < 1e-5
    with pytest.raises(libattn.AttnError, match="lambda"):
        libattn.lla_attention(q, k, v, lam=0.0)
    with pytest.raises(libattn.AttnError, match=r"v->shape"):
        libattn.lla_attention(q, k, v[:, :3])
    if not _linmech.HAS_LLA_BACKWARD:
        with pytest.raises(NotImplementedError, match="attn_lla_backward"):
            libattn.lla_attention_backward(q, k, v, q[..., :6])
        return
    grads_match(lambda *a: lat.lla_attention(*a, lam=0.5, causal=causal),
                lambda *a: lla_ref(*a, 0.5, causal), (q, k, v), rnd(2, 45, 4, 6, seed=9),
                tol=1e-3)
    dq, dk, dv = libattn.lla_attention_backward(q.numpy(), noncontig(k).numpy(), v.numpy(),
                                                np.ones((2, 45, 4, 6), np.float32), lam=0.5,
                                                causal=causal)
    assert isinstance(dk, np.ndarray) and dk.shape == k.shape
    d = qkv(1, 7, 2, 1, 3, 2, dtype=torch.float64)  # the reference backend runs in double
    assert gradcheck(lambda *a: lat.lla_attention(*a, lam=0.5, causal=causal),
                     [x.requires_grad_() for x in d], eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- decode steps


@pytest.mark.skipif(not libattn._lib.HAS_LINEAR, reason="no linear engine in this build")
@pytest.mark.parametrize("gate", ["none", "key"])
def test_linear_decode_continues_the_forward(gate):
    q, k, v = qkv(T=40)
    g = F.logsigmoid(rnd(2, 40, 4, 8, seed=5) + 2) if gate == "key" else None
    full = libattn.linear_attention(q, k, v, g, gate=gate)
    _, state = libattn.linear_attention(q[:, :33], k[:, :33], v[:, :33],
                                        None if g is None else g[:, :33], gate=gate,
                                        return_state=True)
    _, final = libattn.linear_attention(q, k, v, g, gate=gate, return_state=True)
    sn = state.numpy().copy()
    # two steps on torch (one token, then six), one on numpy (all seven)
    o1 = libattn.linear_decode(q[:, 33:34], k[:, 33:34], v[:, 33:34], state,
                               None if g is None else g[:, 33:34], gate=gate)
    o2 = libattn.linear_decode(noncontig(q[:, 34:]), k[:, 34:], v[:, 34:], state,
                               None if g is None else g[:, 34:], gate=gate)
    assert rel(torch.cat([o1, o2], 1), full[:, 33:]) < 1e-5 and rel(state, final) < 1e-5
    on = libattn.linear_decode(q[:, 33:].numpy(), k[:, 33:].numpy(), v[:, 33:].numpy(), sn,
                               None if g is None else g[:, 33:].numpy(), gate=gate)
    assert isinstance(on, np.ndarray) and rel(on, full[:, 33:]) < 1e-5 and rel(sn, final) < 1e-5
    with pytest.raises(libattn.AttnError, match="state"):
        libattn.linear_decode(q, k, v, torch.zeros(2, 4, 8, 5))
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros((2, 4, 8, 6), np.float32)
        ro.flags.writeable = False
        libattn.linear_decode(q.numpy(), k.numpy(), v.numpy(), ro)


@pytest.mark.skipif(not _linmech.HAS_MAMBA_STEP, reason="no attn_mamba_step in this build")
def test_mamba_step_continues_the_scan():
    B, T, E, N = 2, 21, 5, 4
    x, bm, cm = rnd(B, T, E, seed=1), rnd(B, T, N, seed=2), rnd(B, T, N, seed=3)
    delta, a, ds = F.softplus(rnd(B, T, E, seed=4)), -rnd(E, N, seed=5).abs(), rnd(E, seed=6)
    full, final = libattn.mamba_scan(x, delta, a, bm, cm, ds, return_state=True)
    _, state = libattn.mamba_scan(x[:, :17], delta[:, :17], a, bm[:, :17], cm[:, :17], ds,
                                  return_state=True)
    sn = state.numpy().copy()
    ys = [libattn.mamba_step(x[:, t:t + 1], delta[:, t:t + 1], a, bm[:, t:t + 1],
                             cm[:, t:t + 1], state, ds) for t in range(17, T)]
    assert rel(torch.cat(ys, 1), full[:, 17:]) < 1e-5 and rel(state, final) < 1e-5
    yn = libattn.mamba_step(*(z.numpy() for z in (x[:, 17:], delta[:, 17:], a, bm[:, 17:],
                                                  cm[:, 17:])), sn, ds.numpy())
    assert isinstance(yn, np.ndarray) and rel(yn, full[:, 17:]) < 1e-5 and rel(sn, final) < 1e-5
    with pytest.raises(libattn.AttnError, match="state"):
        libattn.mamba_step(x, delta, a, bm, cm, torch.zeros(B, E, N + 1, 1))


# ---------------------------------------------------------------- NSA backward


def nsa_ref(q, k, v, gates, l, s, w):
    """The three branches with every block selected (the selected branch is
    then exact causal attention), mixed by the gates; float64."""
    H, D = q.shape[2], q.shape[3]
    N, M = q.shape[1], k.shape[1]
    i, j = torch.arange(N)[:, None] + M - N, torch.arange(M)[None]

    def att(kk, vv, mask):
        kk, vv = heads(kk, H), heads(vv, H)
        sc = torch.einsum("bnhd,bmhd->bhnm", q.double(), kk) / D ** 0.5
        p = sc.masked_fill(~mask, -math.inf).softmax(-1).nan_to_num()
        return torch.einsum("bhnm,bmhd->bnhd", p, vv)

    mc = (M - l) // s + 1
    kc = torch.stack([k[:, t * s:t * s + l].double().mean(1) for t in range(mc)], 1)
    vc = torch.stack([v[:, t * s:t * s + l].double().mean(1) for t in range(mc)], 1)
    t = torch.arange(mc)[None]
    g = gates.double()
    return (g[..., 0:1] * att(kc, vc, t * s + l - 1 <= i) + g[..., 1:2] * att(k, v, j <= i) +
            g[..., 2:3] * att(k, v, (j <= i) & (j > i - w)))


@pytest.mark.skipif(not _nsa.HAS_NSA_BACKWARD, reason="no NSA backward in this build")
def test_nsa_backward_matches_autograd():
    B, N, H, Hk, D = 2, 70, 4, 2, 8
    q, k, v = qkv(B, N, H, Hk, D, 6)
    gates = torch.rand(B, N, H, 3, generator=torch.Generator().manual_seed(4))
    kw = dict(cmp_block=8, cmp_stride=4, sel_block=16, sel_count=5, query_block=16, window=12)
    ref = lambda *a: nsa_ref(*a, 8, 4, 12)  # noqa: E731
    assert rel(libattn.nsa_attention(q, k, v, gates, **kw), ref(q, k, v, gates)) < 1e-5
    dout = rnd(B, N, H, 6, seed=9)
    grads_match(lambda *a: lat.nsa_attention(*a, **kw), ref, (q, k, v, gates), dout)
    # numpy, a non-contiguous q, and causal cross (the last 30 queries)
    got = libattn.nsa_attention_backward(noncontig(q).numpy(), k.numpy(), v.numpy(),
                                         dout.numpy(), gates.numpy(), **kw)
    assert isinstance(got[0], np.ndarray) and [x.shape for x in got] == [
        q.shape, k.shape, v.shape, gates.shape]
    leaves = [x.clone().requires_grad_() for x in (q[:, 40:], k, v, gates[:, 40:])]
    (lat.nsa_attention(*leaves, **kw) * dout[:, 40:]).sum().backward()
    refl = [x.double().requires_grad_() for x in (q[:, 40:], k, v, gates[:, 40:])]
    (ref(*refl) * dout[:, 40:].double()).sum().backward()
    for a_, b_ in zip(leaves, refl):
        assert rel(a_.grad, b_.grad) < 1e-4
    with pytest.raises(libattn.AttnError, match="dout"):
        libattn.nsa_attention_backward(q, k, v, dout[..., :5], gates, **kw)
    d = qkv(1, 12, 2, 1, 3, 2, dtype=torch.float64)
    g = torch.rand(1, 12, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    small = dict(cmp_block=4, cmp_stride=2, sel_block=4, sel_count=3, query_block=4, window=3)
    assert gradcheck(lambda *a: lat.nsa_attention(*a, **small),
                     [x.requires_grad_() for x in d + (g,)], eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- registry entries


def test_new_linear_entries():
    new = {"lightnet": _linmech.HAS_LIGHTNET, "rfa": _linmech.HAS_RFA,
           "wersa": _linmech.HAS_WERSA, "lla": _linmech.HAS_LLA}
    for name, has in new.items():
        m = mechanisms.REGISTRY[name]
        assert m.family == "linear" and m.available() == has
        assert m.encoder == ("noncausal-self" in m.patterns), name
    assert mechanisms.REGISTRY["lightnet"].patterns == ("causal-self", "causal-cross")
    assert mechanisms.REGISTRY["lla"].max_length == mechanisms.LLA_MAX_LENGTH
    q, k, v = qkv(1, 48, 2, 1, 8, 8)
    if _linmech.HAS_LIGHTNET:
        want = lightnet_ref(q.softmax(-1), k, v, 1.0)
        fn = mechanisms.REGISTRY["lightnet"].fn
        assert rel(fn(q, k, v, True), want) < 1e-5
        assert rel(fn(q[:, 20:], k, v, True), want[:, 20:]) < 1e-5  # causal cross: padded
        with pytest.raises(ValueError, match="causal"):
            fn(q, k, v, False)
    for name in ("rfa", "wersa", "lla"):
        if not new[name]:
            continue
        fn = mechanisms.REGISTRY[name].fn
        for causal in (True, False):
            # cross: the last rows of self (causal: bottom-right; non-causal: every
            # row sees every key); WERSA's filter also reads the queries before a
            # row, zeros before the first: self with those queries zeroed
            qz = q.clone()
            if name == "wersa":
                qz[:, :20] = 0
            o = fn(qz, k, v, causal)
            assert rel(fn(q[:, 20:], k, v, causal), o[:, 20:]) < 1e-5, (name, causal)
    if _linmech.HAS_RFA:  # more queries than keys, non-causal: slices of M queries
        q2 = rnd(1, 100, 2, 8, seed=5)
        o = mechanisms.REGISTRY["rfa"].fn(q2, k, v, False)
        assert rel(o[:, 60:70], mechanisms.REGISTRY["rfa"].fn(q2[:, 60:70], k, v, False)) < 1e-5


def test_bench_skips_lengths_above_max_length():
    from libattn import bench

    m = mechanisms.Mechanism("test_short", "sparse", mechanisms.REGISTRY["exact"].fn, "exact",
                             max_length=128)
    mechanisms.register(m)
    try:
        recs = bench.run_suite(["exact", "test_short"], ["causal-self"], [128, 256], 2, 16,
                               backward=False, progress=False)
        short = {r["length"]: r for r in recs if r["mechanism"] == "test_short"}
        assert short[128]["fwd_ms"] > 0 and short[256]["fwd_ms"] is None
        assert "max_length" in short[256]["note"]
    finally:
        del mechanisms.REGISTRY["test_short"]
