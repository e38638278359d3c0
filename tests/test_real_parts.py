"""The bundled car-parts model on the real Car Parts Dataset: it loads from the file alone, keeps
its validation score through evaluate.py, and predict.py writes parts that read back as classes."""

import numpy as np
import pytest
from PIL import Image

import evaluate
import predict
from config import BUNDLED_PARTS_CHECKPOINT, EvaluateConfig, PredictConfig
from carseg.labels import palette
from carseg.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # torchrun, real data or a browser: .ci/run runs them (--run-slow)

# Measured when the model was bundled (docs/architectures.md): full-res mIoU over the 18 parts on
# its 50 validation photos. A drift in decoding, rasterising or the model path would lower it.
BUNDLED_VAL_MIOU = 0.7941


@pytest.fixture(scope="module")
def bundled():
    if not BUNDLED_PARTS_CHECKPOINT.is_file():
        pytest.fail(f"{BUNDLED_PARTS_CHECKPOINT} is missing: it ships with the code")
    return load_checkpoint(BUNDLED_PARTS_CHECKPOINT)


def test_the_bundled_parts_model_is_small_and_names_its_classes(bundled):
    assert BUNDLED_PARTS_CHECKPOINT.stat().st_size < 16e6
    names = bundled["class_names"]
    assert names[0] == "background" and len(names) == 19
    assert {"front_left_door", "front_right_door", "left_mirror", "right_mirror", "wheel"} <= set(names)
    assert bundled["arch"] == "deeplabv3_efficientnet_lite0" and bundled["model_args"]["out_channels"] == 19


def test_the_bundled_parts_model_keeps_its_validation_score(bundled, carparts_dir, tmp_path):
    summary = evaluate.evaluate_checkpoint(EvaluateConfig(checkpoint=str(BUNDLED_PARTS_CHECKPOINT),
                                                          data_dir=str(carparts_dir), out_dir=str(tmp_path),
                                                          device="cpu", cache_dir="", worst_k=1, num_samples=0))
    assert summary["images"] == 50
    assert summary["full_res"]["miou"] == pytest.approx(BUNDLED_VAL_MIOU, abs=0.002)
    assert (tmp_path / "confusion.png").is_file() and (tmp_path / "per_class.csv").is_file()


def test_predict_writes_part_maps_that_read_back_as_classes(bundled, carparts_dir, tmp_path):
    photos = sorted((carparts_dir / "JPEGImages").glob("*.jpg"))[:2]
    written, failures = predict.predict_files(PredictConfig(inputs=[str(p) for p in photos], out_dir=str(tmp_path),
                                                            checkpoint=str(BUNDLED_PARTS_CHECKPOINT), overlay=True,
                                                            device="cpu"))
    assert failures == {} and len(written) == 2
    assert (tmp_path / "classes.txt").read_text().split() == bundled["class_names"]
    for photo in photos:
        parts = Image.open(tmp_path / f"{photo.stem}_parts.png")
        assert parts.mode == "P" and parts.size == Image.open(photo).size
        assert np.array_equal(np.frombuffer(bytes(parts.getpalette()[:19 * 3]), np.uint8).reshape(19, 3), palette(19))
        values = np.asarray(parts)
        assert values.max() < 19 and len(np.unique(values)) > 2  # the background and at least two parts
        mask = np.asarray(Image.open(tmp_path / f"{photo.stem}_mask.png"))
        assert ((mask == 255) | (values == 0)).all()  # every part pixel is car
