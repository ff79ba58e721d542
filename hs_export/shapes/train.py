"""``hs-export train-shapes``: trains the ``shapes`` pair on CPU, VAE and all, from nothing.

Phases: render scenes → train a 16-channel ``AutoencoderKL`` (8× down, as SD3's) → teach the
tiny text encoders the grammar (:mod:`.text_encoders`) → encode the scenes and prompts → train
the small and the large ``SD3Transformer2DModel`` with SD3's rectified-flow objective
(x_t = (1−σ)·x0 + σ·ε, target ε − x0, logit-normal σ shifted by 3 as diffusers' SD3 training
script does, 10% empty prompts) → save a ``StableDiffusion3Pipeline``
folder (``large/``) and a transformer folder (``small/transformer``) in fp16, read back with
``from_pretrained`` like any user's weights.

Everything is seeded; a time budget stops a phase early (and says so) on a slow machine.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hs_runtime.errors import ConfigError, describe
from hs_runtime.presets import get_preset
from hs_runtime.validation import check_writable_folder

from . import scenes as scene_lib
from .text_encoders import train_text_encoders

SIGMA_BANDS = ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0))
TRAIN_SHIFT = 3.0  # the sampler's shift: train where inference spends its steps
SEED_MAX = 2**32 - 1  # numpy's and torch's generators take it with every per-phase offset added


@dataclass(frozen=True)
class ShapesTrainConfig:
    """Settings of one training run; CLI defaults come from here.

    The defaults are the recipe of the shipped weights (56 minutes on 2 CPU cores, inside the
    58-minute budget; the shipped pair predates the process-independent CLIP token ids, so a
    retrain is comparable, not identical). Scenes are 128² px (64 image tokens): a sample costs about half of a 256²
    one, so the budget holds 2.4× the large model's samples of the earlier 256² recipe; the text
    encoders are taught the grammar first (``text_steps``), which took the background colour the
    model draws from 67% to 100% right (docs/quality.md).
    """

    out: Path | None = None
    seed: int = 0
    preset: str = "shapes"  # model configs, image size and text lengths come from this preset
    scenes: int = 30000
    held_out: int = 256
    vae_pool: int = 2000  # scenes the VAE trains on (random crops)
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 2e-3
    text_steps: int = 1000  # supervised steps teaching the text encoders the grammar (0: leave them random)
    small_steps: int = 2000
    large_steps: int = 3600
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 100
    ema_decay: float = 0.998
    init: str = "dit"  # "dit" (adaLN-Zero) or "default" (diffusers' PyTorch defaults)
    cfg_dropout: float = 0.1
    budget_minutes: float = 58.0
    threads: int | None = None
    small_config: dict | None = field(default=None, compare=False)  # overrides (tests)
    large_config: dict | None = field(default=None, compare=False)
    image_size: int | None = None
    work_dir: Path | None = None  # caches the trained VAE and encoded data between runs (safetensors, never a pickle)

    def data_key(self) -> dict:
        """What the VAE and the encoded data depend on (a cached copy is reused only if equal); the
        image size as resolved, so a preset whose size changed does not reuse older latents."""
        keys = ("seed", "preset", "scenes", "held_out", "vae_pool", "vae_steps", "vae_batch", "vae_crop", "vae_lr", "warmup")
        return {**{k: getattr(self, k) for k in keys}, "image_size": self.image_size or get_preset(self.preset).height}

    def validate(self) -> None:
        if self.out is None:
            raise ConfigError(describe("no output folder", fix="pass --out DIR"))
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(describe(f"--out is a file, not a folder: {out}", fix="pass a new or existing folder"))
        if out.is_dir() and any(out.iterdir()) and not (out / "training.json").is_file():
            raise ConfigError(describe(f"--out {out} is not empty and holds no earlier training", fix="refusing to overwrite it: choose a new or empty folder"))
        if self.work_dir is not None and Path(self.work_dir).exists() and not Path(self.work_dir).is_dir():
            raise ConfigError(describe(f"--work-dir is a file, not a folder: {self.work_dir}"))
        for flag, folder in (("--out", out), ("--work-dir", self.work_dir)):
            if folder is not None:  # written after the training: a folder that cannot be made fails now
                check_writable_folder(Path(folder), flag)
        if not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(describe("--seed out of range", got=self.seed, expected=f"0..{SEED_MAX}"))
        for name in ("scenes", "held_out", "vae_pool", "vae_steps", "vae_batch", "small_steps", "large_steps", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(describe(f"{name} must be >= 1", got=getattr(self, name)))
        if self.text_steps < 0:
            raise ConfigError(describe("text_steps must be >= 0", got=self.text_steps, fix="0 leaves the text encoders random"))
        if self.vae_pool > self.scenes:
            raise ConfigError(describe(f"--scenes must be >= {self.vae_pool}: the VAE trains on a pool of that many scenes", got=self.scenes, fix=f"pass --scenes {self.vae_pool} or more"))
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ConfigError(describe("cfg_dropout out of range", got=self.cfg_dropout, expected="[0, 1)"))
        if not math.isfinite(self.budget_minutes) or self.budget_minutes <= 0:  # NaN would never stop a phase
            raise ConfigError(describe("--budget-minutes must be a number > 0", got=self.budget_minutes))
        if self.threads is not None and self.threads < 1:
            raise ConfigError(describe("--threads must be >= 1", got=self.threads, fix="leave it out for every core"))


class _Steps:
    """Progress lines for a training loop: loss (smoothed), learning rate, speed and ETA."""

    def __init__(self, name: str, total: int, log, every: int):
        self.name, self.total, self.log, self.every = name, total, log, max(1, every)
        self.start = time.perf_counter()
        self.smoothed = None

    def update(self, step: int, loss: float, lr: float) -> None:
        self.smoothed = loss if self.smoothed is None else 0.98 * self.smoothed + 0.02 * loss
        if step % self.every == 0 or step == self.total:
            per = (time.perf_counter() - self.start) / step
            self.log(f"[{self.name}] step {step}/{self.total} loss {self.smoothed:.4f} lr {lr:.1e} {per:.2f} s/step, eta {per * (self.total - step) / 60:.1f} min")


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _round_trip_fp16(module: torch.nn.Module) -> torch.nn.Module:
    """Rounds weights to fp16 and back, so training sees exactly what ships."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


# ---- VAE ------------------------------------------------------------------------------------


def make_vae(sample_size: int):
    """A 0.67 M-parameter 16-channel ``AutoencoderKL``, 8× down like SD3's, fully convolutional
    (no mid-block attention) so it trains on crops and runs on whole images."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=sample_size, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    )


def train_vae(vae, pool: torch.Tensor, config: ShapesTrainConfig, deadline: float, log) -> dict:
    """Deterministic autoencoder training on random crops (decode the posterior mean).

    Args:
        pool: ``[K, 3, S, S]`` uint8 scenes.
    """
    g = torch.Generator().manual_seed(config.seed + 11)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    vae.train()
    crop, size = config.vae_crop, pool.shape[-1]
    progress = _Steps("vae", config.vae_steps, log, every=max(1, config.vae_steps // 10))
    done = 0
    for step in range(config.vae_steps):
        if time.monotonic() > deadline:
            log(f"[vae] time budget reached after {step} of {config.vae_steps} steps")
            break
        idx = torch.randint(pool.shape[0], (config.vae_batch,), generator=g)
        ys, xs = (torch.randint(size - crop + 1, (config.vae_batch,), generator=g) for _ in range(2))
        batch = torch.stack([pool[i, :, y : y + crop, x : x + crop] for i, y, x in zip(idx, ys, xs)]).float() / 127.5 - 1
        lr = _lr_at(step, config.vae_steps, config.vae_lr, config.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        recon = vae.decode(vae.encode(batch).latent_dist.mean).sample
        loss = F.mse_loss(recon, batch) + F.l1_loss(recon, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        done = step + 1
        progress.update(done, loss.item(), lr)
    vae.eval()
    return {"steps": done, "planned_steps": config.vae_steps}


@torch.no_grad()
def encode_images(vae, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """``[N, 3, S, S]`` floats in [-1, 1] → posterior means ``[N, 16, S/8, S/8]`` (bf16 compute)."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.append(vae.encode(x).latent_dist.mean.float())
    return torch.cat(out)


@torch.no_grad()
def reconstruction_psnr(vae, images: np.ndarray, latents: torch.Tensor) -> float:
    """Mean PSNR (dB, images in [0, 1]) of decoding ``latents`` against ``images``."""
    scores = []
    for i in range(0, len(images), 32):
        recon = vae.decode(latents[i : i + 32]).sample.clamp(-1, 1)
        target = torch.from_numpy(images[i : i + 32])
        mse = (((recon - target) / 2) ** 2).flatten(1).mean(1)
        scores.append(10 * torch.log10(1 / mse.clamp_min(1e-10)))
    return float(torch.cat(scores).mean())


# ---- transformers -----------------------------------------------------------------------------


def _shifted_sigmas(u: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(u)
    return TRAIN_SHIFT * s / (1 + (TRAIN_SHIFT - 1) * s)


def flow_matching_loss(model, x0, embeds, pooled, sigma, noise) -> torch.Tensor:
    """SD3's rectified-flow loss: ‖model(x_t, σ) − (ε − x0)‖² with x_t = (1−σ)·x0 + σ·ε."""
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prediction = model(x_t, embeds, pooled, sigma * 1000, return_dict=False)[0]
    return F.mse_loss(prediction.float(), noise - x0)


def dit_init(model) -> None:
    """DiT's initialisation (Peebles & Xie 2023): Xavier linears, zero biases, and adaLN-Zero —
    every modulation and the output projection start at zero, so each block starts as the
    identity. diffusers leaves PyTorch's defaults; this trains markedly faster from scratch."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    conv = model.pos_embed.proj
    torch.nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
    torch.nn.init.zeros_(conv.bias)
    for linear in model.time_text_embed.modules():
        if isinstance(linear, torch.nn.Linear):
            torch.nn.init.normal_(linear.weight, std=0.02)
    for block in model.transformer_blocks:
        for norm in (block.norm1, block.norm1_context):
            torch.nn.init.zeros_(norm.linear.weight)
            torch.nn.init.zeros_(norm.linear.bias)
    for layer in (model.norm_out.linear, model.proj_out):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def train_transformer(name: str, model_config: dict, data: dict, steps: int, config: ShapesTrainConfig, deadline: float, log):
    """Trains one ``SD3Transformer2DModel``; returns its EMA copy (eval mode) and a summary.

    Args:
        data: ``latents [N, 16, h, w]`` (normalised), ``embeds [N, T, J]``, ``pooled [N, J']``,
            ``uncond_embeds [1, T, J]``, ``uncond_pooled [1, J']``.
    """
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(config.seed + (21 if name == "small" else 22))
    model = SD3Transformer2DModel(**model_config).train()
    if config.init == "dit":
        dit_init(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(config.seed + (31 if name == "small" else 32))
    latents, embeds, pooled = data["latents"], data["embeds"], data["pooled"]
    n, b = latents.shape[0], config.batch
    progress = _Steps(name, steps, log, every=max(1, steps // 24))
    done = 0
    for step in range(steps):
        if time.monotonic() > deadline:
            log(f"[{name}] time budget reached after {step} of {steps} steps")
            break
        idx = torch.randint(n, (b,), generator=g)
        drop = torch.rand(b, generator=g) < config.cfg_dropout
        e = torch.where(drop[:, None, None], data["uncond_embeds"], embeds[idx])
        p = torch.where(drop[:, None], data["uncond_pooled"], pooled[idx])
        sigma = _shifted_sigmas(torch.randn(b, generator=g))
        noise = torch.randn(latents[idx].shape, generator=g)
        lr = _lr_at(step, steps, config.lr, config.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = flow_matching_loss(model, latents[idx], e, p, sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e_p, m_p in zip(ema.parameters(), model.parameters()):
                e_p.lerp_(m_p, 1 - decay)
        done = step + 1
        progress.update(done, loss.item(), lr)
    params = sum(p.numel() for p in ema.parameters())
    return _round_trip_fp16(ema), {"steps": done, "planned_steps": steps, "parameters": params}


@torch.no_grad()
def held_out_losses(model, data: dict, seed: int, batch: int = 64) -> dict[str, float]:
    """Mean flow-matching loss per σ band on held-out scenes, with fixed noise and σ per band."""
    g = torch.Generator().manual_seed(seed)
    latents, embeds, pooled = data["latents"], data["embeds"], data["pooled"]
    result = {}
    for low, high in SIGMA_BANDS:
        sigma_all = low + (high - low) * torch.rand(latents.shape[0], generator=g)
        noise_all = torch.randn(latents.shape, generator=g)
        total = 0.0
        for i in range(0, latents.shape[0], batch):
            sl = slice(i, i + batch)
            total += flow_matching_loss(model, latents[sl], embeds[sl], pooled[sl], sigma_all[sl], noise_all[sl]).item() * latents[sl].shape[0]
        result[f"{low:.1f}-{high:.1f}"] = total / latents.shape[0]
    return result


# ---- the whole run --------------------------------------------------------------------------


def train_shapes(config: ShapesTrainConfig, log=print) -> dict:
    """Trains everything and writes ``out/large`` (SD3 pipeline), ``out/small/transformer`` and
    ``out/training.json``; returns the report."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from hs_runtime.pipeline import TextAndVae

    from ..presets import text_components

    config.validate()
    spec = get_preset(config.preset)
    small_config = config.small_config or spec.small
    large_config = config.large_config or spec.large
    size = config.image_size or spec.height
    out = Path(config.out)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    start = time.monotonic()
    deadline = start + 60 * config.budget_minutes
    seconds: dict[str, float] = {}

    def phase(name: str, began: float) -> None:
        seconds[name] = time.monotonic() - began
        log(f"[{name}] done in {seconds[name] / 60:.1f} min")

    log(f"training the {config.preset} pair into {out}: {config.scenes} scenes of {size}² px, budget {config.budget_minutes:g} min, {torch.get_num_threads()} threads")
    began = time.monotonic()
    text = text_components(large_config["joint_attention_dim"], large_config["pooled_projection_dim"], config.seed + 3, scene_lib.VOCABULARY, spec.clip_tokens)
    cache = Path(config.work_dir) / CACHE_NAME if config.work_dir else None
    cached = read_cache(cache, config.data_key(), log) if cache else None
    vae = _cached_vae(cached, size, cache, log) if cached is not None else None
    if vae is not None:
        log(f"reusing the VAE and encoded scenes in {cache}")
        vae_report, latents, prompts = cached["vae_report"], cached["latents"], cached["prompts"]
    else:
        vae, vae_report, latents, prompts = _vae_and_data(config, size, deadline, log, phase)
        if vae_report["steps"] < vae_report["planned_steps"] or len(prompts["train"]) < config.scenes:
            # one deadline for the run: past it, no later phase trains a step. Nothing is cached
            # either, so a later run with the whole budget does not inherit a VAE or data cut short.
            raise ConfigError(describe(
                "the time budget ran out before the transformers' phases; nothing written or cached",
                got=f"VAE {vae_report['steps']} of {vae_report['planned_steps']} steps, {len(prompts['train'])} of {config.scenes} scenes encoded",
                fix="raise --budget-minutes (56 min on 2 cores for the defaults)",
            ))
        if cache:
            scale = {"shift_factor": vae.config.shift_factor, "scaling_factor": vae.config.scaling_factor}
            write_cache(cache, config.data_key(), vae.state_dict(), scale, vae_report, latents, prompts)
    began = time.monotonic()
    text_report = train_text_encoders(
        text, prompts["train"], prompts["held"], config.text_steps, seed=config.seed + 5, clip_length=spec.clip_tokens,
        t5_length=spec.max_sequence_length, deadline=deadline, log=log,
    )
    for key in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        _round_trip_fp16(text[key])
    # Prompts are encoded with the very text encoders that ship with the model, every run: a cache
    # never holds embeddings, so it cannot pair the transformers with encoders they were not trained on.
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, **text)
    train_data, held_data = _encode_prompts(TextAndVae(pipe), prompts, latents, spec.max_sequence_length)
    phase("text", began)
    shift_factor, scaling_factor = vae.config.shift_factor, vae.config.scaling_factor

    models, reports = {}, {}
    for role, model_config, steps in (("small", small_config, config.small_steps), ("large", large_config, config.large_steps)):
        began = time.monotonic()
        models[role], reports[role] = train_transformer(role, model_config, train_data, steps, config, deadline, log)
        if reports[role]["steps"] == 0:  # writing it would ship (or overwrite a pair with) random weights
            reuse = "" if cache else ", or pass --work-dir so that a rerun reuses this run's VAE and data"
            raise ConfigError(describe(f"the time budget ran out before the {role} model trained a step; nothing written", got=f"--budget-minutes {config.budget_minutes:g}", fix=f"raise --budget-minutes (56 min on 2 cores for the defaults){reuse}"))
        reports[role]["held_out_loss"] = held_out_losses(models[role], held_data, config.seed + 41)
        bands = ", ".join(f"σ {k}: {v:.3f}" for k, v in reports[role]["held_out_loss"].items())
        log(f"[{role}] held-out loss per band: {bands}")
        phase(role, began)

    out.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusion3Pipeline(transformer=models["large"], scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, **text)
    pipe.to(torch.float16).save_pretrained(out / "large")
    models["small"].to(torch.float16).save_pretrained(out / "small" / "transformer")
    seconds["total"] = time.monotonic() - start
    report = {
        "preset": config.preset,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k not in ("small_config", "large_config")},
        "image_size": size,
        "small_config": small_config,
        "large_config": large_config,
        "text": text_report,
        "vae": {**vae_report, "parameters": sum(p.numel() for p in vae.parameters()), "shift_factor": shift_factor, "scaling_factor": scaling_factor},
        "small": reports["small"],
        "large": reports["large"],
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out} in {seconds['total'] / 60:.1f} min")
    return report


# ---- the work-dir cache ------------------------------------------------------------------------
#
# Tensors in safetensors, everything else as JSON in its header: reading it runs no code, unlike a
# pickle (torch.load(weights_only=False) runs whatever a planted file holds). A pickled cache of
# an older version (encoded.pt) is never opened.

CACHE_NAME = "encoded.safetensors"
CACHE_FORMAT = "hybridstitch-shapes-cache/1"
_OLD_CACHE = "encoded.pt"


def write_cache(path: Path, key: dict, vae_state: dict, vae_scale: dict, vae_report: dict, latents: dict, prompts: dict) -> Path:
    """Writes the VAE and the encoded scenes (atomically: a crash leaves no half-written cache)."""
    from safetensors.torch import save_file

    tensors = {f"vae.{k}": v.detach().contiguous() for k, v in vae_state.items()}
    tensors.update({f"latents.{k}": v.contiguous() for k, v in latents.items()})
    meta = {"key": key, "vae_scale": vae_scale, "vae_report": vae_report, "prompts": prompts}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={"format": CACHE_FORMAT, "meta": json.dumps(meta)})
    os.replace(partial, path)
    return path


def read_cache(path: Path, key: dict, log=print) -> dict | None:
    """The cache at ``path`` if it was made for ``key``; ``None`` (rebuild) otherwise.

    A cache that cannot be read (damaged, foreign, of another format) is rebuilt with a one-line
    note, never an error.
    """
    old = path.with_name(_OLD_CACHE)
    if old.is_file():
        log(f"note: ignoring {old}: an old pickled cache is never loaded (unpickling can run code); the cache is now {path.name}")
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            header = handle.metadata() or {}
            if header.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {header.get('format')!r}, expected {CACHE_FORMAT!r}")
            meta = json.loads(header["meta"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        cached = {
            "key": meta["key"], "vae_scale": meta["vae_scale"], "vae_report": meta["vae_report"], "prompts": meta["prompts"],
            "vae": {k[len("vae."):]: v for k, v in tensors.items() if k.startswith("vae.")},
            "latents": {split: tensors[f"latents.{split}"] for split in ("train", "held")},
        }
    except Exception as exc:  # whatever is wrong with the file, the fix is the same: rebuild it
        log(f"note: cannot read the cache {path} ({_reason(exc)}); rebuilding it")
        return None
    if cached["key"] != key:
        log(f"note: the cache {path} was made for other settings; rebuilding it")
        return None
    return cached


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _cached_vae(cached: dict, size: int, cache: Path, log):
    """The cache's VAE, or ``None`` (rebuild, with a note) where it is of another architecture."""
    vae = make_vae(size)
    try:
        vae.load_state_dict(cached["vae"])
    except RuntimeError as exc:  # written by a version of this code with another make_vae
        log(f"note: the cache {cache} holds another VAE ({_reason(exc)}); rebuilding it")
        return None
    vae.register_to_config(**cached["vae_scale"])
    return vae.eval()


def _vae_and_data(config, size, deadline, log, phase):
    """Trains the VAE and encodes the scenes (latents normalised as SD3 expects); past the
    deadline, the scenes encoded so far (at least one chunk).

    Returns:
        ``(vae, report, latents, prompts)`` with ``latents``/``prompts`` dicts keyed ``train``/``held``.
    """
    began = time.monotonic()
    pool_images, _ = scene_lib.make_scenes(config.vae_pool, config.seed, size)
    pool = torch.from_numpy(((pool_images + 1) * 127.5).round().astype(np.uint8))
    del pool_images
    held_images, held_prompts = scene_lib.make_scenes(config.held_out, config.seed + 1, size)
    phase("scenes", began)

    began = time.monotonic()
    torch.manual_seed(config.seed + 10)
    vae = make_vae(size)
    vae_report = train_vae(vae, pool, config, deadline, log)
    _round_trip_fp16(vae)
    phase("vae", began)

    began = time.monotonic()
    raw_chunks, prompts = [], []
    chunk = 500
    for i in range(0, config.scenes, chunk):  # render + encode in chunks: 20k images never sit in memory
        images, chunk_prompts = scene_lib.make_scenes(min(chunk, config.scenes - i), config.seed + 100 + i, size)
        raw_chunks.append(encode_images(vae, images))
        prompts += chunk_prompts
        log(f"[encode] {i + len(chunk_prompts)}/{config.scenes} scenes")
        if time.monotonic() > deadline and len(prompts) < config.scenes:
            log(f"[encode] time budget reached after {len(prompts)} of {config.scenes} scenes")
            break
    raw = torch.cat(raw_chunks)
    held_raw = encode_images(vae, held_images)
    shift_factor = float(raw.mean())
    scaling_factor = float(1.0 / raw.std())
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    vae_report["held_out_psnr_db"] = reconstruction_psnr(vae, held_images, held_raw)
    log(f"[vae] held-out reconstruction {vae_report['held_out_psnr_db']:.1f} dB; latent shift {shift_factor:.4f}, scale {scaling_factor:.4f}")
    latents = {"train": (raw - shift_factor) * scaling_factor, "held": (held_raw - shift_factor) * scaling_factor}
    phase("encode", began)
    return vae, vae_report, latents, {"train": prompts, "held": held_prompts}


def _encode_prompts(encoder, prompts: dict, latents: dict, max_sequence_length: int) -> tuple[dict, dict]:
    """Training and held-out data: each scene's latents with its prompt's embeddings (+ the empty prompt's)."""
    train_data = {**_conditioning(encoder, prompts["train"], max_sequence_length), "latents": latents["train"]}
    held_data = {**_conditioning(encoder, prompts["held"], max_sequence_length), "latents": latents["held"]}
    uncond = _conditioning(encoder, [""], max_sequence_length)
    train_data["uncond_embeds"], train_data["uncond_pooled"] = uncond["embeds"], uncond["pooled"]
    return train_data, held_data


def _conditioning(encoder, prompts: list[str], max_sequence_length: int, batch: int = 256) -> dict:
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch):
        c = encoder.encode(prompts[i : i + batch], None, cfg=False, max_sequence_length=max_sequence_length)
        embeds.append(c.prompt_embeds.float())
        pooled.append(c.pooled_prompt_embeds.float())
    return {"embeds": torch.cat(embeds), "pooled": torch.cat(pooled)}
