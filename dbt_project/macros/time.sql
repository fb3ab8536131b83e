{#-
  The reference time "now" (UTC, timestamp without time zone). The `as_of` var pins it
  (tests, backfills); by default it is the time of the run.
-#}
{% macro as_of() -%}
    {%- set pinned = var('as_of', none) -%}
    {%- if pinned -%}
        cast('{{ pinned }}' as {{ dbt.type_timestamp() }})
    {%- else -%}
        cast(current_timestamp at time zone 'UTC' as {{ dbt.type_timestamp() }})
    {%- endif -%}
{%- endmacro %}

{#- An ISO 8601 text with an offset (as Shopify sends it) as a UTC timestamp. -#}
{% macro iso_to_utc(column) -%}
    cast(cast({{ column }} as timestamp with time zone) at time zone 'UTC'
        as {{ dbt.type_timestamp() }})
{%- endmacro %}

{#- A UTC timestamp as the local time of an IANA time zone. -#}
{% macro utc_to_local(column, time_zone) -%}
    (({{ column }} at time zone 'UTC') at time zone {{ time_zone }})
{%- endmacro %}

{#-
  Where an incremental staging model resumes: the newest `_loaded_at` it has (inclusive, so
  rows merged in the same instant are never skipped; delete+insert makes the overlap safe).
  Looked up before the model runs and inlined as a literal, so the warehouse can skip the
  raw table's older row groups instead of reading every payload.
-#}
{% macro incremental_watermark() -%}
    {%- set newest = none -%}
    {%- if execute -%}
        {%- set result = run_query('select max(loaded_at) from ' ~ this) -%}
        {%- set newest = result.columns[0].values()[0] -%}
    {%- endif -%}
    {%- if newest is none -%}
        cast('1900-01-01' as {{ dbt.type_timestamp() }})
    {%- else -%}
        cast('{{ newest }}' as {{ dbt.type_timestamp() }})
    {%- endif -%}
{%- endmacro %}
