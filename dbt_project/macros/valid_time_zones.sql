{#- The IANA time zone names the warehouse knows (column `name`). -#}
{% macro valid_time_zones() -%}
    {{ return(adapter.dispatch('valid_time_zones', 'presend')()) }}
{%- endmacro %}

{% macro default__valid_time_zones() -%}
    pg_timezone_names
{%- endmacro %}

{% macro duckdb__valid_time_zones() -%}
    pg_timezone_names()
{%- endmacro %}
