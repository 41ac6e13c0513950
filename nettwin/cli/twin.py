"""``nettwin twin transfer|merge|split``: new task twins from stored ones, with lineage (files + InfluxDB)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from nettwin.cli.common import console, print_json, print_table, settings_of

app = typer.Typer(
    rich_markup_mode=None,
    help="Make task twins (position, trajectory, tracking) by transfer, merge or split of stored twins.",
    no_args_is_help=True,
)

DATA_HELP = "folder of walk CSVs (like ftm_imu/raw): trains missing source twins and evaluates the new one"
DEFENSE_HELP = (
    "twin_store.federation.screening defense screening and aggregating the client updates (mean = FedAvg)"
)
UNIFIED_HELP = "take the twin from the unified model (loss = transfer + merge + split; trained on first use)"


def _run(
    ctx: typer.Context,
    op: str,
    src: str,
    dst: str,
    data: Path,
    fuser: str,
    rounds: int,
    seed: int,
    defense: str,
    unified: bool,
    json_out: bool,
) -> None:
    from ingest.errors import InputError
    from twin_store.adapters.influx import InfluxClient
    from twin_store.federation.screening import DEFENSES
    from twin_store.federation.utt_training import Upload
    from twin_store.models.utt import FUSERS
    from twin_store.services.twin import run_operation, twin_lines, update_lines

    if fuser not in FUSERS:
        raise InputError(f"--fuser {fuser!r}: one of {', '.join(FUSERS)}")
    if defense not in DEFENSES:
        raise InputError(f"--defense {defense!r}: one of {', '.join(DEFENSES)}")
    settings = settings_of(ctx)
    sources = [s.strip() for s in src.split(",") if s.strip()]
    targets = [t.strip() for t in dst.split(",") if t.strip()]
    uploads: list[tuple[str, Upload]] = []
    with console.status(f"{op}: training (federated) and evaluating"):
        records = run_operation(
            op, sources, targets, [data], Path(settings.state_dir), fuser, rounds, seed, defense, unified,
            uploads=uploads,
        )  # fmt: skip
    with InfluxClient(settings.influx) as influx:
        influx.write("\n".join(twin_lines(records, int(time.time()))).encode(), precision="s")
        influx.write("\n".join(update_lines(uploads)).encode(), precision="ns")  # one row per client upload
    if json_out:
        print_json(records)
        return
    print_table(
        f"twin {op} (rows written to InfluxDB: 'twin', level=utt; {len(uploads)} 'update' rows, one per upload)",
        [
            {
                "twin_id": r["twin_id"],
                "operation": r["operation"],
                "sources": ",".join(r["sources"]),
                "fuser": r["fuser"] or "-",
                "model": r["model"],
                "version": r["version"],
                **r["metrics"],
            }
            for r in records
        ],
    )


@app.command("transfer")
def transfer_cmd(
    ctx: typer.Context,
    src: str = typer.Option(..., "--from", help="source twin: position, trajectory or tracking"),
    dst: str = typer.Option(..., "--to", help="task of the new twin"),
    data: Path = typer.Option(..., help=DATA_HELP),
    fuser: str = typer.Option("gating", help="fuser of the unified model (with --unified)"),
    rounds: int = typer.Option(10, min=1, help="federated rounds"),
    seed: int = typer.Option(1),
    defense: str = typer.Option("mean", help=DEFENSE_HELP),
    unified: bool = typer.Option(False, "--unified", help=UNIFIED_HELP),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Reuse a twin's encoder (frozen) with a new decoder for another task."""
    _run(ctx, "transfer", src, dst, data, fuser, rounds, seed, defense, unified, json_out)


@app.command("merge")
def merge_cmd(
    ctx: typer.Context,
    src: str = typer.Option(
        ..., "--from", help="two source twins, comma-separated (e.g. trajectory,tracking)"
    ),
    dst: str = typer.Option(..., "--to", help="task of the merged twin"),
    data: Path = typer.Option(..., help=DATA_HELP),
    fuser: str = typer.Option(
        "gating", help="addition, average, concatenation, multiplication, max, min, gating, attention"
    ),
    rounds: int = typer.Option(10, min=1, help="federated rounds"),
    seed: int = typer.Option(1),
    defense: str = typer.Option("mean", help=DEFENSE_HELP),
    unified: bool = typer.Option(False, "--unified", help=UNIFIED_HELP),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Fuse the (frozen) encoders of two twins with a new fuser and decoder."""
    _run(ctx, "merge", src, dst, data, fuser, rounds, seed, defense, unified, json_out)


@app.command("split")
def split_cmd(
    ctx: typer.Context,
    src: str = typer.Option(..., "--from", help="the twin to split"),
    dst: str = typer.Option(..., "--to", help="two tasks, comma-separated (e.g. trajectory,tracking)"),
    data: Path = typer.Option(..., help=DATA_HELP),
    fuser: str = typer.Option("gating", help="fuser of the unified model (with --unified)"),
    rounds: int = typer.Option(10, min=1, help="federated rounds"),
    seed: int = typer.Option(1),
    defense: str = typer.Option("mean", help=DEFENSE_HELP),
    unified: bool = typer.Option(False, "--unified", help=UNIFIED_HELP),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """One new twin per task, each reusing the source's representation (frozen) with its own decoder."""
    _run(ctx, "split", src, dst, data, fuser, rounds, seed, defense, unified, json_out)


@app.command("position")
def position_cmd(
    ctx: typer.Context,
    data: list[Path] = typer.Option(
        ..., help="folder of walk CSVs with ground truth (like ftm_imu/raw); repeat for more scenes"
    ),
    seed: int = typer.Option(1),
    rounds: int = typer.Option(10, min=1, help="federated rounds in selection (the refit trains those kept)"),
    fusers: str = typer.Option("gating,concatenation,average", help="fusers chosen from on validation"),
    augment: int = typer.Option(2, min=0, help="AP-dropout copies of every training walk"),
    patience: int = typer.Option(
        4,
        min=0,
        help="selection stops a twin after this many rounds without a better validation loss (0: off)",
    ),
    val_copies: int = typer.Option(
        2,
        min=0,
        help="sparser AP-dropout copies of each validation walk the shrink alpha is also chosen on (0: none)",
    ),
    members: int = typer.Option(1, min=1, help="seed ensemble: every twin trained with this many seeds"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """The generalising merged (FTM + IMU) positioning twin: chosen on held-out walks, stored for the live
    windows (the worker's multimodal agent adds its position to every window)."""
    from ingest.errors import InputError
    from twin_store.adapters.influx import InfluxClient
    from twin_store.federation.utt_positioning import PositioningConfig
    from twin_store.models.utt import FUSERS
    from twin_store.services.twin import locator_lines, train_locator

    for d in data:
        if not d.exists():
            raise InputError(f"{d}: no such file or folder")
    chosen = tuple(f.strip() for f in fusers.split(",") if f.strip())
    if not chosen or [f for f in chosen if f not in FUSERS]:
        raise InputError(f"--fusers {fusers!r}: choose from {', '.join(FUSERS)}")
    settings = settings_of(ctx)
    pcfg = PositioningConfig(
        rounds=rounds,
        fusers=chosen,
        augment=augment,
        patience=patience,
        members=members,
        val_copies=val_copies,
    )
    with console.status("position: selecting on held-out walks, refitting, testing"):
        record = train_locator(list(data), Path(settings.state_dir), seed, pcfg)
    with InfluxClient(settings.influx) as influx:
        influx.write("\n".join(locator_lines(record, int(time.time()))).encode(), precision="s")
    if json_out:
        print_json(record)
        return
    m = record["metrics"]
    rows = [
        {
            "scene": scene,
            "trilateration": base["trilateration"],
            "kalman": base["kalman"],
            "merged twin": m["test_median_m"]["merged"].get(scene),
            "unshrunk": m["test_median_m"]["merged (unshrunk, alpha 1)"].get(scene),
            "val: kalman": m["baselines_val_median_m"].get(scene, {}).get("kalman", "-"),
            "val: merged": m["val_median_m"].get("merged (shrunk)", {}).get(scene, "-"),
        }
        for scene, base in m["baselines_test_median_m"].items()
    ]
    print_table(
        f"positioning twin ({m['deployed']}, fusers {','.join(record['fusers'])}, alpha {m['alpha']}; "
        f"stored {record['stored']}): "
        "median error (m) on the test walks, validation walks beside",
        rows,
    )
