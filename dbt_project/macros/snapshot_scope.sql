{#-
  Snapshots whose meta sets `scope: unsnapshotted_contacts` (customer_profile_snapshot)
  compare only the contacts recomputed since the snapshot last ran, on both sides: their
  rows of the source and their current versions in the snapshot. Every other contact's
  profile row is the one an earlier run wrote and the snapshot already compared, so
  comparing it again finds nothing (at 1M contacts that cost an incremental run ~1.8 s).
  A recomputed contact missing from the source (archived, say) is still closed by
  hard_deletes: only recomputed contacts can leave. A full refresh lists every contact.
  dbt's own staging query does the work; this only narrows what it reads.

  The list: int_affected_contacts' post-hook adds each run's contacts to
  int_affected_contacts__unsnapshotted; the snapshot's post-hook empties it, in the same
  transaction as its changes. A run that leaves the snapshot out (`dbt run`) or fails
  before it keeps the list for the next snapshot.
-#}
{% macro duckdb__snapshot_staging_table(strategy, source_sql, target_relation) -%}
    {{ scoped_snapshot_staging_table(strategy, source_sql, target_relation) }}
{%- endmacro %}

{% macro postgres__snapshot_staging_table(strategy, source_sql, target_relation) -%}
    {{ scoped_snapshot_staging_table(strategy, source_sql, target_relation) }}
{%- endmacro %}

{% macro scoped_snapshot_staging_table(strategy, source_sql, target_relation) -%}
    {%- set unsnapshotted = existing_relation(unsnapshotted_contacts().identifier) -%}
    {%- if model.config.get('meta', {}).get('scope') != 'unsnapshotted_contacts'
            or unsnapshotted is none or strategy.hard_deletes == 'new_record' -%}
        {{ return(dbt.default__snapshot_staging_table(strategy, source_sql, target_relation)) }}
    {%- endif -%}
    {%- set in_scope -%}
        {{ strategy.unique_key }} in (select contact_id from {{ unsnapshotted }})
    {%- endset -%}
    {%- set scoped_source -%}
        select * from ({{ source_sql }}) as snapshot_source where {{ in_scope }}
    {%- endset -%}
    {%- set scoped_target -%}
        (select * from {{ target_relation }} where {{ in_scope }}) as scoped_snapshot
    {%- endset -%}
    {{ return(dbt.default__snapshot_staging_table(strategy, scoped_source, scoped_target)) }}
{%- endmacro %}

{#-
  The list, in the transform's schema. Hooks name it directly, not through dbt's relation
  cache: the first run creates it after the cache was read.
-#}
{% macro unsnapshotted_contacts() -%}
    {{ return(api.Relation.create(
        database=target.database, schema=target.schema,
        identifier='int_affected_contacts__unsnapshotted')) }}
{%- endmacro %}

{% macro create_unsnapshotted_contacts() -%}
    create table if not exists {{ unsnapshotted_contacts() }} (contact_id {{ dbt.type_string() }})
{%- endmacro %}

{#- Post-hook of int_affected_contacts: its contacts await the snapshot. -#}
{% macro add_unsnapshotted_contacts() -%}
    {{ create_unsnapshotted_contacts() }};
    insert into {{ unsnapshotted_contacts() }}
    select contact_id from {{ this }}
    where contact_id not in (select contact_id from {{ unsnapshotted_contacts() }})
{%- endmacro %}

{#- Post-hook of the snapshot: every contact on the list has been compared. -#}
{% macro clear_unsnapshotted_contacts() -%}
    {{ create_unsnapshotted_contacts() }};
    delete from {{ unsnapshotted_contacts() }}
{%- endmacro %}
