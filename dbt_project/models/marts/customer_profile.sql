{#-
  One row per CRM contact (not archived): who they are and what presend knows about their
  orders, engagement and cart. Unknown values stay null here; esp_merge_fields applies the
  configured defaults. The snapshot customer_profile_snapshot keeps its history.
-#}
{{ config(
    materialized='incremental',
    incremental_strategy='affected_contacts',
    on_schema_change='fail',
) }}
-- depends_on: {{ ref('int_affected_contacts') }}
with

contacts as (

    select * from {{ ref('stg_crm__contacts') }}
    {% if is_incremental() %} where contact_id in {{ affected_contacts() }} {% endif %}

),

identity as (

    select * from {{ ref('int_identity__contact_emails') }}
    {% if is_incremental() %} where contact_id in {{ affected_contacts() }} {% endif %}

),

order_facts as (

    select * from {{ ref('int_order_facts') }}
    {% if is_incremental() %} where contact_id in {{ affected_contacts() }} {% endif %}

),

favorite as (

    select * from {{ ref('int_engagement__favorite_category') }}
    {% if is_incremental() %} where contact_id in {{ affected_contacts() }} {% endif %}

),

send_hours as (

    select * from {{ ref('int_engagement__send_hours') }}
    {% if is_incremental() %} where contact_id in {{ affected_contacts() }} {% endif %}

),

cart as (

    select * from {{ ref('int_cart_state') }}
    {% if is_incremental() %} where contact_id in {{ affected_contacts() }} {% endif %}

),

-- Cast to the types the model's contract declares (customer_profile.yml), on every warehouse.
profile as (

    select
        cast(contacts.contact_id as {{ dbt.type_string() }}) as contact_id,
        cast(contacts.email as {{ dbt.type_string() }}) as email,
        cast(contacts.first_name as {{ dbt.type_string() }}) as first_name,
        cast(contacts.last_name as {{ dbt.type_string() }}) as last_name,
        cast(contacts.loyalty_tier as {{ dbt.type_string() }}) as loyalty_tier,
        cast(contacts.time_zone as {{ dbt.type_string() }}) as time_zone,
        cast(contacts.has_marketing_consent as {{ dbt.type_boolean() }}) as has_marketing_consent,
        coalesce({{ is_valid_email('contacts.email') }}, false) as has_valid_email,
        identity.contact_id is not null as owns_email,
        cast(coalesce(order_facts.order_count, 0) as {{ dbt.type_bigint() }}) as order_count,
        cast(coalesce(order_facts.lifetime_value, 0) as decimal(18, 2)) as lifetime_value,
        cast(order_facts.last_order_date as date) as last_order_date,
        cast(
            {{ favorite_or_best_selling_category('favorite.favorite_category') }}
            as {{ dbt.type_string() }}
        ) as favorite_category,
        favorite.favorite_category is not null as is_favorite_category_engaged,
        cast(send_hours.best_send_hour as {{ dbt.type_int() }}) as best_send_hour,
        cast(cart.cart_item_title as {{ dbt.type_string() }}) as cart_item_title,
        cast(coalesce(cart.cart_item_count, 0) as {{ dbt.type_bigint() }}) as cart_item_count,
        cast(contacts.modified_at as {{ dbt.type_timestamp() }}) as modified_at

    from contacts
    left join identity
        on
            contacts.email = identity.email
            and contacts.contact_id = identity.contact_id
    left join order_facts on identity.contact_id = order_facts.contact_id
    left join favorite on identity.contact_id = favorite.contact_id
    left join send_hours on identity.contact_id = send_hours.contact_id
    left join cart on identity.contact_id = cart.contact_id

),

final as (

    select
        *,
        has_marketing_consent and has_valid_email and owns_email as is_marketable
    from profile

)

select * from final
