"""Every config field is documented, and each job's --help lists the fields it reads with
their type, default and doc (sentiment_ray/config_help.py)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from sentiment_ray import cli
from sentiment_ray.config import ExperimentConfig
from sentiment_ray.config_help import ALL_SECTIONS, JOB_SECTIONS, WIDTH, config_help


def leaf_fields(model: type[BaseModel], prefix: str = "", seen: set | None = None):
    """(dotted path, FieldInfo) of every field, a nested model's fields under the first field
    of its type (the help lists them once)."""
    seen = set() if seen is None else seen
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path, info
        for arg in (info.annotation, *getattr(info.annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg not in seen:
                seen.add(arg)
                yield from leaf_fields(arg, path + ".", seen)


def flat(text: str) -> str:
    return " ".join(text.split())


def test_every_field_has_a_docstring():
    undocumented = [path for path, info in leaf_fields(ExperimentConfig) if not (info.description or "").strip()]
    assert undocumented == []


@pytest.mark.parametrize("job", sorted(JOB_SECTIONS))
def test_job_help_lists_every_field_of_its_sections_with_its_doc(job):
    text = flat(cli.COMMANDS[job].parser(f"sentiment-ray {job}").format_help())
    for section in ALL_SECTIONS:
        fields = list(leaf_fields(ExperimentConfig.model_fields[section].annotation, section + "."))
        for path, info in fields:
            if section in JOB_SECTIONS[job]:
                assert f" {path}: " in text, path
                first_line = flat(info.description.strip().splitlines()[0])
                assert first_line in text, (path, first_line)
            else:
                assert f" {path}: " not in text, path


def test_train_help_from_the_script(monkeypatch, capsys):
    # `python jobs/train.py --help`, in process.
    with pytest.raises(SystemExit) as stop:
        cli.train_main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "  lora.r: int (> 0) = 16\n      Rank of the LoRA update matrices" in text
    assert "  train.micro_batch_size: int (> 0) | {auto} | None = null\n" in text
    assert "  run.use_gpu: {auto,true,false} = auto\n" in text
    assert '  data.quarantine_path: str = ""\n' in text
    assert "label.mode" not in text and "tune.metric" not in text


def test_help_lines_fit_the_width():
    text = config_help()
    too_long = [line for line in text.splitlines() if len(line) > WIDTH and " " in line.strip()]
    assert too_long == []


def test_nested_dataset_fields_are_listed_once():
    text = config_help(["data"])
    assert "  data.train_dataset.name: str = (required)\n" in text
    assert "data.validation_dataset.name" not in text
    assert "(its fields as data.train_dataset.*)" in text


def test_unknown_section_is_refused():
    with pytest.raises(ValueError, match="nope"):
        config_help(["nope"])
