"""Evaluation parity: the 12 COCO numbers of boxes and masks from our evaluation and from torchvision's
reference, at full precision, for the same checkpoint, data and device, and their largest difference.

    python3 bench/eval_parity.py --data-path D --checkpoint C --reference R [--device cuda] [--min-size 800]

The printed tables of both round to 0.001, which hides whether two runs agree or merely round alike. Each side
runs in its own process (the two share module names), with its own data pipeline and evaluation loop; ours
runs at batch 1 with the evaluation copy and the settings train.py would use on that device; both keep the
run's saved detections per image and RPN score threshold, as --test-only --resume does. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor  # noqa: E402

from common import ROOT, available_device, emit, environment, use_implementation  # noqa: E402

RESULT = "PARITY "


def saved_inference_options(checkpoint: dict) -> dict:
    """The run's own inference settings that its checkpoint keeps, as torchvision's builder takes them: each side
    evaluates as train.py --test-only --resume would."""
    saved = checkpoint.get("args", {})
    names = {"detections_per_image": "box_detections_per_img", "rpn_score_thresh": "rpn_score_thresh",
             "box_score_thresh": "box_score_thresh"}
    return {keyword: saved[flag] for flag, keyword in names.items() if saved.get(flag) is not None}


def stats_of_ours(args, device: torch.device) -> dict[str, list[float]]:
    import presets
    import speedups
    import utils
    from coco_eval import CocoEvaluator, metric_names
    from coco_utils import build_dataset
    from engine import evaluate
    from models import build_from_checkpoint

    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    val = build_dataset(args.data_path, "coco", "val", presets.DetectionPresetEval(), None)
    model = build_from_checkpoint(checkpoint, args.checkpoint, min_size=args.min_size, max_size=args.max_size,
                                  **saved_inference_options(checkpoint))
    loader = torch.utils.data.DataLoader(val, batch_size=1, num_workers=args.workers, collate_fn=utils.collate_fn)
    evaluator = CocoEvaluator(val.coco, ("bbox", "segm"), val.category_map, "auto")
    model = speedups.for_inference(model.to(device), device, speedups.SpeedupConfig())
    metrics = evaluate(model, loader, device, evaluator)
    return {iou_type: [metrics[iou_type][name] for name in metric_names(iou_type)] for iou_type in ("bbox", "segm")}


def stats_of_reference(args, device: torch.device) -> dict[str, list[float]]:
    import presets
    import utils
    from coco_utils import get_coco
    from engine import evaluate

    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    saved = checkpoint.get("args", {})
    settings = {"num_classes": checkpoint["num_classes"], "min_size": args.min_size, "max_size": args.max_size,
             **saved_inference_options(checkpoint)}
    if saved.get("weights") or saved.get("weights_backbone"):  # the layout torchvision builds for ImageNet weights
        resnet = torchvision.models.resnet50(norm_layer=torchvision.ops.FrozenBatchNorm2d)
        layers = saved.get("trainable_backbone_layers")
        model = torchvision.models.detection.MaskRCNN(_resnet_fpn_extractor(resnet, 3 if layers is None else layers),
                                                      **settings)
    else:
        model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **settings)
    # The weights ours evaluates: their moving average where the checkpoint keeps one.
    model.load_state_dict(checkpoint["model_ema"]["model"] if "model_ema" in checkpoint else checkpoint["model"])
    val = get_coco(args.data_path, "val", presets.DetectionPresetEval())
    loader = torch.utils.data.DataLoader(val, batch_size=1, num_workers=args.workers, collate_fn=utils.collate_fn)
    evaluator = evaluate(model.to(device), loader, device)
    return {iou_type: [float(v) for v in evaluator.coco_eval[iou_type].stats] for iou_type in ("bbox", "segm")}


def run_side(side: str, args) -> dict[str, list[float]]:
    """One side's numbers, from a fresh process with that side's modules on the path."""
    command = [sys.executable, __file__, "--side", side, "--data-path", args.data_path, "--checkpoint",
               args.checkpoint, "--reference", args.reference, "--device", args.device, "--min-size",
               str(args.min_size), "--max-size", str(args.max_size), "--workers", str(args.workers)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{side} evaluation failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix(RESULT))


def get_args_parser() -> argparse.ArgumentParser:
    """The command line: the checkpoint, data and sizes both sides evaluate at."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--checkpoint", required=True, help="a train.py checkpoint of a Mask R-CNN")
    parser.add_argument("--reference", required=True, help="folder of torchvision's references/detection")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--side", choices=("ours", "reference"), help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = get_args_parser().parse_args()
    device = available_device(args.device)
    if args.side:
        use_implementation(args.reference if args.side == "reference" else None)
        stats = (stats_of_reference if args.side == "reference" else stats_of_ours)(args, device)
        print(RESULT + json.dumps(stats))
        return
    for name in ("data_path", "checkpoint", "reference"):  # each side runs from the repository's root
        setattr(args, name, str(Path(getattr(args, name)).resolve()))
    ours, reference = run_side("ours", args), run_side("reference", args)
    differences = {kind: max(abs(a - b) for a, b in zip(ours[kind], reference[kind])) for kind in ours}
    emit({"benchmark": "eval_parity", "environment": environment(device), "settings": vars(args),
          "ours": ours, "reference": reference, "largest_difference": differences})


if __name__ == "__main__":
    main()
