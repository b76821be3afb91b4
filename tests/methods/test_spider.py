import pytest
import torch

from mmtune.methods.spider import allocate, allocate_, allocation_coefficients, importance, standardisation


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
def test_importance_edge_cases_neutral(tensor, value):
    out = importance(tensor, constant="neutral")
    assert torch.isfinite(out).all() and torch.all(out == value)


def test_constant_magnitude_is_nan_and_frozen_by_default_as_the_released_code():
    # The released code: (|W| − mean) / std with std 0 → NaN importance → every comparison false → C = 0.
    ones = torch.ones(3, 2)
    assert torch.isnan(importance(ones)).all() and torch.isnan(importance(torch.tensor([7.0]))).all()
    assert torch.all(importance(torch.zeros(4)) == 0)  # all-zero stays 0 (the spec's rule), not NaN
    moved = ones + torch.tensor([[0.1, -0.2], [0.3, 0.0], [0.05, 0.4]])
    grad_sum = torch.tensor([[1.0, -3.0], [0.5, 2.0], [0.1, 0.2]])
    assert torch.equal(allocate(moved, ones, grad_sum), ones)  # held at W0
    neutral = allocate(moved, ones, grad_sum, constant="neutral")
    assert not torch.equal(neutral, ones)  # moves where I(G) > 0.5


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


def test_a_one_ulp_win_still_moves():
    # I_ft beats I_pre by one ulp: I_pre + I_ft rounds to 2·I_ft, so the ratio is exactly 0.5. A threshold on
    # the ratio would drop this entry; the rule keeps it.
    pre = torch.tensor([1.0 - 2.0**-24, 0.2])
    ft = torch.tensor([1.0, 0.1])
    c = allocation_coefficients(pre, ft)
    assert c[0] == 1.0 and c[1] == 0.0


def test_both_importances_zero_do_not_move():
    # An all-zero W0 (a zero-initialised bias) and an all-zero G (no gradient yet): 0/0, which must not be NaN.
    c = allocation_coefficients(importance(torch.zeros(5)), importance(torch.zeros(5)))
    assert torch.equal(c, torch.zeros(5))


def test_pure_functions_leave_their_inputs_alone():
    pre, ft = torch.tensor([0.2, 0.6]), torch.tensor([0.6, 0.2])
    a = torch.tensor([1.0, -2.0])
    importance(a)
    allocation_coefficients(pre, ft)
    assert torch.equal(a, torch.tensor([1.0, -2.0]))
    assert torch.equal(pre, torch.tensor([0.2, 0.6])) and torch.equal(ft, torch.tensor([0.6, 0.2]))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("pretrained,grad_sum", [
    (torch.randn(64, 33, generator=_generator(1)), torch.randn(64, 33, generator=_generator(2))),
    (torch.zeros(7), torch.randn(7, generator=_generator(3))),
    (torch.zeros(7), torch.zeros(7)),
    (torch.ones(4), torch.zeros(4)),
    (torch.tensor([3.0]), torch.tensor([1.0])),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_update_equals_the_rule(pretrained, grad_sum, dtype):
    weight = (pretrained + 0.1 * torch.randn(pretrained.shape, generator=_generator(4))).to(dtype)
    expected = allocate(weight, pretrained, grad_sum)
    c = allocation_coefficients(importance(pretrained), importance(grad_sum))
    torch.testing.assert_close(expected.float(), torch.lerp(pretrained, weight.float(), c).to(dtype).float())
    buffers = tuple(torch.full((3 * pretrained.numel(),), float("nan")).view(3, *pretrained.shape))  # dirty scratch
    pretrained_before, grad_sum_before = pretrained.clone(), grad_sum.clone()
    allocate_(weight, pretrained, grad_sum, standardisation(pretrained), buffers)
    assert torch.equal(weight, expected)
    assert torch.equal(pretrained, pretrained_before) and torch.equal(grad_sum, grad_sum_before)
