"""Shared by the controller tests: float64 scalars and the toy plant of case C1."""
import math

import torch

F64 = torch.float64


def t64(x: float, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=F64, requires_grad=requires_grad)


def toy_plant(ctl, optimizer: str, lr: float, steps: int = 1000, task: float = 0.0):
    """s = sigmoid(θ) from s = 0.1; loss = -task * s + penalty. Returns (s per step, t per step)."""
    theta = torch.tensor(math.log(0.1 / 0.9), dtype=F64, requires_grad=True)
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]([theta], lr=lr)
    sparsity, target = [], []
    for _ in range(steps):
        s = torch.sigmoid(theta)
        sparsity.append(s.item())
        target.append(ctl.target)
        loss = ctl.penalty(s) - task * s
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.step()
    return sparsity, target
