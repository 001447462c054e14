"""The ops on numpy arrays and PyTorch CPU tensors (no autograd here).

Inputs are passed to C as strided views of their own memory: no copy, unless
the layout cannot be expressed in element strides (a numpy array with a
negative stride or a stride that is not a multiple of its item size); such an
input is copied to a contiguous array first. Outputs are new contiguous
arrays/tensors of the same kind as q. ctypes releases the GIL for the whole C
call. f64 inputs run on the reference backend (the tiled engine takes f32,
f16 and bf16).
"""

from __future__ import annotations

import ctypes
import sys
import threading

import numpy as np

from . import _lib
from ._lib import F16, F32, F64, BF16, PARAMS, TENSOR, AttnError

_NP_DTYPES = {np.dtype(np.float32): F32, np.dtype(np.float16): F16, np.dtype(np.float64): F64}
try:  # bfloat16 numpy arrays, where ml_dtypes is installed
    import ml_dtypes  # type: ignore

    _NP_DTYPES[np.dtype(ml_dtypes.bfloat16)] = BF16
except ImportError:  # pragma: no cover
    pass

_torch = None
_TORCH_DTYPES: dict = {}
_TORCH_OF: dict = {}
_addressof = ctypes.addressof
_ndarray = np.ndarray
_np_empty = np.empty
_attn_forward = _lib.attn_forward
_tpack = TENSOR.pack
_tls = threading.local()
_c_char = ctypes.c_char


def _torch_mod():
    """torch, if it has been imported by anyone (never imported here)."""
    global _torch, _TORCH_DTYPES
    if _torch is None:
        t = sys.modules.get("torch")
        if t is not None and hasattr(t, "Tensor"):
            _torch = t
            _TORCH_DTYPES = {t.float32: F32, t.float16: F16, t.bfloat16: BF16, t.float64: F64}
            _TORCH_OF.update({v: k for k, v in _TORCH_DTYPES.items()})
    return _torch


def _np_ptr(x) -> int:
    """Address of a numpy array's first element (from_buffer is ~3x cheaper
    than __array_interface__, but needs a writable buffer)."""
    try:
        return _addressof(_c_char.from_buffer(x))
    except (TypeError, ValueError, BufferError):
        return x.__array_interface__["data"][0]


def _view(x, name: str, ndims=(4,)):
    """(packed attn_tensor bytes, owner object, shape, dtype code, is_torch)."""
    if type(x) is np.ndarray:
        dt = _NP_DTYPES.get(x.dtype)
        shape = x.shape
        if dt is not None and len(shape) == 4 and 4 in ndims:
            it = x.itemsize
            s0, s1, s2, s3 = x.strides
            if s0 >= 0 and s1 >= 0 and s2 >= 0 and s3 >= 0 and not (s0 % it or s1 % it or
                                                                     s2 % it or s3 % it):
                return (TENSOR.pack(_np_ptr(x), dt, 4, *shape, s0 // it, s1 // it, s2 // it,
                                    s3 // it), x, shape, dt, False)
        return _view_slow(x, name, ndims)
    t = _torch_mod()
    if t is not None and isinstance(x, t.Tensor):
        dt = _TORCH_DTYPES.get(x.dtype)
        if dt is None:
            raise TypeError(f"{name}: dtype {x.dtype} is not supported "
                            "(float32, float16, bfloat16, float64)")
        if not x.is_cpu:
            raise ValueError(f"{name}: tensor is on {x.device}; libattn runs on the CPU")
        shape = tuple(x.shape)
        nd = len(shape)
        if nd not in ndims:
            raise ValueError(f"{name}: expected {' or '.join(map(str, ndims))} dims, got shape {shape}")
        if nd == 4:
            return TENSOR.pack(x.data_ptr(), dt, 4, *shape, *x.stride()), x, shape, dt, True
        pad = (0,) * (4 - nd)
        return TENSOR.pack(x.data_ptr(), dt, nd, *shape, *pad, *x.stride(), *pad), x, shape, dt, True
    return _view_slow(x, name, ndims)


def _view_slow(x, name, ndims):
    if not isinstance(x, np.ndarray):
        if hasattr(x, "__array__") or isinstance(x, (list, tuple)):
            x = np.asarray(x)
        else:
            raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(x).__name__}")
    dt = _NP_DTYPES.get(x.dtype)
    if dt is None:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported (float32, float16, float64)")
    shape = x.shape
    nd = len(shape)
    if nd not in ndims:
        raise ValueError(f"{name}: expected {' or '.join(map(str, ndims))} dims, got shape {shape}")
    item = x.itemsize
    bstrides = x.strides
    if any(s < 0 or s % item for s in bstrides):
        x = np.ascontiguousarray(x)  # layout not expressible in element strides
        bstrides = x.strides
    pad = (0,) * (4 - nd)
    return (TENSOR.pack(_np_ptr(x), dt, nd, *shape, *pad, *(s // item for s in bstrides), *pad),
            x, shape, dt, False)


_NP_OF = {F32: np.float32, F16: np.float16, F64: np.float64}


def _empty(like_torch: bool, shape, dt: int):
    """A new contiguous output and its packed attn_tensor."""
    if like_torch:
        y = _torch.empty(shape, dtype=_TORCH_OF[dt])
        ptr = y.data_ptr()
    else:
        y = np.empty(shape, dtype=_NP_OF[dt] if dt != BF16 else ml_dtypes.bfloat16)  # noqa: F821
        ptr = _addressof(_c_char.from_buffer(y))
    if len(shape) == 4:
        d1, d2, d3 = shape[1], shape[2], shape[3]
        return y, TENSOR.pack(ptr, dt, 4, *shape, d1 * d2 * d3, d2 * d3, d3, 1)
    d1, d2 = shape[1], shape[2]
    return y, TENSOR.pack(ptr, dt, 3, *shape, 0, d1 * d2, d2, 1, 0)


def _empty_nd(like_torch: bool, shape, dt: int):
    """A new contiguous output of any rank 1..4 and its packed attn_tensor."""
    if len(shape) >= 3:
        return _empty(like_torch, tuple(shape), dt)
    if like_torch:
        y = _torch.empty(shape, dtype=_TORCH_OF[dt])
        ptr = y.data_ptr()
    else:
        y = np.empty(shape, dtype=_NP_OF[dt] if dt != BF16 else ml_dtypes.bfloat16)  # noqa: F821
        ptr = _np_ptr(y)
    nd = len(shape)
    strides = [1] * nd
    for i in range(nd - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    pad = (0,) * (4 - nd)
    return y, TENSOR.pack(ptr, dt, nd, *shape, *pad, *strides, *pad)


def _int_array(x, name, dtype):
    """A contiguous 1-d array of dtype (np.int32 or np.int64) from a numpy
    array, a torch tensor or a sequence."""
    t = _torch_mod()
    if t is not None and isinstance(x, t.Tensor):
        x = x.detach().cpu().numpy()
    a = np.ascontiguousarray(x, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array of {a.dtype}, got shape {a.shape}")
    return a


def _int32_array(x, name):
    return None if x is None else _int_array(x, name, np.int32)


_params_cache: dict = {}


def _params(scale, softcap, causal, window, cu_q=None, cu_k=None, plan=None):
    if window is None:
        wl, wr = -1, -1
    else:
        try:
            wl, wr = window
        except (TypeError, ValueError):
            raise ValueError(f"window must be a pair (left, right), -1 = unbounded; got {window!r}")
    sc = 0.0 if scale is None else float(scale)
    if cu_q is None and cu_k is None and plan is None:
        key = (sc, softcap, causal, wl, wr)
        p = _params_cache.get(key)
        if p is None:
            if len(_params_cache) > 256:
                _params_cache.clear()
            p = PARAMS.pack(sc, float(softcap), 1 if causal else 0, int(wl), int(wr), 0, 0, 0, 0)
            _params_cache[key] = p
        return p
    batch = 0
    pq = pk = 0
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
        if len(cu_q) != len(cu_k) or len(cu_q) < 1:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length batch + 1 >= 1")
        batch = len(cu_q) - 1
        pq = cu_q.ctypes.data
        pk = cu_k.ctypes.data
    pp = plan.ptr if plan is not None else 0
    return PARAMS.pack(sc, float(softcap), 1 if causal else 0, int(wl), int(wr), batch, pq, pk, pp)


def _ctx_for(ctx, dt):
    if ctx is not None:
        return ctx.ptr
    return _lib.default_context(dt == F64).ptr


def _squeeze_result(y, was3):
    return y[0] if was3 else y


def _pk_np(x, dt):
    """Packed view of a 4-d numpy array with expressible strides, or None."""
    sh = x.shape
    if len(sh) != 4:
        return None
    it = x.itemsize
    s0, s1, s2, s3 = x.strides
    if s0 < 0 or s1 < 0 or s2 < 0 or s3 < 0 or s0 % it or s1 % it or s2 % it or s3 % it:
        return None
    try:
        ptr = _addressof(_c_char.from_buffer(x))
    except (TypeError, ValueError, BufferError):  # read-only
        ptr = x.__array_interface__["data"][0]
    return _tpack(ptr, dt, 4, sh[0], sh[1], sh[2], sh[3], s0 // it, s1 // it, s2 // it, s3 // it)


def _pk_torch(x, dt):
    """Packed view of a 4-d CPU tensor, or None."""
    if dt is None or not x.is_cpu or x.dim() != 4:
        return None
    return _tpack(x.data_ptr(), dt, 4, *x.shape, *x.stride())


def _default_ctx_ptr(dt):
    try:
        return _tls.ref if dt == F64 else _tls.auto
    except AttributeError:
        _tls.auto = _lib.default_context(False).ptr
        _tls.ref = _lib.default_context(True).ptr
        return _tls.ref if dt == F64 else _tls.auto


def _forward_fast(q, o, po, pq, pk, pv, dt, is_torch, scale, softcap, causal, window,
                  return_lse, ctx):
    key = (scale, softcap, causal, window)
    params = _params_cache.get(key)
    if params is None:
        params = _params(scale, softcap, causal, window)
        _params_cache[key] = params
    if return_lse:
        sq = q.shape
        lse, pl = _empty(is_torch, (sq[0], sq[2], sq[1]), F32)
    else:
        lse = pl = None
    st = _attn_forward(_default_ctx_ptr(dt) if ctx is None else ctx.ptr, params, pq, pk, pv,
                       po, pl)
    if st:
        _lib.raise_status(st)
    return (o, lse) if return_lse else o


def attention(q, k, v, *, causal=False, scale=None, softcap=0.0, window=None,
              cu_seqlens_q=None, cu_seqlens_k=None, plan=None, return_lse=False, ctx=None):
    """Exact softmax attention, forward.

    q [B, N, H, D], k [B, M, Hk, D], v [B, M, Hk, Dv] (Hk divides H; k, v
    share a dtype) -> o [B, N, H, Dv] in q's dtype, and with return_lse=True
    also lse [B, H, N] float32 (natural-log row log-sum-exp).
    3-d inputs [N, H, D] mean B = 1 and give 3-d outputs ([N, H, Dv], [H, N]).
    numpy arrays or PyTorch CPU tensors (the result has q's kind); any
    strides, no copy (except a numpy view with a negative stride or a byte
    stride that is not a multiple of its item size: copied, contiguous). causal: key j visible to query i iff j <= i + M - N;
    window (left, right): i + M - N - left <= j <= i + M - N + right, -1 =
    unbounded; scale: logit scale (default 1/sqrt(D)); softcap > 0: logits s
    become softcap * tanh(s / softcap). Varlen: cu_seqlens_q/k int32 [batch+1]
    with q [1, total_q, H, D] packed (lse [1, H, total_q]). plan: a Plan.
    Raises AttnError with the C library's message on bad input. Torch
    tensors that require grad (grad mode on) go through libattn.torch.attention
    (autograd with the C backward).
    """
    if cu_seqlens_q is None and cu_seqlens_k is None and plan is None:
        tq = type(q)
        if tq is _ndarray and type(k) is _ndarray and type(v) is _ndarray:  # numpy fast path
            dt = _NP_DTYPES.get(q.dtype)
            dkv = _NP_DTYPES.get(k.dtype)
            if dt is not None and dkv is not None:
                pq = _pk_np(q, dt)
                pk = _pk_np(k, dkv)
                pv = _pk_np(v, _NP_DTYPES.get(v.dtype, -1))
                if pq is not None and pk is not None and pv is not None:
                    sq = q.shape
                    n1, n2, dv = sq[1], sq[2], v.shape[3]
                    o = _np_empty((sq[0], n1, n2, dv), q.dtype)
                    po = _tpack(_addressof(_c_char.from_buffer(o)), dt, 4, sq[0], n1, n2, dv,
                                n1 * n2 * dv, n2 * dv, dv, 1)
                    return _forward_fast(q, o, po, pq, pk, pv, dt, False, scale, softcap,
                                         causal, window, return_lse, ctx)
        elif _torch is not None and tq is _torch.Tensor and type(k) is tq and type(v) is tq:
            if (q.requires_grad or k.requires_grad or v.requires_grad) and _torch.is_grad_enabled():
                from . import torch as lat  # differentiable: the C backward

                return lat.attention(q, k, v, causal=causal, scale=scale, softcap=softcap,
                                     window=window, return_lse=return_lse)
            dt = _TORCH_DTYPES.get(q.dtype)
            pq = _pk_torch(q, dt)
            pk = _pk_torch(k, _TORCH_DTYPES.get(k.dtype))
            pv = _pk_torch(v, _TORCH_DTYPES.get(v.dtype))
            if pq is not None and pk is not None and pv is not None:
                sq = q.shape
                n1, n2, dv = sq[1], sq[2], v.shape[3]
                o = q.new_empty(sq[0], n1, n2, dv)  # varargs: 0.4 us less than torch.empty(tuple)
                po = _tpack(o.data_ptr(), dt, 4, sq[0], n1, n2, dv, n1 * n2 * dv, n2 * dv, dv, 1)
                return _forward_fast(q, o, po, pq, pk, pv, dt, True, scale, softcap, causal,
                                     window, return_lse, ctx)
    was3 = getattr(q, "ndim", 4) == 3
    if was3:
        q, k, v = q[None], k[None], v[None]
    pq, oq, sq, dq, tq = _view(q, "q")
    pk, ok, sk, dk, _ = _view(k, "k")
    pv, ov, sv, dv, _ = _view(v, "v")
    o, po = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    cu_q = _int32_array(cu_seqlens_q, "cu_seqlens_q")
    cu_k = _int32_array(cu_seqlens_k, "cu_seqlens_k")
    params = _params(scale, softcap, causal, window, cu_q, cu_k, plan)
    if return_lse:
        lse, pl = _empty(tq, (sq[0], sq[2], sq[1]), F32)
    else:
        lse, pl = None, None
    st = _lib.attn_forward(_ctx_for(ctx, dq), params, pq, pk, pv, po, pl)
    if st:
        _lib.raise_status(st)
    if return_lse:
        return _squeeze_result(o, was3), _squeeze_result(lse, was3)
    return _squeeze_result(o, was3)


def _softmax_bwd_args(q, k, v, o, lse, dout):
    """The views a softmax attention backward takes and new dq, dk, dv like
    q, k, v: ((pq, pk, pv, po, plse, pdout, pdq, pdk, pdv), the owners to
    keep alive through the call, (dq, dk, dv), q's dtype code)."""
    pq, oq, sq, dq_, tq = _view(q, "q")
    pk, ok, sk, dk_, _ = _view(k, "k")
    pv, ov, sv, dv_, _ = _view(v, "v")
    po, oo, _, _, _ = _view(o, "o")
    pl, ol, _, _, _ = _view(lse, "lse", (3,))
    pd, od, _, _, _ = _view(dout, "dout")
    gq, pgq = _empty(tq, sq, dq_)
    gk, pgk = _empty(tq, sk, dk_)
    gv, pgv = _empty(tq, sv, dv_)
    return ((pq, pk, pv, po, pl, pd, pgq, pgk, pgv), (oq, ok, ov, oo, ol, od), (gq, gk, gv),
            dq_)


def attention_backward(q, k, v, o, lse, dout, *, causal=False, scale=None, softcap=0.0,
                       window=None, cu_seqlens_q=None, cu_seqlens_k=None, plan=None, ctx=None):
    """Backward of attention() with the same arguments.

    q [B, N, H, D], k [B, M, Hk, D], v [B, M, Hk, Dv], o and dout
    [B, N, H, Dv], lse [B, H, N] float32 from attention(return_lse=True)
    -> (dq [B, N, H, D], dk [B, M, Hk, D], dv [B, M, Hk, Dv]) in the dtypes
    of q, k and v. 3-d inputs as in attention().
    """
    was3 = getattr(q, "ndim", 4) == 3
    if was3:
        q, k, v, o, dout, lse = q[None], k[None], v[None], o[None], dout[None], lse[None]
    ptrs, _keep, (gq, gk, gv), dq_ = _softmax_bwd_args(q, k, v, o, lse, dout)
    cu_q = _int32_array(cu_seqlens_q, "cu_seqlens_q")
    cu_k = _int32_array(cu_seqlens_k, "cu_seqlens_k")
    params = _params(scale, softcap, causal, window, cu_q, cu_k, plan)
    st = _lib.attn_backward(_ctx_for(ctx, dq_), params, *ptrs)
    if st:
        _lib.raise_status(st)
    return (_squeeze_result(gq, was3), _squeeze_result(gk, was3), _squeeze_result(gv, was3))


def decode(q, k_cache, v_cache, cache_lens=None, *, causal=False, scale=None, softcap=0.0,
           window=None, return_lse=False, ctx=None):
    """KV-cache decode: 1..16 new queries per sequence against a long cache.

    q [B, Nq, H, D] (Nq <= 16), k_cache [B, Mcap, Hk, D], v_cache
    [B, Mcap, Hk, Dv]; cache_lens int32 [B] (keys 0..cache_lens[b]-1 are live;
    None = all Mcap). The new queries are the last Nq positions of the live
    cache. -> o [B, Nq, H, Dv] (and lse [B, H, Nq] float32).
    """
    pq, oq, sq, dq, tq = _view(q, "q")
    pk, ok, sk, dk, _ = _view(k_cache, "k_cache")
    pv, ov, sv, dv, _ = _view(v_cache, "v_cache")
    o, po = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    lens = _int32_array(cache_lens, "cache_lens")
    if lens is not None and len(lens) != sq[0]:
        raise ValueError(f"cache_lens: expected {sq[0]} entries (one per sequence), got {len(lens)}")
    params = _params(scale, softcap, causal, window)
    if return_lse:
        lse, pl = _empty(tq, (sq[0], sq[2], sq[1]), F32)
    else:
        lse, pl = None, None
    st = _lib.attn_decode(_ctx_for(ctx, dq), params, pq, pk, pv,
                          None if lens is None else lens.ctypes.data, po, pl)
    if st:
        _lib.raise_status(st)
    return (o, lse) if return_lse else o


def lse_merge(o1, lse1, o2, lse2, *, ctx=None):
    """Merge two partial attentions over disjoint key sets.

    o1, o2 [B, N, H, Dv]; lse1, lse2 [B, H, N] float32 -> (o [B, N, H, Dv],
    lse [B, H, N]): the attention over the union of the two key sets. A side
    with lse = -inf contributes nothing.
    """
    p1, a1, s1, d1, t1 = _view(o1, "o1")
    pl1, b1, _, _, _ = _view(lse1, "lse1", (3,))
    p2, a2, _, _, _ = _view(o2, "o2")
    pl2, b2, sl, _, _ = _view(lse2, "lse2", (3,))
    o, po = _empty(t1, s1, d1)
    lse, pl = _empty(t1, tuple(sl), F32)
    st = _lib.attn_lse_merge(_ctx_for(ctx, d1), p1, pl1, p2, pl2, po, pl)
    if st:
        _lib.raise_status(st)
    return o, lse


__all__ = ["attention", "attention_backward", "decode", "lse_merge", "AttnError"]


def linear_attention(q, k, v, g=None, *, gate="none", causal=True, scale=None, chunk=0,
                     state_in=None, return_state=False, cu_seqlens=None, ctx=None):
    """Linear-time attention (the chunked-recurrence engine), forward.

    Per sequence and query head a state S [D, Dv] runs through the tokens:
    S_t = G_t * S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t (causal); non-causal:
    o_t = scale * q_t S_{T-1} (gate must be "none"). No feature map and no
    normalisation are applied (see libattn.mechanisms for a softmax-free
    mechanism built on it).
    q [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, Dv] -> o [B, T, H, Dv]
    (and with return_state=True the final state [B, H, D, Dv] float32).
    g: the log gate, by gate: "none" (g None), "head" [H], "head_token"
    [B, T, H], "key" [B, T, H, D]. state_in [B, H, D, Dv] float32 or None.
    Varlen: cu_seqlens int32 [batch + 1], q/k/v [1, total, ...].
    """
    if not _lib.HAS_LINEAR:
        raise NotImplementedError("this libattn build has no linear-time attention")
    if gate not in _lib.GATES:
        raise ValueError(f"gate must be one of {sorted(_lib.GATES)}, got {gate!r}")
    pq, oq, sq, dq, tq = _view(q, "q")
    pk, ok, sk, dk, _ = _view(k, "k")
    pv, ov, sv, dv, _ = _view(v, "v")
    pg = og = None
    if g is not None:
        pg, og, _, _, _ = _view(g, "g", (1, 3, 4))
    psi = osi = None
    if state_in is not None:
        psi, osi, _, _, _ = _view(state_in, "state_in")
    o, po = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    cu = _int32_array(cu_seqlens, "cu_seqlens")
    nseq = sq[0] if cu is None else len(cu) - 1
    if return_state:
        state, pso = _empty(tq, (nseq, sq[2], sq[3], sv[3]), F32)
    else:
        state, pso = None, None
    params = _lib.LINEAR_PARAMS.pack(0.0 if scale is None else float(scale), 1 if causal else 0,
                                     _lib.GATES[gate], int(chunk),
                                     0 if cu is None else len(cu) - 1,
                                     0 if cu is None else cu.ctypes.data)
    st = _lib.attn_linear_forward(_ctx_for(ctx, dq), params, pq, pk, pv, pg, psi, po, pso)
    if st:
        _lib.raise_status(st)
    return (o, state) if return_state else o


def linear_attention_backward(q, k, v, dout, g=None, *, gate="none", causal=True, scale=None,
                              chunk=0, state_in=None, dstate_out=None, ctx=None):
    """Backward of linear_attention with the same q, k, v, g, gate, state_in.

    dout [B, T, H, Dv]; dstate_out [B, H, D, Dv] float32 or None (zero): the
    gradient reaching the final state. -> (dq, dk, dv) shaped like q, k, v
    (dk, dv summed over a GQA group); with g given also dg shaped like g
    ("head": summed over batch and tokens), and with state_in given also
    dstate_in [B, H, D, Dv] float32: (dq, dk, dv[, dg][, dstate_in]).
    """
    if not _lib.HAS_LINEAR:
        raise NotImplementedError("this libattn build has no linear-time attention")
    if gate not in _lib.GATES:
        raise ValueError(f"gate must be one of {sorted(_lib.GATES)}, got {gate!r}")
    pq, oq, sq, dq_, tq = _view(q, "q")
    pk, ok, sk, dk_, _ = _view(k, "k")
    pv, ov, sv, dv_, _ = _view(v, "v")
    pd, od, _, _, _ = _view(dout, "dout")
    pg = og = pgg = gg = None
    if g is not None:
        pg, og, sg, dg_, _ = _view(g, "g", (1, 3, 4))
        gg, pgg = _empty_nd(tq, sg, dg_)
    psi = osi = pdsi = dsi = None
    if state_in is not None:
        psi, osi, ssi, _, _ = _view(state_in, "state_in")
        dsi, pdsi = _empty(tq, ssi, F32)
    pds = ods = None
    if dstate_out is not None:
        pds, ods, _, _, _ = _view(dstate_out, "dstate_out")
    gq, pgq = _empty(tq, sq, dq_)
    gk, pgk = _empty(tq, sk, dk_)
    gv, pgv = _empty(tq, sv, dv_)
    params = _lib.LINEAR_PARAMS.pack(0.0 if scale is None else float(scale), 1 if causal else 0,
                                     _lib.GATES[gate], int(chunk), 0, 0)
    st = _lib.attn_linear_backward(_ctx_for(ctx, dq_), params, pq, pk, pv, pg, psi, pd,
                                   pds, pgq, pgk, pgv, pgg, pdsi)
    if st:
        _lib.raise_status(st)
    out = (gq, gk, gv)
    if g is not None:
        out += (gg,)
    if state_in is not None:
        out += (dsi,)
    return out


def feature_map_attention(q, k, v, *, feature_map="elu1", normalize=True, eps=1e-6,
                          causal=True, scale=None, cu_seqlens=None, ctx=None):
    """Linear attention with a feature map (Katharopoulos et al.; CAB), on
    the chunked-recurrence engine: o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps)
    (normalize) else phi(q_t) S_t, with S_t = sum_{j<=t} phi(k_j)^T v_j and
    z_t = sum_{j<=t} phi(k_j) (all j when not causal).
    feature_map: "elu1" (elu + 1), "relu" or "identity".
    q [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, Dv] -> o [B, T, H, Dv].
    """
    if not _lib.HAS_FEATURE_MAPS:
        raise NotImplementedError("this libattn build has no attn_linear_attention")
    if feature_map not in _lib.FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {sorted(_lib.FEATURE_MAPS)}, "
                         f"got {feature_map!r}")
    pq, oq, sq, dq, tq = _view(q, "q")
    pk, ok, sk, dk, _ = _view(k, "k")
    pv, ov, sv, dv, _ = _view(v, "v")
    o, po = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    cu = _int32_array(cu_seqlens, "cu_seqlens")
    params = _lib.LINEAR_PARAMS.pack(0.0 if scale is None else float(scale), 1 if causal else 0,
                                     0, 0, 0 if cu is None else len(cu) - 1,
                                     0 if cu is None else cu.ctypes.data)
    st = _lib.attn_linear_attention(_ctx_for(ctx, dq), params, _lib.FEATURE_MAPS[feature_map],
                                    1 if normalize else 0, float(eps), pq, pk, pv, po)
    if st:
        _lib.raise_status(st)
    return o


__all__ += ["linear_attention", "linear_attention_backward", "feature_map_attention"]
