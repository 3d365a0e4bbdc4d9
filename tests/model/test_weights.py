"""Weights are loaded without running code from them (issue 12, item 11: the weights part).

torchvision's files are found where torch.hub keeps them ($TORCH_HOME, here a temporary folder),
checked against the SHA-256 prefix in their names, and read as tensors only; a checkpoint given
as --model PATH is read as tensors only too. Every refusal names the file and the fix.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
import torch

from segbatch.config import ModelConfig
from segbatch.model import ModelError, build_architecture, hub_weights_path, load_hub_weights, resolve_model

COCO_URL = "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"


class Planted:
    """A pickle that creates ``marker`` when unpickled: code run from a weights file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _planted_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"roi_heads.box_predictor.cls_score.weight": Planted(marker)}, buf)
    return buf.getvalue()


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def test_the_coco_file_is_found_in_torch_home(torch_home) -> None:
    assert hub_weights_path(COCO_URL) == torch_home / "hub" / "checkpoints" / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"


def test_a_pickle_planted_in_the_hub_cache_is_refused_and_never_runs(torch_home, tmp_path) -> None:
    marker = tmp_path / "ran"
    path = hub_weights_path(COCO_URL)
    path.parent.mkdir(parents=True)
    path.write_bytes(_planted_bytes(marker))
    with pytest.raises(ModelError) as raised:
        resolve_model(ModelConfig(model="coco"))
    assert str(path) in str(raised.value) and "delete" in str(raised.value)
    assert not marker.exists()


def test_a_planted_pickle_named_by_its_own_hash_is_read_as_tensors_only(tmp_path) -> None:
    """Eight hex digits are 2^32 tries from a match: the hash is no guard alone; weights_only is."""
    marker = tmp_path / "ran"
    data = _planted_bytes(marker)
    path = tmp_path / f"maskrcnn_planted-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    path.write_bytes(data)
    with pytest.raises(ModelError, match="as tensors only") as raised:
        load_hub_weights(path)
    assert str(path) in str(raised.value)
    assert not marker.exists()


def test_a_file_whose_hash_does_not_match_its_name_is_refused(torch_home) -> None:
    path = hub_weights_path(COCO_URL)
    path.parent.mkdir(parents=True)
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    path.write_bytes(buf.getvalue()[:-100])  # a download cut short
    with pytest.raises(ModelError, match="SHA-256") as raised:
        resolve_model(ModelConfig(model="coco"))
    message = str(raised.value)
    assert str(path) in message and "bf2d0c1e" in message and "copy the file" in message


def test_weights_named_by_their_hash_load(tmp_path) -> None:
    torch.manual_seed(3)
    state_dict = build_architecture("resnet50_fpn", 91).state_dict()
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    data = buf.getvalue()
    path = tmp_path / f"maskrcnn_resnet50_fpn_coco-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    path.write_bytes(data)
    loaded = load_hub_weights(path)
    assert loaded.keys() == state_dict.keys()
    assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)


def test_missing_weights_without_internet_say_where_to_put_them(torch_home, monkeypatch) -> None:
    # no internet here: a proxy nobody listens on makes sure of it wherever the test runs
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(ModelError) as raised:
        resolve_model(ModelConfig(model="coco"))
    message = str(raised.value)
    assert COCO_URL in message and str(hub_weights_path(COCO_URL)) in message and "copy the file" in message
    assert not hub_weights_path(COCO_URL).exists()  # nothing half-downloaded left where a rerun would trust it


def test_a_custom_checkpoint_is_read_as_tensors_only(tmp_path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    path.write_bytes(_planted_bytes(marker))
    with pytest.raises(ModelError) as raised:
        resolve_model(ModelConfig(model=str(path)))
    message = str(raised.value)
    assert str(path) in message and "torch.save(model.state_dict(), path)" in message
    assert not marker.exists()


def test_a_corrupt_custom_checkpoint_names_the_file(tmp_path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(1000))
    with pytest.raises(ModelError, match="cannot load checkpoint") as raised:
        resolve_model(ModelConfig(model=str(path)))
    assert str(path) in str(raised.value)
