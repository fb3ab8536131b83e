{#-
  A raw table through source(), or an empty relation of the same shape while the load stage
  has not created it yet (a fresh warehouse that has only synced some streams): the models
  then build with no rows from that stream instead of failing.
-#}
{% macro raw_source(source_name, table_name, cursor_column, payload_column) -%}
    {%- set relation = source(source_name, table_name) -%}
    {%- if execute and adapter.get_relation(
            database=relation.database, schema=relation.schema,
            identifier=relation.identifier) is none -%}
        (
            select
                cast(null as {{ dbt.type_string() }}) as id,
                cast(null as {{ dbt.type_timestamp() }}) as {{ cursor_column }},
                cast(null as json) as {{ payload_column }},
                cast(null as {{ dbt.type_boolean() }}) as archived,
                cast(null as {{ dbt.type_string() }}) as _landing_file,
                cast(null as {{ dbt.type_timestamp() }}) as _loaded_at
            where 1 = 0
        )
    {%- else -%}
        {{ relation }}
    {%- endif -%}
{%- endmacro %}
