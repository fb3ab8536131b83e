{#-
  Per contact: the hour of day (0-23, in the contact's time zone; UTC when it is unknown or
  not a valid IANA name) with the most email opens in the last 180 days. Ties go to the
  earlier hour.
-#}
{{ config(
    materialized='incremental',
    incremental_strategy='affected_contacts',
) }}
-- depends_on: {{ ref('int_affected_contacts') }}
with

contacts as (

    select
        contacts.contact_id,
        coalesce(zones.zone_name, 'UTC') as time_zone

    from {{ ref('stg_crm__contacts') }} as contacts
    left join {{ valid_time_zones() }} as zones on contacts.time_zone = zones.zone_name
    {% if is_incremental() %} where contacts.contact_id in {{ affected_contacts() }} {% endif %}

),

opens as (

    select
        email_owners.contact_id,
        events.occurred_at

    from {{ ref('stg_analytics__events') }} as events
    inner join {{ ref('int_identity__contact_emails') }} as email_owners
        on events.email_key = email_owners.email_key
    where
        events.event_type = 'email_opened'
        and events.occurred_at > {{ dbt.dateadd('day', -180, as_of()) }}
        and events.occurred_at <= {{ as_of() }}
    {% if is_incremental() %}
        and email_owners.contact_id in {{ affected_contacts() }}
    {% endif %}

),

hourly as (

    select
        opens.contact_id,
        cast(
            extract(hour from {{ utc_to_local('opens.occurred_at', 'contacts.time_zone') }})
            as integer
        ) as send_hour,
        count(*) as opens

    from opens
    inner join contacts on opens.contact_id = contacts.contact_id
    group by 1, 2

),

ranked as (

    select
        contact_id,
        send_hour,
        opens,
        row_number() over (
            partition by contact_id order by opens desc, send_hour asc
        ) as hour_rank

    from hourly

),

best as (

    select
        contact_id,
        send_hour as best_send_hour,
        opens as best_send_hour_opens

    from ranked
    where hour_rank = 1

)

select * from best
