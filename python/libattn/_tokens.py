"""Token-level mechanisms from Python: SpAtten's cascade token pruning and
CATANet's content-aware token aggregation.

    token_importance   attention probability each key receives (attn_token_importance)
    top_tokens         the `keep` most important tokens, ascending (attn_top_tokens)
    select_tokens      x[:, idx] for a subset idx (attn_select_tokens)
    head_importance    L2 norm of each head's output (attn_head_importance)
    catanet_attention  intra-group and inter-group attention (attn_catanet_forward)
    catanet_attention_backward  its backward, the groups held fixed (attn_catanet_backward;
                       differentiable in libattn.torch as catanet_attention)

Tensors as in libattn.attention (numpy or PyTorch CPU, any strides, q's kind
returned); index and importance vectors are int64 / float64 arrays of the
same kind as the tensor argument (numpy when there is none).
"""

from __future__ import annotations

import ctypes

import numpy as np

from . import _lib
from ._grid import _int64_index
from ._lib import F32
from ._ops import _ctx_for, _empty, _params, _torch_mod, _view

_P = ctypes.c_void_p
_I = ctypes.c_int
_I64 = ctypes.c_int64

HAS_SPATTEN = hasattr(_lib.lib, "attn_token_importance")
# the forward's LSE outputs came with the backward: a library without
# attn_catanet_backward has another forward signature, so neither is bound
HAS_CATANET = hasattr(_lib.lib, "attn_catanet_backward")
HAS_CATANET_BACKWARD = HAS_CATANET
if HAS_SPATTEN:
    _importance = _lib._sig("attn_token_importance", _I, _P, _P, _P, _P, _P, _P)
    _top = _lib._sig("attn_top_tokens", _I, _P, _I64, _I64, _P)
    _select = _lib._sig("attn_select_tokens", _I, _P, _P, _I64, _P, _P)
    _head_importance = _lib._sig("attn_head_importance", _I, _P, _P, _P)
if HAS_CATANET:
    _catanet = _lib._sig("attn_catanet_forward", _I, *[_P] * 12)
    _catanet_bwd = _lib._sig("attn_catanet_backward", _I, *[_P] * 16)


def _need(flag, name):
    if not flag:
        raise NotImplementedError(f"this libattn build has no {name}")


def _is_torch(x):
    t = _torch_mod()
    return t is not None and isinstance(x, t.Tensor)


def _kind(arr: np.ndarray, torch_like: bool):
    return _torch_mod().from_numpy(arr) if torch_like else arr


def token_importance(q, k, lse, *, causal=False, window=None, scale=None, softcap=0.0,
                     importance=None, ctx=None):
    """SpAtten's token importance: importance[b, j] += the attention
    probability P[i, j] summed over query heads and rows i (under the call's
    causal/window rule, as libattn.attention), recomputed from lse.

    q [B, N, H, D], k [B, M, Hk, D], lse [B, H, N] float32 from
    libattn.attention(q, k, v, return_lse=True) with the same rule ->
    importance float64 [B, M]. importance: a contiguous float64 [B, M]
    array or tensor to accumulate into (across layers: the cascade), or
    None for a new zeroed one (q's kind).
    """
    _need(HAS_SPATTEN, "attn_token_importance")
    pq, oq, sq, dq, tq = _view(q, "q")
    pk, ok, sk, dk, _ = _view(k, "k")
    pl, ol, _, _, _ = _view(lse, "lse", (3,))
    shape = (sq[0], sk[1])
    if importance is None:
        acc = np.zeros(shape, dtype=np.float64)
        out = _kind(acc, tq)
        ptr = acc.ctypes.data
    else:
        out = importance
        if _is_torch(importance):
            t = _torch_mod()
            ok_ = (importance.dtype == t.float64 and importance.is_cpu and
                   tuple(importance.shape) == shape and importance.is_contiguous())
            ptr = importance.data_ptr()
        else:
            ok_ = (isinstance(importance, np.ndarray) and importance.dtype == np.float64 and
                   importance.shape == shape and importance.flags.c_contiguous and
                   importance.flags.writeable)
            ptr = importance.ctypes.data if ok_ else 0
        if not ok_:
            raise ValueError(f"importance: expected a writable contiguous float64 array of shape "
                             f"{shape}, got {getattr(importance, 'dtype', type(importance))} "
                             f"{tuple(getattr(importance, 'shape', ()))}")
    _lib.check(_importance(_ctx_for(ctx, dq), _params(scale, softcap, causal, window), pq, pk,
                           pl, ptr))
    return out


def top_tokens(importance, keep):
    """The `keep` most important tokens in ascending order (ties: the
    earlier token): importance [M] -> int64 [keep], or [B, M] -> [B, keep]
    (one row per sequence). Of importance's kind."""
    _need(HAS_SPATTEN, "attn_top_tokens")
    tl = _is_torch(importance)
    a = importance.detach().cpu().numpy() if tl else importance
    a = np.ascontiguousarray(a, dtype=np.float64)
    if a.ndim not in (1, 2):
        raise ValueError(f"importance: expected [M] or [B, M], got shape {a.shape}")
    rows = a[None] if a.ndim == 1 else a
    keep = int(keep)
    out = np.zeros((rows.shape[0], max(keep, 0)), dtype=np.int64)
    for b in range(rows.shape[0]):
        r = np.ascontiguousarray(rows[b])
        _lib.check(_top(r.ctypes.data, r.shape[0], keep, out[b].ctypes.data if keep > 0 else
                        out.ctypes.data))
    return _kind(out[0] if a.ndim == 1 else out, tl)


def select_tokens(x, idx, *, ctx=None):
    """out[:, t] = x[:, idx[t]] for a subset idx (int64 [keep], shared by
    the batch; e.g. from top_tokens). x [B, M, heads, D] -> [B, keep, heads, D]."""
    _need(HAS_SPATTEN, "attn_select_tokens")
    a = _int64_index(idx, "idx")
    px, ox, sx, dx, tx = _view(x, "x")
    if not 1 <= len(a) <= sx[1]:
        raise ValueError(f"idx: expected 1..{sx[1]} token indices (x->shape[1]), got {len(a)}")
    o, po = _empty(tx, (sx[0], len(a), sx[2], sx[3]), dx)
    _lib.check(_select(_ctx_for(ctx, dx), a.ctypes.data, len(a), px, po))
    return o


def head_importance(o, *, ctx=None):
    """SpAtten's head importance: the L2 norm of each head's output.
    o [B, N, H, Dv] -> float64 [B, H] (o's kind)."""
    _need(HAS_SPATTEN, "attn_head_importance")
    po, oo, so, do, to = _view(o, "o")
    out = np.zeros((so[0], so[2]), dtype=np.float64)
    _lib.check(_head_importance(_ctx_for(ctx, do), po, out.ctypes.data))
    return _kind(out, to)


def catanet_attention(q, k, v, feats, centres, *, scale=None, return_lse=False,
                      return_groups=False, ctx=None):
    """CATANet's content-aware token aggregation, one sequence.

    Each token joins the group of its nearest centre (L2 between feats[t] and
    centres[g]; ties to the lower g). o_intra: attention among the tokens of
    the token's own group; o_inter: attention from every token to the group
    means of k and v (each mean's logit + ln(group size), so that it weighs
    as its tokens; empty groups left out).

    q [1, N, H, D], k [1, N, Hk, D], v [1, N, Hk, Dv], feats [1, N, 1, Df],
    centres [1, G, 1, Df] -> (o_intra, o_inter) [1, N, H, Dv] each; with
    return_lse=True also (lse_intra, lse_inter) [1, H, N] float32 (each
    branch's LSE, for catanet_attention_backward); with return_groups=True
    also each token's group, int64 [N] (q's kind), last.
    scale only (no mask, no softcap).
    """
    _need(HAS_CATANET, "attn_catanet_forward with LSE outputs")
    pq, oq, sq, dq, tq = _view(q, "q")
    pk, ok, sk, dk, _ = _view(k, "k")
    pv, ov, sv, dv, _ = _view(v, "v")
    pf, of, _, _, _ = _view(feats, "feats")
    pc, oc, _, _, _ = _view(centres, "centres")
    oi, poi = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    ox, pox = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    li, pli = _empty(tq, (sq[0], sq[2], sq[1]), F32) if return_lse else (None, None)
    lx, plx = _empty(tq, (sq[0], sq[2], sq[1]), F32) if return_lse else (None, None)
    grp = np.zeros(sq[1], dtype=np.int64)
    _lib.check(_catanet(_ctx_for(ctx, dq), _params(scale, 0.0, False, None), pf, pc, pq, pk, pv,
                        poi, pox, pli, plx, grp.ctypes.data))
    out = (oi, ox) + ((li, lx) if return_lse else ())
    return out + (_kind(grp, tq),) if return_groups else out


def catanet_attention_backward(q, k, v, feats, centres, o_intra, o_inter, lse_intra, lse_inter,
                               dout_intra, dout_inter, *, scale=None, ctx=None):
    """Backward of catanet_attention with the same inputs, its outputs and
    LSEs (return_lse=True): dout_intra, dout_inter [1, N, H, Dv] (zeros for
    a branch the loss does not use) -> (dq, dk, dv) shaped and typed like
    q, k, v. The groups are recomputed from feats and centres and held
    fixed: no gradient for feats or centres."""
    _need(HAS_CATANET_BACKWARD, "attn_catanet_backward")
    pq, oq, sq, dq, tq = _view(q, "q")
    pk, ok, sk, dk, _ = _view(k, "k")
    pv, ov, sv, dv, _ = _view(v, "v")
    pf, of, _, _, _ = _view(feats, "feats")
    pc, oc, _, _, _ = _view(centres, "centres")
    po, oo, _, _, _ = _view(o_intra, "o_intra")
    pox, oox, _, _, _ = _view(o_inter, "o_inter")
    pli, oli, _, _, _ = _view(lse_intra, "lse_intra", (3,))
    plx, olx, _, _, _ = _view(lse_inter, "lse_inter", (3,))
    pdi, odi, _, _, _ = _view(dout_intra, "dout_intra")
    pdx, odx, _, _, _ = _view(dout_inter, "dout_inter")
    gq, pgq = _empty(tq, sq, dq)
    gk, pgk = _empty(tq, sk, dk)
    gv, pgv = _empty(tq, sv, dv)
    _lib.check(_catanet_bwd(_ctx_for(ctx, dq), _params(scale, 0.0, False, None), pf, pc, pq, pk,
                            pv, po, pox, pli, plx, pdi, pdx, pgq, pgk, pgv))
    return gq, gk, gv


__all__ = ["HAS_SPATTEN", "HAS_CATANET", "HAS_CATANET_BACKWARD", "token_importance",
           "top_tokens", "select_tokens", "head_importance", "catanet_attention",
           "catanet_attention_backward"]
