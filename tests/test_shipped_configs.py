"""Config presets by name: `--config demo/tiny` in any working directory, as a path would."""
import os

import pytest

from albef_bal.config import (ConfigError, load_config, resolve_config_path, shipped_config_names,
                              shipped_configs_dir)
from albef_bal.engine.ds_config import build_ds_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_names_paths_and_prefixes_resolve_to_the_shipped_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    shipped = os.path.join(shipped_configs_dir(), "demo", "tiny.yaml")
    assert os.path.samefile(shipped, os.path.join(REPO, "configs", "demo", "tiny.yaml"))  # one copy
    for spec in ("demo/tiny", "demo/tiny.yaml", "configs/demo/tiny.yaml"):
        assert resolve_config_path(spec) == shipped
    assert {"demo/tiny", "study/tiny", "pretrain/albef_4m", "deepspeed/zero2.json"} <= set(shipped_config_names())
    # `_base_` inside a shipped preset resolves beside it
    study = load_config("study/tiny")
    assert study.model.image_res == load_config("demo/tiny").model.image_res and study.train.max_steps == 600
    # a file of the same name in the working directory wins over the preset
    (tmp_path / "configs" / "demo").mkdir(parents=True)
    (tmp_path / "configs" / "demo" / "tiny.yaml").write_text("model: {image_res: 48}\n")
    assert load_config("configs/demo/tiny.yaml").model.image_res == 48
    assert load_config("demo/tiny").model.image_res == 64


def test_unknown_names_are_refused_with_the_closest_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="config file not found: demo/tyni .*did you mean demo/tiny"):
        load_config("demo/tyni")
    with pytest.raises(ConfigError, match="config file not found: ../demo/tiny"):
        load_config("../demo/tiny")  # names never leave the presets folder


def test_deepspeed_json_of_a_preset_is_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo/tiny", ["model.queue_size=32", "train.micro_batch_size=16"])
    assert cfg.train.deepspeed_config == "configs/deepspeed/zero0.json"
    assert build_ds_config(cfg, 2)["zero_optimization"]["stage"] == 0
    cfg.train.deepspeed_config = "configs/deepspeed/zero9.json"
    with pytest.raises(ConfigError, match="train.deepspeed_config: file not found: configs/deepspeed/zero9.json"):
        build_ds_config(cfg, 2)


def test_the_numerics_preset_restores_bernoulli_masks_and_zero2_on_the_study_preset():
    from albef_bal.study import method_config
    fast = load_config("study/tiny")
    assert fast.model.text.fast_dropout is True
    assert build_ds_config(fast, 2)["zero_optimization"]["stage"] == 0
    old = load_config([resolve_config_path("study/tiny"), method_config("numerics/before_fast_cpu")])
    assert old.model.text.fast_dropout is False
    assert build_ds_config(old, 2)["zero_optimization"]["stage"] == 2
    assert old.train.max_steps == fast.train.max_steps == 600
