"""Mechanisms over the chunked-recurrence engine and its neighbours, from
Python: LightNet, random-feature attention (RFA / Performer FAVOR+),
WERSA, Local Linear Attention (LLA), and the two decode steps (the linear
recurrence, attn_linear_decode; the Mamba scan, attn_mamba_step).

    lightnet_attention   attn_lightnet_forward, and lightnet_attention_backward
    rfa_attention        attn_rfa_forward, and rfa_attention_backward
    wersa_attention      attn_wersa_forward, and wersa_attention_backward
    lla_attention        attn_lla_forward (and lla_attention_backward where
                         the library has attn_lla_backward)
    linear_decode        attn_linear_decode: T >= 1 new tokens, state in place
    mamba_step           attn_mamba_step: T >= 1 new tokens, state in place

numpy arrays or PyTorch CPU tensors in (any strides, no copy), the first
argument's kind out; float64 runs on the reference backend. Errors raise
AttnError with the C library's message (it names the argument).
Differentiable versions: libattn.torch.lightnet_attention, rfa_attention,
wersa_attention (and lla_attention where the C backward exists).
"""

from __future__ import annotations

import ctypes

import numpy as np

from . import _lib
from ._lib import F32, F64
from ._ops import _ctx_for, _empty, _empty_nd, _int32_array, _torch_mod, _view

_P = ctypes.c_void_p
_I = ctypes.c_int
_I32 = ctypes.c_int32
_F = ctypes.c_float

_lib_ = _lib.lib
HAS_LIGHTNET = hasattr(_lib_, "attn_lightnet_forward")
HAS_RFA = hasattr(_lib_, "attn_rfa_forward")
HAS_WERSA = hasattr(_lib_, "attn_wersa_forward")
HAS_LLA = hasattr(_lib_, "attn_lla_forward")
HAS_LLA_BACKWARD = hasattr(_lib_, "attn_lla_backward")
HAS_MAMBA_STEP = hasattr(_lib_, "attn_mamba_step")
HAS_LINEAR_DECODE = _lib.HAS_LINEAR

if HAS_LIGHTNET:
    _ln_fwd = _lib._sig("attn_lightnet_forward", _I, *([_P] * 6))
    _ln_bwd = _lib._sig("attn_lightnet_backward", _I, *([_P] * 9))
if HAS_RFA:
    _rfa_fwd = _lib._sig("attn_rfa_forward", _I, _P, _P, _I32, _P, _P, _P, _P)
    _rfa_bwd = _lib._sig("attn_rfa_backward", _I, _P, _P, _I32, *([_P] * 7))
if HAS_WERSA:
    _wersa_fwd = _lib._sig("attn_wersa_forward", _I, _P, _P, _I32, _I32, *([_P] * 5))
    _wersa_bwd = _lib._sig("attn_wersa_backward", _I, _P, _P, _I32, _I32, *([_P] * 9))
if HAS_LLA:
    _lla_fwd = _lib._sig("attn_lla_forward", _I, _P, _P, _F, _P, _P, _P, _P)
if HAS_LLA_BACKWARD:
    _lla_bwd = _lib._sig("attn_lla_backward", _I, _P, _P, _F, *([_P] * 7))
if HAS_MAMBA_STEP:
    _mamba_step = _lib._sig("attn_mamba_step", _I, *([_P] * 9))

WERSA_LEVELS = 3  # default number of Haar levels


def _need(flag, name):
    if not flag:
        raise NotImplementedError(f"this libattn build has no {name}")


def _lparams(scale, causal, chunk=0, cu=None, gate="none"):
    """attn_linear_params bytes (cu: an int32 array kept alive by the caller)."""
    return _lib.LINEAR_PARAMS.pack(0.0 if scale is None else float(scale), 1 if causal else 0,
                                   _lib.GATES[gate], int(chunk),
                                   0 if cu is None else len(cu) - 1,
                                   0 if cu is None else cu.ctypes.data)


def _qkv(q, k, v):
    pq, oq, sq, dq, tq = _view(q, "q")
    pk, ok, sk, dk, _ = _view(k, "k")
    pv, ov, sv, dv, _ = _view(v, "v")
    return (pq, pk, pv), (oq, ok, ov), (sq, sk, sv), (dq, dk, dv), tq


def _grads(tq, shapes, dtypes):
    out = [_empty(tq, tuple(s), d) for s, d in zip(shapes, dtypes)]
    return [o[0] for o in out], [o[1] for o in out]


def _features(features, q):
    f = 2 * int(q.shape[3]) if features is None else int(features)
    return f


# ---------------------------------------------------------------- LightNet


def lightnet_attention(q, k, v, *, scale=None, chunk=0, cu_seqlens=None, ctx=None):
    """LightNet's additive recurrence ("You Only Scan Once"), causal: per key
    dim x a running softmax over time of the key logits,
    S_t[x] = sum_{j<=t} exp(k_jx) v_j / sum_{j<=t} exp(k_jx),
    o_t = scale * q_t S_t (attn_lightnet_forward; GLA on k' = exp(k - z),
    g = z_{t-1} - z_t with z the running logsumexp of k).

    q [B, T, H, D], k [B, T, Hk, D] (logits; Hk divides H),
    v [B, T, Hk, Dv] -> o [B, T, H, Dv] in q's dtype. scale: default
    1/sqrt(D). Varlen: cu_seqlens int32 [batch + 1], q/k/v [1, total, ...].
    No state in or out; causal only.
    """
    _need(HAS_LIGHTNET, "attn_lightnet_forward")
    (pq, pk, pv), _keep, (sq, sk, sv), (dq, _, _), tq = _qkv(q, k, v)
    cu = _int32_array(cu_seqlens, "cu_seqlens")
    o, po = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    _lib.check(_ln_fwd(_ctx_for(ctx, dq), _lparams(scale, True, chunk, cu), pq, pk, pv, po))
    return o


def lightnet_attention_backward(q, k, v, dout, *, scale=None, chunk=0, cu_seqlens=None,
                                ctx=None):
    """Backward of lightnet_attention with the same inputs: dout [B, T, H, Dv]
    -> (dq, dk, dv) shaped like q, k, v (dk, dv summed over a GQA group)."""
    _need(HAS_LIGHTNET, "attn_lightnet_backward")
    (pq, pk, pv), _keep, shapes, dts, tq = _qkv(q, k, v)
    pd, od, _, _, _ = _view(dout, "dout")
    cu = _int32_array(cu_seqlens, "cu_seqlens")
    g, pg = _grads(tq, shapes, dts)
    _lib.check(_ln_bwd(_ctx_for(ctx, dts[0]), _lparams(scale, True, chunk, cu), pq, pk, pv, pd,
                       *pg))
    return tuple(g)


# ---------------------------------------------------------------- RFA


def rfa_attention(q, k, v, *, features=None, causal=True, cu_seqlens=None, ctx=None):
    """Random-feature attention (RFA / Performer FAVOR+ positive features):
    the softmax kernel exp(q.k / sqrt(D)) approximated by
    phi(x) = exp(w_i . x' - |x'|^2 / 2) / sqrt(F), x' = x / D^(1/4), with F
    features w_i ~ N(0, I) drawn from the context's seed (Context(seed=...);
    the default contexts use seed 0), then normalised linear attention
    (eps 1e-6 in the denominator). Causal or not.

    q [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, Dv] (q and k the same T)
    -> o [B, T, H, Dv] in q's dtype. features: 1..4096, default 2 D.
    Varlen: cu_seqlens int32 [batch + 1], q/k/v [1, total, ...].
    """
    _need(HAS_RFA, "attn_rfa_forward")
    (pq, pk, pv), _keep, (sq, sk, sv), (dq, _, _), tq = _qkv(q, k, v)
    cu = _int32_array(cu_seqlens, "cu_seqlens")
    o, po = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    _lib.check(_rfa_fwd(_ctx_for(ctx, dq), _lparams(None, causal, 0, cu), _features(features, q),
                        pq, pk, pv, po))
    return o


def rfa_attention_backward(q, k, v, dout, *, features=None, causal=True, cu_seqlens=None,
                           ctx=None):
    """Backward of rfa_attention (the same context, so the same features):
    dout [B, T, H, Dv] -> (dq, dk, dv) shaped like q, k, v. The features'
    range shifts are constants that cancel in the normaliser (no gradient)."""
    _need(HAS_RFA, "attn_rfa_backward")
    (pq, pk, pv), _keep, shapes, dts, tq = _qkv(q, k, v)
    pd, od, _, _, _ = _view(dout, "dout")
    cu = _int32_array(cu_seqlens, "cu_seqlens")
    g, pg = _grads(tq, shapes, dts)
    _lib.check(_rfa_bwd(_ctx_for(ctx, dts[0]), _lparams(None, causal, 0, cu),
                        _features(features, q), pq, pk, pv, pd, *pg))
    return tuple(g)


# ---------------------------------------------------------------- WERSA


def _weights(weights, levels, dq):
    """(packed 1-d tensor, owner, levels) of the level weights."""
    if weights is None:
        levels = WERSA_LEVELS if levels is None else int(levels)
        weights = np.ones(levels + 1, dtype=np.float64 if dq == F64 else np.float32)
    t = _torch_mod()
    if t is not None and isinstance(weights, t.Tensor):
        w = weights
    elif isinstance(weights, np.ndarray):
        w = weights
    else:
        w = np.asarray(weights, dtype=np.float64 if dq == F64 else np.float32)
    if len(w.shape) != 1:
        raise ValueError(f"weights: expected a 1-d array of levels + 1 weights, got shape "
                         f"{tuple(w.shape)}")
    n = int(w.shape[0]) - 1
    if levels is not None and int(levels) != n:
        raise ValueError(f"weights: {n + 1} weights given for levels = {levels} (need levels + 1)")
    pw, ow, _, _, _ = _view(w, "weights", (1,))
    return pw, ow, n


def wersa_attention(q, k, v, weights=None, *, levels=None, features=None, causal=True,
                    cu_seqlens=None, ctx=None):
    """WERSA (wavelet-enhanced random spectral attention): q and k pass
    through a causal, undecimated multi-resolution Haar filter along the
    tokens, then random-feature attention (rfa_attention: the same seed,
    features and normaliser) runs on the filtered q~, k~. With levels L,
    c_0 = x, c_l[t] = 2^-l sum_{s=t-2^l+1}^{t} x_s (zero before a sequence's
    first token), d_l = c_{l-1} - c_l and
    x~ = sum_{l=1}^{L} w[l-1] d_l + w[L] c_L (all w = 1: x~ = x).

    q [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, Dv] -> o [B, T, H, Dv].
    weights: L + 1 floats (finest detail first, coarsest approximation
    last; float32, or float64 with float64 inputs), default all ones with
    L = levels (default 3). levels 0..20, features 1..4096 (default 2 D);
    causal or not; varlen via cu_seqlens (the filter restarts per sequence).
    """
    _need(HAS_WERSA, "attn_wersa_forward")
    (pq, pk, pv), _keep, (sq, sk, sv), (dq, _, _), tq = _qkv(q, k, v)
    pw, ow, L = _weights(weights, levels, dq)
    cu = _int32_array(cu_seqlens, "cu_seqlens")
    o, po = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    _lib.check(_wersa_fwd(_ctx_for(ctx, dq), _lparams(None, causal, 0, cu),
                          _features(features, q), L, pw, pq, pk, pv, po))
    return o


def wersa_attention_backward(q, k, v, dout, weights=None, *, levels=None, features=None,
                             causal=True, cu_seqlens=None, ctx=None):
    """Backward of wersa_attention with the same inputs: dout [B, T, H, Dv]
    -> (dq, dk, dv, dweights): dq, dk, dv shaped like q, k, v, dweights
    [levels + 1] (float32, float64 with float64 inputs)."""
    _need(HAS_WERSA, "attn_wersa_backward")
    (pq, pk, pv), _keep, shapes, dts, tq = _qkv(q, k, v)
    pw, ow, L = _weights(weights, levels, dts[0])
    pd, od, _, _, _ = _view(dout, "dout")
    cu = _int32_array(cu_seqlens, "cu_seqlens")
    g, pg = _grads(tq, shapes, dts)
    gw, pgw = _empty_nd(tq, (L + 1,), F64 if dts[0] == F64 else F32)
    _lib.check(_wersa_bwd(_ctx_for(ctx, dts[0]), _lparams(None, causal, 0, cu),
                          _features(features, q), L, pw, pq, pk, pv, pd, *pg, pgw))
    return tuple(g) + (gw,)


# ---------------------------------------------------------------- LLA


def lla_attention(q, k, v, *, lam=0.1, causal=True, scale=None, block=0, cu_seqlens=None,
                  ctx=None):
    """Local Linear Attention (LLA; Zuo et al., FlashLLA): per query a local
    linear regression of the values on the keys weighted by the softmax
    kernel, read at the query (softmax attention is the local constant fit):
    s_ij = softmax_j(scale q_i.k_j) over the visible keys,
    mu_i = sum_j s_ij k_j, Sigma_i = sum_j s_ij (k_j - mu_i)(k_j - mu_i)^T
    + lam I, rho_i = Sigma_i^-1 (q_i - mu_i),
    o_i = sum_j s_ij (1 + (k_j - mu_i).rho_i) v_j.

    q [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, Dv] -> o [B, T, H, Dv].
    lam: the ridge (finite, > 0; lam -> inf gives softmax attention).
    block: tokens per block (0: 64). Cost O(T^2 D^2) per head. Causal or
    not; varlen via cu_seqlens. scale: default 1/sqrt(D).
    """
    _need(HAS_LLA, "attn_lla_forward")
    (pq, pk, pv), _keep, (sq, sk, sv), (dq, _, _), tq = _qkv(q, k, v)
    cu = _int32_array(cu_seqlens, "cu_seqlens")
    o, po = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    _lib.check(_lla_fwd(_ctx_for(ctx, dq), _lparams(scale, causal, block, cu), float(lam), pq,
                        pk, pv, po))
    return o


def lla_attention_backward(q, k, v, dout, *, lam=0.1, causal=True, scale=None, block=0,
                           cu_seqlens=None, ctx=None):
    """Backward of lla_attention (where the library has attn_lla_backward):
    dout [B, T, H, Dv] -> (dq, dk, dv) shaped like q, k, v."""
    _need(HAS_LLA_BACKWARD, "attn_lla_backward")
    (pq, pk, pv), _keep, shapes, dts, tq = _qkv(q, k, v)
    pd, od, _, _, _ = _view(dout, "dout")
    cu = _int32_array(cu_seqlens, "cu_seqlens")
    g, pg = _grads(tq, shapes, dts)
    _lib.check(_lla_bwd(_ctx_for(ctx, dts[0]), _lparams(scale, causal, block, cu), float(lam),
                        pq, pk, pv, pd, *pg))
    return tuple(g)


# ---------------------------------------------------------------- decode steps


def _state_in_place(state):
    """The packed view of a recurrent state that a step updates in place: a
    writable array or tensor whose own memory the view points at."""
    if isinstance(state, np.ndarray) and not state.flags.writeable:
        raise ValueError("state: read-only array; it is updated in place")
    ps, os_, _, _, _ = _view(state, "state")
    if os_ is not state:
        raise ValueError("state: its layout needs a copy (negative or odd strides); pass a "
                         "contiguous float32 array, it is updated in place")
    return ps


def linear_decode(q, k, v, state, g=None, *, gate="none", scale=None, ctx=None):
    """The linear recurrence itself, token by token (attn_linear_decode), on
    T >= 1 new tokens per sequence: S_t = G_t * S_{t-1} + k_t^T v_t,
    o_t = scale * q_t S_t. `state` [B, H, D, Dv] float32 is read and UPDATED
    IN PLACE (a writable numpy array or torch tensor); it may come from
    linear_attention(..., return_state=True) or start as zeros.

    q [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, Dv] -> o [B, T, H, Dv].
    g: the log gate by gate, as linear_attention ("none": None, "head" [H],
    "head_token" [B, T, H], "key" [B, T, H, D]). Causal; no varlen.
    """
    _need(HAS_LINEAR_DECODE, "attn_linear_decode")
    if gate not in _lib.GATES:
        raise ValueError(f"gate must be one of {sorted(_lib.GATES)}, got {gate!r}")
    (pq, pk, pv), _keep, (sq, sk, sv), (dq, _, _), tq = _qkv(q, k, v)
    pg = og = None
    if g is not None:
        pg, og, _, _, _ = _view(g, "g", (1, 3, 4))
    ps = _state_in_place(state)
    o, po = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    _lib.check(_lib.attn_linear_decode(_ctx_for(ctx, dq), _lparams(scale, True, 0, None, gate),
                                       pq, pk, pv, pg, ps, po))
    return o


def mamba_step(x, delta, a, bm, cm, state, dskip=None, *, ctx=None):
    """The Mamba selective scan's step (attn_mamba_step): T >= 1 new tokens
    per sequence, the recurrence itself on `state` [B, E, N, 1] float32,
    read and UPDATED IN PLACE (from mamba_scan(..., return_state=True), or
    zeros):
    h_t = exp(delta_tc A_c) * h_{t-1} + delta_tc B_t x_tc,
    y_tc = C_t . h_t + Dskip_c x_tc.

    x, delta [B, T, E]; a [E, N]; bm, cm [B, T, N]; dskip [E] or None
    -> y [B, T, E] in x's dtype.
    """
    _need(HAS_MAMBA_STEP, "attn_mamba_step")
    px, ox, sx, dx, tx = _view(x, "x", (3,))
    pd, od, _, _, _ = _view(delta, "delta", (3,))
    pa, oa, _, _, _ = _view(a, "a", (2,))
    pb, ob, _, _, _ = _view(bm, "bm", (3,))
    pc, oc, _, _, _ = _view(cm, "cm", (3,))
    pds = ods = None
    if dskip is not None:
        pds, ods, _, _, _ = _view(dskip, "dskip", (1,))
    ps = _state_in_place(state)
    y, py = _empty(tx, tuple(sx), dx)
    _lib.check(_mamba_step(_ctx_for(ctx, dx), px, pd, pa, pb, pc, pds, ps, py))
    return y


__all__ = ["HAS_LIGHTNET", "HAS_RFA", "HAS_WERSA", "HAS_LLA", "HAS_LLA_BACKWARD",
           "HAS_MAMBA_STEP", "lightnet_attention", "lightnet_attention_backward",
           "rfa_attention", "rfa_attention_backward", "wersa_attention",
           "wersa_attention_backward", "lla_attention", "lla_attention_backward",
           "linear_decode", "mamba_step"]
