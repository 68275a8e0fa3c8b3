"""What `check-config` and `serve` refuse beyond the config's shape, each problem with its key
path: upstreams that can never be chosen, unknown carbon zones, env overrides naming no key."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import config_warnings, file_problems, parse_config
from proxy.errors import ConfigError, LedgerError
from proxy.identity import KeyStore, sha256_hex
from proxy.ledger.sqlite import SQLiteLedger
from proxy.routing import Router, shadowed_upstreams


def upstreams(*specs: tuple[str, str, list[str]]) -> dict[str, Any]:
    return {
        "upstreams": [
            {"name": name, "url": f"http://127.0.0.1:{8000 + i}", "prefix": prefix, "models": m}
            for i, (name, prefix, m) in enumerate(specs)
        ]
    }


@pytest.mark.parametrize(
    ("specs", "where"),
    [
        ((("a", "/", ["*"]), ("b", "/", ["*"])), "upstreams.1: upstream 'b' can never be chosen"),
        (
            (("a", "/v1", ["m1", "m2"]), ("b", "/v1/", ["m2", "m1"])),
            "upstreams.1: upstream 'b' can never be chosen",
        ),
        (
            (("a", "/", ["gpt-*"]), ("b", "/", ["gpt-4*", "gpt-3.5-*"])),
            "upstreams.1: upstream 'b' can never be chosen",
        ),
        (
            (("a", "/", ["x", "y"]), ("b", "/", ["y", "z"])),
            "upstreams.1.models.0: model 'y' never reaches upstream 'b'",
        ),
    ],
)
def test_an_upstream_shadowed_by_an_earlier_one_is_refused(
    specs: tuple[tuple[str, str, list[str]], ...], where: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(upstreams(*specs), "c.yaml", environ={})
    (problem,) = info.value.problems
    assert problem.startswith(f"c.yaml: {where}"), problem
    assert "'a'" in problem and "'b'" in problem  # names both upstreams


@pytest.mark.parametrize(
    "specs",
    [
        (("a", "/", ["gpt-*"]), ("b", "/", ["llama-*"])),  # disjoint
        (("a", "/", ["*"]), ("b", "/", ["llama-3"])),  # an exact name wins over a glob
        (("a", "/", ["*"]), ("b", "/v1", ["*"])),  # another prefix
        (("a", "/", ["llama-3"]), ("b", "/", ["*"])),  # b answers every other model
        (("a", "/", ["llama-3-*"]), ("b", "/", ["llama-*"])),  # b answers llama-2
    ],
)
def test_same_prefix_with_models_each_can_answer_is_valid(
    specs: tuple[tuple[str, str, list[str]], ...],
) -> None:
    parse_config(upstreams(*specs), "c.yaml", environ={})


PATTERNS = st.sampled_from(["*", "a*", "ab*", "a?", "ab", "abc", "b*", "[ab]*", "a", "*c"])
MODELS = st.text(alphabet="abc", max_size=4)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    first=st.lists(PATTERNS, min_size=1, max_size=3),
    second=st.lists(PATTERNS, min_size=1, max_size=3),
    models=st.lists(MODELS, max_size=20),
)
def test_a_shadowed_upstream_is_never_chosen_by_the_router(
    first: list[str], second: list[str], models: list[str]
) -> None:
    """No false alarm: whenever an upstream (or one of its entries) is called shadowed, the
    router never picks it (for the models that entry alone would bring it)."""
    cfg = parse_config({}, environ={})
    a = cfg.upstreams[0].model_copy(update={"name": "a", "models": first})
    b = cfg.upstreams[0].model_copy(update={"name": "b", "models": second})
    found = shadowed_upstreams([a, b])
    router = Router([a, b])
    if any(p.startswith("upstreams.1:") for p in found):
        assert all(router.route("/v1/x", m) is not b for m in [*models, None])
        return
    dead = {i for i in range(len(second)) if any(f"upstreams.1.models.{i}:" in p for p in found)}
    for m in models:
        matching = {i for i, pattern in enumerate(second) if fnmatch.fnmatchcase(m, pattern)}
        if matching and matching <= dead:
            assert router.route("/v1/x", m) is not b, (m, first, second, found)


# --- carbon.zone ------------------------------------------------------------------------------


def test_an_unknown_zone_of_the_static_table_is_refused_with_the_known_zones() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"carbon": {"zone": "NOWHERE"}}, "c.yaml", environ={})
    (problem,) = info.value.problems
    assert problem.startswith("c.yaml: carbon.zone: 'NOWHERE' is not in the built-in table")
    assert "zones.csv" in problem and "WORLD" in problem and "FR" in problem


@pytest.mark.parametrize(
    "carbon",
    [
        {"zone": "fr"},  # zones are case-insensitive
        {"zone": "US-CA"},
        {"zone": "NOWHERE", "intensity_g_per_kwh": 100},  # a fixed figure: the zone is a label
    ],
)
def test_static_zones_of_the_table_or_with_a_fixed_figure_are_valid(carbon: dict[str, Any]) -> None:
    cfg = parse_config({"carbon": carbon}, "c.yaml", environ={})
    assert config_warnings(cfg) == []


@pytest.mark.parametrize(
    ("carbon", "warned"),
    [
        ({"provider": "electricitymaps", "zone": "DE"}, False),
        ({"provider": "electricitymaps", "zone": "DE-XX"}, False),  # falls back to DE
        ({"provider": "electricitymaps", "zone": "XX-YY"}, True),  # falls back to WORLD
        ({"provider": "electricitymaps", "zone": "XX-YY", "intensity_g_per_kwh": 90}, False),
        ({"provider": "watttime", "zone": "CAISO_NORTH"}, False),  # maps to US-CAL-CISO
        ({"provider": "watttime", "zone": "NOWHERE_1"}, True),
        ({"provider": "uk-carbon-intensity", "zone": "GB"}, False),
        ({"provider": "uk-carbon-intensity", "zone": "FR"}, True),  # covers GB only
    ],
)
def test_live_provider_zones_are_their_own_but_a_world_fallback_is_a_warning(
    carbon: dict[str, Any], warned: bool
) -> None:
    """A live provider takes its own zone codes: never an error; a warning when its fallback
    (the table, for the zone or its country) would be the world average."""
    cfg = parse_config({"carbon": carbon}, "c.yaml", environ={})
    warnings = config_warnings(cfg)
    assert bool(warnings) == warned, warnings
    assert all(w.startswith("carbon.zone: ") for w in warnings)


# --- identity.keys_file -------------------------------------------------------------------------

ALICE_SHA = sha256_hex("alice-key")


def test_duplicate_keys_and_malformed_digests_are_refused_all_at_once(tmp_path: Path) -> None:
    """The same key twice would let one user log in as another (the last entry won); a
    key_sha256 must be exactly 64 hex digits. Messages name the file and entries, never a key."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "keys": [
                    {"key": "alice-key", "user": "alice"},
                    {"key_sha256": ALICE_SHA.upper(), "user": "mallory"},  # alice's key again
                    {"key": "bob-key", "user": "bob"},
                    {"key": "bob-key", "user": "bob"},
                    {"key_sha256": "z" * 64, "user": "carol"},
                    {"key_sha256": ALICE_SHA[:63], "user": "dave"},
                ]
            }
        )
    )
    with pytest.raises(ConfigError) as info:
        KeyStore.load(keys)
    problems = info.value.problems
    assert problems == [
        f"{keys}: keys.1: the same key as keys.0 (user 'alice'); each key must name one user",
        f"{keys}: keys.3: the same key as keys.2 (user 'bob'); each key must name one user",
        f"{keys}: keys.4: key_sha256 must be exactly 64 hex digits (the sha256 of the key)",
        f"{keys}: keys.5: key_sha256 must be exactly 64 hex digits (the sha256 of the key)",
    ]
    text = "\n".join(problems)
    assert "alice-key" not in text and ALICE_SHA not in text.lower()


# --- WATTPROXY_* env overrides ------------------------------------------------------------------


def test_env_overrides_naming_no_config_key_are_refused_all_at_once() -> None:
    env = {
        "WATTPROXY_LISTN__PORT": "9000",  # once silently ignored
        "WATTPROXY_LISTEN__PROT": "9000",
        "WATTPROXY_METER__DCGM_URL__X": "1",
        "WATTPROXY_UPSTREAMS__0__URL": "http://127.0.0.1:9",
        "WATTPROXY_LEDGER_URL": "redis://127.0.0.1:6379/0",  # one underscore: no nesting
        "WATTPROXY____PORT": "1",
    }
    with pytest.raises(ConfigError) as info:
        parse_config({}, "c.yaml", environ=env)
    assert sorted(info.value.problems) == sorted(
        [
            "c.yaml: WATTPROXY_LISTN__PORT: unknown config key listn",
            "c.yaml: WATTPROXY_LISTEN__PROT: unknown config key listen.prot",
            "c.yaml: WATTPROXY_METER__DCGM_URL__X: unknown config key meter.dcgm_url.x",
            "c.yaml: WATTPROXY_UPSTREAMS__0__URL: upstreams is a list: set it whole "
            "(WATTPROXY_UPSTREAMS='[{name: llm, url: ...}]') or in the file",
            "c.yaml: WATTPROXY_LEDGER_URL: nested keys take a double underscore: "
            "WATTPROXY_LEDGER__URL",
            "c.yaml: WATTPROXY____PORT: not a config key path (WATTPROXY_SECTION__KEY)",
        ]
    )


def test_env_vars_that_are_not_overrides_are_left_alone() -> None:
    """Reserved names, names the config itself points at (an upstream's api_key_env, the
    carbon token_env, admin_token_env) and other WATTPROXY_* names without ``__`` that do not
    start like a section's key are not config overrides."""
    env = {
        "WATTPROXY_ADMIN_TOKEN": "t",
        "WATTPROXY_CONFIG": "/etc/wattproxy/config.yaml",
        "WATTPROXY_UNKNOWN": "x",
        "WATTPROXY_LOG_LEVEL": "sk-upstream",  # looks like log.level, but api_key_env names it
        "WATTPROXY_CARBON_KEY": "token",
        "WATTPROXY_BUDGETS__USERS__CAROL__GRAMS_PER_DAY": "5",
        "WATTPROXY_METER__DEVICES__GPU0__INDEX": "1",
        "WATTPROXY_ADMIN_TOKEN_ENV": "OTHER_ADMIN_TOKEN",
    }
    doc = {
        "upstreams": [{"name": "llm", "api_key_env": "WATTPROXY_LOG_LEVEL"}],
        "carbon": {"token_env": "WATTPROXY_CARBON_KEY"},
    }
    cfg = parse_config(doc, "c.yaml", environ=env)
    assert cfg.budgets.users["carol"].grams_per_day == 5
    assert cfg.meter.devices is not None and cfg.meter.devices["gpu0"].index == 1
    assert cfg.admin_token_env == "OTHER_ADMIN_TOKEN"
    assert cfg.log.level == "info"


# --- ledger.url -----------------------------------------------------------------------------------


async def test_the_sqlite_ledger_never_creates_a_missing_folder(tmp_path: Path) -> None:
    """``sqlite:////nonexistent/dir/x.db`` used to create the folder (as root, in a container)."""
    ledger = SQLiteLedger.from_url(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    with pytest.raises(LedgerError) as info:
        await ledger.open()
    assert f"{tmp_path / 'missing'}" in str(info.value) and "does not exist" in str(info.value)
    assert not (tmp_path / "missing").exists()


def test_file_problems_name_a_missing_ledger_or_spool_folder(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "ledger": {
                "url": f"sqlite:///{tmp_path / 'no' / 'x.db'}",
                "spool_path": str(tmp_path / "nope" / "spool.jsonl"),
            }
        },
        environ={},
    )
    assert file_problems(cfg) == [
        f"ledger.url: the folder {tmp_path / 'no'} for the SQLite ledger does not exist "
        "(create it first)",
        f"ledger.spool_path: the folder {tmp_path / 'nope'} for the spool does not exist "
        "(create it first)",
    ]
    ok = parse_config({"ledger": {"url": f"sqlite:///{tmp_path / 'x.db'}"}}, environ={})
    assert file_problems(ok) == []
