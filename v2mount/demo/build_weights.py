"""Regenerate the demo weights (deterministic): ``python -m v2mount.demo.build_weights``."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def main() -> None:
    root = Path(__file__).parent / "linear"
    for version, seed in (("1", 1), ("2", 2)):
        rng = np.random.default_rng(seed)
        np.savez(
            root / version / "weights.npz",
            W=rng.normal(size=(4, 3)).astype(np.float32),
            b=rng.normal(size=3).astype(np.float32),
        )


if __name__ == "__main__":
    main()
