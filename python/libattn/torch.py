"""PyTorch integration: autograd and torch.compile.

    import torch, libattn.torch as lat
    q = torch.randn(1, 128, 8, 64, requires_grad=True)     # [B, N, H, D]
    o = lat.attention(q, q, q, causal=True)                 # [B, N, H, D]
    o.sum().backward()                                      # C backward

Two custom ops are registered with torch.library: libattn::attention_fwd
(q, k, v, ...) -> (o [B, N, H, Dv], lse [B, H, N] f32) and
libattn::attention_bwd (q, k, v, o, lse, dout, ...) -> (dq, dk, dv), each
with a fake (meta) implementation, so they trace under torch.compile; the
forward op has its autograd registered (register_autograd) to the backward
op. `attention` applies a torch.autograd.Function making the same C calls
(in eager mode) or the forward op itself (under torch.compile). Tensors must
be on the CPU; float64 runs on the reference backend (for gradcheck). LSE
is not differentiable (its gradient is ignored).

Eager autograd (torch.autograd.Function over the C forward and backward)
also for gla_attention, ssd, mamba_scan, sra_attention,
neighborhood_attention, lightnet_attention, rfa_attention,
wersa_attention, nsa_attention (and lla_attention where the library has
attn_lla_backward).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _ops

Tensor = torch.Tensor

_LIB = "libattn"


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


class LinearAttentionFunction(torch.autograd.Function):
    """Linear-time attention without gate and state (libattn.linear_attention),
    forward attn_linear_forward, backward attn_linear_backward (eager)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal):
        ctx.save_for_backward(q, k, v)
        ctx.args = (scale, causal)
        return _ops.linear_attention(q, k, v, causal=causal, scale=scale)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        scale, causal = ctx.args
        dq, dk, dv = _ops.linear_attention_backward(q, k, v, do, causal=causal, scale=scale)
        return dq, dk, dv, None, None


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                     scale: Optional[float] = None) -> Tensor:
    """Differentiable linear-time attention: o_t = scale q_t S_t with
    S_t = sum_{j<=t} k_j^T v_j (all j when not causal). q [B, T, H, D],
    k [B, T, Hk, D], v [B, T, Hk, Dv] -> o [B, T, H, Dv]; float64 on the
    reference backend (gradcheck)."""
    return LinearAttentionFunction.apply(q, k, v, scale, bool(causal))


class GLAFunction(torch.autograd.Function):
    """Gated Linear Attention (libattn.gla_attention, no state), forward
    attn_linear_forward with gate KEY or HEAD_TOKEN, backward
    attn_linear_backward (gradients for q, k, v and the log gate g)."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale):
        from ._ssm import gla_attention

        ctx.save_for_backward(q, k, v, g)
        ctx.scale = scale
        return gla_attention(q, k, v, g, scale=scale)

    @staticmethod
    def backward(ctx, do):
        from ._ssm import gla_attention_backward

        q, k, v, g = ctx.saved_tensors
        dq, dk, dv, dg = gla_attention_backward(q, k, v, g, do, scale=ctx.scale)
        return dq, dk, dv, dg, None


def gla_attention(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *,
                  scale: Optional[float] = None) -> Tensor:
    """Differentiable Gated Linear Attention (causal): g the log gate,
    [B, T, H, D] per key dim or [B, T, H] per head and token; shapes as
    libattn.gla_attention. float64 on the reference backend (gradcheck)."""
    return GLAFunction.apply(q, k, v, g, scale)


class SSDFunction(torch.autograd.Function):
    """Mamba-2 SSD (libattn.ssd, no state), forward attn_ssd_forward,
    backward attn_ssd_backward (gradients for x, dt, A, B, C and Dskip)."""

    @staticmethod
    def forward(ctx, x, dt, a, bm, cm, dskip):
        from ._ssm import ssd

        ctx.save_for_backward(x, dt, a, bm, cm, dskip)
        return ssd(x, dt, a, bm, cm, dskip)

    @staticmethod
    def backward(ctx, dy):
        from ._ssm import ssd_backward

        x, dt, a, bm, cm, dskip = ctx.saved_tensors
        g = ssd_backward(x, dt, a, bm, cm, dy.contiguous(), dskip)
        return g if dskip is not None else g + (None,)


def ssd(x: Tensor, dt: Tensor, a: Tensor, bm: Tensor, cm: Tensor,
        dskip: Optional[Tensor] = None) -> Tensor:
    """Differentiable Mamba-2 SSD; shapes as libattn.ssd."""
    return SSDFunction.apply(x, dt, a, bm, cm, dskip)


class MambaScanFunction(torch.autograd.Function):
    """The Mamba selective scan (libattn.mamba_scan, no state), forward
    attn_mamba_scan, backward attn_mamba_scan_backward."""

    @staticmethod
    def forward(ctx, x, delta, a, bm, cm, dskip):
        from ._ssm import mamba_scan

        ctx.save_for_backward(x, delta, a, bm, cm, dskip)
        return mamba_scan(x, delta, a, bm, cm, dskip)

    @staticmethod
    def backward(ctx, dy):
        from ._ssm import mamba_scan_backward

        x, delta, a, bm, cm, dskip = ctx.saved_tensors
        g = mamba_scan_backward(x, delta, a, bm, cm, dy.contiguous(), dskip)
        return g if dskip is not None else g + (None,)


def mamba_scan(x: Tensor, delta: Tensor, a: Tensor, bm: Tensor, cm: Tensor,
               dskip: Optional[Tensor] = None) -> Tensor:
    """Differentiable Mamba selective scan; shapes as libattn.mamba_scan."""
    return MambaScanFunction.apply(x, delta, a, bm, cm, dskip)


class SRAFunction(torch.autograd.Function):
    """Spatial-reduction attention (libattn.sra_attention), forward
    attn_sra_forward, backward attn_sra_backward."""

    @staticmethod
    def forward(ctx, q, k, v, grid, ratio, scale, softcap):
        from ._grid import sra_attention

        o, lse = sra_attention(q, k, v, grid, ratio, scale=scale, softcap=softcap,
                               return_lse=True)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (grid, ratio, scale, softcap)
        return o

    @staticmethod
    def backward(ctx, do):
        from ._grid import sra_attention_backward

        q, k, v, o, lse = ctx.saved_tensors
        grid, ratio, scale, softcap = ctx.args
        dq, dk, dv = sra_attention_backward(q, k, v, o, lse, do, grid, ratio, scale=scale,
                                            softcap=softcap)
        return dq, dk, dv, None, None, None, None


def sra_attention(q: Tensor, k: Tensor, v: Tensor, grid, ratio, *,
                  scale: Optional[float] = None, softcap: float = 0.0) -> Tensor:
    """Differentiable spatial-reduction attention; as libattn.sra_attention."""
    return SRAFunction.apply(q, k, v, tuple(grid), tuple(ratio), scale, float(softcap))


class NeighborhoodFunction(torch.autograd.Function):
    """Neighbourhood attention (libattn.neighborhood_attention), forward
    attn_neighborhood_forward, backward attn_neighborhood_backward."""

    @staticmethod
    def forward(ctx, q, k, v, grid, radius, plan, scale, softcap):
        from ._grid import neighborhood_attention

        o, lse = neighborhood_attention(q, k, v, grid, radius, plan=plan, scale=scale,
                                        softcap=softcap, return_lse=True)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (grid, radius, plan, scale, softcap)
        return o

    @staticmethod
    def backward(ctx, do):
        from ._grid import neighborhood_attention_backward

        q, k, v, o, lse = ctx.saved_tensors
        grid, radius, plan, scale, softcap = ctx.args
        dq, dk, dv = neighborhood_attention_backward(q, k, v, o, lse, do, grid, radius,
                                                     plan=plan, scale=scale, softcap=softcap)
        return dq, dk, dv, None, None, None, None, None


def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, grid, radius, *, plan=None,
                           block: int = 64, scale: Optional[float] = None,
                           softcap: float = 0.0) -> Tensor:
    """Differentiable neighbourhood attention; as libattn.neighborhood_attention."""
    from ._grid import neighborhood_plan

    if plan is None:
        plan = neighborhood_plan(grid, radius, block, block)
    return NeighborhoodFunction.apply(q, k, v, tuple(grid), tuple(radius), plan, scale,
                                      float(softcap))


class LightNetFunction(torch.autograd.Function):
    """LightNet (libattn.lightnet_attention), forward attn_lightnet_forward,
    backward attn_lightnet_backward."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        from ._linmech import lightnet_attention

        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return lightnet_attention(q, k, v, scale=scale)

    @staticmethod
    def backward(ctx, do):
        from ._linmech import lightnet_attention_backward

        q, k, v = ctx.saved_tensors
        dq, dk, dv = lightnet_attention_backward(q, k, v, do.contiguous(), scale=ctx.scale)
        return dq, dk, dv, None


def lightnet_attention(q: Tensor, k: Tensor, v: Tensor, *,
                       scale: Optional[float] = None) -> Tensor:
    """Differentiable LightNet (causal); shapes as libattn.lightnet_attention."""
    return LightNetFunction.apply(q, k, v, scale)


class RFAFunction(torch.autograd.Function):
    """Random-feature attention (libattn.rfa_attention), forward
    attn_rfa_forward, backward attn_rfa_backward on the same context (the
    same features)."""

    @staticmethod
    def forward(ctx, q, k, v, features, causal, actx):
        from ._linmech import rfa_attention

        ctx.save_for_backward(q, k, v)
        ctx.args = (features, causal, actx)
        return rfa_attention(q, k, v, features=features, causal=causal, ctx=actx)

    @staticmethod
    def backward(ctx, do):
        from ._linmech import rfa_attention_backward

        q, k, v = ctx.saved_tensors
        features, causal, actx = ctx.args
        dq, dk, dv = rfa_attention_backward(q, k, v, do.contiguous(), features=features,
                                            causal=causal, ctx=actx)
        return dq, dk, dv, None, None, None


def rfa_attention(q: Tensor, k: Tensor, v: Tensor, *, features: Optional[int] = None,
                  causal: bool = True, ctx=None) -> Tensor:
    """Differentiable random-feature attention; as libattn.rfa_attention."""
    return RFAFunction.apply(q, k, v, features, bool(causal), ctx)


class WERSAFunction(torch.autograd.Function):
    """WERSA (libattn.wersa_attention), forward attn_wersa_forward, backward
    attn_wersa_backward (gradients for q, k, v and the level weights)."""

    @staticmethod
    def forward(ctx, q, k, v, weights, features, causal, actx):
        from ._linmech import wersa_attention

        ctx.save_for_backward(q, k, v, weights)
        ctx.args = (features, causal, actx)
        return wersa_attention(q, k, v, weights, features=features, causal=causal, ctx=actx)

    @staticmethod
    def backward(ctx, do):
        from ._linmech import wersa_attention_backward

        q, k, v, w = ctx.saved_tensors
        features, causal, actx = ctx.args
        dq, dk, dv, dw = wersa_attention_backward(q, k, v, do.contiguous(), w,
                                                  features=features, causal=causal, ctx=actx)
        return dq, dk, dv, dw.to(w.dtype), None, None, None


def wersa_attention(q: Tensor, k: Tensor, v: Tensor, weights: Optional[Tensor] = None, *,
                    levels: int = 3, features: Optional[int] = None, causal: bool = True,
                    ctx=None) -> Tensor:
    """Differentiable WERSA; as libattn.wersa_attention. weights: a tensor of
    levels + 1 (float32, float64 with float64 inputs; default ones), which
    gets a gradient when it requires one."""
    if weights is None:
        weights = torch.ones(levels + 1, dtype=torch.float64 if q.dtype == torch.float64
                             else torch.float32)
    return WERSAFunction.apply(q, k, v, weights, features, bool(causal), ctx)


class LLAFunction(torch.autograd.Function):
    """Local Linear Attention (libattn.lla_attention), forward
    attn_lla_forward, backward attn_lla_backward (where the library has it)."""

    @staticmethod
    def forward(ctx, q, k, v, lam, causal, scale):
        from ._linmech import lla_attention

        ctx.save_for_backward(q, k, v)
        ctx.args = (lam, causal, scale)
        return lla_attention(q, k, v, lam=lam, causal=causal, scale=scale)

    @staticmethod
    def backward(ctx, do):
        from ._linmech import lla_attention_backward

        q, k, v = ctx.saved_tensors
        lam, causal, scale = ctx.args
        dq, dk, dv = lla_attention_backward(q, k, v, do.contiguous(), lam=lam, causal=causal,
                                            scale=scale)
        return dq, dk, dv, None, None, None


def lla_attention(q: Tensor, k: Tensor, v: Tensor, *, lam: float = 0.1, causal: bool = True,
                  scale: Optional[float] = None) -> Tensor:
    """Local Linear Attention with autograd (the backward needs
    attn_lla_backward in the library: NotImplementedError otherwise, when
    the gradient is asked for); as libattn.lla_attention."""
    return LLAFunction.apply(q, k, v, float(lam), bool(causal), scale)


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
           "mamba_scan", "SRAFunction", "sra_attention", "NeighborhoodFunction",
           "neighborhood_attention", "LightNetFunction", "lightnet_attention", "RFAFunction",
           "rfa_attention", "WERSAFunction", "wersa_attention", "LLAFunction", "lla_attention",
           "NSAFunction", "nsa_attention"]
