"""Dataset items -> training batches: the per-sample random draws, worker processes, and the latent cache.

Every random draw of a training sample (data order, timestep, noise, VAE sample, prompt dropout) comes
from a generator seeded by (run seed, sample number). So a run's losses do not depend on how the
samples are split: one process or several, batch 4 or batch 2 x 2 accumulation, uninterrupted or
resumed, decoded in the main process or in DataLoader workers. The tests rely on that.

The GPU should never wait for data (diffusers' `train_controlnet.py` decodes images in the main process
and runs the VAE and the text encoder every step). Here:
- `SampleStream` is a map-style `torch.utils.data.Dataset` over sample numbers, and `BatchStream` one over
  lists of them: PNG decoding and the random draws (and, on a CPU, the VAE and text encoders) run in
  DataLoader worker processes, ahead of the step that needs them.
- `LatentCache` encodes every item once, up front (VAE posterior mean and std, text embeddings), and
  keeps the result on disk under `--cache-dir`, keyed by the data's files, the base and the size, so a
  second run starts warm and a changed file rebuilds it. The latent is still drawn fresh every time
  (mean + std * eps, with the same eps as without the cache): the cache changes speed, not results.
"""
import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, default_collate
from tqdm import tqdm

import time

from tinylllite.files.atomic import atomic_folder
from tinylllite.hint import check_hint_range
from tinylllite.sd.base import StableDiffusionBase
from tinylllite.files.state_dicts import open_state_dict, save_state_dict

TIMESTEP_SAMPLING = ("uniform", "cubic")


def sample_generator(seed: int, sample_number: int) -> torch.Generator:
    """The generator of the sample_number-th training sample of a run (independent of batching and ranks)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, sample_number]).generate_state(1)[0]))


@lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def dataset_index(seed: int, sample_number: int, n: int) -> int:
    """Data order: a fresh shuffle of the n items every epoch; sample k is item order[k % n] of epoch k // n."""
    return _epoch_order(seed, sample_number // n, n)[sample_number % n]


def draw_timestep(g: torch.Generator, num_train_timesteps: int, how: str = "uniform") -> torch.Tensor:
    """uniform: t ~ U{0..T-1}, as SD was trained. cubic: t = (1 - u^3) T with u ~ U[0, 1), which favours noisy
    timesteps, where the layout of an image is decided (T2I-Adapter, Mou et al. 2023, Sec. 3.4)."""
    if how == "uniform":
        return torch.randint(0, num_train_timesteps, (), generator=g)
    u = torch.rand((), generator=g)
    return ((1 - u ** 3) * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)


class SampleStream(Dataset):
    """Sample number k -> the decoded item it trains on and its random draws (CHW tensors, ready to collate)."""

    def __init__(self, dataset, seed: int, n: int, latent_channels: int, vae_scale_factor: int,
                 num_train_timesteps: int, prompt_dropout: float = 0.0, timestep_sampling: str = "uniform"):
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling {timestep_sampling!r} is not one of {TIMESTEP_SAMPLING}")
        self.dataset, self.seed, self.n, self.prompt_dropout = dataset, seed, n, prompt_dropout
        self.latent_channels, self.vae_scale_factor = latent_channels, vae_scale_factor
        self.num_train_timesteps, self.timestep_sampling = num_train_timesteps, timestep_sampling

    def __len__(self) -> int:
        return 2 ** 62  # sample numbers run on; the sampler says which ones are wanted

    def __getitem__(self, k: int) -> dict:
        index = dataset_index(self.seed, k, self.n)
        item = self.dataset[index]
        check_hint_range(float(item["hint"].min()), float(item["hint"].max()), f"the hint of training item {index}")
        hint = torch.as_tensor(item["hint"]).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W), in [0, 1]
        factor = self.vae_scale_factor
        latent_shape = (self.latent_channels, hint.shape[1] // factor, hint.shape[2] // factor)  # (4, H/f, W/f)
        g = sample_generator(self.seed, k)  # the order of the draws below is part of the run's definition
        t = draw_timestep(g, self.num_train_timesteps, self.timestep_sampling)
        noise, vae_eps = torch.randn(latent_shape, generator=g), torch.randn(latent_shape, generator=g)
        drop = torch.rand((), generator=g).tolist() < self.prompt_dropout  # a host number: no device read
        return dict(index=index, image=torch.as_tensor(item["jpg"]).permute(2, 0, 1),  # (3, H, W) in [-1, 1]
                    hint=hint, prompt="" if drop else item["txt"], timestep=t, noise=noise, vae_eps=vae_eps)


class ItemImages(Dataset):
    """Item i -> its index, target image (3, H, W) in [-1, 1] and prompt: what the latent cache encodes."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        return dict(index=i, image=torch.as_tensor(item["jpg"]).permute(2, 0, 1), prompt=item["txt"])


def rank_batches(first_step: int, batch_size: int, accumulation: int, world: int, rank: int):
    """This process's micro-batches, step after step: micro-batch m of optimizer step s holds the run's samples
    ((s * accumulation + m) * world + rank) * batch_size onwards, so every process trains on its own slice."""
    step = first_step
    while True:
        for micro in range(accumulation):
            first = ((step * accumulation + micro) * world + rank) * batch_size
            yield list(range(first, first + batch_size))
        step += 1


class BatchStream(Dataset):
    """A list of sample numbers -> one batch: decoded, collated and, when `encode` is given, encoded too. In a
    DataLoader worker process this runs on another core while the main process trains."""

    def __init__(self, stream: SampleStream, encode=None):
        self.stream, self.encode = stream, encode

    def __len__(self) -> int:
        return 2 ** 62

    def __getitem__(self, numbers: list[int]) -> dict:
        samples = default_collate([self.stream[k] for k in numbers])
        return samples if self.encode is None else self.encode(samples)


def sample_loader(stream: SampleStream, sample_numbers, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """Collated samples of the given sample numbers, in order (decoded ahead in worker processes when workers > 0);
    the simple form the notebooks use, `training_batches` the one the training script uses."""
    return DataLoader(stream, batch_size=batch_size, sampler=sample_numbers, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=workers > 0)


def training_batches(stream: SampleStream, encode, device: torch.device, first_step: int, batch_size: int,
                     accumulation: int, world: int, rank: int, workers: int):
    """The model-ready micro-batches of this process, from `first_step` on.

    On a CPU the encoders (VAE, text) run where the images are decoded: with workers > 0, in worker processes
    on the cores the training step leaves idle. On a GPU the workers only decode (into pinned memory) and the
    encoders run on the GPU."""
    on_gpu = device.type == "cuda"
    loader = DataLoader(BatchStream(stream, None if on_gpu else encode), batch_size=None,
                        sampler=rank_batches(first_step, batch_size, accumulation, world, rank), num_workers=workers,
                        pin_memory=on_gpu, prefetch_factor=2 if workers else None, persistent_workers=workers > 0)
    for batch in loader:
        yield encode(batch) if on_gpu else batch


def dataset_pairs(dataset) -> list:
    """The (image, hint, prompt) pairs behind a PairedDataset, or behind every part of a kohya ConcatDataset."""
    if isinstance(dataset, ConcatDataset):
        return [pair for part in dataset.datasets for pair in dataset_pairs(part)]
    return list(dataset.pairs)


def fingerprint(dataset, n: int, base: StableDiffusionBase) -> str:
    """A key that changes when any of the first n pairs changes (files' size and time, prompt, size it is read
    at) or the base's encoders change."""
    h = hashlib.sha256(json.dumps([n, list(dataset[0]["hint"].shape)]).encode())
    for pair in dataset_pairs(dataset)[:n]:
        for path in (pair.image, pair.hint):
            stat = Path(path).stat()
            h.update(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        h.update(pair.caption.encode() + b"\n")
    for part in (base.vae.encoder, base.text_encoder):
        h.update(next(part.parameters()).detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


class LatentCache:
    """VAE posterior moments of every item and text embeddings of every prompt, computed once, kept on disk."""

    def __init__(self, folder, key: str):
        self.path = Path(folder) / key
        self.moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def load(self) -> bool:
        """Read a complete cache from disk; False when there is none for this key."""
        if not (self.path / "done").is_file():
            return False
        latents, text = (dict(open_state_dict(self.path / f"{name}.safetensors")) for name in ("latents", "text"))
        prompts = json.loads((self.path / "prompts.json").read_text())
        self.moments = {i: (m, s) for i, m, s in zip(latents["index"].tolist(), latents["mean"], latents["std"])}
        self.text = {p: (text["hidden"][j], text["pooled"][j] if "pooled" in text else None)
                     for j, p in enumerate(prompts)}
        return True

    @torch.no_grad()
    def fill(self, base: StableDiffusionBase, dataset, n: int, batch_size: int, workers: int = 0,
             deadline: float | None = None) -> bool:
        """Encode the first n items (images through the VAE, prompts plus the empty one through the text
        encoder) in batches, then save. With a `deadline` (a time.time() value) it gives up, saving nothing,
        once the next batch would end after it; returns whether the cache is complete."""
        prompts, started = {""}, time.time()
        loader = DataLoader(ItemImages(dataset), batch_size=batch_size, sampler=range(n), num_workers=workers)
        for done, batch in enumerate(tqdm(loader, desc="caching latents", unit="batch")):
            per_batch = (time.time() - started) / done if done else 0.0
            if deadline is not None and time.time() + per_batch > deadline:
                return False
            images = batch["image"].to(base.vae.device, base.vae.dtype)
            dist = base.vae.encode(images).latent_dist  # a Gaussian over (B, 4, H/f, W/f) latents
            for i, m, s in zip(batch["index"].tolist(), dist.mean.cpu(), dist.std.cpu()):
                self.moments[i] = (m, s)
            prompts |= set(batch["prompt"])
        prompts = sorted(prompts)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            hidden, pooled = base.encode_prompt(chunk)
            for j, p in enumerate(chunk):
                self.text[p] = (hidden[j].cpu(), None if pooled is None else pooled[j].cpu())
        self.save()
        return True

    def save(self) -> None:
        """Written into a temporary folder and renamed, so a killed run leaves no half cache behind."""
        order = sorted(self.moments)
        prompts = list(self.text)
        text = {"hidden": torch.stack([self.text[p][0] for p in prompts])}
        if self.text[prompts[0]][1] is not None:
            text["pooled"] = torch.stack([self.text[p][1] for p in prompts])
        with atomic_folder(self.path) as tmp:
            save_state_dict({"index": torch.tensor(order), "mean": torch.stack([self.moments[i][0] for i in order]),
                             "std": torch.stack([self.moments[i][1] for i in order])}, tmp / "latents.safetensors")
            save_state_dict(text, tmp / "text.safetensors")
            (tmp / "prompts.json").write_text(json.dumps(prompts))
            (tmp / "done").write_text("")


class BatchEncoder:
    """Collated samples -> the model's inputs: latents (drawn from the VAE's posterior), text embeddings, hint."""

    def __init__(self, base: StableDiffusionBase, cache: LatentCache | None = None):
        self.base, self.cache = base, cache

    @torch.no_grad()
    def __call__(self, samples: dict) -> dict:
        base, cache = self.base, self.cache
        vae = base.vae
        if cache is not None:
            mean = torch.stack([cache.moments[i][0] for i in samples["index"].tolist()])
            std = torch.stack([cache.moments[i][1] for i in samples["index"].tolist()])
        else:
            dist = vae.encode(samples["image"].to(vae.device, vae.dtype)).latent_dist
            mean, std = dist.mean, dist.std
        device, dtype = vae.device, vae.dtype
        mean, std = mean.to(device, dtype, non_blocking=True), std.to(device, dtype, non_blocking=True)
        latents = (mean + std * samples["vae_eps"].to(device, dtype, non_blocking=True)) * base.latent_scale
        prompts = list(samples["prompt"])
        if cache is not None:
            hidden = torch.stack([cache.text[p][0] for p in prompts]).to(device, non_blocking=True)
            pooled = None if cache.text[prompts[0]][1] is None else \
                torch.stack([cache.text[p][1] for p in prompts]).to(device, non_blocking=True)
        else:
            hidden, pooled = base.encode_prompt(prompts)
        hint = samples["hint"].to(device, dtype, non_blocking=True)
        height, width = hint.shape[-2:]
        return dict(latents=latents, noise=samples["noise"].to(device, dtype, non_blocking=True),
                    timesteps=samples["timestep"].to(device), hidden=hidden,
                    added_cond_kwargs=base.added_cond_kwargs(pooled, height, width), hint=hint, prompts=prompts,
                    indices=samples["index"].tolist())
