{#-
  Incremental like stg_shop__orders. delete+insert on order_id replaces all lines of an
  order that changed, so a line removed from an order disappears here too, and a cancelled
  order's lines say so.
-#}
{{ config(
    materialized='incremental',
    unique_key='order_id',
    incremental_strategy='delete+insert',
) }}

with

source as (

    select * from {{ raw_source('shop', 'shop_orders', 'updated_at', 'record') }}
    {% if is_incremental() %}
        where _loaded_at >= {{ incremental_watermark() }}
    {% endif %}

),

lines as (

    select
        cast(line_item.value ->> 'id' as {{ dbt.type_string() }}) as order_line_id,
        cast(source.id as {{ dbt.type_string() }}) as order_id,
        cast(line_item.value ->> 'product_id' as {{ dbt.type_string() }}) as product_id,
        line_item.value ->> 'title' as title,
        cast(line_item.value ->> 'quantity' as integer) as quantity,
        cast(line_item.value ->> 'price' as decimal(18, 2)) as price,
        -- The order's, as in stg_shop__orders: sales per product then need no join of
        -- every line with its order.
        {{ iso_to_utc("source.record ->> 'created_at'") }} as order_created_at,
        source.record ->> 'cancelled_at' is not null as is_order_cancelled,
        source._loaded_at as loaded_at

    from source
    cross join lateral {{ json_array_rows("source.record -> 'line_items'") }} as line_item

)

select * from lines
