"""``Predictor``: a config + checkpoint -> detections on raw images, in the spirit of Detectron2's ``DefaultPredictor``.

    from codetr import Predictor
    predictor = Predictor("configs/demo/co_dino_synthetic.py", "output/demo_co_dino_synthetic/model_final.pth")
    instances = predictor(cv2.imread("image.jpg"), input_format="BGR")   # Instances in original-image pixels
    predictor = Predictor("co_dino_vitl.py")                               # model zoo name: official weights

The model's own pre- and post-processing run (normalisation, padding, top-k, soft-NMS when the config uses it,
rescaling to the original size); the Predictor adds only the config's test-time resize and the channel order.
"""
import os
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["Predictor"]

ImageLike = Union[np.ndarray, torch.Tensor]


def _load_config(config, overrides: Sequence[str]):
    """A LazyConfig object, a path to a config file, or a model zoo name (``codetr.model_zoo``)."""
    from detectron2.config import LazyConfig

    from codetr import model_zoo

    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isfile(path):
            cfg, zoo_name = LazyConfig.load(path), None
        else:
            cfg, zoo_name = LazyConfig.load(model_zoo.get_config_file(path)), path  # raises naming the places looked in
    else:
        cfg, zoo_name = config, None
    if overrides:
        cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    return cfg, zoo_name


class Predictor:
    """
    Args:
        config: a LazyConfig, the path of a config file, or a model zoo name such as ``"co_dino_vitl.py"``.
        checkpoint: weights to load (a path or URL; official Co-DETR checkpoints are converted on load). ``None``:
            the config's ``train.init_checkpoint`` when set, else for a model zoo name its official weights
            (``model_zoo.get_checkpoint_url``); ``""``: none (random weights, for tests).
        device: "cpu", "cuda", ...; default "cuda" when available.
        input_format: channel order of the images given to :meth:`__call__` ("RGB" or "BGR"); default the
            model's ``input_format`` (the config's).
        score_threshold: drop detections scoring below it (DETR-style models always return their top-k).
        overrides: "key=value" config overrides, as on the training script's command line.

    Images are HWC uint8 arrays (numpy or torch); the config's test-time resize
    (``dataloader.test.mapper.augmentations``) is applied, and the returned ``Instances`` (``pred_boxes``,
    ``scores``, ``pred_classes``, on the CPU) are in the original image's pixels.
    """

    def __init__(
        self,
        config,
        checkpoint: Optional[str] = None,
        device: Optional[str] = None,
        input_format: Optional[str] = None,
        score_threshold: float = 0.0,
        overrides: Sequence[str] = (),
    ):
        import detectron2.data.transforms as T
        from detectron2.config import instantiate

        from codetr import model_zoo
        from codetr.checkpoint import CoDETRCheckpointer

        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        cfg, zoo_name = _load_config(config, overrides)
        self.cfg = cfg
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} but no CUDA device is visible; use device='cpu'")
        self.model = instantiate(cfg.model).to(device).eval()
        if checkpoint is None:
            checkpoint = cfg.get("train", {}).get("init_checkpoint", "") or ""
            if not checkpoint and zoo_name is not None:
                checkpoint = model_zoo.get_checkpoint_url(zoo_name)
        if checkpoint:
            if "://" not in checkpoint and not os.path.isfile(checkpoint):
                raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
            CoDETRCheckpointer(self.model).load(checkpoint)
        self.checkpoint = checkpoint
        self.model_format = getattr(self.model, "input_format", "BGR")
        self.input_format = input_format or self.model_format
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {self.input_format!r}")
        self.score_threshold = score_threshold
        test = cfg.dataloader.get("test", None) if "dataloader" in cfg else None
        augs = test.mapper.get("augmentations", None) if test is not None and "mapper" in test else None
        self.augmentations = T.AugmentationList(list(instantiate(augs)) if augs is not None else [])

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _prepare(self, image: ImageLike, input_format: str) -> dict:
        import detectron2.data.transforms as T

        if isinstance(image, torch.Tensor):
            image = image.cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise TypeError(f"an image must be a numpy array or torch tensor (H, W, 3) uint8, got {type(image).__name__}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image must be (H, W, 3) (HWC, 3 channels), got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"an image must be uint8 (0..255), got {image.dtype}")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"empty image of shape {image.shape}")
        h, w = image.shape[:2]
        if input_format != self.model_format:
            image = image[:, :, ::-1]
        aug_input = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        return {"image": tensor, "height": h, "width": w}

    @torch.no_grad()
    def __call__(self, images: Union[ImageLike, List[ImageLike]], input_format: Optional[str] = None):
        """
        Args:
            images: one HWC uint8 image, or a list of them (run as one batch).
            input_format: their channel order for this call ("RGB" / "BGR"); default the Predictor's.

        Returns:
            ``Instances`` (or a list, for a list) in original-image pixels, on the CPU, scores >= score_threshold.
        """
        fmt = input_format or self.input_format
        if fmt not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {fmt!r}")
        single = not isinstance(images, (list, tuple))
        batch = [self._prepare(im, fmt) for im in ([images] if single else images)]
        if not batch:
            return []
        outputs = self.model(batch)
        results = []
        for out in outputs:
            inst = out["instances"].to("cpu")
            if self.score_threshold > 0:
                inst = inst[inst.scores >= self.score_threshold]
            results.append(inst)
        return results[0] if single else results
