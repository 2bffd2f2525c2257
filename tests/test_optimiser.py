"""The training update: AdamW's warmup and linear decay, weight decay, and gradient-norm clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdsearch.config.overrides import load_config
from kdsearch.run.optimiser import make_optimiser


def test_warmup_then_linear_decay_to_zero() -> None:
    cfg = load_config(["train.lr=0.01", "train.warmup_ratio=0.2", "train.weight_decay=0.05"])
    model = nn.Linear(3, 1)
    optimiser = make_optimiser(cfg, model, total_steps=10, device=torch.device("cpu"))
    assert optimiser.opt.param_groups[0]["weight_decay"] == 0.05
    rates = []
    for _ in range(10):
        rates.append(optimiser.opt.param_groups[0]["lr"])
        model(torch.ones(1, 3)).sum().backward()
        optimiser.clip()
        optimiser.step()
    # 2 warmup steps (0.2 x 10) rising to the peak, then 8 steps falling linearly to 0
    assert rates == pytest.approx([0.005, 0.01, 0.01, 0.00875, 0.0075, 0.00625, 0.005, 0.00375, 0.0025, 0.00125])
    assert optimiser.opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_clip_scales_the_gradients_to_norm_one_and_returns_the_norm_before() -> None:
    cfg = load_config([])
    model = nn.Linear(4, 1, bias=False)
    optimiser = make_optimiser(cfg, model, total_steps=1, device=torch.device("cpu"))
    with torch.no_grad():
        model.weight.zero_()
    (model(torch.full((1, 4), 3.0)).sum() * 2).backward()  # gradient (6, 6, 6, 6): norm 12
    norm = optimiser.clip()
    assert float(norm) == pytest.approx(12.0)
    assert float(model.weight.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(model.weight.grad, torch.full((1, 4), 0.5), rtol=1e-5, atol=1e-6)
    # a gradient already under the limit is left as it is
    optimiser.opt.zero_grad()
    (model(torch.full((1, 4), 0.1)).sum()).backward()
    before = model.weight.grad.clone()
    optimiser.clip()
    torch.testing.assert_close(model.weight.grad, before)

