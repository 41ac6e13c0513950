"""UTT (unified twin transformation): per-modality encoders, fusers, decoders, task twins.

A task twin maps one or more modalities to one task's output sequence:

* **encoder** per modality: 1-D convolution + max pooling + transformer encoder, mean-pooled to a ``d`` vector;
* **fuser** when there are several modalities: addition, average, concatenation, multiplication, max, min,
  gating ``h = sum_m g_m * f_m`` with ``g = sigma(sum_m W_m f_m)``, or attention (a learned query over the
  modality tokens). A fuser ignores modalities masked as missing;
* **decoder** per task: a linear map to ``L/2`` tokens, a transformer encoder and a transposed convolution
  up to ``L`` steps.

Operations make a new twin from existing ones instead of from raw data: **transfer** reuses a twin's encoder
with a new decoder for another task; **merge** fuses the encoders of several twins into one twin; **split**
reuses a (merged) twin's fused representation with one new decoder per task. Which parts are frozen is the
twin's ``frozen`` setting (``encoders`` or ``fuser``); frozen outputs are computed once and cached.

A **unified model** (:class:`UnifiedTwin`) shares one encoder per modality, one fuser and one decoder per task
across all operations and is trained with ``loss = transfer + merge + split`` (each operation's term is the
mean of its directions' losses); every direction is then a view of that one model (:meth:`UnifiedTwin.view`).

Federated training of these models is ``twin_store.federation.utt_training``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

FUSERS = ("addition", "average", "concatenation", "multiplication", "max", "min", "gating", "attention")
TASKS = {  # task -> (Windows field, output channels, own modality)
    "position": ("pos", 2, "ftm"),
    "trajectory": ("future", 2, "vision"),
    "tracking": ("track", 4, "imu"),
}
MODALITY_INDEX = {"ftm": 0, "imu": 1, "vision": 2}


def _transformer(d: int, heads: int, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class ModalityEncoder(nn.Module):
    """``(N, T, C)`` -> ``(N, d)``: conv + pool + transformer encoder + mean pooling."""

    def __init__(
        self, in_channels: int, d: int = 32, heads: int = 4, layers: int = 1, max_len: int = 64
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, d, kernel_size=5, padding=2)
        self.pool = nn.MaxPool1d(2)
        self.pos = nn.Parameter(torch.zeros(1, max_len, d))
        self.transformer = _transformer(d, heads, layers)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.conv(x.transpose(1, 2)))).transpose(1, 2)
        h = self.transformer(h + self.pos[:, : h.shape[1]])
        return self.out(h.mean(dim=1))


class ModalityDecoder(nn.Module):
    """``(N, d)`` -> ``(N, L, C)``: linear to ``L/2`` tokens, transformer, transposed convolution (x2)."""

    def __init__(self, d: int, out_channels: int, length: int, heads: int = 4, layers: int = 1) -> None:
        super().__init__()
        if length % 2:
            raise ValueError(f"decoder length {length} must be even")
        self.d, self.l0 = d, length // 2
        self.inp = nn.Linear(d, d * self.l0)
        self.pos = nn.Parameter(torch.zeros(1, self.l0, d))
        self.transformer = _transformer(d, heads, layers)
        self.deconv = nn.ConvTranspose1d(d, out_channels, kernel_size=4, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.inp(z).view(-1, self.l0, self.d) + self.pos
        h = self.transformer(h)
        return self.deconv(h.transpose(1, 2)).transpose(1, 2)


class Fuser(nn.Module):
    """Fuses ``M`` modality vectors ``(N, d)`` into one; ``mask (N, M)`` marks the present modalities."""

    kind = "base"

    def __init__(self, n_modalities: int, d: int) -> None:
        super().__init__()
        self.m, self.d = n_modalities, d

    def forward(self, feats: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        stack = torch.stack(feats, dim=1)  # (N, M, d)
        present = mask.to(stack.dtype).unsqueeze(-1)  # (N, M, 1)
        return self.combine(stack, present, mask)

    def combine(self, stack: torch.Tensor, present: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class AdditionFuser(Fuser):
    kind = "addition"

    def combine(self, stack: torch.Tensor, present: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (stack * present).sum(dim=1)


class AverageFuser(Fuser):
    kind = "average"

    def combine(self, stack: torch.Tensor, present: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (stack * present).sum(dim=1) / present.sum(dim=1).clamp(min=1.0)


class ConcatenationFuser(Fuser):
    kind = "concatenation"

    def __init__(self, n_modalities: int, d: int) -> None:
        super().__init__(n_modalities, d)
        self.proj = nn.Linear(n_modalities * d, d)

    def combine(self, stack: torch.Tensor, present: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj((stack * present).flatten(1))


class MultiplicationFuser(Fuser):
    kind = "multiplication"

    def combine(self, stack: torch.Tensor, present: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (stack * present + (1 - present)).prod(dim=1) * (present.sum(dim=1) > 0)


class MaxFuser(Fuser):
    kind = "max"

    def combine(self, stack: torch.Tensor, present: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = stack.masked_fill(present == 0, -math.inf).amax(dim=1)
        return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


class MinFuser(Fuser):
    kind = "min"

    def combine(self, stack: torch.Tensor, present: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = stack.masked_fill(present == 0, math.inf).amin(dim=1)
        return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


class GatingFuser(Fuser):
    """``g = sigma(sum_m W_m f_m)`` (one gate vector per modality), ``h = sum_m g_m * f_m``."""

    kind = "gating"

    def __init__(self, n_modalities: int, d: int) -> None:
        super().__init__(n_modalities, d)
        self.w = nn.Linear(n_modalities * d, n_modalities * d)  # [W_1 ... W_M] side by side

    def combine(self, stack: torch.Tensor, present: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        f = stack * present
        gates = torch.sigmoid(self.w(f.flatten(1))).view(-1, self.m, self.d)
        return (gates * f).sum(dim=1)


class AttentionFuser(Fuser):
    """A learned query attends over the present modality tokens (plus a modality embedding)."""

    kind = "attention"

    def __init__(self, n_modalities: int, d: int, heads: int = 4) -> None:
        super().__init__(n_modalities, d)
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.embed = nn.Parameter(torch.zeros(1, n_modalities, d))
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def combine(self, stack: torch.Tensor, present: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        none = ~mask.any(dim=1)
        pad = ~mask.clone()
        pad[none] = False  # a window with no modality attends over zeros rather than over nothing
        tokens = (stack + self.embed) * present
        q = self.query.expand(stack.shape[0], 1, self.d)
        out, _ = self.attn(q, tokens, tokens, key_padding_mask=pad, need_weights=False)
        return out.squeeze(1)


_FUSER_CLASSES: dict[str, type[Fuser]] = {
    c.kind: c
    for c in (
        AdditionFuser,
        AverageFuser,
        ConcatenationFuser,
        MultiplicationFuser,
        MaxFuser,
        MinFuser,
        GatingFuser,
        AttentionFuser,
    )
}


def make_fuser(kind: str, n_modalities: int, d: int) -> Fuser:
    if kind not in _FUSER_CLASSES:
        raise ValueError(f"unknown fuser {kind!r}; one of {', '.join(FUSERS)}")
    return _FUSER_CLASSES[kind](n_modalities, d)


@dataclass
class Lineage:
    """How a twin was made: operation, source twins, fuser, and its metrics once evaluated."""

    twin_id: str
    task: str
    modalities: list[str]
    operation: str  # direct, transfer, merge, split, unified
    sources: list[str] = field(default_factory=list)
    fuser: str | None = None
    version: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    model: str = "function-specific"  # or the id of the unified model this twin is a view of


class TaskTwin(nn.Module):
    """Encoders of ``modalities`` (+ a fuser when several) + one task decoder. ``frozen``: ``none``,
    ``encoders`` (encoders reused from other twins) or ``fuser`` (encoders and fuser reused)."""

    def __init__(
        self,
        lineage: Lineage,
        encoders: dict[str, ModalityEncoder],
        fuser: Fuser | None,
        decoder: ModalityDecoder,
        frozen: str = "none",
    ) -> None:
        super().__init__()
        if len(lineage.modalities) > 1 and fuser is None:
            raise ValueError("a twin of several modalities needs a fuser")
        self.lineage = lineage
        self.encoders = nn.ModuleDict(encoders)
        self.fuser = fuser
        self.decoder = decoder
        self.frozen = frozen
        for p in self.encoders.parameters():
            p.requires_grad_(frozen == "none")
        if fuser is not None:
            for p in fuser.parameters():
                p.requires_grad_(frozen != "fuser")

    def encode(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [self.encoders[m](inputs[m]) for m in self.lineage.modalities]

    def fuse(self, feats: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        if self.fuser is None:
            return feats[0]
        cols = [MODALITY_INDEX[m] for m in self.lineage.modalities]
        return self.fuser(feats, mask[:, cols])

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decoder(self.fuse(self.encode(inputs), inputs["mask"]))

    def cached_inputs(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """What the trainable part starts from: raw inputs, encoder outputs or the fused vector."""
        with torch.no_grad():
            if self.frozen == "encoders":
                return self.encode(inputs)
            if self.frozen == "fuser":
                return [self.fuse(self.encode(inputs), inputs["mask"])]
        return [inputs[m] for m in self.lineage.modalities]

    def head(self, cached: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        if self.frozen == "encoders":
            return self.decoder(self.fuse(cached, mask))
        if self.frozen == "fuser":
            return self.decoder(cached[0])
        return self.decoder(
            self.fuse(
                [self.encoders[m](x) for m, x in zip(self.lineage.modalities, cached, strict=True)], mask
            )
        )

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def local_state(self, client: Client) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        return self.cached_inputs(client.inputs), client.inputs["mask"], client.targets[self.lineage.task]

    def local_loss(
        self, state: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor], idx: torch.Tensor | None
    ) -> torch.Tensor:
        cached, mask, target = state
        if idx is None:
            return masked_mse(self.head(cached, mask), target)
        return masked_mse(self.head([x[idx] for x in cached], mask[idx]), target[idx])

    def predict(self, inputs: dict[str, torch.Tensor], batch: int = 1024) -> torch.Tensor:
        self.eval()
        n = inputs["mask"].shape[0]
        with torch.no_grad():
            outs = [self({k: v[i : i + batch] for k, v in inputs.items()}) for i in range(0, n, batch)]
        return torch.cat(outs) if outs else torch.empty(0)


def flat(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def load_flat(params: list[nn.Parameter], vec: torch.Tensor) -> None:
    i = 0
    with torch.no_grad():
        for p in params:
            p.copy_(vec[i : i + p.numel()].view_as(p))
            i += p.numel()


@dataclass
class Client:
    """A local-area twin's data: model inputs and normalised targets per task ``(N, L, C)`` (NaN: none)."""

    name: str
    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(self.inputs["mask"].shape[0])


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    ok = torch.isfinite(target)
    return ((pred - torch.nan_to_num(target)) ** 2 * ok).sum() / ok.sum().clamp(min=1)


def new_twin(
    twin_id: str,
    task: str,
    modalities: list[str],
    in_channels: dict[str, int],
    lengths: dict[str, int],
    d: int = 32,
    fuser: str | None = None,
    seed: int = 0,
) -> TaskTwin:
    """A twin trained from raw data (operation ``direct``)."""
    torch.manual_seed(seed)
    encs = {m: ModalityEncoder(in_channels[m], d) for m in modalities}
    fz = make_fuser(fuser, len(modalities), d) if fuser else None
    dec = ModalityDecoder(d, TASKS[task][1], lengths[task])
    return TaskTwin(Lineage(twin_id, task, list(modalities), "direct", fuser=fuser), encs, fz, dec)


def transfer(source: TaskTwin, twin_id: str, task: str, lengths: dict[str, int], seed: int = 0) -> TaskTwin:
    """Reuse ``source``'s encoder(s) and fuser (frozen) with a new decoder for ``task``."""
    torch.manual_seed(seed)
    d = source.decoder.d
    lin = Lineage(
        twin_id,
        task,
        list(source.lineage.modalities),
        "transfer",
        [source.lineage.twin_id],
        source.lineage.fuser,
    )
    frozen = "fuser" if source.fuser is not None else "encoders"
    return TaskTwin(
        lin,
        {k: v for k, v in source.encoders.items() if isinstance(v, ModalityEncoder)},
        source.fuser,
        ModalityDecoder(d, TASKS[task][1], lengths[task]),
        frozen,
    )


def merge(
    sources: list[TaskTwin], twin_id: str, task: str, fuser: str, lengths: dict[str, int], seed: int = 0
) -> TaskTwin:
    """Fuse the (frozen) encoders of ``sources`` with a new ``fuser`` and a new decoder for ``task``."""
    torch.manual_seed(seed)
    encs: dict[str, ModalityEncoder] = {}
    for s in sources:
        for m in s.lineage.modalities:
            enc = s.encoders[m]
            assert isinstance(enc, ModalityEncoder)
            encs.setdefault(m, enc)
    d = sources[0].decoder.d
    lin = Lineage(twin_id, task, list(encs), "merge", [s.lineage.twin_id for s in sources], fuser)
    return TaskTwin(
        lin,
        encs,
        make_fuser(fuser, len(encs), d),
        ModalityDecoder(d, TASKS[task][1], lengths[task]),
        "encoders",
    )


def split(
    source: TaskTwin, twin_ids: dict[str, str], lengths: dict[str, int], seed: int = 0
) -> dict[str, TaskTwin]:
    """One new twin per task, each reusing ``source``'s encoders and fuser (frozen) with its own decoder."""
    out = {}
    for task, tid in twin_ids.items():
        t = transfer(source, tid, task, lengths, seed)
        t.lineage.operation = "split"
        out[task] = t
    return out


# direction -> (operation, source twins, input modalities, task): what the unified model is trained on.
# A split of ``position`` starts from the FTM+IMU position representation (the benchmark's merged twin).
UNIFIED_DIRECTIONS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str]] = {
    "transfer position->trajectory": ("transfer", ("position",), ("ftm",), "trajectory"),
    "merge trajectory+tracking->position": (
        "merge",
        ("trajectory", "tracking"),
        ("vision", "imu"),
        "position",
    ),
    "merge position+tracking->position (FTM+IMU)": (
        "merge",
        ("position", "tracking"),
        ("ftm", "imu"),
        "position",
    ),
    "split position->trajectory": ("split", ("position",), ("ftm", "imu"), "trajectory"),
    "split position->tracking": ("split", ("position",), ("ftm", "imu"), "tracking"),
}


class SubsetFuser(Fuser):
    """A fuser over every modality, used on some of them (the others are masked as missing)."""

    kind = "subset"

    def __init__(self, inner: Fuser, modalities: list[str]) -> None:
        super().__init__(inner.m, inner.d)
        self.inner = inner
        self.cols = [MODALITY_INDEX[m] for m in modalities]

    def forward(self, feats: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        full = [torch.zeros_like(feats[0]) for _ in range(self.inner.m)]
        full_mask = torch.zeros(mask.shape[0], self.inner.m, dtype=torch.bool)
        for j, c in enumerate(self.cols):
            full[c] = feats[j]
            full_mask[:, c] = mask[:, j]
        return self.inner(full, full_mask)


class UnifiedTwin(nn.Module):
    """One encoder per modality, one fuser over all modalities and one decoder per task, shared by every
    direction of :data:`UNIFIED_DIRECTIONS`; trained with ``loss = transfer + merge + split``."""

    def __init__(
        self,
        twin_id: str,
        in_channels: dict[str, int],
        lengths: dict[str, int],
        d: int = 32,
        fuser: str = "gating",
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.modalities = list(MODALITY_INDEX)
        self.encoders = nn.ModuleDict({m: ModalityEncoder(in_channels[m], d) for m in self.modalities})
        self.fuser = make_fuser(fuser, len(self.modalities), d)
        self.decoders = nn.ModuleDict({t: ModalityDecoder(d, TASKS[t][1], lengths[t]) for t in TASKS})
        self.lineage = Lineage(
            twin_id, ",".join(TASKS), list(self.modalities), "unified", [], fuser, model=twin_id
        )

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def local_state(self, client: Client) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return client.inputs, client.targets

    def terms(
        self, inputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Loss of every direction on these rows (encoders run once, each fused representation once)."""
        feats = {m: self.encoders[m](inputs[m]) for m in self.modalities}
        reps: dict[tuple[str, ...], torch.Tensor] = {}
        out = {}
        for name, (_op, _src, mods, task) in UNIFIED_DIRECTIONS.items():
            if mods not in reps:
                if len(mods) == 1:
                    reps[mods] = feats[mods[0]]
                else:
                    keep = torch.tensor([m in mods for m in self.modalities])
                    reps[mods] = self.fuser([feats[m] for m in self.modalities], inputs["mask"] & keep)
            out[name] = masked_mse(self.decoders[task](reps[mods]), targets[task])
        return out

    def local_loss(
        self, state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]], idx: torch.Tensor | None
    ) -> torch.Tensor:
        inputs, targets = state
        if idx is not None:
            inputs = {k: v[idx] for k, v in inputs.items()}
            targets = {k: v[idx] for k, v in targets.items()}
        per_op: dict[str, list[torch.Tensor]] = {}
        for name, loss in self.terms(inputs, targets).items():
            per_op.setdefault(UNIFIED_DIRECTIONS[name][0], []).append(loss)
        return torch.stack([torch.stack(v).mean() for v in per_op.values()]).sum()

    def view(self, direction: str, twin_id: str) -> TaskTwin:
        """The task twin of one direction: this model's shared parts, not copies (trained already)."""
        op, sources, mods, task = UNIFIED_DIRECTIONS[direction]
        fz = SubsetFuser(self.fuser, list(mods)) if len(mods) > 1 else None
        lin = Lineage(
            twin_id,
            task,
            list(mods),
            op,
            list(sources),
            self.lineage.fuser if fz is not None else None,
            self.lineage.version,
            model=self.lineage.twin_id,
        )
        encs = {m: self.encoders[m] for m in mods}
        twin = TaskTwin(lin, encs, fz, self.decoders[task])  # type: ignore[arg-type]
        return twin


def find_direction(op: str, sources: list[str], targets: list[str]) -> list[str]:
    """The unified directions an operation maps to (one per target), or [] when it was not trained."""
    found = []
    for t in targets:
        match = [
            n for n, (o, src, _m, task) in UNIFIED_DIRECTIONS.items()
            if o == op and list(src) == sources and task == t
        ]  # fmt: skip
        if not match:
            return []
        found.append(match[0])
    return found


@dataclass
class Scaler:
    """Per-channel z-scoring over the last axis, fitted on training data (NaNs ignored)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Scaler:
        flat_x = x.reshape(-1, x.shape[-1])
        mean = np.nanmean(flat_x, axis=0)
        std = np.nanstd(flat_x, axis=0)
        return cls(mean, np.where(std > 1e-6, std, 1.0))

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std

    def invert(self, x: np.ndarray) -> np.ndarray:
        return x * self.std + self.mean

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}


def nmse(pred: np.ndarray, target: np.ndarray) -> float:
    """Normalised MSE, original units: per channel ``sum (pred - y)^2 / sum (y - mean y)^2``, averaged."""
    p = pred.reshape(-1, pred.shape[-1])
    y = target.reshape(-1, target.shape[-1])
    ok = np.isfinite(y).all(axis=1)
    p, y = p[ok], y[ok]
    den = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    num = ((p - y) ** 2).sum(axis=0)
    keep = den > 1e-12
    return float(np.mean(num[keep] / den[keep])) if keep.any() else math.nan
