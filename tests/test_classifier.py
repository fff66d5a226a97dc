"""The differentiable RAM classifier of Sec. 4.1 (draw/classifier.py)."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from draw.classifier import DRAM, ClipPerImageGradient
from draw.config import ClassifierConfig
from helpers import import_bench

SMALL = ClassifierConfig(height=20, width=24, channels=1, glimpses=3, lstm_size=16, read_n=4, classes=3)


def test_forward_shapes_loss_and_error():
    torch.manual_seed(0)
    model = DRAM(SMALL)
    x, labels = torch.rand(5, 1, 20, 24), torch.tensor([0, 1, 2, 1, 0])
    out = model(x, labels, return_glimpses=True)
    assert out.logits.shape == (5, 3) and out.error.shape == (5,) and out.read_params.shape == (3, 5, 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert torch.equal(out.error, (out.logits.argmax(1) != labels).float())
    assert model.statistics(out).shape == (2,)


def test_glimpses_read_only_the_image_through_the_attention():
    """Each glimpse is kernels.glimpse of x at parameters from the previous hidden state (Eq. 21):
    the triton backend (Triton's interpreter on CPU) gives the reference's logits and gradients."""
    torch.manual_seed(0)
    model = DRAM(SMALL, backend="reference").double()
    x, labels = torch.rand(3, 1, 20, 24, dtype=torch.float64), torch.tensor([0, 1, 2])  # B = 3: not a power of two
    ref = model(x, labels)
    grads = torch.autograd.grad(ref.loss, list(model.parameters()))
    model.backend = "triton"
    fused = model(x, labels)
    torch.testing.assert_close(fused.logits, ref.logits, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused.loss, list(model.parameters())), grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_under_autocast_the_glimpses_come_in_its_dtype(backend):
    """Under bf16 autocast the glimpses are made in bf16, so autocast does not cast them for the LSTM (one
    cast kernel per glimpse on a GPU), and the loss stays as near the fp32 loss as bf16 allows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class GlimpseCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == (5, 9):
                self.count += 1  # a flattened glimpse [B, C*N*N] (the hidden state is [5, 16])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = DRAM(dataclasses.replace(SMALL, read_n=3), backend=backend)
    x, labels = torch.rand(5, 1, 20, 24), torch.tensor([0, 1, 2, 1, 0])
    fp32 = model(x, labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16), GlimpseCasts() as casts:
        bf16 = model(x, labels).loss
    assert casts.count == 0
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=2e-2)


def test_it_learns_where_the_class_is():
    """A bright square in one of three places, on a noisy background: the classifier learns which place."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (96,), generator=g)
    x = 0.2 * torch.rand(96, 1, 20, 24, generator=g)
    for k, col in enumerate((2, 10, 18)):
        x[labels == k, :, 8:12, col : col + 4] = 1.0
    model = DRAM(SMALL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        out = model(x, labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert model(x, labels).error.mean() < 0.1


def test_bad_inputs_are_refused():
    model = DRAM(SMALL)
    with pytest.raises(ValueError, match=r"x must be \[B, 1, 20, 24\]"):
        model(torch.zeros(2, 1, 24, 20), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be \[B\] = \[2\]"):
        model(torch.zeros(2, 1, 20, 24), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="glimpses must be an int >= 1"):
        ClassifierConfig(glimpses=0)


def test_clip_per_image_gradient_clips_each_images_own_gradient():
    """The gradient of a batch-mean loss is 1/B of each image's own: the clip bounds that, image by image,
    so an image's clipped gradient does not depend on the batch around it."""
    torch.manual_seed(0)
    p = torch.randn(6, 5, requires_grad=True)
    weights = torch.tensor([[0.1], [2.0], [-0.5], [30.0], [1.0], [-8.0]]) * torch.randn(6, 5)
    per_image_loss = lambda q, w=weights: (w * q).sum(1)  # image i's own gradient is weights[i]
    (clipped,) = torch.autograd.grad(per_image_loss(ClipPerImageGradient.apply(p, 1.5)).mean(), p)
    torch.testing.assert_close(clipped, weights.clamp(-1.5, 1.5) / 6)
    for i in range(6):  # alone in a batch of one
        (own,) = torch.autograd.grad(per_image_loss(ClipPerImageGradient.apply(p[i : i + 1], 1.5), weights[i : i + 1]).mean(), p)
        torch.testing.assert_close(own[i], weights[i].clamp(-1.5, 1.5))
    assert torch.equal(ClipPerImageGradient.apply(p, 1.5), p)  # the forward is the identity


def test_the_attention_gradient_clip_changes_the_backward_only():
    """attention_grad_clip: the same loss; a clip no gradient reaches gives the exact gradient; a small one
    changes the gradient of every parameter upstream of the first glimpse's attention, not the classifier's."""
    torch.manual_seed(0)
    model = DRAM(SMALL, backend="reference").double()
    x, labels = torch.rand(3, 1, 20, 24, dtype=torch.float64), torch.tensor([0, 1, 2])  # B = 3: not a power of two

    def loss_and_grads(limit):
        model.attention_grad_clip = limit
        out = model(x, labels)
        return out.loss, dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(out.loss, list(model.parameters()))))

    exact_loss, exact = loss_and_grads(None)
    loose_loss, loose = loss_and_grads(1e9)
    tight_loss, tight = loss_and_grads(1e-6)
    assert exact_loss.item() == loose_loss.item() == tight_loss.item()
    for name in exact:
        assert torch.equal(loose[name], exact[name]), name
    torch.testing.assert_close(tight["to_logits.weight"], exact["to_logits.weight"], rtol=0, atol=0)
    for name in ("to_read_params.weight", "h0"):
        assert (tight[name] - exact[name]).abs().max() > 1e-6 * exact[name].abs().max(), name
    assert tight["to_read_params.weight"].abs().max() < exact["to_read_params.weight"].abs().max()


def test_accumulation_keeps_the_attention_clip_per_image():
    """accumulate 2 computes the gradient of accumulate 1 with the per-image clip on: each micro-batch's
    backward sees its images' own gradients (the micro-batch means are averaged afterwards)."""
    from draw.step import TrainStep

    x, labels = located_squares(16, seed=3)

    def gradient(accumulate, limit):
        torch.manual_seed(0)
        model = DRAM(SMALL)
        model.attention_grad_clip = limit
        TrainStep(model, lr=1e-2, grad_clip=1e9, accumulate=accumulate)((x, labels), lr=1e-2)
        return {name: p.grad for name, p in model.named_parameters()}  # the step's gradient, kept until the next

    clipped, exact = gradient(1, 1e-4), gradient(1, None)
    attention = "to_read_params.weight"
    assert (clipped[attention] - exact[attention]).abs().max() > 0.5 * exact[attention].abs().max()  # the clip acts
    for name, grad in gradient(2, 1e-4).items():
        torch.testing.assert_close(grad, clipped[name], rtol=1e-5, atol=1e-9, msg=name)


def test_attention_grad_clip_is_a_classifier_training_setting(tmp_path, squares_dataset):
    from draw.config import DRAWConfig, TrainConfig
    from draw.train import train

    with pytest.raises(ValueError, match="attention_grad_clip must be a finite number > 0"):
        TrainConfig(attention_grad_clip=0.0)
    assert TrainConfig.from_dict({k: v for k, v in TrainConfig().to_dict().items() if k != "attention_grad_clip"}).attention_grad_clip is None
    config = TrainConfig(dataset="mnist-cluttered", batch_size=32, steps=2, attention_grad_clip=1.0)
    with pytest.raises(ValueError, match="DRAW does not take it"):
        train(tmp_path / "draw", model_config=DRAWConfig(height=20, width=24, T=2, enc_size=8, dec_size=8, z_size=2),
              train_config=config, progress=False)
    assert not (tmp_path / "draw").exists()
    with pytest.raises(ValueError, match="keeps the run's arithmetic.*attention_grad_clip 1.0 -> 2.0"):
        train(tmp_path / "c", model_config=SMALL, train_config=config, progress=False, make_figures=False)
        train(tmp_path / "c", resume=True, overrides={"attention_grad_clip": 2.0}, progress=False)


def located_squares(n: int, seed: int):
    """Images [n, 1, 20, 24] with a bright square in one of three places (the label), on noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    x = 0.2 * torch.rand(n, 1, 20, 24, generator=g)
    for k, col in enumerate((2, 10, 18)):
        x[labels == k, :, 8:12, col : col + 4] = 1.0
    return x, labels


@pytest.fixture
def squares_dataset(monkeypatch):
    """A small labelled dataset standing in for cluttered MNIST (same name, so the configs accept it)."""
    from draw import data

    (train, y_train), (valid, y_valid), (test, y_test) = (located_squares(n, s) for n, s in ((256, 0), (64, 1), (64, 2)))
    dataset = data.Dataset("mnist-cluttered", train, valid, test, source="squares", train_is_binary=False, binarize=False,
                           labels={"train": y_train, "valid": y_valid, "test": y_test})
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: dataset)
    monkeypatch.setattr("draw.train.load_dataset", lambda *args, **kwargs: dataset)
    return dataset


def test_the_classifier_trains_resumes_evaluates_and_shows_its_glimpses(tmp_path, squares_dataset, capsys):
    import json

    from draw.checkpoint import load_checkpoint
    from draw.cli import main
    from draw.config import TrainConfig
    from draw.rundir import read_metrics
    from draw.train import train

    config = TrainConfig(dataset="mnist-cluttered", batch_size=32, lr=1e-2, steps=40, eval_every=20, log_every=10,
                         checkpoint_every=20, seed=0)
    full, split = tmp_path / "full", tmp_path / "split"
    summary = train(full, model_config=SMALL, train_config=config, progress=False)
    train(split, model_config=SMALL, train_config=config, overrides={"steps": 20}, progress=False, make_figures=False)
    train(split, resume=True, overrides={"steps": 40}, progress=False)
    records = lambda d: [(r["step"], r["loss"], r["error"]) for r in read_metrics(d / "metrics.jsonl") if "loss" in r]
    assert records(split) == records(full)
    assert summary["model_kind"] == "classifier" and summary["test_error"] < 0.2
    assert load_checkpoint(full)["model_kind"] == "classifier"
    assert (full / "glimpses.png").is_file() and (full / "error_curve.png").is_file()
    capsys.readouterr()
    assert main(["eval", str(full)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["error"] == pytest.approx(summary["test_error"]) and result["error_percent"] == pytest.approx(100 * result["error"])
    assert main(["sample", str(full), "--n", "4", "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "glimpses.png").is_file()
    capsys.readouterr()  # flags with no meaning for a classifier are refused in one line, not ignored
    assert main(["eval", str(full), "--importance-samples", "3"]) == 2
    assert "holds a glimpse classifier: it has a test error, no importance-weighted bound" in capsys.readouterr().err
    assert main(["sample", str(full), "--neighbours", "--out", str(tmp_path / "h")]) == 2
    assert "it draws no samples to set beside training images (--neighbours)" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_a_classifier_evaluated_on_the_validation_split(tmp_path, squares_dataset):
    """--eval-split valid: the classifier's evaluations are its error on the validation images and labels
    (valid_error, valid_loss), which differ from the test split's; the error curve is drawn from them."""
    from draw.checkpoint import load_checkpoint, model_from_checkpoint
    from draw.config import TrainConfig
    from draw.evaluate import evaluate_classifier
    from draw.train import train

    config = TrainConfig(dataset="mnist-cluttered", batch_size=32, lr=1e-2, steps=3, eval_every=3, seed=0, eval_split="valid")
    summary = train(tmp_path / "run", model_config=SMALL, train_config=config, progress=False)
    model = model_from_checkpoint(load_checkpoint(tmp_path / "run")).eval()
    scores = {split: evaluate_classifier(model, getattr(squares_dataset, split), squares_dataset.split_labels(split))
              for split in ("valid", "test")}
    assert summary["valid_error"] == pytest.approx(scores["valid"]["error"])
    assert summary["valid_loss"] == pytest.approx(scores["valid"]["loss"], rel=1e-5)
    assert summary["valid_loss"] != pytest.approx(scores["test"]["loss"], rel=1e-3) and "test_error" not in summary
    assert (tmp_path / "run" / "error_curve.png").is_file()


def test_fixed_binarization_of_data_that_is_not_binarized_is_refused(tmp_path, squares_dataset):
    from draw.config import TrainConfig
    from draw.train import train

    config = TrainConfig(dataset="mnist-cluttered", batch_size=32, steps=1, fixed_binarization=True)
    with pytest.raises(ValueError, match="mnist-cluttered is used as it is"):
        train(tmp_path / "run", model_config=SMALL, train_config=config, progress=False)
    assert not (tmp_path / "run").exists()


def test_glimpse_figure_draws_one_window_per_glimpse(tmp_path):
    from PIL import Image

    from draw.figures import save_glimpse_figure

    x, labels = located_squares(3, 0)
    path = save_glimpse_figure(DRAM(SMALL), x, labels, tmp_path / "g.png")
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = (picture[..., 0] > 200) & (picture[..., 1] < 60) & (picture[..., 2] < 60)
    assert red.any()
    columns_with_red = np.flatnonzero(red.any(0))
    assert columns_with_red.max() - columns_with_red.min() > 2 * 24  # windows in at least three glimpse columns


def test_the_explosion_replay_benchmark_replays_one_state_under_each_clip(tmp_path, monkeypatch):
    """bench/bench_glimpse_explosion.py on a tiny stand-in for cluttered MNIST: a clip no gradient reaches
    replays the steps of the exact gradient (same state, batches and learning rates); a tiny one does not."""
    import json
    import sys

    from draw import data

    bench_glimpse_explosion = import_bench("bench_glimpse_explosion")
    g = torch.Generator().manual_seed(0)
    splits = [(torch.rand(n, 1, 100, 100, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in (200, 10, 10)]
    dataset = data.Dataset("mnist-cluttered", *(x for x, _ in splits), source="noise", train_is_binary=False, binarize=False,
                           labels=dict(zip(("train", "valid", "test"), (y for _, y in splits))),
                           fresh_train=lambda indices, seed: ((255 * splits[0][0][indices]).to(torch.uint8), splits[0][1][indices]))
    monkeypatch.setattr("draw.train.load_dataset", lambda *args, **kwargs: dataset)
    out = tmp_path / "explosion"
    monkeypatch.setattr(sys, "argv", ["bench_glimpse_explosion.py", "--start", "2", "--steps", "2", "--clips", "0,1e9,1e-6",
                                      "--out", str(out)])
    bench_glimpse_explosion.main()
    result = json.loads(out.with_suffix(".json").read_text())
    assert [row["clip"] for row in result["results"]] == ["none", 1e9, 1e-6]
    curves = result["curves"]
    assert [r["step"] for r in curves["none"]] == [3, 4]
    assert curves["1000000000.0"] == curves["none"]  # a clip no gradient reaches is the exact gradient
    assert curves["1e-06"][1]["loss"] != curves["none"][1]["loss"]
    assert out.with_suffix(".md").read_text().startswith("# cluttered-8")


def test_the_attention_grad_clip_flag(tmp_path, monkeypatch, capsys):
    """--attention-grad-clip C sets the run's clip, 0 the exact gradient; left out, the preset's; below 0 refused."""
    from draw.cli import main
    from draw.config import get_preset

    seen = []
    monkeypatch.setattr("draw.train.train", lambda out, **kwargs: seen.append(kwargs["train_config"].attention_grad_clip))
    for flags in (["--attention-grad-clip", "2.5"], ["--attention-grad-clip", "0"], []):
        assert main(["train", "--preset", "cluttered-8", "--out", str(tmp_path / "run"), *flags]) == 0
    assert seen == [2.5, None, get_preset("cluttered-8").train.attention_grad_clip]
    with pytest.raises(SystemExit):
        main(["train", "--preset", "cluttered-8", "--attention-grad-clip", "-1"])
    assert "must be a finite number >= 0, got -1" in capsys.readouterr().err


def test_the_error_analysis_scores_glimpses_against_the_digit():
    """bench/cluttered_errors.py: a glimpse is on the digit when its box holds the digit's centre; an error
    is a search failure when the last glimpse is off the digit, else a recognition failure."""
    cluttered_errors = import_bench("cluttered_errors")
    digit_at = np.array([[10, 50], [60, 0], [0, 0]])  # (row, column): centres (x, y) = (63.5, 23.5), (13.5, 73.5), (13.5, 13.5)
    whole = [0.0, 0.0, 99.0, 99.0]
    boxes = np.array([[whole, whole, whole],  # glimpse 1 sees the whole image
                      [[60, 20, 70, 30], [0, 0, 20, 20], [10, 10, 20, 20]]])  # glimpse 2: on, off, on
    result = cluttered_errors.coverage(boxes, digit_at, wrong=np.array([False, True, True]))
    assert (result["errors"], result["search_failures"], result["recognition_failures"]) == (2, 1, 1)
    assert result["on_digit_share_right"] == [1.0, 1.0]
    assert result["on_digit_share_wrong"] == [1.0, 0.5]
    assert result["median_half_width"] == [49.5, 5.0]


def test_the_evaluation_is_the_mean_error_and_cross_entropy_in_any_batches():
    """evaluate_classifier over batches of 3 (the last short): the fraction of argmax(logits) != label and the
    mean cross-entropy of the logits of one forward over all the images, as images of a uint8 set."""
    from draw.evaluate import evaluate_classifier

    torch.manual_seed(0)
    model = DRAM(SMALL)
    images = torch.randint(0, 256, (7, 1, 20, 24), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    result = evaluate_classifier(model, images, labels, batch_size=3)
    with torch.no_grad():
        logits = model(images.float() / 255, labels).logits
    assert result["images"] == 7
    assert result["error"] == pytest.approx((logits.argmax(1) != labels).float().mean().item())
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert 0 < result["error"] < 1  # a test that sees both right and wrong answers
