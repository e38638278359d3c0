"""Protects option parsing (defaults < base < --config file < flags, strict file values) and device/precision choice."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from carseg import runtime
from config import (EvaluateConfig, PredictConfig, ServeConfig, TrainConfig, counted, load_config_file,
                    option_shown, parse_config, resolve_data_dir)


def write_json(path: Path, values) -> str:
    path.write_text(json.dumps(values))
    return str(path)


def test_defaults():
    cfg = parse_config(TrainConfig, [])
    assert cfg == TrainConfig()
    # the CPU recipe: width-16, depth-5 bilinear U-Net on 256x256 crops of 480x320 samples
    assert (cfg.image_width, cfg.image_height, cfg.depth, cfg.base_channels, cfg.bilinear) == (480, 320, 5, 16, True)
    assert (cfg.arch, cfg.crop_width, cfg.crop_height, cfg.precise_bn) == ("unet", 256, 256, 64)
    assert cfg.val_fraction == 0.125 and cfg.threshold == 0.5 and cfg.channels_last is True
    assert cfg.resume == "" and cfg.data_dir == ""


def test_flag_beats_file_beats_default(tmp_path):
    path = write_json(tmp_path / "opts.json", {"epochs": 5, "lr": 0.01, "augment": "light"})
    cfg = parse_config(TrainConfig, ["--config", path, "--epochs", "7"])
    assert cfg.epochs == 7                  # flag over file
    assert cfg.lr == 0.01                   # file over default
    assert cfg.augment == "light"
    assert cfg.batch_size == TrainConfig().batch_size  # untouched default
    # order on the command line does not matter
    assert parse_config(TrainConfig, ["--epochs", "7", "--config", path]).epochs == 7


def test_base_sits_between_defaults_and_the_file(tmp_path):
    path = write_json(tmp_path / "opts.json", {"lr": 0.1})
    base = {"epochs": 3, "lr": 0.5, "batch_size": 2, "not_an_option": 1}
    cfg = parse_config(TrainConfig, ["--config", path, "--batch-size", "5"], base=base)
    assert cfg.epochs == 3        # base over default
    assert cfg.lr == 0.1          # file over base
    assert cfg.batch_size == 5    # flag over base


def test_unknown_file_key_is_an_argparse_error_naming_it(tmp_path, capsys):
    path = write_json(tmp_path / "opts.json", {"epochs": 2, "lerning_rate": 0.1})
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, ["--config", path])
    assert exit_info.value.code == 2
    assert "lerning_rate" in capsys.readouterr().err


@pytest.mark.parametrize("key, value", [("epochs", "3"), ("epochs", 2.5), ("epochs", True), ("bilinear", 1),
                                        ("lr", "0.1"), ("augment", "extreme"), ("data_dir", 5)])
def test_wrong_typed_file_value_is_rejected_naming_the_key(tmp_path, capsys, key, value):
    path = write_json(tmp_path / "opts.json", {key: value})
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, ["--config", path])
    assert exit_info.value.code == 2
    assert f"'{key}'" in capsys.readouterr().err


def test_int_file_value_is_accepted_for_a_float_option(tmp_path):
    cfg = parse_config(TrainConfig, ["--config", write_json(tmp_path / "opts.json", {"lr": 1, "warmup_epochs": 0})])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.warmup_epochs == 0.0 and isinstance(cfg.warmup_epochs, float)


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", ""])
def test_malformed_config_file_is_an_argparse_error(tmp_path, capsys, content):
    path = tmp_path / "opts.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, ["--config", str(path)])
    assert exit_info.value.code == 2
    assert "opts.json" in capsys.readouterr().err


def test_missing_config_file_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, ["--config", str(tmp_path / "absent.json")])
    assert exit_info.value.code == 2
    assert "absent.json" in capsys.readouterr().err


def test_bool_flags_have_no_forms():
    cfg = parse_config(TrainConfig, ["--no-channels-last", "--bilinear", "--no-full-res-val", "--compile"])
    assert (cfg.channels_last, cfg.bilinear, cfg.full_res_val, cfg.compile) == (False, True, False, True)
    assert parse_config(TrainConfig, ["--channels-last"]).channels_last is True


def test_bool_flag_beats_file(tmp_path):
    path = write_json(tmp_path / "opts.json", {"channels_last": False})
    assert parse_config(TrainConfig, ["--config", path]).channels_last is False
    assert parse_config(TrainConfig, ["--config", path, "--channels-last"]).channels_last is True


@pytest.mark.parametrize("argv, field", [
    (["--val-fraction", "1.5"], "val_fraction"),
    (["--val-fraction", "0"], "val_fraction"),
    (["--image-width", "100"], "image_width"),           # not a multiple of 2**5
    (["--depth", "7", "--image-width", "128", "--image-height", "128"], "depth"),
    (["--epochs", "0"], "epochs"),
    (["--threshold", "1"], "threshold"),
    (["--bce-weight", "0", "--dice-weight", "0"], "bce_weight"),
    (["--run-name", "a/b"], "run_name"),
    (["--group-by", "(unclosed"], "group_by"),
    # BatchNorm cannot train on one value per channel: 32x32 at depth 5 is a 1x1 bottleneck
    (["--image-width", "32", "--image-height", "32", "--crop-width", "0", "--crop-height", "0", "--batch-size", "1"],
     "batch_size"),
    (["--crop-width", "32", "--crop-height", "32", "--precise-bn", "1"], "precise_bn"),
    (["--crop-width", "200", "--crop-height", "160"], "crop_width"),   # not a multiple of 2**5
    (["--crop-width", "512", "--crop-height", "160"], "crop_width"),   # wider than --width 480
    (["--crop-width", "0"], "crop_width"),                             # the height is still 256
    (["--boundary-weight", "-1"], "boundary_weight"),
])
def test_range_checks_name_the_option(capsys, argv, field):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --{field.replace('_', '-')} " in err and "Config." not in err


def test_range_check_in_the_dataclass_itself():
    with pytest.raises(ValueError, match="--val-fraction 1.5: must be greater than 0 and less than 1"):
        TrainConfig(val_fraction=1.5)
    with pytest.raises(ValueError, match=r"--image-height 33: must be a positive multiple of 2\*\*1 = 2 \(--depth 1\)"):
        TrainConfig(image_height=33, depth=1)


@pytest.mark.parametrize("cls, argv, message", [
    # an open range says so: 0 and 1 are out ("between 0 and 1" read as if they were in)
    (PredictConfig, ["a.jpg", "--threshold", "0"], "--threshold 0.0: must be greater than 0 and less than 1"),
    (EvaluateConfig, ["--threshold", "1"], "--threshold 1.0: must be greater than 0 and less than 1"),
    (TrainConfig, ["--run-name", "runs/a b"], "--run-name 'runs/a b': must be a plain folder name"),
    (TrainConfig, ["--depth", "7"], "--depth 7: must be from 1 to 6"),
    (TrainConfig, ["--crop-width", "0"], "--crop-width 0: must be set or 0 together with --crop-height, which is 256"),
    (TrainConfig, ["--pretrained-backbone"], "--pretrained-backbone: applies to deeplabv3_mobilenet_v3_large"),
    (ServeConfig, ["--port", "70000"], "--port 70000: must be from 0 to 65535"),
    (PredictConfig, [], "inputs: give at least one image file, folder or glob"),
])
def test_a_refused_value_is_named_as_the_option_is_typed(capsys, cls, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(cls, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Config." not in err


def test_option_shown_and_counted():
    assert option_shown("image_width", 480) == "--image-width 480"
    assert option_shown("run_name", "a b") == "--run-name 'a b'"
    assert (option_shown("bilinear", True), option_shown("bilinear", False)) == ("--bilinear", "--no-bilinear")
    assert [counted(n, "car") for n in (0, 1, 2)] == ["0 cars", "1 car", "2 cars"]
    assert counted(1, "process", "processes") == "1 process" and counted(4, "process", "processes") == "4 processes"


def test_bad_choice_flag_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, ["--augment", "extreme"])
    assert exit_info.value.code == 2
    assert "extreme" in capsys.readouterr().err


@pytest.mark.parametrize("cfg", [TrainConfig(), EvaluateConfig(), PredictConfig(inputs=["a.jpg", "dir/"])])
def test_asdict_is_json_and_round_trips(cfg):
    values = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert type(cfg)(**values) == cfg


def test_a_config_json_replays_the_run(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.02, bilinear=True, run_name="x")
    path = write_json(tmp_path / "config.json", dataclasses.asdict(cfg))
    assert parse_config(TrainConfig, ["--config", path]) == cfg


def test_predict_inputs_are_positional(tmp_path):
    cfg = parse_config(PredictConfig, ["a.jpg", "photos/", "b/*.png", "--out-dir", "o"])
    assert cfg.inputs == ["a.jpg", "photos/", "b/*.png"]
    assert cfg.out_dir == "o"
    path = write_json(tmp_path / "opts.json", {"inputs": ["c.jpg"]})
    assert parse_config(PredictConfig, ["--config", path]).inputs == ["c.jpg"]
    assert parse_config(PredictConfig, ["--config", path, "d.jpg"]).inputs == ["d.jpg"]


def test_predict_without_inputs_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(PredictConfig, [])
    assert exit_info.value.code == 2
    assert "inputs" in capsys.readouterr().err


def test_file_values_are_checked_for_each_script(tmp_path):
    path = write_json(tmp_path / "opts.json", {"split": "test"})
    with pytest.raises(ValueError, match="'split'"):
        load_config_file(EvaluateConfig, path)
    with pytest.raises(ValueError, match="unknown option 'split'"):
        load_config_file(TrainConfig, path)


def test_resolve_data_dir(monkeypatch):
    monkeypatch.setenv("CARVANA_DIR", "/env/carvana")
    assert resolve_data_dir("given") == Path("given")
    assert resolve_data_dir("") == Path("/env/carvana")
    monkeypatch.delenv("CARVANA_DIR")
    assert resolve_data_dir("") == Path("data/carvana")


# ---------------------------------------------------------------- runtime: devices and precision

@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="a GPU is present")
def test_auto_device_is_cpu_without_a_gpu():
    assert runtime.resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_clear_error(name):
    with pytest.raises(ValueError, match="CUDA is not available"):
        runtime.resolve_device(name)


@pytest.mark.parametrize("name", ["gpu0", "nonsense", "meta"])
def test_bad_device_name_is_an_error(name):
    with pytest.raises(ValueError, match=name):
        runtime.resolve_device(name)


def test_cpu_device():
    assert runtime.resolve_device("cpu") == torch.device("cpu")


def test_precision_on_the_cpu():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="fp16"):
        runtime.resolve_precision("fp16", cpu)
    assert runtime.resolve_precision("fp32", cpu) == "fp32"
    assert runtime.resolve_precision("bf16", cpu) == "bf16"
    assert runtime.resolve_precision("auto", cpu) == ("bf16" if runtime.cpu_has_bf16() else "fp32")


def test_autocast_fp32_is_a_no_op_and_bf16_casts():
    cpu = torch.device("cpu")
    a = torch.rand(4, 4)
    with runtime.autocast(cpu, "fp32"):
        assert (a @ a).dtype == torch.float32
    with runtime.autocast(cpu, "bf16"):
        assert (a @ a).dtype == torch.bfloat16


def test_resolve_checkpoint_prefers_explicit_then_bundled_then_newest_run(tmp_path, monkeypatch):
    import os
    import config
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "BUNDLED_CHECKPOINT", tmp_path / "bundled.pt")
    with pytest.raises(FileNotFoundError, match="python train.py"):
        config.resolve_checkpoint("")
    for i, run in enumerate(["old", "new"]):
        (tmp_path / "checkpoints" / run).mkdir(parents=True)
        (tmp_path / "checkpoints" / run / "best.pt").write_bytes(b"x")
        os.utime(tmp_path / "checkpoints" / run / "best.pt", (1000 + i, 1000 + i))
    assert config.resolve_checkpoint("") == str(Path("checkpoints/new/best.pt"))
    (tmp_path / "bundled.pt").write_bytes(b"x")
    assert config.resolve_checkpoint("") == str(tmp_path / "bundled.pt")
    assert config.resolve_checkpoint("mine.pt") == "mine.pt"


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json")),
                         ids=lambda p: p.name)
def test_the_shipped_presets_parse(path):
    assert isinstance(parse_config(TrainConfig, ["--config", str(path)]), TrainConfig)


@pytest.mark.parametrize("cls, argv", [(EvaluateConfig, []), (PredictConfig, ["a.jpg"])])
def test_the_threshold_is_the_checkpoints_unless_given(tmp_path, capsys, cls, argv):
    assert parse_config(cls, argv).threshold is None
    assert parse_config(cls, argv + ["--threshold", "0.3"]).threshold == 0.3
    assert parse_config(cls, argv + ["--config", write_json(tmp_path / "t.json", {"threshold": None})]).threshold is None
    with pytest.raises(SystemExit) as exit_info:
        parse_config(cls, argv + ["--threshold", "0"])  # 0 no longer means "the checkpoint's"
    assert exit_info.value.code == 2 and "threshold" in capsys.readouterr().err
