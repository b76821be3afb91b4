import pytest
import torch

from mmtune.methods.spider import allocate, allocation_coefficients, importance


def test_importance_by_hand():
    a = torch.tensor([1.0, -2.0, 3.0])
    mag = a.abs()
    expected = torch.sigmoid((mag - mag.mean()) / mag.std(unbiased=True))
    torch.testing.assert_close(importance(a), expected)


@pytest.mark.parametrize("tensor,value", [
    (torch.zeros(4), 0.0),
    (torch.full((3, 2), -2.0), 0.5),
    (torch.tensor([7.0]), 0.5),
])
def test_importance_edge_cases(tensor, value):
    out = importance(tensor)
    assert torch.isfinite(out).all() and torch.all(out == value)


def test_allocation_coefficients_by_hand():
    pre = torch.tensor([0.2, 0.6, 0.5, 0.1])
    ft = torch.tensor([0.6, 0.2, 0.5, 0.3])
    raw = torch.tensor([0.6 / 0.8, 0.0, 0.0, 0.3 / 0.4])  # only where pre < ft
    expected = (raw / raw[raw > 0].mean()).clamp(max=1)
    torch.testing.assert_close(allocation_coefficients(pre, ft), expected)
    assert allocation_coefficients(pre, ft).max() <= 1


def test_allocation_all_zero_when_pretrained_dominates():
    pre = torch.tensor([0.9, 0.8])
    ft = torch.tensor([0.1, 0.2])
    assert torch.equal(allocation_coefficients(pre, ft), torch.zeros(2))


def test_allocate_interpolates_towards_pretrained():
    w0 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.tensor([2.0, 2.5, 2.0, 5.0])
    g = torch.tensor([0.1, -5.0, 0.0, 4.0])
    c = allocation_coefficients(importance(w0), importance(g))
    torch.testing.assert_close(allocate(w, w0, g), w0 + c * (w - w0))


@pytest.mark.parametrize("pretrained,grad_sum", [
    (torch.randn(6, 5, generator=torch.Generator().manual_seed(1)), torch.randn(6, 5, generator=torch.Generator().manual_seed(2))),
    (torch.zeros(7), torch.randn(7, generator=torch.Generator().manual_seed(3))),
    (torch.ones(4), torch.zeros(4)),
    (torch.tensor([3.0]), torch.tensor([1.0])),
])
def test_compiled_update_equals_the_rule(pretrained, grad_sum):
    from mmtune.methods.spider import compiled_allocate

    weight = pretrained + 0.1 * torch.randn(pretrained.shape, generator=torch.Generator().manual_seed(4))
    c = allocation_coefficients(importance(pretrained), importance(grad_sum))
    torch.testing.assert_close(compiled_allocate(weight, pretrained, grad_sum), pretrained + c * (weight - pretrained))
