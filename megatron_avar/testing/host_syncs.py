"""Refusing host reads of tensors in a region of code: the test of "no host sync" rules (inside a layer, inside a
pipeline schedule's loss). On a CPU every tensor is a host tensor, so the region must not read any: each
``Tensor`` method that, on a GPU, waits for the device and copies a value back raises while the region runs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

__all__ = ["SYNCING_METHODS", "refuse_host_syncs", "refusing_host_syncs"]

SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def refuse_host_syncs(where: str) -> Callable[[], None]:
    """Patch :data:`SYNCING_METHODS` of ``torch.Tensor`` to raise AssertionError naming ``where``; returns the
    undo (call it in a ``finally``)."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING_METHODS}

    def refuse(name):
        def method(*_args, **_kwargs):
            raise AssertionError(f"host sync {where}: Tensor.{name}")
        return method

    def undo() -> None:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)

    for name in SYNCING_METHODS:
        setattr(torch.Tensor, name, refuse(name))
    return undo


@contextlib.contextmanager
def refusing_host_syncs(where: str) -> Iterator[None]:
    """:func:`refuse_host_syncs` for a ``with`` block."""
    undo = refuse_host_syncs(where)
    try:
        yield
    finally:
        undo()
