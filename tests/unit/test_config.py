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
    assert cfg.model.name
    assert cfg.data.train_path or cfg.data.train_dataset or "required: data.train_path=" in text
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
    assert (
        str(raised.value)
        == "override train.learnin_rate=1e-4: train.learnin_rate is not a config field; did you mean train.learning_rate?"
    )


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


# ----------------------------------------------------------------------------- presets on a base


def test_tune_preset_builds_on_the_reference_and_loads_as_before():
    # The values llama31_8b_tune held when it was a full copy of the reference preset.
    cfg, ref = load_config("llama31_8b_tune"), load_config("llama31_8b_multilingual")
    assert "base: llama31_8b_multilingual" in (PRESETS_DIR / "llama31_8b_tune.yaml").read_text(encoding="utf-8")
    for section in ("model", "lora", "prompt", "data", "label", "tracking"):
        assert getattr(cfg, section) == getattr(ref, section), section
    t = cfg.train
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.micro_batch_size) == (2, 4, None)
    assert (t.learning_rate, t.lr_scheduler_type, t.warmup_steps, t.max_steps) == (3e-4, "linear", 5, 70)
    assert (t.packing, t.packing_strategy, t.seed, t.eval_batch_size) == (True, "wrapped", 3407, 64)
    assert (t.eval_steps, t.zero_shot_eval, t.save_steps) == (10, False, 0)
    r = cfg.run
    assert (r.name, r.storage_path, r.num_workers, r.use_gpu, r.max_failures) == ("llama31-8b-tune", "runs", 1, "true", 1)
    tu = cfg.tune
    assert (tu.experiment_name, tu.num_samples, tu.metric, tu.mode, tu.scheduler) == (
        "llama31-8b-tune",
        8,
        "val_macro_f1",
        "max",
        "asha",
    )
    assert (tu.grace_period, tu.reduction_factor, tu.max_concurrent_trials) == (2, 2, 0)
    assert tu.search_space == {
        "train.learning_rate": {"type": "loguniform", "lower": 1.5e-4, "upper": 6.0e-4},
        "lora.r": {"type": "choice", "values": [8, 16, 32]},
        "lora.alpha": {"type": "ratio_of", "field": "lora.r", "values": [1, 2]},
        "train.max_steps": {"type": "choice", "values": [50, 70, 90]},
        "train.warmup_steps": {"type": "choice", "values": [0, 5, 10]},
    }


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_base_chain_merges_sections_field_by_field(tmp_path):
    _write(tmp_path / "a.yaml", "base: demo\ntrain: {max_steps: 7}\ndata: {label_map: {'0': Negative}}\n")
    child = _write(tmp_path / "b.yaml", "base: a.yaml\ntrain: {learning_rate: 1.0e-4}\ndata: {label_map: {'1': Positive}}\n")
    cfg, demo = load_config(child), load_config("demo")
    assert (cfg.train.max_steps, cfg.train.learning_rate) == (7, 1e-4)
    assert cfg.train.per_device_train_batch_size == demo.train.per_device_train_batch_size
    assert cfg.data.label_map == {"1": "Positive"}  # a mapping value is replaced whole
    assert cfg.tune.search_space == demo.tune.search_space
    assert load_config(child, ["train.max_steps=9"]).train.max_steps == 9


def test_base_cycle_is_refused(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="makes a cycle: a -> b -> a"):
        load_config(str(tmp_path / "a.yaml"))


def test_unknown_base_is_one_line(tmp_path):
    path = _write(tmp_path / "a.yaml", "base: nope\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "\n" not in str(err.value)
    assert "base 'nope': unknown preset 'nope'" in str(err.value)
