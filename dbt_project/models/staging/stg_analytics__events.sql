{#- Incremental: the largest input; each run reads only events merged since the last run. -#}
{{ config(
    materialized='incremental',
    unique_key='event_id',
    incremental_strategy='delete+insert',
) }}

with

source as (

    select * from {{ raw_source('analytics', 'events', 'occurred_at', 'record') }}
    {% if is_incremental() %}
        where _loaded_at >= {{ incremental_watermark() }}
    {% endif %}

),

renamed as (

    select
        cast(id as {{ dbt.type_string() }}) as event_id,
        record ->> 'type' as event_type,
        occurred_at,
        {{ normalise_email("record ->> 'email'") }} as email,
        {{ email_key(normalise_email("record ->> 'email'")) }} as email_key,
        cast(record ->> 'product_id' as {{ dbt.type_string() }}) as product_id,
        _loaded_at as loaded_at

    from source

)

select * from renamed
