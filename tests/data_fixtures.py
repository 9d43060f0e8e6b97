"""Small datasets whose contents reveal what a loader reads (tests/unit/test_data.py,
tests/e2e/test_data_scripts.py)."""
from __future__ import annotations

import datasets


def index_dataset(path: str) -> str:
    """20 records of length 5 whose tokens are the record index (so batches reveal the order)."""
    datasets.Dataset.from_dict({"input_ids": [[i] * 5 for i in range(20)],
                                "labels": [[-100] + [i] * 4 for i in range(20)]}).save_to_disk(path)
    return path
