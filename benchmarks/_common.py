"""Shared helpers of the benchmarks: machine description, interleaved timing, JSON and tables.

Every benchmark times a candidate and its baseline in the same process, round after round, with
the order alternating between rounds (A B, B A, A B, ...), so that load from other processes on a
shared machine hits both alike. It reports medians and, above all, ratios: the median over rounds
of the per-round ratio (paired), next to the ratio of the medians.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: Image sizes ``(h, w)`` used by the benchmarks: a realistic mix of phone photos (landscape and
#: portrait), video frames, social-media portraits, dataset photos (COCO, VGA), panoramas,
#: documents and small thumbnails. Benchmarks take a prefix of this list, so the first 8 are the
#: most representative.
IMAGE_SIZES: tuple[tuple[int, int], ...] = (
    (3024, 4032),  # phone photo, 4:3 landscape (12 MP)
    (1350, 1080),  # social-media portrait, 4:5
    (1080, 1920),  # full-HD frame, 16:9
    (480, 640),  # VGA / COCO photo
    (900, 3600),  # panorama, 1:4
    (224, 224),  # small square
    (150, 200),  # thumbnail
    (4032, 3024),  # phone photo, 3:4 portrait (12 MP)
    (768, 1024),  # web photo, 3:4
    (427, 640),  # COCO landscape
    (2200, 1700),  # scanned page, US letter
    (512, 2048),  # panorama strip
    (720, 1280),  # HD frame
    (1024, 1024),  # square render
    (96, 128),  # tiny
    (1536, 2048),  # camera photo, 3 MP
)


class TinyPatchEmbed(torch.nn.Module):
    """A 16x16 stride-16 convolution to 64 channels: ``[n, 3, 224, 224] -> [n, 64, 14, 14]`` maps.

    Nearly free to run, so a benchmark with it shows the cost of everything around the backbone.
    Inputs are cast to the weight's dtype (float32 tiles into a bf16 model on a GPU).
    """

    def __init__(self, channels: int = 64, patch: int = 16, input_size: int = 224) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(3, channels, kernel_size=patch, stride=patch)
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.proj.weight.dtype))


def device_and_dtype(device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 when a GPU is present (or asked for), else CPU in float32."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict:
    """Where and how a benchmark ran: platform, CPU, torch, threads, device (and the GPU's name)."""
    dev = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "device_name": (
            torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu: {cpu_model()}"
        ),
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    return info


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_once(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Wall time of one call, synchronised before and after."""
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    elapsed = time.perf_counter() - t0
    del result
    return elapsed


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Time every function ``repeats`` times, round after round, alternating the order.

    Returns:
        ``{name: [seconds per round]}``.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            gc.collect()
            times[name].append(time_once(fns[name], sync))
    return times


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return float(statistics.median(values))


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[r] / den[r]``."""
    return median([a / b for a, b in zip(num, den, strict=True)])


def spread(values: Sequence[float]) -> float:
    """Relative spread ``(max - min) / median``: how noisy the repeats were."""
    m = median(values)
    return (max(values) - min(values)) / m if m else 0.0


def fmt_ms(seconds: float) -> str:
    """Milliseconds with three significant figures."""
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = [
        "| " + " | ".join(str(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(info: Mapping[str, Any]) -> str:
    """One line naming the machine, for the tables in the docs."""
    return (
        f"Machine: {info.get('device_name')} ({info.get('cpu_count')} cores, "
        f"{info.get('torch_threads')} torch threads), {info.get('platform')}, "
        f"torch {info.get('torch')}, dtype {info.get('dtype')}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in info.get('load_average_at_start') or [])}; "
        f"`{info.get('command')}` at {info.get('time')}."
    )


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def report(name: str, data: dict[str, Any], table: str) -> Path:
    """Write ``data`` with :func:`write_result`, print ``table``, and say where it went."""
    path = write_result(name, data)
    print(table)
    print(f"\nwrote {path}", file=sys.stderr)
    return path


def random_images(
    sizes: Sequence[tuple[int, int]], *, seed: int = 0, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """One random uint8 ``[3, h, w]`` image per size."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen).to(device)
        for h, w in sizes
    ]
