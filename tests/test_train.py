"""Training: a tiny run writes a checkpoint that loads without code and predicts."""

from __future__ import annotations

import pytest
import torch

from segbatch.arch import build_architecture
from segbatch.synth import CLASSES, write_dataset
from segbatch.train import CHECKPOINT_FORMAT, TrainConfig, load_checkpoint, save_checkpoint, train, train_distributed

SIZE = (160, 128)


def _tiny(tmp_path, **kw) -> TrainConfig:
    data = write_dataset(str(tmp_path / "data"), 4, seed=11, size=SIZE)
    return TrainConfig(
        data=data, out=str(tmp_path / "model.pt"), arch="demo", epochs=1, batch_size=2, lr=1e-4,
        min_size=128, max_size=160, max_steps=2, threads=2, **kw,
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

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = _tiny(tmp_path, workers=1, storage_path=str(tmp_path / "ray"))
        assert train_distributed(cfg) == cfg.out
    finally:
        ray.shutdown()
    _check_checkpoint(cfg.out)
