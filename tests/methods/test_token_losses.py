"""DFT, ASFT and EAFT: their per-token losses by hand, their stop-gradients, and their place in the loss."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmtune.losses import compute_losses, target_log_probs
from mmtune.methods.base import check_method_combination
from mmtune.methods.dft import ASFT, DFT, ASFTConfig, base_kl, base_logits, dft_token_loss
from mmtune.methods.eaft import EAFT, EAFTConfig, eaft_token_loss, normalized_topk_entropy
from mmtune.methods.multitask import PCGrad


class TokenTable(nn.Module):
    """A language model whose logits at a position are one row of a table, chosen by the input token."""

    def __init__(self, vocab: int = 5):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def toy(method_list):
    model = TokenTable()
    batch = {"input_ids": torch.tensor([[0, 1, 2, 3], [4, 3, 2, 0]]), "attention_mask": torch.ones(2, 4),
             "labels": torch.tensor([[-100, 1, 2, 3], [-100, -100, 2, 0]]), "tasks": ["a", "b"]}
    ctx = SimpleNamespace(model=model, unwrapped=model, trainable=dict(model.named_parameters()), tasks=["a", "b"])
    for method in method_list:
        if hasattr(method, "setup"):
            method.setup(ctx)
    return model, batch, ctx


def test_dft_token_loss_by_hand_and_its_stop_gradient():
    log_p = torch.log(torch.tensor([0.5, 0.1])).requires_grad_()
    loss = dft_token_loss(log_p)
    torch.testing.assert_close(loss, torch.tensor([-0.5 * math.log(0.5), -0.1 * math.log(0.1)]))
    loss.sum().backward()
    # d/dlog p of −sg(p)·log p is −p; without the stop-gradient it would be −p·(1 + log p)
    torch.testing.assert_close(log_p.grad, torch.tensor([-0.5, -0.1]))


@pytest.mark.parametrize("reduction", ["sample", "token"])
def test_dft_replaces_the_cross_entropy_and_keeps_ce_logged(reduction):
    model, batch, ctx = toy([])
    terms, outputs = compute_losses(ctx, [DFT()], batch, reduction)
    log_p, index = target_log_probs(outputs.logits, batch["labels"])
    weighted = -(log_p.exp() * log_p)
    if reduction == "sample":  # sample 0 has 3 target tokens, sample 1 has 2
        expected = (weighted[index == 0].mean() + weighted[index == 1].mean()) / 2
        plain = ((-log_p[index == 0]).mean() + (-log_p[index == 1]).mean()) / 2
    else:
        expected, plain = weighted.mean(), (-log_p).mean()
    torch.testing.assert_close(sum(terms.values()), expected)
    torch.testing.assert_close(terms["ce"], plain)


def test_base_kl_by_hand_and_only_through_the_model():
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)  # model: [1/4, 3/4]
    base = torch.tensor([[0.0, 0.0]], requires_grad=True)  # base: [1/2, 1/2]
    kl = base_kl(logits, base)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(base ‖ model)
    assert kl.item() == pytest.approx(expected)
    kl.sum().backward()
    assert base.grad is None or not base.grad.any()
    assert logits.grad.abs().sum() > 0
    assert base_kl(logits, logits.detach()).item() == pytest.approx(0.0, abs=1e-7)


def test_asft_anchors_to_the_pretrained_values_not_the_current_ones():
    method = ASFT(ASFTConfig(lam=0.5))
    model, batch, ctx = toy([method])
    at_base, _ = compute_losses(ctx, [method], batch, "token")
    dft_only, _ = compute_losses(ctx, [DFT()], batch, "token")
    torch.testing.assert_close(at_base["asft"], dft_only["dft"])  # at W0 the KL is 0
    with torch.no_grad():
        model.table.add_(torch.randn(5, 5, generator=torch.Generator().manual_seed(1)))
    outputs = model(**{k: batch[k] for k in ("input_ids", "attention_mask")})
    torch.testing.assert_close(base_logits(ctx, batch, method.pretrained), TokenTable().table[batch["input_ids"]])
    moved, _ = compute_losses(ctx, [method], batch, "token")
    moved_dft, _ = compute_losses(ctx, [DFT()], batch, "token")
    mask = batch["labels"][:, 1:] != -100
    kl = base_kl(outputs.logits[:, :-1][mask], TokenTable().table[batch["input_ids"]][:, :-1][mask])
    torch.testing.assert_close(moved["asft"] - moved_dft["dft"], 0.5 * kl.mean())
    assert method.pretrained["table"].data_ptr() != model.table.data_ptr()


def test_eaft_entropy_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0), -50.0], [1.0, 1.0, 1.0]])
    entropy = normalized_topk_entropy(logits, k=2)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)  # top-2 of row 0: [1/4, 3/4]
    torch.testing.assert_close(entropy, torch.tensor([h, 1.0]))
    assert normalized_topk_entropy(torch.tensor([[0.0, 30.0]]), k=2).item() < 1e-6  # certain: weight ~0
    assert normalized_topk_entropy(logits, k=50).shape == (2,)  # k above the vocabulary: the whole vocabulary


def test_eaft_weight_carries_no_gradient():
    log_p = torch.log(torch.tensor([0.5, 0.2])).requires_grad_()
    entropy = torch.tensor([0.5, 1.0], requires_grad=True)
    loss = eaft_token_loss(log_p, entropy, alpha=2.0)
    torch.testing.assert_close(loss, torch.tensor([-0.25 * math.log(0.5), -math.log(0.2)]))
    loss.sum().backward()
    assert entropy.grad is None
    torch.testing.assert_close(log_p.grad, torch.tensor([-0.25, -1.0]))


def test_eaft_uses_the_models_entropy_at_each_target():
    model, batch, ctx = toy([])
    terms, outputs = compute_losses(ctx, [EAFT(EAFTConfig(top_k=3))], batch, "token")
    log_p, _ = target_log_probs(outputs.logits, batch["labels"])
    mask = batch["labels"][:, 1:] != -100
    weights = normalized_topk_entropy(outputs.logits[:, :-1][mask], 3)
    torch.testing.assert_close(sum(terms.values()), (-weights * log_p).mean())
    plain, _ = compute_losses(ctx, [EAFT(EAFTConfig(alpha=0))], batch, "token")
    assert set(plain) == {"ce"}  # at alpha 0: no term, the plain cross-entropy


def test_token_losses_do_not_combine_with_each_other_or_with_step_builders():
    with pytest.raises(ValueError, match="only one method may replace"):
        check_method_combination([DFT(), EAFT()])
    with pytest.raises(ValueError, match="drop dft's token loss"):
        check_method_combination([DFT(), PCGrad()])
