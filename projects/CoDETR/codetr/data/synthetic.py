"""An embedded synthetic detection dataset in COCO format ("codetr_synthetic").

Images are textured backgrounds with filled shapes; a class is a (shape, colour) pair, so classes are
told apart by both form and colour. The generator covers what detection has to handle:

* many classes (default 20 = 5 shapes x 4 colours);
* scale variation from tiny (~6 px) to large (~70% of the image side), log-uniform;
* occlusion: shapes are painted in order and later ones hide earlier ones; each box is the tight box of
  the *visible* pixels and its area the visible pixel count, objects less than 25% visible are not annotated;
* exact instance masks: each annotation's ``segmentation`` is the COCO RLE (compressed) of its visible pixels,
  so the same data trains and evaluates instance segmentation;
* crowded images (20% of images hold 15-40 objects, the rest 1-8) and a few images without objects
  (dropped from training by ``filter_empty``, as mmdet's ``filter_empty_gt`` does; kept for evaluation).

It is written on first use under ``<root>/<variant>/`` ({train,val}.json and images) and then reused. The
generation is deterministic for given parameters and atomic (written to a temporary folder, then renamed),
so concurrent processes (DDP ranks) don't see half-written data.
"""
import json
import os
import shutil
import tempfile

import cv2
import numpy as np
import pycocotools.mask as mask_util

__all__ = [
    "SHAPES",
    "COLORS",
    "synthetic_class_names",
    "generate_synthetic_coco",
    "ensure_synthetic_dataset",
    "register_synthetic_dataset",
    "default_synthetic_root",
]

SHAPES = ("square", "disk", "triangle", "cross", "ring")
COLORS = {  # RGB
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 210, 40),
}


def synthetic_class_names(num_classes: int = 20):
    names = [f"{c} {s}" for s in SHAPES for c in COLORS]
    if not 1 <= num_classes <= len(names):
        raise ValueError(f"synthetic num_classes must be in 1..{len(names)}, got {num_classes}")
    return names[:num_classes]


def default_synthetic_root() -> str:
    """``$CODETR_SYNTHETIC_ROOT``, else ``$DETECTRON2_DATASETS/codetr_synthetic`` (default ./datasets)."""
    if os.environ.get("CODETR_SYNTHETIC_ROOT"):
        return os.environ["CODETR_SYNTHETIC_ROOT"]
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "codetr_synthetic")


def _background(rng, h, w):
    base = rng.integers(60, 200, size=3).astype(np.float32)
    gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None, None]
    gx = np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
    grad = rng.uniform(-30, 30, size=(2, 3)).astype(np.float32)
    img = base + gy * grad[0] + gx * grad[1]
    noise = rng.normal(0, 12, size=(max(h // 8, 1), max(w // 8, 1), 3)).astype(np.float32)
    img = img + cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR)
    img = img + rng.normal(0, 6, size=(h, w, 3)).astype(np.float32)
    # desaturate so that backgrounds don't take the objects' colours
    gray = img.mean(axis=2, keepdims=True)
    img = 0.35 * img + 0.65 * gray
    return np.clip(img, 0, 255)


def _shape_mask(shape, h, w, cx, cy, size, angle):
    mask = np.zeros((h, w), np.uint8)
    r = size / 2.0
    if shape == "square":
        box = cv2.boxPoints(((cx, cy), (size, size * 0.8), angle))
        cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)
    elif shape == "disk":
        cv2.ellipse(mask, (int(round(cx)), int(round(cy))), (max(int(r), 1), max(int(r * 0.8), 1)),
                    angle, 0, 360, 1, -1)
    elif shape == "triangle":
        t = np.deg2rad(angle) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) - np.pi / 2
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    elif shape == "cross":
        arm = max(size * 0.3, 1)
        for dims in ((size, arm), (arm, size)):
            box = cv2.boxPoints(((cx, cy), dims, angle))
            cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)
    elif shape == "ring":
        cv2.circle(mask, (int(round(cx)), int(round(cy))), max(int(r), 1), 1, -1)
        cv2.circle(mask, (int(round(cx)), int(round(cy))), max(int(r * 0.55), 0), 0, -1)
    else:  # pragma: no cover
        raise ValueError(shape)
    return mask.astype(bool)


def _make_image(rng, class_names, image_size, max_objects):
    h = int(rng.integers(image_size[0], image_size[1] + 1))
    w = int(rng.integers(image_size[0], image_size[1] + 1))
    img = _background(rng, h, w)
    u = rng.random()
    if u < 0.05:
        n = 0
    elif u < 0.25:
        n = int(rng.integers(15, max_objects + 1))
    else:
        n = int(rng.integers(1, 9))
    owner = np.full((h, w), -1, np.int32)
    full_area, labels, windows = [], [], []
    min_side = min(h, w)
    for i in range(n):
        cls = int(rng.integers(len(class_names)))
        color_name, shape = class_names[cls].split(" ")
        size = float(np.exp(rng.uniform(np.log(6), np.log(0.7 * min_side))))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        mask = _shape_mask(shape, h, w, cx, cy, size, float(rng.uniform(0, 360)))
        # everything below works on the shape's bounding window (a 1-pixel margin for the erosion): the same
        # values as on the whole image, several times faster on the small shapes
        x, y, bw, bh = cv2.boundingRect(mask.view(np.uint8))
        win = (slice(max(y - 1, 0), min(y + bh + 1, h)), slice(max(x - 1, 0), min(x + bw + 1, w)))
        m = mask[win]
        area = int(m.sum())
        if area < 9:
            full_area.append(0)
            labels.append(cls)
            windows.append(win)
            continue
        color = np.array(COLORS[color_name], np.float32) * rng.uniform(0.85, 1.1)
        shade = rng.normal(0, 8, size=(h, w, 1)).astype(np.float32)  # drawn for the whole image: same stream
        img_w = img[win]
        img_w[m] = np.clip(color + shade[win][m], 0, 255)
        # a darker outline keeps touching objects of the same class apart (cv2.erode pads with the border
        # value: at the image edge the window's edge is the image's)
        edge = m & ~cv2.erode(m.view(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        img_w[edge] *= 0.45
        owner[win][m] = i
        full_area.append(area)
        labels.append(cls)
        windows.append(win)
    annos = []
    for i in range(n):
        if full_area[i] == 0:
            continue
        win = windows[i]
        visible = owner[win] == i  # later shapes only hide pixels: object i's pixels are inside its window
        ys, xs = np.nonzero(visible)
        if len(xs) < 0.25 * full_area[i] or len(xs) < 4:
            continue
        ys, xs = ys + win[0].start, xs + win[1].start
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        full = np.zeros((h, w), np.uint8, order="F")
        full[win] = visible
        rle = mask_util.encode(full)
        annos.append(
            {"bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "category_id": labels[i] + 1,
             "area": float(len(xs)), "iscrowd": 0,
             "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}}
        )
    return np.clip(img, 0, 255).astype(np.uint8), annos


def generate_synthetic_coco(out_dir, num_images, *, num_classes=20, image_size=(224, 320), max_objects=40,
                            seed=0, split="train"):
    """Write ``<out_dir>/<split>.json`` and ``<out_dir>/<split>/*.jpg``; returns the json path."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not (8 <= image_size[0] <= image_size[1]):
        raise ValueError(f"image_size must be (min, max) with 8 <= min <= max, got {image_size}")
    class_names = synthetic_class_names(num_classes)
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        img, annos = _make_image(rng, class_names, image_size, max_objects)
        fname = f"{image_id:06d}.jpg"
        cv2.imwrite(os.path.join(img_dir, fname), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        images.append({"id": image_id, "file_name": fname, "height": img.shape[0], "width": img.shape[1]})
        for a in annos:
            a["id"] = len(annotations) + 1
            a["image_id"] = image_id
            annotations.append(a)
    coco = {
        "info": {"description": "codetr synthetic detection dataset", "version": "2"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": n.split(" ")[1]} for i, n in enumerate(class_names)],
    }
    json_path = os.path.join(out_dir, f"{split}.json")
    with open(json_path, "w") as f:
        json.dump(coco, f)
    return json_path


def _variant(num_train, num_val, num_classes, image_size, seed):
    # v2: v1 (same images and boxes) plus instance masks
    return f"v2_n{num_train}-{num_val}_c{num_classes}_s{image_size[0]}-{image_size[1]}_seed{seed}"


def ensure_synthetic_dataset(root=None, *, num_train=1000, num_val=100, num_classes=20, image_size=(224, 320),
                             seed=0):
    """Generate the dataset under ``root`` unless it is already there; returns its folder."""
    root = root or default_synthetic_root()
    image_size = tuple(int(s) for s in image_size)
    folder = os.path.join(root, _variant(num_train, num_val, num_classes, image_size, seed))
    if os.path.isfile(os.path.join(folder, "DONE")):
        return folder
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        generate_synthetic_coco(tmp, num_train, num_classes=num_classes, image_size=image_size, seed=seed,
                                split="train")
        generate_synthetic_coco(tmp, num_val, num_classes=num_classes, image_size=image_size, seed=seed + 1,
                                split="val")
        open(os.path.join(tmp, "DONE"), "w").close()
        try:
            os.rename(tmp, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, "DONE")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def register_synthetic_dataset(prefix="codetr_synthetic", root=None, *, num_train=1000, num_val=100,
                               num_classes=20, image_size=(224, 320), seed=0):
    """Register ``<prefix>_train`` and ``<prefix>_val`` in detectron2's catalogs.

    The data is generated lazily, the first time a dataset's dicts are requested
    (``DatasetCatalog.get``); metadata (classes, json_file, evaluator_type="coco") is set right away.
    Registering the same prefix again with the same parameters is a no-op. Returns the two names.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    root = root or default_synthetic_root()
    image_size = tuple(int(s) for s in image_size)
    folder = os.path.join(root, _variant(num_train, num_val, num_classes, image_size, seed))
    kwargs = dict(num_train=num_train, num_val=num_val, num_classes=num_classes, image_size=image_size, seed=seed)
    names = []
    for split in ("train", "val"):
        name = f"{prefix}_{split}"
        names.append(name)
        json_file = os.path.join(folder, f"{split}.json")
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == json_file:
                continue
            raise ValueError(f"dataset name {name!r} is already registered with other data")

        def load(split=split, name=name, json_file=json_file):
            ensure_synthetic_dataset(root, **kwargs)
            return load_coco_json(json_file, os.path.join(folder, split), name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=os.path.join(folder, split),
            evaluator_type="coco",
            thing_classes=synthetic_class_names(num_classes),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(num_classes)},
            synthetic_params=dict(kwargs, root=root),
        )
    return names
