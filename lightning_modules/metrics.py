"""Classification metrics per stage, the confusion-matrix figure, and the evaluation loss logged across ranks."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    BinaryCalibrationError,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassCalibrationError,
    MulticlassF1Score,
    MulticlassRecall,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelF1Score,
)

TASKS = ("multiclass", "binary", "multilabel")


class MultilabelCalibrationError(BinaryCalibrationError):
    """ECE over every (sample, label) pair of a multi-label task."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        super().update(preds.reshape(-1), target.reshape(-1).long())


def eval_loss_means() -> tuple[MeanMetric, MeanMetric]:
    """The val and test loss accumulators of ``log_eval_loss`` (set as ``val_loss_mean`` / ``test_loss_mean``)."""
    return MeanMetric(), MeanMetric()


def log_eval_loss(module: Any, stage: str, loss: torch.Tensor, size: int) -> None:
    """Logs ``{stage}/loss`` as the sample-weighted mean over every rank's samples.

    A MeanMetric syncs float sums; Lightning's own ``sync_dist`` mean averages the ranks' sample counts
    as integers, which skews it when an evaluation split does not divide evenly over the ranks.
    """
    metric = getattr(module, f"{stage}_loss_mean")
    metric.update(loss.detach().float(), weight=size)
    module.log(f"{stage}/loss", metric, on_step=False, on_epoch=True, prog_bar=True)


def classification_metrics(
    task: str, num_classes: int, prefix: str, only: tuple[str, ...] | None = None
) -> MetricCollection:
    """accuracy, balanced accuracy, macro AUROC, macro F1 and ECE for ``task``.

    Inputs are probabilities (softmax for multiclass/binary, sigmoid for multilabel). Binary tasks
    use two softmax outputs, so their macro metrics average both classes (AUROC equals the
    positive-class AUROC). ``only`` keeps a subset (training logs accuracy alone: AUROC and ECE
    would store every training prediction).
    """
    if task == "multilabel":
        metrics = {
            "acc": MultilabelAccuracy(num_labels=num_classes, average="micro"),
            "balanced_acc": MultilabelAccuracy(num_labels=num_classes, average="macro"),
            "auroc": MultilabelAUROC(num_labels=num_classes, average="macro"),
            "f1": MultilabelF1Score(num_labels=num_classes, average="macro"),
            "ece": MultilabelCalibrationError(n_bins=15),
        }
    else:
        metrics = {
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "balanced_acc": MulticlassRecall(num_classes=num_classes, average="macro"),
            "auroc": MulticlassAUROC(num_classes=num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes=num_classes, average="macro"),
            "ece": MulticlassCalibrationError(num_classes=num_classes, n_bins=15),
        }
    if only is not None:
        metrics = {k: v for k, v in metrics.items() if k in only}
    return MetricCollection(metrics, prefix=prefix)


def confusion_figure(matrix: torch.Tensor, class_names: list[str], title: str):  # -> Figure
    """A matplotlib figure of a confusion matrix (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = matrix.detach().cpu().long().numpy()
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n), dpi=100)
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if counts[i, j] > threshold else "black")
    fig.tight_layout()
    return fig


def per_group_metrics(
    task: str,
    num_classes: int,
    probs: torch.Tensor,
    target: torch.Tensor,
    groups: torch.Tensor,
    names: dict[int, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Test metrics per subgroup (e.g. Fitzpatrick skin type), so fairness gaps are visible.

    AUROC is reported only where every class occurs in the group (it is undefined otherwise).
    """
    out: dict[str, dict[str, float]] = {}
    for value in sorted(int(g) for g in groups.unique()):
        mask = groups == value
        collection = classification_metrics(task, num_classes, "", only=("acc", "balanced_acc", "f1"))
        collection.update(probs[mask], target[mask])
        row = {k: float(v) for k, v in collection.compute().items()}
        row["n"] = int(mask.sum())
        present = target[mask].unique().numel() if task != "multilabel" else 0
        if task != "multilabel" and present == num_classes:
            auroc = classification_metrics(task, num_classes, "", only=("auroc",))
            auroc.update(probs[mask], target[mask])
            row["auroc"] = float(auroc.compute()["auroc"])
        out[(names or {}).get(value, str(value))] = row
    return out
