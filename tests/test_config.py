import textwrap

import pytest

from albef_bal.config import Config, ConfigError, load_config, parse_override, save_config, to_dict


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_defaults_are_the_paper_settings():
    cfg = load_config()
    m = cfg.model
    assert (m.image_res, m.vision.width, m.vision.depth, m.text.layers, m.text.fusion_layer) == (256, 768, 12, 12, 6)
    assert (m.embed_dim, m.queue_size, m.momentum, m.temp, m.alpha) == (256, 65536, 0.995, 0.07, 0.4)
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_steps, cfg.train.weight_decay) == (1e-4, 1e-5, 2000, 0.02)


def test_yaml_base_inheritance_and_overrides(tmp_path):
    base = write(tmp_path, "base.yaml", """
        model:
          text: {heads: 6, width: 384}
          queue_size: 1024
        train: {lr: 1e-4}
    """)
    child = write(tmp_path, "child.yaml", """
        _base_: base.yaml
        model:
          queue_size: 2048
    """)
    cfg = load_config(child, ["model.text.heads=4", "train.lr=2e-4", "data.train_shards=[a.tar, b.tar]"])
    assert cfg.model.text.width == 384  # inherited
    assert cfg.model.queue_size == 2048  # child wins over base
    assert cfg.model.text.heads == 4  # --set wins over files
    assert cfg.train.lr == pytest.approx(2e-4)  # YAML 1.1 reads 2e-4 as a string; coerced to float
    assert cfg.data.train_shards == ["a.tar", "b.tar"]


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    bad = write(tmp_path, "bad.yaml", "model:\n  text:\n    hedas: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.text\.hedas'.*bad\.yaml.*'model\.text\.heads'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(None, ["modle.temp=0.1"])


@pytest.mark.parametrize("override, pattern", [
    ("model.text.heads=four", r"model\.text\.heads: expected int, got 'four'"),
    ("model.text.heads=4.5", r"model\.text\.heads: expected int"),
    ("model.distill=maybe", r"model\.distill: expected bool"),
    ("train.precision=fp8", r"train\.precision: expected one of \['fp32', 'bf16', 'fp16'\]"),
    ("model.vision=3", r"model\.vision must be a mapping"),
])
def test_wrong_types_are_named(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, pattern", [
    (["model.text.fusion_layer=13"], r"model\.text\.fusion_layer must be in \[0, model\.text\.layers=12\]"),
    (["model.text.fusion_layer=12"], r"at least one fusion"),
    (["model.text.heads=5"], r"model\.text\.width \(768\) must be divisible by model\.text\.heads \(5\)"),
    (["model.image_res=250"], r"model\.image_res \(250\) must be a multiple of model\.vision\.patch_size \(16\)"),
    (["model.momentum=1.0"], r"model\.momentum must be in \[0, 1\)"),
    (["model.temp=0.9"], r"model\.temp must be in the clamp range"),
    (["data.max_len=600"], r"data\.max_len \(600\) exceeds model\.text\.max_position"),
])
def test_impossible_combinations_are_refused(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_override_parsing():
    assert parse_override("a.b=4") == (["a", "b"], 4)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=x=y") == (["a"], "x=y")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("no_equals_sign")
    with pytest.raises(ConfigError, match="bad key"):
        parse_override("a..b=1")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = write(tmp_path, "broken.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_config(bad)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["model.text.heads=4", "model.text.width=256", "balance.method=ogm_ge"])
    path = str(tmp_path / "out" / "config.yaml")
    save_config(cfg, path)
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert isinstance(again, Config)


def test_special_token_ids_are_checked_when_the_model_is_built():
    from albef_bal.models import ALBEF
    cfg = load_config(None, ["model.text.vocab_size=100"])  # ids come from the tokenizer later
    with pytest.raises(ConfigError, match=r"model\.text\.cls_token_id=101 is outside the vocabulary.*data\.tokenizer"):
        ALBEF(cfg.model)
