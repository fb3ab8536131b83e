{#-
  The merge fields as one list of text expressions for dbt.concat, separated by '|', so
  fields_hash changes whenever any merge field's value does (the same on every warehouse).
-#}
{% macro merge_field_text(fields) -%}
    {%- set parts = [] -%}
    {%- for field in fields -%}
        {%- do parts.append('cast("' ~ field ~ '" as ' ~ dbt.type_string() ~ ')') -%}
        {%- if not loop.last -%}{%- do parts.append("'|'") -%}{%- endif -%}
    {%- endfor -%}
    {{ return(parts) }}
{%- endmacro %}
