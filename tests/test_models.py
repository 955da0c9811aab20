"""Model building and offline weight loading from the torch hub cache or a path."""

import math
from pathlib import Path

import pytest
import torch
import torchvision

from checkpoint import load_model_weights
from coco_utils import CategoryMap
from errors import UserError
from models import (
    MODELS,
    backbone_weights_class,
    build_model,
    category_layers,
    check_size_order,
    default_backbone_weights,
    detections_per_image,
    drop_detections_below,
    evaluation_settings,
    family,
    hub_cache_path,
    iou_types,
    model_options,
    resolve_weights,
)

SMALL = {"min_size": 64, "max_size": 64}


def test_backbone_weights_come_from_the_hub_cache(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    path = resolve_weights("ResNet50_Weights.IMAGENET1K_V1", "--weights-backbone")
    assert path == torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    model = build_model("maskrcnn_resnet50_fpn", 5, None, "ResNet50_Weights.IMAGENET1K_V1", None, **SMALL)
    expected = torch.load(path, weights_only=True)["layer4.2.conv3.weight"]
    assert torch.equal(model.backbone.body.layer4[2].conv3.weight, expected)
    assert isinstance(model.backbone.body.bn1, torchvision.ops.FrozenBatchNorm2d)
    trainable = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}


def test_missing_hub_file_names_path_address_and_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as err:
        build_model("maskrcnn_resnet50_fpn", 5, None, "ResNet50_Weights.IMAGENET1K_V1", None, **SMALL)
    message = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message
    assert "--weights-backbone none" in message and "\n" not in message


def test_missing_coco_weights_same_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match="maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth is missing") as error:
        build_model("maskrcnn_resnet50_fpn", 91, "MaskRCNN_ResNet50_FPN_Weights.COCO_V1", None, None)
    assert "none" not in str(error.value), "--weights none is no choice: only the backbone can start from scratch"
    assert hub_cache_path("https://x/y/z.pth") == tmp_path / "hub" / "checkpoints" / "z.pth"


def test_unknown_weights_name_and_missing_path():
    with pytest.raises(UserError, match="neither a file nor a torchvision weights name"):
        resolve_weights("NoSuchWeights.V9", "--weights")
    with pytest.raises(UserError, match="no such file"):
        resolve_weights("/nowhere/model.pth", "--weights")


def test_weights_named_for_another_model_name_it_before_any_file_is_read():
    with pytest.raises(UserError, match="KeypointRCNN_ResNet50_FPN_Weights.COCO_V1 are weights of "
                                        "keypointrcnn_resnet50_fpn, not of --model maskrcnn_resnet50_fpn: give "
                                        "--model keypointrcnn_resnet50_fpn"):
        build_model("maskrcnn_resnet50_fpn", 91, "KeypointRCNN_ResNet50_FPN_Weights.COCO_V1", None, None)
    with pytest.raises(UserError, match="not a whole detection model's weights .* go to train.py's "
                                        "--weights-backbone"):
        build_model("fasterrcnn_resnet50_fpn", 91, "ResNet50_Weights.IMAGENET1K_V1", None, None)


def test_whole_model_weights_from_path_with_fresh_class_heads(tmp_path):
    torch.manual_seed(0)
    source = build_model("maskrcnn_resnet50_fpn", 91, None, None, None, **SMALL)
    torch.save(source.state_dict(), tmp_path / "coco.pth")
    model = build_model("maskrcnn_resnet50_fpn", 5, str(tmp_path / "coco.pth"), None, None, **SMALL)
    assert torch.equal(model.rpn.head.conv[0][0].weight, source.rpn.head.conv[0][0].weight)
    assert model.roi_heads.box_predictor.cls_score.out_features == 5


def test_weights_of_a_checkpoint_trained_on_other_categories_start_fresh_category_heads(tmp_path):
    """Same class count, names in another order (a file exported again): the heads would predict the wrong ones."""
    torch.manual_seed(0)
    source = build_model("maskrcnn_resnet50_fpn", 3, None, None, None, **SMALL)
    trained = CategoryMap.from_categories([{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}], "coco")
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": source.state_dict(), "args": {"weights_backbone": None, "dataset": "coco"},
                "categories": trained.as_list(), "labels_are_category_ids": False}, path)
    kept = build_model("maskrcnn_resnet50_fpn", 3, str(path), None, None, categories=trained, **SMALL)
    assert torch.equal(kept.roi_heads.box_predictor.cls_score.weight, source.roi_heads.box_predictor.cls_score.weight)
    swapped = CategoryMap.from_categories([{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}], "coco")
    model = build_model("maskrcnn_resnet50_fpn", 3, str(path), None, None, categories=swapped, **SMALL)
    for head in ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_predictor.mask_fcn_logits"):
        ours, theirs = model.roi_heads.get_submodule(head), source.roi_heads.get_submodule(head)
        assert not torch.equal(ours.weight, theirs.weight), head
    assert torch.equal(model.roi_heads.mask_predictor.conv5_mask.weight,
                       source.roi_heads.mask_predictor.conv5_mask.weight), "the layers below the logits are kept"
    with pytest.raises(UserError, match=r"was trained on other categories than this run's \(its label 1 is 'cat', "
                                        r"here 'dog' \(id 1\)\): it would predict them under these names"):
        build_model("maskrcnn_resnet50_fpn", 3, str(path), None, None, new_class_heads=False, categories=swapped,
                    **SMALL)


MASK_RCNN_CATEGORY_LAYERS = ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_predictor.mask_fcn_logits")


@pytest.mark.parametrize("name, layers", [
    ("maskrcnn_resnet50_fpn", {f"roi_heads.{layer}.{kind}" for layer in MASK_RCNN_CATEGORY_LAYERS
                               for kind in ("weight", "bias")}),
    ("keypointrcnn_resnet50_fpn", {f"roi_heads.box_predictor.{layer}.{kind}" for layer in ("cls_score", "bbox_pred")
                                   for kind in ("weight", "bias")}),  # its keypoint head stands for keypoints
    ("retinanet_resnet50_fpn", {"head.classification_head.cls_logits.weight",
                                "head.classification_head.cls_logits.bias"}),  # not the 4 convolutions below
    ("ssdlite320_mobilenet_v3_large", {f"head.classification_head.module_list.{level}.1.{kind}"
                                       for level in range(6) for kind in ("weight", "bias")}),
])
def test_the_category_layers_are_those_whose_rows_stand_for_classes(name, layers):
    assert category_layers(name, 4) == layers


def test_mismatch_names_first_key():
    model = build_model("maskrcnn_resnet50_fpn", 5, None, None, None, **SMALL)
    state = model.state_dict()
    state["rpn.head.cls_logits.weight"] = torch.zeros(1, 256, 1, 1)
    with pytest.raises(UserError, match="rpn.head.cls_logits.weight has shape"):
        load_model_weights(model, state, "--resume x")
    del state["rpn.head.cls_logits.weight"]
    with pytest.raises(UserError, match="no tensor rpn.head.cls_logits.weight"):
        load_model_weights(model, state, "--resume x")


def test_a_tensor_the_model_lacks_is_an_error_and_a_spare_batch_counter_is_not():
    """A Mask R-CNN file loaded into a Faster R-CNN would otherwise lose its mask head without a word."""
    model = build_model("fasterrcnn_resnet50_fpn", 5, None, None, None, pretrained_layout=True, **SMALL)
    state = dict(model.state_dict())
    assert "backbone.body.bn1.num_batches_tracked" not in state, "frozen batch norm keeps no counter"
    state["backbone.body.bn1.num_batches_tracked"] = torch.tensor(7)  # ordinary batch norm's, frozen has none
    load_model_weights(model, state, "--weights x")
    state["roi_heads.mask_predictor.mask_fcn_logits.weight"] = torch.zeros(5, 256, 1, 1)
    with pytest.raises(UserError, match="unexpected tensor roi_heads.mask_predictor.mask_fcn_logits.weight"):
        load_model_weights(model, state, "--weights x")


@pytest.mark.parametrize("name, default", [("maskrcnn_resnet50_fpn", 100), ("retinanet_resnet50_fpn", 300),
                                           ("fcos_resnet50_fpn", 100), ("ssdlite320_mobilenet_v3_large", 300)])
def test_detections_per_image_reaches_each_familys_builder(name, default):
    assert detections_per_image(build_model(name, 3, None, None, None)) == default
    model = build_model(name, 3, None, None, None, **model_options(name, detections_per_image=250))
    assert detections_per_image(model) == 250


@pytest.mark.parametrize("name, sizes, detections, rpn, score", [
    ("maskrcnn_resnet50_fpn", (800, 1333), 100, 0.0, 0.05), ("retinanet_resnet50_fpn", (800, 1333), 300, None, 0.05),
    ("fcos_resnet50_fpn", (800, 1333), 100, None, 0.2), ("ssdlite320_mobilenet_v3_large", (320, 320), 300, None, 1e-3)])
def test_evaluation_settings_are_the_models_own_defaults_included(name, sizes, detections, rpn, score):
    expected = {"min_size": sizes[0], "max_size": sizes[1], "detections_per_image": detections,
                "rpn_score_thresh": rpn, "box_score_thresh": score}
    assert evaluation_settings(build_model(name, 3, None, None, None)) == expected
    assert evaluation_settings(build_model(name, 3, None, None, None, **model_options(name, box_score_thresh=1e-4))
                               ) == {**expected, "box_score_thresh": 1e-4}, "each family's builder takes it"
    if rpn is not None:
        given = model_options(name, min_size=64, max_size=96, rpn_score_thresh=0.25, detections_per_image=7)
        assert evaluation_settings(build_model(name, 3, None, None, None, **given)) == {
            "min_size": 64, "max_size": 96, "detections_per_image": 7, "rpn_score_thresh": 0.25,
            "box_score_thresh": score}


def test_unknown_model():
    with pytest.raises(UserError, match="--model nope"):
        build_model("nope", 5, None, None, None)


@pytest.fixture(scope="module")
def batches(dataset, keypoint_dataset):
    """A training batch of two samples and one evaluation sample, of the shapes and of the figures."""
    from coco_utils import build_dataset

    found = {}
    for name, root, kind in (("shapes", dataset, "coco"), ("figures", keypoint_dataset, "coco_kp")):
        train = build_dataset(root, kind, "train", None)
        val = build_dataset(root, kind, "val", None, train.category_map)
        found[name] = ([train[i] for i in range(2)], val, train.category_map)
    return found


@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_a_step_and_evaluates(name, batches, capsys):
    import speedups
    from coco_eval import CocoEvaluator
    from conftest import with_speedups
    from engine import evaluate, to_device

    samples, val, category_map = batches["figures" if name.startswith("keypoint") else "shapes"]
    torch.manual_seed(0)
    model = build_model(name, category_map.num_classes, None, None, None,
                        **model_options(name, min_size=96 if family(name) != "ssd" else None,
                                        max_size=128 if family(name) != "ssd" else None))
    images, targets = to_device([s[0] for s in samples], [s[1] for s in samples], torch.device("cpu"))
    for target in targets:
        target.pop("faults")
    model = with_speedups(model, channels_last=True).train()  # as train.py prepares it on the CPU
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001)
    sum(losses.values()).backward()
    optimizer.step()

    one = torch.utils.data.Subset(val, [0])
    loader = torch.utils.data.DataLoader(one, batch_size=1, collate_fn=lambda b: tuple(zip(*b)))
    loader.dataset.coco = val.coco  # the evaluator reads the ground truth of the images it saw
    evaluator = CocoEvaluator(val.coco, iou_types(name), category_map)
    eval_model = speedups.for_inference(model, torch.device("cpu"), speedups.SpeedupConfig(channels_last=True))
    metrics = evaluate(eval_model, loader, torch.device("cpu"), evaluator)
    assert list(metrics) == list(iou_types(name))
    printed = capsys.readouterr().out
    for iou_type in iou_types(name):
        assert f"IoU metric: {iou_type}" in printed


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn", "retinanet_resnet50_fpn"])
def test_detections_dropped_below_a_score_by_the_model_are_those_its_caller_drops(name):
    torch.manual_seed(0)
    fewer = {"rpn_post_nms_top_n_test": 40} if "rcnn" in name else {}  # regions to run the heads on
    model = build_model(name, 4, None, None, None, **model_options(name, min_size=128, max_size=128), **fewer).eval()
    getattr(model, "roi_heads", model).detections_per_img = 10**5  # no cut to the most: every score comes out
    image = torch.rand(3, 128, 128)
    with torch.no_grad():
        for key, parameter in model.named_parameters():  # fresh class heads give every detection one score
            if "cls_score" in key or "classification_head" in key:
                parameter.add_(torch.randn_like(parameter) * 0.01)
        drop_detections_below(model, detections_below(model) / 2)  # under its own: lower ones come too
        every = model([image])[0]
        ranked = every["scores"].sort(descending=True).values
        assert len(ranked) > 4
        for place in (len(ranked) // 2, 3 * len(ranked) // 4):  # the second lower: the model's threshold falls
            score = ranked[place].item()
            assert ranked[place + 1] < score, "an equal score at the cut would keep others by chance"
            drop_detections_below(model, score)
            kept = model([image])[0]
            assert len(kept["scores"]) == place + 1 and kept["scores"].min() == score
            for key, value in every.items():
                assert torch.equal(kept[key], value[every["scores"] >= score]), key


@pytest.mark.parametrize("name", ["fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large"])
def test_every_family_takes_a_score_floor_above_or_below_its_own(name):
    model = build_model(name, 4, None, None, None)
    own = detections_below(model)
    drop_detections_below(model, 0.5)
    assert 0.4999 < detections_below(model) < 0.5
    drop_detections_below(model, own / 2)
    assert own / 2 - 1e-6 < detections_below(model) < own / 2, "lowered when asked"


def detections_below(model: torch.nn.Module) -> float:
    return getattr(model, "roi_heads", model).score_thresh


def test_each_family_takes_only_its_options():
    assert model_options("maskrcnn_resnet50_fpn", min_size=96, rpn_score_thresh=None) == {"min_size": 96}
    with pytest.raises(UserError, match="--min-size does not apply to --model ssd300_vgg16"):
        model_options("ssd300_vgg16", min_size=96)
    with pytest.raises(UserError, match="--rois-per-image does not apply to --model fcos_resnet50_fpn"):
        model_options("fcos_resnet50_fpn", box_batch_size_per_image=64)
    assert model_options("maskrcnn_resnet50_fpn", min_size=800, max_size=600) == {"min_size": 800, "max_size": 600}


def test_sizes_given_together_must_let_the_short_side_reach_min_size():
    check_size_order(96, 96)
    check_size_order(800, None)
    with pytest.raises(UserError, match="--max-size 600 is below --min-size 800: .* give --max-size at least"):
        check_size_order(800, 600)
    assert iou_types("keypointrcnn_resnet50_fpn") == ("bbox", "keypoints")
    assert iou_types("retinanet_resnet50_fpn_v2") == ("bbox",)


def test_default_backbones_are_those_of_torchvision_recipes():
    for name in MODELS:
        expected = ("VGG16_Weights.IMAGENET1K_FEATURES" if "vgg16" in name else
                    "MobileNet_V3_Large_Weights.IMAGENET1K_V1" if "mobilenet" in name else
                    "ResNet50_Weights.IMAGENET1K_V1")
        assert default_backbone_weights(name) == expected, name
        assert isinstance(torchvision.models.get_weight(expected), backbone_weights_class(name)), name


def test_backbone_file_of_another_network_names_the_first_stray_key(tmp_path):
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), tmp_path / "mobilenet.pth")
    stray = r'does not fit the backbone of maskrcnn_resnet50_fpn: .*"features\.0\.0\.weight"$'
    with pytest.raises(UserError, match=stray):
        build_model("maskrcnn_resnet50_fpn", 3, None, str(tmp_path / "mobilenet.pth"), None)


def test_mobilenet_backbone_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_weight(default_backbone_weights("fasterrcnn_mobilenet_v3_large_320_fpn"))
    torch.manual_seed(1)
    state = torchvision.models.mobilenet_v3_large().state_dict()
    hub_cache_path(weights.url).parent.mkdir(parents=True)
    torch.save(state, hub_cache_path(weights.url))
    model = build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3, None, str(weights), None)
    assert torch.equal(model.backbone.body["0"][0].weight, state["features.0.0.weight"])
    assert isinstance(model.backbone.body["0"][1], torchvision.ops.FrozenBatchNorm2d)


def test_an_existing_file_is_a_path_whatever_its_name(tmp_path, monkeypatch):
    """A file without a .pth or .pt suffix, named without a folder, is still taken as the file it is."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(3)
    state = torchvision.models.mobilenet_v3_large().state_dict()
    torch.save(state, "backbone.pth.tar")
    assert resolve_weights("backbone.pth.tar", "--weights-backbone").samefile(tmp_path / "backbone.pth.tar")
    model = build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3, None, "backbone.pth.tar", None, **SMALL)
    assert torch.equal(model.backbone.body["0"][0].weight, state["features.0.0.weight"])
    with pytest.raises(UserError, match="neither a file nor a torchvision weights name"):
        resolve_weights("backbone.tar", "--weights-backbone")  # not there: a name, and not one torchvision has
    # A name whose first part is one of torchvision.models' functions: get_weight raised TypeError on it.
    with pytest.raises(UserError, match="neither a file nor a torchvision weights name"):
        resolve_weights("resnet50.tar", "--weights-backbone")
    torch.save(state, "resnet50.tar")
    assert resolve_weights("resnet50.tar", "--weights-backbone").samefile(tmp_path / "resnet50.tar")


def test_a_file_named_like_torchvision_weights_does_not_shadow_them(torch_home, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.chdir(tmp_path)
    Path("ResNet50_Weights.IMAGENET1K_V1").write_text("not weights")
    path = resolve_weights("ResNet50_Weights.IMAGENET1K_V1", "--weights-backbone")
    assert path == torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"


def test_coco_weights_by_name_for_another_family(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    name = "RetinaNet_ResNet50_FPN_Weights.COCO_V1"
    with pytest.raises(UserError, match="retinanet_resnet50_fpn_coco-eeacb38b.pth is missing"):
        build_model("retinanet_resnet50_fpn", 91, name, None, None)
    torch.manual_seed(2)
    source = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None)
    path = hub_cache_path(torchvision.models.get_weight(name).url)
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    model = build_model("retinanet_resnet50_fpn", 91, name, None, None)
    assert torch.equal(model.head.classification_head.cls_logits.weight,
                       source.head.classification_head.cls_logits.weight)
    fine_tuned = build_model("retinanet_resnet50_fpn", 4, name, None, None)
    assert fine_tuned.head.classification_head.cls_logits.out_channels == 4 * 9


def test_backbone_weights_of_another_kind_are_refused():
    with pytest.raises(UserError, match="IMAGENET1K_V1 does not fit the model, which takes VGG16_Weights"):
        build_model("ssd300_vgg16", 3, None, "ResNet50_Weights.IMAGENET1K_V1", None)


def test_a_builder_that_reads_no_weights_through_the_reader_is_a_clear_error(torch_home, monkeypatch):
    """Should a torchvision builder stop fetching backbone weights through WeightsEnum.get_state_dict, the file
    the user named would be ignored without a word: the guard says so instead."""
    import models

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    builder = torchvision.models.get_model

    def fetching_another_way(name, **kwargs):
        return builder(name, **{**kwargs, "weights_backbone": None})

    monkeypatch.setattr(models.torchvision.models, "get_model", fetching_another_way)
    with pytest.raises(UserError, match="did not read its backbone weights through WeightsEnum.get_state_dict, "
                                        "so --weights-backbone ResNet50_Weights.IMAGENET1K_V1 would be ignored"):
        build_model("maskrcnn_resnet50_fpn", 5, None, "ResNet50_Weights.IMAGENET1K_V1", None, **SMALL)


def test_fresh_mask_logits_start_at_one_scale_whatever_the_class_count():
    target = math.sqrt(2 / 91)  # torchvision's fan-out rule for COCO's 91 classes
    for classes in (3, 5, 30):
        torch.manual_seed(0)
        model = build_model("maskrcnn_resnet50_fpn", classes, None, None, None, mask_init=True, **SMALL)
        assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.std().item() == pytest.approx(target, rel=0.1)
    torch.manual_seed(0)
    plain = build_model("maskrcnn_resnet50_fpn", 5, None, None, None, **SMALL)
    assert plain.roi_heads.mask_predictor.mask_fcn_logits.weight.std().item() == pytest.approx(
        math.sqrt(2 / 5), rel=0.1), "torchvision's own, without mask_init"
    models = []
    for mask_init in (False, True):
        torch.manual_seed(0)
        models.append(build_model("maskrcnn_resnet50_fpn", 91, None, None, None, mask_init=mask_init, **SMALL))
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))


@pytest.mark.parametrize("run_weights_backbone, norm, conv1_trains", [
    (None, torch.nn.BatchNorm2d, True),  # a run from scratch: batch norm that trains, every stage training
    ("ResNet50_Weights.IMAGENET1K_V1", torchvision.ops.FrozenBatchNorm2d, False),  # the pretrained layout
])
def test_weights_from_one_of_our_checkpoints_build_the_layout_of_its_run(tmp_path, run_weights_backbone, norm,
                                                                          conv1_trains):
    """Frozen batch norm under weights trained with batch statistics (or the reverse) would change the model."""
    torch.manual_seed(0)
    source = build_model("fasterrcnn_resnet50_fpn", 3, None, None, None,
                         pretrained_layout=run_weights_backbone is not None)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": source.state_dict(), "args": {"weights": None, "weights_backbone": run_weights_backbone}},
               path)
    model = build_model("fasterrcnn_resnet50_fpn", 3, str(path), None, None)
    assert type(model.backbone.body.bn1) is norm
    assert model.backbone.body.conv1.weight.requires_grad is conv1_trains
    assert torch.equal(model.backbone.body.layer4[0].conv1.weight, source.backbone.body.layer4[0].conv1.weight)
