{#- One row per element of a JSON array (column `value`), for a lateral join. -#}
{% macro json_array_rows(expression) -%}
    {{ return(adapter.dispatch('json_array_rows', 'presend')(expression)) }}
{%- endmacro %}

{% macro default__json_array_rows(expression) -%}
    json_each({{ expression }})
{%- endmacro %}

{% macro postgres__json_array_rows(expression) -%}
    json_array_elements({{ expression }})
{%- endmacro %}

{#- Normalise an email for matching and sending: trimmed, lower-cased. -#}
{% macro normalise_email(column) -%}
    lower(trim({{ column }}))
{%- endmacro %}
