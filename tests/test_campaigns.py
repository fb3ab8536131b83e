"""The campaign schedule: valid files give sync times and audiences; each mistake is an error
that names the campaign, the batch and the field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import duckdb
import pytest
import yaml

from presend import campaigns

VALID = {
    "safety_margin": "10m",
    "campaigns": [
        {
            "name": "winter_sale",
            "esp": "sendgrid",
            "lead_time": "45m",
            "freshness": "2h",
            "batches": [
                {
                    "name": "loyal_first",
                    "send_at": "2026-12-01T08:00:00+01:00",
                    "audience": {"LOYALTY_TIER": ["gold", "platinum"]},
                },
                {"name": "everyone", "send_at": "2026-12-01T10:00:00+01:00", "audience": "all"},
            ],
        }
    ],
}


def write(tmp_path, doc) -> campaigns.Schedule:
    path = tmp_path / "campaigns.yml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return campaigns.load(path)


def broken(**changes):
    """VALID with changes at paths like 'campaigns.0.batches.1.send_at' (None deletes)."""
    doc = yaml.safe_load(yaml.safe_dump(VALID))
    for dotted, value in changes.items():
        *parents, last = [int(p) if p.isdigit() else p for p in dotted.split("__")]
        node = doc
        for p in parents:
            node = node[p]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return doc


def test_the_shipped_schedule_is_valid():
    schedule = campaigns.load()
    assert schedule.campaigns


def test_sync_times_are_send_time_minus_lead_time(tmp_path):
    campaign = write(tmp_path, VALID).campaigns[0]
    assert campaigns.sync_times(campaign) == [
        datetime(2026, 12, 1, 6, 15, tzinfo=UTC),
        datetime(2026, 12, 1, 8, 15, tzinfo=UTC),
    ]
    due = campaigns.batches_due(campaign, datetime(2026, 12, 1, 6, 15, tzinfo=UTC))
    assert [b.name for b in due] == ["loyal_first"]
    assert campaigns.batches_due(campaign, datetime(2026, 12, 1, 7, 0, tzinfo=UTC)) == []


def test_audience_filter_selects_the_batches_audience_with_bound_values(tmp_path):
    loyal, everyone = write(tmp_path, VALID).campaigns[0].batches
    con = duckdb.connect()
    con.execute(
        "create table esp_merge_fields as select * from (values (1, 'gold'), (2, 'silver'), "
        "(3, 'platinum')) t(contact_id, \"LOYALTY_TIER\")"
    )
    # A value that looks like SQL stays a value.
    loyal.audience["LOYALTY_TIER"].append("x') or true --")
    for batches, expected in (([loyal], [1, 3]), ([everyone], [1, 2, 3]), ([], [])):
        where, params = campaigns.audience_filter(batches)
        got = con.execute(
            f"select contact_id from esp_merge_fields where {where} order by 1", params
        ).fetchall()
        assert [r[0] for r in got] == expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"campaigns__0__esp": "mailchimp"}, "campaign 'winter_sale', esp: Value error, must be"),
        ({"campaigns__0__lead_time": "soon"}, "campaign 'winter_sale', lead_time: Value error"),
        ({"campaigns__0__freshness": "0h"}, "campaign 'winter_sale', freshness: Value error, must"),
        ({"campaigns__0__name": None}, "campaigns, 0, name: Field required"),
        ({"campaigns__0__lead_tme": "45m"}, "campaign 'winter_sale', lead_tme: Extra inputs"),
        (
            {"campaigns__0__batches__1__send_at": "2026-12-01T10:00:00"},
            "campaign 'winter_sale', batch 'everyone', send_at: Value error, needs a UTC offset",
        ),
        (
            {"campaigns__0__batches__1__send_at": "next tuesday"},
            "campaign 'winter_sale', batch 'everyone', send_at: Input should be a valid datetime",
        ),
        (
            {"campaigns__0__batches__1__name": "loyal_first"},
            "campaign 'winter_sale': Value error, batch names must be unique",
        ),
        (
            {"campaigns__0__batches__0__audience": {"TIER": ["gold"]}},
            "campaign 'winter_sale', batch 'loyal_first': audience field 'TIER' is not a merge",
        ),
        (
            {"campaigns__0__lead_time": "5m"},
            "campaign 'winter_sale': lead_time (0:05:00) must be longer than the safety_margin",
        ),
        ({"campaigns__0__batches": []}, "campaign 'winter_sale', batches: List should have at"),
        ({"campaigns": []}, "campaigns: List should have at least 1 item"),
    ],
)
def test_each_mistake_names_the_campaign_and_field(tmp_path, changes, expected):
    with pytest.raises(campaigns.CampaignConfigError) as err:
        write(tmp_path, broken(**changes))
    assert expected in str(err.value)
    assert str(tmp_path / "campaigns.yml") in str(err.value)


def test_a_file_that_is_not_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(campaigns.CampaignConfigError, match="not valid YAML"):
        write(tmp_path, "campaigns: [unclosed")


def test_durations():
    assert campaigns.parse_duration("45m") == timedelta(minutes=45)
    assert campaigns.parse_duration(" 2h ") == timedelta(hours=2)
    assert campaigns.parse_duration("1d") == timedelta(days=1)
    with pytest.raises(ValueError, match="not a duration"):
        campaigns.parse_duration("2 hours")


def test_batches_due_close_together_get_their_own_runs_one_after_the_other(tmp_path, monkeypatch):
    """Two sends five minutes apart: the DAG's timetable has a run for each sync time, and
    runs of one campaign never overlap, so the second waits for the first to push."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.timetables.base import TimeRestriction

    from presend import settings

    doc = broken(campaigns__0__batches__1__send_at="2026-12-01T08:05:00+01:00")
    path = tmp_path / "campaigns.yml"
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("PRESEND_CAMPAIGNS", str(path))
    bag = DagBag(
        dag_folder=str(settings.PROJECT_DIR / "dags" / "presend_campaign.py"),
        known_pools={"default_pool", settings.WAREHOUSE_POOL},
    )
    assert not bag.import_errors
    dag = bag.dags["presend_campaign_winter_sale"]
    assert dag.max_active_runs == 1
    restriction = TimeRestriction(
        earliest=datetime(2026, 1, 1, tzinfo=UTC), latest=None, catchup=True
    )
    first = dag.timetable.next_dagrun_info(
        last_automated_data_interval=None, restriction=restriction
    )
    second = dag.timetable.next_dagrun_info(
        last_automated_data_interval=first.data_interval, restriction=restriction
    )
    assert [first.logical_date, second.logical_date] == [
        datetime(2026, 12, 1, 6, 15, tzinfo=UTC),
        datetime(2026, 12, 1, 6, 20, tzinfo=UTC),
    ]
    campaign = campaigns.load(path).campaigns[0]
    assert [b.name for b in campaigns.batches_due(campaign, second.logical_date)] == ["everyone"]
