"""The seed prompt, label sets, label-token ids and generated-text parsing."""

import pytest

from sentiment_ray.config import PromptConfig
from sentiment_ray.labels import LabelSet, LabelSetError
from sentiment_ray.prompts import PromptTemplate

SEED = "Classify the text into 'Positive', 'Negative', and return the answer as the predicted sentiment."


def test_default_prompt_is_the_seed_prompt():
    t = PromptTemplate.from_config(PromptConfig())
    assert t.prompt("Great phone") == f"{SEED}\n### Input:\nGreat phone\n### Response:\n"
    assert t.full_text("Great phone", "Positive", "</s>") == t.prompt("Great phone") + "Positive</s>"
    assert t.prompt_completion("x", "Negative", "<eos>") == {"prompt": t.prompt("x"), "completion": "Negative<eos>"}


def test_sentence_with_braces_is_inserted_verbatim():
    t = PromptTemplate.from_config(PromptConfig())
    assert "{label} {0} }{" in t.prompt("{label} {0} }{")


def test_normalise_is_case_and_space_insensitive():
    ls = LabelSet(["Positive", "Negative"])
    assert ls.normalise(" positive ") == "Positive"
    assert ls.normalise("NEGATIVE") == "Negative"
    assert ls.normalise("neutral") is None
    assert ls.normalise(1) is None


def test_label_set_rejects_duplicates_and_singletons():
    with pytest.raises(LabelSetError):
        LabelSet(["Positive", "positive"])
    with pytest.raises(LabelSetError):
        LabelSet(["Positive"])


def _char_encode(text):
    # A character-level "tokenizer": one id per character.
    return [ord(c) for c in text]


def test_first_token_ids_take_the_token_after_the_prompt():
    ls = LabelSet(["Positive", "Negative"])
    assert ls.first_token_ids(_char_encode, "prompt:\n") == [ord("P"), ord("N")]


def test_first_token_ids_fail_when_labels_share_a_first_token():
    ls = LabelSet(["Positive", "Pos-ish"])
    with pytest.raises(LabelSetError, match="share their first token"):
        ls.first_token_ids(_char_encode, "prompt:\n")


def test_first_token_ids_fail_when_prompt_merges_with_label():
    # A "tokenizer" that merges the last prompt char with the next one.
    def merging(text):
        return [hash(text[i : i + 2]) for i in range(0, len(text), 2)]

    ls = LabelSet(["Positive", "Negative"])
    with pytest.raises(LabelSetError, match="continuation of the prompt"):
        ls.first_token_ids(merging, "odd")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Positive", "Positive"),
        (" negative</s>", "Negative"),
        ("Positive.\nThe text is happy", "Positive"),
        ("Posit", "Positive"),  # cut by max_new_tokens
        ("Neutral", None),
        ("", None),
        ("Positively not", None),
        ("I think Positive", None),  # only the start of the answer counts
    ],
)
def test_parse_generated(text, expected):
    assert LabelSet(["Positive", "Negative"]).parse_generated(text) == expected


def test_parse_generated_prefers_the_longest_label():
    ls = LabelSet(["Positive", "Very Positive", "Negative"])
    assert ls.parse_generated("very positive!") == "Very Positive"
