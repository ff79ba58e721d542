"""``hs-export bench-serve``: throughput and latency of a running server per client concurrency.

For each concurrency ``c``, ``c`` client threads (one ``tritonclient`` each) send ``N`` requests
in total, back to back, with distinct seeds. Reported per level: throughput (images/s = N ÷ wall
time), latency p50/p95/p99 (client side: queueing, batching, the engine call, decode and
transfer), and the mean Triton batch (from the server's Prometheus metrics:
Δ``nv_inference_count`` ÷ Δ``nv_inference_exec_count``). The server's batching mode is read from
its model config, so one run measures one mode; run it against a ``--no-dynamic-batching`` server
and pass that JSON as ``--baseline`` to get the ratio.
"""

from __future__ import annotations

import datetime
import json
import platform
import re
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from hs_runtime.errors import ConfigError, describe, first_line

from ..reports import append_section
from .client import HybridStitchClient, check_timeout, split_url
from .protocol import GENERATE, ServingError


@dataclass(frozen=True)
class ServeBenchConfig:
    """bench-serve settings; CLI defaults come from here."""

    url: str = "http://127.0.0.1:8000"
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    requests: int = 16
    prompt: str = "a photo of a cat in the city"
    plan: str | None = None
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    metrics_url: str | None = None
    timeout_s: float = 600.0

    def __post_init__(self):
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ConfigError(describe("--concurrency takes positive integers", got=list(self.concurrency), expected="e.g. 1,2,4,8"))
        if self.requests < 1:
            raise ConfigError(describe("--requests must be >= 1", got=self.requests))
        split_url(self.url)
        check_timeout(self.timeout_s)
        if self.metrics_url is not None:
            parsed = urlparse(self.metrics_url)
            try:
                port = parsed.port
            except ValueError:  # not a number, or past 65535
                port = 0
            if parsed.scheme not in ("http", "https") or not parsed.hostname or port == 0:
                raise ConfigError(describe("--metrics-url is not an HTTP URL", got=repr(self.metrics_url), expected="http://HOST:PORT/metrics (Triton's metrics port, 8002 by default)"))

    def metrics(self) -> str:
        if self.metrics_url:
            return self.metrics_url
        _, address = split_url(self.url)
        return f"http://{address.rsplit(':', 1)[0]}:8002/metrics"


def scrape_counts(metrics_url: str, model: str = GENERATE.name, timeout_s: float = 5.0) -> tuple[float, float] | None:
    """``(nv_inference_count, nv_inference_exec_count)`` of ``model`` from Triton's metrics, or
    ``None`` when the endpoint cannot be read."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError:
        return None
    counts = {}
    for name in ("nv_inference_count", "nv_inference_exec_count"):
        match = re.search(rf'^{name}\{{[^}}]*model="{re.escape(model)}"[^}}]*\}}\s+([0-9.eE+-]+)$', text, flags=re.M)
        if match is None:
            return None
        counts[name] = float(match.group(1))
    return counts["nv_inference_count"], counts["nv_inference_exec_count"]


def _level(config: ServeBenchConfig, concurrency: int, seed_base: int) -> dict:
    """One concurrency level: ``config.requests`` requests from ``concurrency`` threads."""
    latencies: list[float] = []
    errors: list[str] = []
    next_index = iter(range(config.requests))
    lock = threading.Lock()
    clients = [HybridStitchClient(config.url, config.timeout_s) for _ in range(concurrency)]
    start_gate = threading.Barrier(concurrency + 1)

    def worker(client: HybridStitchClient) -> None:
        start_gate.wait()
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            began = time.perf_counter()
            try:
                client.generate(config.prompt, seed=seed_base + index, plan=config.plan, steps=config.steps, height=config.height, width=config.width)
                with lock:
                    latencies.append(time.perf_counter() - began)
            except ServingError as exc:
                with lock:
                    errors.append(str(exc))

    before = scrape_counts(config.metrics())
    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    start_gate.wait()
    began = time.perf_counter()
    for t in threads:
        t.join(timeout=config.timeout_s * config.requests)
    wall = time.perf_counter() - began
    after = scrape_counts(config.metrics())
    for c in clients:
        c.close()
    if any(t.is_alive() for t in threads):
        raise ServingError(describe(f"bench-serve: requests still running after {config.timeout_s * config.requests:.0f} s at concurrency {concurrency}"))
    if not latencies:
        raise ServingError(describe(f"every request failed at concurrency {concurrency}", got=errors[0] if errors else "no answer"))
    mean_batch = None
    if before and after and after[1] > before[1]:
        mean_batch = (after[0] - before[0]) / (after[1] - before[1])
    lat = np.array(latencies)
    return {
        "concurrency": concurrency, "requests": config.requests, "ok": len(latencies), "errors": len(errors),
        "seconds": wall, "images_per_s": len(latencies) / wall,
        "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)), "p99_s": float(np.percentile(lat, 99)),
        "mean_s": float(lat.mean()), "mean_batch": mean_batch, "first_error": errors[0] if errors else None,
    }


def run_bench_serve(config: ServeBenchConfig, log=print) -> dict:
    """Measures every concurrency level in order; one warm-up request first."""
    from rich.console import Console
    from rich.progress import Progress

    with HybridStitchClient(config.url, config.timeout_s) as client:
        model_config = client.model_config(GENERATE.name)
        client.generate(config.prompt, seed=10**6, plan=config.plan, steps=config.steps, height=config.height, width=config.width)  # warm-up
    if scrape_counts(config.metrics()) is None:
        log(f"mean batch unknown: no Triton metrics for {GENERATE.name} at {config.metrics()} (pass --metrics-url where the server's metrics port is not 8002)")
    dynamic = "dynamic_batching" in model_config
    batcher = model_config.get("dynamic_batching") or {}
    instances = sum(int(g.get("count", 1)) for g in model_config.get("instance_group", [])) or None
    rows = []
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("bench-serve", total=len(config.concurrency))
        for i, concurrency in enumerate(config.concurrency):
            progress.update(task, description=f"concurrency {concurrency}: {config.requests} requests")
            row = _level(config, concurrency, seed_base=1000 * (i + 1))
            rows.append(row)
            progress.advance(task)
            log(f"concurrency {concurrency}: {row['images_per_s']:.3f} images/s, p50 {row['p50_s']:.2f} s, mean batch {_fmt(row['mean_batch'], '.2f')}")
    return {
        "date": datetime.date.today().isoformat(), "url": config.url, "model": GENERATE.name,
        "dynamic_batching": dynamic, "max_queue_delay_us": int(batcher.get("max_queue_delay_microseconds", 0) or 0) if dynamic else None,
        "max_batch_size": model_config.get("max_batch_size"), "instances": instances,
        "plan": config.plan, "steps": config.steps, "height": config.height, "width": config.width, "prompt": config.prompt,
        "client_host": f"{platform.node()} ({platform.machine()})", "config": asdict(config), "rows": rows,
    }


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def with_baseline(report: dict, baseline: dict | None) -> dict:
    """Adds ``vs_baseline`` (throughput ratio at the same concurrency) to each row."""
    if baseline:
        base = {r["concurrency"]: r["images_per_s"] for r in baseline.get("rows", [])}
        for row in report["rows"]:
            b = base.get(row["concurrency"])
            row["vs_baseline"] = row["images_per_s"] / b if b else None
        report["baseline"] = {k: baseline.get(k) for k in ("date", "url", "dynamic_batching", "max_batch_size", "instances")}
    return report


def mode(report: dict) -> str:
    if report["dynamic_batching"]:
        return f"dynamic batching on (max batch {report['max_batch_size']}, delay {report['max_queue_delay_us'] / 1000:g} ms)"
    return f"dynamic batching off (max batch {report['max_batch_size']})"


_COLUMNS = ("concurrency", "images/s", "p50 s", "p95 s", "p99 s", "mean batch", "errors")


def _cells(row: dict) -> list[str]:
    cells = [str(row["concurrency"]), f"{row['images_per_s']:.3f}", f"{row['p50_s']:.2f}", f"{row['p95_s']:.2f}", f"{row['p99_s']:.2f}", _fmt(row["mean_batch"], ".2f"), str(row["errors"])]
    if "vs_baseline" in row:
        cells.append(_fmt(row["vs_baseline"], ".2f") + ("×" if row["vs_baseline"] else ""))
    return cells


def summary_table(report: dict):
    from rich.table import Table

    table = Table(title=f"{report['model']} at {report['url']}: {mode(report)}, {report['instances']} instance(s)")
    columns = list(_COLUMNS) + (["vs baseline"] if "baseline" in report else [])
    for column in columns:
        table.add_column(column, justify="right")
    for row in report["rows"]:
        table.add_row(*_cells(row))
    return table


def markdown_table(report: dict) -> str:
    columns = list(_COLUMNS) + (["vs baseline"] if "baseline" in report else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in report["rows"]]
    return "\n".join(lines)


def read_json(path: str | Path) -> dict:
    """A ``--baseline``: the JSON report of an earlier bench-serve run, with its rows.

    Raises:
        ConfigError: the file cannot be read, is not JSON, or holds no bench-serve rows.
    """
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text
        raise ConfigError(describe(f"cannot read the baseline {path}", got=first_line(exc), fix="pass the --json of an earlier bench-serve run")) from None
    rows = report.get("rows") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and {"concurrency", "images_per_s"} <= r.keys() for r in rows):
        got = f"a JSON {type(report).__name__}" if not isinstance(report, dict) else "no rows" if not rows else "rows without concurrency and images_per_s"
        raise ConfigError(describe(f"the baseline {path} is not a bench-serve report", got=got, expected="what hs-export bench-serve --json wrote: rows with concurrency and images_per_s", fix="pass the --json of an earlier bench-serve run"))
    return report


def append_markdown(report: dict, path: str | Path, title: str) -> Path:
    steps = f"{report['steps']} steps" if report["steps"] else "the folder's default steps"
    text = (
        f"\n### {title} — {report['date']}\n\n"
        f"`hs-export bench-serve {report['url']}`: {mode(report)}, {report['instances']} instance(s), "
        f"plan {report['plan'] or 'default'}, {steps}, {report['config']['requests']} requests per concurrency.\n\n"
        + markdown_table(report) + "\n"
    )
    return append_section(path, text)
