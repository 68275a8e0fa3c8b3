"""Config: defaults, env overrides and every problem reported with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import load_config, parse_config
from proxy.errors import ConfigError


def test_defaults_match_the_spec() -> None:
    cfg = parse_config({}, environ={})
    assert (cfg.listen.host, cfg.listen.port) == ("127.0.0.1", 8080)
    up = cfg.upstreams[0]
    assert (up.name, up.url, up.prefix, up.api, up.models) == (
        "llm",
        "http://127.0.0.1:8000",
        "/",
        "openai",
        ["*"],
    )
    assert cfg.meter.kind == "auto" and cfg.meter.interval_ms == 100
    assert (cfg.attribution.idle, cfg.attribution.idle_watts, cfg.attribution.weighting) == (
        "exclude",
        "auto",
        "work",
    )
    assert (cfg.carbon.zone, cfg.carbon.pue, cfg.carbon.provider) == ("WORLD", 1.0, "static")
    assert cfg.ledger.url == "sqlite:///wattproxy.db"
    assert cfg.admin_token_env == "WATTPROXY_ADMIN_TOKEN"
    assert cfg.limits.max_body_bytes == 64 * 1024 * 1024


def test_the_shipped_config_yaml_is_valid_and_equals_the_defaults() -> None:
    shipped = load_config(Path(__file__).parent.parent / "config.yaml", environ={})
    assert shipped == parse_config({}, environ={})


def test_every_problem_has_its_key_path() -> None:
    doc = {
        "listen": {"port": 70000},
        "upstreams": [{"name": "a", "url": "ftp://x"}, {"name": "b", "prefix": "v1"}],
        "meter": {"kind": "gpu", "devices": {"gpu0": {"index": 0, "uuid": "GPU-1"}}},
        "budgets": {"users": {"carol": {}}},
        "typo_key": 1,
    }
    with pytest.raises(ConfigError) as info:
        parse_config(doc, "c.yaml", environ={})
    text = "\n".join(info.value.problems)
    for path in (
        "c.yaml: listen.port:",
        "c.yaml: upstreams.0.url:",
        "c.yaml: upstreams.1.prefix:",
        "c.yaml: meter.kind:",
        "c.yaml: meter.devices.gpu0:",
        "c.yaml: budgets.users.carol:",
        "c.yaml: typo_key: unknown key",
    ):
        assert path in text, path
    assert len(info.value.problems) == 7


def test_env_overrides_nest_with_double_underscores() -> None:
    env = {
        "WATTPROXY_LISTEN__PORT": "9000",
        "WATTPROXY_LEDGER__URL": "redis://127.0.0.1:6379/3",
        "WATTPROXY_METER__KIND": "none",
        "WATTPROXY_CARBON__PUE": "1.3",
        "WATTPROXY_ADMIN_TOKEN": "not-a-key",  # reserved: the admin token itself
        "WATTPROXY_UNKNOWN": "ignored",
    }
    cfg = parse_config({"listen": {"host": "0.0.0.0"}}, environ=env)
    assert (cfg.listen.host, cfg.listen.port) == ("0.0.0.0", 9000)
    assert cfg.ledger.url == "redis://127.0.0.1:6379/3"
    assert cfg.meter.kind == "none"
    assert cfg.carbon.pue == 1.3


def test_env_override_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({}, environ={"WATTPROXY_LISTEN__PORT": "eighty"})
    assert "listen.port" in info.value.problems[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen: [1, 2\n", "not valid YAML at line"),
        ("- 1\n- 2\n", "top level must be a mapping"),
    ],
)
def test_unreadable_files(tmp_path: Path, text: str, expected: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p, environ={})
    assert expected in info.value.problems[0]
    assert str(p) in info.value.problems[0]


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config("/nonexistent/wattproxy.yaml", environ={})


def test_duplicate_upstream_names() -> None:
    with pytest.raises(ConfigError, match="names must be unique"):
        parse_config({"upstreams": [{"name": "a"}, {"name": "a"}]}, environ={})
