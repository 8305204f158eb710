"""The tasks' documents from the jsonl beside this file: no download, no hub."""

from __future__ import annotations

import json
from pathlib import Path

import datasets


def load(**kwargs) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (Path(__file__).parent / "steer_mc.jsonl").read_text().splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
