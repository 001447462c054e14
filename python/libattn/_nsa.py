"""Native Sparse Attention from Python: attn_nsa_compress, then
attn_nsa_attention (selection and forward in one call; attn_nsa_select +
attn_nsa_forward where the library lacks it, and for float64), and its
backward (attn_nsa_backward, then attn_nsa_compress_backward for the mean
compression's share of dk, dv).
Differentiable: libattn.torch.nsa_attention."""

from __future__ import annotations

import ctypes
import struct

import numpy as np

from . import _lib, _ops
from ._lib import F32, F64
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
HAS_NSA_ATTENTION = HAS_NSA and hasattr(_lib.lib, "attn_nsa_attention")
if HAS_NSA_ATTENTION:  # select + forward in one call (the compressed branch computed once)
    _attention = _lib._sig("attn_nsa_attention", ctypes.c_int, *([_P] * 13))
HAS_NSA_BACKWARD = HAS_NSA and hasattr(_lib.lib, "attn_nsa_backward")
if HAS_NSA_BACKWARD:
    _backward = _lib._sig("attn_nsa_backward", ctypes.c_int, *([_P] * 18))
    _compress_bwd = _lib._sig("attn_nsa_compress_backward", ctypes.c_int, *([_P] * 6))


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


def _one(q, k, v, gates, **kw):
    return _forward_saved(q, k, v, gates, save=False, **kw)[0]


class _Saved:
    """What the backward of one sequence needs from its forward."""

    __slots__ = ("kc", "vc", "sel", "gates", "so", "sl", "opts", "params", "M")


def _forward_saved(q, k, v, gates, *, cmp_block, cmp_stride, sel_block, sel_count, query_block,
                   window, scale, softcap, ctx, save=True):
    """One sequence: (o, _Saved or None). save=True also keeps each branch's
    output and LSE (f32; f64 on the reference backend) for the backward."""
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
    gdt = F64 if dq == F64 else F32
    if gates is None:
        gates = np.full((sq[0], sq[1], sq[2], 3), 1 / 3,
                        dtype=np.float64 if gdt == F64 else np.float32)
        if tq:
            gates = _ops._torch_mod().from_numpy(gates)
    pg, og, sg, dg, _ = _view(gates, "gates")
    if dg != gdt:
        raise ValueError("gates: expected float32" + (" or float64" if gdt == F64 else ""))
    o, po = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    so = sl = pso = psl = None
    if save:
        so, pso = _empty(tq, (3 * sq[0], sq[1], sq[2], sv[3]), gdt)
        sl, psl = _empty(tq, (3 * sq[0], sq[2], sq[1]), gdt)
    out = ctypes.c_void_p()
    if HAS_NSA_ATTENTION and dq != F64:  # select and forward in one call
        _lib.check(_attention(c, params, opts, pq, pk, pv, pkc, pvc, pg, po, pso, psl,
                              ctypes.byref(out) if save else None))
        sel = Plan._adopt(out, sq[1], M, query_block, sel_block, Hk) if save else None
    else:
        psq, pskc = pq, pkc
        if dq == F64:  # the planner takes f32 | f16 | bf16: it chooses on f32 copies
            qs, kcs = (x.float() if tq else x.astype(np.float32) for x in (q, kc))
            psq, pskc = _view(qs, "q")[0], _view(kcs, "kc")[0]
        _lib.check(_select(c, params, opts, psq, pskc, M, ctypes.byref(out)))
        sel = Plan._adopt(out, sq[1], M, query_block, sel_block, Hk)
        _lib.check(_forward(c, params, opts, pq, pk, pv, pkc, pvc, sel.ptr, pg, po, pso, psl))
    if not save:
        return o, None
    s = _Saved()
    s.kc, s.vc, s.sel, s.gates, s.so, s.sl = kc, vc, sel, gates, so, sl
    s.opts, s.params, s.M = opts, params, M
    return o, s


def _backward_saved(q, k, v, s, dout, ctx=None):
    """(dq, dk, dv, dgates) of one sequence from its _Saved: attn_nsa_backward,
    then attn_nsa_compress_backward adds the compressed branch's share
    (dkc, dvc spread over each block's keys) to dk, dv. dk, dv come back as
    float32 (float64 on the reference backend), like dgates."""
    if not HAS_NSA_BACKWARD:
        raise NotImplementedError("this libattn build has no attn_nsa_backward")
    pq, oq, sq, dq, tq = _view(q, "q")
    pk, ok, sk, dk, _ = _view(k, "k")
    pv, ov, sv, dv, _ = _view(v, "v")
    pd, od, _, _, _ = _view(dout, "dout")
    pkc, okc, skc, _, _ = _view(s.kc, "kc")
    pvc, ovc, svc, _, _ = _view(s.vc, "vc")
    pg, og, sg, _, _ = _view(s.gates, "gates")
    pso, oso, _, _, _ = _view(s.so, "saved_o")
    psl, osl, _, _, _ = _view(s.sl, "saved_lse", (3,))
    gdt = F64 if dq == F64 else F32
    gq, pgq = _empty(tq, tuple(sq), dq)
    gk, pgk = _empty(tq, tuple(sk), gdt)
    gv, pgv = _empty(tq, tuple(sv), gdt)
    gkc, pgkc = _empty(tq, tuple(skc), gdt)
    gvc, pgvc = _empty(tq, tuple(svc), gdt)
    gg, pgg = _empty(tq, tuple(sg), gdt)
    c = _ctx_for(ctx, dq)
    _lib.check(_backward(c, s.params, s.opts, pq, pk, pv, pkc, pvc, s.sel.ptr, pg, pso, psl, pd,
                         pgq, pgk, pgv, pgkc, pgvc, pgg))
    _lib.check(_compress_bwd(c, s.opts, pgkc, pgvc, pgk, pgv))
    return gq, gk, gv, gg


def nsa_attention_backward(q, k, v, dout, gates=None, *, cmp_block=32, cmp_stride=16,
                           sel_block=64, sel_count=16, query_block=64, window=512, scale=None,
                           softcap=0.0, ctx=None):
    """Backward of nsa_attention with the same arguments: dout [B, N, H, Dv]
    -> (dq [B, N, H, D], dk [B, M, Hk, D], dv [B, M, Hk, Dv], dgates
    [B, N, H, 3]); dk, dv include the compressed branch's share through the
    mean compression; the selection is a discrete choice (no gradient).
    dk, dv, dgates are float32 (float64 for float64 inputs). The forward is
    run again (with its branch outputs saved); libattn.torch.nsa_attention
    keeps them from the forward instead."""
    kw = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block,
              sel_count=sel_count, query_block=query_block, window=window, scale=scale,
              softcap=softcap, ctx=ctx)
    outs = []
    for b in range(q.shape[0]):
        qb, kb, vb, db = q[b:b + 1], k[b:b + 1], v[b:b + 1], dout[b:b + 1]
        gb = None if gates is None else gates[b:b + 1]
        _, s = _forward_saved(qb, kb, vb, gb, **kw)
        outs.append(_backward_saved(qb, kb, vb, s, db, ctx))
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0][0], np.ndarray):
        return tuple(np.concatenate(x) for x in zip(*outs))
    import torch

    return tuple(torch.cat(x) for x in zip(*outs))


__all__ = ["nsa_attention", "nsa_attention_backward", "HAS_NSA", "HAS_NSA_BACKWARD"]
