"""The one comparison of a run's recorded definition with a rerun's."""

from sentiment_ray import rerun


def test_sections_and_flat_fields_compare_field_by_field():
    before = {"lora": {"r": 16, "alpha": 32}, "data.label_map": {"pos": "Positive"}}
    now = {"lora": {"r": 8, "alpha": 32, "dropout": 0.1}, "data.label_map": {"pos": "positive"}}
    assert rerun.changed_fields(before, now) == ["data.label_map", "lora.dropout", "lora.r"]
    assert rerun.changes(before, now) == [
        "data.label_map ({'pos': 'Positive'} -> {'pos': 'positive'})",
        "lora.dropout (None -> 0.1)",
        "lora.r (16 -> 8)",
    ]


def test_same_definition_has_no_changes_and_long_values_are_cut():
    assert rerun.changes({"prompt": {"template": "x" * 100}}, {"prompt": {"template": "x" * 100}}) == []
    (line,) = rerun.changes({"prompt.template": "x" * 100}, {"prompt.template": "y"}, name=lambda k: k.upper())
    assert line.startswith("PROMPT.TEMPLATE ('xxx")
    assert "... -> 'y')" in line
    assert len(rerun.show("x" * 100)) == rerun.SHOWN_CHARS
