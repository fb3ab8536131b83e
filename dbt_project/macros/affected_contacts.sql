{#-
  Incremental per-contact models: a run recomputes only the contacts in
  int_affected_contacts (contacts whose inputs changed since the last run). Such a model
  is materialized incremental with this strategy (incremental_strategy='affected_contacts'):
  dbt computes the affected contacts' rows from all their inputs into a temporary table,
  then this deletes their old rows and inserts the new ones, in one transaction. So a
  contact that drops out (no cart any more, consent withdrawn) loses its row.
  The delete comes after the computation, not before it (a pre-hook): while DuckDB saves
  another model's writes to the file (a checkpoint), it lets reads and inserts run but
  makes deletes wait, and the computation is most of a model's time.
-#}
{% macro get_incremental_affected_contacts_sql(arg_dict) -%}
    {%- set target = arg_dict['target_relation'] -%}
    {%- set columns = get_quoted_csv(arg_dict['dest_columns'] | map(attribute='name')) -%}
    delete from {{ target }} where contact_id in {{ affected_contacts() }};
    insert into {{ target }} ({{ columns }})
    select {{ columns }} from {{ arg_dict['temp_relation'] }}
{%- endmacro %}

{#- The affected contacts' ids, as a subquery for `in`. -#}
{% macro affected_contacts() -%}
    (select contact_id from {{ ref('int_affected_contacts') }})
{%- endmacro %}

{#-
  What int_affected_contacts remembers between runs (tables next to it, replaced by its
  post-hooks in the same transaction as its rows): the newest `_loaded_at` of the raw
  tables, the reference time and the config the run used, and int_product_sales as it was;
  and the contacts the snapshot has yet to compare (macros/snapshot_scope.sql).
-#}
{% macro transform_state_relation(suffix) -%}
    {{ return(api.Relation.create(
        database=this.database, schema=this.schema,
        identifier='int_affected_contacts__' ~ suffix)) }}
{%- endmacro %}

{#-
  Post-hook of esp_merge_fields: it has rewritten the affected contacts, which are consumed.
  The list moves to int_affected_contacts__consumed, where the tests of esp_merge_fields
  find the rows this build wrote (`__consumed_contacts__`, macros/tests_scope.sql), and
  int_affected_contacts starts the next run empty.
-#}
{% macro consume_affected_contacts() -%}
    {%- set consumed = transform_state_relation('consumed') -%}
    drop table if exists {{ consumed }};
    create table {{ consumed }} as select contact_id from {{ ref('int_affected_contacts') }};
    delete from {{ ref('int_affected_contacts') }}
{%- endmacro %}

{#-
  A relation of the transform's own schema as it is now in the warehouse, or none while it
  does not exist (not a ref: models read it before it runs; tests, which have no `this`, too).
-#}
{% macro existing_relation(name) -%}
    {{ return(adapter.get_relation(
        database=target.database, schema=target.schema, identifier=name)) }}
{%- endmacro %}

{#-
  Hash of the vars that change merge fields without any data changing, and of the version
  of what the incremental models keep: bump it when a change needs every contact recomputed
  once (2: int_order_facts.products_bought_90d, which int_affected_contacts reads;
  3: int_identity__contact_emails.email_key).
-#}
{% macro transform_config_hash() -%}
    {{ return(local_md5(tojson([
        var('merge_field_defaults', none), var('store_url', none),
        var('engagement_weights', none), 3]))) }}
{%- endmacro %}

{#-
  The previous run's state: a dict (loaded_watermark, as_of, config_hash), or none when a
  run must recompute every contact (no state yet, a table it compares with is missing, or
  the config changed).
-#}
{% macro previous_transform_state() -%}
    {%- if not execute or not is_incremental() -%}{{ return(none) }}{%- endif -%}
    {%- set state = transform_state_relation('state') -%}
    {%- set needed = [
        state, transform_state_relation('products'),
        existing_relation('int_identity__contact_emails'),
        existing_relation('int_identity__contact_orders'),
        existing_relation('int_order_facts'),
        existing_relation('customer_profile'),
    ] -%}
    {%- for relation in needed -%}
        {%- if relation is none or adapter.get_relation(
                database=relation.database, schema=relation.schema,
                identifier=relation.identifier) is none -%}
            {{ return(none) }}
        {%- endif -%}
    {%- endfor -%}
    {%- set rows = run_query(
        'select loaded_watermark, as_of, config_hash from ' ~ state).rows -%}
    {%- if rows | length != 1 or rows[0][0] is none
            or rows[0][2] != transform_config_hash() -%}
        {{ return(none) }}
    {%- endif -%}
    {{ return({'loaded_watermark': rows[0][0], 'as_of': rows[0][1]}) }}
{%- endmacro %}

{#- Post-hooks of int_affected_contacts: remember this run's state. -#}
{% macro save_transform_state() -%}
    {%- set state = transform_state_relation('state') -%}
    {%- set products = transform_state_relation('products') -%}
    drop table if exists {{ state }};
    create table {{ state }} as
    select
        max(loaded_at) as loaded_watermark,
        {{ state_as_of() }} as as_of,
        cast('{{ transform_config_hash() }}' as {{ dbt.type_string() }}) as config_hash
    {%- set raw_tables = [
        ('crm', 'crm_contacts', 'lastmodifieddate', 'properties'),
        ('shop', 'shop_orders', 'updated_at', 'record'),
        ('shop', 'shop_products', 'updated_at', 'record'),
        ('analytics', 'events', 'occurred_at', 'record'),
    ] -%}
    {%- set relations = [] -%}
    {%- for source_name, table_name, cursor, payload in raw_tables -%}
        {%- do relations.append(source(source_name, table_name)) -%}
    {%- endfor -%}
    {%- set existing = raw_tables_existing(relations) %}
    from (
        {%- for source_name, table_name, cursor, payload in raw_tables %}
        select max(_loaded_at) as loaded_at
        from {{ raw_source(source_name, table_name, cursor, payload, existing[loop.index0]) }}
            as raw_{{ loop.index }}
        {% if not loop.last %}union all{% endif %}
        {%- endfor %}
    ) as newest;
    drop table if exists {{ products }};
    create table {{ products }} as select * from {{ ref('int_product_sales') }}
{%- endmacro %}

{#-
  The reference time a run's state records: the pinned `as_of`, else when the run started
  (no later than the time any model of the run reads as "now", so the next run's window
  shifts cover everything since).
-#}
{% macro state_as_of() -%}
    {%- set pinned = var('as_of', none) -%}
    cast('{{ pinned or run_started_at.strftime("%Y-%m-%d %H:%M:%S") }}'
        as {{ dbt.type_timestamp() }})
{%- endmacro %}

{#-
  A condition: `column` (a time) lies where a window ending at the reference time gains or
  loses it between the previous run's reference time and this run's: (previous, now], and
  for each (unit, length) of `windows` the same range shifted back by that length.
-#}
{% macro crosses_a_window(column, previous_as_of, windows) -%}
    {%- set earlier = 'least(' ~ previous_as_of ~ ', ' ~ as_of() ~ ')' -%}
    {%- set later = 'greatest(' ~ previous_as_of ~ ', ' ~ as_of() ~ ')' -%}
    (
        ({{ column }} > {{ earlier }} and {{ column }} <= {{ later }})
        {%- for unit, length in windows %}
            or (
                {{ column }} > {{ dbt.dateadd(unit, -length, earlier) }}
                and {{ column }} <= {{ dbt.dateadd(unit, -length, later) }}
            )
        {%- endfor %}
    )
{%- endmacro %}

{#- The store-wide best-selling category (column `category`, one row or none) of a relation
    shaped like int_product_sales: the fallback favourite category. -#}
{% macro best_selling_category(product_sales) -%}
    (
        select category
        from (
            select
                category,
                row_number() over (
                    order by sum(units_sold_90d) desc, sum(units_sold) desc, category asc
                ) as category_rank
            from {{ product_sales }}
            where category is not null
            group by category
            having sum(units_sold) > 0
        ) as ranked_categories
        where category_rank = 1
    )
{%- endmacro %}

{#- A contact's favourite category as customer_profile and customer_recommendations have it:
    the one it engaged with most (`engaged`, from int_engagement__favorite_category; null if
    none), else the store's best-selling category (null before the first sale). -#}
{% macro favorite_or_best_selling_category(engaged) -%}
    coalesce(
        {{ engaged }},
        (select category from {{ best_selling_category(ref('int_product_sales')) }} as best)
    )
{%- endmacro %}

{#- A condition: the product listed at a rank differs between two int_product_sales states. -#}
{% macro product_listing_differs(new, old) -%}
    (
        {%- for column in ['product_id', 'title', 'handle', 'price', 'category'] %}
            {{ new }}.{{ column }} is distinct from {{ old }}.{{ column }}
            {%- if not loop.last %} or{% endif %}
        {%- endfor %}
    )
{%- endmacro %}

{#- Post-hook of stg_crm__contacts: contacts archived in the CRM leave it. -#}
{% macro delete_archived_contacts() -%}
    {%- if is_incremental() -%}
        delete from {{ this }}
        where contact_id in (
            select id
            from {{ raw_source('crm', 'crm_contacts', 'lastmodifieddate', 'properties') }}
                as raw_contacts
            where archived
        )
    {%- endif -%}
{%- endmacro %}
