"""Your own COCO-format dataset (one json + one image folder per split), registered from a config file."""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["register_coco_dataset"]


def register_coco_dataset(name: str, json_file: str, image_root: str) -> str:
    """
    Register ``name`` as a COCO-format detection dataset with detectron2's ``register_coco_instances``
    (class names and the category-id mapping are read from the json when the dataset is first loaded;
    ``evaluator_type="coco"``).

    Meant to be called from a config file, which may be loaded more than once in a process: registering
    ``name`` again with the same files is a no-op; with other files it is a ValueError (detectron2's catalogs
    hold one entry per name). Missing files are reported when the dataset is used (with the dataset named).

    Returns:
        ``name``.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"dataset name must be a non-empty str, got {name!r}")
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        old = (meta.get("json_file"), meta.get("image_root"))
        if old == (json_file, image_root):
            return name
        raise ValueError(
            f"dataset {name!r} is already registered with json_file={old[0]!r}, image_root={old[1]!r}; "
            f"cannot register it again with json_file={json_file!r}, image_root={image_root!r}: use another name"
        )
    register_coco_instances(name, {}, json_file, image_root)
    return name
