"""Config loading, overrides and validation; every shipped preset validates."""

import pytest

from sentiment_ray.config import (
    PRESETS_DIR,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    load_config,
    preset_names,
)


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, ExperimentConfig)
    # Each preset names a model and its training data (files or a HF dataset), or says in one
    # line that the data is the user's to name; none points outside the repository.
    text = (PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    assert cfg.model.name and (cfg.data.train_path or cfg.data.train_dataset or "required: data.train_path=" in text)
    assert "../" not in text
    # Its tune search space names real config fields.
    for field in cfg.tune.search_space:
        section, key = field.split(".")
        assert key in type(getattr(cfg, section)).model_fields, field


def test_presets_include_the_three_required():
    assert {"demo", "llama31_8b_multilingual", "mistral7b_imdb"} <= set(preset_names())


def test_reference_preset_matches_the_seed_recipe():
    cfg = load_config("llama31_8b_multilingual")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.bias) == (16, 16, 0.0, "none")
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    t = cfg.train
    assert (t.optim, t.per_device_train_batch_size, t.gradient_accumulation_steps) == ("adamw_8bit", 2, 4)
    assert (t.learning_rate, t.lr_scheduler_type, t.max_steps, t.packing) == (3e-4, "linear", 70, True)
    assert (cfg.model.max_seq_length, cfg.model.dtype, cfg.model.load_in_4bit) == (2048, "auto", True)


def test_dotted_overrides_parse_yaml_scalars():
    cfg = load_config("demo", ["train.learning_rate=1e-4", "train.packing=true", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.learning_rate == 1e-4
    assert cfg.train.packing is True
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_fails_naming_the_override_and_the_closest_field():
    with pytest.raises(ConfigError) as raised:
        load_config("demo", ["train.learnin_rate=1e-4"])
    assert str(raised.value) == "override train.learnin_rate=1e-4: train.learnin_rate is not a config field; did you mean train.learning_rate?"


def test_an_unknown_key_in_the_file_names_the_file(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("train:\n  learnin_rate: 0.001\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml.*\n  train\.learnin_rate: unknown field"):
        load_config(str(preset))


def test_bad_value_fails_naming_the_field():
    with pytest.raises(ConfigError, match=r"lora\.r"):
        load_config("demo", ["lora.r=-3"])
    with pytest.raises(ConfigError, match=r"model\.backend"):
        load_config("demo", ["model.backend=tensorflow"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.max_steps"])
    with pytest.raises(ConfigError, match="not found: nope/none.yaml"):
        load_config("nope/none.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'nosuch'"):
        load_config("nosuch")


def test_labels_must_be_distinct_case_insensitively():
    with pytest.raises(ConfigError, match="prompt.labels"):
        load_config("demo", ["prompt.labels=[Positive, positive]"])


def test_label_map_must_target_the_label_set():
    with pytest.raises(ConfigError, match="label_map"):
        load_config("demo", ["data.label_map={'0': Bad}"])


def test_config_round_trips_as_a_plain_dict():
    cfg = load_config("demo", ["train.max_steps=3"])
    again = ExperimentConfig(**cfg.model_dump())
    assert again == cfg


def test_demo_preset_resolves_the_committed_demo_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # resolution must not depend on the working directory
    cfg = load_config("demo")
    assert cfg.data.train_path.endswith("data/demo/sentiment_demo.csv")
    from pathlib import Path

    assert Path(cfg.data.train_path).is_file()


def test_yaml_file_with_wrong_top_level(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(p))
