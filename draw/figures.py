"""Figures: image grids, the drawing sequence with its write window (the paper's Fig. 1), loss curves.

Images are [N, C, H, W] in [0, 1] (C = 1 or 3); sequences are the canvas logits [T, N, C, H, W] that
DRAW.generate and DRAW.forward(x, return_sequence=True) return, with the raw write parameters
[T, N, 5] beside them. Every save_* function creates the parent directory, writes atomically (a
temporary file in the same directory, then os.replace) and returns the path.

matplotlib is imported only inside the loss-curve functions, and through its object-oriented API
(Figure, no pyplot), so `import draw` stays fast and no display or global backend is touched.
"""

import math
import os
import pathlib

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from draw.atomic import atomic_write
from draw.config import record_split
from draw.kernels.reference import attention_grid

__all__ = [
    "image_grid",
    "save_grid",
    "window_boxes",
    "save_sequence_gif",
    "save_sequence_strip",
    "save_loss_curve",
    "save_loss_comparison",
    "save_error_curve",
    "samples_with_neighbours_grid",
    "save_samples_with_neighbours",
    "write_model_figures",
    "save_glimpse_figure",
]

WINDOW_RGB = (255, 0, 0)  # the write window, drawn as a 1-pixel red outline
PAD_VALUE = 0.75  # light grey between cells: apart from MNIST's black and white and an untrained model's 0.5
GIF_GREYS = 254  # grey levels in a GIF palette; index 254 is the window's red, 255 stays free


# ---------------------------------------------------------------------------------------------
# Checks and small helpers
# ---------------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [N, C, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[0] < 1 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with N >= 1 and C in (1, 3), got {list(images.shape)}")


def _check_sequence(canvases, write_params, write_n) -> None:
    if not isinstance(canvases, torch.Tensor):
        raise TypeError(f"canvases must be a torch.Tensor [T, N, C, H, W], got {type(canvases).__name__}")
    if canvases.dim() != 5 or canvases.shape[0] < 1 or canvases.shape[1] < 1 or canvases.shape[2] not in (1, 3):
        raise ValueError(
            f"canvases must be [T, N, C, H, W] logits with T, N >= 1 and C in (1, 3), got {list(canvases.shape)}"
        )
    if write_params is None:
        return
    steps, count = canvases.shape[:2]
    if not isinstance(write_params, torch.Tensor) or tuple(write_params.shape) != (steps, count, 5):
        shape = list(write_params.shape) if isinstance(write_params, torch.Tensor) else type(write_params).__name__
        raise ValueError(f"write_params must be [T, N, 5] = [{steps}, {count}, 5] to match the canvases, got {shape}")
    _check_int("write_n (needed with write_params)", write_n, 1)


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> [N, H, W, 3] uint8 (grey repeated over RGB; NaN shows black)."""
    x = np.nan_to_num(images.detach().float().cpu().numpy(), nan=0.0)
    x = np.rint(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8).transpose(0, 2, 3, 1)  # [N, H, W, C]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x)


def _grid_layout(count: int, nrow: int | None) -> tuple[int, int]:
    """(rows, cols): nrow is the number of images per row, as in torchvision's make_grid."""
    cols = math.ceil(math.sqrt(count)) if nrow is None else nrow
    _check_int("nrow", cols, 1)
    cols = min(cols, count)
    return math.ceil(count / cols), cols


def _cell_origin(k: int, cols: int, cell_h: int, cell_w: int, padding: int) -> tuple[int, int]:
    """(top, left) of image k's cell in the grid, in output pixels."""
    row, col = divmod(k, cols)
    return padding + row * (cell_h + padding), padding + col * (cell_w + padding)


def _grid_array(pixels: np.ndarray, nrow: int | None, padding: int, scale: int, pad_value: float):
    """[N, H, W, 3] uint8 -> ([H', W', 3] uint8 grid, cols). Cells are H*scale x W*scale, padding between and around."""
    count, height, width, _ = pixels.shape
    rows, cols = _grid_layout(count, nrow)
    cell_h, cell_w = height * scale, width * scale
    grid = np.full(
        (rows * (cell_h + padding) + padding, cols * (cell_w + padding) + padding, 3),
        round(pad_value * 255),
        dtype=np.uint8,
    )
    upscaled = pixels.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest neighbour  [N, H*s, W*s, 3]
    for k in range(count):
        top, left = _cell_origin(k, cols, cell_h, cell_w, padding)
        grid[top : top + cell_h, left : left + cell_w] = upscaled[k]
    return grid, cols


# ---------------------------------------------------------------------------------------------
# Image grids
# ---------------------------------------------------------------------------------------------


def image_grid(
    images: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int = 1, pad_value: float = PAD_VALUE
) -> Image.Image:
    """Tile images into one RGB picture.

    Args:
        images: [N, C, H, W] in [0, 1], C = 1 (grey) or 3 (RGB); values outside are clipped.
        nrow: images per row (torchvision's convention, at most N); default ceil(sqrt(N)).
        padding: pixels between cells and around the grid (not scaled).
        scale: nearest-neighbour upscaling factor of every image.
        pad_value: grey level of the padding, in [0, 1].
    Returns:
        An RGB image of width cols*(W*scale + padding) + padding and height rows*(H*scale + padding) + padding.
    """
    _check_images(images)
    _check_int("padding", padding, 0)
    _check_int("scale", scale, 1)
    grid, _ = _grid_array(_to_uint8_hwc(images), nrow, padding, scale, pad_value)
    return Image.fromarray(grid)


def save_grid(images: torch.Tensor, path, nrow: int | None = None, scale: int = 2) -> pathlib.Path:
    """Save image_grid(images, nrow, scale=scale) as a PNG at path (atomically). Returns the path."""
    grid = image_grid(images, nrow=nrow, scale=scale)
    return atomic_write(path, lambda f: grid.save(f, format="PNG"), durable=False)


# ---------------------------------------------------------------------------------------------
# The write window
# ---------------------------------------------------------------------------------------------


def window_boxes(write_params: torch.Tensor, n: int, height: int, width: int) -> torch.Tensor:
    """The box covered by an attention grid, in 0-based pixel coordinates of the image.

    The grid's points are mu^i = g + (i - N/2 - 0.5) * delta, i = 1..N (Eqs. 19-20), in 1-based pixels;
    the box spans mu^1..mu^N, i.e. g -/+ (N - 1)/2 * delta, minus 1 for 0-based pixels. With zero
    params and log delta~ = 0 it is exactly the image: (0, 0, W - 1, H - 1) for a square image. A box
    never has a half-size below 0.5 pixel, and for N = 1 (a one-point grid) its half-size is
    max(sigma, 0.5), the spread of the single filter. Boxes are not clipped to the image.

    Args:
        write_params: [..., 5] raw (gx~, gy~, log sigma^2, log delta~, log gamma), Eq. 21.
        n: write grid size N^ >= 1.
        height, width: image size H, W.
    Returns:
        [..., 4] float (left, top, right, bottom), 0-based pixel coordinates.
    """
    if not isinstance(write_params, torch.Tensor) or write_params.dim() < 1 or write_params.shape[-1] != 5:
        shape = list(write_params.shape) if isinstance(write_params, torch.Tensor) else type(write_params).__name__
        raise ValueError(f"write_params must be [..., 5], got {shape}")
    _check_int("n", n, 1)
    _check_int("height", height, 1)
    _check_int("width", width, 1)
    gx, gy, delta, sigma2, _ = attention_grid(write_params.detach().float().cpu(), n, height, width)  # (22-24)
    if n == 1:
        half = sigma2.sqrt().clamp_min(0.5)
    else:
        half = ((n - 1) / 2 * delta).clamp_min(0.5)
    cx, cy = gx - 1, gy - 1  # 1-based -> 0-based pixel coordinates
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=-1)


def _window_mask(boxes: torch.Tensor, grid_shape, cols: int, height: int, width: int, padding: int, scale: int):
    """Boolean [H', W'] mask of the boxes' outlines (boxes [N, 4], image k in cell k), clipped to each cell.

    Pixel p (0-based) of an image covers [p*scale, (p+1)*scale) in its cell, so a box over pixels
    left..right is outlined from left*scale to (right+1)*scale - 1: the outline encloses those pixels.
    Edges on a half pixel round outwards (round() would take halves to even numbers, so the outline of a
    window centred on a pixel would shift with the pixel's parity).
    """
    mask = np.zeros(grid_shape[:2], dtype=bool)
    cell_h, cell_w = height * scale, width * scale
    for k, (left, top, right, bottom) in enumerate(boxes.tolist()):
        if not all(map(math.isfinite, (left, top, right, bottom))):
            continue
        x0, x1 = math.ceil(left * scale - 0.5), math.floor((right + 1) * scale - 0.5)
        y0, y1 = math.ceil(top * scale - 0.5), math.floor((bottom + 1) * scale - 0.5)
        if x1 < 0 or y1 < 0 or x0 > cell_w - 1 or y0 > cell_h - 1:
            continue  # the window lies wholly outside the image
        x0, x1 = max(x0, 0), min(x1, cell_w - 1)
        y0, y1 = max(y0, 0), min(y1, cell_h - 1)
        top0, left0 = _cell_origin(k, cols, cell_h, cell_w, padding)
        cell = mask[top0 : top0 + cell_h, left0 : left0 + cell_w]
        cell[y0, x0 : x1 + 1] = cell[y1, x0 : x1 + 1] = True
        cell[y0 : y1 + 1, x0] = cell[y0 : y1 + 1, x1] = True
    return mask


def _sequence_frames(canvases, write_params, write_n, nrow, scale, padding):
    """Yield (RGB grid [H', W', 3] uint8, window mask [H', W'] or None) for t = 1..T."""
    height, width = canvases.shape[-2:]
    means = torch.sigmoid(canvases.detach().float().cpu())  # [T, N, C, H, W], one op for every frame
    for t in range(canvases.shape[0]):
        grid, cols = _grid_array(_to_uint8_hwc(means[t]), nrow, padding, scale, PAD_VALUE)
        mask = None
        if write_params is not None:
            boxes = window_boxes(write_params[t], write_n, height, width)  # [N, 4]
            mask = _window_mask(boxes, grid.shape, cols, height, width, padding, scale)
        yield grid, mask


# ---------------------------------------------------------------------------------------------
# The drawing sequence
# ---------------------------------------------------------------------------------------------


def _gif_palette(canvases, nrow, scale, padding) -> tuple[Image.Image | None, list[int]]:
    """A palette of GIF_GREYS colours plus the window's red at index GIF_GREYS.

    Grey images use GIF_GREYS evenly spaced greys (no quantiser needed); colour images use a
    median-cut palette of the last frame, the most detailed one.
    """
    if canvases.shape[2] == 1:
        greys = [round(i * 255 / (GIF_GREYS - 1)) for i in range(GIF_GREYS)]
        colours = [v for g in greys for v in (g, g, g)]
        quantiser = None
    else:
        last, _ = _grid_array(_to_uint8_hwc(torch.sigmoid(canvases[-1].float())), nrow, padding, scale, PAD_VALUE)
        quantiser = Image.fromarray(last).quantize(GIF_GREYS, method=Image.Quantize.MEDIANCUT)
        colours = quantiser.getpalette()[: 3 * GIF_GREYS]
        colours += colours[:3] * (GIF_GREYS - len(colours) // 3)  # pad a short palette with its first colour
        quantiser.putpalette(colours + colours[:3] * (256 - GIF_GREYS))  # red stays out of the quantiser's reach
    return quantiser, colours + list(WINDOW_RGB) + [0, 0, 0] * (255 - GIF_GREYS)


def save_sequence_gif(
    canvases: torch.Tensor,
    path,
    write_params: torch.Tensor | None = None,
    write_n: int | None = None,
    nrow: int | None = None,
    scale: int = 3,
    frame_ms: int = 80,
    hold_last_ms: int = 1500,
) -> pathlib.Path:
    """An animated GIF of the drawing: frame t is the grid of sigmoid(canvases[t]), the write window drawn in red.

    Args:
        canvases: [T, N, C, H, W] canvas logits c_1..c_T (C = 1 or 3).
        path: where to write the GIF.
        write_params: [T, N, 5] raw write parameters, or None (no window drawn).
        write_n: write grid size N^, required with write_params.
        nrow: images per row; default ceil(sqrt(N)).
        scale: nearest-neighbour upscaling of every image.
        frame_ms, hold_last_ms: duration of each frame and of the last one. The GIF loops forever.
    Returns:
        The path. Pillow merges consecutive identical frames, so a canvas that stops changing gives fewer frames.
    """
    _check_sequence(canvases, write_params, write_n)
    _check_int("scale", scale, 1)
    _check_int("frame_ms", frame_ms, 1)
    _check_int("hold_last_ms", hold_last_ms, 1)
    padding = 2
    quantiser, palette = _gif_palette(canvases, nrow, scale, padding)
    frames = []
    for grid, mask in _sequence_frames(canvases, write_params, write_n, nrow, scale, padding):
        if quantiser is None:  # grey: index = grey level on GIF_GREYS steps
            index = np.rint(grid[..., 0].astype(np.float32) * ((GIF_GREYS - 1) / 255)).astype(np.uint8)
        else:
            rgb = Image.fromarray(grid)
            index = np.asarray(rgb.quantize(palette=quantiser, dither=Image.Dither.NONE)).copy()
        if mask is not None:
            index[mask] = GIF_GREYS  # the window's red
        frame = Image.frombytes("P", (index.shape[1], index.shape[0]), index.tobytes())
        frame.putpalette(palette)
        frames.append(frame)
    durations = [frame_ms] * (len(frames) - 1) + [hold_last_ms]

    def write(f):
        frames[0].save(
            f, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=False
        )

    return atomic_write(path, write, durable=False)


def _strip_steps(total: int, steps: int) -> list[int]:
    """`steps` evenly spaced 0-based step indices ending at the last: ceil(k * T / steps) - 1, k = 1..steps."""
    steps = min(steps, total)
    return [math.ceil(k * total / steps) - 1 for k in range(1, steps + 1)]


def save_sequence_strip(
    canvases: torch.Tensor,
    path,
    write_params: torch.Tensor | None = None,
    write_n: int | None = None,
    steps: int = 8,
    scale: int = 2,
    max_images: int = 8,
) -> pathlib.Path:
    """A static PNG of the drawing: one row per image (the first max_images), one column per chosen step.

    The columns are `steps` evenly spaced time steps ending at T (t = T/steps, 2T/steps, ..., T, 1-based),
    labelled "t=..." in a header band; the write window of each step is drawn in red.

    Args:
        canvases: [T, N, C, H, W] canvas logits.
        path: where to write the PNG.
        write_params: [T, N, 5] raw write parameters, or None.
        write_n: write grid size N^, required with write_params.
        steps: number of columns (at most T).
        scale: nearest-neighbour upscaling of every image.
        max_images: number of rows (at most N).
    Returns:
        The path.
    """
    _check_sequence(canvases, write_params, write_n)
    _check_int("steps", steps, 1)
    _check_int("scale", scale, 1)
    _check_int("max_images", max_images, 1)
    total, count = canvases.shape[:2]
    height, width = canvases.shape[-2:]
    chosen = _strip_steps(total, steps)
    rows, cols = min(count, max_images), len(chosen)
    # [rows * cols, ...] in row-major order: image i at step chosen[j] is cell i * cols + j
    frames = canvases[chosen, :rows].detach().float().cpu().transpose(0, 1)  # [rows, cols, C, H, W]
    padding = 2
    grid, _ = _grid_array(_to_uint8_hwc(torch.sigmoid(frames.flatten(0, 1))), cols, padding, scale, PAD_VALUE)
    if write_params is not None:
        params = write_params[chosen, :rows].detach().float().cpu().transpose(0, 1)  # [rows, cols, 5]
        boxes = window_boxes(params.flatten(0, 1), write_n, height, width)  # [rows * cols, 4]
        grid[_window_mask(boxes, grid.shape, cols, height, width, padding, scale)] = WINDOW_RGB

    font = ImageFont.load_default()
    band = 14  # header height for the step labels
    picture = Image.new("RGB", (grid.shape[1], grid.shape[0] + band), (255, 255, 255))
    picture.paste(Image.fromarray(grid), (0, band))
    draw = ImageDraw.Draw(picture)
    for j, t in enumerate(chosen):
        _, left = _cell_origin(j, cols, height * scale, width * scale, padding)
        label = f"t={t + 1}"
        x0, y0, x1, y1 = draw.textbbox((0, 0), label, font=font)  # centred by hand: bitmap fonts take no anchor
        centre_x, centre_y = left + width * scale / 2, band / 2
        draw.text((centre_x - (x0 + x1) / 2, centre_y - (y0 + y1) / 2), label, fill=(0, 0, 0), font=font)
    return atomic_write(path, lambda f: picture.save(f, format="PNG"), durable=False)


# ---------------------------------------------------------------------------------------------
# Loss curves
# ---------------------------------------------------------------------------------------------


def _load_records(source) -> list[dict]:
    """A metrics.jsonl path (read as draw.rundir.read_metrics reads it) or a list of dicts."""
    if isinstance(source, (str, os.PathLike)):
        from draw.rundir import read_metrics

        return read_metrics(source)
    if isinstance(source, (list, tuple)) and all(isinstance(r, dict) for r in source):
        return list(source)
    raise ValueError(f"expected a metrics.jsonl path or a list of dicts, got {type(source).__name__}")


def _series(records: list[dict], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the records holding both keys with finite numbers, sorted by x."""
    pairs = [
        (float(r[x]), float(r[y]))
        for r in records
        if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))
    ]
    pairs = sorted(p for p in pairs if math.isfinite(p[0]) and math.isfinite(p[1]))
    if not pairs:
        return np.zeros(0), np.zeros(0)
    xs, ys = zip(*pairs)
    return np.asarray(xs), np.asarray(ys)


def _held_out_split(records: list[dict]) -> str:
    """The split the run's last evaluation record scored ("test" or "valid"); "test" if none."""
    return next((split for split in map(record_split, reversed(records)) if split is not None), "test")


def _smooth(values: np.ndarray, window: int | None = None) -> np.ndarray:
    """Trailing moving average over `window` points (default: 1/25 of the series, at least 1)."""
    if len(values) == 0:
        return values
    window = window or max(1, len(values) // 25)
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[start]) / (index - start)


def _x_at_steps(records: list[dict], x: str, steps: np.ndarray) -> np.ndarray:
    """Map steps to the x key by interpolating the training records that carry both (e.g. step -> epoch)."""
    known_steps, known_x = _series(records, "step", x)
    if len(known_steps) == 0:
        return np.full(len(steps), np.nan)
    return np.interp(steps, known_steps, known_x)


def _bound_series(records: list[dict], x: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Held-out bounds ({split}_bound) against x; evaluation records without x are placed by their step when
    possible."""
    xs, ys = _series(records, x, f"{split}_bound")
    if len(xs) == 0 and x != "step":
        steps, ys = _series(records, "step", f"{split}_bound")
        xs = _x_at_steps(records, x, steps)
        keep = np.isfinite(xs)
        xs, ys = xs[keep], ys[keep]
    return xs, ys


def _y_limits(series: list[tuple[np.ndarray, np.ndarray]], from_zero: bool) -> tuple[float, float] | None:
    """A y range set by the late half of every series (x >= the middle of its x range), or None.

    The top is the highest of the series' late-half 95th percentiles, plus a margin, so early
    losses of 10^4 nats do not flatten the curve of a model that ends near 100, while a few test
    bounds above the training loss stay in view. The bottom is 0 (or the lowest value, if negative)
    when from_zero, else the lowest late-half value minus a margin: the zoom for telling runs apart.
    """
    tops, late_lows, lows = [], [], []
    for xs, ys in series:
        if len(ys) == 0:
            continue
        late = ys[xs >= (xs[0] + xs[-1]) / 2]
        tops.append(float(np.percentile(late, 95)))
        late_lows.append(float(late.min()))
        lows.append(float(ys.min()))
    if not tops:
        return None
    top = max(tops)
    bottom = min(0.0, min(lows)) if from_zero else min(late_lows)
    span = max(top - bottom, 1e-3 * max(abs(top), 1.0))
    if from_zero:
        return bottom, top + 0.15 * span
    return bottom - 0.1 * span, top + 0.35 * span  # room above for the descent into the zoomed range


def _figure(title: str | None, xlabel: str, ylabel: str = "nats per image", gradient_records: list[dict] | None = None):
    """A figure with one axes, or, when gradient_records hold gradient norms, a second one below it
    (same x) with those norms on a log scale: the spikes a loss curve hides. Returns (fig, ax)."""
    from matplotlib.figure import Figure  # object-oriented API: no pyplot, no global backend

    gradient = _series(gradient_records, "step", "grad_norm") if gradient_records else (np.zeros(0), np.zeros(0))
    fig = Figure(figsize=(9, 5.6 if len(gradient[0]) else 4.2), dpi=120, layout="constrained")
    if len(gradient[0]):
        ax, grad_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        grad_ax.plot(*gradient, color="tab:purple", alpha=0.35, linewidth=0.8, label="gradient norm before clipping")
        grad_ax.plot(gradient[0], _smooth(gradient[1]), color="tab:purple", linewidth=1.5, label="smoothed")
        _plain_log_axis(grad_ax, _log_ticks(gradient[1]))
        grad_ax.set_ylabel("gradient norm")
        grad_ax.set_xlabel(xlabel)
        grad_ax.grid(True, alpha=0.3)
        _legend_beside(grad_ax)
    else:
        ax = fig.subplots()
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    return fig, ax


def _legend_beside(ax) -> None:
    """The legend right of the axes, never over the curves."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _finish(fig, ax, limits, path) -> pathlib.Path:
    """Apply the y range, put the legend beside the axes, save atomically."""
    if limits:
        ax.set_ylim(*limits)
    _legend_beside(ax)
    suffix = pathlib.Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=suffix), durable=False)


def save_loss_curve(metrics_path_or_records, path, title: str | None = None) -> pathlib.Path:
    """Plot one run: training loss (raw, light, and smoothed), L_x and L_z (smoothed), and the held-out bound.

    Training records carry {"step", "loss", "l_x", "l_z"} (and "grad_norm", plotted in a panel below);
    evaluation records {"step", "test_bound"} (nats; "valid_bound" for a run evaluated on the validation
    split: the last evaluation's split is plotted), and with --ema "test_bound_trained" (the trained
    weights' bound beside the weight average's); other records and non-finite values are ignored. The y axis
    runs from 0 to the late half's 95th percentile plus a margin, so the huge first losses do not flatten
    the curve.

    Args:
        metrics_path_or_records: a metrics.jsonl path, or a list of dicts.
        path: where to write the figure (PNG unless the suffix says otherwise).
        title: axes title.
    Returns:
        The path.
    """
    records = _load_records(metrics_path_or_records)
    loss = _series(records, "step", "loss")
    l_x = _series(records, "step", "l_x")
    l_z = _series(records, "step", "l_z")
    split = _held_out_split(records)
    bound = _series(records, "step", f"{split}_bound")
    trained = _series(records, "step", f"{split}_bound_trained")  # --ema: {split}_bound is the weight average's
    if len(loss[0]) == 0 and len(bound[0]) == 0:
        raise ValueError(f"no training ('step', 'loss') or evaluation ('step', '{split}_bound') records to plot")

    fig, ax = _figure(title, "step", gradient_records=records)
    if len(loss[0]):
        ax.plot(*loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss, per logged step")
        ax.plot(
            loss[0], _smooth(loss[1]), color="tab:blue", linewidth=1.8, zorder=3, label="loss L = L_x + L_z (smoothed)"
        )
    for (xs, ys), colour, label in ((l_x, "tab:green", "L_x reconstruction"), (l_z, "tab:orange", "L_z latent")):
        if len(xs):
            ax.plot(xs, _smooth(ys), color=colour, linewidth=1.2, label=label)
    if len(bound[0]):
        which = ", weight average" if len(trained[0]) else ""
        ax.plot(*bound, "o", color="tab:red", markersize=5, zorder=4, label=f"{split} bound{which} (last {bound[1][-1]:.2f})")
    if len(trained[0]):
        ax.plot(*trained, "x", color="tab:purple", markersize=5, zorder=4,
                label=f"{split} bound, trained weights (last {trained[1][-1]:.2f})")
    return _finish(fig, ax, _y_limits([loss, l_x, l_z, bound, trained], from_zero=True), path)


def save_loss_comparison(runs: dict, path, x: str = "step", title: str | None = None) -> pathlib.Path:
    """Plot several runs' smoothed training loss (and test-bound markers) on one axes.

    The y range zooms on the late half of the curves (lowest value to 95th percentile, plus margins)
    so that runs a few nats apart can be told apart.

    Args:
        runs: {label: metrics.jsonl path or list of dicts}, one colour per run, in the dict's order.
        path: where to write the figure.
        x: the record key on the x axis ("step", "epoch", ...). Evaluation records without it are
            placed by interpolating their step on the training records' (step, x) pairs.
        title: axes title.
    Returns:
        The path.
    """
    if not isinstance(runs, dict) or not runs:
        raise ValueError(f"runs must be a non-empty dict {{label: metrics path or records}}, got {runs!r:.80}")
    fig, ax = _figure(title, x)
    series = []
    for k, (label, source) in enumerate(runs.items()):
        records = _load_records(source)
        split = _held_out_split(records)
        loss, bound = _series(records, x, "loss"), _bound_series(records, x, split)
        if len(loss[0]) == 0 and len(bound[0]) == 0:
            raise ValueError(f"run {label!r}: no records with both {x!r} and 'loss' or '{split}_bound'")
        colour = f"C{k % 10}"
        smoothed = (loss[0], _smooth(loss[1]))
        if len(loss[0]):
            ax.plot(*smoothed, color=colour, linewidth=1.6, label=f"{label} (last {smoothed[1][-1]:.2f})")
        if len(bound[0]):
            ax.plot(
                *bound,
                "o",
                color=colour,
                markersize=5,
                markeredgecolor="black",
                markeredgewidth=0.5,
                label=f"{label}: {split} bound (last {bound[1][-1]:.2f})",
            )
        series += [smoothed, bound]
    return _finish(fig, ax, _y_limits(series, from_zero=False), path)


def save_error_curve(metrics_path_or_records, path, title: str | None = None) -> pathlib.Path:
    """Plot one classifier run: training error (per record, light, and smoothed) and test error, in %
    on a log scale (chance and the last few per cent both in view), with the gradient norm below.

    Training records carry {"step", "error"} (and "grad_norm"); evaluation records {"step",
    "test_error"} (or "valid_error": the last evaluation's split is plotted); both are fractions. Other
    records and non-finite values are ignored. The arguments and the return are save_loss_curve's.
    """
    records = _load_records(metrics_path_or_records)
    split = _held_out_split(records)
    train, test = _series(records, "step", "error"), _series(records, "step", f"{split}_error")
    if len(train[0]) == 0 and len(test[0]) == 0:
        raise ValueError(f"no training ('step', 'error') or evaluation ('step', '{split}_error') records to plot")
    fig, ax = _figure(title, "step", "error (%)", gradient_records=records)
    floor = 0.1  # per cent: an error of 0 still has a place on the log axis
    if len(train[0]):
        ax.plot(train[0], np.maximum(100 * train[1], floor), color="tab:blue", alpha=0.25, linewidth=0.8, label="training error, per record")
        ax.plot(train[0], np.maximum(100 * _smooth(train[1]), floor), color="tab:blue", linewidth=1.8, label="training error (smoothed)")
    if len(test[0]):
        ax.plot(test[0], np.maximum(100 * test[1], floor), "o-", color="tab:red", markersize=5, linewidth=1,
                label=f"{split} error (last {100 * test[1][-1]:.2f} %)")
    _percent_log_axis(ax)
    return _finish(fig, ax, None, path)


def _percent_log_axis(ax) -> None:
    """A log y axis labelled in plain per cent at 0.1, 0.2, 0.5, 1, 2, 5, ... 100."""
    _plain_log_axis(ax, [m * 10.0**e for e in (-1, 0, 1) for m in (1, 2, 5)] + [100.0])


def _log_ticks(values: np.ndarray) -> list[float]:
    """Ticks for a log axis over the positive `values`: 1, 2, 5 in each decade when they span at most two
    decades, else the powers of ten."""
    positive = values[values > 0]
    if not len(positive):
        return [1.0]
    low, high = math.floor(math.log10(positive.min())), math.ceil(math.log10(positive.max()))
    multiples = (1, 2, 5) if high - low <= 2 else (1,)
    return [m * 10.0**e for e in range(low, high + 1) for m in multiples]


def _plain_log_axis(ax, ticks: list[float] | None = None) -> None:
    """A log y axis labelled with plain numbers (0.1, 1, 10, not powers of ten), at `ticks` if given."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ax.set_yscale("log")
    if ticks is not None:
        ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


# ---------------------------------------------------------------------------------------------
# Samples beside their nearest training images (the paper's Figs. 6, 9 and 12)
# ---------------------------------------------------------------------------------------------


def samples_with_neighbours_grid(
    samples: torch.Tensor, neighbours: torch.Tensor, pairs_per_row: int | None = None, padding: int = 2, scale: int = 1
) -> Image.Image:
    """Each generated image with its nearest training image immediately to its right.

    Args:
        samples: [N, C, H, W] in [0, 1], C = 1 or 3.
        neighbours: [N, C, H, W] in [0, 1]: neighbours[k] is the training image nearest samples[k]
            (see draw.neighbours.nearest_neighbours; uint8 training images: data.to_float first).
        pairs_per_row: (sample, neighbour) pairs per grid row; default ceil(sqrt(N)).
        padding, scale: as image_grid.
    Returns:
        An RGB image_grid of 2 * pairs_per_row columns: even columns samples, odd columns neighbours.
    """
    _check_images(samples)
    _check_images(neighbours)
    if samples.shape != neighbours.shape:
        raise ValueError(f"samples {list(samples.shape)} and neighbours {list(neighbours.shape)} must have one shape")
    if pairs_per_row is None:
        pairs_per_row = math.ceil(math.sqrt(len(samples)))
    _check_int("pairs_per_row", pairs_per_row, 1)
    pairs_per_row = min(pairs_per_row, len(samples))
    paired = torch.stack([samples.float(), neighbours.float()], dim=1).flatten(0, 1)  # [N, 2, C, H, W] -> [2N, C, H, W]
    return image_grid(paired, nrow=2 * pairs_per_row, padding=padding, scale=scale)


def save_samples_with_neighbours(
    samples: torch.Tensor, neighbours: torch.Tensor, path, pairs_per_row: int | None = None, scale: int = 2
) -> pathlib.Path:
    """Save samples_with_neighbours_grid(samples, neighbours, pairs_per_row, scale=scale) as a PNG (atomically)."""
    grid = samples_with_neighbours_grid(samples, neighbours, pairs_per_row, scale=scale)
    return atomic_write(path, lambda f: grid.save(f, format="PNG"), durable=False)




# ---------------------------------------------------------------------------------------------
# A model's figures: the one path `draw train` and `draw sample` write them by
# ---------------------------------------------------------------------------------------------

SEQUENCE_IMAGES = 16  # images in the generation and reconstruction animations
GENERATE_CHUNK = 1000  # samples generated at once: memory stays bounded for any --n
NEIGHBOUR_SAMPLES = 32  # samples shown beside their nearest training image


@torch.no_grad()
def write_model_figures(model, out_dir, *, n_samples: int = 64, seed: int = 0, reconstruct: torch.Tensor | None = None,
                        metrics=None, training_images: torch.Tensor | None = None) -> list[pathlib.Path]:
    """Samples grid, generation GIF and strip, and optionally the reconstruction GIF, the samples beside
    their nearest training images (the paper's Figs. 6, 9, 12) and the loss curve.

    Args:
        model: a DRAW (draw.model.DRAW), on any device.
        out_dir: where to write samples.png, generation.gif, generation.png (and reconstruction.gif,
            loss_curve.png).
        n_samples: samples in samples.png, generated in chunks of GENERATE_CHUNK; the animations show
            the first SEQUENCE_IMAGES.
        seed: seed of the prior's noise (and of the reconstruction's).
        reconstruct: [N, C, H, W] images to reconstruct (the first SEQUENCE_IMAGES are used), or None.
        metrics: a metrics.jsonl path for the loss curve, or None.
        training_images: [N, C, H, W] (float or uint8) to search for the nearest image of each of the
            first NEIGHBOUR_SAMPLES samples (samples_neighbours.png), or None.
    Returns:
        The paths written.
    """
    _check_int("n_samples", n_samples, 1)
    out_dir = pathlib.Path(out_dir)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    write_n = model.config.write_n
    from draw.evaluate import image_noise

    finals, sequence = [], None
    for start in range(0, n_samples, GENERATE_CHUNK):
        count = min(GENERATE_CHUNK, n_samples - start)
        # sample i's noise from its own generator (seed, i): the same sample at any n_samples and on any device
        gen = model.generate(count, noise=image_noise(start, count, 1, model.config.T, model.config.z_size, seed))
        finals.append(torch.sigmoid(gen.canvases[-1]).cpu())  # [n, C, H, W]
        if sequence is None:
            params = None if gen.write_params is None else gen.write_params[:, :SEQUENCE_IMAGES].cpu()
            sequence = (gen.canvases[:, :SEQUENCE_IMAGES].cpu(), params)
        del gen
    written = [
        save_grid(torch.cat(finals), out_dir / "samples.png"),
        save_sequence_gif(sequence[0], out_dir / "generation.gif", sequence[1], write_n),
        save_sequence_strip(sequence[0], out_dir / "generation.png", sequence[1], write_n),
    ]
    if training_images is not None:
        from draw.data import centre_crop, to_float
        from draw.neighbours import nearest_neighbours

        samples = torch.cat(finals)[:NEIGHBOUR_SAMPLES]
        pool = training_images if training_images.shape[-2:] == samples.shape[-2:] else centre_crop(training_images, samples.shape[-1])
        index, _ = nearest_neighbours(samples, pool)
        neighbours = to_float(pool[index])
        written.append(save_samples_with_neighbours(samples, neighbours, out_dir / "samples_neighbours.png"))
    if reconstruct is not None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model(reconstruct[:SEQUENCE_IMAGES].to(device), return_sequence=True)
        params = None if out.write_params is None else out.write_params.cpu()
        written.append(save_sequence_gif(out.canvases.cpu(), out_dir / "reconstruction.gif", params, write_n))
    if metrics is not None and pathlib.Path(metrics).exists() and pathlib.Path(metrics).stat().st_size:
        written.append(save_loss_curve(metrics, out_dir / "loss_curve.png"))
    model.train(was_training)
    return written


# ---------------------------------------------------------------------------------------------
# The classifier's glimpses (the paper's Fig. 5)
# ---------------------------------------------------------------------------------------------

GLIMPSE_IMAGES = 8  # test images in the glimpse figure


@torch.no_grad()
def save_glimpse_figure(model, images: torch.Tensor, labels: torch.Tensor, path, scale: int = 1) -> pathlib.Path:
    """The succession of glimpse windows of the classifier (draw/classifier.py) over some images.

    One row per image, one column per glimpse t = 1..T: the image with the t-th read window drawn in red
    (the box around the read grid, as for DRAW's write window).

    Args:
        model: a DRAM, on any device.
        images: [N, C, H, W] in [0, 1].
        labels: [N] their classes (the model needs them to score; the figure does not show them).
        path: where to write the PNG.
    Returns:
        The path.
    """
    _check_images(images)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = model(images.to(device), labels.to(device), return_glimpses=True)
    model.train(was_training)
    steps = out.read_params.shape[0]
    logits = torch.logit(images.float().clamp(1e-4, 1 - 1e-4)).cpu()  # the strip draws sigmoid(logits): the image
    canvases = logits.unsqueeze(0).expand(steps, *logits.shape)  # [T, N, C, H, W]
    return save_sequence_strip(canvases, path, out.read_params.cpu(), model.config.read_n, steps=steps, scale=scale,
                               max_images=len(images))
