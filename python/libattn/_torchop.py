"""One mechanism with a C forward and backward, for PyTorch: a pair of
torch.library custom ops (libattn::<name>_fwd, libattn::<name>_bwd) with
fake (meta) implementations and the forward's autograd registered to the
backward op, so that torch.compile traces it (fullgraph), and an eager
torch.autograd.Function over the same two Python functions (no
dispatcher in eager mode). libattn.torch builds its mechanisms with it.
"""

from __future__ import annotations

from typing import Callable

import torch

LIB = "libattn"


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


class CustomOp:
    """A mechanism as custom ops and as an autograd Function.

    args: the forward's inputs in torch.library schema syntax, the tensors
      (Tensor or Tensor?) first: "Tensor q, Tensor k, Tensor v, float? scale".
    forward(*inputs) -> the output, or with outputs > 1 a tuple (o, *extra)
      (e.g. an LSE: kept for the backward, not differentiable, not returned
      to the caller); with grads > 1 the first `grads` outputs are
      differentiable and returned (o_1, ..., o_grads, *extra).
    backward(*tensor_inputs, [*outputs,] dout_1, ..., dout_grads,
      *other_inputs) -> one gradient per tensor input, shaped and typed like
      it (None for an input that is None); the forward's outputs come in
      when outputs > 1.
    fake(*inputs) -> new empty tensors shaped and typed as forward's result.

    The Function (`function`, named `name`) may take inputs after those of
    args (objects that are no schema type, e.g. a Context): they reach
    forward and backward as the last arguments. Calling the CustomOp runs
    the Function in eager mode and the forward op under torch.compile.
    """

    def __init__(self, op: str, args: str, forward: Callable, backward: Callable,
                 fake: Callable, *, outputs: int = 1, grads: int = 1, name: str = "",
                 doc: str = ""):
        decl = [a.strip() for a in args.split(",")]
        self.ntensors = sum(d.startswith("Tensor") for d in decl)
        if any(d.startswith("Tensor") for d in decl[self.ntensors:]):
            raise ValueError(f"{op}: tensors must come first in {args!r}")
        if not 1 <= grads <= outputs:
            raise ValueError(f"{op}: grads must be in 1..outputs")
        self.outputs, self.grads, self._forward, self._backward = outputs, grads, forward, backward
        outs = [f"Tensor out{i}" for i in range(outputs)] if outputs > 1 else []
        douts = ["Tensor dout"] if grads == 1 else [f"Tensor dout{i}" for i in range(grads)]
        bargs = ", ".join(decl[:self.ntensors] + outs + douts + decl[self.ntensors:])
        ret = "Tensor" if outputs == 1 else "(" + ", ".join(["Tensor"] * outputs) + ")"
        self.fwd = torch.library.custom_op(f"{LIB}::{op}_fwd", forward, mutates_args=(),
                                           schema=f"({args}) -> {ret}")
        self.fwd.register_fake(fake)
        self.bwd = torch.library.custom_op(f"{LIB}::{op}_bwd", self._bwd_op, mutates_args=(),
                                           schema=f"({bargs}) -> Tensor[]")
        self.bwd.register_fake(self._bwd_fake)
        self.fwd.register_autograd(self._op_backward, setup_context=self._setup)
        self.function = self._make_function(name or op, doc)

    # the backward op: a list of gradients, an empty tensor for a None input
    def _bwd_op(self, *a):
        t = a[:self.ntensors]
        return [g if g is not None else t[0].new_empty(0) for g in self._backward(*a)]

    def _bwd_fake(self, *a):
        return [x.new_empty(x.shape) if x is not None else a[0].new_empty(0)
                for x in a[:self.ntensors]]

    # autograd, shared by the op and the Function
    def _setup(self, ctx, inputs, output):
        outs = _tuple(output) if self.outputs > 1 else ()
        ctx.save_for_backward(*inputs[:self.ntensors], *outs)
        ctx.others = tuple(inputs[self.ntensors:])

    def _grads(self, ctx, douts, backward):
        saved = ctx.saved_tensors
        # an output the loss does not use may come without a gradient
        outs = saved[self.ntensors:]
        douts = [(torch.zeros_like(outs[i]) if d is None else d).contiguous()
                 for i, d in enumerate(douts)]
        g = backward(*saved, *douts, *ctx.others)
        g = tuple(None if x is None else gx for x, gx in zip(saved[:self.ntensors], g))
        return g + (None,) * len(ctx.others)

    def _op_backward(self, ctx, *douts):
        return self._grads(ctx, douts[:self.grads], self.bwd)

    def _returned(self, out):
        """What the caller gets: the output, or the first `grads` outputs."""
        return _tuple(out)[0] if self.grads == 1 else _tuple(out)[:self.grads]

    def _make_function(self, name, doc):
        spec = self

        def forward(ctx, *inputs):
            out = spec._forward(*inputs)
            spec._setup(ctx, inputs, out)
            return spec._returned(out)

        def backward(ctx, *douts):
            return spec._grads(ctx, douts, spec._backward)

        return type(name, (torch.autograd.Function,),
                    {"__doc__": doc, "__module__": "libattn.torch",
                     "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *inputs):
        if torch.compiler.is_compiling():
            # Dynamo traces the custom op (its autograd registered) rather
            # than the Function, whose forward is a ctypes call
            return self._returned(self.fwd(*inputs))
        return self.function.apply(*inputs)
