"""The differentiable RAM classifier of Sec. 4.1 (draw/classifier.py)."""

import pytest
import torch
import torch.nn.functional as F

from draw.classifier import DRAM
from draw.config import ClassifierConfig

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
    x, labels = torch.rand(4, 1, 20, 24, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    ref = model(x, labels)
    grads = torch.autograd.grad(ref.loss, list(model.parameters()))
    model.backend = "triton"
    fused = model(x, labels)
    torch.testing.assert_close(fused.logits, ref.logits, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused.loss, list(model.parameters())), grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


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


def test_glimpse_figure_draws_one_window_per_glimpse(tmp_path):
    import numpy as np
    from PIL import Image

    from draw.figures import save_glimpse_figure

    x, labels = located_squares(3, 0)
    path = save_glimpse_figure(DRAM(SMALL), x, labels, tmp_path / "g.png")
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = (picture[..., 0] > 200) & (picture[..., 1] < 60) & (picture[..., 2] < 60)
    assert red.any()
    columns_with_red = np.flatnonzero(red.any(0))
    assert columns_with_red.max() - columns_with_red.min() > 2 * 24  # windows in at least three glimpse columns
