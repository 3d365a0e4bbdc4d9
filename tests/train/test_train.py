"""Training: a tiny run writes a checkpoint that loads without code and predicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from segbatch.model import build_architecture
from segbatch.train import (
    CHECKPOINT_FORMAT,
    CLASSES,
    CocoInstances,
    TrainConfig,
    TrainError,
    build_trainable_model,
    load_checkpoint,
    resolve_arch,
    save_checkpoint,
    train,
    train_distributed,
    write_dataset,
)
from segbatch.train.loop import _agreed_steps

SIZE = (160, 128)


def _tiny(tmp_path, **kw) -> TrainConfig:
    data = write_dataset(str(tmp_path / "data"), 4, seed=11, size=SIZE)
    return TrainConfig(
        data=data,
        out=str(tmp_path / "model.pt"),
        arch="demo",
        epochs=1,
        batch_size=2,
        lr=1e-4,
        min_size=128,
        max_size=160,
        max_steps=2,
        threads=2,
        **kw,
    )


def _check_checkpoint(path: str) -> None:
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["arch"] == "demo"
    assert raw["classes"] == CLASSES and (raw["min_size"], raw["max_size"]) == (128, 160)
    ckpt = load_checkpoint(path)
    assert all(v.dtype != torch.float16 for v in ckpt["state_dict"].values())
    model = build_architecture("demo", len(ckpt["classes"]), min_size=ckpt["min_size"], max_size=ckpt["max_size"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, SIZE[1], SIZE[0])])
    n = len(out["boxes"])
    assert out["boxes"].shape == (n, 4) and out["scores"].shape == (n,) and out["labels"].shape == (n,)
    assert out["masks"].shape == (n, 1, SIZE[1], SIZE[0])


def test_train_two_steps(tmp_path) -> None:
    seen: list[dict] = []
    cfg = _tiny(tmp_path, half=True)
    assert train(cfg, seen.append) == cfg.out
    assert [r["step"] for r in seen] == [1, 2] and all(r["steps"] == 2 for r in seen)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in seen)
    assert {"loss_classifier", "loss_mask"} <= set(seen[0]["loss_components"])
    raw = torch.load(cfg.out, weights_only=True)
    assert raw["state_dict"]["backbone.body.conv1.weight"].dtype == torch.float16
    _check_checkpoint(cfg.out)


def test_checkpoint_round_trip(tmp_path) -> None:
    model = build_architecture("demo", len(CLASSES))
    path = save_checkpoint(model, "demo", CLASSES, str(tmp_path / "m.pt"), 128, 160)
    ckpt = load_checkpoint(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt["state_dict"][name], tensor)


@pytest.mark.slow  # starts Ray: about 30 s on an idle 2-core machine
def test_train_distributed_one_worker(tmp_path) -> None:
    import ray

    secret = "sekrit-never-recorded"  # storage options may hold credentials; Ray Train v1 records its config
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = _tiny(tmp_path, workers=1, storage_path=str(tmp_path / "ray"), storage_options={"s3": {"secret": secret}})
        assert train_distributed(cfg) == cfg.out
    finally:
        ray.shutdown()
    _check_checkpoint(cfg.out)
    recorded = [p for p in (tmp_path / "ray").rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not recorded


def test_training_reads_and_writes_through_storage(tmp_path) -> None:
    """The dataset, its images and the checkpoint at URLs (fsspec's memory://), with storage options."""
    import fsspec

    local = _tiny(tmp_path)
    memory = fsspec.filesystem("memory")
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            memory.pipe_file(f"/set/{path.relative_to(tmp_path / 'data').as_posix()}", path.read_bytes())
    cfg = TrainConfig(
        **{
            **vars(local),
            "data": "memory://set/ground_truth.json",
            "out": "memory://out/model.pt",
            "storage_options": {"memory": {}},
        }
    )
    assert "storage_options" not in repr(cfg)
    assert train(cfg) == cfg.out
    ckpt = load_checkpoint(cfg.out)
    assert ckpt["arch"] == "demo" and ckpt["classes"] == CLASSES


def test_image_names_are_relative_to_the_folder_of_the_json() -> None:
    from segbatch.train.dataset import image_url

    assert image_url("s3://b/set/gt.json", "images/a.png") == "s3://b/set/images/a.png"
    assert image_url("/data/set/gt.json", "images/a.png") == "/data/set/images/a.png"
    assert image_url("gt.json", "images/a.png") == "images/a.png"  # a JSON in the working folder
    assert image_url("s3://b/set/gt.json", "/abs/a.png") == "/abs/a.png"
    assert image_url("/data/gt.json", "s3://other/a.png") == "s3://other/a.png"


def test_a_time_budget_shortens_the_run_to_what_fits() -> None:
    from segbatch.train.loop import TimeBudget

    now = [0.0]
    budget = TimeBudget(100.0, torch.device("cpu"), clock=lambda: now[0])
    totals = []
    for step in range(1, 41):
        now[0] = 5.0 + step  # 5 s of warm-up, then 1 s a step
        totals.append(budget.total_after(step, 500))
    assert totals[:-1] == [500] * 39  # unchanged until the probe steps are timed
    assert totals[-1] == 40 + int(0.9 * 100 - 45)  # a tenth of the budget kept for evaluations and checkpoints
    assert TimeBudget(1e6, torch.device("cpu"), clock=lambda: now[0]).total_after(40, 500) == 500


def _init_cfg(tmp_path, init: str, arch: str | None = None) -> TrainConfig:
    return TrainConfig(
        data="unused.json", out=str(tmp_path / "out.pt"), arch=arch, init=init, min_size=128, max_size=160
    )


def test_init_takes_its_architecture_and_loads_what_fits(tmp_path, caplog) -> None:
    torch.manual_seed(5)
    seeded = build_architecture("demo", 3)  # another class list: its predictors cannot load
    init = save_checkpoint(seeded, "demo", CLASSES[:3], str(tmp_path / "init.pt"), 128, 160)
    cfg = resolve_arch(_init_cfg(tmp_path, init))
    assert cfg.arch == "demo"
    with caplog.at_level("INFO", logger="segbatch.train.checkpoint"):
        model = build_trainable_model(cfg, CLASSES)
    own, theirs = model.state_dict(), seeded.state_dict()
    assert torch.equal(own["backbone.body.conv1.weight"], theirs["backbone.body.conv1.weight"])
    assert own["roi_heads.box_predictor.cls_score.weight"].shape[0] == len(CLASSES)
    skipped = sum(own[k].shape != v.shape for k, v in theirs.items())
    assert (
        skipped == 6 and "6 of the checkpoint's skipped" in caplog.text
    )  # the box and mask predictors' weights and biases


def test_init_refuses_another_architecture(tmp_path) -> None:
    init = save_checkpoint(build_architecture("demo", 3), "demo", CLASSES[:3], str(tmp_path / "init.pt"), 128, 160)
    with pytest.raises(TrainError, match="holds a demo model but --arch is resnet50_fpn"):
        resolve_arch(_init_cfg(tmp_path, init, arch="resnet50_fpn"))
    # a torchvision reference-script checkpoint ({"model": state_dict}) is read; its architecture from its keys
    keys = (
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_head.fc6.weight",
        "backbone.body.layer4.2.conv3.weight",
    )
    torch.save({"model": {k: torch.zeros(2, 2) for k in keys}}, tmp_path / "tv.pt")
    with pytest.raises(TrainError, match="holds a resnet50_fpn model but --arch is demo"):
        resolve_arch(_init_cfg(tmp_path, str(tmp_path / "tv.pt"), arch="demo"))


def test_init_refuses_a_checkpoint_none_of_whose_tensors_fit(tmp_path) -> None:
    bad = {
        "format": CHECKPOINT_FORMAT,
        "arch": "demo",
        "classes": CLASSES,
        "state_dict": {"other.weight": torch.zeros(3)},
    }
    torch.save(bad, tmp_path / "init.pt")
    with pytest.raises(TrainError, match="none of the 1 tensors"):
        build_trainable_model(_init_cfg(tmp_path, str(tmp_path / "init.pt"), arch="demo"), CLASSES)


def test_a_state_dict_of_unknown_architecture_is_told_the_checkpoint_format(tmp_path) -> None:
    from segbatch.model import ModelError

    torch.save(build_architecture("demo", 3).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ModelError, match=f"'format': '{CHECKPOINT_FORMAT}', 'arch': NAME"):
        resolve_arch(_init_cfg(tmp_path, str(tmp_path / "bare.pt")))


def _agree(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        agreed = _agreed_steps(100 + 10 * rank, torch.device("cpu"))  # each worker timed its own steps
        with open(f"{out_dir}/{rank}", "w") as f:
            f.write(str(agreed))
    finally:
        dist.destroy_process_group()


def test_workers_agree_on_the_steps_a_time_budget_allows(tmp_path) -> None:
    import torch.multiprocessing as mp

    assert _agreed_steps(123, torch.device("cpu")) == 123  # one process: its own
    mp.spawn(_agree, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / str(r)).read_text() for r in (0, 1)] == ["100", "100"]


def test_evaluate_scores_the_shipped_demo_model(tmp_path) -> None:
    from segbatch.config import ModelConfig
    from segbatch.model import load_model
    from segbatch.train import evaluate_model

    data = write_dataset(str(tmp_path / "data"), 4, seed=2026)
    demo = load_model(ModelConfig(model="demo", device="cpu"))
    stats = evaluate_model(demo.module, demo.classes, data, max_images=4)
    assert stats["images"] == 4 and stats["mask_ap"] > 0.5 and 0 < stats["box_ap50"] <= 1


def test_evaluate_checkpoint_scores_the_shipped_demo_checkpoint(tmp_path) -> None:
    from importlib import resources

    from segbatch.train import evaluate_checkpoint

    data = write_dataset(str(tmp_path / "data"), 4, seed=2026)
    stats = evaluate_checkpoint(str(resources.files("segbatch") / "assets" / "demo.pt"), data, max_images=4)
    assert stats["images"] == 4 and stats["mask_ap"] > 0.5 and 0 < stats["box_ap50"] <= 1


def _phone_photo(tmp_path, record_size: tuple[int, int]) -> str:
    """A JPEG stored landscape with EXIF orientation 6 (shown portrait, 24 x 40), a red
    box at x 4-12, y 20-34 of the portrait frame, and a COCO set annotating it there."""
    shown = np.full((40, 24, 3), 128, np.uint8)
    shown[20:34, 4:12] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: viewers turn the stored pixels 90 degrees clockwise
    # Stored turned back, so that applying the orientation shows `shown`.
    Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "shelf.jpg", quality=95, exif=exif)
    width, height = record_size
    coco = {
        "images": [{"id": 1, "file_name": "shelf.jpg", "width": width, "height": height}],
        "categories": [{"id": 1, "name": "box"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "area": 112,
                "bbox": [4, 20, 8, 14],
                "segmentation": [[4, 20, 12, 20, 12, 34, 4, 34]],
            }
        ],
    }
    (tmp_path / "gt.json").write_text(json.dumps(coco))
    return str(tmp_path / "gt.json")


def test_training_sees_phone_photos_upright_as_inference_does(tmp_path) -> None:
    image, target = CocoInstances(_phone_photo(tmp_path, (24, 40)))[0]
    assert image.shape == (3, 40, 24) and target["masks"].shape == (1, 40, 24)
    mask = target["masks"][0].bool()
    red, green = image[0][mask], image[1][mask]
    assert red.mean() > 0.9 and green.mean() < 0.15, "the mask lies on the red box"
    assert target["boxes"].tolist() == [[4.0, 20.0, 12.0, 34.0]]


def test_a_record_in_the_stored_unrotated_frame_is_refused_naming_the_file(tmp_path) -> None:
    dataset = CocoInstances(_phone_photo(tmp_path, (40, 24)))
    with pytest.raises(
        TrainError, match=r"shelf\.jpg: decoded as 24x40 .* says 40x24 \(the record has the stored, un-rotated"
    ):
        dataset[0]
