"""Fuzzes the parsers of untrusted input: config files and flags, image and mask decoding.

Each property says the input is either accepted, giving a well-formed result, or refused with the
project's own error (ValueError / argparse's exit 2), never another exception. FUZZ_EXAMPLES=N runs
longer sessions (the default keeps the suite fast).
"""
import io
import json
import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from config import EvaluateConfig, PredictConfig, TrainConfig, load_config_file, parse_config
from conftest import car_picture
from dataset import load_mask
from carseg.images import load_image

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
# The default run is derandomized so CI is repeatable; FUZZ_EXAMPLES=N explores new inputs each time.
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize="FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True)
                           | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3), max_leaves=5)
train_keys = st.sampled_from([f.name for f in TrainConfig.__dataclass_fields__.values()]) | st.text(max_size=10)


@fuzz
@given(st.dictionaries(train_keys, json_values, max_size=5))
def test_config_files_are_accepted_or_refused_cleanly(tmp_path, values):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))
    try:
        parsed = load_config_file(TrainConfig, path)
    except ValueError as err:
        assert "--config" in str(err)
        return
    assert set(parsed) <= set(TrainConfig.__dataclass_fields__)
    try:
        TrainConfig(**parsed)
    except ValueError as err:
        assert str(err).startswith("--")  # a range check naming the option


flag_names = st.sampled_from(["--epochs", "--lr", "--image-width", "--precision", "--device", "--bilinear", "--no-bilinear",
                              "--val-fraction", "--augment", "--config", "--threshold", "--bogus", "-h2"])


@fuzz
@given(st.lists(flag_names | st.text(max_size=8), max_size=6), st.sampled_from([TrainConfig, EvaluateConfig, PredictConfig]))
def test_command_lines_are_accepted_or_refused_cleanly(argv, cls):
    try:
        cfg = parse_config(cls, argv)
    except SystemExit as exit_info:
        assert exit_info.code in (0, 2)  # -h, or argparse's usage error
        return
    assert isinstance(cfg, cls)


def valid_png_bytes(kind: str) -> bytes:
    image, mask = car_picture(0, 1, size=(24, 16))
    buffer = io.BytesIO()
    (Image.fromarray(mask * 255) if kind == "mask" else Image.fromarray(image)).save(
        buffer, format="PNG" if kind == "mask" else "JPEG")
    return buffer.getvalue()


def mutations(data: bytes):
    """Truncations, overwritten bytes and random junk derived from a valid file."""
    return st.one_of(
        st.integers(0, len(data)).map(lambda n: data[:n]),
        st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
            lambda edits: bytes(b if i not in dict(edits) else dict(edits)[i] for i, b in enumerate(data))),
        st.binary(max_size=200))


@fuzz
@given(mutations(valid_png_bytes("image")), st.sampled_from([None, (16, 16)]))
def test_image_loader_decodes_or_refuses(tmp_path, data, size):
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    try:
        array, full_size = load_image(path, size)
    except ValueError as err:
        assert "photo.jpg" in str(err)
        return
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    assert (array.shape[1], array.shape[0]) == (size or full_size)


@fuzz
@given(mutations(valid_png_bytes("mask")))
def test_mask_loader_decodes_or_refuses(tmp_path, data):
    path = tmp_path / "m_mask.png"
    path.write_bytes(data)
    try:
        mask = load_mask(path)
    except ValueError as err:
        assert "m_mask.png" in str(err)
        return
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) <= {0, 1}
