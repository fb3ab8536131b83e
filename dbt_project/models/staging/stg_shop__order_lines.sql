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

line_items as (

    select
        source.id,
        -- The order's, as in stg_shop__orders: sales per product then need no join of
        -- every line with its order. Read once per order, before its lines fan out.
        {{ iso_to_utc("source.record ->> 'created_at'") }} as order_created_at,
        source.record ->> 'cancelled_at' is not null as is_order_cancelled,
        source._loaded_at,
        {{ json_array_elements("source.record -> 'line_items'") }} as line_item

    from source

),

lines as (

    select
        cast(line_item ->> 'id' as {{ dbt.type_string() }}) as order_line_id,
        cast(id as {{ dbt.type_string() }}) as order_id,
        cast(line_item ->> 'product_id' as {{ dbt.type_string() }}) as product_id,
        line_item ->> 'title' as title,
        cast(line_item ->> 'quantity' as integer) as quantity,
        cast(line_item ->> 'price' as decimal(18, 2)) as price,
        order_created_at,
        is_order_cancelled,
        _loaded_at as loaded_at

    from line_items

)

select * from lines
