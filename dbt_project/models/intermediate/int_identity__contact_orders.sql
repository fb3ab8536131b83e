{#- Orders matched to the contact that owns their normalised email; unmatched orders drop out. -#}
{{ config(
    materialized='incremental',
    incremental_strategy='append',
    pre_hook="{{ delete_affected_contacts() }}",
) }}
-- depends_on: {{ ref('int_affected_contacts') }}
with

orders as (

    select * from {{ ref('stg_shop__orders') }}

),

identity as (

    select * from {{ ref('int_identity__contact_emails') }}
    {% if is_incremental() %} where contact_id in {{ affected_contacts() }} {% endif %}

),

matched as (

    select
        orders.order_id,
        identity.contact_id,
        orders.created_at,
        orders.is_cancelled,
        orders.total_price,
        orders.refunded_amount,
        orders.total_price - orders.refunded_amount as net_total

    from orders
    inner join identity on orders.email_key = identity.email_key

)

select * from matched
