"""Storage's local-folder helpers: a folder replaced whole, an exclusive create."""

import pytest

from sentiment_ray.io.storage import Storage, local_atomic_dir


def test_local_atomic_dir_replaces_the_folder_whole(tmp_path):
    target = tmp_path / "cache" / "model"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("old")
    with local_atomic_dir(target) as stage:
        (stage.path / "config.json").write_text("{}")
        assert not (target / "config.json").exists()  # not visible before the block ends
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


def test_local_atomic_dir_keeps_the_old_folder_when_the_block_fails(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), local_atomic_dir(target) as stage:
        (stage.path / "half.bin").write_bytes(b"x")
        raise RuntimeError("save failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left
    assert (target / "old.txt").read_text() == "old"


def test_local_atomic_dir_takes_a_name_decided_inside_the_block(tmp_path):
    with local_atomic_dir(tmp_path / "restoring") as stage:
        (stage.path / "trainer_state.json").write_text("{}")
        stage.target = stage.target.with_name("checkpoint-7")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7"]


def test_create_exclusive_creates_once(tmp_path):
    folder = Storage(str(tmp_path))
    assert folder.create_exclusive("lock.json", b"first") is True
    assert folder.create_exclusive("lock.json", b"second") is False
    assert folder.read_bytes("lock.json") == b"first"
    with pytest.raises(FileNotFoundError):
        Storage(str(tmp_path / "missing")).create_exclusive("lock.json", b"x")
