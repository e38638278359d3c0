"""Scores on hard (thresholded) masks: per-image Dice and IoU, their mean over images (the Kaggle
Carvana metric), pooled Dice/IoU over all pixels of a dataset, and pixel accuracy.

Convention: an image whose true mask and predicted mask are both empty scores Dice = IoU = 1 (a
perfect answer), as the Carvana evaluation did; an empty truth with any predicted pixel scores 0.

Multi-class (car parts): `ConfusionMeter` accumulates one confusion matrix over every pixel of a
data set and scores each class from it, the dataset-level mIoU of the Cityscapes and PASCAL VOC
benchmarks. There a class absent from both truth and prediction has no score (None), not 1.
"""
import numpy as np
import torch


def _counts(pred: torch.Tensor, target: torch.Tensor):
    """Per-image (intersection, predicted, true, pixels) for boolean masks of shape (B, ...)."""
    pred, target = pred.flatten(1).bool(), target.flatten(1).bool()
    intersection = (pred & target).sum(1)
    return intersection, pred.sum(1), target.sum(1), pred.shape[1]


def dice_from_counts(intersection, pred_sum, target_sum):
    """2|A∩B| / (|A|+|B|), with the empty/empty case = 1."""
    total = pred_sum + target_sum
    return torch.where(total > 0, 2.0 * intersection / total.clamp(min=1), torch.ones_like(total, dtype=torch.float64))


def iou_from_counts(intersection, pred_sum, target_sum):
    """|A∩B| / |A∪B|, with the empty/empty case = 1."""
    union = pred_sum + target_sum - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union, dtype=torch.float64))


def dice_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of each image of a batch of hard masks (B, ...) -> (B,) float64."""
    i, p, t, _ = _counts(pred, target)
    return dice_from_counts(i.double(), p.double(), t.double())


def iou_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU (Jaccard) of each image of a batch of hard masks (B, ...) -> (B,) float64."""
    i, p, t, _ = _counts(pred, target)
    return iou_from_counts(i.double(), p.double(), t.double())


class SegmentationMeter:
    """Accumulates hard-mask scores over batches; images may differ in size between updates."""

    def __init__(self):
        self.dice, self.iou = [], []
        self.intersection = self.pred_sum = self.target_sum = self.correct = self.pixels = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor):
        """Add a batch of boolean (or {0,1}) masks of shape (B, ...); returns its per-image Dice."""
        i, p, t, n = _counts(pred, target)
        i, p, t = i.double().cpu(), p.double().cpu(), t.double().cpu()
        dice = dice_from_counts(i, p, t)
        self.dice += dice.tolist()
        self.iou += iou_from_counts(i, p, t).tolist()
        self.intersection += i.sum().item()
        self.pred_sum += p.sum().item()
        self.target_sum += t.sum().item()
        # correct = true positives + true negatives = n - (false positives + false negatives)
        self.correct += (n * len(i) - (p + t - 2 * i).sum()).item()
        self.pixels += n * len(i)
        return dice

    @classmethod
    def merged(cls, meters) -> "SegmentationMeter":
        """One meter holding the images of all `meters` (e.g. one per process), in their order."""
        total = cls()
        for meter in meters:
            total.dice += meter.dice
            total.iou += meter.iou
            for name in ("intersection", "pred_sum", "target_sum", "correct", "pixels"):
                setattr(total, name, getattr(total, name) + getattr(meter, name))
        return total

    def compute(self) -> dict:
        """Mean per-image Dice/IoU (the Kaggle metric), pooled Dice/IoU and pixel accuracy."""
        if not self.dice:
            raise ValueError("SegmentationMeter.compute() called before any update()")
        i, p, t = (torch.tensor(float(v), dtype=torch.float64) for v in (self.intersection, self.pred_sum, self.target_sum))
        return {
            "dice": sum(self.dice) / len(self.dice),
            "iou": sum(self.iou) / len(self.iou),
            "dice_pooled": dice_from_counts(i, p, t).item(),
            "iou_pooled": iou_from_counts(i, p, t).item(),
            "pixel_accuracy": self.correct / self.pixels,
            "images": len(self.dice),
        }


# The per-epoch record names of runs written before the full_res/model_res vocabulary, so their
# metrics.jsonl still plots and a resumed run's history keeps one set of names.
RENAMED_RECORD_KEYS = {"val_dice": "val_dice_model_res", "val_iou": "val_iou_model_res",
                       "val_dice_full": "val_dice_full_res", "val_iou_full": "val_iou_full_res"}


def with_current_names(record: dict) -> dict:
    """An epoch record (metrics.jsonl line) with older key names replaced by today's."""
    return {RENAMED_RECORD_KEYS.get(k, k): v for k, v in record.items()}


def confusion_from(pred, target, num_classes: int) -> np.ndarray:
    """(C, C) int64 confusion matrix of class-index maps: rows = true class, columns = predicted class.

    pred and target: integer torch tensors or numpy arrays of one shape (any dims). Torch tensors are
    counted on their own device, so only C * C numbers leave the GPU. Raises ValueError on a shape
    mismatch or an index outside [0, C): bincount would silently file class C under the next row.
    """
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    pred = _class_indices(pred, num_classes)
    target = _class_indices(target, num_classes).to(pred.device)
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def _class_indices(a, num_classes: int) -> torch.Tensor:
    """A flat int64 tensor of an integer (or bool) torch tensor or numpy array; ValueError outside [0, C)."""
    if not isinstance(a, torch.Tensor):
        a = np.asarray(a)
        if a.dtype.kind not in "iub":
            raise ValueError(f"expected integer class indices, got {a.dtype}")
        a = torch.from_numpy(a.astype(np.int64))  # a copy: also takes flipped (negative-stride) views and uint16
    elif a.is_floating_point() or a.is_complex():
        raise ValueError(f"expected integer class indices, got {a.dtype}")
    a = a.long().flatten()
    if a.numel():
        low, high = (v.item() for v in torch.aminmax(a))
        if low < 0 or high >= num_classes:
            raise ValueError(f"class indices must lie in [0, {num_classes}), found [{low}, {high}]")
    return a


def _ratio(numerator: int, denominator: int):
    """numerator / denominator as a float, or None when the denominator is 0 (a class never seen)."""
    return numerator / denominator if denominator else None


class ConfusionMeter:
    """Accumulates a (C, C) int64 confusion matrix: rows = true class, columns = predicted class."""

    def __init__(self, num_classes: int):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background and one part), got {num_classes}")
        self.num_classes = num_classes
        self.confusion = np.zeros((num_classes, num_classes), np.int64)

    @classmethod
    def merged(cls, meters) -> "ConfusionMeter":
        """One meter holding the pixels of all `meters` (of one class count)."""
        meters = list(meters)
        total = cls(meters[0].num_classes)
        for meter in meters:
            total.confusion += meter.confusion
        return total

    def update(self, pred, target):
        """Add class-index maps (torch or numpy, same shape, any dims); every pixel counts, none is ignored."""
        self.confusion += confusion_from(pred, target, self.num_classes)

    def compute(self, class_names) -> dict:
        """Per-class IoU/Dice and their means over the parts; see the module docstring for the conventions.

        IoU = TP / (TP + FP + FN), Dice = 2 TP / (2 TP + FP + FN), both None for a class absent from
        truth and prediction. "miou"/"mdice" average classes 1.. (background excluded, since it is most
        of every photo and would flatter the mean) over the classes that have a score; None if none has.
        "background_iou" is class 0's IoU (None only if no pixel is or is predicted background).
        Raises ValueError before any update or when class_names does not name each class once.
        """
        if len(class_names) != self.num_classes or len(set(class_names)) != self.num_classes:
            raise ValueError(f"need {self.num_classes} distinct class names, got {list(class_names)}")
        total = int(self.confusion.sum())
        if total == 0:
            raise ValueError("ConfusionMeter.compute() called before update() added any pixels")
        tp = np.diag(self.confusion).tolist()
        true, predicted = self.confusion.sum(1).tolist(), self.confusion.sum(0).tolist()
        per_class = {name: {"iou": _ratio(tp[c], true[c] + predicted[c] - tp[c]),
                            "dice": _ratio(2 * tp[c], true[c] + predicted[c]),
                            "pixels": true[c], "predicted": predicted[c]}
                     for c, name in enumerate(class_names)}
        parts = list(per_class.values())[1:]
        return {"per_class": per_class, "miou": _mean_of_scored(parts, "iou"),
                "mdice": _mean_of_scored(parts, "dice"), "background_iou": per_class[class_names[0]]["iou"],
                "pixel_accuracy": sum(tp) / total, "confusion": self.confusion.tolist()}


def _mean_of_scored(scores: list, key: str):
    """Mean of score[key] over the entries where it is not None; None if it is None in all."""
    values = [s[key] for s in scores if s[key] is not None]
    return sum(values) / len(values) if values else None
