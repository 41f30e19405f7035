"""The learning-rate schedule of the demo's training runs: linear warm-up, then cosine decay to zero."""
from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(total: int, warmup_frac: float) -> Callable[[int], float]:
    """``step -> factor`` for ``torch.optim.lr_scheduler.LambdaLR``: ``(step + 1) / warm`` for the first
    ``warm = max(1, total * warmup_frac)`` steps, then a half cosine from 1 to 0 over the rest."""
    warm = max(1, int(total * warmup_frac))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
