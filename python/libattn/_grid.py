"""Mechanisms on token grids (images, video) and token reorderings, from Python.

Tokens of an image or video lie row-major on a grid F x H x W (F = 1 for
images): token (f, y, x) is row (f H + y) W + x of dim 1. A grid, ratio,
window or radius argument is a tuple (h, w) (F = 1) or (f, h, w). Tensors
are [B, tokens, heads, dim] numpy arrays or PyTorch CPU tensors, any
strides, as in libattn.attention; outputs are new contiguous arrays/tensors
of q's kind; float64 runs on the reference backend. Errors raise AttnError
with the C library's message (which names the argument).

    grid_pool                 average pooling by a ratio (attn_grid_pool)
    sra_attention             spatial-reduction attention: keys/values pooled (PVT)
    pooled_cross_attention    CrossLMM: queries pooled, attending to all keys
    neighborhood_attention    2-D / 3-D neighbourhood attention (CLEAR), plan-driven
    hilo_attention            HiLo (LITv2): Hi heads in windows, Lo heads to pooled keys
    global_context_attention  Global Context ViT: local windows and global queries
    gather_tokens, scatter_tokens, grid_window_index, grid_axis_index, paro_choose
                              token permutations and PAROAttention's choice of order
Backwards: sra_attention_backward, pooled_cross_attention_backward,
neighborhood_attention_backward, hilo_attention_backward and
global_context_attention_backward (differentiable in libattn.torch as
sra_attention, pooled_cross_attention, neighborhood_attention,
hilo_attention, global_context_attention).
"""

from __future__ import annotations

import ctypes

import numpy as np

from . import _lib
from ._lib import F32
from ._ops import _ctx_for, _empty, _int_array, _params, _softmax_bwd_args, _view
from .plan import Plan

_P = ctypes.c_void_p
_I = ctypes.c_int
_I64 = ctypes.c_int64


class _Grid(ctypes.Structure):  # attn_grid, passed by value
    _fields_ = [("f", ctypes.c_int64), ("h", ctypes.c_int64), ("w", ctypes.c_int64)]


HAS_GRID = hasattr(_lib.lib, "attn_sra_forward")
if HAS_GRID:
    _sig = _lib._sig
    _pool = _sig("attn_grid_pool", _I, _P, _Grid, _Grid, _P, _P)
    _sra_fwd = _sig("attn_sra_forward", _I, _P, _P, _Grid, _Grid, _P, _P, _P, _P, _P)
    _sra_bwd = _sig("attn_sra_backward", _I, _P, _P, _Grid, _Grid, _P, _P, _P, _P, _P, _P, _P,
                    _P, _P)
    _pooled_cross = _sig("attn_pooled_cross_forward", _I, _P, _P, _Grid, _Grid, _P, _P, _P,
                         _P, _P)
    _plan_nbhd = _sig("attn_plan_neighborhood", _I, _Grid, _Grid, _I64, _I64, _P)
    _nbhd_fwd = _sig("attn_neighborhood_forward", _I, _P, _P, _Grid, _Grid, _P, _P, _P, _P,
                     _P, _P)
    _nbhd_bwd = _sig("attn_neighborhood_backward", _I, _P, _P, _Grid, _Grid, _P, _P, _P, _P,
                     _P, _P, _P, _P, _P, _P)
    _gather = _sig("attn_gather_tokens", _I, _P, _P, _P, _P)
    _scatter = _sig("attn_scatter_tokens", _I, _P, _P, _P, _P)
    _win_index = _sig("attn_grid_window_index", _I, _Grid, _Grid, _P)
    _axis_index = _sig("attn_grid_axis_index", _I, _Grid, _P, _P)
    _paro = _sig("attn_paro_choose", _I, _P, _P, _Grid, _P, _P, _I64, _I64, _I64, _P)

# HiLo and Global Context: their forwards' lse arguments came with the
# backwards, so a library without attn_hilo_backward has neither
HAS_WINDOW_BACKWARD = HAS_GRID and hasattr(_lib.lib, "attn_hilo_backward")
if HAS_WINDOW_BACKWARD:
    _hilo = _sig("attn_hilo_forward", _I, _P, _P, _Grid, _Grid, _I64, _P, _P, _P, _P, _P)
    _hilo_bwd = _sig("attn_hilo_backward", _I, _P, _P, _Grid, _Grid, _I64, _P, _P, _P, _P, _P,
                     _P, _P, _P, _P)
    _gc = _sig("attn_global_context_forward", _I, _P, _P, _Grid, _Grid, _P, _P, _P, _P, _P,
               _P, _P, _P)
    _gc_bwd = _sig("attn_global_context_backward", _I, _P, _P, _Grid, _Grid, *([_P] * 14))
HAS_POOLED_CROSS_BACKWARD = HAS_GRID and hasattr(_lib.lib, "attn_pooled_cross_backward")
if HAS_POOLED_CROSS_BACKWARD:
    _pooled_cross_bwd = _lib._sig("attn_pooled_cross_backward", _I, _P, _P, _Grid, _Grid, _P,
                                  _P, _P, _P, _P, _P, _P, _P, _P)


def _need():
    if not HAS_GRID:
        raise NotImplementedError("this libattn build has no grid mechanisms")


def _need_windows():
    _need()
    if not HAS_WINDOW_BACKWARD:
        raise NotImplementedError("this libattn build predates attn_hilo_backward and "
                                  "attn_global_context_backward (and their forwards' lse)")


def _grid(g, name) -> _Grid:
    """(h, w) or (f, h, w) -> attn_grid (values are checked by the C library)."""
    try:
        t = tuple(int(x) for x in g)
    except TypeError:
        raise TypeError(f"{name}: expected a tuple (h, w) or (f, h, w), got {g!r}") from None
    if len(t) == 2:
        t = (1,) + t
    if len(t) != 3:
        raise ValueError(f"{name}: expected a tuple (h, w) or (f, h, w), got {g!r}")
    return _Grid(*t)


def _extent(g: _Grid) -> int:
    return g.f * g.h * g.w


def _int64_index(idx, name):
    """A contiguous int64 [T] array (numpy or torch or a sequence in)."""
    return _int_array(idx, name, np.int64)


def grid_pool(x, grid, ratio, *, ctx=None):
    """Average pooling of a token grid by ratio (each divides its extent).

    x [B, F H W, heads, D] -> [B, (F/rf)(H/rh)(W/rw), heads, D]."""
    _need()
    px, ox, sx, dx, tx = _view(x, "x")
    g, r = _grid(grid, "grid"), _grid(ratio, "ratio")
    if min(r.f, r.h, r.w) < 1:
        raise ValueError(f"ratio: must be >= 1 on each axis, got {tuple(ratio)}")
    np_ = (g.f // r.f) * (g.h // r.h) * (g.w // r.w)
    o, po = _empty(tx, (sx[0], max(np_, 1), sx[2], sx[3]), dx)
    _lib.check(_pool(_ctx_for(ctx, dx), g, r, px, po))
    return o


def sra_attention(q, k, v, grid, ratio, *, scale=None, softcap=0.0, return_lse=False, ctx=None):
    """Spatial-reduction attention (PVT, Next-ViT): keys and values
    average-pooled on their grid by `ratio`, then attention from every query.

    q [B, N, H, D] (any N: cross-attention works), k [B, F H W, Hk, D],
    v [B, F H W, Hk, Dv] -> o [B, N, H, Dv] (and lse [B, H, N] float32).
    No mask (the tokens are spatial): scale and softcap only.
    """
    _need()
    pq, oq, sq, dq, tq = _view(q, "q")
    pk, ok, sk, dk, _ = _view(k, "k")
    pv, ov, sv, dv, _ = _view(v, "v")
    o, po = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    lse, pl = _empty(tq, (sq[0], sq[2], sq[1]), F32) if return_lse else (None, None)
    _lib.check(_sra_fwd(_ctx_for(ctx, dq), _params(scale, softcap, False, None),
                        _grid(grid, "grid"), _grid(ratio, "ratio"), pq, pk, pv, po, pl))
    return (o, lse) if return_lse else o


def sra_attention_backward(q, k, v, o, lse, dout, grid, ratio, *, scale=None, softcap=0.0,
                           ctx=None):
    """Backward of sra_attention (lse from sra_attention(return_lse=True)):
    dout [B, N, H, Dv] -> (dq, dk, dv) shaped like q, k, v (the pooled
    gradients spread back over their patches)."""
    _need()
    ptrs, _keep, (gq, gk, gv), dq_ = _softmax_bwd_args(q, k, v, o, lse, dout)
    _lib.check(_sra_bwd(_ctx_for(ctx, dq_), _params(scale, softcap, False, None),
                        _grid(grid, "grid"), _grid(ratio, "ratio"), *ptrs))
    return gq, gk, gv


def pooled_cross_attention(q, k, v, grid, ratio, *, scale=None, softcap=0.0, return_lse=False,
                           ctx=None):
    """CrossLMM's pooled cross-attention: the queries average-pooled on their
    grid by `ratio` attend to the full token set.

    q [B, F H W, H, D], k [B, M, Hk, D], v [B, M, Hk, Dv] ->
    o [B, P, H, Dv] with P = (F/rf)(H/rh)(W/rw) (and lse [B, H, P] float32).
    """
    _need()
    pq, oq, sq, dq, tq = _view(q, "q")
    pk, ok, sk, dk, _ = _view(k, "k")
    pv, ov, sv, dv, _ = _view(v, "v")
    g, r = _grid(grid, "grid"), _grid(ratio, "ratio")
    if min(r.f, r.h, r.w) < 1:
        raise ValueError(f"ratio: must be >= 1 on each axis, got {tuple(ratio)}")
    npool = max(1, (g.f // r.f) * (g.h // r.h) * (g.w // r.w))
    o, po = _empty(tq, (sq[0], npool, sq[2], sv[3]), dq)
    lse, pl = _empty(tq, (sq[0], sq[2], npool), F32) if return_lse else (None, None)
    _lib.check(_pooled_cross(_ctx_for(ctx, dq), _params(scale, softcap, False, None), g, r,
                             pq, pk, pv, po, pl))
    return (o, lse) if return_lse else o


def pooled_cross_attention_backward(q, k, v, o, lse, dout, grid, ratio, *, scale=None,
                                    softcap=0.0, ctx=None):
    """Backward of pooled_cross_attention (lse from
    pooled_cross_attention(return_lse=True)): dout [B, P, H, Dv] ->
    (dq, dk, dv) shaped like q, k, v (each pooled query's gradient spread
    over its patch, 1 / (rf rh rw) per query)."""
    _need()
    if not HAS_POOLED_CROSS_BACKWARD:
        raise NotImplementedError("this libattn build has no attn_pooled_cross_backward")
    ptrs, _keep, (gq, gk, gv), dq_ = _softmax_bwd_args(q, k, v, o, lse, dout)
    _lib.check(_pooled_cross_bwd(_ctx_for(ctx, dq_), _params(scale, softcap, False, None),
                                 _grid(grid, "grid"), _grid(ratio, "ratio"), *ptrs))
    return gq, gk, gv


def neighborhood_plan(grid, radius, block_q=64, block_k=64) -> Plan:
    """The plan of neighbourhood attention (attn_plan_neighborhood): the
    key blocks holding any visible pair, per query block (heads = 1)."""
    _need()
    g = _grid(grid, "grid")
    out = ctypes.c_void_p()
    _lib.check(_plan_nbhd(g, _grid(radius, "radius"), int(block_q), int(block_k),
                          ctypes.byref(out)))
    t = _extent(g)
    return Plan._adopt(out, t, t, block_q, block_k, 1)


def neighborhood_attention(q, k, v, grid, radius, *, plan=None, block=64, scale=None,
                           softcap=0.0, return_lse=False, ctx=None):
    """2-D / 3-D neighbourhood attention (CLEAR): self-attention on a grid in
    which query (f, y, x) sees the keys within `radius` on every axis
    (|f - f'| <= radius_f, |y - y'| <= radius_h, |x - x'| <= radius_w).

    q [B, F H W, H, D], k [B, F H W, Hk, D], v [B, F H W, Hk, Dv] ->
    o [B, F H W, H, Dv] (and lse [B, H, F H W] float32). plan: from
    neighborhood_plan(grid, radius, ...) (None: built here with block x block
    blocks; pass one to reuse it across calls).
    """
    _need()
    pq, oq, sq, dq, tq = _view(q, "q")
    pk, ok, sk, dk, _ = _view(k, "k")
    pv, ov, sv, dv, _ = _view(v, "v")
    if plan is None:
        plan = neighborhood_plan(grid, radius, block, block)
    o, po = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    lse, pl = _empty(tq, (sq[0], sq[2], sq[1]), F32) if return_lse else (None, None)
    _lib.check(_nbhd_fwd(_ctx_for(ctx, dq), _params(scale, softcap, False, None),
                         _grid(grid, "grid"), _grid(radius, "radius"), plan.ptr, pq, pk, pv, po,
                         pl))
    return (o, lse) if return_lse else o


def neighborhood_attention_backward(q, k, v, o, lse, dout, grid, radius, *, plan=None, block=64,
                                    scale=None, softcap=0.0, ctx=None):
    """Backward of neighborhood_attention (the same grid, radius and plan;
    lse from return_lse=True): dout [B, T, H, Dv] -> (dq, dk, dv)."""
    _need()
    ptrs, _keep, (gq, gk, gv), dq_ = _softmax_bwd_args(q, k, v, o, lse, dout)
    if plan is None:
        plan = neighborhood_plan(grid, radius, block, block)
    _lib.check(_nbhd_bwd(_ctx_for(ctx, dq_), _params(scale, softcap, False, None),
                         _grid(grid, "grid"), _grid(radius, "radius"), plan.ptr, *ptrs))
    return gq, gk, gv


def hilo_attention(q, k, v, grid, win, lo_heads, *, scale=None, softcap=0.0, return_lse=False,
                   ctx=None):
    """HiLo attention (LITv2), self-attention on a grid with H == Hk: the
    first H - lo_heads heads (Hi) attend within non-overlapping windows
    `win` (each divides its grid extent; at most 512 tokens); the last
    lo_heads heads (Lo) attend from every query to keys and values
    average-pooled by `win`.

    q [B, F H W, H, D], k [B, F H W, H, D], v [B, F H W, H, Dv] ->
    o [B, F H W, H, Dv] (and lse [B, H, F H W] float32, in the grid's token
    order: Hi heads over their window, Lo heads over the pooled keys).
    """
    _need_windows()
    pq, oq, sq, dq, tq = _view(q, "q")
    pk, ok, sk, dk, _ = _view(k, "k")
    pv, ov, sv, dv, _ = _view(v, "v")
    o, po = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    lse, pl = _empty(tq, (sq[0], sq[2], sq[1]), F32) if return_lse else (None, None)
    _lib.check(_hilo(_ctx_for(ctx, dq), _params(scale, softcap, False, None),
                     _grid(grid, "grid"), _grid(win, "win"), int(lo_heads), pq, pk, pv, po, pl))
    return (o, lse) if return_lse else o


def hilo_attention_backward(q, k, v, o, lse, dout, grid, win, lo_heads, *, scale=None,
                            softcap=0.0, ctx=None):
    """Backward of hilo_attention (the same grid, win and lo_heads; lse from
    return_lse=True): dout [B, T, H, Dv] -> (dq, dk, dv) shaped like q, k, v."""
    _need_windows()
    ptrs, _keep, (gq, gk, gv), dq_ = _softmax_bwd_args(q, k, v, o, lse, dout)
    _lib.check(_hilo_bwd(_ctx_for(ctx, dq_), _params(scale, softcap, False, None),
                         _grid(grid, "grid"), _grid(win, "win"), int(lo_heads), *ptrs))
    return gq, gk, gv


def global_context_attention(q, q_global, k, v, grid, win, *, scale=None, softcap=0.0,
                             return_lse=False, ctx=None):
    """Global Context ViT's attention on a grid cut into windows `win`.

    q, k [B, F H W, H, D], v [B, F H W, H, Dv] (H == Hk); q_global
    [B, wtok, H, D] with wtok = win_f win_h win_w: global query tokens shared
    by every window (row r queries position r of each window) ->
    (o_local, o_global), each [B, F H W, H, Dv]: each token's attention to
    the keys of its own window, by its own query and by the global query of
    its position in the window (and with return_lse=True, lse_local and
    lse_global [B, H, F H W] float32 after them).
    """
    _need_windows()
    pq, oq, sq, dq, tq = _view(q, "q")
    pg, og, _, _, _ = _view(q_global, "q_global")
    pk, ok, sk, dk, _ = _view(k, "k")
    pv, ov, sv, dv, _ = _view(v, "v")
    ol, pol = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    ogl, pog = _empty(tq, (sq[0], sq[1], sq[2], sv[3]), dq)
    if return_lse:
        (ll, pll), (lg, plg) = (_empty(tq, (sq[0], sq[2], sq[1]), F32) for _ in range(2))
    else:
        ll = pll = lg = plg = None
    _lib.check(_gc(_ctx_for(ctx, dq), _params(scale, softcap, False, None), _grid(grid, "grid"),
                   _grid(win, "win"), pq, pg, pk, pv, pol, pog, pll, plg))
    return (ol, ogl, ll, lg) if return_lse else (ol, ogl)


def global_context_attention_backward(q, q_global, k, v, o_local, o_global, lse_local,
                                      lse_global, dout_local, dout_global, grid, win, *,
                                      scale=None, softcap=0.0, ctx=None):
    """Backward of global_context_attention (outputs and LSEs from
    return_lse=True; dout_local, dout_global [B, T, H, Dv]) ->
    (dq, dq_global, dk, dv) shaped like q, q_global, k, v: dk and dv carry
    both branches, dq_global the sum over the windows."""
    _need_windows()
    args = (q, q_global, k, v, o_local, o_global, lse_local, lse_global, dout_local, dout_global)
    names = ("q", "q_global", "k", "v", "o_local", "o_global", "lse_local", "lse_global",
             "dout_local", "dout_global")
    views = [_view(x, n, (3,) if n.startswith("lse") else (4,)) for x, n in zip(args, names)]
    like_torch, dt = views[0][4], views[0][3]
    grads = [_empty(like_torch, views[i][2], views[i][3]) for i in range(4)]  # like q, qg, k, v
    _lib.check(_gc_bwd(_ctx_for(ctx, dt), _params(scale, softcap, False, None),
                       _grid(grid, "grid"), _grid(win, "win"), *(w[0] for w in views),
                       *(g[1] for g in grads)))
    return tuple(g[0] for g in grads)


def _permute_tokens(fn, x, idx, ctx):
    """gather_tokens and scatter_tokens: fn (attn_gather_tokens or
    attn_scatter_tokens) on x [B, T, heads, D] by idx (T entries)."""
    a = _int64_index(idx, "idx")
    px, ox, sx, dx, tx = _view(x, "x")
    if len(a) != sx[1]:
        raise ValueError(f"idx: expected {sx[1]} entries (x->shape[1]), got {len(a)}")
    o, po = _empty(tx, tuple(sx), dx)
    _lib.check(fn(_ctx_for(ctx, dx), a.ctypes.data, px, po))
    return o


def gather_tokens(x, idx, *, ctx=None):
    """out[:, t] = x[:, idx[t]]; idx a permutation of the T tokens (int64 [T]).
    x [B, T, heads, D] -> out [B, T, heads, D]."""
    _need()
    return _permute_tokens(_gather, x, idx, ctx)


def scatter_tokens(x, idx, *, ctx=None):
    """The inverse of gather_tokens: out[:, idx[t]] = x[:, t].
    x [B, T, heads, D] -> out [B, T, heads, D]."""
    _need()
    return _permute_tokens(_scatter, x, idx, ctx)


def grid_window_index(grid, win) -> np.ndarray:
    """Window-major order of a grid cut into windows `win`: int64 [F H W],
    the tokens of window 0 (row-major inside), then of window 1, ..."""
    _need()
    g = _grid(grid, "grid")
    idx = np.empty(max(_extent(g), 0), dtype=np.int64)
    _lib.check(_win_index(g, _grid(win, "win"), idx.ctypes.data))
    return idx


def grid_axis_index(grid, perm) -> np.ndarray:
    """The grid read with its axes in the order perm (a permutation of
    0 = f, 1 = h, 2 = w; e.g. (1, 2, 0) reads h, w, f): int64 [F H W]."""
    _need()
    g = _grid(grid, "grid")
    p = np.ascontiguousarray(perm, dtype=np.int32)
    if p.shape != (3,):
        raise ValueError(f"perm: expected 3 axes, got {tuple(perm)!r}")
    idx = np.empty(max(_extent(g), 0), dtype=np.int64)
    _lib.check(_axis_index(g, p.ctypes.data, idx.ctypes.data))
    return idx


def paro_choose(q, k, grid, *, block=64, keep=1, samples=16, scale=None, softcap=0.0, ctx=None):
    """PAROAttention's token order per head: for each of the six axis orders
    of the grid, `samples` evenly spaced query rows of the reordered sequence
    get their exact attention over all keys; the order whose rows put the
    most mass into their best `keep` key blocks of `block` tokens wins.

    q [1, F H W, H, D], k [1, F H W, Hk, D] -> perms int32 [H, 3] (pass a
    row to grid_axis_index, then gather_tokens). One sequence (B = 1).
    """
    _need()
    pq, oq, sq, dq, _ = _view(q, "q")
    pk, ok, sk, dk, _ = _view(k, "k")
    out = np.zeros((sq[2], 3), dtype=np.int32)
    _lib.check(_paro(_ctx_for(ctx, dq), _params(scale, softcap, False, None),
                     _grid(grid, "grid"), pq, pk, int(block), int(keep), int(samples),
                     out.ctypes.data))
    return out


__all__ = ["HAS_GRID", "HAS_POOLED_CROSS_BACKWARD", "HAS_WINDOW_BACKWARD", "grid_pool",
           "sra_attention", "sra_attention_backward", "pooled_cross_attention",
           "pooled_cross_attention_backward", "neighborhood_plan", "neighborhood_attention",
           "neighborhood_attention_backward", "hilo_attention", "hilo_attention_backward",
           "global_context_attention", "global_context_attention_backward",
           "gather_tokens", "scatter_tokens", "grid_window_index", "grid_axis_index",
           "paro_choose"]
