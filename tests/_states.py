"""States the tests of several modules share."""

from __future__ import annotations

from typing import Any

import torch


def mixed_state() -> dict[str, Any]:
    base = torch.arange(1000, dtype=torch.float32)
    return {
        "model": {
            "w": torch.randn(300, 70),
            "b": torch.randn(70, dtype=torch.float64),
            "half": torch.randn(33).to(torch.bfloat16),
            "mask": torch.rand(17) > 0.5,
            "ints": torch.randint(-(2**40), 2**40, (9,), dtype=torch.int64),
            "cplx": torch.randn(5, dtype=torch.complex64),
            "empty": torch.empty(0, 3),
            "param": torch.nn.Parameter(torch.randn(4, 4)),
        },
        # Two views of one storage, one with an offset, one transposed.
        "views": [base[10:20], base[500:].view(50, 10).t()],
        "scalar": torch.tensor(3.5),
        "meta": {"step": 7, "name": "run", "lrs": (0.1, 0.01)},
        "small": [torch.full((16,), float(i)) for i in range(300)],
    }
