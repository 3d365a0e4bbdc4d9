"""Command-line errors: a wrong option or config file is one clear line and exit status 2, never a traceback."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from segbatch.cli import build_config, main, run


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def _config_file(tmp_path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_a_missing_config_file_is_a_usage_error(tmp_path) -> None:
    result = _invoke("run", "--config", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and not isinstance(result.exception, FileNotFoundError)
    assert "nope.yaml" in result.output and "does not exist" in result.output


def test_config_values_are_converted_by_their_option_type(tmp_path) -> None:
    path = _config_file(tmp_path, 'source: in/\ndest: out/\nshard_size: "64"\noverwrite: "yes"\ngpus_per_worker: 0\n')
    ctx = run.make_context("run", ["--config", path])
    cfg = build_config(ctx, ctx.params.pop("source"), ctx.params.pop("dest"), dict(ctx.params))
    assert cfg.shard_size == 64 and cfg.overwrite is True and cfg.gpus_per_worker == 0.0


def test_a_config_value_of_the_wrong_type_names_its_key(tmp_path) -> None:
    path = _config_file(tmp_path, "source: in/\ndest: out/\nshard_size: sixty-four\n")
    result = _invoke("run", "--config", path)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "shard_size" in result.output and "sixty-four" in result.output


def test_a_config_file_that_is_not_yaml_is_a_usage_error(tmp_path) -> None:
    result = _invoke("run", "--config", _config_file(tmp_path, "source: [unclosed\n"))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "cannot read" in result.output


def test_status_refuses_storage_options_that_are_not_json(tmp_path) -> None:
    result = _invoke("status", str(tmp_path), "--storage-options", "{endpoint: nope")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "--storage-options" in result.output and "not JSON" in result.output


def test_train_refuses_eval_data_with_workers(tmp_path) -> None:
    result = _invoke(
        "train", str(tmp_path / "gt.json"), "--out", str(tmp_path / "m.pt"), "--workers", "2", "--eval-data", "x.json"
    )
    assert result.exit_code == 2 and "--eval-data" in result.output and "--workers" in result.output


def test_polygon_options_bind_to_the_config_from_the_line_or_a_file(tmp_path) -> None:
    args = ["in/", "out/", "--objects-crs", "EPSG:4326", "--simplify", "2px", "--min-area", "10"]
    ctx = run.make_context("run", args)
    cfg = build_config(ctx, ctx.params.pop("source"), ctx.params.pop("dest"), dict(ctx.params))
    assert (cfg.objects_crs, cfg.simplify, cfg.min_area) == ("EPSG:4326", "2px", "10")
    path = _config_file(tmp_path, "source: in/\ndest: out/\nsimplify: 0.5\nmin_area: 25px\n")  # YAML reads 0.5 a float
    ctx = run.make_context("run", ["--config", path])
    cfg = build_config(ctx, ctx.params.pop("source"), ctx.params.pop("dest"), dict(ctx.params))
    assert cfg.polygon_options().simplify.value == 0.5 and cfg.polygon_options().min_area.pixels


def test_an_unknown_objects_crs_is_one_line_naming_the_fix(tmp_path) -> None:
    result = _invoke("run", str(tmp_path), str(tmp_path / "out"), "--objects-crs", "EPSG:4327x")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "--objects-crs 'EPSG:4327x'" in result.output and "EPSG:4326" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "command",
    [
        ["export", "{dest}", "--coco", "{tmp}/coco.json"],
        ["eval", "{dest}", "{tmp}/gt.json"],
        ["render", "{dest}", "--out", "{tmp}/render"],
        ["counts", "{dest}", "--by", "(?P<d>[^/]+)/"],
        ["report", "{dest}"],
    ],
    ids=lambda c: c[0],
)
def test_a_dest_without_results_is_one_line_naming_the_fix_not_a_traceback(tmp_path, command) -> None:
    """A DEST no job wrote into (a typo, or the job not run yet): read commands say so in one line."""
    (tmp_path / "gt.json").write_text('{"images": [], "annotations": [], "categories": []}')
    dest = tmp_path / "never-run"
    dest.mkdir()
    result = _invoke(*[a.format(dest=dest, tmp=tmp_path) for a in command])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("segbatch: error: ")
    assert "holds no results" in result.output and "segbatch run SOURCE" in result.output
    assert "Traceback" not in result.output
