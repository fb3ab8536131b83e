{#-
  Per contact: orders not cancelled, all time (up to the reference time), and how many
  products those of the last 90 days held (what int_affected_contacts reads to know whose
  recommendations a changed best-seller list reaches).
-#}
{{ config(
    materialized='incremental',
    incremental_strategy='affected_contacts',
    on_schema_change='append_new_columns',
) }}
-- depends_on: {{ ref('int_affected_contacts') }}
-- depends_on: {{ ref('int_identity__contact_order_lines') }}
with

contact_orders as (

    select * from ({{ contact_orders_query(affected_only=is_incremental()) }}) as orders
    where not is_cancelled and created_at <= {{ as_of() }}

),

recent_products as (

    select
        contact_id,
        count(distinct product_id) as products_bought_90d

    from {{ contact_order_lines() }} as order_lines
    where created_at > {{ dbt.dateadd('day', -90, as_of()) }}
    group by contact_id

),

facts as (

    select
        contact_id,
        count(*) as order_count,
        cast(sum(net_total) as decimal(18, 2)) as lifetime_value,
        cast(max(created_at) as date) as last_order_date

    from contact_orders
    group by contact_id

),

final as (

    select
        facts.*,
        coalesce(recent_products.products_bought_90d, 0) as products_bought_90d

    from facts
    left join recent_products on facts.contact_id = recent_products.contact_id

)

select * from final
