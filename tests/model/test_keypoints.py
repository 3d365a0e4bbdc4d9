"""Keypoint R-CNN (issue 16): segbatch's keypoints equal torchvision's own ``model()`` output,
and keypoint models load from torchvision's weights and from checkpoints with their names and skeleton.

Reference: a second, unpatched ``keypointrcnn_resnet50_fpn`` with the same seeded weights, sizes and
thresholds, called as a user would (``model.eval()([image])``).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.transform import rescale

from segbatch.config import ModelConfig
from segbatch.model import (
    CHECKPOINT_FORMAT,
    COCO_KEYPOINT_NAMES,
    COCO_SKELETON,
    ModelError,
    Segmenter,
    build_architecture,
    hub_weights_path,
    load_model,
    resolve_model,
)

KEYPOINT_URL = "https://download.pytorch.org/models/keypointrcnn_resnet50_fpn_coco-fc266e95.pth"


def _small(image: np.ndarray, scale: float) -> np.ndarray:
    return (rescale(image, scale, channel_axis=2, anti_aliasing=True) * 255).round().astype(np.uint8)


IMAGES = {
    "astronaut": lambda: _small(skdata.astronaut(), 0.3),  # 154 x 154
    "chelsea": lambda: _small(skdata.chelsea(), 0.4),  # 120 x 180
    "coffee": lambda: _small(skdata.coffee(), 0.3),  # 120 x 180
}


@pytest.fixture(scope="module")
def models():
    # seeded random weights: score threshold 0 so that every kept box is a detection
    cfg = ModelConfig(
        model="keypoint-random", seed=5, score_threshold=0.0, min_size=128, max_size=192, max_detections=12
    )
    ours = Segmenter(load_model(cfg), cfg)
    reference = load_model(cfg).module  # the same seeded weights, torchvision's own postprocessing
    return ours, reference


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_keypoints_match_torchvision(models, name) -> None:
    ours, reference = models
    image = IMAGES[name]()
    records = ours.segment([image])[0]
    with torch.inference_mode():
        ref = reference.eval()([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]

    assert len(records) == len(ref["scores"]) > 0
    np.testing.assert_array_equal(np.array([r["box"] for r in records], np.float32), ref["boxes"].numpy())
    np.testing.assert_array_equal(np.array([r["score"] for r in records], np.float32), ref["scores"].numpy())
    assert [r["label_name"] for r in records] == ["person"] * len(records)
    kps = np.array([[[k["x"], k["y"]] for k in r["keypoints"]] for r in records], np.float32)
    assert kps.shape == (len(records), 17, 2)
    np.testing.assert_allclose(kps, ref["keypoints"][..., :2].numpy(), atol=0.5, rtol=0)
    scores = np.array([[k["score"] for k in r["keypoints"]] for r in records], np.float32)
    np.testing.assert_array_equal(scores, ref["keypoints_scores"].numpy())
    visible = np.array([[k["visible"] for k in r["keypoints"]] for r in records])
    np.testing.assert_array_equal(visible, ref["keypoints"][..., 2].numpy() > 0)
    # keypoint models have no masks
    assert all(r["mask"] is None and r["area"] is None for r in records)
    # keypoints in the image's pixels: inside it (torchvision's decoding keeps them in their boxes)
    h, w = image.shape[:2]
    assert (kps[..., 0] >= 0).all() and (kps[..., 0] <= w).all() and (kps[..., 1] >= 0).all()
    assert (kps[..., 1] <= h).all()


def test_a_batch_matches_torchvision_on_the_same_batch(models) -> None:
    """Images of one batch are padded to one size (which moves the outputs, as for masks): torchvision's
    ``model()`` of the same batch is the reference, each image's keypoints in its own pixels."""
    ours, reference = models
    images = [IMAGES["astronaut"](), IMAGES["coffee"]()]
    together = ours.segment(images)
    with torch.inference_mode():
        refs = reference([torch.from_numpy(i).permute(2, 0, 1).float() / 255 for i in images])
    for records, ref in zip(together, refs):
        assert len(records) == len(ref["scores"]) > 0
        kps = np.array([[[k["x"], k["y"]] for k in r["keypoints"]] for r in records], np.float32)
        np.testing.assert_allclose(kps, ref["keypoints"][..., :2].numpy(), atol=0.5, rtol=0)


def test_mask_models_have_no_keypoints() -> None:
    spec = resolve_model(ModelConfig(model="random"))
    assert spec.keypoint_names is None and spec.skeleton is None
    assert "keypoint_names" not in spec.result_fields(ModelConfig(model="random"))  # mask result keys unchanged


def test_coco_names_and_skeleton_are_torchvisions_and_cocos() -> None:
    from torchvision.models.detection import KeypointRCNN_ResNet50_FPN_Weights

    assert list(COCO_KEYPOINT_NAMES) == KeypointRCNN_ResNet50_FPN_Weights.COCO_V1.meta["keypoint_names"]
    # COCO's person_keypoints annotation files give the skeleton 1-based
    coco_1based = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
        [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]  # fmt: skip
    assert [list(p) for p in COCO_SKELETON] == [[i - 1, j - 1] for i, j in coco_1based]


def test_keypoint_coco_without_internet_says_where_to_put_the_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(ModelError) as raised:
        resolve_model(ModelConfig(model="keypoint-coco"))
    message = str(raised.value)
    assert KEYPOINT_URL in message and str(hub_weights_path(KEYPOINT_URL)) in message and "copy the file" in message
    assert not hub_weights_path(KEYPOINT_URL).exists()


def test_keypoint_coco_refuses_a_file_that_is_not_torchvisions(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = hub_weights_path(KEYPOINT_URL)
    path.parent.mkdir(parents=True)
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ModelError, match="SHA-256") as raised:
        resolve_model(ModelConfig(model="keypoint-coco"))
    assert "fc266e95" in str(raised.value)


@pytest.fixture(scope="module")
def small_keypoint_state_dict():
    """A Keypoint R-CNN of 4 keypoints and 3 classes (seeded)."""
    torch.manual_seed(1)
    return build_architecture("keypoint_resnet50_fpn", 3, num_keypoints=4).state_dict()


def _save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


def test_a_segbatch_keypoint_checkpoint_carries_its_names_and_skeleton(tmp_path, small_keypoint_state_dict) -> None:
    path = _save(
        {
            "format": CHECKPOINT_FORMAT,
            "arch": "keypoint_resnet50_fpn",
            "classes": ["__background__", "cat", "dog"],
            "keypoint_names": ["nose", "tail", "left_paw", "right_paw"],
            "skeleton": [[0, 1], [2, 3]],
            "min_size": 96,
            "max_size": 128,
            "state_dict": small_keypoint_state_dict,
        },
        tmp_path / "pets.pt",
    )
    spec = resolve_model(ModelConfig(model=path))
    assert spec.arch == "keypoint_resnet50_fpn" and spec.classes == ["__background__", "cat", "dog"]
    assert spec.keypoint_names == ["nose", "tail", "left_paw", "right_paw"] and spec.skeleton == [[0, 1], [2, 3]]
    assert spec.result_fields(ModelConfig(model=path))["keypoint_names"] == spec.keypoint_names
    cfg = ModelConfig(model=path, score_threshold=0.0, max_detections=3)
    records = Segmenter(load_model(cfg), cfg).segment([IMAGES["coffee"]()])[0]
    assert records and all(len(r["keypoints"]) == 4 for r in records)


def test_a_bare_state_dict_takes_names_from_a_keypoints_file(tmp_path, small_keypoint_state_dict) -> None:
    path = _save(small_keypoint_state_dict, tmp_path / "bare.pt")
    names = tmp_path / "keypoints.txt"
    names.write_text("a\nb\nc\nd\n\n")
    spec = resolve_model(ModelConfig(model=path, keypoints=str(names)))
    assert spec.arch == "keypoint_resnet50_fpn" and spec.keypoint_names == ["a", "b", "c", "d"]
    assert spec.skeleton is None  # not COCO's names, and the checkpoint has none: no skeleton is guessed
    # without the file: names by number, so the rows still say which keypoint is which
    assert resolve_model(ModelConfig(model=path)).keypoint_names == ["keypoint_0", "keypoint_1", "keypoint_2",
        "keypoint_3"]  # fmt: skip


def test_a_17_keypoint_state_dict_gets_cocos_names_and_skeleton(tmp_path) -> None:
    torch.manual_seed(2)
    path = _save({"model": build_architecture("keypoint_resnet50_fpn", 2).state_dict()}, tmp_path / "ref.pth")
    spec = resolve_model(ModelConfig(model=path))
    assert spec.keypoint_names == list(COCO_KEYPOINT_NAMES)
    assert spec.skeleton == [list(p) for p in COCO_SKELETON]


def test_a_keypoints_file_of_the_wrong_length_is_refused(tmp_path, small_keypoint_state_dict) -> None:
    path = _save(small_keypoint_state_dict, tmp_path / "bare.pt")
    names = tmp_path / "keypoints.txt"
    names.write_text("a\nb\nc\n")
    with pytest.raises(ModelError, match="4 keypoints.*names 3.*--keypoints file with 4 lines"):
        resolve_model(ModelConfig(model=path, keypoints=str(names)))


def test_a_skeleton_outside_the_keypoints_is_refused(tmp_path, small_keypoint_state_dict) -> None:
    path = _save(
        {"format": CHECKPOINT_FORMAT, "arch": "keypoint_resnet50_fpn", "skeleton": [[0, 4]],
         "state_dict": small_keypoint_state_dict},
        tmp_path / "bad.pt",
    )  # fmt: skip
    with pytest.raises(ModelError, match=r"skeleton pairs \[\[0, 4\]\].*0\.\.3"):
        resolve_model(ModelConfig(model=path))


def test_keypoints_for_a_mask_model_are_refused(tmp_path) -> None:
    names = tmp_path / "keypoints.txt"
    names.write_text("a\n")
    with pytest.raises(ModelError, match="no keypoint head"):
        resolve_model(ModelConfig(model="random", keypoints=str(names)))


def test_the_command_line_binds_keypoint_options(tmp_path) -> None:
    from segbatch.cli import build_config, run

    ctx = run.make_context("run", ["in/", "out/", "--model", "keypoint-coco", "--keypoints", "names.txt"])
    cfg = build_config(ctx, ctx.params.pop("source"), ctx.params.pop("dest"), dict(ctx.params))
    assert cfg.model.model == "keypoint-coco" and cfg.model.keypoints == "names.txt"
    # the file's path is not in the result key: the names it holds are (ModelSpec.result_fields)
    assert "keypoints" not in cfg.model.result_fields()


def test_training_a_keypoint_architecture_is_refused_naming_the_way() -> None:
    from segbatch.config import TrainConfig, TrainError
    from segbatch.train import resolve_arch

    with pytest.raises(TrainError, match="Mask R-CNN only.*--keypoints"):
        resolve_arch(TrainConfig(data="gt.json", out="out.pt", arch="keypoint_resnet50_fpn"))
