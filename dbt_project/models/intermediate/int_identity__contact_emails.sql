{#-
  Identity: which contact owns a normalised email. Orders and events carry only an email, so
  they reach a contact through here. When several CRM contacts share an email, the most
  recently modified one owns it (the ESP keys contacts by email, so only one can).
-#}
{{ config(
    materialized='incremental',
    incremental_strategy='affected_contacts',
) }}
-- depends_on: {{ ref('int_affected_contacts') }}
with

contacts as (

    select * from {{ ref('stg_crm__contacts') }}
    where
        email is not null and email <> ''
    {% if is_incremental() %}
        and email in (
            select email from {{ ref('stg_crm__contacts') }}
            where contact_id in {{ affected_contacts() }}
        )
    {% endif %}

),

ranked as (

    select
        email,
        email_key,
        contact_id,
        row_number() over (
            partition by email order by modified_at desc, contact_id asc
        ) as email_rank

    from contacts

),

owners as (

    select
        email,
        email_key,
        contact_id

    from ranked
    where email_rank = 1
    {% if is_incremental() %}
        and contact_id in {{ affected_contacts() }}
    {% endif %}

)

select * from owners
