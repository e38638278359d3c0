"""Figures people would rather look at than read: training curves and prediction panels."""
import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import cv2
import matplotlib.pyplot as plt
import numpy as np

from atomic import atomic_write
from metrics import with_current_names

FALSE_POSITIVE = (230, 40, 40)   # predicted car, truly background: red
FALSE_NEGATIVE = (30, 90, 255)   # missed car: blue


def plot_training_curves(history: list, path):
    """Loss and validation Dice per epoch from metrics.jsonl records (today's key names or older ones), as a PNG."""
    history = [with_current_names(record) for record in history]
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="BCE + Dice loss", yscale="log", title="loss")
    ax_loss.legend()
    # 1 - Dice on a log axis: the difference between 0.990 and 0.996 is the whole game here.
    for key, label in (("val_dice_full_res", "full resolution"), ("val_dice_model_res", "model resolution")):
        if key in history[-1]:
            ax_dice.plot(epochs, [max(1.0 - r[key], 1e-5) for r in history], "o-", label=label)
    ax_dice.set(xlabel="epoch", ylabel="1 - mean per-image Dice", yscale="log",
                title=f"validation error (best Dice {max(r.get('val_dice_full_res', r['val_dice_model_res']) for r in history):.5f})")
    ax_dice.legend()
    ax_dice.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path, dpi=100)


def save(fig, path, dpi):
    """Write a figure as a PNG atomically and free it."""
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)


def error_image(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """RGB uint8 map of a prediction's errors: FP red, FN blue, car grey, background white."""
    out = np.full(pred.shape + (3,), 255, np.uint8)
    out[pred & target] = (150, 150, 150)
    out[pred & ~target] = FALSE_POSITIVE
    out[~pred & target] = FALSE_NEGATIVE
    return out


def plot_prediction_panels(rows: list, path, title=""):
    """One row per image: image | ground truth | prediction | errors (FP red, FN blue).

    Each row is a dict with 'image' (RGB, any size), full-resolution boolean 'pred' and 'target',
    and a 'label'. Masks are shrunk with area averaging, so thin error bands stay visible.
    """
    fig, axes = plt.subplots(len(rows), 4, figsize=(16, 2.8 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        h, w = row["image"].shape[:2]
        shrink = lambda a: cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA)
        panels = (row["image"], shrink(row["target"].astype(np.uint8) * 255),
                  shrink(row["pred"].astype(np.uint8) * 255), shrink(error_image(row["pred"], row["target"])))
        for ax, panel, name in zip(ax_row, panels, ("image", "ground truth", "prediction", "errors")):
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_title(f"{name}: {row['label']}" if name == "image" else name, fontsize=9)
            ax.axis("off")
    fig.suptitle(title + "   (errors: red = false positive, blue = false negative)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.8 * len(rows))))  # leave room for the suptitle
    save(fig, path, dpi=80)


def plot_threshold_sweep(sweep: list, path):
    """Full-resolution mean Dice against the probability threshold."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["threshold"] for r in sweep], [r["dice"] for r in sweep], "o-")
    ax.set(xlabel="threshold", ylabel="mean per-image Dice (full res)", title="threshold sweep")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path, dpi=100)
