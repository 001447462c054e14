"""libattn ops against PyTorch on the CPU: values, gradients, kinds, layouts, errors."""

import threading

import numpy as np
import pytest

import libattn

torch = pytest.importorskip("torch")
F = torch.nn.functional
import libattn.torch as lat  # noqa: E402


def rel_rms(a, b):
    a = torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a).double()
    b = torch.as_tensor(np.asarray(b) if not torch.is_tensor(b) else b).double()
    # relative RMS; a reference that is exactly zero (dq with one key) is
    # compared in absolute terms against the same 1e-5
    return ((a - b).pow(2).mean() / b.pow(2).mean().clamp_min(1.0 if not b.any() else 1e-300)).sqrt().item()


def visible_mask(n, m, causal, window):
    i = torch.arange(n)[:, None] + (m - n)
    j = torch.arange(m)[None, :]
    wl, wr = window if window is not None else (-1, -1)
    if causal:
        wr = 0
    ok = torch.ones(n, m, dtype=torch.bool)
    if wl >= 0:
        ok &= j >= i - wl
    if wr >= 0:
        ok &= j <= i + wr
    return ok


def sdpa_ref(q, k, v, causal=False, window=None, scale=None):
    """torch SDPA on [B, N, H, D] tensors, GQA by repeating kv heads."""
    h, hk = q.shape[2], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if hk != h:
        kt = kt.repeat_interleave(h // hk, 1)
        vt = vt.repeat_interleave(h // hk, 1)
    mask = visible_mask(q.shape[1], k.shape[1], causal, window)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)


SHAPES = [  # B, N, M, H, Hk, D, Dv
    (1, 1, 1, 1, 1, 8, 8),
    (2, 63, 63, 4, 2, 32, 32),
    (1, 65, 130, 8, 1, 64, 48),
    (2, 100, 37, 6, 3, 16, 24),
]
MASKS = [(False, None), (True, None), (False, (5, 3)), (True, (17, -1))]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal,window", MASKS)
def test_forward_backward_vs_sdpa(shape, causal, window):
    B, N, M, H, Hk, D, Dv = shape
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, N, H, D, generator=g, requires_grad=True)
    k = torch.randn(B, M, Hk, D, generator=g, requires_grad=True)
    v = torch.randn(B, M, Hk, Dv, generator=g, requires_grad=True)
    do = torch.randn(B, N, H, Dv, generator=g)
    if causal and N > M:  # rows without keys: libattn gives 0, SDPA NaN
        pytest.skip("rows without keys are tested in test_empty_rows")
    o = lat.attention(q, k, v, causal=causal, window=window)
    grads = torch.autograd.grad(o, (q, k, v), do)
    r = sdpa_ref(q, k, v, causal, window)
    rgrads = torch.autograd.grad(r, (q, k, v), do)
    assert rel_rms(o, r) < 1e-5
    for a, b in zip(grads, rgrads):
        assert rel_rms(a, b) < 1e-5


def test_numpy_in_numpy_out():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 40, 4, 32), dtype=np.float32)
    k = rng.standard_normal((2, 50, 2, 32), dtype=np.float32)
    v = rng.standard_normal((2, 50, 2, 16), dtype=np.float32)
    o, lse = libattn.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(o, np.ndarray) and o.dtype == np.float32 and o.shape == (2, 40, 4, 16)
    assert isinstance(lse, np.ndarray) and lse.shape == (2, 4, 40)
    r = sdpa_ref(*(torch.from_numpy(x) for x in (q, k, v)), causal=True)
    assert rel_rms(o, r) < 1e-5
    dq, dk, dv = libattn.attention_backward(q, k, v, o, lse, np.ones_like(o), causal=True)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert all(isinstance(x, np.ndarray) for x in (dq, dk, dv))


def test_three_dims_mean_batch_one():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((20, 2, 8), dtype=np.float32)
    o, lse = libattn.attention(q, q, q, return_lse=True)
    assert o.shape == (20, 2, 8) and lse.shape == (2, 20)
    o4 = libattn.attention(q[None], q[None], q[None])
    assert np.array_equal(o, o4[0])


def test_non_contiguous_inputs_no_copy():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 8, 48, 64, generator=g)  # [B, H, N, D]: transposed views
    q, k, v = (base[:, :, :, :32].transpose(1, 2), base[:, :, :, 32:].transpose(1, 2),
               base[:, :, :, 16:48].transpose(1, 2))
    assert not q.is_contiguous()
    o = libattn.attention(q, k, v, causal=True)
    r = sdpa_ref(q, k, v, causal=True)
    assert rel_rms(o, r) < 1e-5
    # numpy: strided, a negative stride (copied), a broadcast (stride 0) k/v
    a = base.numpy()
    qn = a[:, :, ::-1, :32].transpose(0, 2, 1, 3)
    kn = np.broadcast_to(a[:1, :1, :, 32:].transpose(0, 2, 1, 3), (2, 48, 1, 32))
    on = libattn.attention(qn, kn, kn)
    rn = sdpa_ref(torch.from_numpy(qn.copy()), torch.from_numpy(kn.copy()),
                  torch.from_numpy(kn.copy()))
    assert rel_rms(on, rn) < 1e-5


def test_half_precision_kv():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 30, 4, 32, generator=g)
    k = torch.randn(1, 30, 4, 32, generator=g)
    for dt in (torch.float16, torch.bfloat16):
        o = libattn.attention(q, k.to(dt), k.to(dt))
        r = sdpa_ref(q, k.to(dt).float(), k.to(dt).float())
        assert rel_rms(o, r) < 1e-5
        oh = libattn.attention(q.to(dt), k.to(dt), k.to(dt))
        assert oh.dtype == dt and rel_rms(oh, r) < 1e-2
    qn = q.numpy().astype(np.float16)
    assert libattn.attention(qn, qn, qn).dtype == np.float16


def test_gradcheck_double_reference_backend():
    g = torch.Generator().manual_seed(4)
    for causal, window, (N, M) in [(False, None, (5, 7)), (True, None, (6, 6)),
                                   (False, (2, 1), (7, 5))]:
        q = torch.randn(1, N, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
        k = torch.randn(1, M, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
        v = torch.randn(1, M, 1, 3, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda a, b, c: lat.attention(a, b, c, causal=causal, window=window), (q, k, v))
        o = lat.attention(q, k, v, causal=causal, window=window)
        assert rel_rms(o, sdpa_ref(q, k, v, causal, window)) < 1e-12


def test_softcap_and_scale_vs_naive():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 9, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 11, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 11, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)

    def naive(q, k, v):
        s = torch.einsum("bnhd,bmhd->bhnm", q, k) * 0.5
        s = 3.0 * torch.tanh(s / 3.0)
        return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)

    o = lat.attention(q, k, v, scale=0.5, softcap=3.0)
    assert rel_rms(o, naive(q, k, v)) < 1e-12
    assert torch.autograd.gradcheck(lambda a, b, c: lat.attention(a, b, c, scale=0.5, softcap=3.0),
                                    (q, k, v))


def test_empty_rows():
    q = np.ones((1, 4, 1, 8), np.float32)
    k = np.ones((1, 2, 1, 8), np.float32)
    o, lse = libattn.attention(q, k, k, causal=True, return_lse=True)
    assert np.all(o[0, :2] == 0) and np.all(np.isneginf(lse[0, 0, :2]))
    assert np.all(np.isfinite(lse[0, 0, 2:]))


def test_varlen_matches_per_sequence():
    rng = np.random.default_rng(6)
    lens = [5, 17, 1]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q = rng.standard_normal((1, cu[-1], 2, 16), dtype=np.float32)
    o = libattn.attention(q, q, q, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    for b in range(len(lens)):
        s = slice(cu[b], cu[b + 1])
        ob = libattn.attention(q[:, s], q[:, s], q[:, s], causal=True)
        assert np.allclose(o[:, s], ob, atol=1e-6)


def test_plan_block_sparse_matches_masked_sdpa():
    rng = np.random.default_rng(7)
    n = m = 64
    bq = bk = 16
    mask = rng.random((4, 4)) < 0.5
    mask[np.arange(4), np.arange(4)] = True
    plan = libattn.Plan.from_block_mask(mask, n, m, bq, bk, masks=libattn.BLOCK_FULL)
    assert abs(plan.density - mask.mean()) < 1e-12
    q = rng.standard_normal((1, n, 2, 16), dtype=np.float32)
    o = libattn.attention(q, q, q, plan=plan)
    elem = torch.from_numpy(np.kron(mask, np.ones((bq, bk), dtype=bool)))
    qt = torch.from_numpy(q).transpose(1, 2)
    r = F.scaled_dot_product_attention(qt, qt, qt, attn_mask=elem).transpose(1, 2)
    assert rel_rms(o, r) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_plan_vs_flex_attention_same_block_mask(causal):
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    rng = np.random.default_rng(15)
    H, N, D, blk = 2, 256, 32, 64
    bm = torch.from_numpy(rng.random((H, N // blk, N // blk)) < 0.4)
    bm[:, range(N // blk), range(N // blk)] = True

    def mask_mod(b, h, qi, kv):
        vis = bm[h, qi // blk, kv // blk]
        return vis & (kv <= qi) if causal else vis

    block_mask = fa.create_block_mask(mask_mod, 1, H, N, N, device="cpu", BLOCK_SIZE=blk)
    g = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(1, H, N, D, generator=g, requires_grad=True) for _ in range(3))
    do = torch.randn(1, H, N, D, generator=g)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = fa.flex_attention(q.detach(), k.detach(), v.detach(), block_mask=block_mask)
    # FlexAttention has no backward on the CPU: gradients against masked SDPA
    elem = bm.repeat_interleave(blk, 1).repeat_interleave(blk, 2)
    if causal:
        elem = elem & torch.ones(N, N, dtype=torch.bool).tril()
    rs = F.scaled_dot_product_attention(q, k, v, attn_mask=elem[None])
    assert rel_rms(rs, r) < 1e-5
    rg = torch.autograd.grad(rs, (q, k, v), do)
    plan = libattn.Plan.from_block_mask(bm.numpy(), N, N, blk, blk)
    o = libattn.attention(*(x.detach().transpose(1, 2) for x in (q, k, v)), causal=causal,
                          plan=plan).transpose(1, 2)
    assert rel_rms(o, r) < 1e-5
    lse = libattn.attention(*(x.detach().transpose(1, 2) for x in (q, k, v)), causal=causal,
                            plan=plan, return_lse=True)[1]
    grads = libattn.attention_backward(*(x.detach().transpose(1, 2) for x in (q, k, v)),
                                       o.transpose(1, 2), lse, do.transpose(1, 2),
                                       causal=causal, plan=plan)
    for a, b in zip(grads, rg):
        assert rel_rms(a.transpose(1, 2), b) < 1e-5


def test_decode_vs_sdpa():
    g = torch.Generator().manual_seed(8)
    B, Mcap, H, Hk, D = 2, 300, 8, 2, 64
    k = torch.randn(B, Mcap, Hk, D, generator=g)
    v = torch.randn(B, Mcap, Hk, D, generator=g)
    q = torch.randn(B, 3, H, D, generator=g)
    lens = np.array([300, 123], np.int32)
    o, lse = libattn.decode(q, k, v, lens, causal=True, return_lse=True)
    assert o.shape == (B, 3, H, D) and lse.shape == (B, H, 3)
    for b in range(B):
        L = int(lens[b])
        r = sdpa_ref(q[b:b + 1], k[b:b + 1, :L], v[b:b + 1, :L], causal=True)
        assert rel_rms(o[b:b + 1], r) < 1e-5
    on = libattn.decode(q.numpy(), k.numpy().astype(np.float16), v.numpy().astype(np.float16))
    assert isinstance(on, np.ndarray)


def test_lse_merge_is_attention_over_union():
    rng = np.random.default_rng(9)
    q = rng.standard_normal((1, 20, 2, 16), dtype=np.float32)
    k = rng.standard_normal((1, 50, 2, 16), dtype=np.float32)
    o1, l1 = libattn.attention(q, k[:, :30], k[:, :30], return_lse=True)
    o2, l2 = libattn.attention(q, k[:, 30:], k[:, 30:], return_lse=True)
    o, lse = libattn.lse_merge(o1, l1, o2, l2)
    of, lf = libattn.attention(q, k, k, return_lse=True)
    assert rel_rms(o, of) < 1e-6 and np.allclose(lse, lf, atol=1e-5)
    kt = torch.from_numpy(k)
    assert rel_rms(o, sdpa_ref(torch.from_numpy(q), kt, kt)) < 1e-5
    s = torch.einsum("bnhd,bmhd->bhnm", torch.from_numpy(q).double(),
                     kt.double()) / 4.0
    assert np.allclose(lse, torch.logsumexp(s, -1).numpy(), atol=1e-5)
    ot, lt = libattn.lse_merge(*(torch.from_numpy(x) for x in (o1, l1, o2, l2)))
    assert torch.is_tensor(ot) and rel_rms(ot, of) < 1e-6


@pytest.mark.parametrize("bad,match", [
    (lambda q, k: libattn.attention(q, k[..., :8], k), "shape"),
    (lambda q, k: libattn.attention(q, k[:, :, :1].repeat(3, 2), k[:, :, :1].repeat(3, 2)),
     "divide|multiple|kv"),
    (lambda q, k: libattn.attention(q, k, k, window=(3,)), "window"),
    (lambda q, k: libattn.attention(q.astype(np.int32), k, k), "dtype"),
    (lambda q, k: libattn.attention(q[0], k, k), "dims"),
    (lambda q, k: libattn.attention("q", k, k), "numpy"),
    (lambda q, k: libattn.decode(np.repeat(q, 20, 1)[:, :17], k, k), "16|queries|Nq"),
])
def test_bad_inputs_raise_with_c_message(bad, match):
    q = np.zeros((1, 4, 4, 16), np.float32)
    k = np.zeros((1, 6, 2, 16), np.float32)
    with pytest.raises((libattn.AttnError, TypeError, ValueError), match=match):
        bad(q, k)


def test_error_carries_status_and_sentence():
    q = np.zeros((1, 4, 4, 16), np.float32)
    with pytest.raises(libattn.AttnError) as e:
        libattn.attention(q, q[..., :8], q)
    assert e.value.status_name == "ATTN_ERR_SHAPE" and "must" in str(e.value)
    with pytest.raises(libattn.AttnError, match="ref|backend|f64|dtype"):
        libattn.attention(q, q, q, ctx=libattn.Context(backend="cpu")) if False else \
            libattn.attention(q.astype(np.float64), q.astype(np.float64), q.astype(np.float64),
                              ctx=libattn.Context(backend="cpu"))


def test_torch_dtype_and_device_errors():
    q = torch.zeros(1, 4, 2, 8, dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype"):
        libattn.attention(q, q, q)


def test_gil_released_threads_agree():
    rng = np.random.default_rng(10)
    q = rng.standard_normal((1, 256, 4, 64), dtype=np.float32)
    want = libattn.attention(q, q, q, causal=True)
    got = [None] * 4

    def work(i):
        got[i] = libattn.attention(q, q, q, causal=True)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(np.array_equal(g, want) for g in got)


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 16, 2, 8, generator=g, requires_grad=True)
    f = torch.compile(lambda a: lat.attention(a, a, a, causal=True).sin().sum(), fullgraph=True)
    y = f(q)
    (gq,) = torch.autograd.grad(y, q)
    y2 = lat.attention(q, q, q, causal=True).sin().sum()
    (gq2,) = torch.autograd.grad(y2, q)
    assert torch.allclose(y, y2) and torch.allclose(gq, gq2, atol=1e-6)


def test_opcheck():
    g = torch.Generator().manual_seed(12)
    q = torch.randn(1, 8, 2, 8, generator=g)
    res = torch.library.opcheck(lat.attention_fwd, (q, q, q, 0.0, 0.0, True, -1, -1))
    assert all(v == "SUCCESS" for v in res.values())


def test_sdpa_dropin():
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 4, 33, 16, generator=g)  # [B, H, N, D]
    assert rel_rms(lat.sdpa(q, q, q, is_causal=True),
                   F.scaled_dot_product_attention(q, q, q, is_causal=True)) < 1e-5


def naive_linear(q, k, v, logg=None, causal=True, scale=None):
    """S_t = exp(g_t) * S_{t-1} + k_t^T v_t, o_t = scale q_t S_t (per head; GQA)."""
    B, T, H, D = q.shape
    hk = k.shape[2]
    k = k.repeat_interleave(H // hk, 2)
    v = v.repeat_interleave(H // hk, 2)
    scale = D ** -0.5 if scale is None else scale
    S = torch.zeros(B, H, D, v.shape[3], dtype=torch.float64)
    out = []
    for t in range(T):
        if logg is not None:
            S = S * torch.exp(logg[:, t])[..., None, None].double()
        S = S + torch.einsum("bhd,bhe->bhde", k[:, t].double(), v[:, t].double())
        out.append(torch.einsum("bhd,bhde->bhe", q[:, t].double(), S) * scale)
    o = torch.stack(out, 1)
    if not causal:
        o = torch.einsum("bthd,bhde->bthe", q.double(), S) * scale
    return o


@pytest.mark.skipif(not libattn._lib.HAS_LINEAR, reason="no linear engine in this build")
@pytest.mark.parametrize("causal", [True, False])
def test_linear_attention_vs_naive(causal):
    g = torch.Generator().manual_seed(14)
    B, T, H, Hk, D, Dv = 2, 70, 4, 2, 16, 8
    q, k = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, Hk, D, generator=g)
    v = torch.randn(B, T, Hk, Dv, generator=g)
    o, state = libattn.linear_attention(q, k, v, causal=causal, return_state=True)
    assert rel_rms(o, naive_linear(q, k, v, causal=causal)) < 1e-5
    assert state.shape == (B, H, D, Dv)
    if causal:
        logg = -torch.rand(B, T, H, generator=g)
        o = libattn.linear_attention(q, k, v, logg, gate="head_token")
        assert rel_rms(o, naive_linear(q, k, v, logg)) < 1e-5
        on = libattn.linear_attention(q.numpy(), k.numpy(), v.numpy())
        assert isinstance(on, np.ndarray)
    with pytest.raises(libattn.AttnError, match="gate"):
        libattn.linear_attention(q, k, v, -torch.rand(B, T, H), gate="head_token", causal=False)


@pytest.mark.skipif(not libattn._lib.HAS_FEATURE_MAPS, reason="no feature-map mechanisms")
@pytest.mark.parametrize("causal", [True, False])
def test_feature_map_attention_vs_naive(causal):
    g = torch.Generator().manual_seed(16)
    B, T, H, D, Dv = 1, 50, 2, 16, 8
    q, k = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, H, D, generator=g)
    v = torch.randn(B, T, H, Dv, generator=g)
    phi = lambda x: F.elu(x.double()) + 1  # noqa: E731
    s = torch.einsum("bthd,bshd->bhts", phi(q), phi(k))
    if causal:
        s = s * torch.ones(T, T, dtype=torch.bool).tril()
    want = torch.einsum("bhts,bshd->bthd", s, v.double()) / (s.sum(-1).transpose(1, 2)[..., None]
                                                             + 1e-6)
    o = libattn.feature_map_attention(q, k, v, feature_map="elu1", causal=causal, scale=1.0)
    assert rel_rms(o, want) < 1e-5


def test_plan_autograd_matches_dense_with_full_plan():
    g = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(1, 96, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    full = libattn.Plan.from_block_mask(np.ones((1, 3, 3), bool), 96, 96, 32, 32)
    do = torch.randn(1, 96, 2, 16, generator=g)
    o = lat.attention(q, k, v, causal=True, plan=full)
    grads = torch.autograd.grad(o, (q, k, v), do)
    r = sdpa_ref(q, k, v, causal=True)
    rgrads = torch.autograd.grad(r, (q, k, v), do)
    assert rel_rms(o, r) < 1e-5
    for a, b in zip(grads, rgrads):
        assert rel_rms(a, b) < 1e-5


def test_top_level_attention_is_differentiable_for_torch():
    g = torch.Generator().manual_seed(18)
    q = torch.randn(1, 20, 2, 8, generator=g, requires_grad=True)
    o = libattn.attention(q, q, q, causal=True)
    assert o.grad_fn is not None
    (gq,) = torch.autograd.grad(o.sum(), q)
    (gr,) = torch.autograd.grad(sdpa_ref(q, q, q, causal=True).sum(), q)
    assert rel_rms(gq, gr) < 1e-5
    with torch.no_grad():
        assert libattn.attention(q, q, q).grad_fn is None


@pytest.mark.skipif(not libattn._lib.HAS_LINEAR, reason="no linear engine in this build")
@pytest.mark.parametrize("causal", [True, False])
def test_linear_attention_autograd(causal):
    g = torch.Generator().manual_seed(19)
    q = torch.randn(1, 9, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 9, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 9, 1, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: lat.linear_attention(a, b, c, causal=causal),
                                    (q, k, v))
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    do = torch.randn(1, 9, 2, 3, generator=g)
    got = torch.autograd.grad(lat.linear_attention(qf, kf, vf, causal=causal), (qf, kf, vf), do)
    want = torch.autograd.grad(naive_linear(qf, kf, vf, causal=causal), (qf, kf, vf), do.double())
    for a, b in zip(got, want):
        assert rel_rms(a, b) < 1e-5
