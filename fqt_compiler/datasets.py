"""Real data that ships inside a package (nothing is downloaded): scikit-learn's digits."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8x8 digits images, bilinearly upsampled to ``size`` x ``size`` and
    standardised: float32 ``[1797, 1, size, size]`` and int64 labels 0-9. Needs
    scikit-learn (``pip install -e '.[examples]'``)."""
    from sklearn.datasets import load_digits
    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - x.mean()) / x.std(), torch.tensor(raw.target)
