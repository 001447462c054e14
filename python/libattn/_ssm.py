"""Gated recurrences over the chunked-recurrence engine, from Python: Gated
Linear Attention (GLA), Mamba-2 SSD and the Mamba selective scan.

    gla_attention        S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t
    gla_attention_backward
    ssd                  Mamba-2 (attn_ssd_forward), and ssd_backward
    mamba_scan           Mamba-1 selective scan (attn_mamba_scan), and mamba_scan_backward

numpy arrays or PyTorch CPU tensors in (any strides), the first argument's
kind out; states are float32. float64 runs on the reference backend (which
computes these in double except where the op itself says f32). Errors raise
AttnError with the C library's message (it names the argument).
"""

from __future__ import annotations

import ctypes

from . import _lib
from ._lib import F32
from ._ops import _ctx_for, _empty, _empty_nd, _view, linear_attention, linear_attention_backward

_P = ctypes.c_void_p
_I = ctypes.c_int

HAS_SSD = hasattr(_lib.lib, "attn_ssd_forward")
HAS_MAMBA = hasattr(_lib.lib, "attn_mamba_scan")
if HAS_SSD:
    _ssd_fwd = _lib._sig("attn_ssd_forward", _I, *([_P] * 10))
    _ssd_bwd = _lib._sig("attn_ssd_backward", _I, *([_P] * 17))
if HAS_MAMBA:
    _mamba_fwd = _lib._sig("attn_mamba_scan", _I, *([_P] * 10))
    _mamba_bwd = _lib._sig("attn_mamba_scan_backward", _I, *([_P] * 17))


def _gate_kind(g):
    nd = len(g.shape)
    if nd == 4:
        return "key"
    if nd == 3:
        return "head_token"
    raise ValueError(f"g: expected [B, T, H, D] (per key dim) or [B, T, H] (per head and "
                     f"token) log gates, got shape {tuple(g.shape)}")


def gla_attention(q, k, v, g, *, scale=None, chunk=0, state_in=None, return_state=False,
                  cu_seqlens=None, ctx=None):
    """Gated Linear Attention (Yang et al. 2024), causal:
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.

    q [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, Dv]; g the log gate
    (log alpha <= 0, e.g. logsigmoid of the gate logits): [B, T, H, D] per
    key dim (ATTN_GATE_KEY) or [B, T, H] one scalar per head and token
    (ATTN_GATE_HEAD_TOKEN, Mamba-2 style) -> o [B, T, H, Dv] (and with
    return_state=True the final state [B, H, D, Dv] float32). state_in
    [B, H, D, Dv] float32 or None. scale: default 1/sqrt(D). Varlen:
    cu_seqlens int32 [batch + 1], q/k/v/g [1, total, ...].
    """
    return linear_attention(q, k, v, g, gate=_gate_kind(g), causal=True, scale=scale,
                            chunk=chunk, state_in=state_in, return_state=return_state,
                            cu_seqlens=cu_seqlens, ctx=ctx)


def gla_attention_backward(q, k, v, g, dout, *, scale=None, chunk=0, state_in=None,
                           dstate_out=None, ctx=None):
    """Backward of gla_attention: dout [B, T, H, Dv] (dstate_out [B, H, D, Dv]
    float32 or None) -> (dq, dk, dv, dg), plus dstate_in when state_in is
    given; shaped like their inputs."""
    return linear_attention_backward(q, k, v, dout, g, gate=_gate_kind(g), causal=True,
                                     scale=scale, chunk=chunk, state_in=state_in,
                                     dstate_out=dstate_out, ctx=ctx)


def _opt(x, name, ndims=(4,)):
    if x is None:
        return None, None
    p, o, _, _, _ = _view(x, name, ndims)
    return p, o


def _scan_backward(bwd, ctx, ins, dy, dskip, state_in, dstate_out):
    """The backward binding of SSD and of the Mamba scan: ins the (tensor,
    name, ndims) of x, dt or delta, a, bm, cm, and dy shaped like x ->
    their gradients, each shaped like its input, plus ddskip when dskip is
    given, plus dstate_in when state_in is given."""
    views = [_view(t, name, nd) for t, name, nd in ins]
    _, _, _, dtype, tx = views[0]
    pdy, ody, _, _, _ = _view(dy, "dy", ins[0][2])
    pds = psi = None
    if dskip is not None:
        pds, ods, sds, dds_, _ = _view(dskip, "dskip", (1,))
    if state_in is not None:
        psi, osi, ssi, _, _ = _view(state_in, "state_in")
    pdso, odso = _opt(dstate_out, "dstate_out")
    grads = [_empty_nd(tx, tuple(sh), d) for _, _, sh, d, _ in views]
    gds, pgds = _empty_nd(tx, tuple(sds), dds_) if dskip is not None else (None, None)
    gsi, pgsi = _empty(tx, tuple(ssi), F32) if state_in is not None else (None, None)
    _lib.check(bwd(_ctx_for(ctx, dtype), *(v[0] for v in views), pds, psi, pdy, pdso,
                   *(p for _, p in grads), pgds, pgsi))
    out = tuple(g for g, _ in grads)
    if dskip is not None:
        out += (gds,)
    if state_in is not None:
        out += (gsi,)
    return out


def ssd(x, dt, a, bm, cm, dskip=None, *, state_in=None, return_state=False, ctx=None):
    """Mamba-2 SSD (state-space duality), per head h with G groups of B, C:
    S_t = exp(dt_t A_h) S_{t-1} + B_t^T (dt_t x_t),  y_t = C_t S_t + Dskip_h x_t.

    x [B, T, H, P]; dt [B, T, H] (> 0, after softplus); a [H] (A < 0);
    bm, cm [B, T, G, N] (G divides H: head h reads group h / (H / G));
    dskip [H] or None; state_in [B, H, N, P] float32 or None ->
    y [B, T, H, P] in x's dtype (and with return_state=True the final state
    [B, H, N, P] float32). Inputs f32 | f16 | bf16 (dt, a, dskip: f32), or
    all float64 (reference backend). It is linear attention with q = C,
    k = B, v = dt x and one log gate dt A per head and token.
    """
    if not HAS_SSD:
        raise NotImplementedError("this libattn build has no attn_ssd_forward")
    px, ox, sx, dx, tx = _view(x, "x")
    pdt, odt, _, _, _ = _view(dt, "dt", (3,))
    pa, oa, _, _, _ = _view(a, "a", (1,))
    pb, ob, sb, _, _ = _view(bm, "bm")
    pc, oc, _, _, _ = _view(cm, "cm")
    pds, ods = _opt(dskip, "dskip", (1,))
    psi, osi = _opt(state_in, "state_in")
    y, py = _empty(tx, tuple(sx), dx)
    state, pso = _empty(tx, (sx[0], sx[2], sb[3], sx[3]), F32) if return_state else (None, None)
    _lib.check(_ssd_fwd(_ctx_for(ctx, dx), px, pdt, pa, pb, pc, pds, psi, py, pso))
    return (y, state) if return_state else y


def ssd_backward(x, dt, a, bm, cm, dy, dskip=None, *, state_in=None, dstate_out=None, ctx=None):
    """Backward of ssd with the same inputs: dy [B, T, H, P], dstate_out
    [B, H, N, P] float32 or None -> (dx, ddt, da, dbm, dcm), plus ddskip
    when dskip is given, plus dstate_in when state_in is given; each shaped
    like its input (dbm, dcm summed over the heads of a group)."""
    if not HAS_SSD:
        raise NotImplementedError("this libattn build has no attn_ssd_backward")
    return _scan_backward(_ssd_bwd, ctx, ((x, "x", (4,)), (dt, "dt", (3,)), (a, "a", (1,)),
                                          (bm, "bm", (4,)), (cm, "cm", (4,))),
                          dy, dskip, state_in, dstate_out)


def mamba_scan(x, delta, a, bm, cm, dskip=None, *, state_in=None, return_state=False, ctx=None):
    """The Mamba selective scan (Mamba-1, diagonal A), per channel c of E:
    h_t = exp(delta_tc A_c) * h_{t-1} + delta_tc B_t x_tc,
    y_tc = C_t . h_t + Dskip_c x_tc, with h_t in R^N.

    x, delta [B, T, E]; a [E, N]; bm, cm [B, T, N]; dskip [E] or None;
    state_in [B, E, N, 1] float32 or None -> y [B, T, E] in x's dtype (and
    with return_state=True the final state [B, E, N, 1] float32).
    """
    if not HAS_MAMBA:
        raise NotImplementedError("this libattn build has no attn_mamba_scan")
    px, ox, sx, dx, tx = _view(x, "x", (3,))
    pd, od, _, _, _ = _view(delta, "delta", (3,))
    pa, oa, sa, _, _ = _view(a, "a", (2,))
    pb, ob, _, _, _ = _view(bm, "bm", (3,))
    pc, oc, _, _, _ = _view(cm, "cm", (3,))
    pds, ods = _opt(dskip, "dskip", (1,))
    psi, osi = _opt(state_in, "state_in")
    y, py = _empty(tx, tuple(sx), dx)
    state, pso = (_empty(tx, (sx[0], sx[2], sa[1], 1), F32) if return_state else (None, None))
    _lib.check(_mamba_fwd(_ctx_for(ctx, dx), px, pd, pa, pb, pc, pds, psi, py, pso))
    return (y, state) if return_state else y


def mamba_scan_backward(x, delta, a, bm, cm, dy, dskip=None, *, state_in=None, dstate_out=None,
                        ctx=None):
    """Backward of mamba_scan with the same inputs: dy [B, T, E], dstate_out
    [B, E, N, 1] float32 or None -> (dx, ddelta, da, dbm, dcm), plus ddskip
    when dskip is given, plus dstate_in when state_in is given."""
    if not HAS_MAMBA:
        raise NotImplementedError("this libattn build has no attn_mamba_scan_backward")
    return _scan_backward(_mamba_bwd, ctx, ((x, "x", (3,)), (delta, "delta", (3,)),
                                            (a, "a", (2,)), (bm, "bm", (3,)), (cm, "cm", (3,))),
                          dy, dskip, state_in, dstate_out)


__all__ = ["HAS_SSD", "HAS_MAMBA", "gla_attention", "gla_attention_backward", "ssd",
           "ssd_backward", "mamba_scan", "mamba_scan_backward"]
