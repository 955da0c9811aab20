"""metrics.jsonl: records appended, and cut back to a checkpoint's position on resume."""

import json

from metrics import MetricsWriter


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_appended_with_nan_as_null(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write({"type": "train", "epoch": 0, "step": 1, "loss": float("nan")})
    writer.write({"type": "eval", "epoch": 0, "bbox": {"AP": 0.5}})
    assert _records(tmp_path / "metrics.jsonl") == [
        {"type": "train", "epoch": 0, "step": 1, "loss": None}, {"type": "eval", "epoch": 0, "bbox": {"AP": 0.5}}]


def test_truncate_after_keeps_what_the_checkpoint_covers(tmp_path):
    writer = MetricsWriter(tmp_path)
    for epoch in range(2):
        for step in (1, 2, 3):
            writer.write({"type": "train", "epoch": epoch, "step": step})
        writer.write({"type": "eval", "epoch": epoch})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"type": "train", "epo')  # a line cut short by a kill
    writer.truncate_after(1, 2, global_step=5)
    kept = [(r["type"], r["epoch"], r.get("step")) for r in _records(tmp_path / "metrics.jsonl")]
    assert kept == [("train", 0, 1), ("train", 0, 2), ("train", 0, 3), ("eval", 0, None),
                    ("train", 1, 1), ("train", 1, 2)]
    writer.truncate_after(0, None, global_step=3)
    assert [r["epoch"] for r in _records(tmp_path / "metrics.jsonl")] == [0, 0, 0, 0]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=False)
    writer.write({"type": "train", "epoch": 0, "step": 1})
    writer.truncate_after(0, None, global_step=3)
    assert not (tmp_path / "metrics.jsonl").exists()
