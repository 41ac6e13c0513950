"""The shipped example configs load as settings, and config mistakes are one-line ConfigErrors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.errors import ConfigError
from ingest.settings import load_settings

EXAMPLES = sorted((Path(__file__).parents[1] / "examples" / "sources").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETTWIN_CONFIG", str(path))
    settings = load_settings()
    assert settings.source and all(s.name and s.type for s in settings.source)


def test_bad_source_table_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[source]]\nname = "x"\ntype = "carrier-pigeon"\n')
    monkeypatch.setenv("NETTWIN_CONFIG", str(cfg))
    with pytest.raises(ConfigError, match="source"):
        load_settings()
