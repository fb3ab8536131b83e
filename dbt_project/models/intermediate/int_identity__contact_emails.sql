{#-
  Identity: which contact owns a normalised email. Orders and events carry only an email, so
  they reach a contact through here. When several CRM contacts share an email, the most
  recently modified one owns it (the ESP keys contacts by email, so only one can).
-#}
with

contacts as (

    select * from {{ ref('stg_crm__contacts') }}
    where email is not null and email <> ''

),

ranked as (

    select
        email,
        contact_id,
        row_number() over (
            partition by email order by modified_at desc, contact_id asc
        ) as email_rank

    from contacts

),

owners as (

    select
        email,
        contact_id

    from ranked
    where email_rank = 1

)

select * from owners
