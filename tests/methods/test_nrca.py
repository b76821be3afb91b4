import pytest
import torch

from mmtune.methods.nrca import confidence_gap_loss, noisy_view, open_response_mask, token_confidence


def test_noisy_view_mixes_with_batch_statistics():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2)
    gen = torch.Generator().manual_seed(0)
    out = noisy_view(x, delta=0.5, generator=gen)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * x.std() + x.mean()
    torch.testing.assert_close(out, 0.5 * x + 0.5 * eps)
    assert torch.equal(noisy_view(x, 0.0, torch.Generator().manual_seed(1)), x)
    again = noisy_view(x, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # reproducible from the seed
    assert torch.equal(noisy_view(x, noise="zeros"), torch.zeros_like(x))
    with pytest.raises(ValueError, match="unknown noise"):
        noisy_view(x, noise="salt")


def test_token_confidence_by_hand():
    # vocab 2, one sample with targets at positions 1 and 2 (labels shifted by one)
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    loss, conf = token_confidence(logits, labels)
    p1 = 0.5  # logits[0] predicts label 1: softmax([0,0])[1]
    p2 = torch.softmax(torch.tensor([2.0, 0.0]), 0)[0].item()  # logits[1] predicts label 0
    assert loss.item() == pytest.approx(-(torch.log(torch.tensor(p1)) + torch.log(torch.tensor(p2))).item() / 2)
    assert conf.item() == pytest.approx((p1 + p2) / 2)


def test_confidence_gap_loss_by_hand_and_gradient_path():
    clean_loss = torch.tensor([2.0, 1.0, 3.0], requires_grad=True)
    clean_conf = torch.tensor([0.5, 0.8, 0.4], requires_grad=True)
    noisy_conf = torch.tensor([0.25, 0.8, 0.1], requires_grad=True)
    open_mask = torch.tensor([True, True, False])
    gap = confidence_gap_loss(clean_loss, clean_conf, noisy_conf, open_mask)
    expected = (2.0 * 0.25 / 0.5 + 1.0 * 0.0 / 0.8) / 2
    assert gap.item() == pytest.approx(expected)
    gap.backward()
    assert clean_loss.grad is None and clean_conf.grad is None  # stop-gradient on the clean branch
    assert noisy_conf.grad[2] == 0 and noisy_conf.grad[0] != 0


def test_gap_is_zero_without_open_samples():
    gap = confidence_gap_loss(torch.ones(2), torch.ones(2), torch.ones(2, requires_grad=True) * 0.5,
                              torch.tensor([False, False]))
    assert gap.item() == 0.0


def test_open_rules():
    batch = {"open_mask": torch.tensor([True, False]), "labels": torch.tensor([[-100, 5, 6, 7], [-100, -100, 5, 6]])}
    assert open_response_mask(batch, "kind").tolist() == [True, False]
    assert open_response_mask(batch, "tokens").tolist() == [True, False]  # 3 target tokens > 2; 2 is not
