"""Protects predict.py, evaluate.py, export.py, the ONNX engines and carseg/atomic.py against awkward file names:
glob characters in existing paths, names that are not UTF-8, and names near the file system's 255-byte limit."""
import csv
import errno
import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from carseg import atomic
from carseg.inputs import collect_inputs
import predict
from config import PredictConfig
from conftest import car_picture
from model import UNet
from carseg.checkpoint import checkpoint_for, save_checkpoint

# Names a shell or glob would read as patterns, and others that break naive code.
ODD_NAMES = ["car[1].png", "car*.png", "what?.png", "a b.png", "voiture é 車.png", "-rf.png"]
DECOY = "car1.png"  # what "car[1].png" and "car*.png" match when read as patterns


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """An untrained tiny U-Net: these tests check which files are written, not what the masks hold."""
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(path, checkpoint_for(UNet(base_channels=4, depth=2),
                                         {"image_width": 64, "image_height": 48, "threshold": 0.5}))
    return str(path)


def write_photo(path):
    """A small synthetic car photo at `path` (str, Path or bytes: a name that is not UTF-8)."""
    image, _ = car_picture(0, 1, size=(40, 30))
    with open(path, "wb") as f:
        Image.fromarray(image).save(f, format="PNG")


def run_predict(checkpoint, inputs, out, **options):
    cfg = PredictConfig(inputs=[str(i) for i in inputs], out_dir=str(out), checkpoint=checkpoint, device="cpu",
                        backend="torch", precision="fp32", **options)
    return predict.predict_files(cfg)


def stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


@pytest.fixture
def shoot(tmp_path) -> Path:
    """tmp/photos/shoot[2024]/ holding ODD_NAMES and DECOY."""
    folder = tmp_path / "photos" / "shoot[2024]"
    folder.mkdir(parents=True)
    for name in ODD_NAMES + [DECOY]:
        write_photo(folder / name)
    return folder


# ---------------------------------------------------------------- glob characters in paths that exist

@pytest.mark.parametrize("name", ODD_NAMES)
def test_an_existing_file_is_used_as_given_whatever_its_name_holds(shoot, name):
    paths, problems = collect_inputs([str(shoot / name)])
    assert paths == [(shoot / name).resolve()] and problems == []


def test_odd_names_given_as_files_as_a_folder_and_as_a_pattern_write_their_own_outputs(checkpoint, shoot, tmp_path):
    expected = sorted([f"{stem(name)}_{kind}.png" for name in ODD_NAMES for kind in ("mask", "cutout")] + ["quality.csv"])
    written, failures = run_predict(checkpoint, [shoot / name for name in ODD_NAMES], tmp_path / "files", cutout=True)
    assert failures == {} and sorted(p.name for p in (tmp_path / "files").iterdir()) == expected
    everything = sorted(expected + [f"{stem(DECOY)}_mask.png", f"{stem(DECOY)}_cutout.png"])
    for given in (shoot, f"{shoot}/*.png"):  # the folder; a pattern inside it, which as a pattern matches nothing
        out = tmp_path / ("folder" if given is shoot else "pattern")
        written, failures = run_predict(checkpoint, [given], out, cutout=True)
        assert failures == {} and sorted(p.name for p in out.iterdir()) == everything


def test_a_pattern_inside_a_folder_with_glob_characters_is_read_in_that_folder(shoot, monkeypatch):
    monkeypatch.chdir(shoot.parent)
    for pattern, names in [("shoot[2024]/*.png", ODD_NAMES + [DECOY]),
                           ("shoot[2024]/car*", ["car[1].png", "car*.png", DECOY]),
                           (f"{shoot}/wh?t*", ["what?.png"])]:
        paths, problems = collect_inputs([pattern])
        assert problems == [] and sorted(p.name for p in paths) == sorted(names), pattern
    (shoot.parent / "shoot2").mkdir()  # where the pattern matches, it is a pattern (as the shell reads it)
    write_photo(shoot.parent / "shoot2" / "other.png")
    assert [p.name for p in collect_inputs(["shoot[2024]/*.png"])[0]] == ["other.png"]


def test_recursive_search_descends_into_folders_with_glob_characters(shoot):
    nested = shoot / "day[1]" / "*"
    nested.mkdir(parents=True)
    write_photo(nested / "deep[1].png")
    every = sorted(ODD_NAMES + [DECOY, "deep[1].png"])
    for given in (shoot.parent, f"{shoot.parent}/**/*.png"):
        paths, problems = collect_inputs([str(given)], recursive=True)
        assert problems == [] and sorted(p.name for p in paths) == every, given
    paths, _ = collect_inputs([str(shoot)])
    assert "deep[1].png" not in [p.name for p in paths]  # not without --recursive


def test_a_missing_path_is_named_as_missing_and_a_pattern_matching_nothing_as_a_pattern(shoot):
    _, problems = collect_inputs([str(shoot / "gone.png"), str(shoot / "gone[1].png"), str(shoot / "*.tif")])
    assert problems == [f"{shoot / 'gone.png'}: does not exist",
                        f"{shoot / 'gone[1].png'}: no such file, and no file matches it as a pattern",
                        f"{shoot / '*.tif'}: no such file, and no file matches it as a pattern"]


@pytest.mark.parametrize("order", ["dashes first", "dashes last"])
def test_a_leading_dash_after_double_dash_is_a_file_on_the_command_line(order, checkpoint, shoot, tmp_path,
                                                                        monkeypatch):
    monkeypatch.chdir(shoot)
    options = ["--checkpoint", checkpoint, "--device", "cpu", "--backend", "torch", "--out-dir", str(tmp_path / "out")]
    # argparse's parse_intermixed_args alone refuses a "--" before every input; config.parse_config takes it apart
    argv = options + (["--", "-rf.png", "car[1].png"] if order == "dashes first" else ["car[1].png", "--", "-rf.png"])
    written = predict.main(argv)
    assert sorted(p.name for p in written) == ["-rf_mask.png", "car[1]_mask.png"]


def test_after_double_dash_everything_is_an_input_even_what_looks_like_an_option(checkpoint, shoot, tmp_path,
                                                                                  monkeypatch, caplog):
    monkeypatch.chdir(shoot)
    with pytest.raises(SystemExit):
        predict.main(["--checkpoint", checkpoint, "--device", "cpu", "--out-dir", str(tmp_path / "out"),
                      "--", "--tta"])
    assert "failed: --tta: does not exist" in caplog.text


# ---------------------------------------------------------------- names that are not UTF-8

@pytest.fixture
def latin1_folder(tmp_path) -> Path:
    """tmp/latin1/ holding a.png, b.png and the Latin-1 name b'caf\\xe9.png' (an old camera card's)."""
    folder = tmp_path / "latin1"
    folder.mkdir()
    try:
        os.close(os.open(os.fsencode(folder) + b"/caf\xe9.png", os.O_CREAT | os.O_WRONLY, 0o644))
    except OSError as err:  # macOS's APFS, for one, refuses names that are not UTF-8
        pytest.skip(f"this file system refuses a name that is not UTF-8: {err}")
    write_photo(os.fsencode(folder) + b"/caf\xe9.png")
    for name in ("a.png", "b.png"):
        write_photo(folder / name)
    return folder


def test_a_name_that_is_not_utf8_is_predicted_with_its_own_bytes(checkpoint, latin1_folder, tmp_path):
    out = tmp_path / "out"
    written, failures = run_predict(checkpoint, [latin1_folder], out, cutout=True)
    assert failures == {} and len(written) == 3
    assert sorted(os.listdir(os.fsencode(out))) == sorted([b"a_mask.png", b"a_cutout.png", b"b_mask.png",
                                                           b"b_cutout.png", b"caf\xe9_mask.png", b"caf\xe9_cutout.png",
                                                           b"quality.csv"])


def test_a_name_that_is_not_utf8_gets_no_submission_row_and_a_message_that_prints(checkpoint, latin1_folder, tmp_path,
                                                                                   caplog):
    sub = tmp_path / "sub.csv"
    for skip in (False, True):  # --skip-existing reads the masks back (cv2.imread crashed on such a name)
        written, failures = run_predict(checkpoint, [latin1_folder], tmp_path / "out", submission=str(sub),
                                        skip_existing=skip)
        assert len(written) == 3 and len(failures) == 1
        (message,) = failures.values()
        assert message.startswith(f"{latin1_folder}/caf\ufffd.png: mask written, but no submission row")
        assert "not UTF-8" in message
        rows = list(csv.reader(sub.open(newline="", encoding="utf-8")))
        assert rows == [["img", "rle_mask"], ["a.png", rows[1][1]], ["b.png", rows[2][1]]]
    for record in caplog.records:  # every logged line is printable UTF-8
        record.getMessage().encode("utf-8")


def test_the_ranks_compare_names_that_are_not_utf8():
    names = [Path(os.fsdecode(b"caf\xe9.png")), Path("line\nbreak.png")]
    assert predict._names_digest(names) != predict._names_digest([Path("line"), Path("break.png")])


def test_a_message_naming_a_file_that_is_not_utf8_is_shown_with_a_replacement_character():
    assert atomic.shown(os.fsdecode(b"/x/caf\xe9.png") + ": cannot read") == "/x/caf\ufffd.png: cannot read"
    assert atomic.shown(Path("/x/café.png")) == "/x/café.png"


def test_text_that_is_not_utf8_is_refused_naming_the_file(tmp_path):
    with pytest.raises(OSError, match=r"cannot write .*per_image.csv: its text is not UTF-8 at 'name.+caf\?\.png"):
        atomic.write_text(tmp_path / "per_image.csv", "name\n" + os.fsdecode(b"caf\xe9.png") + "\n")


def test_evaluate_refuses_a_photo_name_that_is_not_utf8_before_scoring_naming_it(tmp_path, monkeypatch):
    import evaluate
    from conftest import save_palette_gif, write_kaggle_dataset
    data = write_kaggle_dataset(tmp_path / "data")
    image, mask = car_picture(0, 1, size=(96, 64))
    try:
        Image.fromarray(image).save(os.fsdecode(os.fsencode(data / "train") + b"/caf\xe9_01.jpg"), format="JPEG")
    except OSError as err:
        pytest.skip(f"this file system refuses a name that is not UTF-8: {err}")
    save_palette_gif(mask, os.fsdecode(os.fsencode(data / "train_masks") + b"/caf\xe9_01_mask.gif"))
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, checkpoint_for(UNet(base_channels=4, depth=2),
                                               {"image_width": 64, "image_height": 48, "threshold": 0.5}))
    monkeypatch.setattr(evaluate, "prepare_store", lambda *a, **k: pytest.fail("decoded before the refusal"))
    with pytest.raises(SystemExit, match=r"1 photo name is not UTF-8, which per_image.csv cannot hold "
                                         r"unchanged: .*/train/caf\\xe9_01.jpg; rename it"):
        evaluate.main(["--checkpoint", str(checkpoint), "--data-dir", str(data), "--split", "all", "--device", "cpu",
                       "--cache-dir", "", "--out-dir", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


# ---------------------------------------------------------------- names near NAME_MAX

def test_every_output_whose_name_fits_is_written_and_a_photo_with_one_too_long_is_refused(checkpoint, tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    out.mkdir()
    limit = atomic.name_max(out)
    fit = limit - len("_cutout.png")  # <stem>_cutout.png exactly NAME_MAX bytes (244 characters on ext4)
    stems = {"short": "s" * (fit - 8), "exact": "e" * fit, "over": "o" * (fit + 1),
             "two-byte exact": "é" * (fit // 2) + "x" * (fit % 2), "two-byte over": "é" * (fit // 2 + 1)}
    for name in stems.values():
        write_photo(photos / f"{name}.png")
    written, failures = run_predict(checkpoint, [photos], out, cutout=True)
    fitting = [stems["short"], stems["exact"], stems["two-byte exact"]]
    assert sorted(os.listdir(out)) == sorted([f"{s}_{kind}.png" for s in fitting for kind in ("mask", "cutout")]
                                             + ["quality.csv"])
    assert sorted(p.name for p in written) == sorted(f"{s}_mask.png" for s in fitting)
    assert sorted(failures) == sorted(str((photos / f"{stems[k]}.png").resolve()) for k in ("over", "two-byte over"))
    message = failures[str((photos / f"{stems['two-byte over']}.png").resolve())]
    cutout = f"{stems['two-byte over']}_cutout.png"  # fewer characters than NAME_MAX, more bytes
    assert len(cutout) < limit and f"cannot write {cutout}: its name is {len(cutout.encode())} bytes" in message


def test_a_temporary_fits_wherever_the_name_it_becomes_does(tmp_path):
    limit = atomic.name_max(tmp_path)
    names = ["x" * n + "_cutout.png" for n in range(limit - 40, limit - 10)] + ["é" * 122 + ".png", "a" * 300]
    keys = set()
    for name in names:
        tmp = atomic.temporary_path(tmp_path / name)
        assert len(os.fsencode(tmp.name)) <= limit and tmp.parent == tmp_path
        key = atomic.temporary_target(tmp).name
        assert atomic.temporary_key(tmp_path / key) == key and key.endswith(name[-11:])
        keys.add(key)
    assert len(keys) == len(names)  # names that differ only in their middle keep different temporaries
    assert atomic.temporary_target(atomic.temporary_path(tmp_path / "sub.csv")) == tmp_path / "sub.csv"


def test_a_long_names_stale_temporary_is_found_by_its_target_and_by_its_own_name(tmp_path):
    name = "e" * (atomic.name_max(tmp_path) - len("_cutout.png")) + "_cutout.png"
    dead_pid = 2 ** 31 - 2  # no process has it: pids stay far below (Linux's pid_max is at most 2**22)
    stale = atomic.temporary_path(tmp_path / name).name.replace(f".{os.getpid()}.tmp", f".{dead_pid}.tmp")
    for given in (tmp_path / name, atomic.temporary_target(tmp_path / stale)):
        (tmp_path / stale).write_bytes(b"partial")
        (tmp_path / f".other.png.{dead_pid}.tmp").write_bytes(b"another file's")
        assert atomic.remove_stale_temporaries(given) == 1
        assert os.listdir(tmp_path) == [f".other.png.{dead_pid}.tmp"]


def test_a_name_too_long_for_the_file_system_is_an_error_naming_it(tmp_path):
    target = tmp_path / ("x" * (atomic.name_max(tmp_path) + 1))
    with pytest.raises(OSError, match=f"cannot write {target}") as raised:
        atomic.write_bytes(target, b"data")
    assert raised.value.errno == errno.ENAMETOOLONG and os.listdir(tmp_path) == []


def test_a_failed_clean_up_does_not_hide_the_error_that_made_the_write_fail(tmp_path, monkeypatch, caplog):
    def refuse(self, missing_ok=False):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    target = tmp_path / "car_mask.png"
    with pytest.raises(OSError, match="cannot write .*car_mask.png: No space left on device"):
        with atomic.atomic_write(target) as f:
            f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_write(target):
            raise KeyboardInterrupt
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "could not remove the temporary file" in warnings[0]
    assert "Permission denied" in warnings[0]


def test_a_stem_holding_mask_png_is_found_finished_by_skip_existing(checkpoint, tmp_path, caplog):
    photos = tmp_path / "photos"
    photos.mkdir()
    write_photo(photos / "a_mask.png.png")  # its outputs: a_mask.png_mask.png, a_mask.png_cutout.png
    run_predict(checkpoint, [photos], tmp_path / "out", cutout=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["a_mask.png_cutout.png", "a_mask.png_mask.png", "quality.csv"]
    with caplog.at_level(logging.INFO):
        run_predict(checkpoint, [photos], tmp_path / "out", cutout=True, skip_existing=True)
    assert "--skip-existing: 1 of 1 photo(s) have all their outputs already" in caplog.text


def test_a_killed_runs_temporary_of_a_long_output_name_is_removed_as_a_leftover(tmp_path):
    dead_pid = 2 ** 31 - 2
    long_name = "e" * (atomic.name_max(tmp_path) - len("_cutout.png")) + "_cutout.png"
    ours = atomic.temporary_path(tmp_path / long_name).name.replace(f".{os.getpid()}.", f".{dead_pid}.")
    theirs = atomic.temporary_path(tmp_path / (long_name[:-len("_cutout.png")] + ".txt")).name \
        .replace(f".{os.getpid()}.", f".{dead_pid}.")  # not an output of predict.py: kept
    for name in (ours, theirs):
        (tmp_path / name).write_bytes(b"partial")
    predict.remove_leftovers(PredictConfig(inputs=["x"], out_dir=str(tmp_path)))
    assert os.listdir(tmp_path) == [theirs]


# ---------------------------------------------------------------- ONNX models whose names are not UTF-8

def test_an_onnx_model_whose_name_is_not_utf8_exports_runs_on_both_engines_and_evaluates(checkpoint, tmp_path,
                                                                                         monkeypatch, capsys):
    # ONNX Runtime took a path only as a str it could encode to UTF-8: a TypeError in export's parity
    # check, in predict.py and in evaluate.py; OpenVINO's compile cache had the same limit.
    import evaluate
    import export
    from conftest import write_kaggle_dataset
    from inference import Predictor
    folder = os.fsdecode(os.fsencode(tmp_path) + b"/x\xff")
    try:
        os.mkdir(folder)
    except OSError as err:  # macOS's APFS, for one, refuses names that are not UTF-8
        pytest.skip(f"this file system refuses a name that is not UTF-8: {err}")
    monkeypatch.setenv("CARSEG_CACHE_DIR", os.path.join(folder, "cache"))
    out = os.path.join(folder, os.fsdecode(b"exp \xff [1].onnx"))
    export.main([checkpoint, "--format", "onnx", "--out", out, "--data-dir", str(tmp_path / "none")])
    printed = capsys.readouterr().out
    assert "exp \ufffd [1].onnx" in printed and "onnxruntime (fp32): max |logit diff|" in printed
    images = torch.rand(2, 3, 48, 64)
    reference = Predictor.from_checkpoint(checkpoint, "cpu", "fp32").logits(images)
    for engine in ("onnxruntime", "openvino"):
        logits = Predictor.from_checkpoint(out, "cpu", "fp32", backend=engine).logits(images)
        assert (logits - reference).abs().max().item() < 1e-4
    data = write_kaggle_dataset(tmp_path / "data")
    evaluate.main(["--checkpoint", out, "--data-dir", str(data), "--split", "all", "--backend", "onnxruntime",
                   "--device", "cpu", "--cache-dir", ""])
    reports = os.path.join(folder, os.fsdecode(b"eval-exp \xff [1]-all"))
    assert "summary.json" in os.listdir(reports)
    assert f"reports in {atomic.shown(reports)}" in capsys.readouterr().out
