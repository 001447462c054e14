"""Native Sparse Attention (attn_nsa_compress / attn_nsa_select /
attn_nsa_forward) from Python: forward only."""

from __future__ import annotations

import ctypes
import struct

import numpy as np

from . import _lib
from ._lib import F32
from ._ops import _ctx_for, _empty, _params, _view
from .plan import Plan

# attn_nsa_opts: int64 cmp_block, cmp_stride, sel_block, sel_count, query_block, window
NSA_OPTS = struct.Struct("@qqqqqq")
HAS_NSA = hasattr(_lib.lib, "attn_nsa_forward")
if HAS_NSA:
    _P = ctypes.c_void_p
    _compress = _lib._sig("attn_nsa_compress", ctypes.c_int, _P, _P, _P, _P, _P, _P)
    _select = _lib._sig("attn_nsa_select", ctypes.c_int, _P, _P, _P, _P, _P, ctypes.c_int64, _P)
    _forward = _lib._sig("attn_nsa_forward", ctypes.c_int, _P, _P, _P, _P, _P, _P, _P, _P, _P,
                         _P, _P, _P, _P)


def nsa_attention(q, k, v, gates=None, *, cmp_block=32, cmp_stride=16, sel_block=64,
                  sel_count=16, query_block=64, window=512, scale=None, softcap=0.0, ctx=None):
    """Native Sparse Attention forward (causal, bottom-right aligned).

    Three branches per query, mixed by gates: attention to block means of the
    keys and values (cmp_block keys every cmp_stride), to the sel_count key
    blocks of sel_block keys that the compressed branch ranks best for each
    query block of query_block queries (first and diagonal blocks always
    kept), and to the last `window` keys. o = g0 o_cmp + g1 o_sel + g2 o_win.
    q [B, N, H, D], k [B, M, Hk, D], v [B, M, Hk, Dv] with M >= cmp_block;
    gates float32 [B, N, H, 3] (None: 1/3 each) -> o [B, N, H, Dv].
    The C op takes one sequence; B > 1 runs each in turn and concatenates
    the outputs (one copy of o).
    """
    if not HAS_NSA:
        raise NotImplementedError("this libattn build has no attn_nsa_forward")
    kw = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block,
              sel_count=sel_count, query_block=query_block, window=window, scale=scale,
              softcap=softcap, ctx=ctx)
    if len(q.shape) == 4 and q.shape[0] > 1:
        if not (k.shape[0] == v.shape[0] == q.shape[0]):
            raise ValueError(f"k, v: batch must be q's ({q.shape[0]}), got {k.shape[0]}, "
                             f"{v.shape[0]}")
        if gates is not None and gates.shape[0] != q.shape[0]:
            raise ValueError(f"gates: batch must be q's ({q.shape[0]}), got {gates.shape[0]}")
        outs = [_one(q[b:b + 1], k[b:b + 1], v[b:b + 1],
                     None if gates is None else gates[b:b + 1], **kw)
                for b in range(q.shape[0])]
        if isinstance(outs[0], np.ndarray):
            return np.concatenate(outs)
        import torch

        return torch.cat(outs)
    return _one(q, k, v, gates, **kw)


def _one(q, k, v, gates, *, cmp_block, cmp_stride, sel_block, sel_count, query_block, window,
         scale, softcap, ctx):
    pq, oq, sq, dq, tq = _view(q, "q")
    pk, ok, sk, dk, _ = _view(k, "k")
    pv, ov, sv, dv, _ = _view(v, "v")
    opts = NSA_OPTS.pack(int(cmp_block), int(cmp_stride), int(sel_block), int(sel_count),
                         int(query_block), int(window))
    B, M, Hk = sk[0], sk[1], sk[2]
    if cmp_stride < 1 or cmp_block < cmp_stride or M < cmp_block:
        raise ValueError(f"cmp_block, cmp_stride: need 1 <= cmp_stride <= cmp_block <= M = {M}, "
                         f"got {cmp_block}, {cmp_stride}")
    mc = (M - cmp_block) // cmp_stride + 1
    c = _ctx_for(ctx, dq)
    kc, pkc = _empty(tq, (B, mc, Hk, sk[3]), dk)
    vc, pvc = _empty(tq, (B, mc, Hk, sv[3]), dv)
    _lib.check(_compress(c, opts, pk, pv, pkc, pvc))
    params = _params(scale, softcap, True, None)
    out = ctypes.c_void_p()
    _lib.check(_select(c, params, opts, pq, pkc, M, ctypes.byref(out)))
    sel = Plan._adopt(out, sq[1], M, query_block, sel_block, Hk)
    if gates is None:
        gates = np.full((sq[0], sq[1], sq[2], 3), 1 / 3, dtype=np.float32)
    pg, og, sg, dg, _ = _view(gates, "gates")
    if dg != F32:
        raise ValueError("gates: expected float32")
    o, po = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    _lib.check(_forward(c, params, opts, pq, pk, pv, pkc, pvc, sel.ptr, pg, po, None, None))
    return o


__all__ = ["nsa_attention", "HAS_NSA"]
