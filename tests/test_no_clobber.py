"""Protects users' files: no command replaces a file it did not make unless told (--overwrite), a
default location is each output's own, and a run that yields nothing replaces nothing."""
import dataclasses
import hashlib
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import bench
import dataset
import evaluate
import export
import predict
from carseg import submission
from config import EvaluateConfig, PredictConfig
from conftest import REPO_ROOT, write_coco_dataset, write_kaggle_dataset
from carseg.distributed import World
from model import UNet
from carseg.checkpoint import checkpoint_for, load_checkpoint, save_checkpoint

BUNDLED = ("carvana_unet.pt", "carparts.pt")
PARTS = ["background", "left_door", "right_door", "wheel"]  # write_coco_dataset's classes


def tiny_checkpoint(path: Path, class_names=("background", "car")) -> Path:
    """An untrained 4-channel U-Net at 64x48 saved at `path`: these tests check files, not masks."""
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=2, out_channels=1 if len(class_names) == 2 else len(class_names))
    config = {"image_width": 64, "image_height": 48, "threshold": 0.5}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, checkpoint_for(model, config, class_names=list(class_names)))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def bundled(tmp_path, monkeypatch) -> Path:
    """tmp/checkpoints/ holding copies of the repository's bundled models, which export.py takes for the
    bundled ones; the repository's own files are never written by these tests."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in BUNDLED:
        shutil.copy(REPO_ROOT / "checkpoints" / name, folder / name)
    monkeypatch.setattr(export, "BUNDLED_CHECKPOINT", folder / BUNDLED[0])
    monkeypatch.setattr(export, "BUNDLED_PARTS_CHECKPOINT", folder / BUNDLED[1])
    return folder


# ---------------------------------------------------------------- export.py

def test_export_without_out_writes_beside_its_source_and_leaves_the_bundled_models_alone(bundled, capsys):
    before = {name: digest(bundled / name) for name in BUNDLED}
    shipped = {name: digest(REPO_ROOT / "checkpoints" / name) for name in BUNDLED}
    for classes in (("background", "car"), PARTS):  # either kind once defaulted to its bundled model
        source = tiny_checkpoint(bundled / f"run{len(classes)}" / "best.pt", classes)
        export.main([str(source)])
        slim = load_checkpoint(source.with_name("best.slim.pt"))
        assert slim["class_names"] == list(classes) and "optimizer" not in slim
        assert f"wrote {source.with_name('best.slim.pt')}" in capsys.readouterr().out
    assert {name: digest(bundled / name) for name in BUNDLED} == before
    assert {name: digest(REPO_ROOT / "checkpoints" / name) for name in BUNDLED} == shipped


def test_an_existing_target_is_refused_naming_it_then_replaced_with_overwrite(bundled, tmp_path):
    source = tiny_checkpoint(tmp_path / "run" / "best.pt")  # `bundled`: a regression writes over copies only
    mine = tmp_path / "mine.pt"
    for out, extra in ((source.with_name("best.slim.pt"), []), (mine, ["--out", str(mine)])):  # default, given
        out.write_bytes(b"someone else's file")
        with pytest.raises(SystemExit, match=f"{out} exists already: pass --overwrite to replace it, or give another"):
            export.main([str(source), *extra])
        assert out.read_bytes() == b"someone else's file"
        export.main([str(source), *extra, "--overwrite"])
        assert load_checkpoint(out)["model_args"]["base_channels"] == 4


def test_an_existing_onnx_target_is_refused_before_any_export(bundled, tmp_path, monkeypatch):
    source = tiny_checkpoint(tmp_path / "model.pt")
    (tmp_path / "model.onnx").write_bytes(b"an earlier export")  # the default: <stem>.onnx beside the source
    monkeypatch.setattr(export, "export_onnx_checked", lambda *a: pytest.fail("exported before the refusal"))
    with pytest.raises(SystemExit, match="model.onnx exists already: pass --overwrite"):
        export.main([str(source), "--format", "onnx"])
    assert (tmp_path / "model.onnx").read_bytes() == b"an earlier export"


@pytest.mark.parametrize("name", BUNDLED)
def test_replacing_a_bundled_model_takes_overwrite_and_says_how_to_get_it_back(bundled, name, capsys):
    source = tiny_checkpoint(bundled / "run" / "best.pt")
    target, before = bundled / name, digest(bundled / name)
    restore = f"`git checkout -- checkpoints/{name}` brings back the shipped file"
    with pytest.raises(SystemExit) as refused:
        export.main([str(source), "--out", str(target)])
    assert "the bundled model every script loads by default" in str(refused.value) and restore in str(refused.value)
    assert digest(target) == before
    export.main([str(source), "--out", str(target), "--overwrite"])
    assert digest(target) != before and load_checkpoint(target)["model_args"]["base_channels"] == 4
    assert restore in capsys.readouterr().out


# ---------------------------------------------------------------- evaluate.py

def run_evaluate(checkpoint: Path, data_dir: Path, **options) -> dict:
    return evaluate.evaluate_checkpoint(EvaluateConfig(checkpoint=str(checkpoint), data_dir=str(data_dir), split="all",
                                                       device="cpu", cache_dir="", **options))


@pytest.fixture
def two_models(tmp_path) -> dict:
    """Tiny stand-ins for the two bundled models, side by side in tmp/checkpoints/ as the real ones are,
    each with a data folder it can score."""
    folder = tmp_path / "checkpoints"
    return {"carvana_unet": (tiny_checkpoint(folder / "carvana_unet.pt"), write_kaggle_dataset(tmp_path / "kaggle")),
            "carparts": (tiny_checkpoint(folder / "carparts.pt", PARTS), write_coco_dataset(tmp_path / "coco"))}


@pytest.mark.slow
def test_the_two_bundled_models_evaluated_in_turn_leave_two_report_folders(two_models, tmp_path):
    for checkpoint, data_dir in two_models.values():
        run_evaluate(checkpoint, data_dir)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["eval-carparts-all", "eval-carvana_unet-all"]
    binary, parts = folder / "eval-carvana_unet-all", folder / "eval-carparts-all"
    assert sorted(p.name for p in binary.iterdir()) == [evaluate.MANIFEST, "per_image.csv", "samples.png",
                                                        "summary.json", "threshold_sweep.png", "worst.png"]
    assert sorted(p.name for p in parts.iterdir()) == [evaluate.MANIFEST, "confusion.png", "per_class.csv",
                                                       "per_image.csv", "samples.png", "summary.json", "worst.png"]


@pytest.mark.slow
def test_an_out_dir_reused_by_another_model_keeps_none_of_the_earlier_reports(two_models, tmp_path, caplog):
    out = tmp_path / "reports"
    run_evaluate(*two_models["carparts"], out_dir=str(out))
    (out / "notes.txt").write_text("the user's own")  # not a report name: never touched
    with caplog.at_level(logging.INFO, logger="evaluate"):
        summary = run_evaluate(*two_models["carvana_unet"], out_dir=str(out), worst_k=0)
    assert "report_error" not in summary
    # The parts model's confusion matrix and per-class table are gone, and so is its worst.png,
    # which --worst-k 0 no longer draws over.
    assert sorted(p.name for p in out.iterdir()) == [evaluate.MANIFEST, "notes.txt", "per_image.csv", "samples.png",
                                                     "summary.json", "threshold_sweep.png"]
    assert "removed an earlier evaluation's per_class.csv, confusion.png, worst.png" in caplog.text


@pytest.mark.parametrize("where", ["--out-dir", "the default folder"])
def test_evaluate_refuses_report_names_it_did_not_write_before_scoring_and_replaces_them_with_overwrite(
        tmp_path, monkeypatch, where):
    checkpoint, data = tiny_checkpoint(tmp_path / "models" / "tiny.pt"), write_kaggle_dataset(tmp_path / "kaggle")
    out = tmp_path / "mine" if where == "--out-dir" else tmp_path / "models" / "eval-tiny-all"
    out.mkdir()
    mine = {"confusion.png": b"my figure", "samples.png": b"my photos", "per_class.csv": b"my table",
            "summary.json": b'{"mine": true}', "notes.txt": b"not a report name"}
    for name, data_bytes in mine.items():
        (out / name).write_bytes(data_bytes)
    options = {"out_dir": str(out)} if where == "--out-dir" else {}
    real_evaluate = evaluate.evaluate
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("scored before the refusal"))
    with pytest.raises(FileExistsError, match=f"the report folder {out} holds summary.json, per_class.csv, "
                                              "confusion.png, samples.png, which no earlier evaluation recorded "
                                              r"writing there \(it has no .evaluation.json.*--overwrite"):
        run_evaluate(checkpoint, data, **options)
    assert {name: (out / name).read_bytes() for name in mine} == mine
    monkeypatch.setattr(evaluate, "evaluate", real_evaluate)
    summary = run_evaluate(checkpoint, data, overwrite=True, **options)
    assert "report_error" not in summary
    # --overwrite: this (binary) evaluation's reports replace the user's, and the parts reports it does not
    # write are removed; a file of another name is never touched.
    assert sorted(p.name for p in out.iterdir()) == [evaluate.MANIFEST, "notes.txt", "per_image.csv", "samples.png",
                                                     "summary.json", "threshold_sweep.png", "worst.png"]
    assert (out / "notes.txt").read_bytes() == b"not a report name"
    assert json.loads((out / evaluate.MANIFEST).read_text())["files"] == ["summary.json", "per_image.csv",
                                                                         "threshold_sweep.png", "worst.png",
                                                                         "samples.png"]


def test_evaluate_replaces_its_own_reports_but_not_one_the_user_added_beside_them(tmp_path):
    checkpoint, data = tiny_checkpoint(tmp_path / "models" / "tiny.pt"), write_kaggle_dataset(tmp_path / "kaggle")
    out = tmp_path / "reports"
    run_evaluate(checkpoint, data, out_dir=str(out), worst_k=0)
    first = (out / "summary.json").read_bytes()
    run_evaluate(checkpoint, data, out_dir=str(out), num_samples=0)  # its own files: no --overwrite needed
    assert (out / "worst.png").is_file() and not (out / "samples.png").exists()  # the earlier samples.png: removed
    assert json.loads((out / "summary.json").read_bytes())["split"] == json.loads(first)["split"]
    (out / "per_class.csv").write_text("my own table")  # a report's name, not written by an evaluation
    with pytest.raises(SystemExit, match=r"holds per_class.csv, which no earlier evaluation recorded writing there "
                                         r"\(its .evaluation.json does not list them\)"):
        evaluate.main(["--checkpoint", str(checkpoint), "--data-dir", str(data), "--split", "all", "--device", "cpu",
                       "--cache-dir", "", "--out-dir", str(out)])
    assert (out / "per_class.csv").read_text() == "my own table"
    (out / "samples.png").mkdir()  # a folder at a report's name is never replaced, --overwrite or not
    with pytest.raises(FileExistsError, match="holds folders named as reports \\(samples.png\\)"):
        run_evaluate(checkpoint, data, out_dir=str(out), overwrite=True)


# ---------------------------------------------------------------- bench.py

TINY_BENCH = ["--base-channels", "2", "--size", "32x32", "--train-size", "32x32", "--batch-size", "2", "--repeats", "1",
              "--peak-size", "64", "--precisions", "fp32", "--layouts", "contiguous"]


def test_bench_by_default_writes_a_file_of_its_own_and_refuses_an_existing_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench.json").write_text('{"quoted": "numbers"}\n')  # the repository's tracked results
    real_peak = bench.matmul_peak
    monkeypatch.setattr(bench, "matmul_peak", lambda *a: pytest.fail("measured before the refusal"))
    with pytest.raises(SystemExit, match="bench.json exists already: pass --overwrite"):
        bench.main(TINY_BENCH + ["--out", "bench.json"])
    monkeypatch.setattr(bench, "matmul_peak", real_peak)
    bench.main(TINY_BENCH)
    (written,) = [p for p in tmp_path.iterdir() if p.name != "bench.json"]
    assert written.name.startswith("bench-") and written.suffix == ".json"
    assert (tmp_path / "bench.json").read_text() == '{"quoted": "numbers"}\n'
    bench.main(TINY_BENCH + ["--out", "bench.json", "--overwrite"])
    assert '"rows"' in (tmp_path / "bench.json").read_text()


# ---------------------------------------------------------------- predict.py --submission

def test_an_all_failing_run_leaves_an_existing_submission_as_it_was(tmp_path, caplog):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.jpg").write_text("not a photo")
    sub = tmp_path / "sub.csv"
    sub.write_text("img,rle_mask\nearlier.jpg,1 5\n")
    cfg = PredictConfig(inputs=[str(tmp_path / "in")], out_dir=str(tmp_path / "out"), checkpoint=str(checkpoint),
                        device="cpu", backend="torch", precision="fp32", submission=str(sub))
    with pytest.raises(FileExistsError, match="sub.csv exists already: pass --overwrite .*--skip-existing"):
        predict.predict_files(cfg)
    for told in (dict(overwrite=True), dict(skip_existing=True)):  # told to replace it: still not with nothing
        written, failures = predict.predict_files(dataclasses.replace(cfg, **told))
        assert written == [] and list(failures) == [str(tmp_path / "in" / "broken.jpg")]
        assert sub.read_text() == "img,rle_mask\nearlier.jpg,1 5\n"
        assert "no photo gave a row for" in caplog.text and "the existing file is kept as it was" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "sub.csv", "tiny.pt"]  # no temporary left
    sub.unlink()
    predict.predict_files(cfg)
    assert not sub.exists()  # no header-only file either


@pytest.mark.parametrize("name", ["sub.csv", "sub.csv.gz"])
def test_shards_without_a_row_merge_to_no_file_and_leave_the_earlier_one(tmp_path, name):
    sub = tmp_path / name
    sub.write_bytes(b"an earlier submission")
    for rank in range(3):
        with submission.submission_rows(str(sub), World(rank, 3)):
            pass  # every photo of every rank failed
    submission.merge_submission(sub, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name] and sub.read_bytes() == b"an earlier submission"


# ---------------------------------------------------------------- dataset.py write-csv, scripts/make_gpu_subset.py

def test_write_csv_refuses_an_existing_out_then_replaces_it_with_overwrite(kaggle_dir, tmp_path):
    out = tmp_path / "train_masks.csv"
    out.write_text("img,rle_mask\nkaggles_own.jpg,1 1\n")
    with pytest.raises(SystemExit, match="train_masks.csv exists already: pass --overwrite"):
        dataset.main(["write-csv", str(kaggle_dir), str(out)])
    assert out.read_text() == "img,rle_mask\nkaggles_own.jpg,1 1\n"
    dataset.main(["write-csv", str(kaggle_dir), str(out), "--overwrite"])
    assert out.read_text().count("\n") == 1 + 12  # the header and write_kaggle_dataset's 12 masks


def load_script(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, REPO_ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_gpu_subset_replaces_only_a_subset_it_made(kaggle_dir, tmp_path):
    subset = load_script("scripts/make_gpu_subset.py")
    cars, views = ["aaaaaaaaaa01"], ["01"]
    # --out naming the source's own folder: replaced whole, it would have deleted the data set
    with pytest.raises(SystemExit, match="exists and is not one this script made .*no SUBSET.json"):
        subset.write_subset(kaggle_dir, kaggle_dir, cars, views, 0)
    assert len(list((kaggle_dir / "train").iterdir())) == 12
    out = tmp_path / "gpu_data" / "carvana"
    subset.write_subset(kaggle_dir, out, cars, views, 0)
    subset.write_subset(kaggle_dir, out, cars, ["02"], 0)  # its own: replaced
    assert [p.name for p in (out / "train").iterdir()] == ["aaaaaaaaaa01_02.jpg"]
    wheels = tmp_path / "gpu_data" / "wheels"
    wheels.mkdir()
    (wheels / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="wheels exists and is not one this script made .*more than wheels"):
        subset.download_wheels(wheels, "3.12")
    assert (wheels / "notes.txt").read_text() == "mine"
