"""``CoDETRCheckpointer``: detectron2's checkpointer with atomic (crash-safe) saves.

A checkpoint is first written to a temporary file in the target folder, flushed and fsync'ed, and then
moved over the final name with :func:`os.replace` (atomic on POSIX and Windows). The ``last_checkpoint``
tag is updated the same way, and only after the checkpoint file is complete. A process killed in the
middle of a save therefore leaves, at worst, a stray ``*.tmp`` file: the checkpoint that
``last_checkpoint`` names is always complete.

Loading converts official mmdet checkpoints (``OfficialCheckpointMixin``); subclasses may extend loading
further by overriding ``_load_file``; saving stays atomic.
"""
import logging
import os
import tempfile
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .official import OfficialCheckpointMixin

__all__ = ["CoDETRCheckpointer", "atomic_torch_save", "atomic_write_text"]

logger = logging.getLogger(__name__)


def _atomic_write(path: str, write_fn, mode: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # leave the previous file untouched; drop the partial temporary file
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a truncated ``path`` behind."""
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(text: str, path: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_write(path, lambda f: f.write(text), "w")


class CoDETRCheckpointer(OfficialCheckpointMixin, DetectionCheckpointer):
    """:class:`detectron2.checkpoint.DetectionCheckpointer` whose ``save`` is atomic and whose ``load``
    also accepts official (mmdet) Co-DETR checkpoints (converted by :class:`OfficialCheckpointMixin`).

    Same constructor as ``DetectionCheckpointer(model, save_dir="", *, save_to_disk=None, **checkpointables)``.
    Non-local save folders (e.g. ``manifold://``) fall back to the parent's non-atomic save.
    """

    def _local_save_dir(self):
        if not self.save_dir:
            return None
        try:
            return self.path_manager.get_local_path(self.save_dir)
        except Exception:
            return None

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        local_dir = self._local_save_dir()
        if local_dir is None or "://" in self.save_dir:
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = "{}.pth".format(name)
        save_file = os.path.join(local_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name must be a plain file name, got {name!r}")
        self.logger.info("Saving checkpoint to {}".format(save_file))
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        local_dir = self._local_save_dir()
        if local_dir is None or "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write_text(last_filename_basename, os.path.join(local_dir, "last_checkpoint"))
