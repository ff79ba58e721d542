"""``hs-export bench``: every plan against the large model, per stage, next to the FLOP ideal.

Plans are timed round-robin (every plan once per round, the order reversed every other round)
so machine noise lands on all of them alike; speedups are ratios of medians measured in the same
run. With several backends (``--backends onnxruntime,torch``) every (plan, backend) pair takes its
turn in the same rounds, and each backend's latency is reported relative to the others' for the
same plan. Timings are synchronised with the device (``profile=True``). Nothing here is asserted
by tests except the output format.

The report's ``plans`` list holds one row per plan and backend (``name``, ``backend``,
``latency_s_median``, …; ``measure: "denoise"``). ``--versus diffusers`` (:mod:`hs_export.versus`)
adds a prompt → image comparison under ``versus`` and diffusers' own row (``backend:
"diffusers"``, ``measure: "prompt_to_image"``) to ``plans``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Mapping

import torch

from hs_runtime.backends import BACKENDS, EngineSet
from hs_runtime.contract import LARGE, SMALL
from hs_runtime.flops import ideal_speedup, plan_flops
from hs_runtime.mask import used_shares
from hs_runtime.errors import ConfigError, ShapeError, describe
from hs_runtime.manifest import Manifest
from hs_runtime.pipeline import check_image_size
from hs_runtime.plans import PLAN_NAMES, MaskConfig, PlanConfig, make_plan, with_mask
from hs_runtime.runtime import HybridStitchRuntime
from hs_runtime.sampler import STAGES, Conditioning, StitchedSampler
from hs_runtime.validation import check_device, check_int, check_number, check_seed

from .bootstrap import ratio_interval
from .call_profile import call_rows, calls_table, dense_large_reference, markdown_calls
from .build import library_versions
from .build.export import release_memory
from .reports import append_section, versions_line

VERSUS_TOOLS = ("diffusers",)


@dataclass(frozen=True)
class BenchConfig:
    """Bench settings; CLI defaults come from here.

    Attributes:
        check_finite: the sampler's per-step NaN/inf record (off only to measure its cost).
        backends: backends timed side by side in one run (``--backends``); empty: the one backend
            the run opens (the engine folder's own, or torch for a preset).
        versus: ``"diffusers"`` adds diffusers' ``StableDiffusion3Pipeline`` on the same weights,
            prompt → image, beside our own prompt → image (:mod:`hs_export.versus`).
        calls: also time every graph call (:mod:`hs_export.call_profile`); on a GPU that
            synchronises around each call.
    """

    plans: tuple[str, ...] = ("large", "small", "tstitch", "srdiff", "hybrid")
    steps: int = 28
    warmup: int = 1
    repeat: int = 3
    prompts: int = 1
    guidance_scale: float = 7.0
    seed: int = 0
    sweep_ratios: tuple[float, ...] = ()
    check_finite: bool = True
    backends: tuple[str, ...] = ()
    versus: str | None = None
    calls: bool = False

    def __post_init__(self):
        unknown = [p for p in self.plans if p not in PLAN_NAMES]
        if unknown or not self.plans:
            raise ConfigError(describe("unknown plan in --plans", got=unknown or "none", expected=" | ".join(PLAN_NAMES)))
        check_int("--repeat", self.repeat)
        check_int("--warmup", self.warmup, minimum=0)
        check_int("--steps", self.steps)
        check_int("prompts", self.prompts)
        check_seed(self.seed)
        check_number("guidance scale", self.guidance_scale, minimum=0.0)
        for ratio in self.sweep_ratios:
            MaskConfig(ratio=ratio)  # raises ConfigError outside (0, 1]
        labels = [f"{ratio:g}" for ratio in self.sweep_ratios]  # each names a row: hybrid@<ratio>
        if len(set(labels)) < len(labels):
            raise ConfigError(describe("a mask ratio repeated in --sweep-ratio", got=",".join(labels), fix="name each ratio once"))
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ConfigError(describe("unknown backend in --backends", got=", ".join(map(repr, unknown)), expected=" | ".join(BACKENDS), fix="e.g. --backends onnxruntime,torch"))
        twice = sorted({b for b in self.backends if self.backends.count(b) > 1})
        if twice:
            raise ConfigError(describe("backend listed twice in --backends", got=", ".join(twice), fix="name each backend once"))
        if self.versus is not None and self.versus not in VERSUS_TOOLS:
            raise ConfigError(describe("unknown tool in --versus", got=repr(self.versus), expected=" | ".join(VERSUS_TOOLS)))


def parse_backends(text: str | None) -> tuple[str, ...]:
    """``"onnxruntime, torch"`` → ``("onnxruntime", "torch")``; names are checked by :class:`BenchConfig`."""
    return tuple(b.strip() for b in (text or "").split(",") if b.strip())


def random_conditioning(prompts: int, text_tokens: int, joint_dim: int, pooled_dim: int, device, seed: int) -> Conditioning:
    """Random prompt embeddings: latency does not depend on what the text says."""
    g = torch.Generator().manual_seed(seed)
    e, ne = (torch.randn(prompts, text_tokens, joint_dim, generator=g) for _ in range(2))
    p, np_ = (torch.randn(prompts, pooled_dim, generator=g) for _ in range(2))
    return Conditioning(e.to(device), p.to(device), ne.to(device), np_.to(device))


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated"
    from .build.builder import peak_rss

    return peak_rss(), "process peak RSS (includes everything loaded so far)"


def _median_times(runs: list[dict]) -> dict:
    keys = {k for r in runs for k, v in r.items() if isinstance(v, (int, float))}
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def resident_bytes() -> int | None:
    """The process's current resident set (Linux ``/proc/self/statm``); ``None`` where unreadable."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def memory_in_use(device: torch.device) -> int | None:
    """Bytes in use now: on a GPU the device's used memory, on a CPU the process's resident set.

    On a GPU that is ``cudaMemGetInfo``'s total − free (``torch.cuda.mem_get_info``), which sees
    every allocation on the device: TensorRT's engine weights and ONNX Runtime's CUDA arena, which
    torch's ``memory_allocated`` does not (a TensorRT folder's load read as its output buffers
    alone), and also what other processes allocate meanwhile. The synchronise first also makes
    the CUDA context, so a backend's load is not charged for it; torch's cached free blocks are
    handed back first (:func:`~hs_export.build.export.release_memory`), so neither reading counts
    memory nothing holds.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        release_memory(device)
        free, total = torch.cuda.mem_get_info(device)
        return total - free
    return resident_bytes()


class WorkingMemory:
    """Peak memory one call adds on top of what was in use when it started.

    On a GPU: ``max_memory_allocated`` above ``memory_allocated`` at the start (torch tensors
    only). On a CPU: the resident set sampled every ``interval_s`` by a background thread, minus the
    resident set at the start; ``bytes`` is ``None`` where the resident set cannot be read.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.bytes: int | None = None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._peak = resident_bytes()
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            now = resident_bytes()
            if now is not None and now > self._peak:
                self._peak = now

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return False
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            now = resident_bytes()
            self.bytes = max(self._peak, now or 0) - self._start
        return False


def load_average() -> float | None:
    """The host's 1-minute load average (``None`` where the OS has none): on a shared machine it
    tells whether other processes competed for the cores during a run."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def round_robin(jobs: Mapping[Hashable, Callable[[], object]], warmup: int, repeat: int, device: torch.device, log=print, what: str = "round") -> tuple[dict, dict]:
    """Calls every job once per round, ``warmup`` untimed rounds then ``repeat`` timed ones, the
    order reversed every other round so no job always follows the same neighbour.

    Returns:
        Per job key, the timed rounds' return values (in round order); and per job key the
        memory the job's first call added (:class:`WorkingMemory`, measured in the first round,
        a warm-up round when there is one), ``None`` where it cannot be measured.
    """
    keys = list(jobs)
    results: dict = {key: [] for key in keys}
    added: dict = {}
    for round_index in range(warmup + repeat):
        timed = round_index >= warmup
        for key in keys if round_index % 2 == 0 else reversed(keys):
            if round_index == 0:
                with WorkingMemory(device) as memory:
                    value = jobs[key]()
                added[key] = memory.bytes
            else:
                value = jobs[key]()
            if timed:
                results[key].append(value)
        log(f"{'warm-up' if not timed else 'timed'} {what} {round_index + 1}/{warmup + repeat} done")
    return results, added


def time_plans(denoise, plans: dict, latents, conditioning, warmup: int, repeat: int, device: torch.device, log=print) -> dict[str, list[dict]]:
    """Times every plan in :func:`round_robin` rounds (all plans once per round, the order
    reversed every other round), so machine noise and call order land on all of them alike.

    Args:
        denoise: ``denoise(plan, latents, conditioning, profile=True) -> DenoiseResult``.

    Returns:
        Per plan name, the timed rounds' stage times (``StageTimes.as_dict()`` plus
        ``step:<action>`` wall times).
    """

    def job(plan):
        def call():
            times = denoise(plan, latents, conditioning, profile=True).times
            return {**times.as_dict(), **{f"step:{a}": s for a, s in times.step_seconds.items()}}

        return call

    runs, _ = round_robin({name: job(plan) for name, plan in plans.items()}, warmup, repeat, device, log)
    return runs


@dataclass
class BenchTarget:
    """What a bench run opened: one runtime per backend, all over the same models and sizes.

    Attributes:
        runtimes: backend name → runtime, in the order the user named them.
        loaded_bytes: backend name → memory in use after its engines loaded minus before
            (:func:`memory_in_use`), ``None`` where unmeasurable.
        label: the engine folder or preset, for titles.
        pipeline_source / large_source: the text encoders + VAE folder and the large model
            (what ``--versus diffusers`` loads); ``None`` where the target has none.
        preset: the preset the models come from, if any (picks the built-in prompts).
    """

    runtimes: dict[str, HybridStitchRuntime]
    loaded_bytes: dict[str, int | None]
    latent: tuple[int, int]
    text_tokens: int
    label: str
    pipeline_source: str | None = None
    large_source: str | None = None
    preset: str | None = None
    max_sequence_length: int = 256

    @property
    def engines(self) -> dict[str, EngineSet]:
        return {name: runtime.engines for name, runtime in self.runtimes.items()}


def _refuse_versus(what: str, got: str) -> ConfigError:
    from hs_runtime.presets import PRESETS

    with_text = ", ".join(name for name, spec in PRESETS.items() if spec.text_pipeline)
    return ConfigError(describe(
        f"--versus diffusers runs prompt → image, which needs text encoders and a VAE; {what}", got=got,
        expected=f"an engine folder built from a full SD3 pipeline folder, or a preset with one ({with_text})",
        fix="build from a diffusers StableDiffusion3Pipeline folder (hs-export build --small S --large PIPELINE_DIR) and bench that folder",
    ))


def _prompt_range(runtime, guided: bool = True) -> tuple[int, int]:
    """Prompts one engine call of the folder takes with guidance (or without: asked, or a build
    that has no room for it)."""
    if guided:
        try:
            return runtime.prompt_range(cfg=True)
        except ShapeError:
            pass
    return runtime.prompt_range(cfg=False)


def open_target(engine_dir, preset, backends: tuple[str | None, ...], device, dtype, prompts: int, height, width, mask_ratio: float, versus: str | None = None, log=print, guided: bool = True) -> BenchTarget:
    """Opens the engine folder (or preset) once per backend, measuring what each load adds.

    Args:
        backends: the backends to open; ``(None,)`` opens the folder's own (torch for a preset).
            A preset's ONNX Runtime/TensorRT engines are built first where needed, all before any
            backend loads, each in a child process (:func:`hs_export.runs.build_preset_engines`).

    Raises:
        ConfigError: both or neither of folder and preset, ``--prompts`` differing from the build,
            ``--versus`` on a target without text encoders.
        ManifestError: a folder that does not hold engines for a backend (with the build command).
    """
    from hs_runtime.presets import get_preset

    from .runs import bench_engines, build_preset_engines, preset_size

    if (engine_dir is None) == (preset is None):
        given = "both" if preset is not None else "neither"
        raise ConfigError(describe("bench needs an engine folder or --preset (one of them)", got=given, fix="hs-export bench engines/tiny, or hs-export bench --preset bench"))
    device = check_device(device)
    spec = get_preset(preset) if preset is not None else None
    if spec is not None and versus and not spec.text_pipeline:
        raise _refuse_versus(f"preset {preset} has none", f"preset {preset}: random transformer weights only")
    manifest = Manifest.load(engine_dir) if engine_dir is not None else None  # read once for the checks before any engine loads
    if manifest is not None and versus and manifest.data.get("pipeline") is None:
        raise _refuse_versus(f"engine folder {engine_dir} records none", "a build from transformers without a pipeline folder")
    named = [b for b in backends if b is not None]
    if manifest is not None and dtype is None and "torch" in named and len(named) > 1:  # like for like
        dtype = manifest.build.get("precision")
        log(f"--backends: torch runs in {dtype}, the precision the engines were built in (--dtype to change)")
    # Every engine folder a preset needs is built (or found up to date) before any backend loads:
    # a build never runs beside weights this process already holds.
    built = {b: build_preset_engines(preset, b, dtype, prompts, height, width, mask_ratio, log=log) for b in named if spec is not None and b != "torch"}
    selection = None
    if spec is not None and spec.text_pipeline:
        from .build import resolve_models

        selection = resolve_models(preset, None, None, None, log=log)
    runtimes, loaded = {}, {}
    for backend in backends:
        before = memory_in_use(device)
        if engine_dir is not None:
            runtime = HybridStitchRuntime.from_dir(engine_dir, backend=backend, device=device, dtype=dtype)
            shape = runtime.manifest.shape
            low, high = _prompt_range(runtime, guided)  # unguided: one row per prompt, not two
            if not low <= prompts <= high:
                raise ConfigError(describe("--prompts outside what the engine build takes", got=prompts, expected=f"{low}..{high}" if low < high else low, fix=f"pass --prompts {min(max(prompts, low), high)}"))
            latent, text_tokens = (shape.latent_height, shape.latent_width), shape.text_tokens
            if height is not None or width is not None:  # the engines' profiles refuse a size they were not built for
                scale = runtime.manifest.vae_scale
                check_image_size(height, width, scale)
                latent = (latent[0] if height is None else height // scale, latent[1] if width is None else width // scale)
        elif backend in (None, "torch") and selection is not None:  # the preset's own weights, as saved
            h, w = preset_size(preset, height, width)
            runtime = HybridStitchRuntime.from_models(selection.small, selection.large, selection.pipeline, device=device, dtype=dtype, max_sequence_length=spec.max_sequence_length)
            latent, text_tokens = (h // 8, w // 8), spec.text_tokens
        else:
            if backend in built:
                engines = HybridStitchRuntime.from_dir(built[backend], device=device).engines
                h, w = preset_size(preset, height, width)
                latent, text_tokens = (h // 8, w // 8), spec.text_tokens
            else:
                engines, latent, text_tokens = bench_engines(preset, str(device), dtype, height, width, log=log)
            runtime = HybridStitchRuntime(engines, selection.pipeline if selection else None, spec.max_sequence_length)
        after = memory_in_use(device)
        name = runtime.engines.backend
        if name in runtimes:
            raise ConfigError(describe("backend opened twice", got=name, fix="name each backend once in --backends"))
        runtimes[name] = runtime
        loaded[name] = None if before is None or after is None else after - before
    first = next(iter(runtimes.values()))
    if manifest is not None:
        pipeline_source, large_source = first.pipeline_source, manifest.data["models"][LARGE]["source"]
        target_preset, label = manifest.build.get("preset"), str(engine_dir)
    else:
        pipeline_source = selection.pipeline if selection else None
        large_source = selection.large if selection else None
        target_preset, label = preset, f"--preset {preset}"
    return BenchTarget(runtimes, loaded, latent, text_tokens, label, pipeline_source and str(pipeline_source), large_source and str(large_source), target_preset, first.max_sequence_length)


def run_bench(engines, latent_height: int, latent_width: int, text_tokens: int, config: BenchConfig, plan_config: PlanConfig | None = None, log=print, loaded_bytes: Mapping[str, int | None] | None = None) -> dict:
    """Times every plan (and the ratio sweep) on one engine set, or on several side by side.

    Args:
        engines: an :class:`EngineSet`, or backend name → :class:`EngineSet` (all over the same
            models): every (plan, backend) pair is then timed in the same round-robin rounds.
        loaded_bytes: backend name → memory its engines took to load (:class:`BenchTarget`).

    Returns:
        The JSON-ready report: ``plans`` holds one row per plan and backend.
    """
    plan_config = plan_config or PlanConfig()
    engine_sets = {engines.backend: engines} if isinstance(engines, EngineSet) else dict(engines)
    backends = list(engine_sets)
    first = engine_sets[backends[0]]
    device = first.device
    large_dims, small_dims = first[LARGE].dims, first[SMALL].dims
    n_img = large_dims.image_tokens(latent_height, latent_width)
    names = list(dict.fromkeys(("large", *config.plans)))  # the baseline always runs
    plans = {name: make_plan(name, config.steps, plan_config) for name in names}
    for ratio in config.sweep_ratios:
        plans[f"hybrid@{ratio:g}"] = with_mask(make_plan("hybrid", config.steps, plan_config), ratio=ratio)
    samplers = {b: StitchedSampler(e, config.guidance_scale, check_finite=config.check_finite) for b, e in engine_sets.items()}
    cond = random_conditioning(config.prompts, text_tokens, large_dims.joint_attention_dim, large_dims.pooled_projection_dim, device, config.seed)
    g = torch.Generator().manual_seed(config.seed)
    latents = torch.randn(config.prompts, large_dims.in_channels, latent_height, latent_width, generator=g)

    def job(plan, sampler):
        def call():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            result = sampler.denoise(plan, latents, cond, profile=True, profile_calls=config.calls)
            times = result.times
            # the share of tokens the masks held (an adaptive mask picks it at each capture)
            share = float(used_shares(result.masks).mean()) if result.masks else None
            return {**times.as_dict(), **{f"step:{a}": s for a, s in times.step_seconds.items()}, "peak": _peak_memory(device)[0], "calls": dict(times.calls), "mask_share": share}

        return call

    jobs = {(name, b): job(plan, samplers[b]) for name, plan in plans.items() for b in backends}
    load_before = load_average()
    runs, added = round_robin(jobs, config.warmup, config.repeat, device, log)
    load_after = load_average()

    report_plans = []
    medians = {key: statistics.median(r["total"] for r in entries) for key, entries in runs.items()}
    # Per round, the plan against `large` timed in the same round: a paired ratio, so the noise
    # that moves a whole round (a neighbour's burst) cancels, and its spread over rounds says
    # whether an efficiency target is met or not.
    paired = {key: [base["total"] / run["total"] for base, run in zip(runs[("large", key[1])], entries)] for key, entries in runs.items()}
    dims = {LARGE: large_dims, SMALL: small_dims}
    references = {b: dense_large_reference([r["calls"] for r in runs[("large", b)]], dims) for b in backends}
    for name, plan in plans.items():
        shares = [r["mask_share"] for entries in (runs[(name, b)] for b in backends) for r in entries if r["mask_share"] is not None]
        if plan.mask.energy and shares:  # adaptive mask: cost (and label) the share it used, not its upper bound
            plan = with_mask(plan, ratio=statistics.mean(shares), energy=0.0)
        ideal = ideal_speedup(plan, small_dims, large_dims, n_img, text_tokens)
        for b in backends:
            totals = [r["total"] for r in runs[(name, b)]]
            med = _median_times(runs[(name, b)])
            speedup = medians[("large", b)] / medians[(name, b)]
            hybrid_wall = med.get("step:hybrid", 0.0)
            report_plans.append({
                "name": name,
                "backend": b,
                "measure": "denoise",
                "dtype": str(engine_sets[b].dtype).replace("torch.", ""),
                "stages": plan.stages(),
                "mask_ratio": plan.mask.ratio if plan.count("hybrid") else None,
                "latency_s_median": medians[(name, b)],
                "latency_s_rounds": totals,
                "latency_s_min": min(totals),
                "latency_s_max": max(totals),
                "speedup_vs_large": speedup,
                "ideal_speedup": ideal,
                "efficiency": speedup / ideal,
                "efficiency_paired": ratio_interval([r / ideal for r in paired[(name, b)]]),
                "overhead_fraction": med["overhead"] / med["total"],
                "hybrid_overhead_fraction": (hybrid_wall - med["hybrid"]) / hybrid_wall if hybrid_wall else None,
                "stage_seconds": {s: med[s] for s in (*STAGES, "overhead")},
                "flops_per_sample": plan_flops(plan, small_dims, large_dims, n_img, text_tokens).total,
                "peak_memory_bytes": max(r["peak"] for r in runs[(name, b)]),
                "added_memory_bytes": added[(name, b)],
                "latency_vs_backends": {o: medians[(name, b)] / medians[(name, o)] for o in backends if o != b},
                **({"calls": call_rows([r["calls"] for r in runs[(name, b)]], dims, references[b])} if config.calls else {}),
            })
    loaded_bytes = loaded_bytes or {}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "backend": ",".join(backends),
        "backends": [
            {"name": b, "dtype": str(e.dtype).replace("torch.", ""), "precision": e.precision, "loaded_bytes": loaded_bytes.get(b),
             "max_added_memory_bytes": max((added[(n, b)] for n in plans if added[(n, b)] is not None), default=None)}
            for b, e in engine_sets.items()
        ],
        "dtype": str(first.dtype).replace("torch.", ""),
        "latent": [latent_height, latent_width],
        "image_tokens": n_img,
        "text_tokens": text_tokens,
        "prompts": config.prompts,
        "steps": config.steps,
        "guidance_scale": config.guidance_scale,
        "seed": config.seed,
        "warmup": config.warmup,
        "repeat": config.repeat,
        "check_finite": config.check_finite,
        "calls_timed": config.calls,
        "plan_config": dataclasses.asdict(plan_config),
        "load_average_1min": {"start": load_before, "end": load_after},
        "peak_memory_kind": _peak_memory(device)[1],
        "memory_note": (MEMORY_NOTE_CUDA if device.type == "cuda" else MEMORY_NOTE_CPU if len(backends) > 1 else MEMORY_NOTE_CPU_PEAK)
        + ("" if config.warmup or device.type == "cuda" else NO_WARMUP_NOTE),
        "versions": library_versions(),
        "plans": report_plans,
    }
    if len(backends) > 1:
        report["side_by_side"] = [
            {"name": name, "latency_s_median": {b: medians[(name, b)] for b in backends},
             "ratios": {f"{a}/{b}": medians[(name, a)] / medians[(name, b)] for i, a in enumerate(backends) for b in backends[i + 1:]},
             "ratios_paired": {
                 f"{a}/{b}": ratio_interval([x["total"] / y["total"] for x, y in zip(runs[(name, a)], runs[(name, b)])])
                 for i, a in enumerate(backends) for b in backends[i + 1:]
             }}
            for name in plans
        ]
    return report


MEMORY_NOTE_CPU = (
    "loaded = resident set after a backend's engines loaded minus before (weights, sessions, and any library it imported first); "
    "added = resident-set peak above the level at the call's start, sampled every 5 ms during each plan's first call "
    "(the warm-up round, where arenas and caches grow). Both are measured in one process that holds every backend, so they are "
    "lower bounds of what that backend alone adds to a process (memory one backend freed and another reused counts once); "
    "for a whole process's peak, run one backend per process (--backend: the peak MiB column)"
)
MEMORY_NOTE_CPU_PEAK = (
    "peak MiB = the process's peak resident set so far (Linux VmHWM; ru_maxrss elsewhere), which never falls: a row repeats the largest "
    "of the rows before it unless its own plan went higher; each plan's own addition: --backends (added MiB)"
)
NO_WARMUP_NOTE = "; with --warmup 0 the first round, where the memory is sampled (a thread waking every 5 ms), is also timed"
MEMORY_NOTE_CUDA = (
    "loaded = the GPU's used memory after the backend's load minus before (cudaMemGetInfo: every allocation on the device, "
    "the engine libraries' own included, and other processes' meanwhile); added and peak = torch's CUDA allocations only "
    "(max_memory_allocated: TensorRT's activations and outputs, which this toolkit allocates through torch; not ONNX Runtime's CUDA arena)"
)


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def _with_paired(value: float, paired: dict | None, digits: int = 2) -> str:
    """A ratio of medians, then the paired rounds' geometric mean and 95% t interval where there
    are several rounds."""
    if not paired or paired["rounds"] < 2:
        return f"{value:.{digits}f}"
    low, high = paired["ci95"]
    return f"{value:.{digits}f} ({paired['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}])"


def _efficiency(row: dict) -> str:
    return _with_paired(row["efficiency"], None if row["name"] == "large" else row.get("efficiency_paired"))


def summary_table(report: dict):
    from rich.table import Table

    several = len(report["backends"]) > 1
    what = report["backend"] if several else f"{report['backend']} {report['dtype']}"
    table = Table(title=f"{what} on {report['device']} — denoise, {report['steps']} steps, "
                        f"{report['image_tokens']} image + {report['text_tokens']} text tokens, median of {report['repeat']}")
    memory_column = "added MiB" if several else "peak MiB"
    columns = ("plan", *(("backend",) if several else ()), "latency s (min–max)", "speedup", "ideal", "eff. (paired geo. mean, 95% CI)", *STAGES, "overhead", memory_column)
    for column in columns:
        table.add_column(column, justify="left" if column in ("plan", "backend") else "right")
    for p in report["plans"]:
        if p.get("measure", "denoise") != "denoise":
            continue
        stages = [f"{p['stage_seconds'][s]:.2f}" for s in (*STAGES, "overhead")]
        table.add_row(
            _plan_label(p), *((p["backend"],) if several else ()), f"{p['latency_s_median']:.2f} ({p['latency_s_min']:.2f}–{p['latency_s_max']:.2f})",
            f"{p['speedup_vs_large']:.2f}×", f"{p['ideal_speedup']:.2f}×", _efficiency(p), *stages,
            _mib(p["added_memory_bytes"] if several else p["peak_memory_bytes"]),
        )
    return table


def _plan_label(plan: dict) -> str:
    """A plan's name with its mask ratio where it has hybrid steps (a sweep row's name says it)."""
    ratio = plan.get("mask_ratio")
    return plan["name"] if ratio is None or "@" in plan["name"] else f"{plan['name']} ({ratio * 100:g}% mask)"


def _backend_column(backend: dict) -> str:
    """A backend's latency column, named with the precision it ran in (like for like or not)."""
    return f"{backend['name']} {backend['precision']} s"


def backends_table(report: dict):
    """Side by side: each plan's latency per backend and the ratios between backends (``None``
    for a one-backend report)."""
    from rich.table import Table

    if "side_by_side" not in report:
        return None
    backends = [b["name"] for b in report["backends"]]
    pairs = list(report["side_by_side"][0]["ratios"])
    table = Table(title=f"backends side by side — denoise latency, median of {report['repeat']} (same rounds); a/b < 1: a is faster; (paired geometric mean [95% CI])")
    for column in ("plan", *map(_backend_column, report["backends"]), *pairs):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for row in report["side_by_side"]:
        table.add_row(row["name"], *(f"{row['latency_s_median'][b]:.3f}" for b in backends), *(_with_paired(row["ratios"][p], row["ratios_paired"][p], 3) for p in pairs))
    table.add_row("memory MiB: loaded + max added", *(f"{_mib(b['loaded_bytes'])} + {_mib(b['max_added_memory_bytes'])}" for b in report["backends"]), *("" for _ in pairs))
    return table


def summary_tables(report: dict) -> list:
    """Every table of the report, in print order: plans, backends side by side, versus."""
    tables = [summary_table(report), backends_table(report), calls_table(report)]
    if "versus" in report:
        from .versus import versus_table

        tables.append(versus_table(report["versus"]))
    return [t for t in tables if t is not None]


def markdown_table(report: dict) -> str:
    """The plans table as Markdown, for docs/benchmarks.md."""
    several = len(report["backends"]) > 1
    memory = "added MiB" if several else "peak MiB"
    backend_head = "backend | " if several else ""
    head = f"| plan | {backend_head}stages | latency s median (min–max) | speedup vs large | ideal | efficiency (paired geo. mean, 95% CI) | overhead | {memory} |\n|---|---|---|---|---|---|---|---|{'---|' if several else ''}\n"
    rows = "".join(
        f"| {_plan_label(p)} | {p['backend'] + ' | ' if several else ''}{p['stages']} | {p['latency_s_median']:.3f} ({p['latency_s_min']:.3f}–{p['latency_s_max']:.3f}) | "
        f"{p['speedup_vs_large']:.2f}× | {p['ideal_speedup']:.2f}× | {_efficiency(p)} | {100 * p['overhead_fraction']:.1f}% | "
        f"{_mib(p['added_memory_bytes'] if several else p['peak_memory_bytes'])} |\n"
        for p in report["plans"] if p.get("measure", "denoise") == "denoise"
    )
    return head + rows


def markdown_backends(report: dict) -> str:
    """The side-by-side table as Markdown ("" for one backend)."""
    if "side_by_side" not in report:
        return ""
    backends = [b["name"] for b in report["backends"]]
    pairs = list(report["side_by_side"][0]["ratios"])
    head = "| plan | " + " | ".join(map(_backend_column, report["backends"])) + " | " + " | ".join(pairs) + " |\n|" + "---|" * (1 + len(backends) + len(pairs)) + "\n"
    rows = "".join(
        f"| {r['name']} | " + " | ".join(f"{r['latency_s_median'][b]:.3f}" for b in backends) + " | " + " | ".join(_with_paired(r["ratios"][p], r["ratios_paired"][p], 3) for p in pairs) + " |\n"
        for r in report["side_by_side"]
    )
    memory = "| memory MiB: loaded + max added | " + " | ".join(f"{_mib(b['loaded_bytes'])} + {_mib(b['max_added_memory_bytes'])}" for b in report["backends"]) + " |" + " |" * len(pairs) + "\n"
    return head + rows + memory


def plot_sweep(report: dict, path: Path) -> Path:
    """Speedup vs. mask ratio, measured (per backend) and ideal, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [p for p in report["plans"] if p.get("measure", "denoise") == "denoise"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for backend in dict.fromkeys(p["backend"] for p in rows):
        mine = [p for p in rows if p["backend"] == backend]
        sweep = sorted((p for p in mine if p["name"].startswith("hybrid@")), key=lambda p: p["mask_ratio"])
        if not sweep:
            sweep = [p for p in mine if p["mask_ratio"] is not None]
        ratios = [p["mask_ratio"] for p in sweep]
        ax.plot(ratios, [p["speedup_vs_large"] for p in sweep], "o-", label=f"measured ({backend})" if len(report["backends"]) > 1 else "measured")
    ax.plot(ratios, [p["ideal_speedup"] for p in sweep], "s--", label="FLOP ideal")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("mask ratio (share of tokens refined by the large model)")
    ax.set_ylabel("speedup vs. large")
    ax.set_title(f"hybrid, {report['backend']} on {report['device']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def load_note(load: dict | None) -> str:
    """``"; host load average (1 min) a at the start, b at the end"`` for a report's sentence."""
    if not load or load.get("start") is None:
        return ""
    return f"; host load average (1 min) {load['start']:g} at the start, {load['end']:g} at the end"


def append_markdown(report: dict, path: Path, title: str) -> Path:
    """Appends one dated section (device, versions, tables) to a Markdown file."""
    several = len(report["backends"]) > 1
    guidance = f"{'with' if report['guidance_scale'] > 1.0 else 'without'} CFG (guidance {report['guidance_scale']:g})"
    section = (
        f"\n### {title} — {report['date'][:10]}\n\n"
        f"Device: {report['device']}. {report['steps']} steps, {report['prompts']} prompt(s) {guidance}, "
        f"latent {report['latent'][0]}×{report['latent'][1]} ({report['image_tokens']} image + {report['text_tokens']} text tokens), "
        f"median of {report['repeat']} after {report['warmup']} warm-up"
        f"{', every (plan, backend) in the same round-robin rounds' if several else ''}{load_note(report.get('load_average_1min'))}. "
        f"Versions: {versions_line(report['versions'])}.\n\n"
        "Denoise only (prompt embeddings → latents):\n\n" + markdown_table(report)
    )
    if several:
        section += "\nBackends side by side (a/b < 1: a is faster):\n\n" + markdown_backends(report)
    section += f"\nMemory: {report['memory_note']}.\n"
    calls = markdown_calls(report)
    if calls:
        section += "\nGraph calls per denoise (time and FLOPs as multiples of one dense large call of the same run):\n\n" + calls
    if "versus" in report:
        from .versus import versus_markdown

        section += "\n" + versus_markdown(report["versus"])
    return append_section(path, section)
