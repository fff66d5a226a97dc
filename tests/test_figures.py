"""Figures: grid layout, write-window geometry against the attention maths, GIF/PNG files, loss plots."""

import ast
import inspect
import json
import math
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from draw import figures
from draw.kernels import reference

RED = np.array([255, 0, 0], dtype=np.uint8)


def red_mask(image: Image.Image) -> np.ndarray:
    return (np.asarray(image.convert("RGB")) == RED).all(-1)


def gif_frames(path) -> list[Image.Image]:
    with Image.open(path) as im:
        assert im.format == "GIF"
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(im)]


def toy_sequence(steps=4, count=3, channels=1, size=28, seed=0):
    """Canvas logits [T, N, C, H, W] that change every step, and write params [T, N, 5]."""
    g = torch.Generator().manual_seed(seed)
    canvases = torch.randn(steps, count, channels, size, size, generator=g).cumsum(0)
    params = 0.3 * torch.randn(steps, count, 5, generator=g)
    return canvases, params


# --- image_grid -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "count, nrow, padding, scale, rows, cols",
    [(7, None, 2, 1, 3, 3), (7, 4, 1, 3, 2, 4), (1, None, 0, 2, 1, 1), (5, 10, 2, 1, 1, 5)],
)
def test_image_grid_size(count, nrow, padding, scale, rows, cols):
    grid = figures.image_grid(torch.rand(count, 1, 5, 6), nrow=nrow, padding=padding, scale=scale)
    assert grid.mode == "RGB"
    assert grid.size == (cols * (6 * scale + padding) + padding, rows * (5 * scale + padding) + padding)


def test_image_grid_places_each_image_in_its_cell():
    images = torch.zeros(6, 1, 4, 5)
    images[4] = 1.0  # white image at index 4: row 1, column 1 of a 3-column grid
    padding, scale = 2, 3
    grid = np.asarray(figures.image_grid(images, nrow=3, padding=padding, scale=scale))
    cell_h, cell_w = 4 * scale, 5 * scale
    for k in range(6):
        row, col = divmod(k, 3)
        top, left = padding + row * (cell_h + padding), padding + col * (cell_w + padding)
        cell = grid[top : top + cell_h, left : left + cell_w]
        assert (cell == (255 if k == 4 else 0)).all(), k
    assert (grid[0, :] == round(figures.PAD_VALUE * 255)).all()  # padding around the grid


def test_image_grid_nearest_neighbour_upscaling_and_colour():
    images = torch.zeros(1, 3, 2, 2)
    images[0, 0, 0, 0] = 1.0  # top-left pixel red
    images[0, 2, 1, 1] = 1.0  # bottom-right pixel blue
    grid = np.asarray(figures.image_grid(images, padding=0, scale=4))
    assert grid.shape == (8, 8, 3)
    assert (grid[:4, :4] == [255, 0, 0]).all()
    assert (grid[4:, 4:] == [0, 0, 255]).all()
    assert (grid[:4, 4:] == 0).all() and (grid[4:, :4] == 0).all()


def test_image_grid_clips_out_of_range_values():
    grid = np.asarray(figures.image_grid(torch.tensor([[[[-3.0, 7.0]]]]), padding=0))
    assert grid[0, 0].tolist() == [0, 0, 0] and grid[0, 1].tolist() == [255, 255, 255]


def test_save_grid(tmp_path):
    path = figures.save_grid(torch.rand(10, 1, 28, 28), tmp_path / "sub" / "grid.png", nrow=5, scale=2)
    assert path == tmp_path / "sub" / "grid.png"
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (5 * 58 + 2, 2 * 58 + 2)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left


# --- window_boxes -----------------------------------------------------------------------------


def test_window_boxes_zero_params_span_the_image():
    # gx~ = gy~ = 0, log delta~ = 0: grid centre (14.5, 14.5), delta = 27/4, mu from 1 to 28 (1-based)
    boxes = figures.window_boxes(torch.zeros(5), 5, 28, 28)
    assert boxes.shape == (4,)
    torch.testing.assert_close(boxes, torch.tensor([0.0, 0.0, 27.0, 27.0]))


def test_window_boxes_shift_and_shrink():
    params = torch.zeros(2, 3, 5)
    params[..., 0] = 0.5  # gx = 29/2 * 1.5 = 21.75 (1-based) -> 20.75 (0-based)
    params[..., 3] = math.log(0.5)  # half-size (N-1)/2 * delta = 2 * 27/4 * 0.5 = 6.75
    boxes = figures.window_boxes(params, 5, 28, 28)
    assert boxes.shape == (2, 3, 4)
    expected = torch.tensor([20.75 - 6.75, 13.5 - 6.75, 20.75 + 6.75, 13.5 + 6.75])
    torch.testing.assert_close(boxes, expected.expand(2, 3, 4))


@pytest.mark.parametrize("scale", [1, 3])
def test_a_window_on_any_pixel_is_outlined_alike(scale):
    """A window centred on pixel p with edges on half pixels (p - 0.5 .. p + 0.5) is outlined around it the same
    way for every p: columns and rows (p - 1/2) * scale .. (p + 3/2) * scale - 1, rounded outwards."""
    for p in range(1, 6):
        box = torch.tensor([[p - 0.5, p - 0.5, p + 0.5, p + 0.5]])
        mask = figures._window_mask(box, (7 * scale, 7 * scale), 1, 7, 7, 0, scale)
        columns = np.flatnonzero(mask.any(axis=0))
        lo, hi = math.ceil((p - 0.5) * scale - 0.5), math.floor((p + 1.5) * scale - 0.5)
        assert (columns.min(), columns.max()) == (lo, hi), p
        assert (lo + hi) / 2 == pytest.approx((p + 0.5) * scale - 0.5)  # centred on the pixel's own cells
        assert np.array_equal(np.flatnonzero(mask.any(axis=1)), columns)


def test_window_boxes_non_square_image_uses_max_side():
    boxes = figures.window_boxes(torch.zeros(1, 5), 3, 20, 40)  # delta = (40 - 1) / 2, half-size 19.5
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 9.5 - 19.5, 39.0, 9.5 + 19.5]))


def test_window_boxes_one_point_grid_is_a_small_box_around_the_centre():
    params = torch.zeros(2, 5)
    params[1, 2] = math.log(9.0)  # sigma = 3
    left, top, right, bottom = figures.window_boxes(params, 1, 28, 28).unbind(-1)
    torch.testing.assert_close(right - left, torch.tensor([2.0, 6.0]))  # half-size max(sigma, 0.5)
    torch.testing.assert_close((left + right) / 2, torch.full((2,), 13.5))
    torch.testing.assert_close((top + bottom) / 2, torch.full((2,), 13.5))
    tiny = figures.window_boxes(torch.tensor([0.0, 0.0, 0.0, -20.0, 0.0]), 5, 28, 28)
    torch.testing.assert_close(tiny[2] - tiny[0], torch.tensor(1.0))  # tiny delta: still 1 pixel wide


def test_window_box_encloses_what_the_write_draws():
    """The box agrees with the reference write: a patch of ones lands inside it (sharp filters)."""
    params = torch.tensor([[0.3, -0.4, math.log(0.05), math.log(0.4), 0.0]])
    canvas = reference.write(torch.ones(1, 1, 5, 5), params, torch.zeros(1, 1, 28, 28))[0, 0]  # [H, W]
    ys, xs = torch.nonzero(canvas > 0.05 * canvas.max(), as_tuple=True)
    left, top, right, bottom = figures.window_boxes(params[0], 5, 28, 28).tolist()
    assert left - 1 <= xs.min() and xs.max() <= right + 1 and top - 1 <= ys.min() and ys.max() <= bottom + 1
    assert xs.min() <= left + 1 and xs.max() >= right - 1 and ys.min() <= top + 1 and ys.max() >= bottom - 1


# --- the drawing sequence ---------------------------------------------------------------------


def test_save_sequence_gif_with_windows(tmp_path):
    canvases, params = toy_sequence(steps=5, count=4)
    path = figures.save_sequence_gif(canvases, tmp_path / "a" / "gen.gif", params, write_n=5, scale=2, frame_ms=50)
    frames = gif_frames(path)
    assert len(frames) == 5
    assert frames[0].size == (2 * (56 + 2) + 2, 2 * (56 + 2) + 2)
    assert all(red_mask(frame).any() for frame in frames)
    with Image.open(path) as im:
        assert im.info["loop"] == 0
        durations = [frame.info["duration"] for frame in ImageSequence.Iterator(im)]
    assert durations == [50, 50, 50, 50, 1500]


def test_save_sequence_gif_frames_show_the_canvases(tmp_path):
    canvases = torch.full((3, 1, 1, 4, 4), -20.0)
    canvases[1, 0, 0, :2] = 20.0  # step 2: top half white
    canvases[2] = 20.0  # step 3: all white
    frames = gif_frames(figures.save_sequence_gif(canvases, tmp_path / "s.gif", scale=1))
    cells = [np.asarray(frame)[2:6, 2:6, 0] for frame in frames]  # padding 2
    assert (cells[0] == 0).all()
    assert (cells[1][:2] == 255).all() and (cells[1][2:] == 0).all()
    assert (cells[2] == 255).all()
    assert not any(red_mask(frame).any() for frame in frames)  # no write_params: no window


def test_save_sequence_gif_window_position(tmp_path):
    """Zero params outline the whole image; the outline sits on the cell's border pixels."""
    canvases = torch.stack([torch.full((1, 1, 6, 6), -20.0), torch.full((1, 1, 6, 6), 20.0)])
    frames = gif_frames(figures.save_sequence_gif(canvases, tmp_path / "w.gif", torch.zeros(2, 1, 5), 3, scale=2))
    red = red_mask(frames[1])[2:14, 2:14]  # the 12 x 12 cell
    border = np.zeros((12, 12), dtype=bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    assert (red == border).all()
    assert not red_mask(frames[1])[:2].any()  # nothing drawn on the padding


def test_save_sequence_gif_colour(tmp_path):
    canvases, params = toy_sequence(steps=3, count=2, channels=3, size=8)
    frames = gif_frames(figures.save_sequence_gif(canvases, tmp_path / "c.gif", params, 2, scale=2))
    assert len(frames) == 3 and all(red_mask(frame).any() for frame in frames)
    # the quantised colours stay close to the images
    want = np.asarray(figures.image_grid(torch.sigmoid(canvases[-1]), scale=2)).astype(int)
    got = np.asarray(frames[-1]).astype(int)
    assert np.abs(got - want)[~red_mask(frames[-1])].mean() < 8


def test_save_sequence_strip(tmp_path):
    canvases, params = toy_sequence(steps=16, count=10, size=12)
    path = figures.save_sequence_strip(canvases, tmp_path / "strip.png", params, write_n=5, steps=4, scale=2)
    with Image.open(path) as im:
        assert im.format == "PNG"
        # 8 rows (at most 8 images), 4 columns, 24 x 24 cells, padding 2, a 14-pixel label band
        assert im.size == (4 * 26 + 2, 8 * 26 + 2 + 14)
        assert red_mask(im).any()
    path = figures.save_sequence_strip(canvases[:3, :2], tmp_path / "short.png", steps=8, scale=1)
    with Image.open(path) as im:
        assert im.size == (3 * 14 + 2, 2 * 14 + 2 + 14)  # steps capped at T = 3
        assert not red_mask(im).any()


def test_strip_steps_are_evenly_spaced_and_end_at_the_last():
    assert figures._strip_steps(64, 8) == [7, 15, 23, 31, 39, 47, 55, 63]
    assert figures._strip_steps(10, 3) == [3, 6, 9]
    assert figures._strip_steps(3, 8) == [0, 1, 2]


@pytest.mark.parametrize(
    "canvases, params, write_n",
    [
        (torch.zeros(3, 2, 28, 28), None, None),  # rank 4
        (torch.zeros(3, 2, 2, 28, 28), None, None),  # C = 2
        (torch.zeros(3, 2, 1, 28, 28), torch.zeros(3, 5), 5),  # params rank 2
        (torch.zeros(3, 2, 1, 28, 28), torch.zeros(2, 2, 5), 5),  # params T mismatch
        (torch.zeros(3, 2, 1, 28, 28), torch.zeros(3, 2, 4), 5),  # 4 params
        (torch.zeros(3, 2, 1, 28, 28), torch.zeros(3, 2, 5), None),  # no write_n
    ],
)
def test_sequence_bad_shapes_raise(tmp_path, canvases, params, write_n):
    with pytest.raises(ValueError):
        figures.save_sequence_gif(canvases, tmp_path / "x.gif", params, write_n)
    with pytest.raises(ValueError):
        figures.save_sequence_strip(canvases, tmp_path / "x.png", params, write_n)
    assert not list(tmp_path.iterdir())


def test_grid_and_boxes_bad_inputs_raise():
    with pytest.raises(ValueError):
        figures.image_grid(torch.zeros(2, 28, 28))
    with pytest.raises(ValueError):
        figures.image_grid(torch.zeros(2, 4, 28, 28))
    with pytest.raises(ValueError):
        figures.image_grid(torch.zeros(2, 1, 28, 28), scale=0)
    with pytest.raises(ValueError):
        figures.window_boxes(torch.zeros(3, 4), 5, 28, 28)
    with pytest.raises(ValueError):
        figures.window_boxes(torch.zeros(3, 5), 0, 28, 28)


# --- loss curves ------------------------------------------------------------------------------


def synthetic_records(scale=1.0, evaluate=True, steps=400):
    records = []
    rng = np.random.default_rng(0)
    for step in range(0, steps, 5):
        l_z = 25 + 5 * math.exp(-step / 100)
        l_x = 75 + 1e5 * math.exp(-step / 10) + 20 * math.exp(-step / 150)  # huge early values
        noise = rng.normal(0, 2)
        records.append(
            {"step": step, "loss": scale * (l_x + l_z) + noise, "l_x": l_x, "l_z": l_z, "epoch": step / 100}
        )
        if evaluate and step and step % 100 == 0:
            records.append({"step": step, "test_bound": scale * (l_x + l_z) + 1})
    return records


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_log_ticks_are_one_two_five_in_a_narrow_range_and_powers_of_ten_in_a_wide_one():
    assert figures._log_ticks(np.array([0.3, 4.0])) == pytest.approx([0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50])
    assert figures._log_ticks(np.array([0.2, 9e5, 0.0])) == pytest.approx([0.1, 1, 10, 100, 1e3, 1e4, 1e5, 1e6])
    assert figures._log_ticks(np.array([0.0])) == [1.0]


def test_save_loss_curve_from_jsonl(tmp_path):
    metrics = write_jsonl(tmp_path / "metrics.jsonl", synthetic_records())
    path = figures.save_loss_curve(metrics, tmp_path / "plots" / "loss.png", title="toy")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    assert sorted(p.name for p in path.parent.iterdir()) == ["loss.png"]


def test_save_loss_curve_without_test_bound_and_from_records(tmp_path):
    path = figures.save_loss_curve(synthetic_records(evaluate=False), tmp_path / "loss.png")
    with Image.open(path) as im:
        assert im.format == "PNG"


def test_the_loss_curve_gains_a_gradient_panel_when_the_records_hold_gradient_norms(tmp_path):
    plain = figures.save_loss_curve(synthetic_records(), tmp_path / "plain.png")
    records = [dict(r, grad_norm=1.0 + r["step"] % 7) if "loss" in r else r for r in synthetic_records()]
    with_gradient = figures.save_loss_curve(records, tmp_path / "gradient.png")
    with Image.open(plain) as a, Image.open(with_gradient) as b:
        assert a.size[0] == b.size[0] and b.size[1] > a.size[1] * 1.2


@pytest.fixture
def plotted_labels(monkeypatch):
    """{figure file's stem: the labels of its plotted lines}, filled as the figures are saved."""
    labels = {}
    finish = figures._finish

    def kept(fig, ax, limits, path):
        labels[pathlib.Path(path).stem] = [line.get_label() for line in ax.get_lines()]
        return finish(fig, ax, limits, path)

    monkeypatch.setattr(figures, "_finish", kept)
    return labels


def test_with_a_weight_average_the_loss_curve_shows_both_bounds(tmp_path, plotted_labels):
    """--ema runs record the weight average's bound (test_bound) and the trained weights' (test_bound_trained):
    both are plotted and labelled; a run without it keeps its one label."""
    records = [dict(r, test_bound_trained=r["test_bound"] + 1.5) if "test_bound" in r else r for r in synthetic_records()]
    figures.save_loss_curve(records, tmp_path / "average.png")
    figures.save_loss_curve(synthetic_records(), tmp_path / "plain.png")
    last = [r for r in records if "test_bound" in r][-1]
    assert f"test bound, weight average (last {last['test_bound']:.2f})" in plotted_labels["average"]
    assert f"test bound, trained weights (last {last['test_bound_trained']:.2f})" in plotted_labels["average"]
    assert f"test bound (last {last['test_bound']:.2f})" in plotted_labels["plain"]
    assert not any("trained" in label for label in plotted_labels["plain"])


def test_a_run_evaluated_on_the_validation_split_is_plotted_with_its_figures(tmp_path, plotted_labels):
    """--eval-split valid: records hold valid_bound / valid_error; the loss curve, the comparison and the error
    curve plot those under "valid", and the last evaluation's split wins in a run that switched."""
    rename = lambda r, old, new: {(new + k[len(old):] if k.startswith(old) else k): v for k, v in r.items()}
    valid = [rename(r, "test_", "valid_") for r in synthetic_records()]
    switched = synthetic_records() + [{"step": 1000, "valid_bound": 50.0}]
    figures.save_loss_curve(valid, tmp_path / "valid.png")
    figures.save_loss_curve(switched, tmp_path / "switched.png")
    figures.save_loss_comparison({"a": valid}, tmp_path / "comparison.png")
    figures.save_error_curve([rename(r, "test_", "valid_") for r in classifier_records()], tmp_path / "error.png")
    last = [r["valid_bound"] for r in valid if "valid_bound" in r][-1]
    assert f"valid bound (last {last:.2f})" in plotted_labels["valid"] and not any("test" in x for x in plotted_labels["valid"])
    assert "valid bound (last 50.00)" in plotted_labels["switched"] and not any("test" in x for x in plotted_labels["switched"])
    assert f"a: valid bound (last {last:.2f})" in plotted_labels["comparison"]
    assert any(x.startswith("valid error (last ") for x in plotted_labels["error"])
    assert figures._held_out_split([{"step": 1, "loss": 2.0}]) == "test"  # no evaluation yet


def classifier_records(steps=400):
    records = [{"step": s, "error": 0.9 * math.exp(-s / 80) + 0.05, "grad_norm": 5.0 + (s % 11)} for s in range(5, steps, 5)]
    records[30]["error"] = 0.0  # a perfect interval still has a place on the log axis
    return records + [{"step": s, "test_error": 0.9 * math.exp(-s / 80) + 0.06, "test_loss": 1.0} for s in (100, 200, 300)]


def test_save_error_curve(tmp_path):
    metrics = write_jsonl(tmp_path / "metrics.jsonl", classifier_records())
    path = figures.save_error_curve(metrics, tmp_path / "curves" / "error.png", title="cluttered")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300
    with pytest.raises(ValueError, match="no training"):
        figures.save_error_curve([{"step": 1, "loss": 2.0}], tmp_path / "none.png")


def test_loss_y_range_ignores_the_huge_early_losses():
    records = synthetic_records()
    loss = figures._series(records, "step", "loss")
    bottom, top = figures._y_limits([loss], from_zero=True)
    late = loss[1][loss[0] >= 200]
    assert bottom == 0.0 and late.max() * 0.95 < top < 200 < loss[1].max()


def test_loss_y_range_keeps_test_bounds_above_the_training_loss_in_view():
    loss = (np.arange(100.0), np.full(100, 80.0))
    bound = (np.array([25.0, 50.0, 75.0, 99.0]), np.array([100.0, 96.0, 95.0, 94.0]))
    bottom, top = figures._y_limits([loss, bound], from_zero=True)
    assert bottom == 0.0 and 95.0 < top < 130.0


def test_comparison_y_range_zooms_on_the_late_losses():
    first = (np.arange(100.0), np.concatenate([np.full(50, 1e4), np.full(50, 95.0)]))
    second = (np.arange(100.0), np.concatenate([np.full(50, 1e4), np.full(50, 100.0)]))
    bottom, top = figures._y_limits([first, second], from_zero=False)
    assert 90.0 < bottom < 95.0 and 100.0 < top < 105.0


def test_save_loss_comparison(tmp_path):
    runs = {
        "batch 1024, fast": write_jsonl(tmp_path / "fast.jsonl", synthetic_records(scale=1.05)),
        "default": synthetic_records(),
        "no eval": synthetic_records(evaluate=False, steps=200),
    }
    for x in ("step", "epoch"):
        path = figures.save_loss_comparison(runs, tmp_path / f"compare_{x}.png", x=x, title="compare")
        with Image.open(path) as im:
            assert im.format == "PNG"


def test_test_bounds_are_placed_on_an_epoch_axis():
    records = [{"step": s, "loss": 1.0, "epoch": s / 50} for s in range(0, 200, 10)]
    records.append({"step": 100, "test_bound": 90.0})
    xs, ys = figures._bound_series(records, "epoch", "test")
    assert xs.tolist() == [2.0] and ys.tolist() == [90.0]


def test_loss_plots_bad_inputs_raise(tmp_path):
    with pytest.raises(ValueError):
        figures.save_loss_curve([{"step": 1, "images_per_s": 3.0}], tmp_path / "a.png")
    with pytest.raises(ValueError):
        figures.save_loss_curve(42, tmp_path / "a.png")
    with pytest.raises(ValueError):
        figures.save_loss_comparison({}, tmp_path / "b.png")
    with pytest.raises(ValueError):
        figures.save_loss_comparison({"a": synthetic_records()}, tmp_path / "b.png", x="wall_s")
    assert not list(tmp_path.iterdir())


def test_matplotlib_is_imported_only_inside_the_plotting_functions():
    """`import draw.figures` stays fast: no module-level matplotlib import (checked on the source)."""
    tree = ast.parse(inspect.getsource(figures))
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = [alias.name for node in top_level for alias in node.names]
    names += [node.module for node in top_level if isinstance(node, ast.ImportFrom)]
    assert not any(name and name.startswith("matplotlib") for name in names)
