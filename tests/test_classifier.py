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
