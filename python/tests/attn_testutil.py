"""Helpers the binding tests share (test_linear_mechanisms,
test_mechanisms_more): relative error, seeded inputs, a non-contiguous
copy, and one call checked on torch, numpy and non-contiguous inputs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def rel(a, b):
    a = torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a).double()
    b = torch.as_tensor(np.asarray(b) if not torch.is_tensor(b) else b).double()
    return ((a - b).norm() / b.norm()).item()


def rnd(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def noncontig(x):
    """The same values in a layout with dims 1 and 2 swapped in memory."""
    s = list(x.shape)
    y = torch.empty([s[0], s[2], s[1]] + s[3:], dtype=x.dtype).transpose(1, 2)
    y.copy_(x)
    assert not y.is_contiguous()
    return y


def kinds(fn, args, want, tol=1e-5, nc=0):
    """fn on torch tensors, on numpy arrays, and with args[nc] non-contiguous:
    each result (the first, if a tuple) of the input's kind and close to want."""
    outs = []
    for case in ("torch", "numpy", "noncontig"):
        a = list(args)
        if case == "numpy":
            a = [x.numpy() if torch.is_tensor(x) else x for x in a]
        elif case == "noncontig":
            a[nc] = noncontig(a[nc])
        o = fn(*a)
        o0 = o[0] if isinstance(o, tuple) else o
        assert isinstance(o0, np.ndarray if case == "numpy" else torch.Tensor), case
        assert rel(o0, want) < tol, (case, rel(o0, want))
        outs.append(o)
    return outs[0]
