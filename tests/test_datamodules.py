"""Tests of datamodules/: splits, low-data subsets, MedMNIST, folders / CSVs, cache, synthetic data."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import medmnist
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import (
    CSVDataModule,
    ImageFolderDataModule,
    MedMNISTDataModule,
    SyntheticDataModule,
    low_data_subset,
    stratified_split,
)
from datamodules import cache as cache_mod
from datamodules.base import default_num_workers

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
#: Val / test fractions that give a few-image folder every class in val and in test.
SMALL = {"val_fraction": 0.25, "test_fraction": 0.25}


# ---------------------------------------------------------------------------- fabricated data
def make_npz(
    path: Path,
    flag_labels: int = 2,
    column: bool = False,
    rgb: bool = False,
    size: int = 28,
    multilabel: int = 0,
    n=(40, 10, 20),
) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n, strict=True):
        shape = (k, size, size, 3) if rgb else (k, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if multilabel:
            lab = rng.integers(0, 2, (k, multilabel), dtype=np.uint8)
        else:
            lab = (np.arange(k) % flag_labels).astype(np.uint8)
            lab = lab[:, None] if column else lab
        arrays[f"{split}_labels"] = lab
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def write_png(path: Path, seed: int, mode: str = "RGB", size=(14, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def make_folder(root: Path, counts=None, mode: str = "RGB") -> Path:
    counts = counts or {"benign": 20, "malignant": 10, "normal": 10}
    for c, (cls, n) in enumerate(counts.items()):
        for i in range(n):
            write_png(root / cls / f"{cls} ({i}).png", 1000 * c + i, mode)
        write_png(root / cls / f"{cls} (0)_mask.png", 1, "L")  # BUSI-style masks are skipped
        write_png(root / cls / f"{cls} (0)_mask_1.png", 2, "L")
    return root


def folder_dm(root: Path, cache: Path, **kw) -> ImageFolderDataModule:
    kw = {"image_size": 8, "num_workers": 0, "batch_size": 4, "cache_dir": str(cache), **kw}
    return ImageFolderDataModule(str(root), **kw)


def make_csv(tmp: Path, n_groups: int = 30) -> Path:
    rows = ["path,label,patient"]
    rng = np.random.default_rng(1)
    for g in range(n_groups):
        label = ["nevus", "melanoma"][g % 2]
        for j in range(int(rng.integers(1, 4))):
            rel = f"img/p{g}_{j}.png"
            write_png(tmp / rel, g * 10 + j)
            rows.append(f"{rel},{label},P{g}")
    csv = tmp / "labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


# ---------------------------------------------------------------------------- splits
def test_stratified_split_disjoint_covering_stratified_deterministic():
    labels = np.repeat([0, 1, 2], [500, 300, 200])
    s = stratified_split(labels, FRACTIONS, seed=0)
    allidx = np.concatenate(list(s.values()))
    assert len(allidx) == 1000 and len(np.unique(allidx)) == 1000  # disjoint + covering
    for name, frac in FRACTIONS.items():
        assert abs(len(s[name]) - frac * 1000) <= 2
        for cls, n in enumerate((500, 300, 200)):
            assert abs((labels[s[name]] == cls).sum() - frac * n) <= 2
    again = stratified_split(labels, FRACTIONS, seed=0)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    other = stratified_split(labels, FRACTIONS, seed=1)
    assert not np.array_equal(s["test"], other["test"])


def test_stratified_split_grouped_keeps_groups_together():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, 300)
    groups = np.repeat(np.arange(300), sizes)
    labels = np.repeat(np.arange(300) % 3, sizes)
    s = stratified_split(labels, FRACTIONS, seed=3, groups=[f"patient{g}" for g in groups])
    assert sorted(np.concatenate(list(s.values()))) == list(range(len(labels)))
    sets = {k: set(groups[v]) for k, v in s.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    for name, frac in FRACTIONS.items():
        assert abs(len(s[name]) / len(labels) - frac) < 0.02
        assert abs((labels[s[name]] == 2).mean() - 1 / 3) < 0.08


def test_stratified_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to 0.9"):
        stratified_split([0, 1, 0, 1], {"train": 0.8, "test": 0.1})


# ---------------------------------------------------------------------------- low-data subsets
def test_low_data_subset_nested_stratified_seeded():
    labels = np.repeat([0, 1, 2], [100, 50, 10])
    prev = set()
    for frac in (0.02, 0.05, 0.1, 0.5, 1.0):
        sub = low_data_subset(labels, train_fraction=frac, seed=7)
        assert prev <= set(sub)  # nested
        counts = np.bincount(labels[sub], minlength=3)
        expected = [max(1, int(np.floor(frac * n + 0.5))) for n in (100, 50, 10)]
        assert counts.tolist() == expected
        prev = set(sub)
    prev = set()
    for k in (1, 2, 5, 10):
        sub = low_data_subset(labels, shots_per_class=k, seed=7)
        assert np.bincount(labels[sub]).tolist() == [k, k, k]
        assert prev <= set(sub)
        prev = set(sub)
    a, b = low_data_subset(labels, 0.1, seed=7), low_data_subset(labels, 0.1, seed=8)
    assert np.array_equal(a, low_data_subset(labels, 0.1, seed=7)) and not np.array_equal(a, b)


def test_low_data_subset_multilabel_and_errors():
    multi = np.random.default_rng(0).integers(0, 2, (200, 5))
    small, big = low_data_subset(multi, 0.05, seed=1), low_data_subset(multi, 0.2, seed=1)
    assert len(small) == 10 and len(big) == 40 and set(small) <= set(big)
    with pytest.raises(ValueError, match="shots_per_class=2 .*multi-label"):
        low_data_subset(multi, shots_per_class=2)
    labels = np.repeat([0, 1], [30, 4])
    with pytest.raises(ValueError, match="shots_per_class=5 exceeds the 4 .*class 'tumour'"):
        low_data_subset(labels, shots_per_class=5, class_names=["healthy", "tumour"])
    for frac in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"train_fraction={frac} is outside"):
            low_data_subset(labels, train_fraction=frac)
    with pytest.raises(ValueError, match="both set"):
        low_data_subset(labels, train_fraction=0.5, shots_per_class=2)


# ---------------------------------------------------------------------------- MedMNIST
@pytest.mark.parametrize("column", [False, True], ids=["labels(N,)", "labels(N,1)"])
def test_medmnist_npz_properties_and_batches(tmp_path, column):
    make_npz(tmp_path / "breastmnist.npz", column=column)
    dm = MedMNISTDataModule(root=str(tmp_path), num_workers=0, batch_size=8)
    assert (dm.num_classes, dm.task, dm.channels, dm.image_size) == (2, "binary", 1, 28)
    assert dm.class_names == ["malignant", "normal, benign"]
    dm.setup("fit")
    assert dm.split_sizes == {"train": 40, "val": 10, "test": 20}
    assert dm.subset_counts == {"malignant": 20, "normal, benign": 20}
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (8, 1, 28, 28) and batch["image"].dtype == torch.uint8
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [0, 1] * 4
    assert batch["id"][:2] == ["val_000000", "val_000001"]
    raw = np.load(tmp_path / "breastmnist.npz")["val_images"][:8]
    assert np.array_equal(batch["image"][:, 0].numpy(), raw)  # eval path does not alter pixels


def test_medmnist_rgb_sizes_and_npz_path(tmp_path):
    npz = make_npz(tmp_path / "pathmnist_64.npz", flag_labels=9, rgb=True, size=64, n=(18, 9, 9))
    dm = MedMNISTDataModule(
        flag="PathMNIST", size=64, root=str(tmp_path), image_size=32, num_workers=0, batch_size=5
    )
    assert (dm.num_classes, dm.task, dm.channels, dm.image_size) == (9, "multiclass", 3, 32)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (5, 3, 32, 32)
    custom = npz.rename(tmp_path / "my_copy.npz")
    assert MedMNISTDataModule(flag="pathmnist", size=64, root=str(custom), num_workers=0).image_size == 64
    with pytest.raises(ValueError, match="holds 64 px images but size=28"):
        MedMNISTDataModule(flag="pathmnist", size=28, root=str(custom))


def test_medmnist_chest_is_multilabel(tmp_path):
    make_npz(tmp_path / "chestmnist.npz", multilabel=14)
    dm = MedMNISTDataModule(
        flag="chestmnist", root=str(tmp_path), num_workers=0, batch_size=4, train_fraction=0.5
    )
    assert (dm.num_classes, dm.task) == (14, "multilabel")
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].dtype == torch.float32 and batch["label"].shape == (4, 14)
    assert dm.split_sizes["train"] == 20
    with pytest.raises(ValueError, match="multi-label"):
        MedMNISTDataModule(flag="chestmnist", root=str(tmp_path), shots_per_class=1)


def test_medmnist_download_uses_medmnist(tmp_path, monkeypatch):
    calls = []

    class FakeDownloader:  # stands in for medmnist.BreastMNIST: no network in tests
        def __init__(self, split, root, size, download):
            calls.append((split, root, size, download))
            make_npz(Path(root) / "breastmnist_64.npz", size=64)

    monkeypatch.setattr(medmnist, "BreastMNIST", FakeDownloader)
    dm = MedMNISTDataModule(size=64, root=str(tmp_path / "new"), download=True)
    assert calls == [("train", str(tmp_path / "new"), 64, True)] and dm.image_size == 64
    MedMNISTDataModule(size=64, root=str(tmp_path / "new"), download=True)  # present: not fetched again
    assert len(calls) == 1


def test_medmnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/dermamnist_128.npz.*download: true"):
        MedMNISTDataModule(flag="dermamnist", size=128, root=str(tmp_path))
    bad = tmp_path / "breastmnist.npz"
    np.savez(bad, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros(2))
    with pytest.raises(ValueError, match=f"{bad} lacks the MedMNIST keys.*'val_images'.*'test_labels'"):
        MedMNISTDataModule(root=str(tmp_path))
    with pytest.raises(ValueError, match="'organmnist3d' is a 3D dataset.*breastmnist"):
        MedMNISTDataModule(flag="organmnist3d", root=str(tmp_path))
    with pytest.raises(ValueError, match="size=32"):
        MedMNISTDataModule(size=32, root=str(tmp_path))


# ---------------------------------------------------------------------------- image folders
def test_folder_properties_split_and_batches(tmp_path):
    root = make_folder(tmp_path / "data")
    dm = folder_dm(root, tmp_path / "cache")
    assert dm.class_names == ["benign", "malignant", "normal"]
    assert (dm.num_classes, dm.task, dm.channels, dm.image_size) == (3, "multiclass", 3, 8)
    assert len(dm.files) == 40 and not any("_mask" in f.name for f in dm.files)
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"train": 28, "val": 4, "test": 8}
    assert np.bincount(dm.labels[dm.splits["test"]]).tolist() == [4, 2, 2]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["image"].dtype == torch.uint8
    assert batch["label"].dtype == torch.int64
    again = folder_dm(root, tmp_path / "cache")
    assert next(iter(again.train_dataloader()))["id"] == batch["id"]  # seeded shuffling
    predicted = [i for b in dm.predict_dataloader() for i in b["id"]]
    assert predicted == [dm.ids[i] for i in dm.splits["test"]]
    gray = folder_dm(make_folder(tmp_path / "gray", {"a": 5, "b": 5}, mode="L"), tmp_path / "cache", **SMALL)
    assert (gray.channels, gray.task) == (1, "binary")
    assert next(iter(gray.val_dataloader()))["image"].shape[1] == 1


def test_folder_low_data_subsets_nested(tmp_path):
    root = make_folder(tmp_path / "data")
    ids = {}
    for k in (1, 2, 5):
        dm = folder_dm(root, tmp_path / "cache", shots_per_class=k)
        dm.setup()
        assert dm.subset_counts == {"benign": k, "malignant": k, "normal": k}
        ids[k] = {i for b in dm.train_dataloader() for i in b["id"]}
    assert ids[1] <= ids[2] <= ids[5] and len(ids[5]) == 15
    with pytest.raises(
        ValueError, match="shots_per_class=8 exceeds the 7 training samples of class 'malignant'"
    ):
        folder_dm(root, tmp_path / "cache", shots_per_class=8)


def test_folder_loader_with_worker_process(tmp_path):
    dm = folder_dm(make_folder(tmp_path / "data", {"a": 6, "b": 6}), tmp_path / "cache", num_workers=1, **SMALL)
    ids = [i for b in dm.test_dataloader() for i in b["id"]]
    assert len(ids) == len(dm.splits["test"]) and default_num_workers() >= 0


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/nowhere does not exist"):
        ImageFolderDataModule(str(tmp_path / "nowhere"))
    (tmp_path / "flat").mkdir()
    write_png(tmp_path / "flat" / "x.png", 0)
    with pytest.raises(ValueError, match=f"{tmp_path}/flat has no class sub-folders"):
        ImageFolderDataModule(str(tmp_path / "flat"))
    root = make_folder(tmp_path / "data", {"a": 3, "b": 3})
    (root / "c").mkdir()
    with pytest.raises(ValueError, match=f"class folder {root}/c holds no images"):
        ImageFolderDataModule(str(root))


# ---------------------------------------------------------------------------- cache
@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = cache_mod.decode_image

    def counting(path, size, channels):
        calls.append(path)
        return real(path, size, channels)

    monkeypatch.setattr(cache_mod, "decode_image", counting)
    return calls


def test_cache_reused_then_invalidated(tmp_path, monkeypatch, count_decodes):
    root = make_folder(tmp_path / "data", {"a": 5, "b": 5})
    dm = folder_dm(root, tmp_path / "cache", **SMALL)
    dm.setup()
    assert len(count_decodes) == 10
    first = next(iter(dm.test_dataloader()))["image"]

    def fail(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_mod, "decode_image", fail)
    dm2 = folder_dm(root, tmp_path / "cache", **SMALL)
    assert torch.equal(next(iter(dm2.test_dataloader()))["image"], first)

    monkeypatch.setattr(
        cache_mod, "decode_image", lambda *a: count_decodes.append(a) or np.zeros((3, 8, 8), np.uint8)
    )
    target = root / "a" / "a (0).png"
    write_png(target, 999)
    os.utime(target, ns=(1, 1))  # a new mtime even on coarse-grained file systems
    folder_dm(root, tmp_path / "cache", **SMALL).setup()
    assert len(count_decodes) == 20
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "sidecar"])
def test_corrupt_cache_is_rebuilt(tmp_path, count_decodes, damage):
    root = make_folder(tmp_path / "data", {"a": 4, "b": 4})
    folder_dm(root, tmp_path / "cache", **SMALL).setup()
    npy = next((tmp_path / "cache").glob("*.npy"))
    if damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:-50])
    else:
        npy.with_suffix(".json").write_text(json.dumps({"key": "wrong"}))
    dm = folder_dm(root, tmp_path / "cache", **SMALL)
    dm.setup()
    assert len(count_decodes) == 16 and sum(dm.split_sizes.values()) == 8
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def test_unreadable_image_error_and_skip(tmp_path):
    root = make_folder(tmp_path / "data", {"a": 6, "b": 6})
    bad = root / "b" / "b (3).png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    dm = folder_dm(root, tmp_path / "cache", **SMALL)
    with pytest.raises(ValueError, match=r"cannot read image .*b \(3\)\.png.*skip_corrupt: true"):
        dm.setup()
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written is left behind
    dm = folder_dm(root, tmp_path / "cache", skip_corrupt=True, **SMALL)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image"):
        dm.setup()
    assert sum(dm.split_sizes.values()) == 11
    assert "b/b (3).png" not in [i for b in dm.train_dataloader() for i in b["id"]]


# ---------------------------------------------------------------------------- CSV
def test_csv_grouped_split_and_paths(tmp_path):
    csv = make_csv(tmp_path)
    dm = CSVDataModule(
        str(csv),
        group_column="patient",
        image_size=8,
        cache_dir=str(tmp_path / "c"),
        num_workers=0,
        batch_size=4,
        seed=5,
    )
    assert (dm.class_names, dm.task, dm.channels) == (["melanoma", "nevus"], "binary", 3)
    patients = np.array([i.split("/")[1].split("_")[0] for i in dm.ids])
    sets = {k: set(patients[v]) for k, v in dm.splits.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert sum(len(v) for v in dm.splits.values()) == len(dm.ids)
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape[1:] == (3, 8, 8)
    moved = tmp_path / "tables" / "labels.csv"
    moved.parent.mkdir()
    csv.rename(moved)
    dm2 = CSVDataModule(
        str(moved), image_root=str(tmp_path), class_names=["nevus", "melanoma"], num_workers=0
    )
    assert dm.labels[0] == 1 and dm2.labels[0] == 0  # row 0 is a nevus


def test_csv_split_column_and_errors(tmp_path, caplog):
    for i in range(8):
        write_png(tmp_path / f"{i}.png", i)
    csv = tmp_path / "s.csv"
    parts = ["train"] * 4 + ["val", "val", "TEST", "test"]
    csv.write_text("file,dx,split\n" + "".join(f"{i}.png,{'ab'[i % 2]},{s}\n" for i, s in enumerate(parts)))
    args = {"csv_path": str(csv), "path_column": "file", "label_column": "dx", "split_column": "split"}
    dm = CSVDataModule(**args, num_workers=0, image_size=8, cache_dir=str(tmp_path / "c"))
    assert {k: v.tolist() for k, v in dm.splits.items()} == {"train": [0, 1, 2, 3], "val": [4, 5], "test": [6, 7]}
    with caplog.at_level(logging.WARNING, logger="medpeft"):
        CSVDataModule(**args, group_column="dx", num_workers=0)  # group "a" is in train and val
    assert "2 group(s) appear in more than one split" in caplog.text
    with pytest.raises(
        ValueError, match="val_fraction=0.5 and test_fraction=0.5 must be >= 0 and sum to less"
    ):
        CSVDataModule(str(csv), path_column="file", label_column="dx", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"labels \['b'\] not in class_names \['a', 'c'\]"):
        CSVDataModule(str(tmp_path / "s.csv"), path_column="file", label_column="dx", class_names=["a", "c"])
    with pytest.raises(ValueError, match=r"s.csv lacks the columns \['path'\]"):
        CSVDataModule(str(tmp_path / "s.csv"), label_column="dx")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/missing.csv does not exist"):
        CSVDataModule(str(tmp_path / "missing.csv"))
    (tmp_path / "4.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"e.g. {tmp_path}/4.png; set image_root"):
        CSVDataModule(str(tmp_path / "s.csv"), path_column="file", label_column="dx")


# ---------------------------------------------------------------------------- base-class arguments
def test_low_data_argument_errors_at_init():
    with pytest.raises(ValueError, match="train_fraction=1.2 is outside"):
        SyntheticDataModule(train_fraction=1.2)
    with pytest.raises(ValueError, match="train_fraction=0.5 and shots_per_class=3 are both set"):
        SyntheticDataModule(train_fraction=0.5, shots_per_class=3)
    with pytest.raises(ValueError, match="exceeds the 10 training samples of class 'round'"):
        SyntheticDataModule(num_train=30, shots_per_class=11)


# ---------------------------------------------------------------------------- synthetic
def _features(images: np.ndarray) -> np.ndarray:
    """Position-invariant features: histograms of normalised intensity and gradient magnitude."""
    g = images.astype(np.float32).mean(1)
    g = (g - g.mean((1, 2), keepdims=True)) / (g.std((1, 2), keepdims=True) + 1e-6)
    grad = np.hypot(np.diff(g, axis=2)[:, :-1], np.diff(g, axis=1)[:, :, :-1])
    hist_i = [np.histogram(x, bins=16, range=(-4, 4))[0] for x in g]
    hist_g = [np.histogram(x, bins=16, range=(0, 3))[0] for x in grad]
    return np.concatenate([hist_i, hist_g], 1).astype(np.float32)


def test_synthetic_deterministic_balanced_separable():
    kw = {
        "num_train": 300,
        "num_val": 30,
        "num_test": 150,
        "image_size": 32,
        "num_workers": 0,
        "augment": False,
    }
    dm, same = SyntheticDataModule(**kw), SyntheticDataModule(**kw)
    assert (dm.num_classes, dm.task, dm.channels, dm.class_names) == (
        3,
        "multiclass",
        3,
        ["round", "spiculated", "ring"],
    )
    train, test = dm._load_splits()["train"], dm._load_splits()["test"]
    assert np.array_equal(train.images, same._load_splits()["train"].images)
    assert not np.array_equal(train.images, SyntheticDataModule(**kw, seed=1)._load_splits()["train"].images)
    bigger = SyntheticDataModule(**{**kw, "num_train": 310})._load_splits()["train"].images
    assert np.array_equal(bigger[:300], train.images)  # per-index seeding
    assert np.bincount(train.labels).tolist() == [100, 100, 100]
    x_tr, x_te = _features(train.images), _features(test.images)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    means = np.stack([((x_tr - mu) / sd)[train.labels == k].mean(0) for k in range(3)])
    pred = (((x_te - mu) / sd)[:, None] - means[None]) ** 2
    accuracy = (pred.sum(-1).argmin(1) == test.labels).mean()
    assert accuracy > 0.55, accuracy  # chance is 0.33
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (32, 3, 32, 32) and batch["image"].dtype == torch.uint8
    gray = SyntheticDataModule(num_classes=7, channels=1, num_train=14, num_val=7, num_test=7, image_size=16)
    assert gray.class_names[-1] == "pale" and gray._load_splits()["val"].images.shape == (7, 1, 16, 16)


# ---------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_breastmnist():
    if not (SHARED_DATA / "breastmnist" / "breastmnist.npz").is_file():
        pytest.skip(f"real data not found under {SHARED_DATA}")
    dm = MedMNISTDataModule(root=str(SHARED_DATA / "breastmnist"), num_workers=0)
    assert (dm.num_classes, dm.task, dm.channels) == (2, "binary", 1)
    dm.setup()
    assert dm.split_sizes == {"train": 546, "val": 78, "test": 156}


@pytest.mark.realdata
def test_real_busi_folder(tmp_path):
    if not (SHARED_DATA / "busi").is_dir():
        pytest.skip(f"real data not found under {SHARED_DATA}")
    dm = ImageFolderDataModule(str(SHARED_DATA / "busi"), cache_dir=str(tmp_path), num_workers=0)
    assert dm.class_names == ["benign", "malignant", "normal"]
    assert np.bincount(dm.labels).tolist() == [437, 210, 133]


# ---------------------------------------------------------------------- resumable training order
def test_epoch_order_depends_on_seed_and_epoch_only_and_skips_once():
    from datamodules.sampling import EpochShuffleSampler

    full = EpochShuffleSampler(10, seed=3)
    full.set_epoch(2)
    order = list(full)
    assert sorted(i for i, _ in order) == list(range(10))
    assert list(full) == order, "the same epoch gives the same order and augmentation seeds"
    full.set_epoch(3)
    assert list(full) != order

    resumed = EpochShuffleSampler(10, seed=3, epoch=2, skip=4)
    assert list(resumed) == order[4:], "a resumed epoch continues where the checkpoint was written"
    assert list(resumed) == order, "only the first iteration of that epoch skips"
    assert [i for i in EpochShuffleSampler(10, seed=3, augmentation_seeds=False, epoch=2)] == [i for i, _ in order]


def test_train_order_state_resumes_at_the_saved_batch_or_the_next_epoch():
    dm = SyntheticDataModule(num_train=40, num_val=8, num_test=8, image_size=16, batch_size=8, num_workers=0)
    state = {"epoch": 1, "batches_done": 2, "epoch_batches": 5, "train_size": 40, "batch_size": 8}
    dm.load_state_dict({"train_order": dict(state)})
    sampler = dm.train_dataloader().sampler
    assert (sampler.epoch, len(list(sampler))) == (1, 40 - 16)
    assert dm.train_dataloader().sampler.epoch == 0, "the saved position is used once"

    dm.load_state_dict({"train_order": {**state, "batches_done": 5}})
    sampler = dm.train_dataloader().sampler
    assert (sampler.epoch, len(list(sampler))) == (2, 40), "a checkpoint at an epoch's end starts the next"

    assert dm.state_dict() == {}, "no trainer, no position to record"
    dm.load_state_dict({"train_order": {**state, "batch_size": 4}})
    with pytest.raises(ValueError, match="40 training samples in batches of 4, but this run has 40 in batches of 8"):
        dm.train_dataloader()
    dm.load_state_dict({"train_order": {**state, "world_size": 2}})
    with pytest.raises(ValueError, match="written mid-epoch by 2 processes, but this run has 1; resume on as many"):
        dm.train_dataloader()
    dm.load_state_dict({"train_order": {**state, "world_size": 2, "batches_done": 5}})
    assert dm.train_dataloader().sampler.epoch == 2, "an epoch-end checkpoint resumes on any device count"


def test_seeded_augmentation_depends_on_the_seed_alone_and_leaves_the_global_rng_alone(monkeypatch) -> None:
    from torchvision.transforms import v2

    from datamodules.base import ImageDataset, SplitData

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 3, 40, 40), dtype=np.uint8)
    data = SplitData(images=images, labels=np.array([0, 1, 2]), ids=["a", "b", "c"])
    transform = v2.Compose([v2.RandomResizedCrop((24, 24), scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    ds = ImageDataset(data, transform, multilabel=False)
    torch.manual_seed(123)
    state = torch.get_rng_state()

    def no_accelerator_seeding(*_args) -> None:
        raise AssertionError("a sample's augmentation must seed the CPU generator only")

    for backend in ("cuda", "xpu", "mtia"):
        monkeypatch.setattr(getattr(torch, backend), "manual_seed_all", no_accelerator_seeding)
    first, again, other = ds[(1, 7)]["image"], ds[(1, 7)]["image"], ds[(1, 8)]["image"]
    assert torch.equal(torch.get_rng_state(), state), "a sample's augmentation must not move the global RNG"
    assert first.shape == (3, 24, 24) and torch.equal(first, again) and not torch.equal(first, other)
    monkeypatch.undo()
    torch.manual_seed(7)  # the same draws as seeding every generator
    assert torch.equal(first, transform(torch.from_numpy(images[1])))


# ---------------------------------------------------------------------- evaluation under DDP
def fake_ddp(monkeypatch, dm, rank: int, world_size: int = 2) -> None:
    """Attaches a stand-in trainer of a DDP run (no process group needed)."""
    from types import SimpleNamespace

    monkeypatch.setattr(dm, "trainer", SimpleNamespace(world_size=world_size, global_rank=rank))


def test_eval_loaders_under_ddp_evaluate_every_sample_exactly_once(monkeypatch):
    from torch.utils.data import DistributedSampler, SequentialSampler

    kw = {"num_train": 8, "num_val": 7, "num_test": 5, "image_size": 8, "batch_size": 2, "num_workers": 0}
    single = SyntheticDataModule(**kw)
    assert isinstance(single.val_dataloader().sampler, SequentialSampler)  # no trainer: one process
    for split, size in (("val", 7), ("test", 5)):
        shares, ids = [], []
        for rank in (0, 1):
            dm = SyntheticDataModule(**kw)
            fake_ddp(monkeypatch, dm, rank)
            loader = getattr(dm, f"{split}_dataloader")()
            # A DistributedSampler is kept as is by Lightning instead of being replaced by a padding one.
            assert isinstance(loader.sampler, DistributedSampler)
            shares.append(list(loader.sampler))
            ids += [i for b in loader for i in b["id"]]
        assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == list(range(size))
        assert all(share == sorted(share) for share in shares), "each rank's share is in order"
        assert sorted(ids) == [f"{split}_{i:06d}" for i in range(size)], "no sample twice, none left out"


def test_eval_split_smaller_than_world_size_is_refused(monkeypatch):
    dm = SyntheticDataModule(num_classes=2, num_train=8, num_val=3, num_test=8, image_size=8, num_workers=0)
    fake_ddp(monkeypatch, dm, rank=0, world_size=4)
    with pytest.raises(ValueError, match=r"val split of SyntheticDataModule has 3 sample\(s\) but the run has 4"):
        dm.val_dataloader()
    assert len(list(dm.test_dataloader().sampler)) == 2


# ---------------------------------------------------------------------- every class in val and test
def test_class_missing_from_val_or_test_is_refused(tmp_path):
    root = make_folder(tmp_path / "data", {"a": 5, "b": 5})  # default fractions: val holds one "b" only
    with pytest.raises(
        ValueError, match=r"the val split of ImageFolderDataModule \(1 samples\) has no sample of class\(es\) \['a'\]"
    ):
        folder_dm(root, tmp_path / "cache")
    no_val = folder_dm(root, tmp_path / "cache", val_fraction=0.0, test_fraction=0.25)  # an empty val is fine
    assert len(no_val.splits["val"]) == 0
    csv = tmp_path / "official.csv"
    rows = ["a/a (0).png,a,train", "b/b (0).png,b,train", "a/a (1).png,a,val", "b/b (1).png,b,val",
            "a/a (2).png,a,test", "a/a (3).png,a,test"]  # the official test part lacks "b"
    csv.write_text("path,dx,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"test split of CSVDataModule .*\['b'\].*marked 'test' in column 'split'"):
        CSVDataModule(str(csv), image_root=str(root), label_column="dx", split_column="split")
    with pytest.raises(ValueError, match=r"val split of SyntheticDataModule \(2 samples\).*\['ring'\].*num_val"):
        SyntheticDataModule(num_classes=3, num_val=2)
    make_npz(tmp_path / "breastmnist.npz", n=(40, 10, 1))
    with pytest.raises(ValueError, match=r"test split of MedMNISTDataModule .*\['normal, benign'\]"):
        MedMNISTDataModule(root=str(tmp_path))
