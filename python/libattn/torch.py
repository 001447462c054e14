"""PyTorch integration: autograd and torch.compile.

    import torch, libattn.torch as lat
    q = torch.randn(1, 128, 8, 64, requires_grad=True)     # [B, N, H, D]
    o = lat.attention(q, q, q, causal=True)                 # [B, N, H, D]
    o.sum().backward()                                      # C backward

Every mechanism with a C backward is a pair of torch.library custom ops
with fake (meta) implementations and the forward's autograd registered to
the backward op, so it traces under torch.compile (fullgraph=True):

    libattn::attention_fwd (q, k, v, ...) -> (o [B, N, H, Dv], lse [B, H, N] f32)
    libattn::attention_bwd (q, k, v, o, lse, dout, ...) -> (dq, dk, dv)
    libattn::<name>_fwd, libattn::<name>_bwd (tensor inputs, [outputs,] dout,
        other inputs) -> [one gradient per tensor input], for <name> in
        linear_attention, gla_attention, ssd, mamba_scan, sra_attention,
        pooled_cross_attention, neighborhood_attention, hilo_attention,
        global_context_attention, lightnet_attention, rfa_attention,
        wersa_attention, lla_attention (built by _torchop.CustomOp; grids,
        ratios, windows and radii are int[], a None optional tensor's
        gradient an empty tensor; global_context_attention's backward takes
        a gradient per output)
    libattn::catanet_attention_fwd (q, k, v, feats, centres, scale) ->
        (o_intra, o_inter, lse_intra, lse_inter), libattn::catanet_attention_bwd
        (..., the four outputs, dout_intra, dout_inter, scale) -> (dq, dk, dv):
        two differentiable outputs, written out as attention's are

Each public function (`attention`, `linear_attention`, ...) applies a
torch.autograd.Function making the same C calls in eager mode (no
dispatcher, ~20 us less a call) and the forward op under torch.compile.
Tensors must be on the CPU; float64 runs on the reference backend (for
gradcheck). LSE is not differentiable (its gradient is ignored).

Eager only (a graph break under torch.compile), because an argument is
not a tensor or scalar that an op can take:
- attention with a plan, and neighborhood_attention with a plan: a
  libattn.Plan is a C object (neighborhood_attention without one builds
  the plan of (grid, radius, block) inside the op, cached);
- rfa_attention and wersa_attention with a ctx: a Context (it holds the
  seed of the random features) is a C object; the default context is fine;
- nsa_attention: its forward keeps the selection (a C plan made by
  attn_nsa_select) and each branch's output and LSE for the backward; as
  an op the selection would have to be returned as tensors and a plan
  rebuilt from them in the backward, or selected again there.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from . import _grid, _linmech, _ops, _ssm, _tokens
from ._torchop import CustomOp
from .plan import Plan

Tensor = torch.Tensor

_LIB = "libattn"


def _float(x):
    return None if x is None else float(x)


def _int(x):
    return None if x is None else int(x)


def _ints(t):
    return [int(x) for x in t]


@torch.library.custom_op(f"{_LIB}::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float,
                  causal: bool, window_left: int, window_right: int) -> Tuple[Tensor, Tensor]:
    """q [B, N, H, D], k [B, M, Hk, D], v [B, M, Hk, Dv] -> (o [B, N, H, Dv], lse [B, H, N])."""
    return _ops.attention(q, k, v, causal=causal, scale=scale or None, softcap=softcap,
                          window=(window_left, window_right), return_lse=True)


@attention_fwd.register_fake
def _(q, k, v, scale, softcap, causal, window_left, window_right):
    B, N, H, _ = q.shape
    o = q.new_empty((B, N, H, v.shape[3]))
    lse = q.new_empty((B, H, N), dtype=torch.float32)
    return o, lse


@torch.library.custom_op(f"{_LIB}::attention_bwd", mutates_args=())
def attention_bwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dout: Tensor,
                  scale: float, softcap: float, causal: bool, window_left: int,
                  window_right: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of attention_fwd, shaped like q, k, v."""
    return _ops.attention_backward(q, k, v, o, lse, dout, causal=causal, scale=scale or None,
                                   softcap=softcap, window=(window_left, window_right))


@attention_bwd.register_fake
def _(q, k, v, o, lse, dout, scale, softcap, causal, window_left, window_right):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, softcap, causal, wl, wr = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.args = (scale, softcap, causal, wl, wr)


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(q, k, v, o, lse, do.contiguous(), *ctx.args)
    return dq, dk, dv, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class AttentionFunction(torch.autograd.Function):
    """torch.autograd.Function: forward attn_forward, backward attn_backward
    (the C backward, which recomputes P from LSE); the same calls as the
    custom ops libattn::attention_fwd / attention_bwd, without the dispatcher."""

    @staticmethod
    def forward(q, k, v, scale, softcap, causal, window_left, window_right):
        # eager: the ctypes call itself (the custom op would add PyTorch's
        # dispatcher, ~20 us); under torch.compile attention() uses the op
        return _ops.attention(q, k, v, causal=causal, scale=scale or None, softcap=softcap,
                              window=(window_left, window_right), return_lse=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        scale, softcap, causal, wl, wr = ctx.args
        dq, dk, dv = _ops.attention_backward(q, k, v, o, lse, do, causal=causal,
                                             scale=scale or None, softcap=softcap,
                                             window=(wl, wr))
        return dq, dk, dv, None, None, None, None, None


class PlannedAttentionFunction(torch.autograd.Function):
    """Attention over a block plan (libattn.Plan), forward and C backward
    (eager mode only: a plan is not a tensor, so this is not a custom op)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, softcap, causal, wl, wr):
        kw = dict(causal=causal, scale=scale or None, softcap=softcap, window=(wl, wr), plan=plan)
        o, lse = _ops.attention(q, k, v, return_lse=True, **kw)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.kw = kw
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _ops.attention_backward(q, k, v, o, lse, do, **ctx.kw)
        return dq, dk, dv, None, None, None, None, None, None


def _o_like_qv(q, k, v, *_):
    """Fake output [B, T, H, Dv] in q's dtype (q [B, T, H, D], v [B, M, Hk, Dv])."""
    return q.new_empty((*q.shape[:3], v.shape[3]))


def _o_lse(q, k, v, *_):
    """Fake (o [B, N, H, Dv], lse [B, H, N] float32)."""
    B, N, H, _ = q.shape
    return _o_like_qv(q, k, v), q.new_empty((B, H, N), dtype=torch.float32)


def _like_x(x, *_):
    return x.new_empty(x.shape)


_linear = CustomOp(
    "linear_attention", "Tensor q, Tensor k, Tensor v, float? scale, bool causal",
    lambda q, k, v, scale, causal: _ops.linear_attention(q, k, v, causal=causal, scale=scale),
    lambda q, k, v, do, scale, causal: _ops.linear_attention_backward(q, k, v, do, causal=causal,
                                                                      scale=scale),
    _o_like_qv, name="LinearAttentionFunction",
    doc="""Linear-time attention without gate and state (libattn.linear_attention),
    forward attn_linear_forward, backward attn_linear_backward.""")
LinearAttentionFunction = _linear.function


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                     scale: Optional[float] = None) -> Tensor:
    """Differentiable linear-time attention: o_t = scale q_t S_t with
    S_t = sum_{j<=t} k_j^T v_j (all j when not causal). q [B, T, H, D],
    k [B, T, Hk, D], v [B, T, Hk, Dv] -> o [B, T, H, Dv]; float64 on the
    reference backend (gradcheck)."""
    return _linear(q, k, v, _float(scale), bool(causal))


_gla = CustomOp(
    "gla_attention", "Tensor q, Tensor k, Tensor v, Tensor g, float? scale",
    lambda q, k, v, g, scale: _ssm.gla_attention(q, k, v, g, scale=scale),
    lambda q, k, v, g, do, scale: _ssm.gla_attention_backward(q, k, v, g, do, scale=scale),
    _o_like_qv, name="GLAFunction",
    doc="""Gated Linear Attention (libattn.gla_attention, no state), forward
    attn_linear_forward with gate KEY or HEAD_TOKEN, backward
    attn_linear_backward (gradients for q, k, v and the log gate g).""")
GLAFunction = _gla.function


def gla_attention(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *,
                  scale: Optional[float] = None) -> Tensor:
    """Differentiable Gated Linear Attention (causal): g the log gate,
    [B, T, H, D] per key dim or [B, T, H] per head and token; shapes as
    libattn.gla_attention. float64 on the reference backend (gradcheck)."""
    return _gla(q, k, v, g, _float(scale))


def _scan_backward(backward):
    """(x, dt, a, bm, cm, dskip, dy) -> 6 gradients (None for dskip None)."""
    def grads(x, dt, a, bm, cm, dskip, dy):
        g = backward(x, dt, a, bm, cm, dy, dskip)
        return g if dskip is not None else g + (None,)
    return grads


_SCAN_ARGS = "Tensor x, Tensor dt, Tensor a, Tensor bm, Tensor cm, Tensor? dskip"
_ssd = CustomOp(
    "ssd", _SCAN_ARGS, _ssm.ssd, _scan_backward(_ssm.ssd_backward), _like_x,
    name="SSDFunction",
    doc="""Mamba-2 SSD (libattn.ssd, no state), forward attn_ssd_forward,
    backward attn_ssd_backward (gradients for x, dt, A, B, C and Dskip).""")
SSDFunction = _ssd.function


def ssd(x: Tensor, dt: Tensor, a: Tensor, bm: Tensor, cm: Tensor,
        dskip: Optional[Tensor] = None) -> Tensor:
    """Differentiable Mamba-2 SSD; shapes as libattn.ssd."""
    return _ssd(x, dt, a, bm, cm, dskip)


_mamba = CustomOp(
    "mamba_scan", _SCAN_ARGS, _ssm.mamba_scan, _scan_backward(_ssm.mamba_scan_backward),
    _like_x, name="MambaScanFunction",
    doc="""The Mamba selective scan (libattn.mamba_scan, no state), forward
    attn_mamba_scan, backward attn_mamba_scan_backward.""")
MambaScanFunction = _mamba.function


def mamba_scan(x: Tensor, delta: Tensor, a: Tensor, bm: Tensor, cm: Tensor,
               dskip: Optional[Tensor] = None) -> Tensor:
    """Differentiable Mamba selective scan; shapes as libattn.mamba_scan."""
    return _mamba(x, delta, a, bm, cm, dskip)


_sra = CustomOp(
    "sra_attention",
    "Tensor q, Tensor k, Tensor v, int[] grid, int[] ratio, float? scale, float softcap",
    lambda q, k, v, grid, ratio, scale, softcap: _grid.sra_attention(
        q, k, v, grid, ratio, scale=scale, softcap=softcap, return_lse=True),
    lambda q, k, v, o, lse, do, grid, ratio, scale, softcap: _grid.sra_attention_backward(
        q, k, v, o, lse, do, grid, ratio, scale=scale, softcap=softcap),
    _o_lse, outputs=2, name="SRAFunction",
    doc="""Spatial-reduction attention (libattn.sra_attention), forward
    attn_sra_forward, backward attn_sra_backward.""")
SRAFunction = _sra.function


def sra_attention(q: Tensor, k: Tensor, v: Tensor, grid, ratio, *,
                  scale: Optional[float] = None, softcap: float = 0.0) -> Tensor:
    """Differentiable spatial-reduction attention; as libattn.sra_attention."""
    return _sra(q, k, v, _ints(grid), _ints(ratio), _float(scale), float(softcap))


def _pooled_o_lse(q, k, v, grid, ratio, *_):
    """Fake (o [B, P, H, Dv], lse [B, H, P] float32), P the pooled query count."""
    g, r = ([1] * (3 - len(x)) + list(x) for x in (grid, ratio))
    P = (g[0] // r[0]) * (g[1] // r[1]) * (g[2] // r[2])
    B, _, H, _ = q.shape
    return q.new_empty((B, P, H, v.shape[3])), q.new_empty((B, H, P), dtype=torch.float32)


_pooled_cross = CustomOp(
    "pooled_cross_attention",
    "Tensor q, Tensor k, Tensor v, int[] grid, int[] ratio, float? scale, float softcap",
    lambda q, k, v, grid, ratio, scale, softcap: _grid.pooled_cross_attention(
        q, k, v, grid, ratio, scale=scale, softcap=softcap, return_lse=True),
    lambda q, k, v, o, lse, do, grid, ratio, scale, softcap:
        _grid.pooled_cross_attention_backward(q, k, v, o, lse, do, grid, ratio, scale=scale,
                                              softcap=softcap),
    _pooled_o_lse, outputs=2, name="PooledCrossFunction",
    doc="""CrossLMM's pooled cross-attention (libattn.pooled_cross_attention),
    forward attn_pooled_cross_forward, backward attn_pooled_cross_backward.""")
PooledCrossFunction = _pooled_cross.function


def pooled_cross_attention(q: Tensor, k: Tensor, v: Tensor, grid, ratio, *,
                           scale: Optional[float] = None, softcap: float = 0.0) -> Tensor:
    """Differentiable pooled cross-attention (CrossLMM); as
    libattn.pooled_cross_attention: o [B, P, H, Dv] for the P pooled queries."""
    return _pooled_cross(q, k, v, _ints(grid), _ints(ratio), _float(scale), float(softcap))


@functools.lru_cache(maxsize=16)
def _neighborhood_plan(grid, radius, block):
    return _grid.neighborhood_plan(grid, radius, block, block)


def _nbhd_plan(grid, radius, plan):
    """plan: a libattn.Plan, or an int (block: the plan built once and cached)."""
    if isinstance(plan, Plan):
        return plan
    return _neighborhood_plan(tuple(_ints(grid)), tuple(_ints(radius)), int(plan))


_nbhd = CustomOp(
    "neighborhood_attention",
    "Tensor q, Tensor k, Tensor v, int[] grid, int[] radius, int block, float? scale, "
    "float softcap",
    lambda q, k, v, grid, radius, plan, scale, softcap: _grid.neighborhood_attention(
        q, k, v, grid, radius, plan=_nbhd_plan(grid, radius, plan), scale=scale,
        softcap=softcap, return_lse=True),
    lambda q, k, v, o, lse, do, grid, radius, plan, scale, softcap:
        _grid.neighborhood_attention_backward(q, k, v, o, lse, do, grid, radius,
                                              plan=_nbhd_plan(grid, radius, plan), scale=scale,
                                              softcap=softcap),
    _o_lse, outputs=2, name="NeighborhoodFunction",
    doc="""Neighbourhood attention (libattn.neighborhood_attention), forward
    attn_neighborhood_forward, backward attn_neighborhood_backward; the
    plan argument a libattn.Plan, or a block size (the plan built and
    cached; the custom op's form).""")
NeighborhoodFunction = _nbhd.function


def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, grid, radius, *, plan=None,
                           block: int = 64, scale: Optional[float] = None,
                           softcap: float = 0.0) -> Tensor:
    """Differentiable neighbourhood attention; as libattn.neighborhood_attention.
    Without a plan, the one of (grid, radius, block) is built once and
    cached (and the op works under torch.compile); with a plan, eager."""
    args = (_float(scale), float(softcap))
    if plan is not None:
        return NeighborhoodFunction.apply(q, k, v, _ints(grid), _ints(radius), plan, *args)
    return _nbhd(q, k, v, _ints(grid), _ints(radius), int(block), *args)


_hilo = CustomOp(
    "hilo_attention",
    "Tensor q, Tensor k, Tensor v, int[] grid, int[] win, int lo_heads, float? scale, "
    "float softcap",
    lambda q, k, v, grid, win, lo_heads, scale, softcap: _grid.hilo_attention(
        q, k, v, grid, win, lo_heads, scale=scale, softcap=softcap, return_lse=True),
    lambda q, k, v, o, lse, do, grid, win, lo_heads, scale, softcap:
        _grid.hilo_attention_backward(q, k, v, o, lse, do, grid, win, lo_heads, scale=scale,
                                      softcap=softcap),
    _o_lse, outputs=2, name="HiLoFunction",
    doc="""HiLo attention (libattn.hilo_attention), forward attn_hilo_forward,
    backward attn_hilo_backward.""")
HiLoFunction = _hilo.function


def hilo_attention(q: Tensor, k: Tensor, v: Tensor, grid, win, lo_heads: int, *,
                   scale: Optional[float] = None, softcap: float = 0.0) -> Tensor:
    """Differentiable HiLo attention; as libattn.hilo_attention."""
    return _hilo(q, k, v, _ints(grid), _ints(win), int(lo_heads), _float(scale), float(softcap))


def _gc_fake(q, q_global, k, v, *_):
    """Fake (o_local, o_global [B, T, H, Dv], lse_local, lse_global [B, H, T] f32)."""
    o, lse = _o_lse(q, k, v)
    return o, _o_like_qv(q, k, v), lse, torch.empty_like(lse)


_gc = CustomOp(
    "global_context_attention",
    "Tensor q, Tensor q_global, Tensor k, Tensor v, int[] grid, int[] win, float? scale, "
    "float softcap",
    lambda q, qg, k, v, grid, win, scale, softcap: _grid.global_context_attention(
        q, qg, k, v, grid, win, scale=scale, softcap=softcap, return_lse=True),
    lambda q, qg, k, v, ol, og, ll, lg, dl, dg, grid, win, scale, softcap:
        _grid.global_context_attention_backward(q, qg, k, v, ol, og, ll, lg, dl, dg, grid, win,
                                                scale=scale, softcap=softcap),
    _gc_fake, outputs=4, grads=2, name="GlobalContextFunction",
    doc="""Global Context ViT's attention (libattn.global_context_attention),
    forward attn_global_context_forward, backward
    attn_global_context_backward; both outputs differentiable.""")
GlobalContextFunction = _gc.function


def global_context_attention(q: Tensor, q_global: Tensor, k: Tensor, v: Tensor, grid, win, *,
                             scale: Optional[float] = None,
                             softcap: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Differentiable Global Context attention (gradients for q, q_global,
    k, v); as libattn.global_context_attention -> (o_local, o_global)."""
    return _gc(q, q_global, k, v, _ints(grid), _ints(win), _float(scale), float(softcap))


_lightnet = CustomOp(
    "lightnet_attention", "Tensor q, Tensor k, Tensor v, float? scale",
    lambda q, k, v, scale: _linmech.lightnet_attention(q, k, v, scale=scale),
    lambda q, k, v, do, scale: _linmech.lightnet_attention_backward(q, k, v, do, scale=scale),
    _o_like_qv, name="LightNetFunction",
    doc="""LightNet (libattn.lightnet_attention), forward attn_lightnet_forward,
    backward attn_lightnet_backward.""")
LightNetFunction = _lightnet.function


def lightnet_attention(q: Tensor, k: Tensor, v: Tensor, *,
                       scale: Optional[float] = None) -> Tensor:
    """Differentiable LightNet (causal); shapes as libattn.lightnet_attention."""
    return _lightnet(q, k, v, _float(scale))


_rfa = CustomOp(
    "rfa_attention", "Tensor q, Tensor k, Tensor v, int? features, bool causal",
    lambda q, k, v, features, causal, actx=None: _linmech.rfa_attention(
        q, k, v, features=features, causal=causal, ctx=actx),
    lambda q, k, v, do, features, causal, actx=None: _linmech.rfa_attention_backward(
        q, k, v, do, features=features, causal=causal, ctx=actx),
    _o_like_qv, name="RFAFunction",
    doc="""Random-feature attention (libattn.rfa_attention), forward
    attn_rfa_forward, backward attn_rfa_backward on the same context (the
    same features).""")
RFAFunction = _rfa.function


def rfa_attention(q: Tensor, k: Tensor, v: Tensor, *, features: Optional[int] = None,
                  causal: bool = True, ctx=None) -> Tensor:
    """Differentiable random-feature attention; as libattn.rfa_attention
    (with a ctx, eager only: a Context is not an op argument)."""
    args = (q, k, v, _int(features), bool(causal))
    return _rfa(*args) if ctx is None else RFAFunction.apply(*args, ctx)


def _wersa_backward(q, k, v, w, do, features, causal, actx=None):
    dq, dk, dv, dw = _linmech.wersa_attention_backward(q, k, v, do, w, features=features,
                                                       causal=causal, ctx=actx)
    return dq, dk, dv, dw.to(w.dtype)


_wersa = CustomOp(
    "wersa_attention", "Tensor q, Tensor k, Tensor v, Tensor weights, int? features, bool causal",
    lambda q, k, v, w, features, causal, actx=None: _linmech.wersa_attention(
        q, k, v, w, features=features, causal=causal, ctx=actx),
    _wersa_backward, _o_like_qv, name="WERSAFunction",
    doc="""WERSA (libattn.wersa_attention), forward attn_wersa_forward, backward
    attn_wersa_backward (gradients for q, k, v and the level weights).""")
WERSAFunction = _wersa.function


def wersa_attention(q: Tensor, k: Tensor, v: Tensor, weights: Optional[Tensor] = None, *,
                    levels: int = 3, features: Optional[int] = None, causal: bool = True,
                    ctx=None) -> Tensor:
    """Differentiable WERSA; as libattn.wersa_attention. weights: a tensor of
    levels + 1 (float32, float64 with float64 inputs; default ones), which
    gets a gradient when it requires one. With a ctx, eager only."""
    if weights is None:
        weights = torch.ones(levels + 1, dtype=torch.float64 if q.dtype == torch.float64
                             else torch.float32)
    args = (q, k, v, weights, _int(features), bool(causal))
    return _wersa(*args) if ctx is None else WERSAFunction.apply(*args, ctx)


_lla = CustomOp(
    "lla_attention", "Tensor q, Tensor k, Tensor v, float lam, bool causal, float? scale",
    lambda q, k, v, lam, causal, scale: _linmech.lla_attention(q, k, v, lam=lam, causal=causal,
                                                               scale=scale),
    lambda q, k, v, do, lam, causal, scale: _linmech.lla_attention_backward(
        q, k, v, do, lam=lam, causal=causal, scale=scale),
    _o_like_qv, name="LLAFunction",
    doc="""Local Linear Attention (libattn.lla_attention), forward
    attn_lla_forward, backward attn_lla_backward (where the library has it).""")
LLAFunction = _lla.function


def lla_attention(q: Tensor, k: Tensor, v: Tensor, *, lam: float = 0.1, causal: bool = True,
                  scale: Optional[float] = None) -> Tensor:
    """Local Linear Attention with autograd (the backward needs
    attn_lla_backward in the library: NotImplementedError otherwise, when
    the gradient is asked for); as libattn.lla_attention."""
    return _lla(q, k, v, float(lam), bool(causal), _float(scale))


@torch.library.custom_op(f"{_LIB}::catanet_attention_fwd", mutates_args=())
def catanet_attention_fwd(q: Tensor, k: Tensor, v: Tensor, feats: Tensor, centres: Tensor,
                          scale: Optional[float]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (o_intra, o_inter [1, N, H, Dv], lse_intra, lse_inter [1, H, N] f32)."""
    return _tokens.catanet_attention(q, k, v, feats, centres, scale=scale, return_lse=True)


@catanet_attention_fwd.register_fake
def _(q, k, v, feats, centres, scale):
    o = _o_like_qv(q, k, v)
    lse = q.new_empty((1, q.shape[2], q.shape[1]), dtype=torch.float32)
    return o, o.new_empty(o.shape), lse, lse.new_empty(lse.shape)


@torch.library.custom_op(f"{_LIB}::catanet_attention_bwd", mutates_args=())
def catanet_attention_bwd(q: Tensor, k: Tensor, v: Tensor, feats: Tensor, centres: Tensor,
                          o_intra: Tensor, o_inter: Tensor, lse_intra: Tensor,
                          lse_inter: Tensor, dout_intra: Tensor, dout_inter: Tensor,
                          scale: Optional[float]) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of catanet_attention_fwd, shaped like q, k, v."""
    return _tokens.catanet_attention_backward(q, k, v, feats, centres, o_intra, o_inter,
                                              lse_intra, lse_inter, dout_intra, dout_inter,
                                              scale=scale)


@catanet_attention_bwd.register_fake
def _(q, k, v, *_):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _catanet_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], *output)
    ctx.scale = inputs[5]


def _catanet_grads(ctx, doi, dox, backward):
    """dq, dk, dv from the saved tensors; none for feats, centres (the
    groups are held fixed) and scale."""
    dq, dk, dv = backward(*ctx.saved_tensors, doi.contiguous(), dox.contiguous(), ctx.scale)
    return dq, dk, dv, None, None, None


catanet_attention_fwd.register_autograd(
    lambda ctx, doi, dox, dli, dlx: _catanet_grads(ctx, doi, dox, catanet_attention_bwd),
    setup_context=_catanet_setup)


class CATANetFunction(torch.autograd.Function):
    """CATANet's aggregation (libattn.catanet_attention): forward
    attn_catanet_forward with both LSEs, backward attn_catanet_backward;
    the same calls as the custom ops libattn::catanet_attention_fwd / _bwd,
    without the dispatcher. The grouping is a discrete choice, held fixed
    (no gradient for feats and centres)."""

    @staticmethod
    def forward(q, k, v, feats, centres, scale):
        return _tokens.catanet_attention(q, k, v, feats, centres, scale=scale, return_lse=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _catanet_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[2], output[3])

    @staticmethod
    def backward(ctx, doi, dox, dli, dlx):
        return _catanet_grads(ctx, doi, dox, lambda *a: _tokens.catanet_attention_backward(
            *a[:-1], scale=a[-1]))


def catanet_attention(q: Tensor, k: Tensor, v: Tensor, feats: Tensor, centres: Tensor, *,
                      scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Differentiable CATANet aggregation of one sequence; as
    libattn.catanet_attention: (o_intra, o_inter), gradients for q, k, v."""
    args = (q, k, v, feats, centres, _float(scale))
    if torch.compiler.is_compiling():
        oi, ox, _, _ = catanet_attention_fwd(*args)
    else:
        oi, ox, _, _ = CATANetFunction.apply(*args)
    return oi, ox


class NSAFunction(torch.autograd.Function):
    """Native Sparse Attention of one sequence (libattn.nsa_attention):
    forward attn_nsa_compress / attn_nsa_select / attn_nsa_forward keeping
    each branch's output and LSE; backward attn_nsa_backward, then
    attn_nsa_compress_backward. The selection is a discrete choice, held
    fixed (no gradient), as in the paper."""

    @staticmethod
    def forward(ctx, q, k, v, gates, kw):
        from ._nsa import _forward_saved

        o, s = _forward_saved(q, k, v, gates, **kw)
        ctx.save_for_backward(q, k, v)
        ctx.s, ctx.actx = s, kw["ctx"]
        return o

    @staticmethod
    def backward(ctx, do):
        from ._nsa import _backward_saved

        q, k, v = ctx.saved_tensors
        dq, dk, dv, dg = _backward_saved(q, k, v, ctx.s, do.contiguous(), ctx.actx)
        return dq, dk.to(k.dtype), dv.to(v.dtype), dg, None


def nsa_attention(q: Tensor, k: Tensor, v: Tensor, gates: Optional[Tensor] = None, *,
                  cmp_block: int = 32, cmp_stride: int = 16, sel_block: int = 64,
                  sel_count: int = 16, query_block: int = 64, window: int = 512,
                  scale: Optional[float] = None, softcap: float = 0.0, ctx=None) -> Tensor:
    """Differentiable Native Sparse Attention (gradients for q, k, v and the
    gates); arguments as libattn.nsa_attention. Sequences of a batch run in
    turn (torch.cat of the per-sequence outputs)."""
    kw = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block,
              sel_count=sel_count, query_block=query_block, window=window, scale=scale,
              softcap=softcap, ctx=ctx)
    if gates is None:
        gates = torch.full(q.shape[:3] + (3,), 1 / 3,
                           dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    outs = [NSAFunction.apply(q[b:b + 1], k[b:b + 1], v[b:b + 1], gates[b:b + 1], kw)
            for b in range(q.shape[0])]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
              scale: Optional[float] = None, softcap: float = 0.0,
              window: Optional[Tuple[int, int]] = None, return_lse: bool = False,
              plan=None):
    """Differentiable exact attention (autograd through the C backward).

    q [B, N, H, D], k [B, M, Hk, D], v [B, M, Hk, Dv] (3-d [N, H, D] means
    B = 1) -> o [B, N, H, Dv] (and lse [B, H, N] float32, not
    differentiable). Arguments as libattn.attention. Works under
    torch.compile (the ops are torch.library custom ops), except with a
    plan (a libattn.Plan: eager autograd through PlannedAttentionFunction).
    """
    was3 = q.dim() == 3
    if was3:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    wl, wr = (-1, -1) if window is None else window
    args = (q, k, v, float(scale or 0.0), float(softcap), bool(causal), int(wl), int(wr))
    if plan is not None:
        o, lse = PlannedAttentionFunction.apply(q, k, v, plan, *args[3:])
    elif torch.compiler.is_compiling():
        # Dynamo traces the custom op (autograd registered) rather than the
        # Function, which it refuses when one tensor is passed twice.
        o, lse = attention_fwd(*args)
    else:
        o, lse = AttentionFunction.apply(*args)
    if was3:
        o, lse = o.squeeze(0), lse.squeeze(0)
    return (o, lse) if return_lse else o


def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask=None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention on the
    CPU, layout [B, H, N, D] (a transposed view is passed to libattn, no
    copy). attn_mask and dropout are not supported (ValueError)."""
    if attn_mask is not None or dropout_p:
        raise ValueError("libattn.torch.sdpa: attn_mask and dropout are not supported")
    o = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                  causal=is_causal, scale=scale)
    return o.transpose(1, 2)


__all__ = ["attention", "attention_fwd", "attention_bwd", "AttentionFunction",
           "PlannedAttentionFunction", "LinearAttentionFunction", "linear_attention", "sdpa",
           "GLAFunction", "gla_attention", "SSDFunction", "ssd", "MambaScanFunction",
           "mamba_scan", "SRAFunction", "sra_attention", "PooledCrossFunction",
           "pooled_cross_attention", "CATANetFunction", "catanet_attention",
           "catanet_attention_fwd", "catanet_attention_bwd", "NeighborhoodFunction",
           "neighborhood_attention", "HiLoFunction", "hilo_attention", "GlobalContextFunction",
           "global_context_attention", "LightNetFunction", "lightnet_attention", "RFAFunction",
           "rfa_attention", "WERSAFunction", "wersa_attention", "LLAFunction", "lla_attention",
           "NSAFunction", "nsa_attention"]
