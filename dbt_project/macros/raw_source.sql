{#-
  A raw table through source(), or an empty relation of the same shape while the load stage
  has not created it yet (a fresh warehouse that has only synced some streams): the models
  then build with no rows from that stream instead of failing.
-#}
{% macro raw_source(source_name, table_name, cursor_column, payload_column, exists=none) -%}
    {%- set relation = source(source_name, table_name) -%}
    {%- if exists is none -%}
        {%- set exists = not execute or raw_table_exists(relation) -%}
    {%- endif -%}
    {%- if not exists -%}
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

{#-
  Whether the table exists, asked of the warehouse itself. Not adapter.get_relation: dbt
  does not cache the schemas of sources, and a lookup that misses the cache adds the
  schema's tables to the cache one by one, the schema first; a model in another thread
  that looks up a raw table meanwhile finds the schema "cached" and its table not (yet) in
  it, and would build from the empty relation above (dbt-core 1.11, 4 threads: 1 of ~280
  fixture builds; tests/test_dbt_process.py makes the window wide). `exists` skips the
  question when the caller has asked already (raw_tables_existing).
-#}
{% macro raw_table_exists(relation) -%}
    {{ return(raw_tables_existing([relation])[0]) }}
{%- endmacro %}

{#-
  Which of `relations` exist, asked of the warehouse in one query (each query costs dbt
  ~15 ms of Python): a list of booleans in their order.
-#}
{% macro raw_tables_existing(relations) -%}
    {%- if not execute -%}
        {{ return([true] * relations | length) }}
    {%- endif -%}
    {%- set names = [] -%}
    {%- for relation in relations -%}
        {%- do names.append(
            (relation.database ~ '.' ~ relation.schema ~ '.' ~ relation.identifier) | lower) -%}
    {%- endfor -%}
    {%- set found = run_query(
        "select lower(table_catalog || '.' || table_schema || '.' || table_name)"
        ~ " from information_schema.tables where lower(table_catalog || '.' || table_schema"
        ~ " || '.' || table_name) in ('" ~ names | join("', '") ~ "')"
    ).columns[0].values() -%}
    {%- set existing = [] -%}
    {%- for name in names -%}
        {%- do existing.append(name in found) -%}
    {%- endfor -%}
    {{ return(existing) }}
{%- endmacro %}
