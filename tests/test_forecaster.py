"""The twin model's training step against torch's own Adam."""

from __future__ import annotations

import torch

from twin_store.models.forecaster import TwinModel, adam_step


def test_adam_step_is_torch_adam_to_the_bit() -> None:
    """``fit`` steps with the functional update (the class imports torch._dynamo); over many steps of a
    stacked twin batch the parameters are exactly those of ``torch.optim.Adam``."""
    torch.manual_seed(0)
    model = TwinModel(8, 5)
    start = model.init(6, 0)
    x, y = torch.randn(6, 32, 5), torch.randn(6, 32)
    ours = start.clone().requires_grad_(True)
    moments = (torch.zeros_like(ours), torch.zeros_like(ours), torch.tensor(0.0))
    theirs = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([theirs], lr=3e-3)
    for _ in range(25):
        ours.grad = None
        ((model.forward(ours, x) - y) ** 2).mean(dim=1).sum().backward()
        adam_step(ours, moments, 3e-3)
        opt.zero_grad(set_to_none=True)
        ((model.forward(theirs, x) - y) ** 2).mean(dim=1).sum().backward()
        opt.step()
        assert torch.equal(ours.detach(), theirs.detach())
    assert float(moments[2]) == 25.0
