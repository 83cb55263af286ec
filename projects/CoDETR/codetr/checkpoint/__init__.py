"""codetr.checkpoint: official (mmdet) checkpoint conversion."""
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
    "ConversionReport",
    "OfficialCheckpointError",
    "OfficialCheckpointMixin",
    "convert_official_checkpoint",
    "convert_official_state_dict",
    "is_official_state_dict",
    "load_official_checkpoint",
    "maybe_convert_official_file",
]
