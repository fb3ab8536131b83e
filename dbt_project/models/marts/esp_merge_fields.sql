{#- One row per contact who may receive marketing email: the ESP's merge fields. -#}
with

contacts as (

    select * from {{ ref('stg_crm__contacts') }}

),

marketable as (

    select *
    from contacts
    where has_marketing_consent and {{ is_valid_email('email') }}

),

merge_fields as (

    select
        contact_id,
        email as "EMAIL",
        coalesce(first_name, {{ merge_field_default('FIRST_NAME') }}) as "FIRST_NAME",
        coalesce(loyalty_tier, {{ merge_field_default('LOYALTY_TIER') }}) as "LOYALTY_TIER"
    from marketable

),

hashed as (

    select
        *,
        {{ dbt.hash(dbt.concat([
            '"EMAIL"', "'|'", '"FIRST_NAME"', "'|'", '"LOYALTY_TIER"'
        ])) }} as fields_hash
    from merge_fields

)

select * from hashed
