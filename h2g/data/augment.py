"""Online augmentation (Section 3.4 of the paper), seeded per call.

* :func:`classifier_augmenter`: patch classifier training: horizontal / vertical flip,
  90-degree rotations, HSV shift in [-20, 20], multiplicative brightness in [0.8, 1.2],
  each with probability 0.5.
* :func:`multiview_augmenter`: DMMN-style samples (several co-centred views and a pixel
  label map): flips, 90-degree rotations and elastic deformation moving every view and
  the target together, hue / saturation and brightness / contrast jitter on the views.
* :func:`refinement_augmenter`: refinement network training: flips, 90-degree
  rotations, zoom in [0.8, 1.2] and Macenko stain augmentation (sigma1 = sigma2 = 0.1),
  each with probability 0.5, moving image, heatmap and mask together.

Both return a function of ``(..., seed)`` whose result depends on the inputs and the
seed only: not on earlier calls, call order or the calling thread.  Each thread keeps
its own albumentations pipeline (so calls from several reader threads never share
state) and every call resets that pipeline's random state from the seed.

Seeding albumentations 2.x: ``Compose(seed=s)`` / ``Compose.set_random_seed(s)`` give
every transform its *own* generator seeded with the same ``s``, so all the "apply with
probability p" coin flips of one call come out identical (every transform applied or
none).  Here the pipeline gets one shared numpy and one shared Python generator through
``Compose.set_random_state``, so the transforms draw from one stream, independently.

TensorFlow-free (numpy, albumentations / OpenCV).
"""
from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Callable

import albumentations as A
import cv2
import numpy as np

from h2g.data.stain import stain_augment


@dataclass(frozen=True)
class ClassifierAugmentConfig:
    """Patch classifier augmentation; defaults are the paper's (Section 3.4).

    HSV shifts are in OpenCV's 8-bit HSV units (albumentations ``HueSaturationValue``
    on ``uint8``): hue 0..179 (2 degrees a unit), saturation and value 0..255.
    Brightness multiplies every pixel of a patch by one factor (albumentations
    ``MultiplicativeNoise`` with ``per_channel=False, elementwise=False``), clipped to
    0..255.
    """

    p_hflip: float = 0.5
    p_vflip: float = 0.5
    p_rot90: float = 0.5
    p_hsv: float = 0.5
    hue_shift: float = 20.0
    sat_shift: float = 20.0
    val_shift: float = 20.0
    p_brightness: float = 0.5
    brightness: tuple[float, float] = (0.8, 1.2)


@dataclass(frozen=True)
class RefinementAugmentConfig:
    """Refinement network augmentation; defaults are the paper's (Section 3.4).

    Zoom scales about the image centre by a factor in ``zoom`` (image and heatmap
    bilinear, mask nearest); zooming out fills the border with white glass in the image
    and zero in the heatmap and mask.  Stain augmentation (image only) is
    :func:`h2g.data.stain.stain_augment` with ``stain_sigma1`` / ``stain_sigma2``.
    """

    p_hflip: float = 0.5
    p_vflip: float = 0.5
    p_rot90: float = 0.5
    p_zoom: float = 0.5
    zoom: tuple[float, float] = (0.8, 1.2)
    p_stain: float = 0.5
    stain_sigma1: float = 0.1
    stain_sigma2: float = 0.1


@dataclass(frozen=True)
class MultiviewAugmentConfig:
    """Augmentation of multi-view samples with a pixel target (DMMN, Section II-E and the
    elastic deformation of Section II-C).  Every view gets the same transform: views of
    one sample are co-centred and of one size, so a flip or rotation about the centre
    keeps them aligned.  The elastic field is the same in every view's pixels (so
    physically finer in the higher magnifications: an approximation); the target moves
    with the first view, nearest-neighbour, unlabelled (255) where it comes from beyond
    the patch."""

    p_hflip: float = 0.5
    p_vflip: float = 0.5
    p_rot90: float = 0.5
    p_elastic: float = 0.25
    elastic_alpha: float = 30.0
    elastic_sigma: float = 6.0
    p_hsv: float = 0.5
    hue_shift: float = 10.0
    sat_shift: float = 20.0
    val_shift: float = 10.0
    p_brightness_contrast: float = 0.5
    brightness: float = 0.15
    contrast: float = 0.15


ClassifierAugmenter = Callable[[np.ndarray, int], np.ndarray]
RefinementAugmenter = Callable[[np.ndarray, np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def classifier_pipeline(config: ClassifierAugmentConfig) -> A.Compose:
    """The albumentations pipeline of :func:`classifier_augmenter` (unseeded)."""
    return A.Compose(
        [
            A.HorizontalFlip(p=config.p_hflip),
            A.VerticalFlip(p=config.p_vflip),
            A.RandomRotate90(p=config.p_rot90),
            A.HueSaturationValue(
                hue_shift_limit=config.hue_shift,
                sat_shift_limit=config.sat_shift,
                val_shift_limit=config.val_shift,
                p=config.p_hsv,
            ),
            A.MultiplicativeNoise(
                multiplier=config.brightness, per_channel=False, elementwise=False, p=config.p_brightness
            ),
        ]
    )


def refinement_pipeline(config: RefinementAugmentConfig) -> A.Compose:
    """The geometric albumentations pipeline of :func:`refinement_augmenter` (unseeded).

    It expects ``image`` = the RGB image in [0, 1] with the heatmap as a fourth
    channel (float32) and ``mask`` = the target as ``uint8``."""
    return A.Compose(
        [
            A.HorizontalFlip(p=config.p_hflip),
            A.VerticalFlip(p=config.p_vflip),
            A.RandomRotate90(p=config.p_rot90),
            A.Affine(
                scale=config.zoom,
                keep_ratio=True,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=(1.0, 1.0, 1.0, 0.0),
                fill_mask=0,
                p=config.p_zoom,
            ),
        ]
    )


def multiview_pipeline(config: MultiviewAugmentConfig, names: tuple[str, ...]) -> A.Compose:
    """The albumentations pipeline of :func:`multiview_augmenter` (unseeded): view
    ``names[0]`` is ``image``, the others additional image targets, the target ``mask``."""
    return A.Compose(
        [
            A.HorizontalFlip(p=config.p_hflip),
            A.VerticalFlip(p=config.p_vflip),
            A.RandomRotate90(p=config.p_rot90),
            A.ElasticTransform(alpha=config.elastic_alpha, sigma=config.elastic_sigma,
                               interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                               border_mode=cv2.BORDER_REFLECT_101, p=config.p_elastic),
            A.HueSaturationValue(hue_shift_limit=config.hue_shift, sat_shift_limit=config.sat_shift,
                                 val_shift_limit=config.val_shift, p=config.p_hsv),
            A.RandomBrightnessContrast(brightness_limit=config.brightness, contrast_limit=config.contrast,
                                       p=config.p_brightness_contrast),
        ],
        additional_targets={name: "image" for name in names[1:]},
    )


class _ThreadPipelines:
    """One pipeline per thread, reseeded before every call."""

    def __init__(self, build: Callable[[], A.Compose]):
        self._build = build
        self._local = threading.local()

    def seeded(self, seed: int) -> A.Compose:
        pipeline = getattr(self._local, "pipeline", None)
        if pipeline is None:
            pipeline = self._local.pipeline = self._build()
        seed = int(seed)
        pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return pipeline


def classifier_augmenter(config: ClassifierAugmentConfig | None = None) -> ClassifierAugmenter:
    """``augment(patch, seed) -> patch``: a ``(h, w, 3) uint8`` RGB patch, augmented as
    the config says, as a new ``uint8`` array of the same shape.  The same
    ``(patch, seed)`` always gives the same result, from any thread."""
    config = config or ClassifierAugmentConfig()
    pipelines = _ThreadPipelines(lambda: classifier_pipeline(config))

    def augment(patch: np.ndarray, seed: int) -> np.ndarray:
        patch = np.asarray(patch)
        if patch.ndim != 3 or patch.shape[2] != 3 or patch.dtype != np.uint8:
            raise ValueError(f"expected a (h, w, 3) uint8 patch, got shape {patch.shape} dtype {patch.dtype}")
        out = pipelines.seeded(seed)(image=patch)["image"]
        return np.ascontiguousarray(out)

    return augment


def refinement_augmenter(config: RefinementAugmentConfig | None = None) -> RefinementAugmenter:
    """``augment(image, heatmap, mask, seed) -> (image, heatmap, mask)``.

    ``image``: ``(h, w, 3)`` RGB, ``uint8`` or float in [0, 1]; ``heatmap``: ``(h, w)``
    or ``(h, w, 1)`` float tumour probabilities; ``mask``: ``(h, w)`` target (bool,
    integer or float 0/1).  Each output keeps its input's shape convention and dtype.
    Stain augmentation changes the image only; the geometric transforms move all three
    identically.  Deterministic per ``seed``, from any thread.
    """
    config = config or RefinementAugmentConfig()
    pipelines = _ThreadPipelines(lambda: refinement_pipeline(config))

    def augment(image: np.ndarray, heatmap: np.ndarray, mask: np.ndarray, seed: int):
        image, heatmap, mask = np.asarray(image), np.asarray(heatmap), np.asarray(mask)
        _check_refinement_inputs(image, heatmap, mask)
        stain_seed, geometry_seed = np.random.SeedSequence(seed).generate_state(2)
        stain_rng = np.random.default_rng(stain_seed)
        if stain_rng.random() < config.p_stain:
            image = stain_augment(image, stain_rng, config.stain_sigma1, config.stain_sigma2)
        rgb = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        stacked = np.concatenate([rgb, heatmap.reshape(*heatmap.shape[:2], 1).astype(np.float32)], axis=2)
        out = pipelines.seeded(int(geometry_seed))(image=stacked, mask=mask.astype(np.uint8))
        new_rgb, new_heat = out["image"][..., :3], out["image"][..., 3]
        if image.dtype == np.uint8:
            new_image = np.rint(np.clip(new_rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
        else:
            new_image = np.ascontiguousarray(new_rgb, dtype=image.dtype)
        new_heat = np.ascontiguousarray(new_heat.reshape(*new_heat.shape[:2], *heatmap.shape[2:]), dtype=heatmap.dtype)
        return new_image, new_heat, np.ascontiguousarray(out["mask"].astype(mask.dtype))

    return augment


def multiview_augmenter(config: MultiviewAugmentConfig | None = None):
    """``augment(views, target, seed) -> (views, target)`` (a
    :data:`h2g.data.dataset.SampleAugment`): ``views`` ``{name: (S, S, 3) uint8}`` of one
    size, ``target`` an ``(S, S)`` uint8 label map (or None).  Deterministic per seed,
    from any thread."""
    config = config or MultiviewAugmentConfig()
    pipelines: dict[tuple, _ThreadPipelines] = {}
    lock = threading.Lock()

    def augment(views: dict, target, seed: int):
        names = tuple(views)
        sizes = {np.asarray(v).shape for v in views.values()}
        if len(sizes) != 1 or len(next(iter(sizes))) != 3:
            raise ValueError(f"views must be (S, S, 3) images of one size, got {sorted(sizes)}")
        with lock:
            if names not in pipelines:
                pipelines[names] = _ThreadPipelines(lambda: multiview_pipeline(config, names))
        feed = {"image": np.asarray(views[names[0]]), **{n: np.asarray(views[n]) for n in names[1:]}}
        if target is not None:
            feed["mask"] = np.asarray(target, np.uint8)
        out = pipelines[names].seeded(seed)(**feed)
        result = {names[0]: np.ascontiguousarray(out["image"]),
                  **{n: np.ascontiguousarray(out[n]) for n in names[1:]}}
        return result, (None if target is None else np.ascontiguousarray(out["mask"]))

    return augment


def _check_refinement_inputs(image: np.ndarray, heatmap: np.ndarray, mask: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (h, w, 3) image, got shape {image.shape}")
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected a uint8 or floating-point image, got dtype {image.dtype}")
    size = image.shape[:2]
    if heatmap.shape not in (size, (*size, 1)):
        raise ValueError(f"heatmap shape {heatmap.shape} does not match image size {size}")
    if mask.shape != size:
        raise ValueError(f"mask shape {mask.shape} does not match image size {size}")


# ---------------------------------------------------------------------- m-UNet
MUNET_AUGMENTATIONS = ("basic", "colour", "noise", "heavy", "hsv", "jitter")
# m-UNet's Table 6: saturation / value shifts (0..255 units) of brown (DAB) and blue
# (haematoxylin) nuclei in HSV
TARGETED_HSV = {"brown": ((-30, 81), (-80, 81)), "blue": ((-40, 61), (-60, 61))}
# OpenCV hue (0..179) ranges of the two colours, and the least saturation of a stained pixel
HUE_RANGES = {"brown": (3, 30), "blue": (100, 160)}
STAINED_SATURATION = 35
JITTER = 0.06  # XY jitter: up to this fraction of the high view's side


def parse_munet_augment(spec: str) -> tuple[str, ...]:
    """``"basic+heavy+noise"`` -> its parts, checked against :data:`MUNET_AUGMENTATIONS`."""
    from h2g.core.errors import ConfigError

    parts = tuple(p.strip() for p in spec.split("+") if p.strip())
    unknown = [p for p in parts if p not in MUNET_AUGMENTATIONS]
    if unknown or not parts:
        raise ConfigError(f"unknown m-UNet augmentation(s) {unknown or spec!r}; join some of "
                          f"{', '.join(MUNET_AUGMENTATIONS)} with '+'")
    return parts


def targeted_hsv(images: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """m-UNet's targeted HSV augmentation: only the stained nuclei change.  Pixels whose
    hue is brown (DAB) or blue (haematoxylin) and whose saturation is above
    :data:`STAINED_SATURATION` get one saturation and one value shift per colour, drawn
    from :data:`TARGETED_HSV` (the paper's Table 6); every other pixel is unchanged.
    The same shifts go to every image (the views of one sample)."""
    shifts = {c: (rng.uniform(*s), rng.uniform(*v)) for c, (s, v) in TARGETED_HSV.items()}
    out = []
    for image in images:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float32)
        for colour, (lo, hi) in HUE_RANGES.items():
            where = (hsv[..., 0] >= lo) & (hsv[..., 0] <= hi) & (hsv[..., 1] > STAINED_SATURATION)
            ds, dv = shifts[colour]
            hsv[..., 1][where] += ds
            hsv[..., 2][where] += dv
        hsv = np.clip(np.rint(hsv), 0, 255).astype(np.uint8)
        out.append(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))
    return out


def _shift(array: np.ndarray, dx: int, dy: int, fill) -> np.ndarray:
    """``array`` moved by (dx, dy) pixels; uncovered pixels ``fill`` (``"reflect"`` or a value)."""
    if dx == 0 and dy == 0:
        return array
    h, w = array.shape[:2]
    pad = ((abs(dy), abs(dy)), (abs(dx), abs(dx))) + ((0, 0),) * (array.ndim - 2)
    padded = (np.pad(array, pad, mode="reflect") if fill == "reflect"
              else np.pad(array, pad, constant_values=fill))
    top, left = abs(dy) - dy, abs(dx) - dx
    return np.ascontiguousarray(padded[top:top + h, left:left + w])


def munet_pipeline(parts: tuple[str, ...], names: tuple[str, ...], targets: tuple[str, ...]) -> A.Compose:
    """The albumentations part of :func:`munet_augmenter`: flips and 90-degree rotations
    (about the centre, so co-centred views stay aligned), colour jitter, heavy colour
    augmentation and noise, the same on every view; targets move with the views."""
    steps = []
    if "basic" in parts:
        steps += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
    if "colour" in parts:
        steps.append(A.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.04, p=0.8))
    if "heavy" in parts:
        steps += [A.HueSaturationValue(hue_shift_limit=40, sat_shift_limit=60, val_shift_limit=30, p=0.8),
                  A.RGBShift(r_shift_limit=30, g_shift_limit=30, b_shift_limit=30, p=0.5),
                  A.RandomGamma(gamma_limit=(70, 150), p=0.5)]
    if "noise" in parts:
        steps += [A.GaussNoise(std_range=(0.01, 0.05), p=0.5), A.GaussianBlur(blur_limit=(3, 5), p=0.2)]
    extra = {n: "image" for n in names[1:]}
    extra.update({f"target_{n}": "mask" for n in targets})
    return A.Compose(steps, additional_targets=extra)


def munet_augmenter(spec: str, ratios: dict[str, float] | None = None):
    """``augment(views, targets, seed) -> (views, targets)`` for m-UNet samples:
    ``views`` ``{name: (S, S, 3) uint8}`` co-centred; ``targets`` ``{name: (S, S) uint8}``
    (label maps of some views) or one label map of the first view, or None.  ``spec``
    joins parts of :data:`MUNET_AUGMENTATIONS` with ``+`` (Table 8 of the paper):
    ``basic`` flips / 90-degree rotations, ``colour`` jitter, ``heavy`` colour
    augmentation, ``noise``, ``hsv`` the targeted HSV augmentation
    (:func:`targeted_hsv`), ``jitter`` an XY shift of up to :data:`JITTER` of the view,
    ``ratios[name]`` times smaller in view ``name`` (the view's magnification over the
    first view's), so the views stay co-centred.  Deterministic per seed, any thread."""
    parts = parse_munet_augment(spec)
    ratios = dict(ratios or {})
    pipelines: dict[tuple, _ThreadPipelines] = {}
    lock = threading.Lock()

    def augment(views: dict, targets, seed: int):
        names = tuple(views)
        single = targets is not None and not isinstance(targets, dict)
        labels = {names[0]: targets} if single else dict(targets or {})
        key = (names, tuple(labels))
        with lock:
            if key not in pipelines:
                pipelines[key] = _ThreadPipelines(lambda: munet_pipeline(parts, names, tuple(labels)))
        feed = {"image": np.asarray(views[names[0]]), **{n: np.asarray(views[n]) for n in names[1:]},
                **{f"target_{n}": np.asarray(t, np.uint8) for n, t in labels.items()}}
        out = pipelines[key].seeded(seed)(**feed)
        result = {names[0]: out["image"], **{n: out[n] for n in names[1:]}}
        labels = {n: out[f"target_{n}"] for n in labels}
        rng = np.random.default_rng([int(seed), 0x45C])
        if "hsv" in parts:
            result = dict(zip(names, targeted_hsv([result[n] for n in names], rng)))
        if "jitter" in parts:
            size = result[names[0]].shape[0]
            dx, dy = (int(v) for v in rng.integers(-int(JITTER * size), int(JITTER * size) + 1, 2))
            for n in names:
                r = ratios.get(n, 1.0)
                result[n] = _shift(result[n], int(round(dx * r)), int(round(dy * r)), "reflect")
                if n in labels:
                    labels[n] = _shift(labels[n], int(round(dx * r)), int(round(dy * r)), 255)
        result = {n: np.ascontiguousarray(v) for n, v in result.items()}
        labels = {n: np.ascontiguousarray(v) for n, v in labels.items()}
        if targets is None:
            return result, None
        return result, (labels[names[0]] if single else labels)

    return augment
