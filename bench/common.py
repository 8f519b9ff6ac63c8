"""What every benchmark records next to its numbers: the command, the machine, the date, and the spread
(min / median / max) of repeated measurements. Runs are interleaved in one process, so machine load hits
every variant alike: read the ratios, the absolute numbers only indicate."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    info = {"cpu": model, "cores": os.cpu_count(), "load_avg_1min_at_start": load,
            "torch_threads": _torch_threads(), "python": platform.python_version()}
    try:
        import torch
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _torch_threads() -> int | None:
    try:
        import torch
        return torch.get_num_threads()
    except ImportError:
        return None


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "all": values}


def header() -> dict:
    return {"command": " ".join(["python"] + sys.argv), "date": datetime.date.today().isoformat(),
            "machine": machine()}
