"""The traffic twin model: a small LSTM forecaster, evaluated for many twins at once.

Every twin (BS, cluster, global) is one flat parameter vector of the same ``TwinModel``; aggregation
(FedAvg, H-twinning) works on those vectors directly. Forward and training take a stack ``[B, P]`` of
vectors and run all B twins in one batched pass (``bmm`` over the stack), which is what lets hundreds of
BS twins update on 2 cores: one optimiser step trains every stacked twin, and because Adam is elementwise
and the loss is a sum of per-twin losses, that equals B independent Adam runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.optim.adam import adam

from ingest.errors import Stopped

N_STEPS = (
    10  # inputs per sample: 5 "period" values (same hour, previous 5 days) then 5 "close" (last 5 hours)
)


FIT_CHUNK = 64  # twins trained together in ``fit``: memory grows with it, the result does not change
PREDICT_CHUNK = 1024  # entities forecast together by ``predict_in_chunks``


@dataclass(frozen=True)
class FitConfig:
    steps: int = 20
    lr: float = 1e-2
    batch: int = 64


class TwinModel:
    """LSTM(1 -> hidden) over the inputs (10 for Milan; ``n_inputs`` for other input plans, see
    ``twin_store/federation/inputs.py``), a linear head on the last hidden state, plus a linear autoregressive
    path on the inputs (it lowered validation MSE by ~4% for every LSTM method)."""

    def __init__(self, hidden: int = 32, n_inputs: int = N_STEPS) -> None:
        self.hidden = hidden
        self.n_inputs = n_inputs
        h4 = 4 * hidden
        # (name, shape) of each parameter inside the flat vector, in order
        self.layout = [
            ("w_ih", (h4, 1)),
            ("w_hh", (h4, hidden)),
            ("b", (h4,)),
            ("w_out", (hidden,)),
            ("b_out", (1,)),
            ("w_ar", (n_inputs,)),  # linear autoregressive path beside the LSTM (as LSTNet's AR part)
        ]
        self.n_params = sum(int(torch.tensor(shape).prod()) for _, shape in self.layout)

    def init(self, n: int, seed: int) -> torch.Tensor:
        """``n`` freshly initialised parameter vectors (PyTorch's LSTM init: U(-1/sqrt(H), 1/sqrt(H)))."""
        gen = torch.Generator().manual_seed(seed)
        bound = self.hidden**-0.5
        params = (torch.rand(n, self.n_params, generator=gen) * 2 - 1) * bound
        params[:, -self.n_inputs :] = 0.0  # the AR path starts silent
        return params

    def unflatten(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into a ``[B, P]`` stack, one ``[B, *shape]`` tensor per parameter."""
        out, i = {}, 0
        for name, shape in self.layout:
            size = int(torch.tensor(shape).prod())
            out[name] = params[:, i : i + size].reshape(params.shape[0], *shape)
            i += size
        return out

    def forward(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``params [B, P]``, ``x [B, N, n_inputs]`` -> predictions ``[B, N]``."""
        p = self.unflatten(params)
        bsz, n, _ = x.shape
        h = x.new_zeros(bsz, n, self.hidden)
        c = x.new_zeros(bsz, n, self.hidden)
        w_ih_t = p["w_ih"].transpose(1, 2)  # [B, 1, 4H]
        w_hh_t = p["w_hh"].transpose(1, 2)  # [B, H, 4H]
        bias = p["b"].unsqueeze(1)  # [B, 1, 4H]
        for t in range(x.shape[2]):
            gates = torch.baddbmm(bias + x[:, :, t : t + 1] * w_ih_t, h, w_hh_t)
            i, f, g, o = gates.chunk(4, dim=2)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        nonlinear = torch.baddbmm(p["b_out"].unsqueeze(1), h, p["w_out"].unsqueeze(2)).squeeze(2)
        return nonlinear + torch.bmm(x, p["w_ar"].unsqueeze(2)).squeeze(2)

    @torch.no_grad()
    def predict(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.forward(params, x)

    def fit(
        self,
        params: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        cfg: FitConfig,
        gen: torch.Generator | list[torch.Generator],
        counts: torch.Tensor | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Train each stacked twin on its own samples; return (new params, mean training loss per twin).

        ``x [B, N, 10]``, ``y [B, N]``; with ``counts [B]`` twin b only draws from its first counts[b] samples
        (BSs with fewer samples in the same stack). ``gen``: one generator for the whole stack, or one per
        twin, which makes each twin's result independent of what else is in the stack. ``stop`` (optional) is
        asked before every minibatch step of every chunk of twins; True raises ``Stopped`` (a stopping process
        leaves within one chunk's step, well under a second).
        """
        bsz, n, _ = x.shape
        limit = (counts if counts is not None else torch.full((bsz,), n)).to(torch.float32)
        # twins are independent (own parameters, own loss, Adam element-wise), so they train FIT_CHUNK at a
        # time: autograd then keeps one chunk's activations (~1 MB a twin) instead of the whole stack's (1,000
        # twins peaked at 1.7 GB in htwin), with the same minibatches and the same result
        # every step's minibatch indices first (the generators' draws in the order of one stack), then one chunk
        # at a time through all its steps: only that chunk's copy, gradients and Adam moments are alive
        # (4 x 17.5 MB at 1,000 twins when every chunk's were kept through the steps)
        draws = []
        for _ in range(cfg.steps):
            if isinstance(gen, list):
                draws.append(torch.stack([torch.rand(cfg.batch, generator=g) for g in gen]))
            else:
                draws.append(torch.rand(bsz, cfg.batch, generator=gen))
        idx = [(d * limit.unsqueeze(1)).long() for d in draws]
        del draws
        out = params.detach().clone()
        losses = torch.zeros(bsz)
        for lo in range(0, bsz, FIT_CHUNK):
            c = slice(lo, min(lo + FIT_CHUNK, bsz))
            work = params[c].detach().clone().requires_grad_(True)
            moments = (torch.zeros_like(work), torch.zeros_like(work), torch.tensor(0.0))
            rows = torch.arange(c.stop - c.start).unsqueeze(1)
            xc, yc = x[c], y[c]
            for step in range(cfg.steps):
                if stop is not None and stop():
                    raise Stopped("training stopped")
                xb, yb = xc[rows, idx[step][c]], yc[rows, idx[step][c]]
                per_twin = ((self.forward(work, xb) - yb) ** 2).mean(dim=1)
                work.grad = None
                per_twin.sum().backward()
                adam_step(work, moments, cfg.lr)
                losses[c] += per_twin.detach()
            out[c] = work.detach()
        return out, losses / cfg.steps


def adam_step(
    work: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor, torch.Tensor], lr: float
) -> None:
    """One step of ``torch.optim.Adam(lr=lr)`` (its defaults otherwise) on ``work`` from its gradient: the
    functional update the class runs on CPU, with the moments and step count kept by the caller. The same
    floats as the class (``tests/test_forecaster.py``). Not the class because constructing it imports
    ``torch._dynamo``: 68 MB resident and ~3 s in every process that trains, the worker included."""
    exp_avg, exp_avg_sq, step = moments
    if work.grad is None:
        raise ValueError("adam_step: the parameters have no gradient (backward first)")
    with torch.no_grad():
        adam(
            [work],
            [work.grad],
            [exp_avg],
            [exp_avg_sq],
            [],
            [step],
            foreach=False,
            capturable=False,
            differentiable=False,
            fused=None,
            grad_scale=None,
            found_inf=None,
            has_complex=False,
            amsgrad=False,
            beta1=0.9,
            beta2=0.999,
            lr=lr,
            weight_decay=0.0,
            eps=1e-8,
            maximize=False,
        )


def predict_in_chunks(
    model: TwinModel, params: torch.Tensor, x: torch.Tensor, chunk: int = PREDICT_CHUNK
) -> np.ndarray:
    """One twin ``params [P]`` on every entity's inputs ``x [E, N, n_inputs]`` -> predictions ``[E, N]``,
    ``chunk`` entities at a time. The whole stack at once keeps ``E x N x 4 hidden`` floats per gate and
    step alive (and a broadcast copy of the twin per entity in ``bmm``); the bootstrap's validation of 10,000
    entities is thus bounded by one chunk. Each entity's forecast does not depend on the others in its
    chunk."""
    out = np.empty(tuple(x.shape[:2]), dtype=np.float32)
    one = params.reshape(1, -1)
    with torch.no_grad():
        for lo in range(0, x.shape[0], chunk):
            part = x[lo : lo + chunk]
            out[lo : lo + part.shape[0]] = model.forward(one.expand(part.shape[0], -1), part).numpy()
    return out
