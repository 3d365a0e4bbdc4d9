"""--precision bf16 on a CPU without native bf16 (issue 17): torch emulates it, 3x to 20x
slower than fp32, without a word. The worker warns and runs fp32 unless forced."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from skimage import data as skdata

from segbatch.config import ModelConfig
from segbatch.model import Segmenter, load_model
from segbatch.model.precision import cpu_has_native_bf16, effective_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_bf16_on_a_cpu_without_it_runs_fp32_and_says_how_to_force_it(caplog):
    caplog.set_level(logging.WARNING, logger="segbatch.model.precision")
    assert effective_precision("bf16", CPU, native_bf16=lambda: False) == "fp32"
    assert "no native bf16" in caplog.text and "--force-precision" in caplog.text


def test_bf16_runs_where_the_cpu_has_it_or_when_forced_and_elsewhere_as_asked(caplog):
    caplog.set_level(logging.WARNING, logger="segbatch.model.precision")
    assert effective_precision("bf16", CPU, native_bf16=lambda: True) == "bf16"
    assert effective_precision("bf16", CPU, force=True, native_bf16=lambda: False) == "bf16"
    assert effective_precision("bf16", CUDA, native_bf16=lambda: False) == "bf16"  # GPUs run what they are given
    assert effective_precision("fp32", CPU, native_bf16=lambda: False) == "fp32"
    assert caplog.text == ""


def test_a_segmenter_asked_for_bf16_on_this_cpu_runs_what_the_cpu_supports(caplog):
    """On this machine's CPU: without native bf16 the rows are fp32's, bit for bit; with it, bf16 runs."""
    caplog.set_level(logging.WARNING, logger="segbatch.model.precision")
    cfg = ModelConfig(model="random", score_threshold=0.0, max_detections=5, min_size=128, max_size=160, seed=3)
    loaded = load_model(cfg)
    image = np.ascontiguousarray(skdata.astronaut()[::4, ::4])
    bf16 = Segmenter(loaded, dataclasses.replace(cfg, precision="bf16"))
    if cpu_has_native_bf16():
        assert bf16.precision == "bf16" and caplog.text == ""
        return
    assert bf16.precision == "fp32" and "running fp32" in caplog.text
    fp32 = Segmenter(loaded, cfg)
    ours, theirs = bf16.segment([image])[0], fp32.segment([image])[0]
    assert len(ours) == len(theirs) > 0
    assert [d["score"] for d in ours] == [d["score"] for d in theirs]
    assert [d["mask"]["counts"] for d in ours] == [d["mask"]["counts"] for d in theirs]
    forced = Segmenter(loaded, dataclasses.replace(cfg, precision="bf16", force_precision=True))
    assert forced.precision == "bf16"


@pytest.mark.parametrize("force", [False, True])
def test_force_precision_is_not_in_the_result_key(force):
    assert "force_precision" not in ModelConfig(precision="bf16", force_precision=force).result_fields()
