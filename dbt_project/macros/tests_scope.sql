{#-
  Data tests that check only what this run wrote. A test's `where` config may name
  (replaced when the test runs, not when the project is parsed):

    __last_transform__     the newest `_loaded_at` the previous transform saw, e.g.
                           where: "_loaded_at > __last_transform__" tests the rows loaded since
    __relation__           the tested relation, e.g. a unique test over every row that shares
                           a key with a new row: "id in (select id from __relation__ where …)"
    __affected_contacts__  a condition: the row's contact_id is one this run recomputes
                           (int_affected_contacts), e.g. where: "__affected_contacts__"
    __consumed_contacts__  a condition: the row's contact_id is one the last build of
                           esp_merge_fields rewrote (its post-hook consumes
                           int_affected_contacts, before its tests run)

  Rows outside are the ones earlier runs wrote and tested, and stay untouched: incremental
  models rewrite a contact's rows, or a loaded row, whole (delete+insert). A run whose tests
  fail does not move either marker (int_affected_contacts keeps its list until
  esp_merge_fields consumes it, and saves the watermark after the staging tests passed),
  so the next run tests those rows again. A full refresh, a first run or a missing state
  tests every row.
-#}
{% macro default__get_where_subquery(relation) -%}
    {%- set where = config.get('where', '') -%}
    {%- if not where -%}
        {{ return(relation) }}
    {%- endif -%}
    {%- set where = where | replace('__relation__', relation) -%}
    {%- if '__last_transform__' in where -%}
        {%- set where = where | replace('__last_transform__', last_transform_watermark()) -%}
    {%- endif -%}
    {%- if '__affected_contacts__' in where -%}
        {%- set where = where | replace('__affected_contacts__', affected_contacts_in_run()) -%}
    {%- endif -%}
    {%- if '__consumed_contacts__' in where -%}
        {%- set where = where | replace(
            '__consumed_contacts__', contacts_in_run('int_affected_contacts__consumed')) -%}
    {%- endif -%}
    {%- set filtered -%}
        (select * from {{ relation }} where {{ where }}) dbt_subquery
    {%- endset -%}
    {{ return(filtered) }}
{%- endmacro %}

{#-
  The previous transform's newest `_loaded_at`, as an expression the test's query reads when
  it runs (no query of its own per test: dbt costs ~15 ms of Python each); before any
  transform, 1900. DuckDB still skips the row groups it rules out, as for a literal.
-#}
{% macro last_transform_watermark() -%}
    {%- set earliest = "cast('1900-01-01' as " ~ dbt.type_timestamp() ~ ")" -%}
    {%- set state = existing_relation('int_affected_contacts__state') -%}
    {%- if not execute or flags.FULL_REFRESH or state is none -%}
        {{ return(earliest) }}
    {%- endif -%}
    {{ return("coalesce((select max(loaded_watermark) from " ~ state ~ "), " ~ earliest ~ ")") }}
{%- endmacro %}

{#- A condition: contact_id is one this run recomputes; every row when unknown. -#}
{% macro affected_contacts_in_run() -%}
    {{ return(contacts_in_run('int_affected_contacts')) }}
{%- endmacro %}

{#- A condition: contact_id is listed in the table `name`; every row when unknown (a full
    refresh, or a table dbt's relation cache does not know: the first run creates it). -#}
{% macro contacts_in_run(name) -%}
    {%- set listed = existing_relation(name) -%}
    {%- if not execute or flags.FULL_REFRESH or listed is none -%}
        {{ return('true') }}
    {%- endif -%}
    {{ return('contact_id in (select contact_id from ' ~ listed ~ ')') }}
{%- endmacro %}
