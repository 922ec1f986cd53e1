"""The reference implementations of what the exercises ask learners to build: each block under
``torch.utils.checkpoint`` (exercise 1.3) and the right offload hooks (exercise 3.2).

The checks compare with them, here and in trusted workers. No answer may use them: a grader's
worker that runs learner code can neither import this module nor read its file (grading.py).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.checkpoint import checkpoint

from .probes import Host, run_blocks, run_offloaded


def torch_checkpoint(spec: dict) -> dict:
    """The reference: each block under ``torch.utils.checkpoint`` (non-reentrant)."""
    return run_blocks(spec, lambda block, h: checkpoint(block, h, use_reentrant=False))


def reference_offload_hooks(host: Host, params):
    """Correct pack/unpack: parameters (and views of them) stay; a tensor saved twice goes once."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, tuple[weakref.ref, int]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() in param_storages:
            return t
        key = (storage.data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen and seen[key][0]() is storage:
            return seen[key][1]
        handle = host.put(t)
        seen[key] = (weakref.ref(storage), handle)
        return handle

    def unpack(handle):
        return handle if isinstance(handle, torch.Tensor) else host.get(handle)

    return pack, unpack


def offload(spec: dict) -> dict:
    """The reference offload run."""
    return run_offloaded(spec, reference_offload_hooks)
