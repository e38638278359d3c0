"""Scores on hard (thresholded) masks: per-image Dice and IoU, their mean over images (the Kaggle
Carvana metric), pooled Dice/IoU over all pixels of a dataset, and pixel accuracy.

Convention: an image whose true mask and predicted mask are both empty scores Dice = IoU = 1 (a
perfect answer), as the Carvana evaluation did; an empty truth with any predicted pixel scores 0.
"""
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
