"""Tests of the seed paper's datasets on miniature copies of their official on-disk layouts."""

from __future__ import annotations

import importlib
import inspect
import io
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from datamodules import (
    BUSIDataModule,
    Fitzpatrick17kDataModule,
    HAM10000DataModule,
    MIMICCXRDataModule,
    RSNAPneumoniaDataModule,
    SMDGDataModule,
)
from datamodules import cache as cache_mod
from datamodules.ham10000 import HAM_CLASSES
from datamodules.mimic_cxr import report_caption
from datamodules.smdg import smdg_patient_groups

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
SHARED_BUSI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "busi"
FAST = {"image_size": 8, "num_workers": 0, "batch_size": 4}


# ---------------------------------------------------------------------------- fabrication
def write_img(path: Path, seed: int, mode: str = "RGB", size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def make_ham(root: Path, lesions_per_class: int = 10) -> list[dict]:
    rows, n = [], 0
    for c, dx in enumerate(HAM_CLASSES):
        for k in range(lesions_per_class):
            for _ in range(1 + (k % 2)):  # some lesions have two images
                image_id = f"ISIC_{n:07d}"
                part = "HAM10000_images_part_1" if n % 2 else "HAM10000_images_part_2"
                write_img(root / part / f"{image_id}.jpg", n)
                rows.append(
                    {
                        "lesion_id": f"HAM_{c}{k:03d}",
                        "image_id": image_id,
                        "dx": dx,
                        "dx_type": "histo",
                        "age": 50,
                        "sex": "male",
                        "localization": "back",
                    }
                )
                n += 1
    write_csv(root / "HAM10000_metadata.csv", rows)
    return rows


def isic_part(root: Path, part: str, dxs: list[str], start: int, gt_in_root: bool = False) -> list[str]:
    ids, rows = [], []
    for i, dx in enumerate(dxs):
        image = f"ISIC_{start + i:07d}"
        write_img(root / f"ISIC2018_Task3_{part}_Input" / f"{image}.jpg", start + i)
        rows.append(
            {
                "image": image,
                **{k: float(k.lower() == dx) for k in ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")},
            }
        )
        ids.append(image)
    name = f"ISIC2018_Task3_{part}_GroundTruth.csv"
    write_csv(root / name if gt_in_root else root / f"ISIC2018_Task3_{part}_GroundTruth" / name, rows)
    return ids


def write_dicom(
    path: Path, arr: np.ndarray, photometric: str = "MONOCHROME2", window=None, jpeg: bool = False
) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID = path.stem
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, photometric, 0
    bits = 8 if arr.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if jpeg:  # as the RSNA challenge files: JPEG baseline inside the DICOM
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


GRADIENT = np.linspace(0, 255, 64).round().astype(np.uint8).reshape(8, 8)  # full range: no stretch
CLASS3 = ("Normal", "Lung Opacity", "No Lung Opacity / Not Normal")


def make_rsna(root: Path, per_class: int = 10) -> dict[str, int]:
    boxes, info, detailed = [], [], {}
    for c, cls in enumerate(CLASS3):
        for k in range(per_class):
            pid = f"{c}{k:02d}ab-cdef"
            detailed[pid] = c
            n_boxes = 2 if cls == "Lung Opacity" else 1  # positives: one row per box
            for b in range(n_boxes):
                pos = cls == "Lung Opacity"
                boxes.append(
                    {
                        "patientId": pid,
                        "x": 10.0 * b if pos else "",
                        "y": 5.0 if pos else "",
                        "width": 20.0 if pos else "",
                        "height": 30.0 if pos else "",
                        "Target": int(pos),
                    }
                )
                info.append({"patientId": pid, "class": cls})
            photometric = "MONOCHROME1" if k == 0 else "MONOCHROME2"
            write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", GRADIENT, photometric)
    write_csv(root / "stage_2_train_labels.csv", boxes)
    write_csv(root / "stage_2_detailed_class_info.csv", info)
    return detailed


def split_sets(dm, groups) -> dict[str, set]:
    return {k: set(np.asarray(groups)[v]) for k, v in dm.splits.items()}


def assert_disjoint(sets: dict[str, set]) -> None:
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])


def ids_of(loader) -> list[str]:
    return [i for b in loader for i in b["id"]]


# ---------------------------------------------------------------------------- HAM10000 / ISIC 2018
def test_ham10000_labels_grouped_split_and_batches(tmp_path):
    rows = make_ham(tmp_path / "ham")
    dm = HAM10000DataModule(str(tmp_path / "ham"), cache_dir=str(tmp_path / "c"), **FAST)
    assert (dm.layout, dm.num_classes, dm.task, dm.channels) == ("ham10000", 7, "multiclass", 3)
    assert dm.class_names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    dx = {r["image_id"]: r["dx"] for r in rows}
    assert [dm.class_names[lab] for lab in dm.labels] == [dx[i] for i in dm.ids]
    assert {f.parent.name for f in dm.files} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    lesions = {r["image_id"]: r["lesion_id"] for r in rows}
    assert_disjoint(split_sets(dm, [lesions[i] for i in dm.ids]))
    assert sorted(np.concatenate(list(dm.splits.values()))) == list(range(len(rows)))
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["image"].dtype == torch.uint8
    assert set(batch) == {"image", "label", "id"}


def test_isic2018_official_parts_lesion_groups_and_auto_layout(tmp_path, caplog):
    root = tmp_path / "isic"
    train_dx = [d for d in HAM_CLASSES for _ in range(8)]
    train_ids = isic_part(root, "Training", train_dx, 0)
    val_dx, test_dx = list(HAM_CLASSES), list(reversed(HAM_CLASSES))
    val_ids = isic_part(root, "Validation", val_dx, 1000, gt_in_root=True)
    test_ids = isic_part(root, "Test", test_dx, 2000)
    write_csv(
        root / "ISIC2018_Task3_Training_LesionGroupings.csv",
        [
            {"image": i, "lesion_id": f"L{n // 2}", "diagnosis_confirm_type": "histopathology"}
            for n, i in enumerate(train_ids)
        ],
    )
    dm = HAM10000DataModule(str(root), cache_dir=str(tmp_path / "c"), **FAST)
    assert dm.layout == "isic2018"
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 56, "val": 7, "test": 7}
    assert [dm.ids[i] for i in dm.splits["test"]] == test_ids
    assert [dm.class_names[dm.labels[i]] for i in dm.splits["val"]] == val_dx
    assert [dm.class_names[lab] for lab in dm.labels[dm.splits["train"]]] == train_dx
    assert ids_of(dm.val_dataloader()) == val_ids
    carve = {"official_splits": False, "val_fraction": 0.25, "test_fraction": 0.25}
    carved = HAM10000DataModule(str(root), **carve, cache_dir=str(tmp_path / "c"), **FAST)
    assert sum(len(v) for v in carved.splits.values()) == 56 and len(carved.splits["test"]) > 0
    assert_disjoint(split_sets(carved, carved.split_groups))
    assert len(set(carved.split_groups)) == 28  # two images per lesion from the groupings CSV
    (root / "ISIC2018_Task3_Training_LesionGroupings.csv").unlink()
    with caplog.at_level(logging.WARNING, logger="medpeft"):
        HAM10000DataModule(str(root), **carve, **FAST)
    assert "images of one lesion may land in different splits" in caplog.text


def test_ham10000_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"HAM10000 root {tmp_path}/nowhere does not exist"):
        HAM10000DataModule(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match="holds neither HAM10000.*HAM10000_metadata.csv.*ISIC2018_Task3"
    ):
        HAM10000DataModule(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="layout='ham'"):
        HAM10000DataModule(str(tmp_path / "empty"), layout="ham")
    with pytest.raises(FileNotFoundError, match="HAM10000_metadata.csv does not exist.*10.7910/DVN/DBW86T"):
        HAM10000DataModule(str(tmp_path / "empty"), layout="ham10000")
    root = tmp_path / "ham"
    rows = make_ham(root, lesions_per_class=1)
    write_csv(root / "HAM10000_metadata.csv", [{k: v for k, v in r.items() if k != "dx"} for r in rows])
    with pytest.raises(ValueError, match=r"lacks the columns \['dx'\]"):
        HAM10000DataModule(str(root))
    write_csv(
        root / "HAM10000_metadata.csv", [{**r, "dx": "melanoma"} if i == 0 else r for i, r in enumerate(rows)]
    )
    with pytest.raises(ValueError, match=r"diagnoses \['melanoma'\] that are not HAM10000 classes"):
        HAM10000DataModule(str(root))
    write_csv(root / "HAM10000_metadata.csv", rows)
    (root / "HAM10000_images_part_2" / f"{rows[0]['image_id']}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=f"1 image.*missing.*{rows[0]['image_id']}.jpg"):
        HAM10000DataModule(str(root))
    bad = tmp_path / "isic"
    isic_part(bad, "Training", ["mel", "nv"], 0)
    gt = bad / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    gt.write_text(gt.read_text().replace("1.0", "0.0", 1))
    with pytest.raises(ValueError, match="image ISIC_0000000 .*is not one-hot"):
        HAM10000DataModule(str(bad))


def test_empty_training_class_and_too_many_shots(tmp_path):
    root = tmp_path / "isic"
    isic_part(root, "Training", [d for d in HAM_CLASSES if d != "vasc" for _ in range(3)], 0)
    isic_part(root, "Validation", ["mel"], 1000)
    isic_part(root, "Test", ["vasc", "nv"], 2000)
    with pytest.raises(ValueError, match=r"\['vasc'\] have no training samples"):
        HAM10000DataModule(str(root), **FAST)
    make_ham(tmp_path / "ham")
    with pytest.raises(ValueError, match="shots_per_class=30 exceeds the .* training samples of class"):
        HAM10000DataModule(str(tmp_path / "ham"), shots_per_class=30, **FAST)


def test_low_data_subsets_logged_nested_reproducible(tmp_path, caplog):
    make_ham(tmp_path / "ham")
    kw = {"root": str(tmp_path / "ham"), "cache_dir": str(tmp_path / "c"), "augment": False, **FAST}
    ids = {}
    with caplog.at_level(logging.INFO, logger="medpeft"):
        for k in (1, 2, 3):
            dm = HAM10000DataModule(shots_per_class=k, **kw)
            dm.setup()
            assert dm.subset_counts == dict.fromkeys(HAM_CLASSES, k)
            ids[k] = set(dm.train_dataloader().dataset.data.ids)  # the loader may drop a last single
    assert "train per class {'akiec': 2, 'bcc': 2" in caplog.text
    assert ids[1] <= ids[2] <= ids[3] and len(ids[3]) == 21
    half = HAM10000DataModule(train_fraction=0.5, **kw)
    most = HAM10000DataModule(train_fraction=0.8, **kw)
    assert set(half.train_subset) < set(most.train_subset)
    assert np.array_equal(half.train_subset, HAM10000DataModule(train_fraction=0.5, **kw).train_subset)
    assert not np.array_equal(half.splits["test"], HAM10000DataModule(**{**kw, "seed": 1}).splits["test"])


def test_truncated_image_error_and_skip_corrupt(tmp_path):
    rows = make_ham(tmp_path / "ham")
    bad = next((tmp_path / "ham").rglob(f"{rows[3]['image_id']}.jpg"))
    bad.write_bytes(bad.read_bytes()[:60])
    dm = HAM10000DataModule(str(tmp_path / "ham"), cache_dir=str(tmp_path / "c"), **FAST)
    with pytest.raises(
        ValueError, match=f"cannot read image .*{rows[3]['image_id']}.jpg.*skip_corrupt: true"
    ):
        dm.setup()
    dm = HAM10000DataModule(str(tmp_path / "ham"), cache_dir=str(tmp_path / "c"), skip_corrupt=True, **FAST)
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        dm.setup()
    assert sum(dm.split_sizes.values()) == len(rows) - 1


# ---------------------------------------------------------------------------- BUSI
def make_busi(parent: Path, counts=(14, 8, 6)) -> Path:
    root = parent / "Dataset_BUSI_with_GT"
    for c, (cls, n) in enumerate(zip(("benign", "malignant", "normal"), counts, strict=True)):
        for i in range(1, n + 1):
            write_img(root / cls / f"{cls} ({i}).png", 100 * c + i)
            write_img(root / cls / f"{cls} ({i})_mask.png", 0, mode="L")
        write_img(root / cls / f"{cls} (1)_mask_1.png", 1, mode="L")
    return root


def test_busi_layout_masks_and_errors(tmp_path):
    folder = make_busi(tmp_path / "download")
    dm = BUSIDataModule(str(tmp_path / "download"), cache_dir=str(tmp_path / "c"), **FAST)
    direct = BUSIDataModule(str(folder), **FAST)
    assert dm.files == direct.files and len(dm.files) == 28 and not any("_mask" in f.name for f in dm.files)
    assert (dm.class_names, dm.task, dm.channels) == (["benign", "malignant", "normal"], "multiclass", 3)
    assert np.bincount(dm.labels).tolist() == [14, 8, 6] and dm.ids[0] == "benign/benign (1).png"
    assert next(iter(dm.val_dataloader()))["image"].shape[1:] == (3, 8, 8)
    with pytest.raises(
        FileNotFoundError, match=f"BUSI root {tmp_path}/none does not exist.*scholar.cu.edu.eg"
    ):
        BUSIDataModule(str(tmp_path / "none"))
    (folder / "other").mkdir()
    with pytest.raises(ValueError, match=r"folder\(s\) \['other'\] that are not BUSI classes"):
        BUSIDataModule(str(folder))
    (folder / "other").rmdir()
    (folder / "normal").rename(folder / "Normal")
    with pytest.raises(FileNotFoundError, match=r"lacks the BUSI class folder\(s\) \['normal'\]"):
        BUSIDataModule(str(folder))


@pytest.mark.realdata
def test_busi_real_data(tmp_path):
    if not SHARED_BUSI.is_dir():
        pytest.skip(f"real data folder {SHARED_BUSI} is absent")
    dm = BUSIDataModule(str(SHARED_BUSI), cache_dir=str(tmp_path / "c"), **{**FAST, "batch_size": 64})
    assert np.bincount(dm.labels).tolist() == [437, 210, 133]
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 546, "val": 78, "test": 156}
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (64, 3, 8, 8) and batch["image"].float().std() > 5


# ---------------------------------------------------------------------------- Fitzpatrick17k
NINE = ("inflammatory", "benign dermal", "malignant melanoma")
THREE = ("non-neoplastic", "benign", "malignant")


def make_fitz(root: Path, n: int = 48, absent: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        h = f"{i:032x}"
        c = i % 3
        rows.append(
            {
                "md5hash": h,
                "fitzpatrick_scale": [1, 2, 3, 4, 5, 6, -1][i % 7],
                "fitzpatrick_centaur": 3,
                "label": ["psoriasis", "dermatofibroma", "melanoma", "lichen planus"][i % 4],
                "nine_partition_label": NINE[c],
                "three_partition_label": THREE[c],
                "qc": "",
                "url": f"https://example.org/{i}.jpg",
                "url_alphanum": f"example{i}jpg",
            }
        )
        if i >= absent:
            write_img(root / "images" / f"{h}.jpg", i)
    write_csv(root / "fitzpatrick17k.csv", rows)
    return rows


def test_fitzpatrick_levels_skin_type_groups_and_absent_images(tmp_path):
    rows = make_fitz(tmp_path / "fitz")
    with pytest.warns(UserWarning, match="4 of 48 rows of fitzpatrick17k.csv have no image") as rec:
        dm = Fitzpatrick17kDataModule(str(tmp_path / "fitz"), cache_dir=str(tmp_path / "c"), **FAST)
    assert len([w for w in rec if "have no image" in str(w.message)]) == 1
    assert dm.class_names == ["benign", "malignant", "non-neoplastic"] and len(dm.files) == 44
    by_hash = {r["md5hash"]: r for r in rows}
    assert [dm.class_names[lab] for lab in dm.labels] == [by_hash[h]["three_partition_label"] for h in dm.ids]
    assert (dm.group_key, dm.group_names[1], dm.group_names[-1]) == ("group", "I", "unknown")
    batch = next(iter(dm.test_dataloader()))
    assert batch["group"].dtype == torch.int64
    assert batch["group"].tolist() == [by_hash[h]["fitzpatrick_scale"] for h in batch["id"]]
    assert set(dm.sample_groups.tolist()) == {1, 2, 3, 4, 5, 6, -1}
    kw = {"cache_dir": str(tmp_path / "c"), **FAST}
    with pytest.warns(UserWarning):
        nine = Fitzpatrick17kDataModule(str(tmp_path / "fitz"), label_level="nine", **kw)
        every = Fitzpatrick17kDataModule(str(tmp_path / "fitz"), label_level="all", **kw)
    assert nine.class_names == sorted(NINE)
    assert every.class_names == ["dermatofibroma", "lichen planus", "melanoma", "psoriasis"]
    with pytest.raises(ValueError, match="label_level='six'"):
        Fitzpatrick17kDataModule(str(tmp_path / "fitz"), label_level="six")
    write_csv(tmp_path / "fitz" / "fitzpatrick17k.csv", [{**r, "fitzpatrick_scale": 7} for r in rows])
    with pytest.raises(ValueError, match=r"'fitzpatrick_scale' has values \[7\]"):
        Fitzpatrick17kDataModule(str(tmp_path / "fitz"))
    write_csv(tmp_path / "fitz" / "fitzpatrick17k.csv", [{"md5hash": r["md5hash"]} for r in rows])
    with pytest.raises(
        ValueError, match=r"lacks the columns \['fitzpatrick_scale', 'three_partition_label'\]"
    ):
        Fitzpatrick17kDataModule(str(tmp_path / "fitz"))
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="fitzpatrick17k.csv does not exist.*github.com/mattgroh"):
        Fitzpatrick17kDataModule(str(tmp_path / "bare"))


# ---------------------------------------------------------------------------- SMDG-19
def make_smdg(root: Path) -> list[dict]:
    rows = []

    def add(name, types, original="", patient=""):
        rows.append(
            {
                "names": name,
                "types": types,
                "type_expanded": "",
                "isColor": 1,
                "original_name": original,
                "patient_id": patient,
                "fundus": f"/full-fundus/{name}.png",
            }
        )
        write_img(root / "full-fundus" / "full-fundus" / f"{name}.png", len(rows))

    for p in range(8):  # both eyes of ODIR patients
        add(f"OIA-ODIR-TRAIN-{2 * p + 1}", p % 2, f"{p + 100}_left.jpg")
        add(f"OIA-ODIR-TRAIN-{2 * p + 2}", p % 2, f"{p + 100}_right.jpg")
    for p in range(5):  # PAPILA publishes patient ids
        add(f"PAPILA-{2 * p + 1}", p % 2, str(p), f"PAPILA-{p}")
        add(f"PAPILA-{2 * p + 2}", p % 2, str(p), f"PAPILA-{p}")
    for i in range(10):
        add(f"G1020-{i + 1}", i % 2, f"image_{i}.jpg")
    for i in range(12):
        add(f"REFUGE1-TRAIN-{i + 1}", -1, f"g{i:04d}.jpg")
    write_csv(root / "metadata - standardized.csv", rows)
    return rows


def test_smdg_binary_suspects_and_patient_groups(tmp_path):
    rows = make_smdg(tmp_path / "smdg")
    dm = SMDGDataModule(str(tmp_path / "smdg"), cache_dir=str(tmp_path / "c"), **FAST)
    assert (dm.class_names, dm.task, len(dm.files)) == (["non-glaucoma", "glaucoma"], "binary", 36)
    assert dm.labels[:4].tolist() == [0, 0, 1, 1]
    assert dm.split_groups[0] == dm.split_groups[1] == "OIA-ODIR/100"
    assert dm.split_groups[16] == dm.split_groups[17] == "PAPILA/PAPILA-0"
    assert dm.split_groups[26] == "image/G1020-1" and len(set(dm.split_groups)) == 8 + 5 + 10
    assert_disjoint(split_sets(dm, dm.split_groups))
    assert next(iter(dm.train_dataloader()))["image"].shape == (4, 3, 8, 8)
    both = SMDGDataModule(str(tmp_path / "smdg"), include_suspects=True, **FAST)
    assert both.class_names == ["non-glaucoma", "glaucoma", "suspect"] and (both.labels == 2).sum() == 12
    groups = smdg_patient_groups(pd.DataFrame(rows[:2]).astype(str).drop(columns=["patient_id"]))
    assert groups.tolist() == ["OIA-ODIR/100", "OIA-ODIR/100"]
    write_csv(tmp_path / "smdg" / "metadata - standardized.csv", [{**rows[0], "types": 2}, *rows[1:]])
    with pytest.raises(ValueError, match=r"column 'types' has values \['2'\]"):
        SMDGDataModule(str(tmp_path / "smdg"))
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="metadata - standardized.csv does not exist.*kaggle"):
        SMDGDataModule(str(tmp_path / "bare"))


# ---------------------------------------------------------------------------- RSNA Pneumonia
def test_rsna_labels_dicom_decoding_and_cache(tmp_path, monkeypatch):
    detailed = make_rsna(tmp_path / "rsna")
    kw = {"cache_dir": str(tmp_path / "c"), **FAST}
    dm = RSNAPneumoniaDataModule(str(tmp_path / "rsna"), **kw)
    assert (dm.class_names, dm.task, dm.channels) == (["no pneumonia", "pneumonia"], "binary", 1)
    assert len(dm.ids) == 30  # boxes collapsed: one row per patient
    assert dm.labels.tolist() == [int(detailed[p] == 1) for p in dm.ids]
    three = RSNAPneumoniaDataModule(str(tmp_path / "rsna"), label_set="three_class", **kw)
    assert three.class_names == list(CLASS3) and three.labels.tolist() == [detailed[p] for p in three.ids]
    calls = []
    real = cache_mod.decode_image
    monkeypatch.setattr(cache_mod, "decode_image", lambda *a: calls.append(a[0]) or real(*a))
    images = {i: im for b in dm.test_dataloader() for i, im in zip(b["id"], b["image"], strict=True)}
    images.update({i: im for b in dm.val_dataloader() for i, im in zip(b["id"], b["image"], strict=True)})
    assert len(calls) == 30
    for pid, img in images.items():  # MONOCHROME1 (k == 0) is inverted; 8x8 stays unresized
        want = 255 - GRADIENT if pid[1:3] == "00" else GRADIENT
        assert img.shape == (1, 8, 8) and np.array_equal(img[0].numpy(), want), pid
    RSNAPneumoniaDataModule(str(tmp_path / "rsna"), **kw).setup()
    assert len(calls) == 30  # reused
    f = tmp_path / "rsna" / "stage_2_train_images" / f"{dm.ids[0]}.dcm"
    write_dicom(f, GRADIENT[::-1].copy())
    os.utime(f, ns=(1, 1))
    RSNAPneumoniaDataModule(str(tmp_path / "rsna"), **kw).setup()
    assert len(calls) == 60 and len(list((tmp_path / "c").glob("*.npy"))) == 2


def test_rsna_voi_window_and_errors(tmp_path):
    ramp = np.linspace(0, 4000, 64).reshape(8, 8).astype(np.uint16)
    f = write_dicom(tmp_path / "w.dcm", ramp, window=(2000, 400))
    out = cache_mod.read_dicom(f)
    assert out.dtype == np.uint8 and (out[ramp <= 1800] == 0).all() and (out[ramp >= 2200] == 255).all()
    assert cache_mod.image_channels(f) == 1
    smooth = np.tile(np.linspace(0, 255, 16).round().astype(np.uint8), (16, 1))
    decoded = cache_mod.read_dicom(write_dicom(tmp_path / "j.dcm", smooth, jpeg=True)).astype(int)
    assert np.abs(decoded - smooth).max() <= 3
    root = tmp_path / "rsna"
    make_rsna(root)
    info = pd.read_csv(root / "stage_2_detailed_class_info.csv")
    info.loc[0, "class"] = "Lung Opacity"
    info.to_csv(root / "stage_2_detailed_class_info.csv", index=False)
    with pytest.raises(ValueError, match="patient 000ab-cdef has class 'Lung Opacity' .* but Target 0"):
        RSNAPneumoniaDataModule(str(root), label_set="three_class")
    with pytest.raises(ValueError, match="label_set='four'"):
        RSNAPneumoniaDataModule(str(root), label_set="four")
    next((root / "stage_2_train_images").glob("*.dcm")).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 DICOM\(s\) .* missing"):
        RSNAPneumoniaDataModule(str(root))
    with pytest.raises(FileNotFoundError, match="RSNA Pneumonia root .* does not exist.*kaggle"):
        RSNAPneumoniaDataModule(str(tmp_path / "none"))


# ---------------------------------------------------------------------------- MIMIC-CXR
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // eval for pneumonia

 FINDINGS:

 There is no focal consolidation.   Heart size
 is normal.

 IMPRESSION:

 No acute cardiopulmonary
 process.
"""


def test_report_caption_sections():
    assert report_caption(REPORT) == "No acute cardiopulmonary process."
    assert (
        report_caption(REPORT.split(" IMPRESSION")[0])
        == "There is no focal consolidation. Heart size is normal."
    )
    assert (
        report_caption("FINDINGS AND IMPRESSION:  Small left\n effusion.\nNOTIFICATION: called")
        == "Small left effusion."
    )
    assert report_caption("IMPRESSION:\n\nRECOMMENDATION(S): CT.\nFINDINGS: Clear lungs.") == "Clear lungs."
    assert report_caption("WET READ: ___ 10:30 AM\n no header here") == ""


def make_mimic(root: Path) -> dict[str, str]:
    split, meta, captions = [], [], {}
    subjects = {
        "10000001": "train",
        "10000002": "train",
        "11000003": "train",
        "12000004": "train",
        "10000005": "validate",
        "10000006": "test",
        "10000007": "test",
    }
    for n, (subj, part) in enumerate(subjects.items()):
        study = f"5{n:07d}"
        folder = root / "files" / f"p{subj[:2]}" / f"p{subj}"
        for view in ("PA", "LATERAL"):
            dicom_id = f"d{n}-{view.lower()}"
            split.append({"dicom_id": dicom_id, "study_id": study, "subject_id": subj, "split": part})
            meta.append(
                {
                    "dicom_id": dicom_id,
                    "subject_id": subj,
                    "study_id": study,
                    "ViewPosition": view,
                    "Rows": 10,
                    "Columns": 12,
                }
            )
            if subj != "10000007":  # this subject's JPGs were not downloaded
                write_img(folder / f"s{study}" / f"{dicom_id}.jpg", n, mode="L")
        impression = "" if subj == "11000003" else f"Finding number {n}."
        if subj != "12000004":  # no report for this study
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"s{study}.txt").write_text(f" FINDINGS:\n\n\n IMPRESSION: \n {impression}\n")
        captions[f"d{n}-pa"] = impression
    pd.DataFrame(split).to_csv(root / "mimic-cxr-2.0.0-split.csv.gz", index=False)  # official: gzipped
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv", meta)
    return captions


def test_mimic_cxr_pairs_views_split_and_drops(tmp_path):
    captions = make_mimic(tmp_path / "mimic")
    kw = {"cache_dir": str(tmp_path / "c"), "num_workers": 0, "batch_size": 2, "image_size": 16}
    with pytest.warns(
        UserWarning, match="dropped 3 of 7 images: 1 without JPG, 1 without report, 1 with an empty"
    ):
        dm = MIMICCXRDataModule(str(tmp_path / "mimic"), **kw)
    assert dm.image_size == 16
    assert {k: [dm.ids[i] for i in v] for k, v in dm.splits.items()} == {
        "train": ["d0-pa", "d1-pa"],
        "val": ["d4-pa"],
        "test": ["d5-pa"],
    }
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "caption", "id"} and batch["image"].shape == (2, 3, 16, 16)
    assert batch["image"].dtype == torch.uint8 and torch.equal(batch["image"][:, 0], batch["image"][:, 2])
    assert all(c == captions[i] for i, c in zip(batch["id"], batch["caption"], strict=True))
    assert next(iter(dm.test_dataloader()))["caption"] == ["Finding number 5."]
    with pytest.warns(UserWarning, match="dropped"):
        lateral = MIMICCXRDataModule(str(tmp_path / "mimic"), views=["LATERAL"], train_fraction=0.5, **kw)
    assert [lateral.ids[i] for i in lateral.splits["val"]] == ["d4-lateral"] and len(
        lateral.splits["train"]
    ) == 1
    with pytest.raises(FileNotFoundError, match="MIMIC-CXR-JPG root .* does not exist.*physionet"):
        MIMICCXRDataModule(str(tmp_path / "none"))
    (tmp_path / "mimic" / "mimic-cxr-2.0.0-metadata.csv").unlink()
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-metadata.csv.gz does not exist"):
        MIMICCXRDataModule(str(tmp_path / "mimic"))


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "name",
    ["ham10000", "isic2018", "busi", "fitzpatrick17k", "smdg", "rsna_pneumonia", "mimic_cxr", "breastmnist"],
)
def test_data_config_parses_and_matches_constructor(name):
    spec = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["data"]
    module, cls_name = spec["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), cls_name)
    params = inspect.signature(cls.__init__).parameters
    assert set(spec.get("init_args", {})) <= set(params) - {"self"}


FABRICATORS = {
    "ham10000": lambda root: make_ham(root),
    "busi": lambda root: make_busi(root),
    "fitzpatrick17k": lambda root: make_fitz(root),
    "smdg": lambda root: make_smdg(root),
    "rsna_pneumonia": lambda root: make_rsna(root),
}


@pytest.mark.parametrize("name", sorted(FABRICATORS))
def test_data_config_fast_dev_run_on_fabricated_layout(name, tmp_path, monkeypatch):
    """configs/data/<name>.yaml drives a real fit step through run.py on a miniature official layout."""
    import run

    monkeypatch.chdir(tmp_path)
    root = tmp_path / name
    FABRICATORS[name](root)
    configs = Path(run.__file__).resolve().parent / "configs"
    run.cli_main([
        "fit", "--config", str(configs / "demo.yaml"), "--config", str(configs / "data" / f"{name}.yaml"),
        "--data.init_args.root", str(root), "--data.init_args.cache_dir", str(tmp_path / "cache"),
        "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4",
        "--data.init_args.num_workers", "0", "--model.init_args.backbone", "resnet18",
        "--model.init_args.pretrained", "false", "--trainer.fast_dev_run", "true",
        "--trainer.enable_progress_bar", "false",
    ])
