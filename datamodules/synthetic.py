"""Procedural "lesion-like" images: a learnable, file-free dataset for demos, smoke tests and CI.

Each image is skin / tissue-coloured noisy background with one blob; the blob's shape or texture
is the class. Position, size, rotation, aspect, colours, contrast, shading and noise are random,
so the task is not trivial, yet a pretrained CNN separates the classes within a few epochs.
Every image depends only on (seed, split, index): a larger ``num_train`` adds images and keeps
the existing ones identical.
"""

from __future__ import annotations

import numpy as np

from datamodules.base import SPLITS, ImageClassificationDataModule, SplitData

CLASS_NAMES = ("round", "spiculated", "ring", "lobulated", "speckled", "target", "pale")
_N_PARAMS = 17  # uniforms drawn per image


class SyntheticDataModule(ImageClassificationDataModule):
    """Synthetic lesion classification with ``num_classes`` balanced classes (2-7).

    Classes (first ``num_classes`` of): round (smooth ellipse), spiculated (spiky border), ring
    (dark core), lobulated (few large lobes), speckled (dotted interior), target (bull's eye),
    pale (lighter than the skin).

    Args:
        num_classes: Number of classes, 2 to 7.
        num_train, num_val, num_test: Split sizes.
        channels: 3 (RGB) or 1 (grayscale).
        image_size: Side of the generated (and batch) images.
        batch_size, num_workers, seed, train_fraction, shots_per_class, augment, pin_memory: see
            ``ImageClassificationDataModule``; ``seed`` also seeds the images.
    """

    def __init__(
        self,
        num_classes: int = 3,
        num_train: int = 600,
        num_val: int = 150,
        num_test: int = 300,
        channels: int = 3,
        image_size: int = 64,
        batch_size: int = 32,
        num_workers: int | None = None,
        seed: int = 42,
        train_fraction: float = 1.0,
        shots_per_class: int | None = None,
        augment: bool = True,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            image_size=image_size,
            seed=seed,
            train_fraction=train_fraction,
            shots_per_class=shots_per_class,
            augment=augment,
            pin_memory=pin_memory,
        )
        if not 2 <= num_classes <= len(CLASS_NAMES):
            raise ValueError(
                f"num_classes={num_classes} is unsupported; SyntheticDataModule makes 2 to {len(CLASS_NAMES)}."
            )
        sizes = {"train": num_train, "val": num_val, "test": num_test}
        if min(sizes.values()) < 1:
            raise ValueError(f"split sizes {sizes} must all be >= 1.")
        self.sizes = sizes
        task = "binary" if num_classes == 2 else "multiclass"
        self._set_classes(CLASS_NAMES[:num_classes], task, channels)
        self._check_eval_classes(
            {s: self.labels(s) for s in ("val", "test")}, f"num_{{split}} >= num_classes={num_classes}"
        )
        self._set_train_labels(self.labels("train"))

    def labels(self, split: str) -> np.ndarray:
        """Class per index (cycling through the classes, hence balanced)."""
        return np.arange(self.sizes[split], dtype=np.int64) % self.num_classes

    def _load_splits(self) -> dict[str, SplitData]:
        out = {}
        for s in SPLITS:
            labels = self.labels(s)
            images = render(labels, self.image_size, self.channels, self.seed, SPLITS.index(s))
            out[s] = SplitData(images, labels, [f"{s}_{i:06d}" for i in range(len(labels))])
        return out


def render(labels: np.ndarray, size: int, channels: int, seed: int, stream: int = 0) -> np.ndarray:
    """Renders one image per label as uint8 [N, channels, size, size].

    Image ``i`` uses its own generator seeded by (seed, stream, i), so it is reproducible alone.
    """
    n = len(labels)
    out = np.empty((n, channels, size, size), dtype=np.uint8)
    chunk = max(1, 2**22 // (size * size))  # bounds the float temporaries to ~16 MB each
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk))
        out[idx] = _render_chunk(labels[idx], idx, size, channels, seed % 2**32, stream)
    return out


def _render_chunk(
    labels: np.ndarray, idx: np.ndarray, s: int, channels: int, seed: int, stream: int
) -> np.ndarray:
    rngs = [np.random.default_rng([seed, stream, int(i)]) for i in idx]
    p = np.stack([r.random(_N_PARAMS) for r in rngs]).astype(np.float32).T[:, :, None, None]  # [P, N, 1, 1]
    noise = np.stack([r.standard_normal((s, s), dtype=np.float32) for r in rngs])
    cls = [(labels == k)[:, None, None] for k in range(len(CLASS_NAMES))]

    grid = (np.arange(s, dtype=np.float32) + 0.5) / s
    x, y = grid[None, None, :], grid[None, :, None]
    # Blob geometry in units of its radius, rotated and squashed.
    cx, cy, r0 = 0.3 + 0.4 * p[0], 0.3 + 0.4 * p[1], 0.14 + 0.1 * p[2]
    phi, aspect = 2 * np.pi * p[3], 0.7 + 0.3 * p[4]
    dx, dy = (x - cx) / r0, (y - cy) / r0
    u = dx * np.cos(phi) + dy * np.sin(phi)
    v = (-dx * np.sin(phi) + dy * np.cos(phi)) / aspect
    rho, theta = np.sqrt(u * u + v * v), np.arctan2(v, u)

    # Border radius: spikes (7-12 of them) or 3-4 lobes for two classes, smooth for the rest.
    spikes = np.round(7 + 5 * p[5])
    lobes = np.round(3 + p[5])
    border = 1.0 + cls[1] * (0.55 * np.abs(np.cos(spikes * theta / 2)) ** 8 - 0.15)
    border = border + cls[3] * 0.3 * np.sin(lobes * theta + 2 * np.pi * p[6])
    soft = 0.07
    blob = _sigmoid((border - rho) / soft)
    core = _sigmoid((0.35 + 0.15 * p[7] - rho) / soft)
    band = _sigmoid((rho - 0.45) / soft) * _sigmoid((0.7 - rho) / soft)
    freq = 2.5 + 1.5 * p[8]
    dots = (np.sin(freq * np.pi * u) * np.sin(freq * np.pi * v) > 0.3).astype(np.float32)

    # Weight of the lesion colour per pixel, and a darkening factor for the ring's core.
    weight = blob * (1 - cls[5] * band * 0.85) * (1 - cls[4] * dots * 0.6)
    darken = 1 - cls[2] * core * (0.45 + 0.15 * p[9])

    skin = np.array([215, 165, 140], np.float32)[None, :, None, None]
    lesion = np.array([125, 80, 60], np.float32)[None, :, None, None]
    jitter = (p[10:13, :, 0, 0].T - 0.5)[:, :, None, None]  # [N, 3, 1, 1] per-channel colour jitter
    bg = skin + 30 * jitter
    fg = np.where(cls[6][:, None], bg + 35, lesion + 40 * jitter)  # "pale" lesions are lighter
    alpha = (0.6 + 0.35 * p[13])[:, None]
    shade = 25 * ((x - 0.5) * np.cos(2 * np.pi * p[14]) + (y - 0.5) * np.sin(2 * np.pi * p[14]))
    texture = 5 * np.sin(2 * np.pi * (6 + 6 * p[15]) * (x * np.cos(phi) + y * np.sin(phi)))
    w = alpha * weight[:, None]
    img = (bg * (1 - w) + fg * w) * darken[:, None] + (shade + texture)[:, None]
    img = img + (6 + 6 * p[16])[:, None] * noise[:, None]
    if channels == 1:
        img = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2])[:, None]
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))
