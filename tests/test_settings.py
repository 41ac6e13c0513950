"""ingest.settings: one frozen model; precedence CLI overrides > env > TOML file > defaults."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from ingest.errors import ConfigError, NettwinError
from ingest.settings import KafkaSettings, NettwinSettings, WorkerSettings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No NETTWIN_* variable from the outer environment; NETTWIN_CONFIG restored even if code under test sets it."""
    for key in list(os.environ):
        if key.upper().startswith("NETTWIN_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("NETTWIN_CONFIG", "")  # recorded, so undone after the test ...
    monkeypatch.delenv("NETTWIN_CONFIG")  # ... and absent during it
    yield


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nettwin.toml"
    path.write_text(text)
    return path


FILE = """
profile = "external"
state_dir = "/var/lib/nettwin"
[kafka]
bootstrap_servers = "file-1:9092,file-2:9092"
topic_prefix = "file."
partitions = 8
[influx]
database = "from_file"
"""


# --- sources ----------------------------------------------------------------------------------------


def test_defaults() -> None:
    s = load_settings()
    assert s.profile == "local"
    assert s.kafka == KafkaSettings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert s.kafka.topic_prefix == ""
    assert s.kafka.partitions == 4
    assert s.influx.url == "http://127.0.0.1:8086"
    assert s.influx.database == "nettwin"
    assert s.influx.password is None and s.influx.token is None
    assert s.worker.windows_s == (600, 3600)
    assert s.worker.allowed_lateness_s == 0
    assert s.state_dir == Path(".state")
    assert s.session_timeout_ms == 6000


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETTWIN_KAFKA__TOPIC_PREFIX", "prod.")
    monkeypatch.setenv("NETTWIN_KAFKA__PARTITIONS", "12")
    monkeypatch.setenv("NETTWIN_PROFILE", "external")
    monkeypatch.setenv("NETTWIN_INFLUX__TIMEOUT_S", "2.5")
    monkeypatch.setenv("NETTWIN_INFLUX__TOKEN", "s3cret")
    monkeypatch.setenv("NETTWIN_WORKER__WINDOWS_S", "[600, 1800]")
    s = load_settings()
    assert s.kafka.topic_prefix == "prod."
    assert s.kafka.partitions == 12
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092", "the rest of the section keeps its defaults"
    assert s.profile == "external"
    assert s.influx.timeout_s == 2.5
    assert isinstance(s.influx.token, SecretStr)
    assert s.influx.token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)
    assert s.worker.windows_s == (600, 1800)


def test_toml_file_named_by_nettwin_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETTWIN_CONFIG", str(_toml(tmp_path, FILE)))
    s = load_settings()
    assert s.profile == "external"
    assert s.state_dir == Path("/var/lib/nettwin")
    assert s.kafka.bootstrap_servers == "file-1:9092,file-2:9092"
    assert s.kafka.partitions == 8
    assert s.influx.database == "from_file"
    assert s.influx.url == "http://127.0.0.1:8086"


def test_config_file_argument(tmp_path: Path) -> None:
    s = load_settings(config_file=_toml(tmp_path, FILE))
    assert s.kafka.topic_prefix == "file."


@pytest.mark.parametrize(
    ("use_file", "use_env", "overrides", "expected"),
    [
        (False, False, None, ""),
        (True, False, None, "file."),
        (True, True, None, "env."),
        (False, True, None, "env."),
        (True, True, {"kafka": {"topic_prefix": "cli."}}, "cli."),
        (True, False, {"kafka": {"topic_prefix": "cli."}}, "cli."),
        (False, False, {"kafka": {"topic_prefix": "cli."}}, "cli."),
    ],
)
def test_precedence_cli_over_env_over_file_over_defaults(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    use_file: bool,
    use_env: bool,
    overrides: dict[str, Any] | None,
    expected: str,
) -> None:
    if use_file:
        monkeypatch.setenv("NETTWIN_CONFIG", str(_toml(tmp_path, FILE)))
    if use_env:
        monkeypatch.setenv("NETTWIN_KAFKA__TOPIC_PREFIX", "env.")
    s = load_settings(overrides)
    assert s.kafka.topic_prefix == expected
    # the other keys of the section come from the highest source that sets them
    assert s.kafka.bootstrap_servers == ("file-1:9092,file-2:9092" if use_file else "127.0.0.1:9092")


def test_nested_override_merges_into_the_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETTWIN_CONFIG", str(_toml(tmp_path, FILE)))
    monkeypatch.setenv("NETTWIN_KAFKA__SASL_PASSWORD", "pw")
    monkeypatch.setenv("NETTWIN_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    s = load_settings({"kafka": {"topic_prefix": "cli."}, "worker": {"allowed_lateness_s": 60}})
    assert s.kafka.topic_prefix == "cli."
    assert s.kafka.bootstrap_servers == "file-1:9092,file-2:9092"  # file
    assert s.kafka.partitions == 8  # file
    assert s.kafka.security_protocol == "SASL_SSL"  # env
    assert s.kafka.sasl_password is not None and s.kafka.sasl_password.get_secret_value() == "pw"
    assert s.influx.database == "from_file"
    assert s.worker.allowed_lateness_s == 60
    assert s.worker.windows_s == (600, 3600)
    assert s.profile == "external"


def test_top_level_override(tmp_path: Path) -> None:
    s = load_settings({"profile": "external", "state_dir": str(tmp_path)})
    assert s.profile == "external"
    assert s.state_dir == tmp_path


# --- errors -----------------------------------------------------------------------------------------


def _config_error(overrides: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides)
    message = str(info.value)
    assert "\n" not in message, f"one line expected, got {message!r}"
    assert isinstance(info.value, NettwinError)
    return message


@pytest.mark.parametrize(
    ("var", "value", "words"),
    [
        ("NETTWIN_KAFKA__PARTITIONS", "0", "greater than or equal to 1"),
        ("NETTWIN_KAFKA__PARTITIONS", "many", "valid integer"),
        ("NETTWIN_PROFILE", "cloud", "'local' or 'external'"),
        ("NETTWIN_INFLUX__TIMEOUT_S", "-1", "greater than 0"),
        ("NETTWIN_KAFKA__SECURITY_PROTOCOL", "TLS", "PLAINTEXT"),
        ("NETTWIN_KAFKA__SESSION_TIMEOUT_MS", "10", "greater than or equal to 1000"),
    ],
)
def test_invalid_env_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, words: str
) -> None:
    monkeypatch.setenv(var, value)
    message = _config_error()
    assert var in message
    assert words in message
    assert message.startswith("setting ")


@pytest.mark.parametrize(
    ("var", "value"), [("NETTWIN_WORKER__WINDOWS_S", "600,3600"), ("NETTWIN_KAFKA", "{bad")]
)
def test_env_value_that_is_not_json_where_json_is_needed(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    monkeypatch.setenv("NETTWIN_INFLUX__DATABASE", "fine")
    message = _config_error()
    assert var in message
    assert "NETTWIN_INFLUX__DATABASE" not in message, "only the culprit's section is named"
    assert "JSON" in message


def test_invalid_override_names_the_command_line() -> None:
    message = _config_error({"kafka": {"partitions": 0}})
    assert "kafka.partitions" in message
    assert "command line" in message and "NETTWIN_KAFKA__PARTITIONS" not in message


def test_invalid_value_in_the_file_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _toml(tmp_path, "[worker]\nallowed_lateness_s = -5\n")
    monkeypatch.setenv("NETTWIN_CONFIG", str(path))
    message = _config_error()
    assert f"config file {path}, key worker.allowed_lateness_s" in message
    assert "NETTWIN_WORKER__ALLOWED_LATENESS_S" not in message, (
        "the variable is not set: it is not the culprit"
    )
    monkeypatch.setenv("NETTWIN_WORKER__ALLOWED_LATENESS_S", "-7")  # env beats the file, and is named
    assert "env NETTWIN_WORKER__ALLOWED_LATENESS_S" in _config_error()


def test_unknown_key_in_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETTWIN_CONFIG", str(_toml(tmp_path, '[kafka]\nbootstrap = "x:9092"\n')))
    assert "kafka.bootstrap" in _config_error()


def test_missing_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "absent.toml"
    monkeypatch.setenv("NETTWIN_CONFIG", str(missing))
    message = _config_error()
    assert str(missing) in message
    assert "No such file" in message


def test_config_file_is_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETTWIN_CONFIG", str(tmp_path))
    assert str(tmp_path) in _config_error()


@pytest.mark.parametrize("text", ["profile = \n", "[kafka\n", "a = 1\na = 2\n", 'x = "unterminated\n'])
def test_invalid_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    path = _toml(tmp_path, text)
    monkeypatch.setenv("NETTWIN_CONFIG", str(path))
    message = _config_error()
    assert "not valid TOML" in message
    assert str(path) in message


def test_invalid_toml_given_as_argument(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config_file=_toml(tmp_path, "[[["))


# --- derived values and immutability ----------------------------------------------------------------


@pytest.mark.parametrize(("profile", "explicit", "expected"), [
    ("local", None, 6000),
    ("external", None, 30000),
    ("local", 9000, 9000),
    ("external", 9000, 9000),
])  # fmt: skip
def test_session_timeout_follows_the_profile_unless_set(
    monkeypatch: pytest.MonkeyPatch, profile: str, explicit: int | None, expected: int
) -> None:
    monkeypatch.setenv("NETTWIN_PROFILE", profile)
    if explicit is not None:
        monkeypatch.setenv("NETTWIN_KAFKA__SESSION_TIMEOUT_MS", str(explicit))
    assert load_settings().session_timeout_ms == expected


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.profile = "external"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        s.kafka.topic_prefix = "x."  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        s.worker.windows_s = (60,)  # type: ignore[misc]
    assert s.kafka.topic_prefix == ""


def test_extra_keyword_is_rejected() -> None:
    with pytest.raises(ValidationError):
        NettwinSettings(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        WorkerSettings(window=600)  # type: ignore[call-arg]


def test_client_options() -> None:
    plain = KafkaSettings(bootstrap_servers="a:1,b:2").client_options()
    assert plain == {"bootstrap_servers": ["a:1", "b:2"], "security_protocol": "PLAINTEXT"}
    sasl = KafkaSettings(
        security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u", sasl_password=SecretStr("p"),
        ssl_cafile=Path("/etc/ca.pem"),
    ).client_options()  # fmt: skip
    assert sasl["sasl_plain_username"] == "u"
    assert sasl["sasl_plain_password"] == "p"
    assert sasl["ssl_cafile"] == "/etc/ca.pem"
