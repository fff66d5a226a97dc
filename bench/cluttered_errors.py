"""Where a cluttered-MNIST classifier looked, on the test images it classifies right and wrong.

For a trained `cluttered-8` / `cluttered-4` run, the test images' layout (where each digit was placed)
is drawn again from the generator's seed (draw/data_mnist_composites.py), the model classifies the
test set keeping every glimpse's window (draw/figures.py window_boxes: the box around the read grid),
and the glimpses are scored against the digit: a glimpse is "on the digit" when its box contains the
centre of the digit's 28x28 square. An error whose last glimpse is not on the digit is a search
failure (the glimpses never settled on the digit); one whose last glimpse is on it, a recognition
failure (the digit was seen and misread, or a distractor overlapping it misled).

    python bench/cluttered_errors.py runs/c8-e120 --json bench/results/cluttered-errors-cpu.json
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import common
from draw import data
from draw.checkpoint import load_checkpoint, model_from_checkpoint, uses_average
from draw.data_mnist_composites import CLUTTERED_SEED, CLUTTERED_SIZES, cluttered_mnist
from draw.figures import window_boxes

DIGIT_SIDE = 28  # an MNIST digit's square, placed whole in the image


def coverage(boxes: np.ndarray, digit_at: np.ndarray, wrong: np.ndarray) -> dict:
    """Glimpses against the digit.

    Args:
        boxes: [T, N, 4] (left, top, right, bottom) of every glimpse, 0-based pixels.
        digit_at: [N, 2] (row, column) of each digit's top-left pixel.
        wrong: [N] bool, the misclassified images.
    Returns:
        on_digit_share: per glimpse t, the share of right and of wrong images whose t-th glimpse is on
        the digit; median_half_width per glimpse (pixels); counts of errors by kind.
    """
    centre_y = digit_at[:, 0] + (DIGIT_SIDE - 1) / 2
    centre_x = digit_at[:, 1] + (DIGIT_SIDE - 1) / 2
    on_digit = ((boxes[..., 0] <= centre_x) & (centre_x <= boxes[..., 2])
                & (boxes[..., 1] <= centre_y) & (centre_y <= boxes[..., 3]))  # [T, N]
    right = ~wrong

    def share(mask):
        return [round(float(v), 4) for v in on_digit[:, mask].mean(axis=1)] if mask.any() else []

    return {
        "images": int(len(wrong)),
        "errors": int(wrong.sum()),
        "search_failures": int((wrong & ~on_digit[-1]).sum()),
        "recognition_failures": int((wrong & on_digit[-1]).sum()),
        "on_digit_share_right": share(right),
        "on_digit_share_wrong": share(wrong),
        "median_half_width": [round(float(v), 1) for v in np.median((boxes[..., 2] - boxes[..., 0]) / 2, axis=1)],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory of a cluttered classifier (its checkpoint.pt)")
    parser.add_argument("--data-dir", default=None, help="where MNIST is cached (default as draw train)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--json", metavar="PATH", help="write the figures and metadata here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    payload = load_checkpoint(args.run / "checkpoint.pt")
    model = model_from_checkpoint(payload, weights="average").eval()  # a --ema run's average, as its test_error
    weights = "average" if uses_average(payload) else "trained"
    if hasattr(model, "generate"):
        parser.error(f"{args.run} holds a DRAW model, not a glimpse classifier")
    model.backend = "reference"
    mnist, _ = data.mnist_grey_levels(args.data_dir, progress=False)
    test_size = CLUTTERED_SIZES[2]
    images, labels, layout = cluttered_mnist(*mnist["test"], test_size, CLUTTERED_SEED, "test")
    wrong, boxes = [], []
    with torch.no_grad():
        for start in range(0, test_size, args.batch_size):
            x = torch.from_numpy(images[start:start + args.batch_size]).float() / 255
            out = model(x, torch.from_numpy(labels[start:start + args.batch_size]), return_glimpses=True)
            wrong.append(out.error.bool().numpy())
            boxes.append(window_boxes(out.read_params, model.config.read_n, model.config.height, model.config.width).numpy())
    result = coverage(np.concatenate(boxes, axis=1), layout.digit_at[:, 0], np.concatenate(wrong))
    result["test_error_percent"] = round(100 * result["errors"] / result["images"], 2)
    print(f"{args.run}: test error {result['test_error_percent']} % ({result['errors']} of {result['images']}): "
          f"{result['search_failures']} search failures (last glimpse off the digit), "
          f"{result['recognition_failures']} recognition failures (last glimpse on it)")
    print("glimpse                 " + " ".join(f"{t + 1:>6}" for t in range(len(result["median_half_width"]))))
    for label, key in (("median half width, px", "median_half_width"), ("on the digit, right", "on_digit_share_right"),
                       ("on the digit, wrong", "on_digit_share_wrong")):
        print(f"{label:<24}" + " ".join(f"{v:>6}" for v in result[key]))
    if args.json:
        meta = common.metadata(torch.device("cpu"), run=str(args.run), step=payload.get("step"), weights=weights)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"metadata": meta, **result}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
