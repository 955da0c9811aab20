"""Records collected once and written by writers: metrics.jsonl appended and cut back to a checkpoint's
position on resume, the console line, the one rule for which steps are logged."""

import argparse
import errno
import json
import os

import pytest

import metrics
from errors import UserError
from metrics import (
    MOST_CATEGORY_CHARTS,
    ConsoleWriter,
    JsonlWriter,
    LogSchedule,
    Record,
    StepMeters,
    TensorBoardWriter,
    Writers,
    _scalars,
)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train(epoch, step, **values):
    return Record("train", epoch, epoch * 3 + step, values, step)


def test_records_are_appended_with_nan_as_null(tmp_path):
    writer = JsonlWriter(tmp_path)
    writer.write(_train(0, 1, loss=float("nan")))
    writer.write(Record("eval", 0, 3, {"bbox": {"AP": 0.5}}))
    assert _records(tmp_path / "metrics.jsonl") == [
        {"type": "train", "epoch": 0, "step": 1, "global_step": 1, "loss": None},
        {"type": "eval", "epoch": 0, "global_step": 3, "bbox": {"AP": 0.5}}]


def test_truncate_after_keeps_what_the_checkpoint_covers(tmp_path):
    writer = JsonlWriter(tmp_path)
    for epoch in range(2):
        for step in (1, 2, 3):
            writer.write(_train(epoch, step))
        writer.write(Record("eval", epoch, 3 * epoch + 3, {}))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"type": "eval", "epo')  # a line cut short by a kill
    assert [r["epoch"] for r in writer.records("eval")] == [0, 1], "read before the resume truncates"
    writer.truncate_after(1, 2)
    kept = [(r["type"], r["epoch"], r.get("step")) for r in _records(tmp_path / "metrics.jsonl")]
    assert kept == [("train", 0, 1), ("train", 0, 2), ("train", 0, 3), ("eval", 0, None),
                    ("train", 1, 1), ("train", 1, 2)]
    writer.truncate_after(0, None)
    assert [r["epoch"] for r in _records(tmp_path / "metrics.jsonl")] == [0, 0, 0, 0]


def test_the_file_is_read_once_and_then_records_are_kept_as_written(tmp_path, monkeypatch):
    """Every evaluation asks for the records; a long run's file holds tens of thousands of them."""
    writer = JsonlWriter(tmp_path)
    writer.write(_train(0, 1, loss=float("inf")))
    reads = []
    original = metrics.read_records
    monkeypatch.setattr(metrics, "read_records", lambda path: reads.append(path) or original(path))
    assert [r["step"] for r in writer.records("train")] == [1]
    writer.write(_train(0, 2, loss=0.5))
    writer.write(Record("eval", 0, 3, {"bbox": {"AP": 0.5}}))
    assert writer.records("train") == [r for r in _records(tmp_path / "metrics.jsonl") if r["type"] == "train"]
    assert writer.records("eval") == [{"type": "eval", "epoch": 0, "global_step": 3, "bbox": {"AP": 0.5}}]
    assert len(reads) == 1
    writer.truncate_after(0, 1)  # a resume: the file is read again after it
    assert [r["step"] for r in writer.records("train")] == [1] and writer.records("eval") == []
    assert len(reads) == 3


def test_an_epoch_saved_but_not_evaluated_keeps_its_validation_losses(tmp_path):
    """Its resumed run evaluates that epoch without computing them again: one record of each."""
    writer = JsonlWriter(tmp_path)
    for epoch in range(2):
        writer.write(_train(epoch, 1))
        writer.write(Record("val", epoch, epoch + 1, {"loss": 1.0}))
        if epoch == 0:
            writer.write(Record("eval", epoch, epoch + 1, {}))
    writer.truncate_after(1, None)
    kept = [(r["type"], r["epoch"]) for r in _records(tmp_path / "metrics.jsonl")]
    assert kept == [("train", 0), ("val", 0), ("eval", 0), ("train", 1), ("val", 1)]


def test_disabled_writer_writes_nothing(tmp_path, capsys):
    writers = Writers(tmp_path, enabled=False)
    writers.write(_train(0, 1))
    writers.resume_after(0, None, global_step=3)
    assert not (tmp_path / "metrics.jsonl").exists() and capsys.readouterr().out == ""
    assert writers.records("train") == []


def test_logged_steps_are_every_nth_and_the_last():
    schedule = LogSchedule(every=4, total=10)
    assert [s for s in range(1, 11) if schedule.is_logged(s)] == [4, 8, 10]


def test_one_record_feeds_the_console_and_the_file(tmp_path, capsys):
    meters = StepMeters("Epoch: [0]", 0, 10, images_per_step=4)
    for _ in meters.timed(range(2)):
        meters.update(lr=0.01, loss=2.0, loss_mask=0.5)
        meters.step_done()
    record = meters.record("train", 0, 2, 2, steps_after=10)
    writers = Writers(tmp_path, tensorboard=False)
    writers.write(record)
    line = capsys.readouterr().out
    assert line.startswith("Epoch: [0]  [ 2/10]  eta: ") and "(run " in line
    assert "lr: 0.010000  loss: 2.0000 (2.0000)  loss_mask: 0.5000 (0.5000)  img/s: " in line
    (written,) = writers.records("train")
    assert written["loss"] == 2.0 and written["lr"] == 0.01 and written["global_step"] == 2
    assert {"time", "images_per_s", "step_time", "data_time"} <= set(written)


def test_the_runs_eta_adds_the_later_epochs_steps_and_the_time_expected_besides():
    meters = StepMeters("Epoch: [0]", 0, 10, images_per_step=2)
    for _ in range(4):
        meters.step_time.update(2.0)
    assert meters.progress(4).eta_seconds == 12.0 and meters.progress(4).run_eta_seconds is None
    assert meters.progress(4, steps_after=10).run_eta_seconds == 32.0
    assert meters.progress(4, steps_after=10, seconds_after=30.0).run_eta_seconds == 62.0
    assert meters.progress(4, seconds_after=30.0).run_eta_seconds == 42.0, "the last epoch's evaluation too"


def test_an_epoch_resumed_part_way_is_recorded_over_all_its_steps():
    whole = StepMeters("Epoch: [0]", 0, 4, 2)
    first = StepMeters("Epoch: [0]", 0, 4, 2)
    losses = [4.0, 3.0, 2.0, 1.0]
    for loss in losses:
        whole.update(loss=loss, lr=0.1)
    for loss in losses[:3]:
        first.update(loss=loss, lr=0.1)
    rest = StepMeters("Epoch: [0]", 3, 4, 2, carried=first.so_far(3) | {"seconds": 100.0})
    rest.update(loss=losses[3], lr=0.1)
    record = rest.epoch_record(0, 4, 1).values
    assert record["loss"] == whole.epoch_record(0, 4, 4).values["loss"] == 2.5
    assert (record["steps"], record["first_step"]) == (4, 0) and "lr" not in record
    assert 100.0 <= record["seconds"] < 110.0 and record["images_per_s"] == pytest.approx(4 * 2 / record["seconds"],
                                                                                        rel=1e-2)
    uncarried = StepMeters("Epoch: [0]", 3, 4, 2)  # a checkpoint of a version that kept no sums
    uncarried.update(loss=losses[3])
    assert uncarried.epoch_record(0, 4, 1).values | {"time": 0, "seconds": 0, "images_per_s": 0} == {
        "time": 0, "seconds": 0, "images_per_s": 0, "steps": 1, "first_step": 3, "loss": 1.0}


def test_the_record_holds_the_steps_own_rate_and_the_console_the_recent_one():
    meters = StepMeters("Epoch: [0]", 0, 10, images_per_step=4)
    for step_seconds in (1.0, 3.0):
        meters.step_time.update(step_seconds)
    record = meters.record("train", 0, 2, 2)
    assert record.values["images_per_s"] == round(4 / 3.0, 3) and record.values["step_time"] == 3.0
    assert abs(record.progress.images_per_s - 4 / 2.0) < 1e-9


def test_evaluation_progress_reaches_the_console_only(tmp_path, capsys):
    writers = Writers(tmp_path, tensorboard=False)
    meters = StepMeters("Test:", 0, 3, 1)
    writers.write(meters.record("test", 0, 1, 1))
    assert capsys.readouterr().out.startswith("Test:  [1/3]")
    assert not (tmp_path / "metrics.jsonl").exists()
    ConsoleWriter().write(Record("eval", 0, 1, {"bbox": {"AP": 0.1}}))
    assert capsys.readouterr().out == ""


def test_failed_writes_of_the_records_are_one_clear_error_and_the_file_stays_whole(tmp_path, full_disk):
    writer = JsonlWriter(tmp_path)
    writer.write(_train(0, 1))
    before = (tmp_path / "metrics.jsonl").read_text()
    full_disk(0)
    with pytest.raises(UserError, match=r"could not write .*metrics\.jsonl: no space left on the device; the "
                                        r"checkpoints written so far are intact; free space in --output-dir"):
        writer.truncate_after(0, None)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"], "no temporary file left"
    blocked = JsonlWriter(tmp_path / "sub")
    (tmp_path / "sub" / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(UserError, match=r"could not write .*metrics\.jsonl: is a directory"):
        blocked.write(_train(0, 1))


def test_a_failed_tensorboard_write_is_one_clear_error(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    writer = TensorBoardWriter(tmp_path)
    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    with pytest.raises(UserError, match=r"could not write .*events\.out\.tfevents\.\*: no space left on the device;.*"
                                        r"\(or --no-tensorboard\)"):
        writer.write(_train(0, 1, loss=1.0))
    monkeypatch.undo()
    writer.close()


def test_a_folder_name_that_is_not_utf8_is_refused_before_tensorboard_fails_on_it(tmp_path):
    folder = tmp_path / os.fsdecode(b"bad\xffname")  # Python keeps the byte as a lone surrogate
    with pytest.raises(UserError, match="its name holds bytes that are not UTF-8, which TensorBoard cannot write "
                                        "under; rename it, or give --no-tensorboard"):
        Writers(folder)
    Writers(folder, tensorboard=False).close()
    Writers(tmp_path / "naïve ünïcode").close()


def test_tensorboard_charts_ap_per_category_only_for_a_readable_number_of_categories():
    few = {"bbox": {"AP": 0.5, "per_category": {f"c{i}": 0.1 for i in range(80)}}}
    many = {"bbox": {"AP": 0.5, "per_category": {f"c{i}": 0.1 for i in range(MOST_CATEGORY_CHARTS + 1)}}}
    assert set(_scalars(few)) == {"bbox/AP"} | {f"bbox/per_category/c{i}" for i in range(80)}
    assert set(_scalars(many)) == {"bbox/AP"}


def test_a_slash_in_a_category_name_adds_no_level_to_its_tensorboard_chart():
    scalars = _scalars({"segm": {"per_category": {"cup/mug": 0.25, "dog": 0.5}}})
    assert scalars == {"segm/per_category/cup\u2215mug": 0.25, "segm/per_category/dog": 0.5}


def test_an_undefined_metric_puts_no_point_on_its_tensorboard_chart(tmp_path, monkeypatch):
    """COCOeval's -1 (no instance of that size or frequency group) is left out of the chart, not drawn at -1."""
    written = []
    writer = TensorBoardWriter(tmp_path)
    monkeypatch.setattr(TensorBoardWriter, "board", argparse.Namespace(
        add_scalar=lambda name, value, step: written.append((name, value))))
    writer.write(Record("eval", 0, 10, {"segm": {"AP": 0.25, "APl": -1.0}}))
    writer.write(_train(0, 1, loss=-1.0))
    assert written == [("eval/segm/AP", 0.25), ("train/loss", -1.0)], "a training value of -1 is a value"
