"""codetr.checkpoint: official (mmdet) checkpoint conversion and ``CoDETRCheckpointer`` (atomic saves)."""
from .checkpointer import CheckpointFileError, CoDETRCheckpointer, atomic_torch_save, atomic_write_text
from .official import (
    ConversionReport,
    OfficialCheckpointError,
    OfficialCheckpointMixin,
    convert_official_checkpoint,
    convert_official_state_dict,
    is_official_state_dict,
    load_official_checkpoint,
    maybe_convert_official_file,
)

__all__ = [
    "CheckpointFileError",
    "CoDETRCheckpointer",
    "ConversionReport",
    "OfficialCheckpointError",
    "OfficialCheckpointMixin",
    "atomic_torch_save",
    "atomic_write_text",
    "convert_official_checkpoint",
    "convert_official_state_dict",
    "is_official_state_dict",
    "load_official_checkpoint",
    "maybe_convert_official_file",
]
