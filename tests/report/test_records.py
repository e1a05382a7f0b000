"""Reading a run dir for the report: a run still writing metrics.jsonl, damaged files, results."""

import json

import pytest

from dino_bridge.report.records import flatten_scalars, parse_metrics_lines, read_run


def _lines(n=3):
    return [json.dumps({"iteration": i, "total_loss": 10.0 - i}) for i in range(n)]


def test_a_partial_last_line_is_skipped_and_counted():
    lines = [*_lines(3), '{"iteration": 3, "total_lo']
    records, skipped = parse_metrics_lines(lines, "m.jsonl")
    assert [r["iteration"] for r in records] == [0, 1, 2] and skipped
    records, skipped = parse_metrics_lines([*_lines(3), ""], "m.jsonl")  # a trailing blank line
    assert len(records) == 3 and not skipped


def test_a_damaged_line_before_the_last_is_an_error_naming_it():
    lines = _lines(3)
    lines.insert(1, "{not json")
    with pytest.raises(ValueError, match=r"m.jsonl: line 2 is not valid JSON"):
        parse_metrics_lines(lines, "m.jsonl")
    with pytest.raises(ValueError, match=r"line 1 is not a metrics record"):
        parse_metrics_lines(['{"loss": 1.0}', *_lines(2)], "m.jsonl")


def test_read_run_collects_metrics_config_and_results(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(_lines(2)) + '\n{"iteration": 2, "to')
    (tmp_path / "config.yaml").write_text("student:\n  arch: vit_tiny\n")
    (tmp_path / "quickstart_results.json").write_text(json.dumps({"knn_after": {"top1": {"20": 71.5}}}))
    (tmp_path / "half_written.json").write_text('{"top1": ')  # being written: left out
    run = read_run(tmp_path)
    assert len(run.records) == 2 and run.skipped_partial_line
    assert "vit_tiny" in run.config_text
    assert list(run.evaluations) == ["quickstart_results.json"]
    assert not run.finished  # no run_summary.json: the run goes on
    assert run.keys == ["iteration", "total_loss"]


def test_read_run_names_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_run(tmp_path / "nope")
    with pytest.raises(ValueError, match="no metrics.jsonl in"):
        read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 0, "tot')
    with pytest.raises(ValueError, match="holds no complete record yet"):
        read_run(tmp_path)


def test_flatten_scalars_gives_dotted_paths():
    value = {"knn": {"top1": {"20": 71.5}, "ks": [10, 20]}, "arch": "vit_tiny", "note": None}
    assert flatten_scalars(value) == {"knn.top1.20": 71.5, "knn.ks.0": 10, "knn.ks.1": 20, "arch": "vit_tiny"}
