"""Data-side speed-ups: the decode-once image cache and the linear probe's frozen-feature cache.

Both run on a BUSI-sized PNG folder: ``../shared/data/busi`` when present, else 780 synthetic
256 x 256 PNGs (437 / 210 / 133 per class, as BUSI) written to a temporary folder.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from benchmarks.harness import IMAGE_SIZE, ROOT, VIT, Timings, classifier, now, precision, ratio, seconds

BUSI = ROOT.parent / "shared" / "data" / "busi"
BUSI_CLASSES = {"benign": 437, "malignant": 210, "normal": 133}


def png_folder(tmp: Path) -> tuple[Path, str]:
    """The BUSI folder when present, else a synthetic one of the same size under ``tmp``."""
    if BUSI.is_dir():
        return BUSI, "busi"
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in BUSI_CLASSES.items():
        (tmp / cls).mkdir(parents=True)
        for i in range(n):
            # Smooth structure plus speckle, so PNG compression (and decoding cost) is like ultrasound.
            coarse = rng.random((8, 8)) * 200
            img = np.kron(coarse, np.ones((32, 32))) + rng.normal(0, 12, (256, 256))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("RGB").save(tmp / cls / f"{cls} ({i}).png")
    return tmp, "synthetic"


def _datamodule(root: Path, cache_dir: Path, **kwargs: Any) -> Any:
    from datamodules import ImageFolderDataModule

    return ImageFolderDataModule(root=str(root), cache_dir=str(cache_dir), image_size=IMAGE_SIZE, batch_size=8, **kwargs)


def _iterate(dm: Any, epoch: int) -> None:
    train = dm.train_dataloader()
    train.sampler.set_epoch(epoch)
    for loader in (train, dm.val_dataloader()):
        for _ in loader:
            pass


def cached_epoch_ratio(root: Path, rounds: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Data loading of a cached epoch / of the first epoch, which decodes every image into the cache.

    First epoch: datamodule built on an empty cache dir, ``prepare_data`` (decode all images),
    ``setup``, then one pass over the train and val loaders. Cached epoch: the next pass. Default
    loader settings (augmentation on, ``default_num_workers()``).
    """
    first, cached, warm_start = Timings(), Timings(), Timings()
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as cache_dir:
            w0, c0 = now()
            dm = _datamodule(root, Path(cache_dir))
            dm.prepare_data()
            dm.setup("fit")
            _iterate(dm, 0)
            w1, c1 = now()
            _iterate(dm, 1)
            w2, c2 = now()
            fresh = _datamodule(root, Path(cache_dir))  # a new run on the same data: cache found, not rebuilt
            fresh.prepare_data()
            fresh.setup("fit")
            _iterate(fresh, 0)
            w3, c3 = now()
        for t, (a, b) in ((first, (w1 - w0, c1 - c0)), (cached, (w2 - w1, c2 - c1)), (warm_start, (w3 - w2, c3 - c2))):
            t.wall.append(a)
            t.cpu.append(b)
    times = {"first_epoch": first, "cached_epoch": cached, "new_run_first_epoch": warm_start}
    return ratio(cached, first), {"seconds": seconds(times), "images": sum(1 for _ in root.rglob("*.png"))}


class _EpochClock(L.Callback):
    def __init__(self) -> None:
        self.epochs = Timings()
        self._start = (0.0, 0.0)

    def on_train_epoch_start(self, *args: Any) -> None:
        self._start = now()

    def on_train_epoch_end(self, *args: Any) -> None:
        end = now()
        self.epochs.wall.append(end[0] - self._start[0])
        self.epochs.cpu.append(end[1] - self._start[1])


def _linear_probe_epochs(dm: Any, cache_features: bool, epochs: int) -> Timings:
    from peft_methods import LinearProbe

    module = classifier(VIT, LinearProbe(), lr_scheduler=None, cache_features=cache_features)
    clock = _EpochClock()
    with tempfile.TemporaryDirectory() as root:  # the run's fit summary lands here, not in the cwd
        trainer = L.Trainer(
            accelerator="cpu", devices=1, precision=precision(), max_epochs=epochs, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock], default_root_dir=root,
        )
        trainer.fit(module, datamodule=dm)
    return clock.epochs


def linear_probe_cached_ratio(root: Path, train_fraction: float, rounds: int, epochs: int = 3) -> tuple[dict[str, float], dict[str, Any]]:
    """LinearProbe training epoch with cached frozen features / without (ViT-S, 224 px, batch 8, no
    augmentation). Each fit runs ``epochs`` epochs; the first (warm-up, and for the cache its filling
    epoch) is excluded, the rest are the measured epochs."""
    with tempfile.TemporaryDirectory() as cache_dir:
        dm = _datamodule(root, Path(cache_dir), augment=False, train_fraction=train_fraction)
        dm.prepare_data()
        per_round = {"uncached": Timings(), "cached": Timings(), "cache_filling_epoch": Timings()}
        for r in range(rounds):
            for cached in (False, True) if r % 2 == 0 else (True, False):
                t = _linear_probe_epochs(dm, cached, epochs)
                name = "cached" if cached else "uncached"
                per_round[name].wall.append(statistics.median(t.wall[1:]))
                per_round[name].cpu.append(statistics.median(t.cpu[1:]))
                if cached:
                    per_round["cache_filling_epoch"].wall.append(t.wall[0])
                    per_round["cache_filling_epoch"].cpu.append(t.cpu[0])
        train_images = len(dm.train_dataloader().dataset)
    details = {"seconds_per_epoch": seconds(per_round), "train_images": train_images, "train_fraction": train_fraction}
    return ratio(per_round["cached"], per_round["uncached"]), details
