"""`trainer bench` in its tiny mode: it runs the three pipelines and reports consistent numbers.
(It is a benchmark, not a timed test: no speed is asserted here.)"""

import json


def test_bench_tiny_mode_prints_the_table_and_writes_json(run_cli, data_dir, tmp_path):
    out = tmp_path / "bench.json"
    # 16 repeats + a warm-up: more epochs of ours than step5's recipe has (15)
    result = run_cli("bench", "--batches", "3", "--repeats", "16", "--subset", "512", "--workers", "0",
                     "--json", out, "--data-dir", data_dir)  # fmt: skip
    assert result.exit_code == 0, result.output
    for label in ("floor", "plain", "ours", "ours / plain", "ours / floor", "evaluation", "peak RSS"):
        assert label in result.output
    data = json.loads(out.read_text())
    rows = data["rows"]
    batch = data["batch_size"]  # step5's recipe
    assert rows["floor"]["images"] == rows["plain"]["images"] == 3 * batch and rows["ours"]["images"] == 512
    assert data["channels_last"] and rows["floor_nhwc"]["images"] == 3 * batch  # our layout's floor beside NCHW's
    assert data["ours_over_floor_nhwc"] == rows["ours"]["images_per_s"] / rows["floor_nhwc"]["images_per_s"]
    assert rows["floor_train"]["images"] == 3 * batch and "ours / floor_train" in result.output
    assert data["ours_over_plain"] == rows["ours"]["images_per_s"] / rows["plain"]["images_per_s"]
    assert 0 < data["eval_share_of_epoch"] < 1 and data["peak_rss_mb"] > 0
    assert data["repeats"] == 16 and data["compile"] is False and data["amp"] in (True, False)  # amp: auto, resolved
