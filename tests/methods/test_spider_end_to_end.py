"""After one step, every trainable tensor equals lerp(W0, W_adam, C), computed independently."""

import torch

from helpers import base_weights, final_weights
from mmtune.methods.base import METHODS, Method, register
from mmtune.methods.spider import allocation_coefficients, importance
from mmtune.train import train

RECORDED: dict[str, torch.Tensor] = {}


class GradientRecorder(Method):
    """Test-only: records the gradient the optimizer is about to use."""

    name = "test_gradient_recorder"

    def before_optimizer_step(self, ctx):
        for name, param in ctx.unwrapped.named_parameters():
            if param.grad is not None:
                RECORDED[name] = param.grad.detach().clone()


def test_one_spider_step_is_lerp_of_w0_and_the_adam_step(tiny_config):
    register(GradientRecorder)  # registered only for this test, so the method table stays the real one
    try:
        config = tiny_config("train.max_steps=1", "method.name=test_gradient_recorder", out="adam")
        adam = final_weights(train(config))
        spider = final_weights(train(tiny_config("train.max_steps=1", "method.name=spider", out="spider")))
    finally:
        METHODS.pop("test_gradient_recorder")
    base = base_weights(config)
    assert RECORDED
    checked = moved = total = 0
    for name, grad in RECORDED.items():
        w0, w_adam = base[name], adam[name]
        c = allocation_coefficients(importance(w0), importance(grad))
        torch.testing.assert_close(spider[name], torch.lerp(w0, w_adam, c), rtol=0, atol=1e-7)
        moved += int((c > 0).sum())
        total += c.numel()
        checked += 1
    assert checked == len(RECORDED)
    assert 0 < moved / total < 1  # some entries keep their update, others are pulled back to W0
