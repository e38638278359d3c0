"""Protects predict.py's inputs from its own outputs: a --submission never replaces a photo, an output or a
user's file; a link is an input of its own; what a folder holds that is no photo is reported; a refused
run leaves nothing behind."""
import errno
import gzip
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import predict
from carseg import atomic
from carseg.checkpoint import checkpoint_for, save_checkpoint
from config import PredictConfig
from conftest import car_picture
from model import UNet

PARTS = ["background", "left_door", "right_door", "wheel"]


def tiny_checkpoint(path: Path, class_names=("background", "car")) -> str:
    """An untrained tiny U-Net: these tests check which files are written, not what the masks hold."""
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=2, out_channels=1 if len(class_names) == 2 else len(class_names))
    save_checkpoint(path, checkpoint_for(model, {"image_width": 64, "image_height": 48, "threshold": 0.5},
                                         class_names=list(class_names)))
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="module")
def parts_checkpoint(tmp_path_factory) -> str:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "parts.pt", PARTS)


def write_photo(path: Path) -> Path:
    image, _ = car_picture(0, 1, size=(40, 30))
    Image.fromarray(image).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")
    return path


@pytest.fixture
def shoot(tmp_path) -> Path:
    """tmp/shoot/ holding a.jpg, b.jpg and victim.jpg."""
    folder = tmp_path / "shoot"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "victim.jpg"):
        write_photo(folder / name)
    return folder


def run_predict(checkpoint, inputs, out, **options):
    cfg = PredictConfig(inputs=[str(i) for i in inputs], out_dir=str(out), checkpoint=checkpoint, device="cpu",
                        backend="torch", precision="fp32", **options)
    return predict.predict_files(cfg)


def run_main(checkpoint, *argv):
    return predict.main(["--checkpoint", checkpoint, "--device", "cpu", "--backend", "torch", "--precision", "fp32",
                         *argv])


def contents(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model is loaded: the refusals under test come before any work."""
    monkeypatch.setattr(predict.Predictor, "from_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))


# ---------------------------------------------------------------- --submission over an input or an output

@pytest.mark.parametrize("given, extra, said", [
    ("{shoot}/victim.jpg", ["{shoot}/victim.jpg"], "is the input .*victim.jpg"),
    ("{shoot}/./victim.jpg", ["{shoot}"], "is the input .*victim.jpg"),  # another spelling, found in a folder
    ("{shoot}/victim.jpg", ["{shoot}/link.jpg"], "is the input .*link.jpg"),  # what a link given as input shows
    ("{out}/victim_mask.png", ["{shoot}/victim.jpg"], "is the output victim_mask.png of .*victim.jpg"),
    ("{out}/victim_cutout.png", ["{shoot}/victim.jpg"], "is the output victim_cutout.png of .*victim.jpg"),
    ("{out}/classes.txt", ["{shoot}/victim.jpg"], "is the classes.txt a parts model writes"),
    ("{checkpoint}", ["{shoot}/victim.jpg"], "is the checkpoint .*tiny.pt"),
], ids=["input", "input-spelled-otherwise", "link-target", "mask", "cutout", "classes", "checkpoint"])
def test_a_submission_that_is_an_input_or_an_output_is_refused_before_any_work_even_with_overwrite(
        checkpoint, shoot, tmp_path, no_model, given, extra, said):
    (shoot / "link.jpg").symlink_to("victim.jpg")
    out = tmp_path / "out"
    names = dict(shoot=shoot, out=out, checkpoint=checkpoint)
    if given.startswith("{out}"):
        out.mkdir()
    before = contents(shoot)
    for told in ("--overwrite", "--skip-existing"):
        with pytest.raises(SystemExit, match=said):
            run_main(checkpoint, *[e.format(**names) for e in extra], "--out-dir", str(out),
                     "--submission", given.format(**names), told)
    assert contents(shoot) == before
    assert not out.exists() or not list(out.iterdir())


def test_a_pattern_after_submission_expanded_by_the_shell_replaces_no_photo(checkpoint, shoot, tmp_path, no_model,
                                                                            monkeypatch):
    monkeypatch.chdir(shoot)
    before = contents(shoot)
    for told in ("--skip-existing", "--overwrite"):  # `--submission *.jpg`: --submission a.jpg b.jpg victim.jpg
        with pytest.raises(SystemExit, match=r"--submission a.jpg: a photo's name \(.jpg\), not a CSV"):
            run_main(checkpoint, told, "--out-dir", "masks", "--submission", "a.jpg", "b.jpg", "victim.jpg")
    assert contents(shoot) == before and not (shoot / "masks").exists()


def test_a_submission_beside_the_masks_in_an_out_dir_not_yet_made_is_written(checkpoint, shoot, tmp_path):
    out = tmp_path / "new"
    written, failures = run_predict(checkpoint, [shoot], out, submission=str(out / "sub.csv"))
    assert failures == {} and (out / "sub.csv").read_text().splitlines()[0] == "img,rle_mask"


# ---------------------------------------------------------------- an existing --submission

def gzipped(text: str) -> bytes:
    return gzip.compress(text.encode(), mtime=0)


@pytest.mark.parametrize("name, data, is_submission", [
    ("sub.csv", b"img,rle_mask\na.jpg,1 5\n", True),
    ("sub.csv", b"img,rle_mask\r\n", True),
    ("sub.csv.gz", gzipped("img,rle_mask\na.jpg,1 5\n"), True),
    ("mine.csv", b"my own notes\n", False),
    ("mine.csv", b"", False),
    ("mine.csv", b"img,rle_mask,extra\n", False),
    ("mine.csv.gz", b"img,rle_mask\n", False),  # not gzip: not what this tool writes for .gz
    ("mine.csv.gz", gzipped("my own notes\n"), False),
    ("mine.csv.gz", gzipped("img,rle_mask\n")[:15], False),  # a gzip stream cut short
], ids=["csv", "csv-crlf", "gz", "notes", "empty", "other-header", "gz-not-gzip", "gz-notes", "gz-cut"])
def test_skip_existing_rebuilds_a_submission_only_and_each_refusal_advises_what_would_work(
        checkpoint, shoot, tmp_path, name, data, is_submission):
    sub = tmp_path / name
    sub.write_bytes(data)
    with pytest.raises(FileExistsError) as refused:
        run_predict(checkpoint, [shoot], tmp_path / "out", submission=str(sub))
    assert ("--skip-existing to finish the run that wrote it" in str(refused.value)) == is_submission
    assert sub.read_bytes() == data
    if is_submission:
        run_predict(checkpoint, [shoot], tmp_path / "out", submission=str(sub), skip_existing=True)
    else:
        with pytest.raises(FileExistsError, match=f"{name} exists already and is not a submission "
                                                  r"\(its first line is not img,rle_mask\), which --skip-existing "
                                                  "alone never replaces: pass --overwrite to replace it"):
            run_predict(checkpoint, [shoot], tmp_path / "out", submission=str(sub), skip_existing=True)
        assert sub.read_bytes() == data
        run_predict(checkpoint, [shoot], tmp_path / "out", submission=str(sub), skip_existing=True, overwrite=True)
    text = gzip.decompress(sub.read_bytes()).decode() if name.endswith(".gz") else sub.read_text()
    assert [line.split(",")[0] for line in text.splitlines()] == ["img", "a.jpg", "b.jpg", "victim.jpg"]


# ---------------------------------------------------------------- one file written twice at once

def test_a_second_write_of_a_file_being_written_is_refused_and_the_first_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s3").mkdir()
    with atomic.atomic_write(Path("s3/q?_mask.png")) as first:  # the submission, streaming under a relative name
        first.write(b"img,rle_mask\n")
        with pytest.raises(OSError, match=r"cannot write .*s3/q\?_mask.png: this process is writing it already") as err:
            atomic.write_bytes(tmp_path / "s3" / "q?_mask.png", b"\x89PNG mask")  # a mask, under its absolute name
        assert err.value.errno == errno.EBUSY
        first.write(b"q?.jpg,1 5\n")
    assert (tmp_path / "s3" / "q?_mask.png").read_bytes() == b"img,rle_mask\nq?.jpg,1 5\n"
    assert os.listdir(tmp_path / "s3") == ["q?_mask.png"]  # no temporary left
    atomic.write_bytes(tmp_path / "s3" / "q?_mask.png", b"again")  # written once the first write is over
    assert (tmp_path / "s3" / "q?_mask.png").read_bytes() == b"again"


# ---------------------------------------------------------------- links, pipes and other entries

def test_a_link_and_its_target_are_two_inputs_each_named_after_itself(checkpoint, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    write_photo(folder / "sp ace.jpg")
    (folder / "link.jpg").symlink_to("sp ace.jpg")
    for inputs in ([folder / "link.jpg", folder / "sp ace.jpg"], [folder]):
        out, sub = tmp_path / f"out{len(inputs)}", tmp_path / f"sub{len(inputs)}.csv"
        written, failures = run_predict(checkpoint, inputs, out, submission=str(sub))
        assert failures == {} and sorted(p.name for p in out.iterdir()) == ["link_mask.png", "quality.csv", "sp ace_mask.png"]
        assert [line.split(",")[0] for line in sub.read_text().splitlines()] == ["img", "link.jpg", "sp ace.jpg"]
    written, failures = run_predict(checkpoint, [folder / "link.jpg"], tmp_path / "alone")
    assert [p.name for p in written] == ["link_mask.png"]


def test_entries_of_a_folder_that_are_no_photo_are_reported_as_given_by_name(checkpoint, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    write_photo(folder / "good.jpg")
    (folder / "dangling.jpg").symlink_to("gone.jpg")
    (folder / "loop.jpg").symlink_to("loop.jpg")
    os.mkfifo(folder / "pipe.jpg")  # opened, it would wait for a writer for ever
    (folder / "notes.txt").write_text("not named as a photo: not an input")
    expected = {f"{folder / 'dangling.jpg'}: a symbolic link to gone.jpg, which does not exist",
                f"{folder / 'loop.jpg'}: a symbolic link to loop.jpg, which cannot be read",
                f"{folder / 'pipe.jpg'}: a named pipe, not a photo file"}
    for inputs in ([folder], [folder / name for name in ("good.jpg", "dangling.jpg", "loop.jpg", "pipe.jpg")]):
        written, failures = run_predict(checkpoint, inputs, tmp_path / "out")
        assert [p.name for p in written] == ["good_mask.png"]
        assert {message.split(" (")[0] for message in failures.values()} == expected
    with pytest.raises(SystemExit) as exit_info:
        run_main(checkpoint, str(folder), "--out-dir", str(tmp_path / "out2"))
    assert exit_info.value.code == 1


# ---------------------------------------------------------------- --out-dir

@pytest.mark.parametrize("options", [
    dict(threshold=0.3),  # refused once the parts model is loaded
    dict(submission="{shoot}/victim.csv"),  # refused before
])
def test_a_run_refused_before_any_work_leaves_no_out_dir(parts_checkpoint, shoot, tmp_path, options):
    (shoot / "victim.csv").write_text("my notes\n")
    options = {k: v.format(shoot=shoot) if isinstance(v, str) else v for k, v in options.items()}
    out = tmp_path / "new" / "out"
    with pytest.raises((ValueError, FileExistsError)):
        run_predict(parts_checkpoint, [shoot], out, **options)
    assert not (tmp_path / "new").exists()


def test_an_out_dir_that_is_an_input_folder_or_inside_a_searched_one_is_refused(checkpoint, shoot, no_model):
    before = contents(shoot)
    for out, recursive in ((shoot, False), (shoot, True), (shoot / "masks", True)):
        with pytest.raises(ValueError, match=f"--out-dir {out} (is|is inside) the input folder {shoot}: "):
            run_predict(checkpoint, [shoot], out, recursive=recursive)
    assert contents(shoot) == before and not (shoot / "masks").exists()


def test_an_out_dir_inside_an_input_folder_not_searched_is_used(checkpoint, shoot):
    written, failures = run_predict(checkpoint, [shoot], shoot / "masks")
    assert failures == {} and len(written) == 3


def test_a_users_classes_txt_is_refused_and_the_models_own_kept(parts_checkpoint, shoot, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "classes.txt").write_text("my own classes\n")
    for told in (dict(), dict(overwrite=True), dict(skip_existing=True)):
        with pytest.raises(ValueError, match=r"classes.txt exists and does not list this model's 4 classes "
                                             r"\(background, left_door, right_door, wheel\)"):
            run_predict(parts_checkpoint, [shoot], out, **told)
        assert contents(out) == {"classes.txt": b"my own classes\n"}
    (out / "classes.txt").unlink()
    for skip in (False, True):  # a rerun and a resumed run with the same model
        written, failures = run_predict(parts_checkpoint, [shoot], out, skip_existing=skip)
        assert failures == {} and len(written) == 3
    assert (out / "classes.txt").read_text() == "".join(f"{name}\n" for name in PARTS)
