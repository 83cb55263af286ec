"""Model zoo: the project's LazyConfigs and the official Co-DETR weights, mirroring ``detectron2.model_zoo``.

    from codetr import model_zoo
    cfg = model_zoo.get_config("co_dino_vitl.py", trained=True)   # train.init_checkpoint = official weights URL
    model = model_zoo.get("co_dino_vitl.py", trained=True)        # built, official weights converted and loaded

Official checkpoints are mmdetection files; they are converted on load (``codetr.checkpoint.official``), with every
key checked. The ViT-L weights are on Hugging Face (direct file URLs); the R50 and Swin-L weights are in the
authors' Google Drive folders, which have no stable per-file URL: download the file by hand and pass it as
``checkpoint=`` (or ``train.init_checkpoint``).
"""
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

__all__ = [
    "OfficialWeights",
    "OFFICIAL_WEIGHTS",
    "get_config_file",
    "get_checkpoint_url",
    "get_config",
    "get",
]

_DRIVE_CO_DINO = "https://drive.google.com/drive/folders/1nAXOkzqrEgz-YnXxIEs4d5j9li_kmrnv"
_DRIVE_CO_DEFORMABLE = "https://drive.google.com/drive/folders/1asWoZ3SuM6APTL9D-QUF_YW9mjULNdh9"
_HF = "https://huggingface.co/zongzhuofan/{}/resolve/main/pytorch_model.pth"


@dataclass(frozen=True)
class OfficialWeights:
    """One released Co-DETR checkpoint (Sense-X/Co-DETR README, model zoo tables)."""

    url: str  # file URL (direct=True) or the page/folder holding it (direct=False)
    direct: bool  # whether ``url`` downloads the checkpoint file itself
    official_config: str  # the official config it was trained/evaluated with (projects/configs/...)
    box_ap: float  # box AP the official README reports for it
    dataset: str  # evaluation set of ``box_ap``


# our config -> the official checkpoint it loads with trained=True
OFFICIAL_WEIGHTS: Dict[str, OfficialWeights] = {
    "co_dino_r50.py": OfficialWeights(
        _DRIVE_CO_DINO, False, "co_dino/co_dino_5scale_r50_1x_coco.py", 52.1, "COCO val2017"
    ),
    "co_deformable_detr_r50.py": OfficialWeights(
        _DRIVE_CO_DEFORMABLE, False, "co_deformable_detr/co_deformable_detr_r50_1x_coco.py", 49.5, "COCO val2017"
    ),
    "co_dino_swinl.py": OfficialWeights(
        _DRIVE_CO_DINO, False, "co_dino/co_dino_5scale_swin_large_1x_coco.py", 58.9, "COCO val2017"
    ),
    "co_dino_vitl.py": OfficialWeights(
        _HF.format("co-detr-vit-large-coco"), True, "co_dino_vit/co_dino_5scale_vit_large_coco.py", 65.9,
        "COCO val2017 (Objects365 pre-trained)",
    ),
    "co_dino_vitl_lvis.py": OfficialWeights(
        _HF.format("co-detr-vit-large-lvis"), True, "co_dino_vit/co_dino_5scale_lsj_vit_large_lvis.py", 68.0,
        "LVIS v1 val (Objects365 pre-trained)",
    ),
}


def _normalise(name: str) -> str:
    name = name.strip()
    if name.startswith("configs/"):
        name = name[len("configs/"):]
    return name if name.endswith(".py") else name + ".py"


def _config_dirs():
    env = os.environ.get("CODETR_CONFIG_DIR")
    if env:
        yield env
    here = os.path.dirname(os.path.abspath(__file__))
    # source checkout / editable install: <repo>/projects/CoDETR/codetr/model_zoo -> <repo>/configs
    yield os.path.normpath(os.path.join(here, "..", "..", "..", "..", "configs"))
    yield os.path.join(here, "configs")  # configs shipped inside the package


def get_config_file(name: str) -> str:
    """Path of the config ``name`` (e.g. "co_dino_vitl.py", relative to the project's ``configs/``)."""
    rel = _normalise(name)
    tried = []
    for d in _config_dirs():
        path = os.path.join(d, rel)
        if os.path.isfile(path):
            return path
        tried.append(d)
    raise RuntimeError(f"config {name!r} not found in the model zoo (looked in {tried}; set CODETR_CONFIG_DIR)")


def get_checkpoint_url(name: str) -> str:
    """URL of the official weights for config ``name``; raises when they are not downloadable by URL."""
    rel = _normalise(name)
    if rel not in OFFICIAL_WEIGHTS:
        raise RuntimeError(f"no official weights for {name!r}; known: {sorted(OFFICIAL_WEIGHTS)}")
    w = OFFICIAL_WEIGHTS[rel]
    if not w.direct:
        raise RuntimeError(
            f"the official weights for {rel} ({w.official_config}) are in a Google Drive folder without a direct "
            f"file URL: download the checkpoint from {w.url} and pass its local path (get(..., checkpoint=PATH) or "
            "train.init_checkpoint=PATH); it is converted on load."
        )
    return w.url


def get_config(name: str, trained: bool = False, checkpoint: Optional[str] = None, overrides: Sequence[str] = ()):
    """The LazyConfig ``name``; with ``trained=True`` its ``train.init_checkpoint`` is the official weights
    (``checkpoint``, a local path or URL, when given; else the URL table). ``overrides``: "key=value" strings
    applied as on the training script's command line."""
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(get_config_file(name))
    if overrides:
        cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    if trained:
        if "train" not in cfg or "init_checkpoint" not in cfg.train:
            raise RuntimeError(f"config {name!r} has no train.init_checkpoint to set")
        cfg.train.init_checkpoint = checkpoint if checkpoint is not None else get_checkpoint_url(name)
    return cfg


def _checkpointer_class():
    from detectron2.checkpoint import DetectionCheckpointer

    from ..checkpoint.official import OfficialCheckpointMixin

    try:
        from ..checkpoint import CoDETRCheckpointer
    except ImportError:
        CoDETRCheckpointer = None
    if CoDETRCheckpointer is not None and issubclass(CoDETRCheckpointer, OfficialCheckpointMixin):
        return CoDETRCheckpointer
    return type("ZooCheckpointer", (OfficialCheckpointMixin, DetectionCheckpointer), {})


def get(
    name: str,
    trained: bool = False,
    device: Optional[str] = None,
    checkpoint: Optional[str] = None,
    overrides: Sequence[str] = (),
):
    """Build the model of config ``name`` (in training mode, as ``detectron2.model_zoo.get``); with
    ``trained=True`` load the official weights (converted on load, every key checked) from the URL table or from
    ``checkpoint`` (local path or URL). ``device`` defaults to "cuda" when available, else "cpu"; ``overrides``
    as in :func:`get_config`."""
    from detectron2.config import instantiate

    cfg = get_config(name, trained=trained, checkpoint=checkpoint, overrides=overrides)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = instantiate(cfg.model).to(device)
    if trained or cfg.train.get("init_checkpoint", ""):
        _checkpointer_class()(model).load(cfg.train.init_checkpoint)
    return model
