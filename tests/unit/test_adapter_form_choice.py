"""How the labeller holds an adapter (backends/adapter_forms.py): `label.merge_adapter`
picks merged, fused or peft's layers from the memory the device has."""

from __future__ import annotations

import pytest

from sentiment_ray.backends.adapter_forms import (
    MEMORY_MARGIN_BYTES,
    AdapterFormError,
    batch_activation_bytes,
    choose_adapter_form,
)

GIB = 2**30


def choose(setting="auto", *, free=None, extra=10 * GIB, batch=20 * GIB, has_adapter=True, can_fuse=True):
    return choose_adapter_form(
        setting, has_adapter=has_adapter, can_fuse=can_fuse, free_bytes=free, merge_extra_bytes=extra, batch_bytes=batch
    )


def test_auto_merges_when_the_16bit_weights_and_a_batch_fit_beside_the_model():
    assert choose(free=130 * GIB).form == "merged"
    assert choose(free=10 * GIB + 20 * GIB + MEMORY_MARGIN_BYTES).form == "merged"


def test_auto_keeps_the_4bit_base_fused_when_there_is_no_room():
    choice = choose(free=10 * GIB + 20 * GIB + MEMORY_MARGIN_BYTES - 1)
    assert choice.form == "fused"
    assert "would need 32.0 GiB" in choice.reason


def test_auto_without_room_on_a_backend_that_cannot_fuse_keeps_peft_layers():
    assert choose(free=18 * GIB, can_fuse=False).form == "unmerged"


def test_auto_merges_on_a_cpu_and_where_merging_adds_nothing():
    assert choose(free=None).form == "merged"  # a CPU: the base is not quantised there
    assert choose(free=1 * GIB, extra=0).form == "merged"  # a 16-bit base: merging replaces weights in place


def test_true_and_false_are_obeyed_whatever_the_memory():
    assert choose("true", free=1 * GIB).form == "merged"
    assert choose("false", free=500 * GIB).form == "fused"
    assert choose("false", free=500 * GIB, can_fuse=False).form == "unmerged"


def test_no_adapter_is_its_own_form():
    assert choose("true", has_adapter=False).form == "none"


def test_an_unknown_setting_is_refused():
    with pytest.raises(AdapterFormError, match="label.merge_adapter='yes'"):
        choose("yes")


def test_batch_activation_estimate_grows_with_the_token_budget_and_the_model():
    class Shape:
        hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads = 4096, 32, 32, 8
        intermediate_size = 14336

    class Small(Shape):
        hidden_size, num_hidden_layers, intermediate_size = 576, 30, 1536

    assert batch_activation_bytes(Shape, 32768) == 2 * batch_activation_bytes(Shape, 16384)
    assert batch_activation_bytes(Small, 32768) < batch_activation_bytes(Shape, 32768)
    # The 8B shape at the default budget: more than 10 GiB, less than an H200.
    assert 10 * GIB < batch_activation_bytes(Shape, 32768) < 60 * GIB
