{#-
  Incremental like stg_shop__orders: each run parses only the contacts the load stage merged
  since the last run. A contact archived in the CRM leaves this table (the post-hook).
-#}
{{ config(
    materialized='incremental',
    unique_key='contact_id',
    incremental_strategy='delete+insert',
    post_hook="{{ delete_archived_contacts() }}",
) }}

with

source as (

    select * from {{ raw_source('crm', 'crm_contacts', 'lastmodifieddate', 'properties') }}
    {% if is_incremental() %}
        where _loaded_at >= {{ incremental_watermark() }}
    {% endif %}

),

renamed as (

    select
        id as contact_id,
        {{ normalise_email("properties ->> 'email'") }} as email,
        {{ email_key(normalise_email("properties ->> 'email'")) }} as email_key,
        nullif(trim(properties ->> 'firstname'), '') as first_name,
        nullif(trim(properties ->> 'lastname'), '') as last_name,
        nullif(lower(trim(properties ->> 'loyalty_tier')), '') as loyalty_tier,
        nullif(trim(properties ->> 'time_zone'), '') as time_zone,
        coalesce(lower(properties ->> 'hs_marketable_status') = 'true', false)
            as has_marketing_consent,
        lastmodifieddate as modified_at,
        _loaded_at as loaded_at

    from source

    where not coalesce(archived, false)

)

select * from renamed
