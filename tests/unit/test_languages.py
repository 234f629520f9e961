"""Languages (languages.py): detection of short texts with the model in py3langid's wheel, the
shares of rows per language, and the one warning line for rows outside the calibration languages."""

from __future__ import annotations

from sentiment_ray import languages


def test_short_texts_in_the_training_languages_are_identified_offline():
    texts = [
        "I love this phone, works great",
        "对这个系统不感冒，装费劲",
        "El servicio fue terrible y lento",
        "Pelayanan hotel ini sangat buruk sekali",
        "Ce produit est vraiment excellent",
        "",
        None,
    ]
    assert languages.detect(texts) == ["en", "zh", "es", "id", "fr", None, None]


def test_shares_and_the_warning_line_name_the_rows_outside_the_calibration_languages():
    shares = languages.shares(["en", "en", "en", "fr", None, "en", "zh", "fr"])
    assert shares == {"en": 0.5, "fr": 0.25, "unknown": 0.125, "zh": 0.125}
    assert languages.count_shares({"en": 3, "fr": 1}) == {"en": 0.75, "fr": 0.25}
    line = languages.uncalibrated_line(shares, ["en", "zh"])
    assert line == (
        "37.5% of rows are in languages the adapter was not calibrated on (fr 25.0%, unknown 12.5%; "
        "calibrated: en, zh): their confidence is not calibrated"
    )
    assert languages.uncalibrated_line({"en": 1.0}, ["en", "zh"]) is None


def test_the_profile_says_what_the_adapter_was_trained_and_calibrated_on():
    profile = languages.data_profile(
        ["en", "EN", "zh"], ["Positive", "Negative", "Positive"], ["en", "zh"], ["Positive", "Negative"], detected=False
    )
    assert profile["train"] == {
        "rows": 3,
        "languages": {"en": 0.6667, "zh": 0.3333},
        "labels": {"Positive": 0.6667, "Negative": 0.3333},
    }
    assert languages.calibrated_languages(profile) == ["en", "zh"]
    assert languages.calibrated_languages(None) == []
