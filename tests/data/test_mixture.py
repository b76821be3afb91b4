"""The sampled mixture: each setting delivers the proportions it promises."""

import json
import math

import pytest

from mmtune.data.mixture import MixturePlan, epoch_indices, temperature_probabilities


def plan(**changes) -> MixturePlan:
    settings = dict(pools=[list(range(0, 300)), list(range(300, 400))], counts=[300, 100], weights=[1.0, 1.0],
                    probabilities=None, replay=list(range(400, 450)), replay_per_batch=0, batch_size=16,
                    resample=False, seed=0)
    return MixturePlan(**{**settings, **changes})


def test_temperature_by_hand():
    assert temperature_probabilities([100, 25], 2.0) == pytest.approx([2 / 3, 1 / 3])  # ∝ √size
    assert temperature_probabilities([100, 25], 1.0) == pytest.approx([0.8, 0.2])
    assert temperature_probabilities([100, 25], 1e9) == pytest.approx([0.5, 0.5], abs=1e-6)


def test_probabilities_are_the_share_of_slots():
    mixture = plan(probabilities=[0.25, 0.75])
    indices = epoch_indices(mixture, 0)
    slots = len(indices)
    second = sum(i >= 300 for i in indices)  # the smaller task, drawn 3 times in 4 (cycled through its 100 records)
    assert abs(second - 0.75 * slots) < 4 * math.sqrt(slots * 0.25 * 0.75)
    assert len(set(i for i in indices if i >= 300)) == 100  # drawn without replacement until the pool is used up
    assert epoch_indices(mixture, 0) == indices and epoch_indices(mixture, 1) != indices


def test_replay_fills_its_share_of_every_batch():
    mixture = plan(replay_per_batch=4)
    indices = epoch_indices(mixture, 0)
    assert len(indices) == mixture.batches_per_epoch * 16 and mixture.batches_per_epoch == 400 // 12
    for start in range(0, len(indices), 16):
        batch = indices[start:start + 16]
        assert sum(i >= 400 for i in batch) == 4, batch


def test_resampling_draws_new_records_each_epoch_only_when_asked():
    def chosen(resample: bool, epoch: int) -> set[int]:
        return set(epoch_indices(plan(counts=[48, 16], resample=resample), epoch))

    assert chosen(False, 0) == chosen(False, 1)  # the same 64 records, in a new order
    assert chosen(True, 0) != chosen(True, 1)
    assert len(chosen(True, 1)) == 64 and sum(i >= 300 for i in chosen(True, 1)) == 16  # still 48 + 16


def test_probabilities_draw_from_each_tasks_n_records_only():
    """A task's n holds under probabilities too: its slots cycle through n drawn records, not its whole pool."""
    indices = epoch_indices(plan(probabilities=[0.5, 0.5], counts=[300, 20]), 0)
    assert len({i for i in indices if i >= 300}) == 20
    assert len({i for i in indices if i < 300}) > 20


def test_a_run_with_replay_and_probabilities_logs_each_tasks_training_loss(tiny_config, capsys):
    """Each replay source draws its n (8 of the 128 in its pool), and train_summary.json counts what trained: each
    task's n and the replay's, not every record of every source."""
    from mmtune.train import train

    run = train(tiny_config(
        "data.tasks=[{path: 'synthetic:detailed_caption', n: 12, probability: 0.5}, {path: 'synthetic:count_mc', "
        "n: 12, probability: 0.5}]", "data.replay=[{path: 'synthetic:color_vqa', n: 8}]", "data.replay_share=0.25",
        "train.loss_reduction=sample", "train.max_steps=2"))
    assert "(8 in its pool)" in capsys.readouterr().out
    assert json.loads((run / "train_summary.json").read_text())["records"] == 12 + 12 + 8
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        per_task = {k: v for k, v in row.items() if k.startswith("loss/")}
        assert "loss/color_vqa" in per_task  # one replay record in every batch of 4
        assert len(per_task) >= 2


def test_per_task_losses_average_to_the_cross_entropy(tiny_config):
    """With the sample reduction, the step's cross-entropy is the mean of its samples' losses: the per-task means
    logged, weighted by their sample counts, give it back (a per-task log that read the wrong rows would not)."""
    from helpers import assembled, nth_micro
    from mmtune.step import train_step

    with assembled(tiny_config("train.loss_reduction=sample")) as run:
        micro = nth_micro(run)
        done = train_step(run.ctx, run.methods, micro, run.optimizer, run.scheduler, run.config.train)
        terms = done.terms
        sums, counts = done.task_losses.tolist()  # returned with the terms (issue 39: no longer a field of ctx)
        assert sum(counts) == 4 and sorted(run.ctx.tasks) == run.ctx.tasks
        tasks = micro[0]["tasks"]
        assert [counts[run.ctx.tasks.index(t)] for t in sorted(set(tasks))] == [tasks.count(t) for t in sorted(set(tasks))]
        assert sum(sums) / sum(counts) == pytest.approx(terms["ce"], rel=1e-6)


def test_mixed_probability_settings_are_refused(tiny_config):
    from mmtune.config import ConfigError

    with pytest.raises(ConfigError, match="set on some tasks but not on all"):
        tiny_config("data.tasks=[{path: 'synthetic:detailed_caption', probability: 0.5}, 'synthetic:count_mc']")
    with pytest.raises(ConfigError, match="go together"):
        tiny_config("data.replay_share=0.25")
    with pytest.raises(ConfigError, match=r"data.replay.0 \(synthetic:color_vqa\): weight and probability are not read"):
        tiny_config("data.replay=[{path: 'synthetic:color_vqa', weight: 2}]", "data.replay_share=0.25")


def test_a_sampled_mixture_resumes_exactly_across_an_epoch(tiny_config):
    """The sampled epoch is a function of (plan, epoch): a run resumed mid-epoch trains on the very batches the
    uninterrupted one did, into the next epoch (5 batches of 3 task + 1 replay records per epoch, 8 steps)."""
    import torch

    from helpers import final_weights, losses
    from mmtune.train import train

    settings = ["data.tasks=[{path: 'synthetic:detailed_caption', n: 8, probability: 0.7}, "
                "{path: 'synthetic:count_mc', n: 8, probability: 0.3}]", "data.resample_each_epoch=true",
                "data.replay=[{path: 'synthetic:color_vqa', n: 8}]", "data.replay_share=0.25", "train.max_steps=8"]
    full = train(tiny_config(*settings, "train.save_every=3", out="full"))
    resumed = train(tiny_config(*settings, f"train.resume_from={full / 'checkpoints' / 'step-000003'}", out="resumed"))
    assert losses(resumed) == losses(full)[3:]
    again = final_weights(resumed)
    for key, value in final_weights(full).items():
        assert torch.equal(value, again[key]), key


def test_the_data_seed_fixes_which_records_every_training_seed_draws(world):
    """data.seed (default 0): each task's n records (and a fractional weight's repeats) are the same for every
    train.seed, in another order; with data.seed null each training seed draws its own (how runs drew before it)."""
    from mmtune.config import TaskSpec
    from mmtune.data.mixture import build_mixture
    from mmtune.data.synthetic import resolve_task_path

    specs = [TaskSpec(path="synthetic:detailed_caption", n=20, weight=1.5), TaskSpec(path="synthetic:count_mc", n=8)]
    resolve = lambda p: resolve_task_path(p, world, "train")  # noqa: E731

    def drawn(seed, data_seed):
        records = build_mixture(specs, seed=seed, resolve=resolve, data_seed=data_seed)
        return [r.id for r in records]

    one, two = drawn(1, 0), drawn(2, 0)
    assert sorted(one) == sorted(two) and one != two  # the same records, repeats included; a new order
    assert sorted(drawn(1, None)) != sorted(drawn(2, None))
    assert sorted(drawn(1, None)) == sorted(drawn(1, 1))  # null: the training seed's draw
    # the sampled mixture: the records of each pool drawn with data.seed, their order with train.seed
    picks = {seed: epoch_indices(plan(counts=[48, 24], weights=[1.5, 1.0], seed=seed, data_seed=0), 0)  # 6 batches
             for seed in (1, 2)}
    assert sorted(picks[1]) == sorted(picks[2]) and picks[1] != picks[2]
    legacy = {seed: epoch_indices(plan(counts=[48, 16], seed=seed), 0) for seed in (1, 2)}
    assert sorted(legacy[1]) != sorted(legacy[2])


def test_a_run_draws_with_data_seed_and_the_report_says_when_runs_drew_different_data(tiny_config):
    from mmtune.report import build_report, to_markdown
    from mmtune.train import train

    def records(run):
        return json.loads((run / "train_summary.json").read_text())

    settings = ["train.max_steps=1", "eval.downstream=['synthetic:count_mc']", "eval.limit=2",
                "eval.max_new_tokens=2", "eval.before=false"]
    shared = [train(tiny_config(*settings, f"train.seed={s}", out=f"shared{s}")) for s in (0, 1)]
    own = [train(tiny_config(*settings, f"train.seed={s}", "data.seed=null", out=f"own{s}")) for s in (0, 1)]
    assert records(shared[0])["records_digest"] == records(shared[1])["records_digest"]
    assert records(own[0])["records_digest"] != records(own[1])["records_digest"]
    assert [records(r)["data_seed"] for r in (*shared, *own)] == [0, 0, 0, 1]
    assert "drew different training records" not in to_markdown(build_report(shared))
    assert "drew different training records" in to_markdown(build_report(own))
