"""Prediction pictures and training curves."""

import pytest
import torch
from PIL import Image

from coco_utils import CategoryMap
from errors import UserError
from visualize import curves_figure, plot_curves, save_jpeg, side_by_side


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


def test_long_thin_and_huge_images_make_pictures_that_fit_a_jpeg(tmp_path):
    """A strip 40 px high was enlarged 8x along its 4,000 px too (and past 65,500 px, JPEG's limit, PIL refused
    to save it, which ended a run at its first evaluation)."""
    cmap = CategoryMap.from_categories([{"id": 1, "name": "crack"}], "other")
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    strip = side_by_side(torch.zeros((3, 40, 4000), dtype=torch.uint8), dict(empty), dict(empty), cmap)
    assert strip.shape[1:] == (40, 8008), "not enlarged: its long side is near the limit already"
    wide = torch.zeros((3, 8, 70000), dtype=torch.uint8)
    save_jpeg(wide, tmp_path / "wide.jpg")
    with Image.open(tmp_path / "wide.jpg") as saved:
        assert saved.size == (35000, 4), "every second pixel"


def test_curves_png(tmp_path):
    train = [{"type": "train", "epoch": e, "global_step": 10 * e + s, "lr": 0.01, "loss": 3.0 / (s + 1),
              "loss_mask": 1.0 / (s + 1)} for e in range(2) for s in range(1, 11)]
    evals = [{"type": "eval", "epoch": e, "bbox": {"AP": 0.1 * e}, "segm": {"AP": 0.08 * e}} for e in range(2)]
    path = plot_curves(train, evals, tmp_path / "curves.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (1200, 320)
        assert len(img.convert("RGB").getcolors(1 << 20)) > 50, "curves, labels and ticks drawn, not a blank page"


def test_labels_without_a_category_are_not_drawn():
    image = torch.full((3, 320, 320), 128, dtype=torch.uint8)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    output = {"boxes": torch.tensor([[10.0, 10.0, 100.0, 100.0]]), "labels": torch.tensor([9]),
              "scores": torch.tensor([0.99])}
    cmap = CategoryMap.from_categories([{"id": 3, "name": "square"}, {"id": 7, "name": "disc"}], "other")
    picture = side_by_side(image, target, output, cmap)
    assert torch.equal(picture[:, :280, 328:], image[:, :280]), "label 9 of a 3-class map is no category"


def test_labels_in_a_font_sized_to_the_picture_and_the_threshold_written(tmp_path):
    from visualize import font_path, font_size

    assert font_path() and font_path().endswith(".ttf"), "matplotlib's DejaVu Sans"
    assert font_size(torch.zeros(3, 320, 480)) == 11 and font_size(torch.zeros(3, 640, 800)) == 22
    image = torch.full((3, 320, 320), 128, dtype=torch.uint8)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    output = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    cmap = CategoryMap.from_categories([{"id": 3, "name": "square"}], "other")
    low, high = (side_by_side(image, target, output, cmap, score_thresh=t) for t in (0.3, 0.7))
    assert not torch.equal(low[:, 300:, 328:], high[:, 300:, 328:]), "the threshold is written on the picture"
    assert torch.equal(low[:, :, :320], high[:, :, :320])


def test_a_run_of_one_logged_step_draws_its_point():
    one = [{"type": "train", "epoch": 0, "global_step": 4, "lr": 0.01, "loss": 2.0, "loss_mask": 0.7}]
    fig = curves_figure(one, [{"epoch": 0, "bbox": {"AP": 0.1}}])
    drawn = fig.axes[0].lines + fig.axes[1].lines + fig.axes[2].lines
    assert len(drawn) == 4 and all(line.get_marker() not in (None, "None", "") for line in drawn)
    fig = curves_figure([*one, {**one[0], "global_step": 8}], [])
    assert all(line.get_marker() == "None" for line in fig.axes[0].lines), "two points make lines"


def test_aps_of_other_validation_data_are_a_line_of_their_own():
    """A run resumed on another validation file: its APs measure another set, so one line through both misleads."""
    train = [{"type": "train", "epoch": 0, "global_step": s, "lr": 0.01, "loss": 1.0 / s} for s in range(1, 5)]
    evals = [{"epoch": e, "validation": data, "bbox": {"AP": 0.1 * e}, "segm": {"AP": 0.05 * e}}
             for e, data in enumerate(["a", "a", "b", "b", "b"])]
    evals.insert(0, {"epoch": -1, "bbox": {"AP": 0.01}, "segm": {"AP": 0.0}})  # an older record, no digest
    lines = curves_figure(train, evals).axes[2].lines
    solid = {line.get_label(): list(line.get_xdata()) for line in lines if line.get_linestyle() == "-"}
    dashed = [(line.get_label(), list(line.get_xdata())) for line in lines if line.get_linestyle() == "--"]
    assert solid == {"box AP": [-1, 2, 3, 4], "mask AP": [-1, 2, 3, 4]}, "the last evaluation's data, solid"
    assert dashed == [("box AP, other validation data", [0, 1]), ("mask AP, other validation data", [0, 1])]
    lines = curves_figure(train, [{**r, "validation": "a"} for r in evals]).axes[2].lines
    assert [line.get_linestyle() for line in lines] == ["-", "-"], "one data set: one line each, as before"


def test_pictures_and_curves_are_written_whole_or_not_at_all(tmp_path, full_disk):
    picture = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    save_jpeg(picture, tmp_path / "epoch_1" / "a.jpg")
    good = (tmp_path / "epoch_1" / "a.jpg").read_bytes()
    train = [{"type": "train", "epoch": 0, "global_step": s, "lr": 0.01, "loss": 1.0 / s} for s in range(1, 5)]
    plot_curves(train, [], tmp_path / "curves.png")
    curves = (tmp_path / "curves.png").read_bytes()
    full_disk(100)
    with pytest.raises(UserError, match=r"could not write .*a\.jpg: no space left on the device; free space in"):
        save_jpeg(torch.zeros_like(picture), tmp_path / "epoch_1" / "a.jpg")
    with pytest.raises(UserError, match=r"could not write .*curves\.png: no space left on the device; the "
                                        r"checkpoints written so far are intact"):
        plot_curves(train[:2], [], tmp_path / "curves.png")
    assert (tmp_path / "epoch_1" / "a.jpg").read_bytes() == good and (tmp_path / "curves.png").read_bytes() == curves
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.jpg", "curves.png", "epoch_1"], "no temporary file"


@pytest.mark.parametrize("color, text", [((255, 225, 25), (0, 0, 0)), ((0, 0, 128), (255, 255, 255))])
def test_a_label_is_written_in_black_or_white_on_its_boxs_colour(color, text):
    from visualize import draw_instances

    image = torch.full((3, 200, 200), 128, dtype=torch.uint8)
    drawn = draw_instances(image, torch.tensor([[40.0, 60.0, 180.0, 180.0]]), ["square"], None, [color])
    label = drawn[:, 62:80, 42:100].flatten(1).T.tolist()  # inside the box's top left corner, where it sits
    assert label.count(list(color)) > 100 and label.count(list(text)) > 10, "on the box's colour, in a contrast"


def _block_font(path, characters: str) -> str:
    """A TrueType font drawing each of the characters as a filled block (no CJK font is installed here)."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    names = {ord(c): f"u{ord(c):04X}" for c in characters}
    order = [".notdef", *names.values()]

    def block():
        pen = TTGlyphPen(None)
        pen.moveTo((100, 0))
        pen.lineTo((100, 700))
        pen.lineTo((500, 700))
        pen.lineTo((500, 0))
        pen.closePath()
        return pen.glyph()

    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder(order)
    builder.setupCharacterMap(names)
    builder.setupGlyf({name: block() for name in order})
    builder.setupHorizontalMetrics({name: (600, 100) for name in order})
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": "Blocks", "styleName": "Regular"})
    builder.setupOS2()
    builder.setupPost()
    builder.save(str(path))
    return str(path)


@pytest.fixture
def fonts(monkeypatch):
    """matplotlib's font list, restored afterwards, and label_font's choices forgotten before and after."""
    from matplotlib import font_manager

    import visualize

    monkeypatch.setattr(font_manager.fontManager, "ttflist", list(font_manager.fontManager.ttflist))
    monkeypatch.setattr(visualize, "_SAID_MISSING", set())
    visualize._font_having.cache_clear()
    yield font_manager.fontManager
    visualize._font_having.cache_clear()


def test_labels_of_other_scripts_are_written_in_an_installed_font_that_has_them(fonts, tmp_path, capsys,
                                                                                 monkeypatch):
    import visualize
    from visualize import draw_instances, font_path, label_font

    assert label_font(["square 0.93", "disc"]) == font_path(), "DejaVu Sans has them"
    blocks = _block_font(tmp_path / "blocks.ttf", "猫狗 0123456789.")
    fonts.addfont(blocks)
    assert label_font(["猫 0.93", "狗"]) == blocks
    assert capsys.readouterr().out == ""

    def white_pixels() -> int:
        image = torch.zeros(3, 64, 64, dtype=torch.uint8)
        drawn = draw_instances(image, torch.tensor([[2.0, 30.0, 60.0, 60.0]]), ["猫"], None, [(0, 0, 0)])
        return int((drawn == 255).all(0).sum())

    in_blocks = white_pixels()
    monkeypatch.setattr(visualize, "label_font", lambda texts: font_path())
    assert in_blocks > 2 * white_pixels() > 0, "a filled block, not DejaVu's outline of a missing glyph"


def test_characters_no_installed_font_has_are_said_once_with_the_fix(fonts, capsys):
    from visualize import font_path, label_font

    fonts.ttflist[:] = [entry for entry in fonts.ttflist if "DejaVu" in entry.name or "Last Resort" in entry.name]
    assert any("Last Resort" in entry.name for entry in fonts.ttflist), "matplotlib's own placeholder font"
    assert label_font(["猫 0.93"]) == font_path() == label_font(["猫狗"]), "not Last Resort's block-name glyphs"
    out = capsys.readouterr().out
    assert out.count("note: no installed font draws") == 2 and "'猫'" in out and "'狗'" in out, "each once"
    assert "install a font that has them (Noto Sans CJK" in out
