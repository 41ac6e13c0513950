"""``nettwin keys create`` (BS identities for a deployment) and ``nettwin attack`` (poisoned updates against
a live deployment, to see the store refuse them)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ingest.errors import InputError
from nettwin.cli.common import console, print_json, settings_of

if TYPE_CHECKING:
    from ingest.settings import NettwinSettings
    from producers.attacks import AttackConfig
    from twin_store.federation.keys import KeyRegistry

# numpy, torch (via producers.attacks and the twin store) and kafka are imported inside the commands: every
# other `nettwin` command would start seconds slower

keys_app = typer.Typer(
    rich_markup_mode=None, help="BS identities and keys for authenticated updates.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.command()(attack)


@keys_app.command("create")
def create_keys(
    ctx: typer.Context,
    out: Path = typer.Argument(
        ..., help="registry file to write (mode 0600); point security.keys_file at it"
    ),
    ids: str | None = typer.Option(None, help="BS ids, comma-separated"),
    from_twins: bool = typer.Option(False, "--from-twins", help="every BS of the V-twinned deployment"),
    force: bool = typer.Option(False, help="overwrite an existing registry"),
) -> None:
    """Create a key for every BS of a deployment."""
    if (ids is None) == (not from_twins):
        raise InputError("give either --ids 1,2,3 or --from-twins")
    if out.exists() and not force:
        raise InputError(f"{out}: exists; pass --force to replace every key in it")
    if ids is not None:
        names = [i.strip() for i in ids.split(",") if i.strip()]
        if not names or not all(n.isdigit() for n in names):
            raise InputError(f"--ids {ids!r}: give BS ids as comma-separated integers")
    else:
        from twin_store.federation.models_topic import ROSTER_KEY, roster_meta
        from twin_store.services.htwin import read_latest_twins

        latest = read_latest_twins(settings_of(ctx))
        roster = roster_meta(latest.get(b"global:0"), latest.get(ROSTER_KEY))
        if roster is None:
            raise InputError("twin.models has no global twin and roster yet: run `nettwin vtwin` first")
        names = sorted(roster["scaler"], key=int)
    from twin_store.federation.keys import KeyRegistry

    KeyRegistry.create(names).save(out)
    console.print(f"wrote keys for {len(names)} BSs to {out}")


def attack(
    ctx: typer.Context,
    kind: str = typer.Argument(
        ..., help="mpaf or tpi (fake BSs), signflip or scale (compromised BSs), telemetry (poisoned traffic)"
    ),
    bs: str = typer.Option(..., help="BS ids, comma-separated: new ids for fake BSs, victims otherwise"),
    cluster: int | None = typer.Option(None, help="cluster a fake BS claims (default: spread over all)"),
    keys: Path | None = typer.Option(None, help="stolen key registry: sign the updates (compromised BSs)"),
    seed: int = typer.Option(0, help="seed of the fake BSs' random models (mpaf)"),
    factor: float | None = typer.Option(
        None, help="boost of signflip / scale (default: producers/attacks.py AttackConfig)"
    ),
    data: Path | None = typer.Option(None, help="telemetry: the hourly CSV to poison"),
    out: Path | None = typer.Option(None, help="telemetry: where to write the poisoned copy (replay it)"),
    from_hour: int = typer.Option(0, min=0, help="telemetry: first hour index to poison"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Send poisoned local updates to updates.local, built from the twins the deployment publishes.

    Fake BSs (mpaf, tpi) have no key; compromised BSs (signflip, scale) tamper with the victim's latest
    accepted update and, with --keys, sign it with the victim's key. ``telemetry`` writes a copy of an
    hourly file with spikes and a level shift in the squares --bs, for `nettwin replay milan --format
    hourly`. See producers/attacks.py.
    """
    from producers.attacks import AttackConfig
    from twin_store.federation.keys import KeyRegistry

    if kind not in ("mpaf", "tpi", "signflip", "scale", "telemetry"):
        raise InputError(f"attack {kind!r}: choose mpaf, tpi, signflip, scale or telemetry")
    try:
        ids = [int(b) for b in bs.split(",") if b.strip()]
    except ValueError:
        raise InputError(f"--bs {bs!r}: give BS ids as comma-separated integers") from None
    if not ids:
        raise InputError("--bs: give at least one BS id")
    if kind == "telemetry":
        if data is None or out is None:
            raise InputError("attack telemetry needs --data HOURLY.csv and --out POISONED.csv")
        poisoned = poison_hourly(data, out, ids, from_hour, seed)
        if json_out:
            print_json({"attack": kind, "squares": poisoned, "out": str(out)})
        else:
            console.print(f"wrote {out}: squares {poisoned} poisoned from hour {from_hour}; replay it")
        return
    settings = settings_of(ctx)
    registry = KeyRegistry.load(keys) if keys is not None else None
    cfg = AttackConfig()
    if factor is not None:
        cfg = AttackConfig(flip_boost=factor, scale_factor=factor)
    summary = send_attack(settings, kind, ids, cluster, registry, seed, cfg)
    if json_out:
        print_json(summary)
    else:
        console.print(
            f"sent {summary['sent']} {kind} update(s) to {summary['topic']} ({summary['signed']} signed)"
        )


def send_attack(
    settings: NettwinSettings,
    kind: str,
    ids: list[int],
    cluster: int | None,
    registry: KeyRegistry | None,
    seed: int,
    cfg: AttackConfig,
) -> dict[str, Any]:
    """Build poisoned updates of ``kind`` for the BSs ``ids`` from the twins on twin.models and send them."""
    import numpy as np
    import torch

    from ingest.kafka import ensure_topics_exist, make_producer
    from ingest.topics import Topics
    from producers import attacks
    from twin_store.federation.models_topic import TwinMessage
    from twin_store.services.htwin import read_latest_twins

    latest = read_latest_twins(settings)
    glob = latest.get(b"global:0")
    if glob is None:
        raise InputError("twin.models has no global twin yet: nothing to attack")
    clusters = {int(m.twin_id): m for m in latest.values() if m.level == "cluster"}
    if not clusters:
        raise InputError(
            "twin.models has no cluster twin yet: nothing to attack (run `nettwin vtwin` or `nettwin htwin` first)"
        )
    hour = max(int(m.meta.get("as_of", -1)) for m in latest.values() if m.level != "bs") + 1
    # random models of the deployment's size: what an MPAF fake BS starts from
    fake_models = torch.as_tensor(
        np.random.default_rng(seed).normal(0.0, 0.1, (len(ids), glob.params.size)), dtype=torch.float32
    )
    updates = []
    for k, square in enumerate(ids):
        if kind in ("mpaf", "tpi"):
            cid = cluster if cluster is not None else sorted(clusters)[k % len(clusters)]
            if cid not in clusters:
                raise InputError(f"--cluster {cid}: the deployment has clusters {sorted(clusters)}")
            ref = torch.as_tensor(clusters[cid].params)
            if kind == "mpaf":
                params = attacks.mpaf(ref, fake_models[k], cfg.mpaf_lambda)
            else:  # the global's last step as the attacker sees it: from its cluster twin to the global
                now = torch.as_tensor(glob.params)
                params = attacks.tpi(ref, now, ref, fake_models[k], cfg.tpi_kappa)
            base, seq = clusters[cid].version, hour
        else:
            victim = latest.get(f"bs:{square}".encode())
            if victim is None:
                raise InputError(f"BS {square}: no accepted update on twin.models to tamper with")
            cid = int(victim.meta.get("cluster", -1))
            if cid not in clusters:
                raise InputError(f"BS {square}: its cluster {cid} is not on twin.models")
            # the victim's honest change of its twin, as an attacker on the BS sees it: its latest accepted
            # update minus the global twin it follows, applied to its cluster twin
            ref = torch.as_tensor(clusters[cid].params)
            honest = ref + torch.as_tensor(victim.params) - torch.as_tensor(glob.params)
            if kind == "signflip":
                params = attacks.signflip(honest, ref, cfg.flip_boost)
            else:
                params = attacks.scale(honest, ref, cfg.scale_factor)
            base, seq = clusters[cid].version, int(victim.meta.get("seq", -1)) + 1
        msg = TwinMessage(
            "bs",
            str(square),
            base,
            glob.hidden,
            params.numpy().astype(np.float32),
            {"seq": seq, "hour": seq, "cluster": cid, "base_version": base, "n_samples": 336, "loss": 0.01},
        )
        if registry is not None and msg.twin_id in registry.keys:
            registry.sign(msg)
        updates.append(msg)
    topic = Topics.from_settings(settings).updates_local
    ensure_topics_exist(settings, [topic])
    producer = make_producer(settings)
    try:
        for msg in updates:
            producer.send(topic, key=msg.key, value=msg.encode())
        producer.flush()
    finally:
        producer.close()
    return {
        "attack": kind,
        "sent": len(updates),
        "bs": ids,
        "seq": [int(u.meta["seq"]) for u in updates],
        "signed": sum("sig" in u.meta for u in updates),
        "topic": topic,
    }


def poison_hourly(src: Path, dst: Path, squares: list[int], from_hour: int, seed: int) -> list[int]:
    """A copy of an hourly file with ``squares`` poisoned (``attacks.poison_series``, in each square's own
    standard deviations); returns the squares poisoned."""
    import numpy as np

    from producers import attacks
    from producers.attacks import AttackConfig
    from twin_store.federation.plan import load_matrix

    if src.is_dir():
        raise InputError(f"{src}: is a directory, expected the hourly CSV")
    if not src.is_file():
        raise InputError(f"{src}: no such file")
    matrix, all_squares = load_matrix(src, None, seed)
    missing = sorted(set(squares) - set(all_squares.tolist()))
    if missing:
        raise InputError(f"--bs: squares {missing} are not in {src}")
    if from_hour >= matrix.shape[1]:
        raise InputError(f"--from-hour {from_hour}: {src} has {matrix.shape[1]} hours")
    rng = np.random.default_rng(seed)
    out = matrix.astype(np.float64).copy()
    for i, square in enumerate(all_squares.tolist()):
        if square in squares:
            mean, std = out[i].mean(), out[i].std() or 1.0
            out[i] = mean + std * attacks.poison_series((out[i] - mean) / std, from_hour, AttackConfig(), rng)
    with dst.open("w") as f:
        f.write("square_id," + ",".join(f"h{h}" for h in range(out.shape[1])) + "\n")
        for square, row in zip(all_squares.tolist(), out, strict=True):
            f.write(f"{square}," + ",".join(repr(round(float(v), 6)) for v in row) + "\n")
    return sorted(squares)
