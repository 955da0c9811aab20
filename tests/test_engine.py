"""The training loop's pieces, in this process on a tiny model: warm-up, logged records, the non-finite loss
message, the fault limit, a mid-epoch stop and its continuation, and the gradient scaler's path."""

import math

import pytest
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform

import engine
from conftest import in_two_processes
from engine import FaultLog, PendingLosses, TrainOptions, Warmup, backward, train_one_epoch, update, warmup_factor
from errors import UserError
from group_by_aspect_ratio import ResumableBatchSampler

CPU = torch.device("cpu")


class TinyDetector(nn.Module):
    """A 'detector' of one weight whose losses depend on the images' mean; nan when an image id is poisoned."""

    def __init__(self, poisoned: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.5]))
        self.poisoned = poisoned

    def forward(self, images, targets):
        mean = torch.stack([image.mean() for image in images]).mean() + 0.1
        loss_a = (self.weight * mean).sum()
        if any(t["image_id"] == self.poisoned for t in targets):
            loss_a = loss_a * float("nan")
        return {"loss_a": loss_a, "loss_b": (self.weight.square() * mean).sum()}


class Samples(torch.utils.data.Dataset):
    """Small uint8 images with targets; the images listed in `faulty` carry a skipped-sample fault, and from
    `broken_from` on none can be read at all."""

    def __init__(self, count: int, faulty: tuple[int, ...] = (), broken_from: int | None = None) -> None:
        self.count, self.faulty, self.broken_from = count, faulty, broken_from

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        if self.broken_from is not None and index >= self.broken_from:
            raise UserError(f"{index}.jpg: the folder is gone")
        image = torch.full((3, 4, 4), 10 * index, dtype=torch.uint8)
        faults = [f"{index}.jpg: image missing; sample skipped"] if index in self.faulty else []
        return image, {"image_id": index, "faults": faults}


def loader(count: int = 10, batch_size: int = 2, skip: int = 0, accumulation: int = 1, **kwargs
           ) -> torch.utils.data.DataLoader:
    """Batches in order, as train.py's resumable batch sampler gives them; the first `skip` batches left out, as
    a resumed epoch's are."""
    batches = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(count)), batch_size, False)
    resumable = ResumableBatchSampler(batches, accumulation)
    resumable.skip = skip
    return torch.utils.data.DataLoader(Samples(count, **kwargs), batch_sampler=resumable,
                                       collate_fn=lambda b: tuple(zip(*b)))


def train(model, data, epoch=0, start_step=0, kinds=("train",), **options):
    """One epoch of train_one_epoch; its records of the given kinds (the logged steps')."""
    records = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options = TrainOptions(print_freq=options.pop("print_freq", 1), on_record=records.append, **options)
    result = train_one_epoch(model, optimizer, data, CPU, epoch, options=options, start_step=start_step)
    return result, [r for r in records if r.kind in kinds], optimizer


def test_warmup_factor_rises_linearly_to_one():
    assert warmup_factor(0, 10) == pytest.approx(0.001)
    assert warmup_factor(5, 10) == pytest.approx(0.001 + 0.999 * 0.5)
    assert warmup_factor(10, 10) == warmup_factor(50, 10) == 1.0


def test_first_epoch_warms_up_over_its_steps_and_the_optimizer_keeps_base_rates():
    result, records, optimizer = train(TinyDetector(), loader(10))
    assert result.finished and result.steps_done == 5
    assert [r.values["lr"] for r in records] == pytest.approx([0.1 * warmup_factor(s, 4) for s in range(5)])
    assert optimizer.param_groups[0]["lr"] == 0.1, "saved with the base rate"
    _, later, _ = train(TinyDetector(), loader(10), epoch=1)
    assert {r.values["lr"] for r in later} == {0.1}, "no warm-up after the first epoch"
    warmup = Warmup(optimizer, epoch=0, steps_in_epoch=3000)
    assert warmup.steps == engine.WARMUP_STEPS


def test_records_are_the_logged_steps_with_their_losses():
    _, records, _ = train(TinyDetector(), loader(10), epoch=2, print_freq=2)
    assert [(r.kind, r.epoch, r.step, r.global_step) for r in records] == [
        ("train", 2, 2, 12), ("train", 2, 4, 14), ("train", 2, 5, 15)]
    values = records[-1].values
    assert values["loss"] == pytest.approx(values["loss_a"] + values["loss_b"])
    assert math.isfinite(values["images_per_s"])


def test_a_finished_epoch_ends_with_a_record_of_its_mean_losses():
    _, records, _ = train(TinyDetector(), loader(10), epoch=2, print_freq=2, kinds=("train", "epoch"))
    *steps, epoch = records
    every_step = [r.values for r in train(TinyDetector(), loader(10), epoch=2, print_freq=1)[1]]
    assert (epoch.kind, epoch.epoch, epoch.step, epoch.global_step) == ("epoch", 2, None, 15)
    assert (epoch.values["steps"], epoch.values["first_step"]) == (5, 0) and epoch.values["seconds"] > 0
    for name in ("loss", "loss_a", "loss_b"):  # every step's, logged or not
        assert epoch.values[name] == pytest.approx(sum(v[name] for v in every_step) / 5), name
    assert "lr" not in epoch.values and [r.kind for r in steps] == ["train"] * 3


def test_an_epoch_left_unfinished_has_no_epoch_record():
    requests = iter([False, False, True])
    result, records, _ = train(TinyDetector(), loader(10), stop_requested=lambda: next(requests),
                               kinds=("train", "epoch"))
    assert not result.finished and {r.kind for r in records} == {"train"}
    _, resumed, _ = train(TinyDetector(), loader(10, skip=2), start_step=2, kinds=("epoch",))
    assert (resumed[-1].kind, resumed[-1].values["steps"], resumed[-1].values["first_step"]) == ("epoch", 3, 2)


def test_a_non_finite_loss_names_its_step_and_the_fixes():
    with pytest.raises(UserError) as error:
        train(TinyDetector(poisoned=5), loader(10), print_freq=3)
    message = str(error.value)
    assert message.startswith("loss is nan at epoch 0 step 3 {'loss_a': nan, 'loss_b': "), "the 3rd, as logged"
    assert "--clip-grad-norm 10" in message and "without a checkpoint of these weights (earlier ones" in message
    assert "--amp-dtype" not in message, "a run without --amp has no precision to change"
    pending = PendingLosses(epoch=0, amp_dtype=torch.float16)
    pending.add(0, {"a": torch.tensor(float("nan"))})
    with pytest.raises(UserError, match="--clip-grad-norm 10, --amp-dtype bfloat16 instead of float16, or a look"):
        pending.read()


def test_non_finite_losses_are_read_together_at_logged_steps():
    pending = PendingLosses(epoch=0)
    pending.add(0, {"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    pending.add(1, {"a": torch.tensor(3.0), "b": torch.tensor(float("inf"))})
    with pytest.raises(UserError, match="loss is inf at epoch 0 step 1"):
        pending.read()


def test_fault_log_prints_once_and_enforces_the_share(capsys):
    def repaired(log):
        return engine.repaired_annotations(log.epoch_faults)

    log = FaultLog(max_share=0.1)
    log.start_epoch()
    log.add(["a.jpg: image missing; sample skipped"], samples_in_epoch=20)
    log.add(["a.jpg: image missing; sample skipped", "b.jpg annotation 3: polygon ... removed"], 20)
    assert capsys.readouterr().out.count("a.jpg") == 1
    assert (log.skipped, repaired(log)) == (1, 1), "a sample met twice in an epoch counts once"
    log.add(["b.jpg annotation 3: no segmentation to learn a mask from; instance dropped"], 20)
    assert repaired(log) == 1, "an annotation counts once however many faults it has"
    log.add(["b.jpg annotation 4: polygon ... removed"], 20)
    assert repaired(log) == 2
    log.add(["c.jpg: image missing; sample skipped"], 20)
    assert not log.over_limit
    log.add(["d.jpg: image missing; sample skipped"], 20)
    assert log.over_limit and "3 of 20 samples could not be read" in str(log.limit_error())
    log.start_epoch()
    assert (log.skipped, repaired(log), log.over_limit) == (0, 0, False)


def test_the_loop_stops_the_run_past_the_fault_limit(capsys):
    result, _, _ = train(TinyDetector(), loader(10, faulty=(3,)), faults=FaultLog(0.1))
    assert result.finished and "data faults: 1 samples skipped" in capsys.readouterr().out
    result, records, _ = train(TinyDetector(), loader(10, faulty=(3, 7)), faults=FaultLog(0.1))
    assert "2 of 10 samples could not be read this epoch" in str(result.failure.error)
    assert result.failure.agreed, "every rank meets the limit at one agreement"
    assert (result.steps_done, result.finished) == (3, False), "stopped before the step of sample 7"
    assert [r.step for r in records] == [1, 2, 3]


def test_an_epochs_record_counts_its_data_faults_and_a_resume_part_way_carries_them():
    def counts(values):
        return values["samples_skipped"], values["annotations_repaired"]

    clean = train(TinyDetector(), loader(10), kinds=("epoch",))[1][-1]
    faulty = train(TinyDetector(), loader(10, faulty=(1, 6)), kinds=("epoch",), faults=FaultLog(0.5))[1][-1]
    assert counts(clean.values) == (0, 0) and counts(faulty.values) == (2, 0)
    requests = iter([False, False, True])  # a stop before step 2, whose batch (samples 4 and 5) was read
    stopped, _, _ = train(TinyDetector(), loader(10, faulty=(1, 4, 6)), faults=FaultLog(0.5),
                          stop_requested=lambda: next(requests))
    assert stopped.so_far["faults"] == ["1.jpg: image missing; sample skipped"], "sample 4 was not trained on"
    options = TrainOptions(faults=FaultLog(0.5), on_record=(records := []).append)
    optimizer = torch.optim.SGD(TinyDetector().parameters(), lr=0.1)
    train_one_epoch(TinyDetector(), optimizer, loader(10, faulty=(1, 4, 6), skip=2), CPU, 0, options=options,
                    start_step=2, carried=stopped.so_far)
    assert counts(records[-1].values) == (3, 0), "sample 1 before the resume, 4 and 6 after it"
    carried = {**stopped.so_far, "faults": ["6.jpg: image missing; sample skipped"]}  # met again after it
    train_one_epoch(TinyDetector(), optimizer, loader(10, faulty=(6,), skip=2), CPU, 0,
                    options=options, start_step=2, carried=carried)
    assert counts(records[-1].values) == (1, 0), "a sample met on both sides of the resume counts once"


def test_the_epochs_faults_are_counted_over_every_rank_once_each(tmp_path, monkeypatch):
    def work(rank):
        log = FaultLog(max_share=1.0)
        log.add([f"{rank}.jpg: image missing; sample skipped", "padded.jpg: image missing; sample skipped",
                 f"a.jpg annotation {rank}: polygon with 2 points removed"], samples_in_epoch=10)
        carried = {"faults": ["before.jpg: image missing; sample skipped", "b.jpg annotation 5: polygon removed"]}
        return engine.fault_counts(engine.epoch_faults_everywhere(log, engine.DataFailure(), carried))

    assert in_two_processes(tmp_path, work) == {rank: {"samples_skipped": 4, "annotations_repaired": 3}
                                                for rank in (0, 1)}
    monkeypatch.setattr(engine.utils, "get_world_size", lambda: 2)
    monkeypatch.setattr(engine.utils, "all_gather_object", lambda _: pytest.fail("the other ranks are not there"))
    alone = engine.DataFailure(error=UserError("6.jpg: the folder is gone"), agreed=False)
    log = FaultLog(max_share=1.0)
    log.add(["a.jpg: image missing; sample skipped"], samples_in_epoch=10)
    assert engine.epoch_faults_everywhere(log, alone, None) == {"a.jpg: image missing; sample skipped"}


def test_data_that_fails_between_steps_ends_the_epoch_with_the_steps_done_sound():
    result, records, optimizer = train(TinyDetector(), loader(10, broken_from=6))
    assert str(result.failure.error) == "6.jpg: the folder is gone" and not result.failure.agreed
    assert (result.steps_done, result.finished) == (3, False) and [r.step for r in records] == [1, 2, 3]
    assert optimizer.param_groups[0]["lr"] == 0.1, "the base rate back, as a checkpoint saves it"


def test_a_stop_request_ends_the_epoch_after_the_step_in_progress_and_the_rest_continues():
    straight_model = TinyDetector()
    _, straight, _ = train(straight_model, loader(10))
    requests = iter([False, False, True])
    stopped_model = TinyDetector()
    result, first, optimizer = train(stopped_model, loader(10), stop_requested=lambda: next(requests))
    assert (result.steps_done, result.finished) == (2, False)
    assert [r.step for r in first] == [1, 2], "the steps done were all logged"
    records = []
    options = TrainOptions(print_freq=1, on_record=records.append)
    result = train_one_epoch(stopped_model, optimizer, loader(10, skip=2), CPU, 0, options=options, start_step=2)
    assert (result.steps_done, result.finished) == (5, True)
    resumed = first + [r for r in records if r.kind == "train"]
    assert [r.step for r in resumed] == [r.step for r in straight]
    assert [r.values["lr"] for r in resumed] == pytest.approx([r.values["lr"] for r in straight])
    assert torch.allclose(stopped_model.weight, straight_model.weight)


def agreed_steps(seconds_per_step: float, peer_slower: float = 1.0, steps: int = 25) -> list[int]:
    """The steps at which two ranks, asked to stop at every step, agree; the peer's steps peer_slower times as
    long as this rank's."""
    now = [0.0]
    agreement = engine.StopAgreement(FaultLog(0.1), clock=lambda: now[0])
    agreed = []
    for step in range(steps):
        now[0] = step * seconds_per_step
        if agreement.agreed(step, True):
            agreed.append(step)
    return agreed


def test_ranks_agree_on_a_stop_every_two_seconds_of_the_slowest_ranks_steps(monkeypatch):
    monkeypatch.setattr(engine.utils, "get_world_size", lambda: 2)
    peer_slower = [1.0]
    monkeypatch.setattr(engine.utils, "max_over_ranks",
                        lambda values: [values[0], values[1], int(values[2] * peer_slower[0])])
    assert agreed_steps(0.1) == [0, 1, 11, 21], "fast steps: at most 10 apart"
    assert agreed_steps(0.5) == [0, 1, 5, 9, 13, 17, 21]
    assert agreed_steps(3.0, steps=5) == [0, 1, 2, 3, 4], "slow steps: every step"
    peer_slower[0] = 30.0
    assert agreed_steps(0.1, steps=5) == [0, 1, 2, 3, 4], "the peer's slow steps set the pace"


def test_a_rank_within_the_fault_limit_stops_with_the_rank_past_it(monkeypatch):
    monkeypatch.setattr(engine.utils, "get_world_size", lambda: 2)
    exchanges = []
    monkeypatch.setattr(engine.utils, "max_over_ranks",  # the peer is past it
                        lambda values: exchanges.append(values) or [values[0], 1, values[2]])
    agreement = engine.StopAgreement(FaultLog(0.1))
    agreement.next_step = 5
    assert not agreement.agreed(3, False) and not exchanges, "between agreements nothing is exchanged"
    with pytest.raises(UserError, match="another process found more unreadable samples"):
        agreement.agreed(5, False)


def test_faults_after_the_ranks_last_agreed_still_stop_the_run(monkeypatch):
    monkeypatch.setattr(engine.utils, "get_world_size", lambda: 2)
    monkeypatch.setattr(engine.utils, "max_over_ranks", lambda values: values)
    monkeypatch.setattr(engine.utils, "reduce_dict", lambda losses: losses)
    monkeypatch.setattr(engine.utils, "all_gather_object", lambda faults: [faults])
    # 20 samples, this rank's share of 40 over 2 ranks; the ranks agree at steps 0 and 1 only (fast steps agree
    # 10 apart), before the faults.
    result, _, _ = train(TinyDetector(), loader(20, faulty=(13, 15, 17)), faults=FaultLog(0.1))
    assert "3 of this process's 20 samples could not be read this epoch" in str(result.failure.error)
    assert result.failure.agreed and (result.steps_done, result.finished) == (10, False)


def test_the_scaler_path_unscales_before_clipping_and_updates_once():
    updates = {}
    for name, scaler in (("plain", None), ("scaled", torch.amp.GradScaler("cpu", init_scale=2.0**10))):
        torch.manual_seed(0)
        model = TinyDetector()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = sum(model([torch.ones(3, 2, 2)], [{"image_id": 0}]).values())
        backward(losses, scaler)
        update(model, optimizer, TrainOptions(scaler=scaler, clip_grad_norm=0.05))
        updates[name] = model.weight.detach().clone()
        if scaler is not None:
            assert scaler.get_scale() == 2.0**10, "a finite step keeps the scale"
    assert torch.allclose(updates["plain"], updates["scaled"])
    assert torch.allclose(updates["plain"], torch.tensor([1.5 - 0.1 * 0.05]), atol=1e-6), "clipped to 0.05"


class LinearDetector(nn.Module):
    """A detector whose loss is the mean over its batch's images of a linear function: the gradient of a batch
    of 4 is the mean of two batches of 2's, as with models without training-mode batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.5, -0.25]))

    def forward(self, images, targets):
        features = torch.stack([torch.stack([image.mean(), image.std()]) for image in images])
        return {"loss_linear": (features @ self.weight).square().mean()}


def test_two_accumulated_batches_of_two_step_as_one_of_four():
    weights = {}
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = LinearDetector()
        data = loader(count=16, batch_size=batch_size, accumulation=accumulation)
        result, records, _ = train(model, data, epoch=1, grad_accum_steps=accumulation)
        assert result.steps_done == 4 and [r.step for r in records] == [1, 2, 3, 4]
        assert records[0].progress.images_per_s > 0
        weights[batch_size] = model.weight.detach().clone()
    torch.testing.assert_close(weights[2], weights[4], rtol=1e-6, atol=1e-7)


def test_an_accumulated_epoch_stops_and_resumes_on_an_optimizer_step():
    straight_model = LinearDetector()
    _, straight, _ = train(straight_model, loader(count=16, batch_size=2, accumulation=2), grad_accum_steps=2)
    requests = iter([False, True])
    model = LinearDetector()
    data = loader(count=16, batch_size=2, accumulation=2)
    result, first, optimizer = train(model, data, grad_accum_steps=2, stop_requested=lambda: next(requests))
    assert (result.steps_done, result.finished) == (1, False)
    records = []
    options = TrainOptions(print_freq=1, on_record=records.append, grad_accum_steps=2)
    resumed_data = loader(count=16, batch_size=2, accumulation=2, skip=2)  # one step of two batches done
    result = train_one_epoch(model, optimizer, resumed_data, CPU, 0, options=options, start_step=1)
    assert (result.steps_done, result.finished) == (4, True)
    resumed = first + [r for r in records if r.kind == "train"]
    assert [r.step for r in resumed] == [r.step for r in straight]
    assert [r.values["lr"] for r in resumed] == pytest.approx([r.values["lr"] for r in straight])
    torch.testing.assert_close(model.weight, straight_model.weight)


def test_after_each_optimizer_step_the_runs_steps_so_far_are_passed_on():
    """Counted over the run, so that an average updated every N steps is updated across epochs of fewer."""
    steps = []
    train(LinearDetector(), loader(count=16, batch_size=2), after_step=steps.append)
    train(LinearDetector(), loader(count=16, batch_size=2), epoch=2, after_step=steps.append)
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8] + [17, 18, 19, 20, 21, 22, 23, 24]


class NormedDetector(nn.Module):
    """A detector with batch norm in training mode and a random draw in its forward, as R-CNN heads sample."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(2)
        self.weight = nn.Parameter(torch.tensor([0.5, -0.25]))

    def forward(self, images, targets):
        features = self.norm(torch.stack([torch.stack([image.mean(), image.std()]) for image in images]))
        noise = torch.rand(1)
        return {"loss_a": (features @ self.weight).square().mean() + 0 * noise.sum(), "loss_b": noise.sum()}


def test_validation_losses_change_no_parameter_buffer_or_random_state():
    model = NormedDetector()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator_state = torch.get_rng_state()
    losses = engine.validation_losses(model, loader(count=6, batch_size=3), CPU, None)
    assert set(losses) == {"loss", "loss_a", "loss_b"}
    assert losses["loss"] == pytest.approx(losses["loss_a"] + losses["loss_b"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "no batch norm statistic moved"
    assert torch.equal(torch.get_rng_state(), generator_state), "the heads' draws leave the run's generator as it was"
    assert all(p.grad is None for p in model.parameters())


def test_compact_masks_on_the_cpu_gives_the_run_lengths_of_every_pixel():
    generator = torch.Generator().manual_seed(3)
    masks = torch.rand(4, 1, 37, 29, generator=generator) ** 3
    masks[1] = 0  # a mask with nothing set
    compact = engine.compact_masks(masks)
    every_pixel = engine.run_lengths(masks)
    assert compact.size == every_pixel.size == (37, 29)
    assert [c.tolist() for c in compact.counts] == [c.tolist() for c in every_pixel.counts]


class ResizingDetector(torch.nn.Module):
    """torchvision's transform as an lsj-trained model has it; records the sizes the images reach."""

    def __init__(self):
        super().__init__()
        self.transform = GeneralizedRCNNTransform(32, 32, [0.5] * 3, [0.2] * 3, _skip_resize=True)
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.sizes = []

    def forward(self, images, targets):
        batch, _ = self.transform(images, targets)
        self.sizes += batch.image_sizes
        return {"loss_a": self.weight * batch.tensors.mean()}


def test_validation_losses_resize_images_as_evaluation_where_training_does_not():
    model = ResizingDetector()
    images = [torch.rand(3, 64, 48) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[1.0, 1, 20, 20]]), "labels": torch.tensor([1])} for _ in range(2)]
    engine.validation_losses(model, [(images, targets)], CPU, None)
    assert model.sizes == [(32, 24)] * 2
    assert model.transform._skip_resize, "training goes on without the model's resize"


class EmptyDetector(nn.Module):
    """Finds nothing; counts the images it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, images):
        self.seen += len(images)
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
                for _ in images]


class IdRecorder:
    """Stands in for CocoEvaluator: keeps the ids of the images whose predictions it was given."""

    def __init__(self) -> None:
        self.image_ids = []

    def update(self, predictions: dict) -> None:
        self.image_ids += list(predictions)


def asked_to_stop_after(answers_no: int):
    """A stop_requested that answers no that many times, then yes."""
    answers = iter([False] * answers_no)
    return lambda: next(answers, True)


def test_a_stop_request_ends_an_evaluation_before_its_next_batch():
    model, evaluator = EmptyDetector(), IdRecorder()
    with pytest.raises(engine.EvaluationStopped):
        engine.evaluate(model, loader(count=10, batch_size=2), CPU, evaluator, stop_requested=asked_to_stop_after(2))
    assert model.seen == 4 and evaluator.image_ids == [0, 1, 2, 3]


def test_a_stop_request_ends_the_validation_losses_and_the_random_state_is_kept():
    model = NormedDetector()
    generator_state = torch.get_rng_state()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(engine.EvaluationStopped):
        engine.validation_losses(model, loader(count=6, batch_size=2), CPU, None, asked_to_stop_after(1))
    assert len(calls) == 1
    assert torch.equal(torch.get_rng_state(), generator_state)


@pytest.mark.parametrize("min_size, max_size", [(800, 1333), (96, 128), (160, 256)])
def test_padded_size_is_the_size_torchvisions_transform_batches_an_image_to(min_size, max_size):
    transform = GeneralizedRCNNTransform(min_size, max_size, [0.5] * 3, [0.2] * 3).eval()
    model = nn.Module()
    model.transform = transform
    generator = torch.Generator().manual_seed(0)
    sides = torch.randint(16, 1400, (60, 2), generator=generator).tolist() + [[480, 640], [427, 640], [31, 1000]]
    for height, width in sides:
        image = torch.zeros(3, height, width)
        assert engine.padded_size(model, image) == tuple(transform([image])[0].tensors.shape[-2:]), (height, width)


def test_padded_size_of_a_fixed_size_transform_and_of_a_model_without_one():
    model = nn.Module()
    model.transform = GeneralizedRCNNTransform(300, 300, [0.5] * 3, [0.2] * 3, size_divisible=1,
                                               fixed_size=(300, 300)).eval()
    assert engine.padded_size(model, torch.zeros(3, 40, 90)) == (300, 300)
    assert engine.padded_size(nn.Module(), torch.zeros(3, 40, 90)) == (40, 90)


def test_same_size_batches_hold_one_size_and_keep_few_waiting():
    sizes = [(4, 6), (6, 4), (4, 6), (4, 6), (6, 4), (5, 5)]
    items = [(index, torch.zeros(3, *size)) for index, size in enumerate(sizes)]
    shape = lambda item: tuple(item[1].shape[-2:])  # noqa: E731
    batches = [[index for index, _ in batch] for batch in engine.same_size_batches(items, 2, shape)]
    assert batches == [[0, 2], [1, 4], [3], [5]]
    many = [(index, torch.zeros(3, index + 1, 4)) for index in range(12)]  # no two alike
    batches = list(engine.same_size_batches(many, 2, shape))
    assert [index for batch in batches for index, _ in batch] == list(range(12)), "none waits for long"
    assert max(map(len, batches)) == 1


class OutputRecorder(IdRecorder):
    """Stands in for CocoEvaluator to the end of an evaluation: keeps the outputs, scores nothing."""

    backend, timings, iou_types = "none", {"encode_wait": 0.0, "score": 0.0}, ("bbox",)

    def __init__(self) -> None:
        super().__init__()
        self.outputs = self.per_image = {}

    def update(self, predictions: dict) -> None:
        super().update(predictions)
        self.outputs.update(predictions)

    def synchronize_between_processes(self) -> None:
        pass

    def summarize(self) -> dict:
        return {}


def test_unreadable_images_are_left_out_of_an_evaluation_with_a_warning_up_to_the_limit(capsys):
    evaluator = OutputRecorder()
    engine.evaluate(EmptyDetector(), loader(count=10, batch_size=2, faulty=(3,)), CPU, evaluator, max_bad_samples=0.1)
    assert "warning: 1 of 10 images could not be read (named above); the scores leave them out" in (
        capsys.readouterr().err)
    with pytest.raises(UserError, match="2 of 10 samples could not be read in this evaluation, more than "
                                        "--max-bad-samples 0.1 allows"):
        engine.evaluate(EmptyDetector(), loader(count=10, batch_size=2, faulty=(3, 7)), CPU, OutputRecorder(),
                        max_bad_samples=0.1)
    early = OutputRecorder()
    with pytest.raises(UserError, match="2 of 10 samples could not be read in this evaluation"):
        engine.evaluate(EmptyDetector(), loader(count=10, batch_size=2, faulty=(0, 1)), CPU, early,
                        max_bad_samples=0.1)
    assert len(early.outputs) <= 2, "the evaluation stops once past the limit, not at its end"


class MixedSizes(torch.utils.data.Dataset):
    """Images of assorted sizes, several of which torchvision's transform (96-128 px) batches to one size."""

    SIZES = [(100, 150), (150, 100), (120, 130), (100, 151), (150, 100), (70, 200), (100, 150)]

    def __len__(self) -> int:
        return len(self.SIZES)

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(index)
        image = torch.randint(0, 256, (3, *self.SIZES[index]), dtype=torch.uint8, generator=generator)
        return image, {"image_id": index}  # uint8, as this project's loaders give


def test_evaluation_in_batches_gives_each_image_its_detections_alone():
    """torchvision pads a batch to its largest image, which changes the others' detections: evaluation batches
    only images of one padded size."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=96, max_size=128,
                                    box_score_thresh=0.0)  # in training mode, as after an epoch
    batch_sizes = []
    model.backbone.register_forward_hook(lambda _, inputs, __: batch_sizes.append(len(inputs[0])))
    evaluated = {}
    for batch_size in (1, 3):
        evaluator = OutputRecorder()
        data = torch.utils.data.DataLoader(MixedSizes(), batch_size=batch_size, collate_fn=lambda b: tuple(zip(*b)))
        engine.evaluate(model, data, CPU, evaluator)
        assert not model.training and sorted(evaluator.image_ids) == list(range(len(MixedSizes.SIZES)))
        evaluated[batch_size] = evaluator.outputs
    assert batch_sizes[7:] == [3, 2, 1, 1], "alone: 7 batches of 1; in threes: one size of 3, one of 2, two alone"
    for index, alone in evaluated[1].items():
        batched = evaluated[3][index]
        assert len(alone["boxes"]) == len(batched["boxes"]) > 0
        torch.testing.assert_close(batched["boxes"], alone["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(batched["scores"], alone["scores"], atol=1e-5, rtol=0)


def test_an_operation_without_a_deterministic_kernel_is_one_line():
    class Undeterministic(TinyDetector):
        def forward(self, images, targets):
            raise RuntimeError("roi_align_backward_kernel does not have a deterministic implementation, but you set "
                               "'torch.use_deterministic_algorithms(True)'. You can turn off determinism ...")

    with pytest.raises(UserError, match="^--use-deterministic-algorithms: roi_align_backward_kernel has no "
                                        "deterministic implementation on this device"):
        train(Undeterministic(), loader(4))
    with pytest.raises(RuntimeError, match="something else"), engine.deterministic_kernels_missing_said():
        raise RuntimeError("something else")


class Pedestrians(torch.utils.data.Dataset):
    """As torchvision's tutorial writes its dataset: tv_tensors images of floats in [0, 1], targets of tensors
    (boxes in corners, masks, labels, a tensor image_id, area, iscrowd). An image's first pixel holds its index."""

    def __init__(self, count: int = 4, height: int = 60, width: int = 80) -> None:
        self.count, self.height, self.width = count, height, width

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        from torchvision import tv_tensors
        from torchvision.ops import masks_to_boxes

        masks = torch.zeros(2, self.height, self.width, dtype=torch.uint8)
        masks[0, 10:40, 5 + index:25 + index] = 1
        masks[1, 20:50, 40:70] = 1
        boxes = masks_to_boxes(masks)
        image = torch.full((3, self.height, self.width), 0.2)
        image[:, masks.bool().any(0)] = 0.8
        image[0, 0, 0] = index / 100
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(self.height, self.width)),
                  "masks": tv_tensors.Mask(masks), "labels": torch.ones(2, dtype=torch.int64),
                  "image_id": torch.tensor([index]), "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                  "iscrowd": torch.zeros(2, dtype=torch.int64)}
        return tv_tensors.Image(image), target


class GroundTruthDetector(nn.Module):
    """Predicts each image's own instances, masks included, with score 1: every AP is 1 where scoring reads the
    dataset's targets as they are."""

    def __init__(self, dataset: Pedestrians) -> None:
        super().__init__()
        self.dataset = dataset
        self.roi_heads = type("Heads", (), {"has_mask": lambda self: True, "has_keypoint": lambda self: False})()

    def forward(self, images):
        outputs = []
        for image in images:
            target = self.dataset[round(image[0, 0, 0].item() * 100)][1]
            outputs.append({"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"],
                            "scores": torch.ones(len(target["labels"])),
                            "masks": target["masks"].as_subclass(torch.Tensor)[:, None].float()})
        return outputs


def test_evaluation_without_an_evaluator_scores_a_tutorial_dataset_against_its_own_targets(capsys):
    import utils

    data = Pedestrians()
    loader = torch.utils.data.DataLoader(data, batch_size=1, collate_fn=utils.collate_fn)
    metrics = engine.evaluate(GroundTruthDetector(data), loader, device=CPU)
    assert metrics["bbox"]["AP"] == metrics["segm"]["AP"] == 1.0
    assert "IoU metric: segm" in capsys.readouterr().out


def test_the_tutorials_calls_train_and_evaluate_torchvisions_model(capsys):
    """train_one_epoch(..., epoch, print_freq=...) and evaluate(model, loader, device=...) on a plain DataLoader,
    as torchvision's object detection tutorial calls the reference's."""
    import torchvision

    import utils

    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2,
                                                               min_size=64, max_size=96)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    loader = torch.utils.data.DataLoader(Pedestrians(), batch_size=2, shuffle=True, collate_fn=utils.collate_fn)
    result = train_one_epoch(model, optimizer, loader, CPU, 0, print_freq=1)
    assert result.finished and result.steps_done == 2
    metrics = engine.evaluate(model, torch.utils.data.DataLoader(Pedestrians(2), collate_fn=utils.collate_fn),
                              device=CPU)
    assert set(metrics) == {"bbox", "segm"}
    printed = capsys.readouterr().out
    assert "Epoch: [0]  [1/2]" in printed and "Epoch: [0]  [2/2]" in printed and "IoU metric: segm" in printed
    with pytest.raises(TypeError, match="print_freq and scaler, or options that hold them"):
        train_one_epoch(model, optimizer, loader, CPU, 0, print_freq=1, options=TrainOptions())


def test_images_are_scaled_to_0_1_only_when_they_are_bytes():
    images, _ = engine.to_device([torch.full((3, 2, 2), 255, dtype=torch.uint8), torch.full((3, 2, 2), 0.5)], [], CPU)
    assert images[0].max() == 1.0 and images[1].max() == 0.5, "floats are taken as in [0, 1] already"


class _GroundTruthModel(MaskRCNN):
    """Predicts each image's own instances (the loader's order, one image a call); in training, a loss of its one
    weight. A MaskRCNN by class only, so that the reference's evaluate scores its masks too."""

    def __init__(self, dataset) -> None:
        nn.Module.__init__(self)  # none of Mask R-CNN's layers
        self.weight = nn.Parameter(torch.ones(1))
        self.pending = [dataset.load_target(image_id, []) for image_id in dataset.ids]

    def forward(self, images, targets=None):
        if self.training:
            return {"loss_a": self.weight.sum() * len(images), "loss_b": self.weight.sum() ** 2}
        target = self.pending.pop(0)
        count = len(target["boxes"])
        return [{"boxes": target["boxes"], "labels": target["labels"], "scores": torch.linspace(1.0, 0.5, count),
                 "masks": target["masks"][:, None].float()}]


def test_the_references_engine_runs_on_this_projects_library(dataset, capsys):
    """A script built on torchvision's reference copies its engine.py beside this project's utils, coco_utils,
    coco_eval and group_by_aspect_ratio: its loops run on them (MetricLogger, get_coco_api_from_dataset,
    CocoEvaluator(coco, iou_types) then accumulate and coco_eval), and score as this project's evaluator does."""
    import utils
    from coco_eval import METRIC_NAMES, CocoEvaluator
    from coco_utils import get_coco
    from conftest import load_file_module, reference_checkout
    from group_by_aspect_ratio import GroupedBatchSampler, create_aspect_ratio_groups

    folder = reference_checkout("engine.py")
    if folder is None:
        pytest.skip("torchvision's references/detection is not checked out here")
    reference_engine = load_file_module(folder / "engine.py", "reference_engine")
    train = get_coco(dataset, "train", None)
    sampler = GroupedBatchSampler(range(len(train)), create_aspect_ratio_groups(train, k=3), 4)
    model = _GroundTruthModel(train)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    logger = reference_engine.train_one_epoch(model, optimizer, torch.utils.data.DataLoader(
        train, batch_sampler=sampler, collate_fn=utils.collate_fn), torch.device("cpu"), 0, print_freq=2)
    assert logger.meters["loss"].count == len(sampler) and model.weight.item() < 1.0
    assert "Epoch: [0]  [0/" in capsys.readouterr().out

    val = get_coco(dataset, "val", None)
    loader = torch.utils.data.DataLoader(val, batch_size=1, collate_fn=utils.collate_fn)
    theirs = reference_engine.evaluate(_GroundTruthModel(val), loader, torch.device("cpu"))
    ours = CocoEvaluator(val.coco, category_map=val.category_map)
    model = _GroundTruthModel(val).eval()
    ours.update({image_id: model([None])[0] for image_id in val.ids})
    expected = ours.summarize()
    for iou_type in ("bbox", "segm"):
        assert list(theirs.coco_eval[iou_type].stats) == [expected[iou_type][name] for name in METRIC_NAMES]
    assert expected["bbox"]["AP"] > 0.9
