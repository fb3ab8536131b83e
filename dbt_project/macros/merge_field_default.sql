{#-
  The configured default of a merge field, as a SQL string literal. Defaults live in
  config/presend.yml (merge_field_defaults); presend passes them to dbt as the
  `merge_field_defaults` var, so SQL never hard-codes them.
-#}
{% macro merge_field_default(field) -%}
    {%- set defaults = var('merge_field_defaults', none) -%}
    {%- if defaults is none or field not in defaults -%}
        {{ exceptions.raise_compiler_error(
            "merge field default for " ~ field ~ " is not configured: set merge_field_defaults."
            ~ field ~ " in config/presend.yml (dbt gets it as the merge_field_defaults var)") }}
    {%- endif -%}
    '{{ defaults[field] | replace("'", "''") }}'
{%- endmacro %}
