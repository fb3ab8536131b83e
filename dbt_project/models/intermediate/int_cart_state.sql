{#-
  Per contact: products added to cart in the last 72 hours and not ordered since (an order
  not cancelled, created at or after the add-to-cart, with a line for the product).
-#}
{{ config(
    materialized='incremental',
    incremental_strategy='affected_contacts',
) }}
-- depends_on: {{ ref('int_affected_contacts') }}
-- depends_on: {{ ref('int_identity__contact_order_lines') }}
with

identity as (

    select * from {{ ref('int_identity__contact_emails') }}
    {% if is_incremental() %} where contact_id in {{ affected_contacts() }} {% endif %}

),

carted as (

    select
        identity.contact_id,
        events.product_id,
        max(events.occurred_at) as carted_at

    from {{ ref('stg_analytics__events') }} as events
    inner join identity on events.email_key = identity.email_key
    where
        events.event_type = 'added_to_cart'
        and events.product_id is not null
        and events.occurred_at > {{ dbt.dateadd('hour', -72, as_of()) }}
        and events.occurred_at <= {{ as_of() }}
    group by identity.contact_id, events.product_id

),

ordered as (

    select
        contact_id,
        product_id,
        max(created_at) as last_ordered_at

    from {{ contact_order_lines() }} as order_lines
    group by contact_id, product_id

),

abandoned as (

    select
        carted.contact_id,
        carted.product_id,
        carted.carted_at,
        products.title,
        row_number() over (
            partition by carted.contact_id
            order by carted.carted_at desc, carted.product_id asc
        ) as recency_rank

    from carted
    left join ordered
        on
            carted.contact_id = ordered.contact_id
            and carted.product_id = ordered.product_id
            and carted.carted_at <= ordered.last_ordered_at
    left join {{ ref('stg_shop__products') }} as products
        on carted.product_id = products.product_id
    where ordered.contact_id is null

),

cart as (

    select
        contact_id,
        max(case when recency_rank = 1 then title end) as cart_item_title,
        count(*) as cart_item_count

    from abandoned
    group by contact_id

)

select * from cart
