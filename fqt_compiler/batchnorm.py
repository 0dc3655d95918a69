"""BatchNorm recalibration: running statistics re-estimated with the final weights.

In eval mode BatchNorm normalizes with running averages collected during training, while the
weights kept moving; with noisy (quantized) gradient updates the averages lag the activations
the final weights produce, and eval-mode accuracy falls below train-mode (batch-statistics)
accuracy. The standard remedy for quantized training is to re-estimate the statistics once
training is done: reset them and average the batch statistics of a few batches, in a pass that
computes no gradient and changes no weight.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import torch.nn as nn


def recalibrate_bn(model: nn.Module, batches: Iterable) -> int:
    """Re-estimate every BatchNorm layer's ``running_mean``/``running_var`` of ``model`` (an
    ``fqt.compile``d module or a plain one) from ``batches``; returns the number of batches.

    ``batches``: an iterable of model inputs, or of ``(input, ...)`` tuples/lists (a data
    loader's ``(x, y)``), whose first element is passed to ``model``. The statistics become the
    plain average over the batches of each batch's mean and unbiased variance (what
    ``momentum=None``, BatchNorm's cumulative mode, computes), with the BatchNorm layers in
    train mode and every other module in eval mode (no dropout: the same batches give the
    same statistics), without gradient. Afterwards every module's mode and each layer's
    ``momentum`` are restored; ``num_batches_tracked`` counts the recalibration batches.
    Parameters, their ``.grad``, an optimizer's state and fqt's RNG step are not touched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    untracked = [name for name, m in model.named_modules() if m in norms and not m.track_running_stats]
    if untracked:
        raise ValueError(f"BatchNorm layers {untracked} keep no running statistics "
                         f"(track_running_stats=False): nothing to recalibrate")
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("recalibrate_bn got no batches: pass an iterable of model inputs "
                         "(or (input, target) pairs) from the training set")
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    sums = {m: (torch.zeros_like(m.running_mean, dtype=torch.float64),
                torch.zeros_like(m.running_var, dtype=torch.float64)) for m in norms}
    count = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            # Momentum 1 makes each forward leave exactly its batch's statistics in the
            # buffers, summed here; BatchNorm's own momentum=None mode would read
            # num_batches_tracked with .item() inside the compiled graph (a graph break).
            m.momentum = 1.0
            m.train()
        with torch.no_grad():
            for batch in itertools.chain([first], batches):
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
                count += 1
                for m, (mean, var) in sums.items():
                    mean += m.running_mean
                    var += m.running_var
            for m, (mean, var) in sums.items():
                m.running_mean.copy_(mean / count)
                m.running_var.copy_(var / count)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
    return count
