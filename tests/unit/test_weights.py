"""Safe loading (weights.py): safetensors by default; a pickle adapter or model is refused,
naming the file, before anything unpickles it; the opt-in lifts that."""

from __future__ import annotations

import json
import pickle

import pytest

from sentiment_ray.weights import (
    UnsafeWeightsError,
    check_adapter_weights,
    check_model_folder,
    from_pretrained_kwargs,
)


class Payload:
    """Unpickling this runs code: it creates a file (what a planted payload would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_adapter(folder, marker) -> None:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Payload(str(marker))))


def test_a_pickle_adapter_is_refused_naming_the_file_and_nothing_is_unpickled(tmp_path):
    marker = tmp_path / "payload-ran"
    pickle_adapter(tmp_path / "adapter", marker)
    with pytest.raises(
        UnsafeWeightsError, match=r"adapter_model\.bin: the adapter's weights are a pickle file.*allow_unsafe_weights=true"
    ):
        check_adapter_weights(str(tmp_path / "adapter"), allow_unsafe=False)
    assert check_adapter_weights(str(tmp_path / "adapter"), allow_unsafe=True).endswith("adapter_model.bin")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    assert check_adapter_weights(str(tmp_path / "adapter"), allow_unsafe=False).endswith(".safetensors")
    assert not marker.exists()


def test_the_backends_refuse_a_pickle_adapter_before_peft_loads_it(tmp_path):
    from sentiment_ray.backends.base import BackendError, check_adapter_dir

    marker = tmp_path / "payload-ran"
    pickle_adapter(tmp_path / "adapter", marker)
    with pytest.raises(BackendError, match="pickle file"):
        check_adapter_dir(str(tmp_path / "adapter"))
    assert not marker.exists()


def test_a_model_folder_with_only_pickle_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(UnsafeWeightsError, match=r"pytorch_model\.bin: the model's weights are a pickle file"):
        check_model_folder(str(tmp_path), allow_unsafe=False)
    check_model_folder(str(tmp_path), allow_unsafe=True)
    (tmp_path / "model.safetensors").write_bytes(b"")
    check_model_folder(str(tmp_path), allow_unsafe=False)
    assert from_pretrained_kwargs(False) == {"use_safetensors": True}
    assert from_pretrained_kwargs(True) == {}
