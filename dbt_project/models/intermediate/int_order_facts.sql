{#- Per contact: orders not cancelled, all time (up to the reference time). -#}
{{ config(
    materialized='incremental',
    incremental_strategy='append',
    pre_hook="{{ delete_affected_contacts() }}",
) }}
-- depends_on: {{ ref('int_affected_contacts') }}
with

contact_orders as (

    select * from {{ ref('int_identity__contact_orders') }}
    where
        not is_cancelled and created_at <= {{ as_of() }}
    {% if is_incremental() %}
        and contact_id in {{ affected_contacts() }}
    {% endif %}

),

facts as (

    select
        contact_id,
        count(*) as order_count,
        cast(sum(net_total) as decimal(18, 2)) as lifetime_value,
        cast(max(created_at) as date) as last_order_date

    from contact_orders
    group by contact_id

)

select * from facts
