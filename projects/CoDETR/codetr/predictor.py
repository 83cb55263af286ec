"""``Predictor``: a config + checkpoint -> detections on raw images, in the spirit of Detectron2's ``DefaultPredictor``.

    from codetr import Predictor
    predictor = Predictor("configs/demo/co_dino_synthetic.py", "output/demo_co_dino_synthetic/model_final.pth")
    instances = predictor(cv2.imread("image.jpg"), input_format="BGR")   # Instances in original-image pixels
    predictor = Predictor("co_dino_vitl.py")                               # model zoo name: official weights
    predictor = Predictor("configs/co_dino_r50.py", "co_dino_r50.pth", compile=True)   # torch.compile (inductor)

The model's own pre- and post-processing run (normalisation, padding, top-k, soft-NMS when the config uses it,
rescaling to the original size); the Predictor adds only the config's test-time resize and the channel order.
"""
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

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


class _QueryHeadOutputs(nn.Module):
    """``forward(images, masks, norm_sizes) -> (logits (B, N, K), boxes (B, N, 4) normalised cxcywh)``: backbone,
    neck and one-to-one query head of a :class:`CoDETR` in eval, on the model's own preprocessed batch
    (``CoDETR.preprocess_image``: images (B, 3, H, W) normalised and padded, masks (B, H, W) True on padding,
    norm_sizes (B, 2)). The part of the eval forward that ``Predictor(compile=True)`` compiles: it has no host sync
    and no data-dependent shape."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, masks: torch.Tensor, norm_sizes: torch.Tensor):
        m = self.model
        return m.query_head(m.neck(m.backbone(images)), masks, None, norm_sizes)


def _check_compilable(model: nn.Module) -> None:
    """Raise a ValueError naming the part of the config that ``compile=True`` cannot run."""
    from codetr.modeling import CoDETR

    if not isinstance(model, CoDETR):
        raise ValueError(f"compile=True needs a codetr.modeling.CoDETR model, the config builds {type(model).__name__}")
    if model.eval_module != "detr":
        raise ValueError(
            f"compile=True runs the one-to-one query head's detections; the config sets model.eval_module="
            f"{model.eval_module!r} (an auxiliary head's): use compile=False"
        )
    if model.test_time_aug is not None:
        raise ValueError("compile=True runs the single-scale test; the config sets model.test_time_aug: "
                         "set it to None or use compile=False")
    if model.mask_branch is not None or model.aux_masks:
        raise ValueError("compile=True predicts boxes only; the config's model predicts masks (a mask branch or a "
                         "collaborative mask head): use compile=False")


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
        compile: run backbone, neck and query head through ``torch.compile`` (default backend inductor,
            ``fullgraph=True``); preprocessing (normalisation, padding masks), top-k, soft-NMS, score threshold and
            rescaling stay the eager model's own code, so the detections are the eager Predictor's up to float
            rounding (tests/test_predictor.py). Compiling happens at the first call (minutes on a CPU); the graph is
            specialised to the first padded input size (the test resize, then padding to ``size_divisibility``),
            and a call with another size or batch size compiles once more with dynamic shapes (torch's automatic
            dynamic shapes), which every later size reuses. Only the one-to-one query head's box detections can be
            compiled: a config with ``eval_module`` other than "detr", ``test_time_aug`` or a mask head raises a
            ValueError here; a model part that does not compile as one graph raises a RuntimeError at the first
            call naming it.
        compile_options: keyword arguments of ``torch.compile`` replacing the defaults (e.g. ``{"mode":
            "max-autotune"}``, ``{"dynamic": True}``: dynamic shapes from the first call); only with ``compile``.

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
        compile: bool = False,
        compile_options: Optional[Dict[str, Any]] = None,
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
        if compile_options is not None and not compile:
            raise ValueError("compile_options are torch.compile's arguments: they need compile=True")
        self.model = instantiate(cfg.model).to(device).eval()
        self.compiled = None
        if compile:
            _check_compilable(self.model)
            options = dict(fullgraph=True)
            options.update(compile_options or {})
            self.compiled = torch.compile(_QueryHeadOutputs(self.model), **options)
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
        outputs = self.model(batch) if self.compiled is None else self._compiled_forward(batch)
        results = []
        for out in outputs:
            inst = out["instances"].to("cpu")
            if self.score_threshold > 0:
                inst = inst[inst.scores >= self.score_threshold]
            results.append(inst)
        return results[0] if single else results

    def _compiled_forward(self, batch: List[dict]) -> List[dict]:
        """``self.model(batch)`` with backbone, neck and query head compiled; the rest is the model's own code."""
        m = self.model
        images, masks, norm_sizes = m.preprocess_image(batch)
        try:
            logits, boxes = self.compiled(images.tensor, masks, norm_sizes)
        except torch._dynamo.exc.TorchDynamoException as e:
            parts = ", ".join(type(getattr(m, k)).__name__ for k in ("backbone", "neck", "query_head"))
            raise RuntimeError(
                f"compile=True: torch.compile could not compile the model's inference path (backbone, neck, query head: "
                f"{parts}) as one graph: {type(e).__name__}: {e}\nUse compile=False (eager), or compile_options="
                "{'fullgraph': False} to allow graph breaks."
            ) from e
        dets = m.postprocessor(logits, boxes, norm_sizes)
        return m.rescale_instances(batch, m.detections_to_instances(dets, images.image_sizes), images.image_sizes)
