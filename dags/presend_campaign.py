"""Campaign pre-send syncs: one DAG per campaign in config/campaigns.yml.

Each batch's sync starts at its send time minus the campaign's lead time (an events
timetable built from the file). It refreshes the data when it is older than the campaign
allows, gates it with Great Expectations, pushes the batch's audience, and records the run in
`campaign_runs`. A deadline alert fires when the push is not acknowledged `safety_margin`
before the send. An invalid file fails parsing with a message naming campaign and field.
"""

from datetime import datetime, timedelta

import pendulum
from airflow.sdk import Param, dag, task
from airflow.timetables.events import EventsTimetable

from presend import alerts, campaign_run, campaigns, pipeline
from presend.dag_parts import ingest_and_transform, warehouse_task
from presend.settings import WAREHOUSE_POOL

schedule = campaigns.load()

for campaign in schedule.campaigns:

    @dag(
        dag_id=f"presend_campaign_{campaign.name}",
        schedule=EventsTimetable(
            event_dates=[pendulum.instance(t) for t in campaigns.sync_times(campaign)],
            description=f"{len(campaign.batches)} batches, {campaign.lead_time} before send",
        ),
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        tags=["presend", "campaign"],
        default_args={
            "owner": "data-engineering",
            "retries": 2,
            "retry_delay": timedelta(seconds=30),
        },
        on_failure_callback=alerts.on_dag_failure,
        deadline=alerts.campaign_deadline(campaign, schedule.safety_margin),
        params={
            "batch": Param(
                None,
                type=["null", "string"],
                enum=[None, *(b.name for b in campaign.batches)],
                description="sync this batch now (a run by hand)",
            ),
            "refresh": Param(
                False,
                type="boolean",
                description="ingest and rebuild the models first, even when the data is fresh",
            ),
        },
        doc_md=__doc__,
    )
    def campaign_sync(name: str = campaign.name):
        plan = task(campaign_run.plan_batch)(name)
        route = task.branch(campaign_run.choose_refresh, pool=WAREHOUSE_POOL)(plan)
        refresh, built = ingest_and_transform()
        gated = warehouse_task(
            pipeline.gate_merge_fields, trigger_rule="none_failed_min_one_success"
        )()
        pushed = warehouse_task(campaign_run.push_batch)(plan)
        recorded = warehouse_task(campaign_run.record_batch_run, trigger_rule="all_done")(plan)

        route >> [refresh, gated]
        built >> gated >> pushed >> recorded

    campaign_sync()
