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
import re
import tempfile
import zipfile
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .official import OfficialCheckpointMixin

__all__ = ["CoDETRCheckpointer", "CheckpointFileError", "atomic_torch_save", "atomic_write_text"]

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


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be read because it is truncated or corrupt."""


_CORRUPT_SIGNS = ("invalid load key", "ran out of input", "eof", "truncated", "central directory",
                  "pytorchstreamreader", "unsupported operand", "bad zip", "not a zip")


def _why_corrupt(filename: str, error: BaseException):
    """A short reason when ``filename`` is damaged (empty, a truncated or damaged zip archive, bytes that are not a
    pickle), else None (the file is intact and the load failed for another reason)."""
    try:
        size = os.path.getsize(filename)
    except OSError:
        return None
    if size == 0:
        return "the file is empty"
    with open(filename, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # torch.save's zip format
        if not zipfile.is_zipfile(filename):
            return "a truncated zip archive (torch.save format) without its central directory"
        try:
            with zipfile.ZipFile(filename) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"a damaged zip archive ({e})"
        return f"a damaged zip archive (member {bad!r} fails its CRC check)" if bad else None
    if head[:1] != b"\x80":  # neither a zip archive nor a pickle (protocol >= 2 starts with 0x80)
        return f"{size} bytes that are neither a torch.save archive nor a pickle"
    text, e = [], error
    while e is not None:  # the exception chain: torch wraps the unpickling error
        text.append(str(e).lower())
        e = e.__cause__ or e.__context__
    if any(sign in t for t in text for sign in _CORRUPT_SIGNS):
        return f"{size} bytes that do not unpickle ({type(error).__name__})"
    return None


_LEGACY_CONV_GN = (
    (re.compile(r"^(.+)\.conv\.weight$"), r"\1.weight"),
    (re.compile(r"^(.+)\.gn\.(weight|bias)$"), r"\1.norm.\2"),
)
# the collaborative branch's own extra stride-2 map (conv + GN), now the adapter's last coarser level
_LEGACY_EXTRA_MAP = re.compile(r"^((?:.+\.)?collaborative)\.downsample\.([01])\.(weight|bias)$")
_ADAPTER_DOWN = re.compile(r"^((?:.+\.)?collaborative)\.adapter\.downsample\.(\d+)\.")


def rename_legacy_keys(state_dict: dict, model_keys) -> int:
    """Rename, in place, the parameters of checkpoints this project wrote before two renames, only where the old key
    is not a key of the model and the new one is (so no current name is ever touched):

    - the neck's and the ATSS towers' ``ConvNorm`` became detectron2 ``Conv2d(norm=...)``: ``<name>.conv.weight``
      -> ``<name>.weight`` and ``<name>.gn.{weight,bias}`` -> ``<name>.norm.{weight,bias}``;
    - the collaborative branch's extra stride-2 map moved into its adapter: ``collaborative.downsample.{0,1}.*`` ->
      ``collaborative.adapter.downsample.{k}.{0,1}.*``, k the adapter's last coarser level (Co-DINO,
      Co-Deformable-DETR: 0, their only one).

    Returns the number of renamed keys."""
    model_keys = set(model_keys)
    last_down = {}  # collaborative prefix -> index of its adapter's last downsample level
    for key in model_keys:
        m = _ADAPTER_DOWN.match(key)
        if m:
            last_down[m[1]] = max(last_down.get(m[1], 0), int(m[2]))
    renamed = 0
    for key in list(state_dict.keys()):
        if key in model_keys:
            continue
        candidates = [pattern.sub(repl, key) for pattern, repl in _LEGACY_CONV_GN]
        m = _LEGACY_EXTRA_MAP.match(key)
        if m and m[1] in last_down:
            candidates.append(f"{m[1]}.adapter.downsample.{last_down[m[1]]}.{m[2]}.{m[3]}")
        for new in candidates:
            if new != key and new in model_keys and new not in state_dict:
                state_dict[new] = state_dict.pop(key)
                renamed += 1
                break
    return renamed


class CoDETRCheckpointer(OfficialCheckpointMixin, DetectionCheckpointer):
    """:class:`detectron2.checkpoint.DetectionCheckpointer` whose ``save`` is atomic and whose ``load``
    also accepts official (mmdet) Co-DETR checkpoints (converted by :class:`OfficialCheckpointMixin`).

    Same constructor as ``DetectionCheckpointer(model, save_dir="", *, save_to_disk=None, **checkpointables)``.
    Non-local save folders (e.g. ``manifold://``) fall back to the parent's non-atomic save.
    """

    def _load_file(self, filename: str):
        """As detectron2's, but a truncated or corrupt file raises :class:`CheckpointFileError` naming it (torch's
        own message would suggest ``weights_only=False``, which cannot help a damaged file)."""
        try:
            return super()._load_file(filename)
        except Exception as e:
            local = filename
            try:
                local = self.path_manager.get_local_path(filename)
            except Exception:
                pass
            reason = _why_corrupt(local, e)
            if reason is None:
                raise
            raise CheckpointFileError(
                f"{filename} is not a valid checkpoint: {reason}. The file is truncated or corrupt (an interrupted "
                "download, copy or save?); download or copy it again."
            ) from e

    def _load_model(self, checkpoint: Any):
        """As detectron2's, after renaming the parameters of this project's older checkpoints
        (:func:`rename_legacy_keys`), so that a model trained before the rename still loads in full."""
        state = checkpoint.get("model")
        if isinstance(state, dict):
            n = rename_legacy_keys(state, self.model.state_dict().keys())
            if n:
                logger.info(
                    f"Renamed {n} parameter(s) of an older codetr checkpoint (conv/gn -> weight/norm, "
                    "collaborative.downsample -> collaborative.adapter.downsample)"
                )
        return super()._load_model(checkpoint)

    def _local_save_dir(self):
        if not self.save_dir:
            return None
        try:
            return self.path_manager.get_local_path(self.save_dir)
        except Exception:
            return None

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            # processes that do not write still take part in collective state dicts (RNGState gathers)
            for obj in self.checkpointables.values():
                if getattr(obj, "collective", False):
                    obj.state_dict()
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
