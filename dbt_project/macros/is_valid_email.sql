{#- An address ESPs accept: one @, no spaces, a dot in the domain. -#}
{% macro is_valid_email(column) -%}
    {{ return(adapter.dispatch('is_valid_email', 'presend')(column)) }}
{%- endmacro %}

{% macro default__is_valid_email(column) -%}
    regexp_matches({{ column }}, '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$')
{%- endmacro %}

{% macro postgres__is_valid_email(column) -%}
    ({{ column }} ~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$')
{%- endmacro %}
