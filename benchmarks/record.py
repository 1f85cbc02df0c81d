"""The JSON file every benchmark writes next to its printed table, stamped with what produced it."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch


def write_json(path: str | Path, **fields: object) -> None:
    """Write ``fields`` to ``path`` with the date, machine, CPU count, threads and torch version."""
    out = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, **fields}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
