"""The campaign schedule (`config/campaigns.yml`): campaigns, their send batches, and when
each batch's pre-send sync must run.

The file is checked when a DAG file reads it, so a mistake fails DAG parsing with a message
that names the campaign, the batch and the field.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from presend import settings

DEFAULT_FILE = settings.PROJECT_DIR / "config" / "campaigns.yml"
MERGE_FIELDS_YML = settings.DBT_PROJECT_DIR / "models" / "marts" / "esp_merge_fields.yml"
ESPS = ("sendgrid", "klaviyo")
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_NAME = r"^[a-z][a-z0-9_]*$"


class CampaignConfigError(ValueError):
    """The campaign schedule is invalid; the message names the campaign and the field."""


def parse_duration(value: Any) -> timedelta:
    """'45m', '2h', '1d' (or a timedelta) as a timedelta."""
    if isinstance(value, timedelta):
        return value
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration like 45m, 2h or 1d")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def merge_fields() -> set[str]:
    """The merge fields of the esp_merge_fields contract, read from its dbt model yml."""
    doc = yaml.safe_load(MERGE_FIELDS_YML.read_text())
    model = next(m for m in doc["models"] if m["name"] == "esp_merge_fields")
    return {c["name"] for c in model["columns"]} - {"contact_id", "fields_hash"}


class Batch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME)
    send_at: datetime
    # merge field -> allowed values (a scalar or a list); empty or absent: every contact.
    audience: dict[str, list[str | int | float]] = Field(default_factory=dict)

    @field_validator("send_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("needs a UTC offset, e.g. 2026-12-01T08:00:00+01:00")
        return value

    @field_validator("audience", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        if value in (None, "all"):
            return {}
        if isinstance(value, dict):
            return {k: v if isinstance(v, list) else [v] for k, v in value.items()}
        return value


class Campaign(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME)
    esp: str
    lead_time: Duration
    freshness: Duration
    batches: list[Batch] = Field(min_length=1)

    @field_validator("esp")
    @classmethod
    def _known_esp(cls, value: str) -> str:
        if value not in ESPS:
            raise ValueError(f"must be one of {', '.join(ESPS)}")
        return value

    @field_validator("lead_time", "freshness")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than 0")
        return value

    @model_validator(mode="after")
    def _unique_batches(self) -> Campaign:
        names = [b.name for b in self.batches]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"batch names must be unique, repeated: {', '.join(dupes)}")
        return self


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    safety_margin: Duration = timedelta(minutes=10)
    campaigns: list[Campaign] = Field(min_length=1)


def _where(errors: list[dict], doc: dict) -> list[str]:
    """Human locations for pydantic errors: campaign and batch by name, not by index."""
    out = []
    for err in errors:
        loc, parts, node = err["loc"], [], doc
        for i, key in enumerate(loc):
            node = node[key] if isinstance(node, (dict, list)) and _has(node, key) else None
            if isinstance(key, int) and isinstance(node, dict) and "name" in node:
                parts[-1] = f"{'campaign' if loc[i - 1] == 'campaigns' else 'batch'} "
                parts[-1] += repr(node["name"])
            else:
                parts.append(str(key))
        out.append(f"{', '.join(parts)}: {err['msg']}")
    return out


def _has(node, key) -> bool:
    return key in node if isinstance(node, dict) else isinstance(key, int) and key < len(node)


def load(path: Path | None = None) -> Schedule:
    """Read and check the campaign schedule; raise CampaignConfigError naming each mistake."""
    path = path or Path(os.environ.get("PRESEND_CAMPAIGNS", DEFAULT_FILE))
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise CampaignConfigError(f"campaign schedule {path} not found") from exc
    except yaml.YAMLError as exc:
        raise CampaignConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        schedule = Schedule.model_validate(doc or {})
    except ValidationError as exc:
        problems = _where(exc.errors(), doc if isinstance(doc, dict) else {})
        raise CampaignConfigError(f"{path}:\n  " + "\n  ".join(problems)) from None
    _check_audiences(path, schedule)
    _check_margins(path, schedule)
    return schedule


def _check_audiences(path: Path, schedule: Schedule) -> None:
    known = merge_fields()
    for c in schedule.campaigns:
        for b in c.batches:
            for field in b.audience:
                if field not in known:
                    raise CampaignConfigError(
                        f"{path}: campaign {c.name!r}, batch {b.name!r}: audience field "
                        f"{field!r} is not a merge field (known: {', '.join(sorted(known))})"
                    )


def _check_margins(path: Path, schedule: Schedule) -> None:
    for c in schedule.campaigns:
        if c.lead_time <= schedule.safety_margin:
            raise CampaignConfigError(
                f"{path}: campaign {c.name!r}: lead_time ({c.lead_time}) must be longer than "
                f"the safety_margin ({schedule.safety_margin}), or no sync can meet its deadline"
            )


def sync_times(campaign: Campaign) -> list[datetime]:
    """When each batch's pre-send sync starts: send time minus lead time."""
    return sorted({b.send_at - campaign.lead_time for b in campaign.batches})


def batches_due(campaign: Campaign, sync_at: datetime) -> list[Batch]:
    """The batches whose sync starts at `sync_at` (a DAG run's logical date)."""
    return [b for b in campaign.batches if b.send_at - campaign.lead_time == sync_at]


def audience_filter(batches: list[Batch]) -> tuple[str, dict[str, Any]]:
    """A SQL condition over esp_merge_fields selecting the batches' audiences, and its named
    parameters.

    Field names were checked against the contract when the file was loaded; values are bound
    as parameters, never pasted into SQL.
    """
    alternatives, params = [], {}
    for batch in batches:
        if not batch.audience:
            return "true", {}
        clauses = []
        for field, values in sorted(batch.audience.items()):
            names = []
            for value in values:
                names.append(f"$audience_{len(params)}")
                params[names[-1][1:]] = value
            clauses.append(f'"{field}" in ({", ".join(names)})')
        alternatives.append("(" + " and ".join(clauses) + ")")
    return " or ".join(alternatives) or "false", params
