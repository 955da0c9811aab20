"""Prediction pictures and training curves."""

import torch
from PIL import Image

from coco_utils import CategoryMap
from visualize import plot_curves, side_by_side


def test_side_by_side_draws_truth_and_prediction():
    image = torch.full((3, 40, 60), 128, dtype=torch.uint8)
    masks = torch.zeros(1, 40, 60, dtype=torch.uint8)
    masks[0, 10:20, 10:30] = 1
    target = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 20.0]]), "labels": torch.tensor([1]), "masks": masks}
    output = {"boxes": torch.tensor([[11.0, 10.0, 30.0, 21.0], [0.0, 0.0, 5.0, 5.0]]),
              "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.1]),
              "masks": masks[:, None].float().repeat(2, 1, 1, 1)}
    cmap = CategoryMap.from_categories([{"id": 3, "name": "square"}, {"id": 7, "name": "disc"}], "other")
    picture = side_by_side(image, target, output, cmap, score_thresh=0.5)
    assert picture.shape == (3, 320, 968) and picture.dtype == torch.uint8, "enlarged 8x: 40 px is small"
    left, right = picture[:, :, :480], picture[:, :, 488:]
    assert not torch.equal(left[:, 120, 160], image[:, 15, 20]), "ground-truth mask drawn"
    assert not torch.equal(right[:, 120, 160], image[:, 15, 20]), "predicted mask drawn"
    assert torch.equal(right[:, 16, 16], image[:, 2, 2]), "detections under the threshold left out"


def test_curves_png(tmp_path):
    train = [{"type": "train", "epoch": e, "global_step": 10 * e + s, "lr": 0.01, "loss": 3.0 / (s + 1),
              "loss_mask": 1.0 / (s + 1)} for e in range(2) for s in range(1, 11)]
    evals = [{"type": "eval", "epoch": e, "bbox": {"AP": 0.1 * e}, "segm": {"AP": 0.08 * e}} for e in range(2)]
    path = plot_curves(train, evals, tmp_path / "curves.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (1200, 320)
