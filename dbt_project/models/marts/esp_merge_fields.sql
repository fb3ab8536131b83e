{#-
  The output contract: one row per contact who may receive marketing email (consent given,
  valid email, owner of that email), with the ESP's merge fields. No merge field is null:
  unknown values take the defaults configured in config/presend.yml (merge_field_defaults),
  or the empty value the contract names (0, 0.00, empty string).
  Incremental: a run rewrites only the contacts in int_affected_contacts, then consumes that
  list (the next run starts from its own changes; its tests read the consumed list).
-#}
{{ config(
    materialized='incremental',
    incremental_strategy='affected_contacts',
    on_schema_change='fail',
    post_hook="{{ consume_affected_contacts() }}",
) }}
-- depends_on: {{ ref('int_affected_contacts') }}
{% set merge_fields = [
    'EMAIL', 'FIRST_NAME', 'LOYALTY_TIER', 'ORDER_COUNT', 'LIFETIME_VALUE',
    'LAST_ORDER_DATE', 'FAVORITE_CATEGORY',
    'REC_1_TITLE', 'REC_1_URL', 'REC_1_PRICE',
    'REC_2_TITLE', 'REC_2_URL', 'REC_2_PRICE',
    'REC_3_TITLE', 'REC_3_URL', 'REC_3_PRICE',
    'CART_ITEM_TITLE', 'CART_ITEM_COUNT', 'BEST_SEND_HOUR',
] -%}
with

profiles as (

    select * from {{ ref('customer_profile') }}
    where is_marketable
    {% if is_incremental() %}
        and contact_id in {{ affected_contacts() }}
    {% endif %}

),

recommendations as (

    select
        contact_id,
        {%- for n in range(1, 4) %}
            max(case when recommendation_rank = {{ n }} then title end) as rec_{{ n }}_title,
            max(case when recommendation_rank = {{ n }} then url end) as rec_{{ n }}_url,
            max(case when recommendation_rank = {{ n }} then price end) as rec_{{ n }}_price
            {%- if not loop.last %},{% endif %}
        {%- endfor %}

    from {{ ref('customer_recommendations') }}
    {% if is_incremental() %} where contact_id in {{ affected_contacts() }} {% endif %}
    group by contact_id

),

merge_fields as (

    select
        cast(profiles.contact_id as {{ dbt.type_string() }}) as contact_id,
        cast(profiles.email as {{ dbt.type_string() }}) as "EMAIL",
        cast(
            coalesce(profiles.first_name, {{ merge_field_default('FIRST_NAME') }})
            as {{ dbt.type_string() }}
        ) as "FIRST_NAME",
        cast(
            coalesce(profiles.loyalty_tier, {{ merge_field_default('LOYALTY_TIER') }})
            as {{ dbt.type_string() }}
        ) as "LOYALTY_TIER",
        cast(profiles.order_count as integer) as "ORDER_COUNT",
        cast(profiles.lifetime_value as decimal(18, 2)) as "LIFETIME_VALUE",
        cast(
            coalesce(cast(profiles.last_order_date as {{ dbt.type_string() }}), '')
            as {{ dbt.type_string() }}
        ) as "LAST_ORDER_DATE",
        cast(coalesce(profiles.favorite_category, '') as {{ dbt.type_string() }})
            as "FAVORITE_CATEGORY",
        {%- for n in range(1, 4) %}
            cast(coalesce(recommendations.rec_{{ n }}_title, '') as {{ dbt.type_string() }})
                as "REC_{{ n }}_TITLE",
            cast(coalesce(recommendations.rec_{{ n }}_url, '') as {{ dbt.type_string() }})
                as "REC_{{ n }}_URL",
            cast(
                coalesce(
                    cast(
                        cast(recommendations.rec_{{ n }}_price as decimal(18, 2))
                        as {{ dbt.type_string() }}
                    ),
                    ''
                ) as {{ dbt.type_string() }}
            ) as "REC_{{ n }}_PRICE",
        {%- endfor %}
        cast(coalesce(profiles.cart_item_title, '') as {{ dbt.type_string() }})
            as "CART_ITEM_TITLE",
        cast(profiles.cart_item_count as integer) as "CART_ITEM_COUNT",
        cast(
            coalesce(
                profiles.best_send_hour,
                cast({{ merge_field_default('BEST_SEND_HOUR') }} as integer)
            ) as integer
        ) as "BEST_SEND_HOUR"

    from profiles
    left join recommendations on profiles.contact_id = recommendations.contact_id

),

hashed as (

    select
        *,
        cast(
            {{ dbt.hash(dbt.concat(merge_field_text(merge_fields))) }}
            as {{ dbt.type_string() }}
        ) as fields_hash
    from merge_fields

)

select * from hashed
