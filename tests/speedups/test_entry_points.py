"""The speed-up layer's entry points: torchvision's plain model and ours agree to float rounding in training and
evaluation, the device defaults, and a speed-up whose torchvision coupling broke is left off, said once."""

import copy

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops.misc import FrozenBatchNorm2d

import speedups
from errors import UserError
from models import build_model

CPU = torch.device("cpu")


def test_layout_and_buckets_follow_the_device_unless_asked_and_none_without_speedups():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    default = speedups.SpeedupConfig()
    assert default.use_channels_last(cpu) and not default.use_channels_last(cuda)
    assert default.use_shape_buckets(cuda) and not default.use_shape_buckets(cpu)
    asked = speedups.SpeedupConfig(channels_last=True, shape_buckets=False)
    assert asked.use_channels_last(cuda) and not asked.use_shape_buckets(cuda)
    assert not speedups.PLAIN.use_channels_last(cpu) and not speedups.PLAIN.use_shape_buckets(cuda)
    assert default.use_fused_optimizer(cuda) and not default.use_fused_optimizer(cpu)
    assert not speedups.PLAIN.use_fused_optimizer(cuda)
    with pytest.raises(UserError, match="--no-speedups .* --channels-last would change; give one of the two"):
        speedups.SpeedupConfig(enabled=False, channels_last=True)


def test_every_speedup_passes_its_self_check_on_this_torchvision():
    for speedup in (*speedups.TRAINING, speedups.CHANNELS_LAST, speedups.CPU_CONV_GRADIENTS, speedups.CPU_WINOGRAD,
                    speedups.SHAPE_BUCKETS, speedups.INFERENCE_FOLD):
        assert speedup.self_check() is None, speedup.name


def pair(shape_buckets: bool, **options):
    """torchvision's plain model and the same weights with the speed-ups (channels-last too, and shape buckets
    if asked), pretrained layout: frozen norms with statistics far from the identity."""
    torch.manual_seed(0)
    plain = build_model("maskrcnn_resnet50_fpn", 4, None, None, None, pretrained_layout=True, min_size=96,
                        max_size=128, **options)
    for module in plain.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.reset_parameters()
        if isinstance(module, FrozenBatchNorm2d):  # the pretrained layout is built without reading values
            for name, low, high in (("weight", 0.5, 1.5), ("bias", -0.2, 0.2), ("running_mean", -0.2, 0.2),
                                    ("running_var", 0.5, 2.0)):
                getattr(module, name).uniform_(low, high)
    fast = speedups.for_training(copy.deepcopy(plain), CPU, speedups.SpeedupConfig(True, True, shape_buckets))
    assert len(speedups.applied(fast)) == 16 + shape_buckets  # all but the GPU's level pooling
    return plain, fast


WINOGRAD_PATHS = ["winograd_everywhere", "tiles_everywhere"]


@pytest.mark.parametrize("everywhere", WINOGRAD_PATHS)
def test_a_training_step_gives_torchvisions_losses_and_gradients(everywhere, request):
    calls = request.getfixturevalue(everywhere)
    # Shape buckets pad training images, which changes features near their edges: off, as on CPUs by default.
    plain, fast = pair(shape_buckets=False)
    calls.clear()  # what the self-checks ran
    images = [torch.rand(3, 90, 120), torch.rand(3, 100, 80)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1]),
                "masks": torch.zeros((1, 90, 120), dtype=torch.uint8)},
               {"boxes": torch.tensor([[5.0, 20.0, 70.0, 90.0], [30.0, 5.0, 50.0, 30.0]]),
                "labels": torch.tensor([2, 3]), "masks": torch.ones((2, 100, 80), dtype=torch.uint8)}]
    results = []
    for model in (plain, fast):
        torch.manual_seed(1)  # the same proposal sampling
        losses = model.train()(images, targets)
        sum(losses.values()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.item() for k, v in losses.items()}, grads))
    (plain_losses, plain_grads), (fast_losses, fast_grads) = results
    assert fast_losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-5)
    assert list(fast_grads) == list(plain_grads)
    for name, grad in plain_grads.items():
        scale = grad.abs().max().clamp(min=1e-3)
        torch.testing.assert_close(fast_grads[name] / scale, grad / scale, rtol=0, atol=2e-3, msg=name)


@pytest.mark.parametrize("everywhere", WINOGRAD_PATHS)
def test_evaluation_gives_torchvisions_predictions(everywhere, request):
    calls = request.getfixturevalue(everywhere)
    plain, fast = pair(shape_buckets=True, box_score_thresh=0.0)
    calls.clear()
    images = [torch.rand(3, 90, 120), torch.rand(3, 70, 100)]
    with torch.inference_mode():
        expected = speedups.for_inference(plain, CPU, speedups.PLAIN)(images)
        got = speedups.for_inference(fast, CPU, speedups.SpeedupConfig(True, True, True))(images)
    for theirs, ours in zip(expected, got):
        assert len(theirs["boxes"]) > 10
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=0, atol=1e-4)
        assert torch.equal(ours["labels"], theirs["labels"])
        assert (ours["masks"] - theirs["masks"]).abs().max() < 1e-3


def test_only_the_speedups_that_changed_the_model_are_listed():
    """On the CPU the sparse pooler takes the poolers, so level pooling finds none to change; for a GPU it does.
    Without frozen norms (no ImageNet layout) there is nothing for their folding."""
    model = build_model("maskrcnn_resnet50_fpn", 3, None, None, None)

    def names(device: str) -> list[str]:
        return speedups.applied(speedups.for_training(copy.deepcopy(model), torch.device(device),
                                                      speedups.SpeedupConfig(shape_buckets=False)))

    on_cpu, on_gpu = names("cpu"), names("meta")
    assert "sparse RoIAlign on the CPU" in on_cpu and "region pooling levels read once" not in on_cpu
    assert "region pooling levels read once" in on_gpu and "sparse RoIAlign on the CPU" not in on_gpu
    assert "frozen norms folded into convolutions" not in on_cpu + on_gpu
    assert "anchors kept per shape" in on_cpu and "anchors kept per shape" in on_gpu


def test_under_autocast_the_float32_only_speedups_are_not_chosen_and_not_claimed():
    """Winograd's convolutions and the channels-last gradients run on float32 without autocast only: under
    --amp on the CPU they would be listed and never run."""
    model = build_model("fasterrcnn_mobilenet_v3_large_fpn", 3, None, None, None)
    float32_only = {"Winograd 3x3 convolutions on the CPU", "convolution gradients for channels-last on the CPU"}
    for autocast in (False, True):
        names = set(speedups.applied(speedups.for_training(copy.deepcopy(model), torch.device("cpu"),
                                                           speedups.SpeedupConfig(autocast=autocast))))
        assert (float32_only <= names) is not autocast and bool(float32_only & names) is not autocast
        assert "channels-last layout" in names


def test_the_self_checks_leave_the_seeded_random_sequence_as_it_was():
    """A run's draws after the speed-ups are applied follow its --seed, not the self-checks' examples."""
    model = build_model("maskrcnn_resnet50_fpn", 3, None, None, None, min_size=64, max_size=96)
    speedups._problem.cache_clear()
    try:
        torch.manual_seed(123)
        state = torch.get_rng_state()
        speedups.for_training(model, CPU, speedups.SpeedupConfig())
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        speedups._problem.cache_clear()


def test_a_broken_coupling_leaves_torchvisions_behaviour_and_says_so_once(monkeypatch, capsys):
    """A torchvision whose AnchorGenerator gave each image its own, different anchors would make the cache
    wrong: the self-check finds it, and the generator is left as torchvision's."""
    original = AnchorGenerator.forward

    def per_image_anchors(self, image_list, feature_maps):
        return [a + i for i, a in enumerate(original(self, image_list, feature_maps))]

    monkeypatch.setattr(AnchorGenerator, "forward", per_image_anchors)
    speedups._problem.cache_clear()
    try:
        models = [build_model("retinanet_resnet50_fpn", 3, None, None, None) for _ in range(2)]
        for model in models:
            speedups.for_training(model, CPU, speedups.SpeedupConfig(channels_last=False))
    finally:
        speedups._problem.cache_clear()
    printed = capsys.readouterr().out
    assert printed.count("speed-up off (anchors kept per shape): torchvision's AnchorGenerator no longer gives "
                         "one equal set of anchors per image; torchvision's own code runs instead") == 1
    assert all(type(m.anchor_generator) is AnchorGenerator for m in models)
    assert "anchors kept per shape" not in speedups.applied(models[0])
    assert "box coder without blocking copies to the device" in speedups.applied(models[0])
