"""Model merging: N fine-tuned models of one base → one model, as the multi-task alternative to joint tuning.

Every rule works on task vectors ``τ_i = θ_i − θ_0`` (fine-tuned minus base), one tensor at a time:

* **task arithmetic** (Ilharco et al., ICLR 2023): ``θ = θ_0 + λ·Σ_i τ_i``;
* **TIES** (Yadav et al., NeurIPS 2023): trim each τ_i to its top-``density`` entries by magnitude, elect each entry's
  sign as the sign of the trimmed sum, average the trimmed values that agree with it (disjoint mean):
  ``θ = θ_0 + λ·τ_m``;
* **Breadcrumbs** (Davari & Belilovsky, ECCV 2024): drop each τ_i's largest ``beta`` and smallest ``gamma`` fractions by
  magnitude, then task arithmetic;
* **DARE** (Yu et al., ICML 2024) as a pre-processor of any rule: drop a fraction ``p`` of each τ_i's entries at
  random and rescale the rest by ``1/(1−p)``.

Choices (written down because the papers leave them open): trimming / dropping is per tensor (not over the whole
model), so merging streams; DARE's mask is seeded per (seed, model, tensor name), so the result does not depend on
the order tensors are read in. ``merge_folders`` reads the models tensor by tensor from their safetensors files
(memory-mapped) and writes the result in shards, so peak memory is one tensor set plus one output shard.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RULES = ("task_arithmetic", "ties", "breadcrumbs")


# --- the rules, on one tensor --------------------------------------------------------------------------------

def task_arithmetic(base: torch.Tensor, deltas: list[torch.Tensor], lam: float) -> torch.Tensor:
    return base + lam * torch.stack(deltas).sum(0)


def top_magnitude(tensor: torch.Tensor, ratio: float) -> torch.Tensor:
    """True for the ``round(ratio·n)`` largest-magnitude entries of ``tensor`` (TIES' trim, grafting's kept update,
    the magnitude-mask baseline's frozen entries)."""
    flat = tensor.detach().abs().flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    k = round(ratio * flat.numel())
    if k:
        keep[torch.topk(flat, k).indices] = True
    return keep.reshape(tensor.shape)


def trim_top(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density·n)`` largest-magnitude entries of ``delta`` (TIES' trim), zero the rest."""
    if round(density * delta.numel()) >= delta.numel():
        return delta.clone()
    return torch.where(top_magnitude(delta, density), delta, torch.zeros_like(delta))


def ties(base: torch.Tensor, deltas: list[torch.Tensor], lam: float, density: float) -> torch.Tensor:
    trimmed = torch.stack([trim_top(d, density) for d in deltas])
    sign = torch.sign(trimmed.sum(0))  # the elected sign (0 where the trimmed values cancel or are all 0)
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0)
    merged = (trimmed * agree).sum(0) / count.clamp(min=1)
    return base + lam * merged


def breadcrumb_mask(delta: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """True for the entries Breadcrumbs keeps: not among the ``gamma`` smallest nor the ``beta`` largest by
    magnitude."""
    n = delta.numel()
    order = delta.abs().flatten().argsort()
    keep = torch.zeros(n, dtype=torch.bool)
    low, high = round(gamma * n), n - round(beta * n)
    keep[order[low:high]] = True
    return keep.view(delta.shape)


def breadcrumbs(base: torch.Tensor, deltas: list[torch.Tensor], lam: float, beta: float,
                gamma: float) -> torch.Tensor:
    return task_arithmetic(base, [d * breadcrumb_mask(d, beta, gamma) for d in deltas], lam)


def dare(delta: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability ``p`` and rescale the survivors by ``1/(1−p)``."""
    if p == 0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=generator.device) >= p
    return delta * keep.to(delta.device) / (1 - p)


# --- a merge recipe and its application to whole models -----------------------------------------------------------

@dataclass
class MergeRecipe:
    rule: str = "ties"
    lam: float = 1.0  # scale of the merged task vector
    density: float = 0.2  # TIES: fraction of each task vector kept
    beta: float = 0.01  # Breadcrumbs: largest fraction dropped
    gamma: float = 0.85  # Breadcrumbs: smallest fraction dropped
    dare_p: float = 0.0  # DARE pre-processing drop rate (0: off)
    seed: int = 0  # DARE's randomness

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"merge rule {self.rule!r}; choose one of {', '.join(RULES)}")
        for name, low, high in (("density", 0, 1), ("beta", 0, 1), ("gamma", 0, 1)):
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name}={getattr(self, name)} must be in [{low}, {high}]")
        if not 0 <= self.dare_p < 1:
            raise ValueError(f"dare_p={self.dare_p} must be in [0, 1)")
        if self.beta + self.gamma >= 1:
            raise ValueError(f"beta + gamma = {self.beta + self.gamma} drops everything")


# `mmtune demo --merge` (and docs/results.md, "model merging"): each rule at settings fixed before any merge ran.
DEMO_MERGES: dict[str, MergeRecipe] = {
    "task_arithmetic": MergeRecipe(rule="task_arithmetic", lam=0.4),
    "ties": MergeRecipe(rule="ties", density=0.2, lam=1.0),
    "breadcrumbs": MergeRecipe(rule="breadcrumbs", beta=0.01, gamma=0.85, lam=0.4),
    "dare_task_arithmetic": MergeRecipe(rule="task_arithmetic", lam=0.4, dare_p=0.9),
}


def _generator(seed: int, model: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{model}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def merge_tensor(name: str, base: torch.Tensor, tuned: list[torch.Tensor], recipe: MergeRecipe) -> torch.Tensor:
    """One tensor of the merged model (computed in fp32, returned in the base's dtype)."""
    if not base.is_floating_point():
        return base
    origin = base.float()
    deltas = [t.float() - origin for t in tuned]
    if recipe.dare_p:
        deltas = [dare(d, recipe.dare_p, _generator(recipe.seed, i, name)) for i, d in enumerate(deltas)]
    if recipe.rule == "task_arithmetic":
        merged = task_arithmetic(origin, deltas, recipe.lam)
    elif recipe.rule == "ties":
        merged = ties(origin, deltas, recipe.lam, recipe.density)
    else:
        merged = breadcrumbs(origin, deltas, recipe.lam, recipe.beta, recipe.gamma)
    return merged.to(base.dtype)


def merge_state_dicts(base: dict[str, torch.Tensor], tuned: list[dict[str, torch.Tensor]],
                      recipe: MergeRecipe) -> dict[str, torch.Tensor]:
    """In memory (small models, tests): the same result ``merge_folders`` streams."""
    return {name: merge_tensor(name, tensor, [t[name] for t in tuned], recipe) for name, tensor in base.items()}


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file of a model folder that holds it (one file or an indexed shard set)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        mapping = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in mapping.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{folder}: no model.safetensors (or index): merging reads safetensors model folders")
    with safe_open(single, framework="pt") as handle:
        return {name: single for name in handle.keys()}


def merge_folders(base: Path, tuned: list[Path], out: Path, recipe: MergeRecipe, shard_bytes: int = 2 * 1024**3,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Merge model folders tensor by tensor into ``out`` (a Hugging Face model folder: sharded safetensors, the
    base's config and processor files, ``merge_recipe.json``). The output is written to ``out.partial`` and renamed
    when complete."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base, out = Path(base), Path(out)
    base_files = _tensor_files(base)
    tuned_files = [_tensor_files(Path(t)) for t in tuned]
    for folder, files in zip(tuned, tuned_files, strict=True):
        if set(files) != set(base_files):
            different = sorted(set(files) ^ set(base_files))
            raise ValueError(f"{folder} and the base {base} hold different tensors (e.g. {different[0]}): merging "
                             "needs models of one architecture")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    def read(path: Path, name: str) -> torch.Tensor:
        # Opened per tensor: a file kept open keeps every page it has read mapped (and counted) in this process.
        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor(name)

    names = sorted(base_files)
    shard: dict[str, torch.Tensor] = {}
    shard_size, shards, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal shard, shard_size
        if shard:
            file = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(partial / file), metadata={"format": "pt"})
            shards.append(file)
            weight_map.update({name: file for name in shard})
            shard, shard_size = {}, 0

    for done, name in enumerate(names, start=1):
        tensors = [read(files[name], name) for files in tuned_files]
        base_tensor = read(base_files[name], name)
        for folder, tensor in zip(tuned, tensors, strict=True):
            if tensor.shape != base_tensor.shape:
                raise ValueError(f"{folder}: {name} has shape {tuple(tensor.shape)}, the base "
                                 f"{tuple(base_tensor.shape)}")
        merged = merge_tensor(name, base_tensor, tensors, recipe).contiguous()
        size = merged.numel() * merged.element_size()
        if shard and shard_size + size > shard_bytes:
            flush()
        shard[name] = merged
        shard_size += size
        if progress:
            progress(done, len(names))
    flush()
    total = sum((partial / f).stat().st_size for f in shards)
    (partial / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    for item in base.iterdir():  # config, generation config, processor and tokenizer files
        if item.is_file() and not item.name.startswith("model") and item.suffix != ".safetensors" \
                and item.name != "mmtune_config.yaml":
            shutil.copy2(item, partial / item.name)
    origin = Path(tuned[0]) / "mmtune_config.yaml"  # the runs' config (their base, their evaluation): for reports
    if origin.exists():
        shutil.copy2(origin, partial / origin.name)
    (partial / "merge_recipe.json").write_text(json.dumps(
        {**asdict(recipe), "base": str(base.resolve()), "models": [str(Path(t).resolve()) for t in tuned]},
        indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out
