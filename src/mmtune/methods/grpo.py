"""grpo — reinforcement fine-tuning with verifiable rewards (Shao et al., DeepSeekMath 2024; TRL's GRPOTrainer), on
mmtune's loop: the same configs, data, scope, engines, checkpoints and S/G report as supervised fine-tuning.

Each optimizer step, for every record of a GRPO task in the step's batches:

1. G answers are sampled from the current model (``generate``: temperature, top-p; seeded from the run's generator,
   so a resumed run samples the same answers; on FSDP2 / ZeRO-3 with several processes, in lockstep: ``generate_all``);
2. each answer is scored by its task's own metric (``mmtune.grpo.verifiable_reward``: the letter for multiple choice,
   VQA accuracy, exact match; CIDEr-D for a caption task named in ``tasks``), or by a user's ``reward`` function,
   plus an optional format reward;
3. the group's rewards become advantages (``group_advantages``: minus the group mean, over its std);
4. the batch is rebuilt from the prompts and the sampled tokens (labels: the sampled tokens), and each sampled token's
   loss is GRPO's clipped objective ``−min(ρA, clip(ρ)A)`` plus ``β·KL`` to the base model (k3, ``per_token_kl``;
   the base's log-probabilities from a forward at W0, as ASFT's anchor).

One optimizer step per sampled batch (TRL's default ``num_iterations=1``): ρ ≡ 1 where the loss is taken, so the clip
never binds and the gradient is ``−A·∇log π`` (+ β·∇KL). Reduced as the cross-entropy is: ``train.loss_reduction=
sample`` is TRL's ``loss_type="grpo"`` (each answer's token mean, then the mean over answers), ``token`` the mean over
the step's tokens (DAPO's). Records of the other tasks train by the cross-entropy in the same step (a mixed recipe):
by default every task scored by mc, vqa or exact is trained by GRPO and the rest (captions: CIDEr) by SFT.
In a GRPO batch the logged ``ce`` is the sampled answers' negative log-likelihood, ``grpo`` the rest of the loss.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from mmtune.data.collate import (
    ADVANTAGES,
    IGNORE_INDEX,
    KEEP,
    ROW_WEIGHTS,
    SAMPLES,
    GenerationCollator,
    RecordDataset,
    image_token_ids,
    last_image_turn,
)
from mmtune.data.record import metric_choice
from mmtune.engine import root_gathered
from mmtune.grpo import (
    SCALES,
    CiderCorpus,
    clip_flags,
    clipped_objective,
    group_advantages,
    per_token_kl,
    verifiable_reward,
)
from mmtune.losses import target_log_probs
from mmtune.methods.base import MethodConfig, PretrainedSnapshotMethod, register
from mmtune.methods.dft import base_logits

# The metrics whose tasks GRPO trains by default (one answer scored on its own). CIDEr-D is a reward too, for a
# caption task named in method.grpo.tasks: not by default, as SCST is a recipe of its own (long sampled captions).
REWARDED = ("mc", "vqa", "exact")


@dataclass
class GRPOConfig(MethodConfig):
    num_generations: int = 4  # G: answers sampled per prompt (TRL's default 8; 4 keeps CPU runs short)
    beta: float = 0.04  # β, the KL's weight (DeepSeekMath's; TRL's default is now 0.0): 0 — no KL, no base forward
    epsilon_low: float = 0.2  # the clip's ε below 1 (binds only when the weights moved since the sampling)
    epsilon_high: float = 0.2  # and above 1 (DAPO raises it)
    scale_rewards: str = "group"  # advantages over the group's std ("group") or not ("none": Dr. GRPO)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32  # of each sampled answer (eval.max_new_tokens is the evaluation's)
    # The tasks trained by GRPO (task names as the records hold them; a caption task's reward is CIDEr-D); empty:
    # every task scored by mc, vqa or exact (with ``reward``: every task). The others train by the cross-entropy.
    tasks: list[str] = field(default_factory=list)
    reward: str = ""  # "package.module:function" — reward(record, answer) -> float, in place of the task's metric
    format_pattern: str = ""  # a regular expression the whole answer should match (e.g. "[A-D]")
    format_weight: float = 0.0  # added to the reward of an answer that matches format_pattern

    ranges: ClassVar[dict[str, str]] = {"num_generations": "≥ 2", "beta": "≥ 0", "epsilon_low": "[0, 1)",
                                        "epsilon_high": "≥ 0", "temperature": "> 0", "top_p": "(0, 1]",
                                        "max_new_tokens": "≥ 1", "format_weight": "≥ 0"}
    choices: ClassVar[dict[str, tuple]] = {"scale_rewards": SCALES}


@register
class GRPO(PretrainedSnapshotMethod):
    name = "grpo"
    description = "reinforcement fine-tuning: G sampled answers per prompt, rewards by the task's metric, GRPO's loss"
    config_class = GRPOConfig
    reads_samples = True
    # On FSDP2 shards and ZeRO-3 partitions every forward gathers weights from every process, so the processes sample
    # in lockstep (``rollout``): the same number of generate calls, each run until every process's answers ended.
    supports_sharding = True
    persistent = ("pretrained",)

    def setup(self, ctx):
        self.pretrained = {}
        if self.config.beta:
            super().setup(ctx)  # W0: the base model of the KL
        if ctx.model is None:  # a stand-alone probe of the method's state (mmtune estimate): nothing to sample from
            return
        if ctx.records is None or ctx.collator is None:
            raise ValueError("grpo needs the run's records and collator (mmtune's own training loop; not the "
                             "Hugging Face Trainer)")
        by_task: dict[str, list] = {}
        for record in ctx.records:
            by_task.setdefault(record.task, []).append(record)
        self.metrics = {task: metric_choice(records)[0] for task, records in by_task.items()}
        self.reward_function = load_reward(self.config.reward) if self.config.reward else None
        unknown = sorted(set(self.config.tasks) - set(by_task))
        if unknown:
            raise ValueError(f"method.grpo.tasks names {', '.join(unknown)}: no training record has that task "
                             f"(the tasks are {', '.join(sorted(by_task))})")
        chosen = self.config.tasks or [t for t in sorted(by_task)
                                        if self.reward_function or self.metrics[t] in REWARDED]
        if not chosen:
            raise ValueError(f"grpo: no task has a per-answer reward by default (their metrics: "
                             f"{', '.join(f'{t} {m}' for t, m in sorted(self.metrics.items()))}); name the tasks "
                             "(method.grpo.tasks: a caption task gets a CIDEr-D reward) or give method.grpo.reward")
        # A caption task named in tasks: CIDEr-D against its references, with the document frequencies of the
        # task's training references (self-critical sequence training's reward).
        self.corpora = {t: CiderCorpus.of([r.answers for r in by_task[t]]) for t in chosen
                        if self.metrics[t] == "cider" and not self.reward_function}
        self.grpo_tasks = sorted(chosen)
        self.format = re.compile(self.config.format_pattern) if self.config.format_pattern else None
        self._noted: list[tuple[str, torch.Tensor]] = []
        # Weights sharded over processes: each generate's forwards gather them from every process, so every process
        # makes the same generate calls (``rollout``), and runs the same modules in them: a process with fewer GRPO
        # records generates for a stand-in record, and a vision tower runs on every process or on none.
        self.lockstep = ctx.engine.shards_parameters and ctx.engine.processes > 1
        rewarded = [r for t in self.grpo_tasks for r in by_task[t]]
        pictured = {r.image is not None for r in rewarded}
        if self.lockstep and len(pictured) > 1:
            text_only = next(r for r in rewarded if r.image is None)
            raise ValueError(f"grpo on {ctx.engine}: the GRPO tasks ({', '.join(self.grpo_tasks)}) mix records with "
                             f"images and text-only ones (record {text_only.id!r}, task {text_only.task}); with "
                             "sharded weights every process samples in lockstep, running the vision tower on all "
                             "processes or on none — train the text-only records by the cross-entropy (leave their "
                             "task out of method.grpo.tasks), or run on DDP or ZeRO-2")
        self.stand_in = rewarded[0]
        if ctx.accelerator is not None:
            sft = sorted(set(by_task) - set(chosen))
            ctx.accelerator.print(f"grpo: {', '.join(self.grpo_tasks)} by GRPO (G={self.config.num_generations}, "
                                  f"β={self.config.beta})" + (f"; {', '.join(sft)} by the cross-entropy" if sft else ""))

    @property
    def rows_per_record(self) -> int:
        return self.config.num_generations

    def build_step(self, step):
        """Each micro-batch replaced by its rollout batch (one for one: the engines' accumulation is unchanged), then
        the plain backward; the rewards, answer lengths, KL and clip share noted for the log."""
        # every process notes every key, rows or not (the log reduces them together)
        for key in [f"reward/{task}" for task in self.grpo_tasks] + ["answer_length", "clip_fraction"] + \
                (["kl"] if self.config.beta else []):
            step.note(key, torch.zeros(0))
        generator = step.ctx.generator  # one draw per step on every process: the same step seed everywhere
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        step.use_batches([self.rollout(step, piece, seed, step.loss_reduction) for piece in step.micro])
        step.backward()
        for key, values in self._noted:
            step.note(key, values)
        self._noted = []

    def rollout(self, step, batch: dict, seed: int, reduction: str = "token") -> dict:
        """The batch of the micro-batch's records as trained this step: G sampled answers for each record of a GRPO
        task (with their advantages), the reference answer for the others (advantage NaN: the cross-entropy) —
        every row laid out by one processor call, so any mix of tasks and image layouts makes one batch. With
        ``reduction="sample"`` each record weighs the same, its G answers sharing its weight (TRL's "grpo" loss
        weighs prompts so; SFT weighs records so; and every process then holds the same weight whatever its mix)."""
        ctx = step.ctx
        samples = batch[SAMPLES]
        sampled = [s for s in samples if s["record"].task in self.grpo_tasks]
        generated = self.generate_all(ctx, sampled, seed)
        if not sampled:
            if self.lockstep and self.config.beta:  # every process's token loss takes the forward at W0 (a collective)
                return {**batch, ADVANTAGES: torch.full((len(samples),), math.nan, device=batch["labels"].device)}
            return batch
        rows, completions, advantages, shares = [], [], [], []
        for sample in samples:
            record = sample["record"]
            if record.task not in self.grpo_tasks:
                if last_image_turn(record) > 0:
                    raise ValueError(f"record {record.id!r} (task {record.task}): a GRPO run trains its other "
                                     "tasks' conversations from their first image turn; this one shows an image "
                                     "in a later turn — train it in a run of its own")
                rows.append(sample)
                completions.append(ctx.collator.answer_ids(record.target))
                advantages.append(math.nan)
                shares.append(1.0)
                continue
            answers = generated[id(sample)]
            texts = ctx.collator.tokenizer.batch_decode(answers, skip_special_tokens=True)
            rewards = torch.tensor([self.reward(record, text.strip()) for text in texts], dtype=torch.float64)
            step.note(f"reward/{record.task}", rewards)
            step.note("answer_length", torch.tensor([float(len(a)) for a in answers]))
            rows += [sample] * len(answers)
            completions += answers
            advantages += group_advantages(rewards, len(answers), self.config.scale_rewards).tolist()
            shares += [1.0 / len(answers)] * len(answers)
        device = batch["labels"].device
        prompts = GenerationCollator(ctx.collator.processor)(rows)
        prompts.pop("records")
        rollout = rollout_batch(ctx.collator, {k: v.to(device) for k, v in prompts.items()}, completions,
                                [s["record"] for s in rows])
        rollout[ADVANTAGES] = torch.tensor(advantages, dtype=torch.float32, device=device)
        if reduction == "sample":  # the loss is the mean over rows: row r counts rows × (its share of a record)
            rollout[ROW_WEIGHTS] = torch.tensor(shares, device=device) * (len(rows) / len(samples))
        return rollout

    def generate_all(self, ctx, sampled: list[dict], seed: int) -> dict[int, list[list[int]]]:
        """Each sample's G answers (by ``id``), seeded by the step and its record. With sharded weights, as many
        generate calls on every process as the process with the most GRPO records makes (the others generate for the
        stand-in record and drop the answers)."""
        calls = len(sampled)
        if self.lockstep:
            import torch.distributed as dist

            count = torch.tensor([calls], device=next(ctx.unwrapped.parameters()).device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            calls = int(count.item())
        answers = {}
        for i in range(calls):
            if i < len(sampled):
                record = sampled[i]["record"]
                answers[id(sampled[i])] = self.sample(ctx, sampled[i], (seed + zlib.crc32(record.id.encode())) % 2**63)
            else:
                self.sample(ctx, RecordDataset([self.stand_in])[0], seed)
        return answers

    @torch.no_grad()
    def sample(self, ctx, sample: dict, seed: int) -> list[list[int]]:
        """G answers to one record from the model as it is, each up to and with its first end-of-answer token.
        Seeded by the step and the record: the same answers whatever the batch or process the record lands in."""
        collator, model = ctx.collator, ctx.unwrapped
        inputs = GenerationCollator(collator.processor)([sample])  # its G answers: num_return_sequences
        inputs.pop("records")
        device = next(model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        tokenizer = collator.tokenizer
        was_training = model.training
        model.eval()
        try:
            # under the run's autocast, as the training forward (bf16 weights beside fp32 masters: mixed dtypes)
            autocast = ctx.accelerator.autocast() if ctx.accelerator is not None else contextlib.nullcontext()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast, \
                    root_gathered(model):
                torch.manual_seed(seed)
                # synced_gpus: with sharded weights each process runs forwards until every process's answers ended
                tokens = model.generate(**inputs, num_return_sequences=self.config.num_generations,
                                        synced_gpus=self.lockstep, do_sample=True,
                                        temperature=self.config.temperature,
                                        top_p=self.config.top_p, top_k=0, max_new_tokens=self.config.max_new_tokens,
                                        pad_token_id=tokenizer.pad_token_id, use_cache=True,
                                        # an image placeholder in an answer would ask the training forward for an
                                        # image that isn't there (a random-init model samples them)
                                        suppress_tokens=sorted(image_token_ids(collator.processor)))
        finally:
            model.train(was_training)
        stops = stop_ids(model, tokenizer)
        answers = []
        for row in tokens[:, inputs["input_ids"].shape[1]:].tolist():
            end = next((j for j, token in enumerate(row) if token in stops), len(row) - 1)
            answers.append(row[:end + 1])
        return answers

    def reward(self, record, answer: str) -> float:
        value = float(self.reward_function(record, answer) if self.reward_function else
                      verifiable_reward(record, answer, self.metrics[record.task], self.corpora.get(record.task)))
        if not math.isfinite(value):
            raise ValueError(f"record {record.id!r}: the reward of answer {answer[:80]!r} is {value}")
        if self.format is not None and self.format.fullmatch(answer):
            value += self.config.format_weight
        return value

    def token_loss(self, ctx, batch, outputs, log_probs, index):
        """GRPO's loss of each sampled token (a rollout batch's); None — the cross-entropy — for other batches."""
        advantages = batch.get(ADVANTAGES)
        if advantages is None:
            return None
        advantages = advantages[index]
        sampled = ~advantages.isnan()
        advantages = advantages.nan_to_num(0.0)
        loss, ratio = clipped_objective(log_probs, log_probs.detach(), advantages, self.config.epsilon_low,
                                        self.config.epsilon_high)
        flags = clip_flags(ratio, advantages, self.config.epsilon_low, self.config.epsilon_high)
        self._noted.append(("clip_fraction", flags["clip_region"][sampled].double()))
        if self.config.beta:
            reference = base_logits(ctx, batch, self.pretrained)
            ref_log_probs, _ = target_log_probs(reference, batch["labels"], batch.get(KEEP))
            kl = per_token_kl(log_probs, ref_log_probs)
            self._noted.append(("kl", kl[sampled]))
            loss = loss + self.config.beta * kl
        loss = torch.where(sampled, loss, -log_probs)  # a reference answer's tokens: the cross-entropy
        weights = batch.get(ROW_WEIGHTS)
        return loss if weights is None else loss * weights[index]


def rollout_batch(collator, generated: dict, completions: list[list[int]], records: list) -> dict:
    """The training batch of the sampled answers: each row its prompt (the generation batch's, left padding removed)
    then its answer's tokens (the labels), assembled as the collator assembles its batches; the prompts' image inputs
    as the generation batch holds them (same rows, same order)."""
    ids, mask = generated["input_ids"], generated["attention_mask"]
    per_token = [k for k, v in generated.items() if torch.is_tensor(v) and v.shape[:2] == ids.shape
                 and k not in ("input_ids", "attention_mask")]
    rows, labels, extras = [], [], {k: [] for k in per_token}
    for i, answer in enumerate(completions):
        kept = mask[i].bool()
        prompt = ids[i][kept].tolist()
        rows.append(prompt + answer)
        labels.append([IGNORE_INDEX] * len(prompt) + answer)
        for key in per_token:
            extras[key].append(generated[key][i][kept].tolist() + [0] * len(answer))
    image_inputs = {k: v for k, v in generated.items() if torch.is_tensor(v) and k not in per_token
                    and k not in ("input_ids", "attention_mask")}
    return collator.assemble(image_inputs, rows, labels, extras, records, ids.device)


def stop_ids(model, tokenizer) -> set[int]:
    """The tokens that end an answer: the generation config's end-of-sequence ids and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [ids])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def load_reward(path: str) -> Callable:
    """A user's reward function from ``"package.module:function"`` (importable from the run's environment)."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"method.grpo.reward={path!r}: write it as package.module:function")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"method.grpo.reward={path!r}: {error}") from error
    if not callable(function):
        raise ValueError(f"method.grpo.reward={path!r} is not a function")
    return function
