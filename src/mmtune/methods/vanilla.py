"""vanilla: plain cross-entropy fine-tuning of the trainable scope — the baseline every method is compared to."""

from mmtune.methods.base import Method, register


@register
class Vanilla(Method):
    name = "vanilla"
    description = "plain cross-entropy fine-tuning (the reference point)"
    supports_sharding = True
