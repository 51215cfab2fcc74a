"""Count what a piece of torch code dispatches: aten ops and host syncs, measured on any device.

A GPU step is host-bound when it launches many small ops or waits on the device (a sync) inside
its loop; both are properties of the code, not of the machine, so they can be counted on a CPU:

    with DispatchCounter() as count:
        loss = total(detector.loss(images, targets)); loss.backward()
    count.ops, count.syncs, count.sync_ops

Host syncs counted are the ops that need a device value on the host to proceed:
``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``if t:``), ``nonzero`` (and
``torch.where(cond)``), the ``unique`` family, ``masked_select``, boolean-mask indexing (``index``
/ ``index_put`` with a bool index), ``repeat_interleave`` without ``output_size`` and
``bincount`` (their output size is data-dependent). CPU→device copies are invisible on a CPU (there
is only one device); the GPU bench counts them with ``torch.cuda.set_sync_debug_mode``.
``Tensor.tolist()`` on a CPU tensor reads memory without dispatching, so it is not counted here
either: on CUDA it is a device→host copy, which the GPU bench sees.

Hand-written because no library counts dispatches: ``torch.profiler`` records kernels and host
time, not the Python-level dispatch stream, and it does not classify syncs.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten

SYNC_OPS = {
    _aten._local_scalar_dense.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.bincount.default,
    _aten.repeat_interleave.Tensor,
    _aten._unique.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.unique_dim_consecutive.default,
}
_BOOL_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
                   _aten._index_put_impl_.default}


def _is_sync(func, args, kwargs) -> bool:
    if func in SYNC_OPS:
        if func is _aten.repeat_interleave.Tensor:
            return kwargs.get("output_size") is None
        return True
    if func in _BOOL_INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    return False


class DispatchCounter(TorchDispatchMode):
    """Counts aten ops (``ops``) and host syncs (``syncs``; ``sync_ops`` by op name) dispatched
    while active, forward and backward alike (autograd's backward ops dispatch through it too)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.by_op: Counter[str] = Counter()
        self.sync_ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        self.ops += 1
        self.by_op[name] += 1
        if _is_sync(func, args, kwargs):
            self.syncs += 1
            self.sync_ops[name] += 1
        return func(*args, **kwargs)

    def as_dict(self) -> dict:
        return {"ops": self.ops, "syncs": self.syncs, "sync_ops": dict(self.sync_ops)}
