"""Config files plus environment overrides load into frozen dataclasses, or fail clearly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from shared.config import REQUIRED, ConfigError, config_keys, env_var_name, load_config

PREFIX = "TEST_APP"


@dataclass(frozen=True, slots=True)
class SyncSettings:
    batch_max_changes: int = field(default=1000, metadata={"doc": "Changes per batch."})
    interval_s: float = field(default=2.5, metadata={"doc": "Seconds between syncs."})
    compress: bool = field(default=True, metadata={"doc": "Compress batches."})
    strategy: Literal["server_wins", "client_wins"] = field(
        default="server_wins", metadata={"doc": "Default conflict strategy."}
    )

    def __post_init__(self) -> None:
        if self.batch_max_changes <= 0:
            raise ValueError("batch_max_changes must be positive")


@dataclass(frozen=True, slots=True)
class AppConfig:
    name: str = field(default="edge", metadata={"doc": "Node name."})
    cloud_url: str | None = field(default=None, metadata={"doc": "Cloud URL, None offline."})
    origins: tuple[str, ...] = field(default=(), metadata={"doc": "Allowed CORS origins."})
    sync: SyncSettings = field(default_factory=SyncSettings, metadata={"doc": "Sync."})


@dataclass(frozen=True)
class NeedsKey:
    secret: str = field(metadata={"doc": "A key with no default."})


def write_toml(tmp_path: Path, text: str) -> Path:
    """Write ``text`` to a TOML file and return its path."""
    path = tmp_path / "app.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_no_file_and_no_env_gives_defaults() -> None:
    assert load_config(AppConfig, None, PREFIX, environ={}) == AppConfig()


def test_file_values_are_read(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        name = "till-1"
        cloud_url = "https://cloud.example"
        origins = ["http://a", "http://b"]
        [sync]
        batch_max_changes = 50
        interval_s = 1
        compress = false
        strategy = "client_wins"
        """,
    )
    config = load_config(AppConfig, str(path), PREFIX, environ={})
    assert config == AppConfig(
        name="till-1",
        cloud_url="https://cloud.example",
        origins=("http://a", "http://b"),
        sync=SyncSettings(50, 1.0, False, "client_wins"),
    )
    assert isinstance(config.sync.interval_s, float)


def test_env_overrides_each_type(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[sync]\nbatch_max_changes = 50\ncompress = true\n")
    environ = {
        "TEST_APP_NAME": "till-2",
        "TEST_APP_CLOUD_URL": "https://c",
        "TEST_APP_ORIGINS": "http://a, http://b",
        "TEST_APP_SYNC_BATCH_MAX_CHANGES": "5000",
        "TEST_APP_SYNC_INTERVAL_S": "0.25",
        "TEST_APP_SYNC_COMPRESS": "no",
        "TEST_APP_SYNC_STRATEGY": "client_wins",
    }
    config = load_config(AppConfig, path, PREFIX, environ=environ)
    assert config == AppConfig(
        name="till-2",
        cloud_url="https://c",
        origins=("http://a", "http://b"),
        sync=SyncSettings(5000, 0.25, False, "client_wins"),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("true", True), ("YES", True), ("0", False), ("False", False), ("no", False)],
)
def test_env_booleans(text: str, expected: bool) -> None:
    environ = {"TEST_APP_SYNC_COMPRESS": text}
    assert load_config(AppConfig, None, PREFIX, environ=environ).sync.compress is expected


def test_empty_env_means_none_for_optional() -> None:
    path_env = {"TEST_APP_CLOUD_URL": ""}
    assert load_config(AppConfig, None, PREFIX, environ=path_env).cloud_url is None


def test_env_prefix_with_trailing_underscore_is_the_same() -> None:
    environ = {"TEST_APP_SYNC_BATCH_MAX_CHANGES": "7"}
    assert load_config(AppConfig, None, "TEST_APP_", environ=environ).sync.batch_max_changes == 7
    assert env_var_name("FYNLO_EDGE", "sync.batch_max_changes") == (
        "FYNLO_EDGE_SYNC_BATCH_MAX_CHANGES"
    )


def test_real_environment_is_used_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_APP_NAME", "from-os-environ")
    assert load_config(AppConfig, None, PREFIX).name == "from-os-environ"


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("TEST_APP_SYNC_BATCH_MAX_CHANGES", "lots", "sync.batch_max_changes"),
        ("TEST_APP_SYNC_BATCH_MAX_CHANGES", "1.5", "sync.batch_max_changes"),
        ("TEST_APP_SYNC_INTERVAL_S", "soon", "sync.interval_s"),
        ("TEST_APP_SYNC_COMPRESS", "maybe", "sync.compress"),
        ("TEST_APP_SYNC_STRATEGY", "coin_flip", "sync.strategy"),
    ],
)
def test_bad_env_value_is_refused(variable: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(AppConfig, None, PREFIX, environ={variable: value})
    assert caught.value.key == key
    assert caught.value.code == "config_invalid"
    assert variable in str(caught.value) and repr(value) in str(caught.value)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("name = 3", "name"),
        ('[sync]\nbatch_max_changes = "10"', "sync.batch_max_changes"),
        ("[sync]\nbatch_max_changes = true", "sync.batch_max_changes"),
        ('[sync]\ncompress = "yes"', "sync.compress"),
        ('[sync]\ninterval_s = "1"', "sync.interval_s"),
        ('origins = "http://a"', "origins"),
        ("origins = [1]", "origins[0]"),
        ("sync = 3", "sync"),
    ],
)
def test_bad_file_value_is_refused(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(AppConfig, write_toml(tmp_path, toml), PREFIX, environ={})
    assert caught.value.key == key


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("colour = 'red'", "colour"),
        ("[sync]\nbatch_size = 10", "sync.batch_size"),
        ("[extras]\nx = 1", "extras"),
    ],
)
def test_unknown_key_is_refused(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError, match="unknown key") as caught:
        load_config(AppConfig, write_toml(tmp_path, toml), PREFIX, environ={})
    assert caught.value.key == key


def test_dataclass_validation_becomes_config_error() -> None:
    environ = {"TEST_APP_SYNC_BATCH_MAX_CHANGES": "0"}
    with pytest.raises(ConfigError, match="must be positive") as caught:
        load_config(AppConfig, None, PREFIX, environ=environ)
    assert caught.value.key == "sync"


def test_required_key_missing_is_refused() -> None:
    with pytest.raises(ConfigError, match="required key missing"):
        load_config(NeedsKey, None, PREFIX, environ={})
    assert load_config(NeedsKey, None, PREFIX, environ={"TEST_APP_SECRET": "s"}).secret == "s"


def test_missing_or_broken_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(AppConfig, tmp_path / "nope.toml", PREFIX, environ={})
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(AppConfig, write_toml(tmp_path, "name = "), PREFIX, environ={})


def test_config_is_frozen() -> None:
    config = load_config(AppConfig, None, PREFIX, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.name = "other"  # type: ignore[misc]


def test_config_keys_lists_every_setting_with_doc() -> None:
    keys = config_keys(AppConfig)
    assert [k.key for k in keys] == [
        "name",
        "cloud_url",
        "origins",
        "sync.batch_max_changes",
        "sync.interval_s",
        "sync.compress",
        "sync.strategy",
    ]
    by_key = {k.key: k for k in keys}
    assert by_key["cloud_url"] == ("cloud_url", "str | None", None, "Cloud URL, None offline.")
    assert by_key["sync.batch_max_changes"].type_name == "int"
    assert by_key["sync.batch_max_changes"].default == 1000
    assert by_key["origins"].type_name == "tuple[str, ...]"
    assert by_key["sync.strategy"].type_name == "'server_wins' | 'client_wins'"
    assert all(k.doc for k in keys)
    assert config_keys(NeedsKey)[0].default is REQUIRED


def test_undocumented_key_shows_up_with_empty_doc() -> None:
    @dataclass(frozen=True)
    class Undocumented:
        port: int = 8080

    assert config_keys(Undocumented) == [("port", "int", 8080, "")]


def test_unsupported_field_type_is_a_programming_error() -> None:
    @dataclass(frozen=True)
    class Odd:
        when: list[int] = field(default_factory=list)

    with pytest.raises(TypeError, match="unsupported type"):
        load_config(Odd, None, PREFIX, environ={})
