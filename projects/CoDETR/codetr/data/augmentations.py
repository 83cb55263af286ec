"""Co-DETR's training augmentations (spec §2) built from detectron2 transforms.

* DETR augmentation: horizontal flip, then with probability 1/2 each either
  - a multi-scale resize (short side in 480..800 step 32, long side <= 1333), or
  - a resize of the short side to {400, 500, 600} (long side <= 4200), a random crop of an absolute size in
    384..600, and the same multi-scale resize.
* LSJ (large-scale jitter): flip, resize to a random scale 0.1..2.0 of a 1024x1024 target keeping the aspect
  ratio, crop (or pad with 114) to exactly 1024x1024.
* Test: short side 800, long side <= 1333.
"""
import numpy as np
import detectron2.data.transforms as T

__all__ = [
    "RandomChoice",
    "detr_train_augmentation",
    "lsj_train_augmentation",
    "test_augmentation",
    "DETR_MIN_SIZES",
]

DETR_MIN_SIZES = tuple(range(480, 801, 32))


class RandomChoice(T.Augmentation):
    """Apply one of several augmentations (or lists of augmentations), chosen at random per image.

    Args:
        choices: list whose items are an Augmentation or a list of Augmentations.
        probs: optional probabilities of the choices (default: uniform).
    """

    def __init__(self, choices, probs=None):
        super().__init__()
        if len(choices) == 0:
            raise ValueError("RandomChoice needs at least one choice")
        self.choices = [T.AugmentationList(list(c)) if isinstance(c, (list, tuple)) else c for c in choices]
        if probs is not None:
            probs = np.asarray(probs, dtype=np.float64)
            if probs.shape != (len(self.choices),) or (probs < 0).any() or abs(probs.sum() - 1) > 1e-6:
                raise ValueError(f"RandomChoice probs must be {len(self.choices)} non-negative numbers summing to 1")
        self.probs = probs

    def __call__(self, aug_input):
        idx = np.random.choice(len(self.choices), p=self.probs)
        return self.choices[idx](aug_input)

    def get_transform(self, *args):  # pragma: no cover - only used through __call__
        raise NotImplementedError("RandomChoice is applied through __call__(aug_input)")


def detr_train_augmentation(
    min_sizes=DETR_MIN_SIZES,
    max_size: int = 1333,
    crop_resize_sizes=(400, 500, 600),
    crop_size=(384, 600),
    crop_max_size: int = 4200,
    random_flip: str = "horizontal",
):
    """The official DETR/DINO training augmentation (spec §2), as a list of detectron2 augmentations."""
    resize = T.ResizeShortestEdge(short_edge_length=tuple(min_sizes), max_size=max_size, sample_style="choice")
    augs = []
    if random_flip != "none":
        augs.append(T.RandomFlip(horizontal=random_flip == "horizontal", vertical=random_flip == "vertical"))
    augs.append(
        RandomChoice(
            [
                [resize],
                [
                    T.ResizeShortestEdge(
                        short_edge_length=tuple(crop_resize_sizes), max_size=crop_max_size, sample_style="choice"
                    ),
                    T.RandomCrop("absolute_range", tuple(crop_size)),
                    resize,
                ],
            ]
        )
    )
    return augs


def lsj_train_augmentation(image_size: int = 1024, min_scale: float = 0.1, max_scale: float = 2.0,
                           pad_value: float = 114.0):
    """Large-scale jitter: flip, ResizeScale(min..max of image_size), FixedSizeCrop padded with ``pad_value``.

    Instance masks (bitmask/RLE) are padded with 0 (FixedSizeCrop's default ``seg_pad_value`` is 255, which
    would make the padding part of every mask)."""
    return [
        T.RandomFlip(horizontal=True),
        T.ResizeScale(min_scale=min_scale, max_scale=max_scale, target_height=image_size, target_width=image_size),
        T.FixedSizeCrop(crop_size=(image_size, image_size), pad=True, pad_value=pad_value, seg_pad_value=0),
    ]


def test_augmentation(short_edge: int = 800, max_size: int = 1333):
    """Test-time resize (800/1333 for COCO R50 configs)."""
    return [T.ResizeShortestEdge(short_edge_length=short_edge, max_size=max_size)]
