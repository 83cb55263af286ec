"""Early, clear errors for bad dataset inputs (before any training step runs)."""
import difflib
import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import get_detection_dataset_dicts as _d2_get_detection_dataset_dicts

__all__ = ["check_dataset_registered", "check_dataset_files", "get_detection_dataset_dicts", "dataset_num_classes",
           "check_num_classes"]


def _as_list(names):
    return [names] if isinstance(names, str) else list(names)


def check_dataset_registered(name: str) -> None:
    """ValueError naming ``name`` (and close registered names) if it isn't in DatasetCatalog."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}: {name!r}")
    registered = DatasetCatalog.list()
    if name not in registered:
        close = difflib.get_close_matches(name, registered, n=5)
        hint = f" Did you mean one of {close}?" if close else ""
        raise ValueError(
            f"dataset {name!r} is not registered in detectron2's DatasetCatalog.{hint} Builtin COCO/LVIS names "
            "(e.g. coco_2017_train, lvis_v1_val) are registered when detectron2.data is imported; the embedded "
            "synthetic data is codetr_synthetic_train / codetr_synthetic_val (import codetr.data)."
        )


def check_dataset_files(name: str) -> None:
    """For datasets backed by a json file: the json file and image folder must exist.

    The synthetic dataset is exempt (it is generated on first use).
    """
    meta = MetadataCatalog.get(name)
    if meta.get("synthetic_params") is not None:
        return
    hint = (" Set DETECTRON2_DATASETS to the folder holding coco/ and lvis/ (see detectron2's "
            "datasets/README.md); it is currently "
            f"{os.environ.get('DETECTRON2_DATASETS', 'unset (defaults to ./datasets)')!r}.")
    json_file = meta.get("json_file")
    if json_file is not None and "://" not in str(json_file) and not os.path.isfile(json_file):
        raise FileNotFoundError(f"annotation file {json_file!r} of dataset {name!r} does not exist.{hint}")
    image_root = meta.get("image_root")
    if image_root is not None and "://" not in str(image_root) and not os.path.isdir(image_root):
        raise FileNotFoundError(f"image folder {image_root!r} of dataset {name!r} does not exist.{hint}")


def get_detection_dataset_dicts(names, filter_empty: bool = True, **kwargs):
    """:func:`detectron2.data.get_detection_dataset_dicts` with clear errors.

    Unregistered names, missing files and unparsable annotation files raise ValueError /
    FileNotFoundError naming the dataset and the file. ``filter_empty=True`` (training) drops images
    without annotations, as the official recipe (mmdet ``filter_empty_gt=True``) does.
    """
    names = _as_list(names)
    if not names:
        raise ValueError("no dataset names given")
    for n in names:
        check_dataset_registered(n)
        check_dataset_files(n)
    try:
        return _d2_get_detection_dataset_dicts(names, filter_empty=filter_empty, **kwargs)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        files = [MetadataCatalog.get(n).get("json_file") for n in names]
        raise ValueError(
            f"cannot load the annotations of dataset(s) {names} from {files}: {type(e).__name__}: {e} "
            "(is the json file complete and in COCO/LVIS format?)"
        ) from e


def dataset_num_classes(name: str) -> int:
    """Number of classes of a registered dataset (len(thing_classes), loading the dataset if needed)."""
    check_dataset_registered(name)
    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is None:
        DatasetCatalog.get(name)  # COCO-json loaders set thing_classes
    classes = MetadataCatalog.get(name).get("thing_classes")
    if classes is None:
        raise ValueError(f"dataset {name!r} has no thing_classes metadata; can't check num_classes")
    return len(classes)


def check_num_classes(num_classes, dataset_names) -> None:
    """ValueError if the model's ``num_classes`` differs from a dataset's class count."""
    for n in _as_list(dataset_names):
        k = dataset_num_classes(n)
        if int(num_classes) != k:
            raise ValueError(
                f"model num_classes={num_classes} but dataset {n!r} has {k} classes "
                f"(MetadataCatalog.get({n!r}).thing_classes); set the model's class count to {k} (Co-DETR configs: "
                f"model.query_head.num_classes={k}; the other heads read it)"
            )
