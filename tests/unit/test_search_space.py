"""The tune search space: schema validation, Tune domains, ratio_of resolution (pure, fast)."""

from __future__ import annotations

import pytest

from sentiment_ray.config import ConfigError, ExperimentConfig, validate
from sentiment_ray.tune import search_space as ss

REFERENCE_SPACE = {
    "train.learning_rate": {"type": "loguniform", "lower": 1.5e-4, "upper": 6.0e-4},
    "train.warmup_steps": {"type": "randint", "lower": 0, "upper": 11},
    "train.weight_decay": {"type": "uniform", "lower": 0.0, "upper": 0.05},
    "lora.r": {"type": "choice", "values": [8, 16, 32]},
    "lora.alpha": {"type": "ratio_of", "field": "lora.r", "values": [1, 2]},
    "train.max_steps": {"type": "choice", "values": [50, 70, 90]},
}


def cfg_with(space: dict) -> ExperimentConfig:
    return validate({"tune": {"search_space": space}})


def test_reference_space_is_valid_and_copied():
    cfg = cfg_with(REFERENCE_SPACE)
    space = ss.validate_search_space(cfg)
    assert space == REFERENCE_SPACE
    space["lora.r"]["values"].append(64)
    assert cfg.tune.search_space["lora.r"]["values"] == [8, 16, 32]


@pytest.mark.parametrize(
    "field, ok",
    [
        ("train.learning_rate", True),
        ("lora.target_modules", True),
        ("model.max_seq_length", True),
        ("train", False),  # a section, not a field
        ("train.nope", False),
        ("nope.r", False),
        ("train.learning_rate.x", False),
    ],
)
def test_field_exists(field, ok):
    assert ss.field_exists(field) is ok


@pytest.mark.parametrize(
    "space, message",
    [
        ({"train.lr": {"type": "choice", "values": [1]}}, "no such config field"),
        ({"run.num_workers": {"type": "choice", "values": [1, 2]}}, "only fields under"),
        ({"tune.num_samples": {"type": "choice", "values": [1, 2]}}, "only fields under"),
        ({"train.eval_steps": {"type": "choice", "values": [5, 10]}}, "cannot be searched"),
        ({"train.save_steps": {"type": "choice", "values": [5, 10]}}, "cannot be searched"),
        ({"lora.r": {"type": "normal", "values": [1]}}, "type must be one of"),
        ({"lora.r": {"type": "choice"}}, "needs values"),
        ({"lora.r": {"type": "choice", "values": []}}, "non-empty list"),
        ({"lora.r": {"type": "choice", "values": [8], "lower": 1}}, "unknown key"),
        ({"train.learning_rate": {"type": "loguniform", "lower": 0, "upper": 1e-3}}, "lower > 0"),
        ({"train.learning_rate": {"type": "uniform", "lower": 1e-3, "upper": 1e-4}}, "lower must be < upper"),
        ({"train.warmup_steps": {"type": "randint", "lower": 0.5, "upper": 4}}, "must be integers"),
        # Values the config rejects are caught here, not in a trial.
        ({"lora.r": {"type": "uniform", "lower": 4, "upper": 32}}, "lora.r"),  # float on an int field
        ({"lora.dropout": {"type": "uniform", "lower": 0.0, "upper": 1.5}}, "lora.dropout"),
        ({"train.lr_scheduler_type": {"type": "choice", "values": ["linear", "wavy"]}}, "wavy"),
        ({"train.max_steps": {"type": "randint", "lower": 0, "upper": 10}}, "train.max_steps"),
        ({"lora.alpha": {"type": "ratio_of", "field": "lora.q", "values": [1, 2]}}, "not a config field"),
        ({"lora.alpha": {"type": "ratio_of", "field": "lora.alpha", "values": [1]}}, "not itself a ratio"),
        ({"lora.alpha": {"type": "ratio_of", "field": "lora.r", "values": [0, 2]}}, "positive numbers"),
        # alpha = 0.5 * r is not an int for r = 5
        (
            {
                "lora.r": {"type": "choice", "values": [4, 5]},
                "lora.alpha": {"type": "ratio_of", "field": "lora.r", "values": [0.5]},
            },
            "lora.alpha",
        ),
    ],
)
def test_invalid_spaces_name_the_field(space, message):
    with pytest.raises(ConfigError, match=message):
        ss.validate_search_space(cfg_with(space))


def test_ratio_of_resolves_against_sampled_or_base_value():
    base = ExperimentConfig(lora={"r": 16, "alpha": 16}).model_dump(mode="json")
    space = {"lora.r": REFERENCE_SPACE["lora.r"], "lora.alpha": REFERENCE_SPACE["lora.alpha"]}
    assert ss.resolve_trial_values(space, {"lora.r": 8, "lora.alpha:ratio": 2}, base) == {"lora.r": 8, "lora.alpha": 16}
    assert ss.resolve_trial_values(space, {"lora.r": 32, "lora.alpha:ratio": 1}, base) == {"lora.r": 32, "lora.alpha": 32}
    # Source field not searched: the base config's value.
    only_alpha = {"lora.alpha": REFERENCE_SPACE["lora.alpha"]}
    assert ss.resolve_trial_values(only_alpha, {"lora.alpha:ratio": 2}, base) == {"lora.alpha": 32}
    values = ss.resolve_trial_values(space, {"lora.r": 8, "lora.alpha:ratio": 2, "unrelated": 1}, base)
    assert isinstance(values["lora.alpha"], int)
    assert "unrelated" not in values


def test_trial_experiment_config_applies_values_and_validates():
    base_cfg = ExperimentConfig()
    base = base_cfg.model_dump(mode="json")
    cfg = ss.trial_experiment_config(
        base, REFERENCE_SPACE, {"train.learning_rate": 2e-4, "lora.r": 32, "lora.alpha:ratio": 2, "train.max_steps": 50}
    )
    assert (cfg.train.learning_rate, cfg.lora.r, cfg.lora.alpha, cfg.train.max_steps) == (2e-4, 32, 64, 50)
    # Untouched fields keep the base values; the base dict is not modified.
    assert cfg.train.warmup_steps == base_cfg.train.warmup_steps
    assert base["lora"]["r"] == base_cfg.lora.r
    with pytest.raises(ConfigError):
        ss.trial_experiment_config(base, {"lora.r": REFERENCE_SPACE["lora.r"]}, {"lora.r": -1})


def test_param_space_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    params = ss.to_param_space(REFERENCE_SPACE)
    assert set(params) == {
        "train.learning_rate",
        "train.warmup_steps",
        "train.weight_decay",
        "lora.r",
        "lora.alpha:ratio",
        "train.max_steps",
    }
    assert isinstance(params["train.learning_rate"], Float)
    assert isinstance(params["train.warmup_steps"], Integer)
    assert isinstance(params["lora.r"], Categorical)
    assert params["lora.r"].categories == [8, 16, 32]
    assert params["lora.alpha:ratio"].categories == [1, 2]
    samples = [params["train.learning_rate"].sample() for _ in range(200)]
    assert all(1.5e-4 <= s <= 6e-4 for s in samples)
    ints = {params["train.warmup_steps"].sample() for _ in range(300)}
    assert ints <= set(range(0, 11))
    assert 10 in ints  # upper bound exclusive, as in Tune


def test_max_value():
    base = ExperimentConfig(train={"max_steps": 70}).model_dump(mode="json")
    assert ss.max_value(REFERENCE_SPACE, "train.max_steps", base) == 90
    assert ss.max_value({}, "train.max_steps", base) == 70
    assert ss.max_value({"train.max_steps": {"type": "randint", "lower": 10, "upper": 21}}, "train.max_steps", base) == 20
    assert ss.max_value(REFERENCE_SPACE, "lora.alpha", base) == 64
