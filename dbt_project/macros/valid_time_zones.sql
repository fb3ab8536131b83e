{#- The IANA time zone names the warehouse knows (column `zone_name`), as a subquery. -#}
{% macro valid_time_zones() -%}
    {{ return(adapter.dispatch('valid_time_zones', 'presend')()) }}
{%- endmacro %}

{% macro default__valid_time_zones() -%}
    (select name as zone_name from pg_timezone_names)
{%- endmacro %}

{% macro duckdb__valid_time_zones() -%}
    (select name as zone_name from pg_timezone_names())
{%- endmacro %}
