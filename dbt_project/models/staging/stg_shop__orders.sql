{#-
  Incremental: parsing order JSON is the expensive part, so each run parses only the orders
  the load stage merged since the last run (`_loaded_at`, inclusive) and replaces them.
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

refunds as (

    select
        source.id as order_id,
        {{ json_array_elements("source.record -> 'refunds'") }} as refund

    from source

),

refund_transactions as (

    select
        order_id,
        {{ json_array_elements("refund -> 'transactions'") }} as refund_transaction

    from refunds

),

refunded as (

    select
        order_id,
        sum(
            case
                when
                    refund_transaction ->> 'kind' = 'refund'
                    and refund_transaction ->> 'status' = 'success'
                    then cast(refund_transaction ->> 'amount' as decimal(18, 2))
                else 0
            end
        ) as refunded_amount

    from refund_transactions
    group by order_id

),

renamed as (

    select
        cast(source.id as {{ dbt.type_string() }}) as order_id,
        {{ normalise_email("source.record ->> 'email'") }} as email,
        {{ email_key(normalise_email("source.record ->> 'email'")) }} as email_key,
        {{ iso_to_utc("source.record ->> 'created_at'") }} as created_at,
        source.updated_at,
        {{ iso_to_utc("source.record ->> 'cancelled_at'") }} as cancelled_at,
        source.record ->> 'cancelled_at' is not null as is_cancelled,
        source.record ->> 'financial_status' as financial_status,
        source.record ->> 'currency' as currency,
        cast(source.record ->> 'total_price' as decimal(18, 2)) as total_price,
        coalesce(refunded.refunded_amount, 0) as refunded_amount,
        source._loaded_at as loaded_at

    from source
    left join refunded on source.id = refunded.order_id

)

select * from renamed
