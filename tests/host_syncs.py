"""Counting host syncs: the ops that make the host wait for a device value.

``count_host_syncs()`` is a context manager yielding a ``collections.Counter`` of, per op, how often it ran:
``_local_scalar_dense`` (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``, indexing with a 0-dim tensor),
``nonzero`` (``torch.nonzero``, ``torch.where(cond)``), ``bool_index`` (indexing or index-assigning with a boolean
mask: its kernel calls nonzero internally), ``masked_select``, ``unique`` (dynamic output sizes) and ``tolist`` (``Tensor.tolist``, which on CPU tensors does not reach the dispatcher and is
patched instead). On a GPU each is a stall of the host on the stream; on a CPU the same calls are counted, so a CPU
test bounds what a GPU run would sync.
"""
import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive")


class _SyncCounter(TorchDispatchMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.counts[name] += 1
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1 and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()
        ):
            self.counts["bool_index"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs():
    counts = collections.Counter()
    original_tolist = torch.Tensor.tolist

    def tolist(self):
        counts["tolist"] += 1
        return original_tolist(self)

    torch.Tensor.tolist = tolist
    try:
        with _SyncCounter(counts):
            yield counts
    finally:
        torch.Tensor.tolist = original_tolist
