"""The one loader of `config/presend.yml`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from presend import settings


class ConfigError(ValueError):
    """The configuration file is missing a value or has one of the wrong type."""


@dataclass(frozen=True)
class QualityConfig:
    """The `quality:` section: thresholds of the Great Expectations gate."""

    max_failed_share: float
    volume_max_drop: float
    volume_max_growth: float
    merge_fields_freshness_hours: float
    freshness_hours: dict[str, float]
    max_rejected_share: float
    rejected_lookback_hours: float
    loyalty_tiers: list[str]


QUALITY_DEFAULTS: dict[str, Any] = {
    "volume_max_drop": 0.5,
    "volume_max_growth": 2.0,
    "merge_fields_freshness_hours": 24.0,
    "freshness_hours": {},
    "max_rejected_share": 0.02,
    "rejected_lookback_hours": 24.0,
    "loyalty_tiers": ["bronze", "silver", "gold", "platinum"],
}


def _quality(doc: dict[str, Any], path: Path) -> QualityConfig:
    """The gate's thresholds; keys left out of the file take QUALITY_DEFAULTS."""
    section = doc.get("quality") or {}

    def value(key: str, kind: type) -> Any:
        if key not in section:
            return QUALITY_DEFAULTS[key]
        found = _get(doc, f"quality.{key}", kind, path)
        if kind is float and found < 0:
            raise ConfigError(f"{path}: quality.{key} must not be negative")
        return found

    hours = value("freshness_hours", dict)
    for source, h in hours.items():
        if isinstance(h, bool) or not isinstance(h, int | float) or h <= 0:
            raise ConfigError(f"{path}: quality.freshness_hours.{source} must be > 0")
    return QualityConfig(
        max_failed_share=_get(doc, "quality.max_failed_share", float, path),
        volume_max_drop=value("volume_max_drop", float),
        volume_max_growth=value("volume_max_growth", float),
        merge_fields_freshness_hours=value("merge_fields_freshness_hours", float),
        freshness_hours={k: float(v) for k, v in hours.items()},
        max_rejected_share=value("max_rejected_share", float),
        rejected_lookback_hours=value("rejected_lookback_hours", float),
        loyalty_tiers=[str(t) for t in value("loyalty_tiers", list)],
    )


COMPACT_EVERY_HOURS = 24.0  # transform.compact_every_hours when the file leaves it out


@dataclass(frozen=True)
class Config:
    merge_field_defaults: dict[str, str]
    quality_max_failed_share: float
    quality: QualityConfig
    esp_vendor: str
    esp_batch_max_contacts: int
    esp_batch_max_bytes: int
    # transform: the store whose product pages recommendations link to.
    transform_store_url: str = "https://shop.example.com"
    # transform: hours between pipeline builds that let DuckDB compact the tables they write.
    transform_compact_every_hours: float = COMPACT_EVERY_HOURS
    # alerts: the Airflow notifier (dotted path to a BaseNotifier subclass) and its arguments.
    alerts_notifier: str = "presend.alerts.LogNotifier"
    alerts_notifier_kwargs: dict = field(default_factory=dict)


def _get(doc: dict[str, Any], path: str, kind: type, file: Path) -> Any:
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{file}: missing `{path}`")
        node = node[part]
    if kind is float and isinstance(node, int) and not isinstance(node, bool):
        node = float(node)
    if not isinstance(node, kind) or (isinstance(node, bool) and kind is not bool):
        raise ConfigError(f"{file}: `{path}` must be {kind.__name__}, got {node!r}")
    return node


def load(path: Path | None = None) -> Config:
    """Read and check the configuration file."""
    path = path or settings.CONFIG_FILE
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"configuration file {path} not found") from exc
    defaults = _get(doc, "merge_field_defaults", dict, path)
    for name, value in defaults.items():
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"{path}: merge_field_defaults.{name} must be a non-empty string, got {value!r}"
            )
    share = _get(doc, "quality.max_failed_share", float, path)
    if not 0 <= share <= 1:
        raise ConfigError(f"{path}: quality.max_failed_share must be between 0 and 1")
    return Config(
        merge_field_defaults=dict(defaults),
        quality_max_failed_share=share,
        quality=_quality(doc, path),
        esp_vendor=_get(doc, "esp.vendor", str, path),
        esp_batch_max_contacts=_get(doc, "esp.batch_max_contacts", int, path),
        esp_batch_max_bytes=_get(doc, "esp.batch_max_bytes", int, path),
        transform_store_url=(
            _get(doc, "transform.store_url", str, path)
            if "transform" in doc
            else "https://shop.example.com"
        ),
        transform_compact_every_hours=_compact_every_hours(doc, path),
        **_alerts(doc, path),
    )


def _compact_every_hours(doc: dict[str, Any], path: Path) -> float:
    if "compact_every_hours" not in (doc.get("transform") or {}):
        return COMPACT_EVERY_HOURS
    hours = _get(doc, "transform.compact_every_hours", float, path)
    if hours < 0:
        raise ConfigError(f"{path}: transform.compact_every_hours must not be negative")
    return hours


def _alerts(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    if "alerts" not in doc:
        return {}
    return {
        "alerts_notifier": _get(doc, "alerts.notifier", str, path),
        "alerts_notifier_kwargs": doc["alerts"].get("notifier_kwargs") or {},
    }
