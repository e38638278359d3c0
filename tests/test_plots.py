"""Protects the car-parts figures: the confusion-matrix PNG and the colour legend strip under part overlays."""
import numpy as np
import pytest
from PIL import Image

from carseg.plots import legend_image, plot_confusion_matrix

NAMES = ["background", "back_bumper", "back_glass", "front_left_door", "hood", "left_mirror", "wheel"]
COLOURS = [(0, 0, 0), (255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 255), (250, 200, 20), (128, 0, 128)]


def test_confusion_matrix_png_is_written(tmp_path):
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 50, (19, 19)) + np.diag(rng.integers(500, 5000, 19))
    confusion[7] = 0  # a class with no true pixels: a grey row, not a division by zero
    names = [f"part_number_{i}" for i in range(19)]
    path = tmp_path / "confusion.png"
    plot_confusion_matrix(confusion, names, path, title="val")
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 800 <= width <= 2500 and 800 <= height <= 2500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png"]  # no temporary file left behind


def test_confusion_matrix_of_the_wrong_size_raises(tmp_path):
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        plot_confusion_matrix(np.zeros((4, 4), np.int64), ["a", "b", "c"], tmp_path / "c.png")
    assert not list(tmp_path.iterdir())


def test_legend_shape_dtype_and_every_swatch_colour():
    legend = legend_image(NAMES, COLOURS, 400)
    assert legend.dtype == np.uint8 and legend.ndim == 3 and legend.shape[1:] == (400, 3)
    for name, colour in zip(NAMES, COLOURS):
        assert (legend == colour).all(-1).sum() >= 100, name  # a swatch interior is 12 x 12 px
    assert legend[0, 0].tolist() == [255, 255, 255]  # white ground


def test_legend_wraps_into_more_rows_when_narrower():
    wide, narrow = legend_image(NAMES, COLOURS, 2000), legend_image(NAMES, COLOURS, 200)
    assert narrow.shape[1] == 200 and narrow.shape[0] > 2 * wide.shape[0]
    # an entry wider than the whole strip gets its own row, cut at the edge, and nothing fails
    assert legend_image(["a_very_long_class_name_indeed"], [(9, 9, 9)], 40).shape[1] == 40


def test_legend_takes_a_numpy_palette():
    palette = np.array(COLOURS, np.uint8)
    assert np.array_equal(legend_image(NAMES, palette, 400), legend_image(NAMES, COLOURS, 400))


def test_legend_misuse_raises_value_error():
    with pytest.raises(ValueError, match="7 class names but 6 colours"):
        legend_image(NAMES, COLOURS[:6], 400)
    with pytest.raises(ValueError, match="too narrow"):
        legend_image(NAMES, COLOURS, 10)
