"""HH-RLHF pairs for benchmarks: split each dialogue at its last "\\n\\nAssistant:"; skip rows whose prompts differ."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
MARK = "\n\nAssistant:"


def hh_pairs(split: str = "helpful-base", limit: int | None = None) -> list[dict[str, str]]:
    path = SHARED / "hh-rlhf" / split / "test.jsonl.gz"
    if not path.exists():
        raise SystemExit(f"{path} not found: the benchmarks read the shared HH-RLHF test split")
    rows = []
    with gzip.open(path, "rt") as f:
        for line in f:
            d = json.loads(line)
            c, r = d["chosen"], d["rejected"]
            ic, ir = c.rfind(MARK) + len(MARK), r.rfind(MARK) + len(MARK)
            if c[:ic] != r[:ir] or not c[ic:].strip() or not r[ir:].strip():
                continue
            rows.append({"prompt": c[:ic], "chosen": c[ic:], "rejected": r[ir:]})
            if limit and len(rows) == limit:
                break
    return rows
