"""Learning agents for DITEN's association: PPO (the paper's method), plain actor-critic (B1), DDPG (B4).

They see one feature vector per (twin, server) pair (``(users, servers, F)`` arrays, built by
``twin_store.federation.edge.features``) and return a server per twin. The actor scores every pair with
one shared MLP (128-unit hidden layers), so a twin's choice is a softmax over its servers; the critic
pools all pairs (mean and max) into a state value. Every actor is a residual over a distance prior
(``-distance_prior x feature 0``, the pair's distance over the area side): untrained, its most likely
choice is the nearest server, and training moves twins away from it where the costs say so. This keeps
the short training budget for improving on nearest rather than for rediscovering it. Nothing here knows the simulator: the training loops
live in ``twin_store.federation.edge.learning``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn


def _mlp(inputs: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out)
    )


class PairScorer(nn.Module):
    """Scores every (twin, server) pair: (..., U, S, F) -> (..., U, S)."""

    def __init__(self, features: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = _mlp(features, hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def distance_prior(x: torch.Tensor, scale: float) -> torch.Tensor:
    return -scale * x[..., 0]


# columns of the pair features the mean-field round reads: the pair's compute and sync energy, and the
# server's caps q_s and p_s in the same units
COMPUTE_COLUMN, SYNC_COLUMN, COMPUTE_CAP_COLUMN, SYNC_CAP_COLUMN = 3, 4, 14, 15


class MeanFieldActor(nn.Module):
    """Twin-to-server logits in two rounds, so twins choosing at once see each other.

    Round one scores every pair alone (its load columns zero); the policy it implies gives every
    server an expected compute and sync load (over twins, in units of the caps); round two scores each
    pair again with those two loads appended. Both rounds share the 128-unit MLP and the distance prior.
    """

    def __init__(self, features: int, hidden: int, prior: float) -> None:
        super().__init__()
        self.net = _mlp(features + 2, hidden, 1)
        self.prior = prior

    def _score(self, x: torch.Tensor, loads: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, loads], dim=-1)).squeeze(-1) + distance_prior(x, self.prior)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self._score(x, torch.zeros(*x.shape[:-1], 2))
        p = torch.softmax(first, -1)
        comp = (p * x[..., COMPUTE_COLUMN]).sum(-2, keepdim=True) / x[..., :1, :, COMPUTE_CAP_COLUMN]
        sync = (p * x[..., SYNC_COLUMN]).sum(-2, keepdim=True) / x[..., :1, :, SYNC_CAP_COLUMN]
        loads = torch.stack([comp, sync], dim=-1).expand(*x.shape[:-1], 2)
        return self._score(x, loads)


class PooledCritic(nn.Module):
    """State value from the mean and max of all pair features: (B, U, S, F) -> (B,)."""

    def __init__(self, features: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = _mlp(2 * features, hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1, 2)
        pooled = torch.cat([flat.mean(1), flat.amax(1)], dim=-1)
        return self.net(pooled).squeeze(-1)


@dataclass(frozen=True)
class AgentConfig:
    """Table II's learning settings and our PPO details."""

    actor_lr: float = 2.5e-4
    critic_lr: float = 1.5e-3
    clip: float = 0.2
    gae_lambda: float = 0.9
    discount: float = 0.98
    hidden: int = 128
    epochs: int = 4
    minibatch: int = 32
    entropy: float = 0.01
    reward_scale: float = 10.0
    # weight of the slot's GAE advantage beside each twin's counterfactual credit (PPO)
    slot_advantage: float = 0.2
    # DDPG
    tau: float = 0.005
    replay: int = 2000
    noise: float = 0.3
    # logit penalty per area side of distance (feature 0): the nearest-server prior every actor starts from
    distance_prior: float = 10.0


Batch = dict[str, NDArray[np.float32]]
Transition = tuple[NDArray[np.float32], NDArray[np.float32], float, NDArray[np.float32]]


@dataclass(frozen=True)
class Decision:
    host: NDArray[np.int64]
    logp: NDArray[np.float32]  # per twin
    probs: NDArray[np.float32]  # (users, servers)
    value: float


class ActorCritic:
    """Shared by PPO and the plain actor-critic: a categorical choice per twin and a pooled critic."""

    def __init__(self, features: int, cfg: AgentConfig, seed: int) -> None:
        torch.manual_seed(seed)
        self.cfg = cfg
        self.actor = MeanFieldActor(features, cfg.hidden, cfg.distance_prior)
        self.critic = PooledCritic(features, cfg.hidden)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.gen = torch.Generator().manual_seed(seed)

    def act(self, features: NDArray[np.float32], greedy: bool = False) -> Decision:
        """A server per twin, with each twin's log-probability, the choice probabilities and the value."""
        with torch.no_grad():
            x = torch.from_numpy(features)
            logits = self._logits(x)
            probs = torch.softmax(logits, -1)
            if greedy:
                host = logits.argmax(-1)
            else:
                host = torch.multinomial(probs, 1, generator=self.gen).squeeze(-1)
            logp = torch.log_softmax(logits, -1).gather(-1, host[:, None]).squeeze(-1)
            value = self.critic(x[None])[0]
        return Decision(host.numpy().astype(np.int64), logp.numpy(), probs.numpy(), float(value))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.actor(x)

    def _log_prob(self, x: torch.Tensor, host: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-twin log-probabilities (B, U) of the chosen servers, and the mean entropy per slot (B,)."""
        logp_all = torch.log_softmax(self._logits(x), -1)
        logp = logp_all.gather(-1, host[..., None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1).mean(-1)
        return logp, entropy

    def _fit_critic(self, x: torch.Tensor, ret: torch.Tensor) -> None:
        loss = ((self.critic(x) - ret) ** 2).mean()
        self.critic_opt.zero_grad()
        loss.backward()
        self.critic_opt.step()


def gae(
    rewards: NDArray[np.float32], values: NDArray[np.float32], last_value: float, discount: float, lam: float
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Generalised advantage estimates and returns of one rollout (no terminal inside it)."""
    adv = np.zeros_like(rewards)
    running = 0.0
    nxt = last_value
    for t in range(len(rewards) - 1, -1, -1):
        delta = rewards[t] + discount * nxt - values[t]
        running = delta + discount * lam * running
        adv[t] = running
        nxt = values[t]
    return adv, adv + values


def _standard(a: NDArray[np.float32]) -> NDArray[np.float32]:
    return (a - a.mean()) / (a.std() + 1e-8)


class PPO(ActorCritic):
    """Clipped-objective PPO with GAE (the paper's association learner).

    Each twin's choice has a ratio of its own; its advantage is the slot's GAE advantage (long-term: a
    host now is a migration or not later) (weighted by ``slot_advantage``) plus its counterfactual credit ``batch["credit"]`` (how much
    better this slot's objective is with its server than with one drawn from its own policy, the others
    fixed, from the closed forms), each standardised. The joint choice of 20 twins judged by one reward
    alone is too noisy a signal for the training budget here.
    """

    def update(self, batch: Batch, last_value: float) -> None:
        c = self.cfg
        adv, ret = gae(batch["reward"] * c.reward_scale, batch["value"], last_value, c.discount, c.gae_lambda)
        mixed = c.slot_advantage * _standard(adv)[:, None] + _standard(batch["credit"])
        twin_adv = torch.from_numpy(mixed.astype(np.float32))
        x = torch.from_numpy(batch["features"])
        host = torch.from_numpy(batch["host"].astype(np.int64))
        old = torch.from_numpy(batch["logp"])
        ret_t = torch.from_numpy(ret.astype(np.float32))
        n = len(adv)
        for _ in range(c.epochs):
            order = torch.randperm(n, generator=self.gen)
            for start in range(0, n, c.minibatch):
                i = order[start : start + c.minibatch]
                logp, entropy = self._log_prob(x[i], host[i])
                ratio = torch.exp(logp - old[i])
                a = twin_adv[i]
                surrogate = torch.min(ratio * a, torch.clamp(ratio, 1 - c.clip, 1 + c.clip) * a)
                actor_loss = -surrogate.mean() - c.entropy * entropy.mean()
                self.actor_opt.zero_grad()
                actor_loss.backward()
                self.actor_opt.step()
                self._fit_critic(x[i], ret_t[i])


class A2C(ActorCritic):
    """Plain advantage actor-critic (B1): n-step returns, one gradient step per rollout, no clipping,
    the slot's advantage for the joint choice of all twins."""

    def update(self, batch: Batch, last_value: float) -> None:
        c = self.cfg
        rewards = batch["reward"] * c.reward_scale
        ret = np.zeros_like(rewards)
        nxt = last_value
        for t in range(len(rewards) - 1, -1, -1):
            nxt = rewards[t] + c.discount * nxt
            ret[t] = nxt
        x = torch.from_numpy(batch["features"])
        host = torch.from_numpy(batch["host"].astype(np.int64))
        ret_t = torch.from_numpy(ret.astype(np.float32))
        with torch.no_grad():
            adv = ret_t - self.critic(x)
        logp, entropy = self._log_prob(x, host)
        actor_loss = -(logp.sum(-1) * adv).mean() - c.entropy * entropy.mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        self._fit_critic(x, ret_t)


class QCritic(nn.Module):
    """Q(s, a) for DDPG: each pair's features with its action score, embedded, averaged, then valued."""

    def __init__(self, features: int, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Sequential(
            nn.Linear(features + 1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        h = self.embed(torch.cat([x, a[..., None]], dim=-1))
        return self.head(h.mean(dim=(1, 2))).squeeze(-1)


class DDPG:
    """DDPG (B4): a deterministic score per pair in [-1, 1] on top of the distance prior; argmax per twin."""

    def __init__(self, features: int, cfg: AgentConfig, seed: int) -> None:
        torch.manual_seed(seed)
        self.cfg = cfg
        self.actor = PairScorer(features, cfg.hidden)
        self.critic = QCritic(features, cfg.hidden)
        self.actor_target = PairScorer(features, cfg.hidden)
        self.critic_target = QCritic(features, cfg.hidden)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.rng = np.random.default_rng(seed)
        # one replay memory per scenario shape (a minibatch stacks transitions of one server count)
        self.buffers: dict[tuple[int, ...], list[Transition]] = {}
        self.positions: dict[tuple[int, ...], int] = {}
        self.shape: tuple[int, ...] = ()

    def scores(self, features: NDArray[np.float32], explore: bool) -> NDArray[np.float32]:
        with torch.no_grad():
            a = torch.tanh(self.actor(torch.from_numpy(features))).numpy()
        if explore:
            a = np.clip(a + self.cfg.noise * self.rng.standard_normal(a.shape), -1.0, 1.0).astype(np.float32)
        return a

    def choose(self, features: NDArray[np.float32], scores: NDArray[np.float32]) -> NDArray[np.int64]:
        """The server per twin: best action score on top of the distance prior."""
        prior = -self.cfg.distance_prior * features[..., 0]
        return (scores + prior).argmax(-1).astype(np.int64)

    def remember(
        self, x: NDArray[np.float32], a: NDArray[np.float32], reward: float, x_next: NDArray[np.float32]
    ) -> None:
        item = (x, a, reward * self.cfg.reward_scale, x_next)
        self.shape = x.shape
        buffer = self.buffers.setdefault(x.shape, [])
        if len(buffer) < self.cfg.replay:
            buffer.append(item)
        else:
            pos = self.positions.get(x.shape, 0)
            buffer[pos] = item
            self.positions[x.shape] = (pos + 1) % self.cfg.replay

    def update(self) -> None:
        c = self.cfg
        buffer = self.buffers.get(self.shape, [])
        if len(buffer) < c.minibatch:
            return
        idx = self.rng.integers(0, len(buffer), c.minibatch)
        x = torch.from_numpy(np.stack([buffer[i][0] for i in idx]))
        a = torch.from_numpy(np.stack([buffer[i][1] for i in idx]))
        r = torch.tensor([buffer[i][2] for i in idx], dtype=torch.float32)
        x2 = torch.from_numpy(np.stack([buffer[i][3] for i in idx]))
        with torch.no_grad():
            target = r + c.discount * self.critic_target(x2, torch.tanh(self.actor_target(x2)))
        critic_loss = ((self.critic(x, a) - target) ** 2).mean()
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        actor_loss = -self.critic(x, torch.tanh(self.actor(x))).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        with torch.no_grad():
            for net, tgt in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for p, q in zip(net.parameters(), tgt.parameters(), strict=True):
                    q.mul_(1 - c.tau).add_(c.tau * p)
