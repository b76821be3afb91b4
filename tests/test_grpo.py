"""GRPO's math (issue 38): the loss of a fixed batch (fixed samples, log-probabilities and rewards) equals TRL's
GRPOTrainer loss, the KL term its definition by hand, and the rewards follow the task's own metric."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mmtune.data.records import Record
from mmtune.grpo import CiderCorpus, cider_d, group_advantages, per_token_kl, policy_loss, verifiable_reward


def _batch(seed: int = 0, answers: int = 6, tokens: int = 5):
    generator = torch.Generator().manual_seed(seed)
    logps = -torch.rand(answers, tokens, generator=generator) * 3
    old = logps + torch.randn(answers, tokens, generator=generator) * 0.3  # some ratios beyond 1 ± 0.2
    ref = logps + torch.randn(answers, tokens, generator=generator) * 0.5
    mask = torch.ones(answers, tokens)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 0.0])
    return logps, old, ref, mask, rewards


def _trl_loss(logps, old, ref, mask, advantages, beta, loss_type, epsilon=0.2):
    """TRL's own GRPOTrainer._compute_loss on the same tensors (its forward replaced by the fixed log-probabilities)."""
    trl = pytest.importorskip("trl")
    trainer = trl.GRPOTrainer.__new__(trl.GRPOTrainer)
    fields = {"beta": beta, "loss_type": loss_type, "epsilon_low": epsilon, "epsilon_high": epsilon,
              "importance_sampling_level": "token", "top_entropy_quantile": 1.0, "off_policy_mask_threshold": None,
              "use_vllm": False, "aux_loss_enabled": False, "_entropy_bonus_enabled": False,
              "current_gradient_accumulation_steps": 1, "model": SimpleNamespace(training=True),
              "_metrics": {"train": defaultdict(list)},
              "args": SimpleNamespace(delta=None, use_bias_correction_kl=False),
              "accelerator": SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x),
              "_get_per_token_logps_and_entropies": lambda *args, **kwargs: (logps, torch.zeros_like(logps), None)}
    for name, value in fields.items():
        object.__setattr__(trainer, name, value)
    answers, tokens = logps.shape
    inputs = {"prompt_ids": torch.zeros(answers, 2, dtype=torch.long), "prompt_mask": torch.ones(answers, 2),
              "completion_ids": torch.zeros(answers, tokens, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref}
    return trainer._compute_loss(None, inputs), trainer._metrics["train"]


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_the_loss_of_a_fixed_batch_equals_trls(beta, loss_type):
    logps, old, ref, mask, rewards = _batch()
    advantages = group_advantages(rewards, group_size=3)
    mine = policy_loss(logps, old, advantages, mask, beta=beta, ref_logps=ref, loss_type=loss_type)
    theirs, metrics = _trl_loss(logps, old, ref, mask, advantages, beta, loss_type)
    torch.testing.assert_close(mine["loss"], theirs, rtol=1e-6, atol=1e-6)
    assert mine["clip_region"].item() == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)
    assert 0 < mine["clip_region"].item() < 1  # the batch clips some ratios and not others: the test sees clipping
    if beta:
        assert mine["kl"].item() == pytest.approx(metrics["kl"][0], abs=1e-6)


def test_the_kl_term_is_its_definition_by_hand():
    logps, _, ref, mask, _ = _batch(1)
    p, q = logps.exp(), ref.exp()
    torch.testing.assert_close(per_token_kl(logps, ref), q / p - torch.log(q / p) - 1)
    assert bool((per_token_kl(logps, ref) >= 0).all()) and float(per_token_kl(logps, logps).abs().max()) == 0.0
    without = policy_loss(logps, logps.detach(), torch.ones(6), mask)["loss"]
    with_kl = policy_loss(logps, logps.detach(), torch.ones(6), mask, beta=0.5, ref_logps=ref)["loss"]
    by_hand = 0.5 * ((per_token_kl(logps, ref) * mask).sum(-1) / mask.sum(-1)).mean()
    torch.testing.assert_close(with_kl - without, by_hand)
    with pytest.raises(ValueError, match="needs the base model's log-probabilities"):
        policy_loss(logps, logps, torch.ones(6), mask, beta=0.1)


def test_advantages_are_each_groups_rewards_normalised():
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 1.0])
    advantages = group_advantages(rewards, 3)
    first = rewards[:3]
    torch.testing.assert_close(advantages[:3], (first - first.mean()) / (first.std() + 1e-4))
    assert advantages[3:].abs().max() == 0  # a group whose answers all score alike teaches nothing
    torch.testing.assert_close(group_advantages(rewards, 3, scale="none")[:3], first - first.mean())
    with pytest.raises(ValueError, match="not groups of 4"):
        group_advantages(rewards, 4)


def test_the_loss_moves_probability_towards_the_better_answers():
    """One gradient step on the objective raises the log-probability of the answer with the higher reward."""
    logits = torch.zeros(3, requires_grad=True)  # one position, three tokens; answer 1 is token 0, answer 2 token 1
    logps = torch.log_softmax(logits, -1)[torch.tensor([0, 1])].unsqueeze(1)
    rewards = torch.tensor([1.0, 0.0])
    policy_loss(logps, logps.detach(), group_advantages(rewards, 2), torch.ones(2, 1))["loss"].backward()
    assert logits.grad[0] < 0 < logits.grad[1]  # descending the loss raises token 0, lowers token 1


def test_rewards_follow_the_tasks_metric():
    choice = Record(id="q", task="count", kind="choice", image=None, prompt="How many?", answers=["two"],
                    choices=["one", "two", "three"], answer_index=1)
    assert verifiable_reward(choice, "B", "mc") == 1.0 and verifiable_reward(choice, "two", "mc") == 1.0
    assert verifiable_reward(choice, "A", "mc") == 0.0 and verifiable_reward(choice, "maybe", "mc") == 0.0
    short = Record(id="c", task="color", kind="short", image=None, prompt="Colour?", answers=["red"] * 2 + ["blue"])
    assert verifiable_reward(short, "Red.", "exact") == 1.0 and verifiable_reward(short, "blue", "exact") == 1.0
    assert verifiable_reward(short, "blue", "vqa") == pytest.approx(2 / 9)  # VQA accuracy, leave-one-out
    with pytest.raises(ValueError, match="needs the task's reference corpus"):
        verifiable_reward(short, "a red square", "cider")


def test_the_cider_reward_is_pycocoevalcaps_cider_d():
    """One answer's CIDEr-D with the corpus statistics of a set of records equals pycocoevalcap's per-caption score
    on that set (PTB-tokenized alike); a better caption gets more; the reward needs the corpus."""
    from pycocoevalcap.cider.cider import Cider

    from mmtune.metrics import python_ptb_tokenize

    references = {"a": ["A red square left of a blue circle.", "a red square and a blue circle"],
                  "b": ["Two green triangles on a white background.", "two green triangles"],
                  "c": ["A yellow star above a black square.", "a star, yellow, above a black square"]}
    answers = {"a": "a red square beside a blue circle", "b": "three green triangles", "c": "a yellow star"}
    tokenized = {k: [python_ptb_tokenize(r) for r in refs] for k, refs in references.items()}
    _, theirs = Cider().compute_score(tokenized, {k: [python_ptb_tokenize(v)] for k, v in answers.items()})
    corpus = CiderCorpus.of([references[k] for k in sorted(references)])
    for key, expected in zip(sorted(references), theirs, strict=True):
        record = Record(id=key, task="caption", kind="open", image=None, prompt="Describe.", answers=references[key])
        assert verifiable_reward(record, answers[key], "cider", corpus) == pytest.approx(float(expected), abs=1e-9)
    record = Record(id="a", task="caption", kind="open", image=None, prompt="Describe.", answers=references["a"])
    assert cider_d("a red square left of a blue circle", references["a"], corpus) > \
        cider_d("a green triangle", references["a"], corpus)
