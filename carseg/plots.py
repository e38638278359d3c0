"""Figures people would rather look at than read: training curves, prediction panels, and for car
parts the confusion matrix and the colour legend drawn under part overlays."""
import functools

import cv2
import numpy as np

from carseg.atomic import atomic_write

FALSE_POSITIVE = (230, 40, 40)   # predicted car, truly background: red
FALSE_NEGATIVE = (30, 90, 255)   # missed car: blue

# legend_image layout, in pixels; OpenCV's built-in Hershey font needs no font file.
LEGEND_FONT, LEGEND_SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.45
SWATCH, GAP, SPACING, MARGIN, ROW_HEIGHT = 14, 5, 16, 6, 22


@functools.cache
def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported on first use: predict.py and serve.py
    draw legends with OpenCV alone and need not pay matplotlib's import (0.35 s) at every start."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt
    return plt


def plot_training_curves(history: list, path):
    """Loss and the validation score per epoch from metrics.jsonl records (today's key names: an older
    run's are renamed when its checkpoint is loaded), as a PNG: 1 - Dice for binary runs, 1 - mean IoU
    over the parts for multi-class ones."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_score) = pyplot().subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy + Dice loss", yscale="log", title="loss")
    ax_loss.legend()
    # 1 - score on a log axis: the difference between Dice 0.990 and 0.996 is the whole game on Carvana.
    metric, label = ("miou", "mean IoU over the parts") if "val_miou_model_res" in history[-1] \
        else ("dice", "mean per-image Dice")
    for res, name in (("full_res", "full resolution"), ("model_res", "model resolution")):
        if f"val_{metric}_{res}" in history[-1]:
            ax_score.plot(epochs, [max(1.0 - r[f"val_{metric}_{res}"], 1e-5) for r in history], "o-", label=name)
    best = max(r.get(f"val_{metric}_full_res", r[f"val_{metric}_model_res"]) for r in history)
    ax_score.set(xlabel="epoch", ylabel=f"1 - {label}", yscale="log",
                 title=f"validation error (best {'mIoU' if metric == 'miou' else 'Dice'} {best:.5f})")
    ax_score.legend()
    ax_score.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path, dpi=100)


def save(fig, path, dpi):
    """Write a figure as a PNG atomically and free it."""
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
    pyplot().close(fig)


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
    fig, axes = pyplot().subplots(len(rows), 4, figsize=(16, 2.8 * len(rows)), squeeze=False)
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
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    ax.plot([r["threshold"] for r in sweep], [r["dice"] for r in sweep], "o-")
    ax.set(xlabel="threshold", ylabel="mean per-image Dice (full res)", title="threshold sweep")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path, dpi=100)


def plot_confusion_matrix(confusion, class_names, path, title=""):
    """Row-normalised confusion matrix as a PNG heat map: where each true class's pixels went, in %.

    confusion: (C, C) counts, rows = true class, columns = predicted class (ConfusionMeter's
    convention), so the diagonal is each class's recall. Cells at exactly 0 % stay blank, so the few
    confusions that matter stand out among C * C cells; a class with no true pixels gets a grey row.
    Raises ValueError when the matrix is not (len(class_names), len(class_names)).
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    n = len(class_names)
    if confusion.shape != (n, n):
        raise ValueError(f"confusion must be ({n}, {n}) for {n} class names, got {confusion.shape}")
    true_pixels = confusion.sum(1, keepdims=True)
    percent = np.divide(100.0 * confusion, true_pixels, out=np.full_like(confusion, np.nan), where=true_pixels > 0)
    side = 2.5 + 0.45 * n  # inches: about 0.45 in (45 px at dpi 100) per cell, whatever the class count
    fig, ax = pyplot().subplots(figsize=(side + 1.2, side))
    cmap = pyplot().get_cmap("Blues").with_extremes(bad="0.85")  # NaN rows: the class never occurs in the truth
    heat = ax.imshow(percent, cmap=cmap, vmin=0, vmax=100)
    _annotate_cells(ax, percent, fontsize=max(5.0, min(9.0, 150 / n)))
    ax.set_xticks(range(n), class_names, rotation=55, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set(xlabel="predicted class", ylabel="true class")
    fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.03, label="% of the true class's pixels")
    subtitle = "rows sum to 100 %; diagonal = recall" + ("; grey: no true pixels" if (true_pixels == 0).any() else "")
    ax.set_title(f"{title}\n{subtitle}" if title else subtitle, fontsize=10)
    fig.tight_layout()
    save(fig, path, dpi=100)


def _annotate_cells(ax, percent: np.ndarray, fontsize: float):
    """Write each non-zero cell's percentage in it, white on dark cells and black on light ones."""
    for (row, col), value in np.ndenumerate(percent):
        if np.isnan(value) or value == 0:
            continue
        text = "<0.1" if value < 0.1 else f"{value:.1f}" if value < 10 else f"{value:.0f}"
        ax.text(col, row, text, ha="center", va="center", fontsize=fontsize,
                color="white" if value > 60 else "black")


def legend_image(class_names, colours, width: int) -> np.ndarray:
    """A white uint8 (h, width, 3) strip: a swatch of each class's colour and its name, for under overlays.

    colours: one RGB triple (0-255) per class, in class_names' order. Entries run left to right and
    wrap onto a new row before crossing `width`; h is what the rows need. An entry wider than `width`
    gets a row to itself and is cut at the right edge. Raises ValueError when the lengths differ or
    `width` cannot hold a single swatch.
    """
    if len(colours) != len(class_names):
        raise ValueError(f"{len(class_names)} class names but {len(colours)} colours")
    if width < SWATCH + 2 * MARGIN:
        raise ValueError(f"width {width} is too narrow for a legend (at least {SWATCH + 2 * MARGIN})")
    positions, rows = _legend_positions(class_names, width)
    out = np.full((MARGIN + rows * ROW_HEIGHT, width, 3), 255, np.uint8)  # each row leaves room for descenders
    text_height = cv2.getTextSize("Ag", LEGEND_FONT, LEGEND_SCALE, 1)[0][1]
    for (x, y), name, colour in zip(positions, class_names, colours):
        corner = (x + SWATCH - 1, y + SWATCH - 1)
        cv2.rectangle(out, (x, y), corner, tuple(int(c) for c in colour), thickness=-1)
        cv2.rectangle(out, (x, y), corner, (90, 90, 90), thickness=1)  # so a white or pale swatch still shows
        baseline = y + (SWATCH + text_height) // 2
        cv2.putText(out, name, (x + SWATCH + GAP, baseline), LEGEND_FONT, LEGEND_SCALE, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def _legend_positions(class_names, width: int):
    """Top-left corner of each legend entry's swatch, and the number of rows they take."""
    x, row, positions = MARGIN, 0, []
    for name in class_names:
        entry = SWATCH + GAP + cv2.getTextSize(name, LEGEND_FONT, LEGEND_SCALE, 1)[0][0]
        if x > MARGIN and x + entry > width - MARGIN:
            x, row = MARGIN, row + 1
        positions.append((x, MARGIN + row * ROW_HEIGHT))
        x += entry + SPACING
    return positions, row + 1


def parts_overlay(image: np.ndarray, labels: np.ndarray, colours, alpha: float = 0.55) -> np.ndarray:
    """A photo (H, W, 3) uint8 with each class of a class-index map (H, W) tinted in its colour
    (background left as it is) and each region outlined, uint8 (H, W, 3).

    colours: (C, 3) uint8 RGB per class, e.g. labels.palette(C).
    """
    colours = np.asarray(colours, np.uint8)
    tinted = image.astype(np.float32)
    parts = labels > 0
    tinted[parts] = (1 - alpha) * tinted[parts] + alpha * colours[labels[parts]]
    out = tinted.astype(np.uint8)
    edges = cv2.morphologyEx(labels, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0  # where the class changes
    out[edges] = colours[labels[edges]] // 2 + 64  # a darker line of each region's own colour
    return out


def with_legend(image: np.ndarray, class_names, colours, present=None) -> np.ndarray:
    """An overlay (H, W, 3) with the colour legend of the classes in `present` (default: all but the
    background) stacked under it, as one uint8 image."""
    present = range(1, len(class_names)) if present is None else [c for c in present if c > 0]
    names = [class_names[c] for c in present] or ["(no parts found)"]
    swatches = [colours[c] for c in present] or [(255, 255, 255)]
    return np.vstack([image, legend_image(names, swatches, image.shape[1])])


# The parts panels are composed at their final pixel size, so overlay outlines and legend text are
# drawn 1:1 rather than shrunk into illegibility from full resolution.
PANEL_HEIGHT = 240   # px of each photo in worst.png / samples.png
PANEL_GAP = 8        # px of white between panels and between examples
HEADING = 26         # px of the text strip above each panel


def panel_size(shape) -> tuple:
    """(width, height) of a parts panel for a photo of shape (H, W, ...): PANEL_HEIGHT tall, same aspect."""
    h, w = shape[:2]
    return max(1, round(w * PANEL_HEIGHT / h)), PANEL_HEIGHT


def parts_row(photo: np.ndarray, truth: np.ndarray, pred: np.ndarray, names, colours, label: str) -> np.ndarray:
    """One example, uint8 (h, w, 3): headed panels photo | ground truth | prediction, PANEL_HEIGHT tall at
    the photo's aspect ratio, over the legend of the classes in truth or prediction.

    photo: uint8 (PANEL_HEIGHT, w, 3) at panel_size(truth.shape); truth, pred: uint8 (H, W) class maps
    at the photo's full size.
    """
    size = panel_size(truth.shape)
    small = [cv2.resize(m, size, interpolation=cv2.INTER_NEAREST) for m in (truth, pred)]
    panels = [photo] + [parts_overlay(photo, m, colours) for m in small]
    headed = [np.vstack([heading(text, size[0]), panel])
              for text, panel in zip((label, "ground truth", "prediction"), panels)]
    gap = np.full((PANEL_HEIGHT + HEADING, PANEL_GAP, 3), 255, np.uint8)
    row = np.hstack([headed[0], gap, headed[1], gap, headed[2]])
    present = sorted(set(np.unique(truth).tolist()) | set(np.unique(pred).tolist()))
    return with_legend(row, names, colours, present)


def heading(text: str, width: int) -> np.ndarray:
    """A white strip HEADING px tall with `text` in black (cut at `width`)."""
    strip = np.full((HEADING, width, 3), 255, np.uint8)
    cv2.putText(strip, text, (4, HEADING - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def stack_rows(rows: list, title: str) -> np.ndarray:
    """Rows of different widths, left-aligned on white under a title strip, as one uint8 image."""
    width = max(row.shape[1] for row in rows)
    pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=255)
    gap = np.full((PANEL_GAP, width, 3), 255, np.uint8)
    parts = [pad(heading(title, width))]
    for row in rows:
        parts += [gap, pad(row)]
    return np.vstack(parts)
