{#-
  The contacts whose merge fields an incremental run must recompute (see the yml): their
  CRM row, orders or events changed since the last run, an email they share changed owner,
  a window (90 days, 180 days, 72 hours) gained or lost one of their events or orders, a
  product they engaged with changed category or title, or a best-seller list their
  recommendations draw on changed. Kept until esp_merge_fields has consumed them (its
  post-hook empties this table), so a failed run is caught up by the next one.
  Without a previous state (first run, full refresh, changed config) it lists every contact.
-#}
{{ config(
    materialized='incremental',
    unique_key='contact_id',
    incremental_strategy='delete+insert',
    post_hook=["{{ save_transform_state() }}", "{{ add_unsnapshotted_contacts() }}"],
) }}
-- depends_on: {{ ref('int_product_sales') }}, {{ ref('stg_crm__contacts') }}
-- depends_on: {{ ref('stg_shop__orders') }}, {{ ref('stg_shop__order_lines') }}
-- depends_on: {{ ref('stg_analytics__events') }}
{%- set previous = previous_transform_state() %}
{%- if previous is none %}

    select distinct cast(id as {{ dbt.type_string() }}) as contact_id
    from {{ raw_source('crm', 'crm_contacts', 'lastmodifieddate', 'properties') }} as raw_contacts

{%- else %}
{#-
  Changes since the last run: rows loaded after the newest `_loaded_at` it saw. Strictly
  after: loads and dbt take turns on the warehouse (pool `warehouse`), so every row stamped
  at that instant was there when the last run read it.
-#}
{%- set watermark = "cast('" ~ previous.loaded_watermark ~ "' as " ~ dbt.type_timestamp() ~ ")" %}
{%- set previous_as_of = "cast('" ~ previous.as_of ~ "' as " ~ dbt.type_timestamp() ~ ")" %}
{%- set since_90_days = dbt.dateadd('day', -90, as_of()) %}

with

changed_contacts as (

    select
        cast(id as {{ dbt.type_string() }}) as contact_id,
        {{ email_key(normalise_email("properties ->> 'email'")) }} as email_key

    from {{ raw_source('crm', 'crm_contacts', 'lastmodifieddate', 'properties') }} as raw_contacts
    where _loaded_at > {{ watermark }}

),

previous_owned_emails as (

    select email_key
    from {{ existing_relation('int_identity__contact_emails') }}
    where contact_id in (select contact_id from changed_contacts)

),

-- Each reason its own scan (unions, not `or`): DuckDB pushes a simple filter into the scan
-- and skips the row groups it rules out; an `or` of them is applied after reading every row
-- (~0.6 s of the events at 1M contacts).
changed_orders as (

    select
        order_id,
        email_key

    from {{ ref('stg_shop__orders') }}
    where loaded_at > {{ watermark }}

    union all

    select
        order_id,
        email_key

    from {{ ref('stg_shop__orders') }}
    where {{ crosses_a_window('created_at', previous_as_of, [('day', 90)]) }}

),

previous_order_owners as (

    select contact_id
    from {{ existing_relation('int_identity__contact_orders') }}
    where order_id in (select order_id from changed_orders)

),

product_sales as (

    select * from {{ ref('int_product_sales') }}

),

previous_product_sales as (

    select * from {{ transform_state_relation('products') }}

),

changed_products as (

    select coalesce(product_sales.product_id, previous_product_sales.product_id) as product_id
    from product_sales
    full outer join previous_product_sales
        on product_sales.product_id = previous_product_sales.product_id
    where
        product_sales.product_id is null
        or previous_product_sales.product_id is null
        or product_sales.title is distinct from previous_product_sales.title
        or product_sales.category is distinct from previous_product_sales.category

),

changed_events as (

    select email_key
    from {{ ref('stg_analytics__events') }}
    where loaded_at > {{ watermark }}

    union all

    select email_key
    from {{ ref('stg_analytics__events') }}
    where {{ crosses_a_window(
        'occurred_at', previous_as_of, [('day', 180), ('day', 90), ('hour', 72)]
    ) }}

    union all

    select email_key
    from {{ ref('stg_analytics__events') }}
    where
        occurred_at > {{ since_90_days }}
        and product_id in (select product_id from changed_products)

),

orders_of_changed_products as (

    select orders.email_key
    from {{ ref('stg_shop__orders') }} as orders
    inner join {{ ref('stg_shop__order_lines') }} as order_lines
        on orders.order_id = order_lines.order_id
    where
        orders.created_at > {{ since_90_days }}
        and order_lines.product_id in (select product_id from changed_products)

),

affected_emails as (

    select email_key from changed_contacts
    union
    select email_key from previous_owned_emails
    union
    select email_key from changed_orders
    union
    select email_key from changed_events
    union
    select email_key from orders_of_changed_products

),

{#- Best-seller lists: the first rank (store-wide, per category) whose product changed. -#}
in_stock as (

    select * from product_sales where is_in_stock

),

previous_in_stock as (

    select * from previous_product_sales where is_in_stock

),

store_list_change as (

    select min(
        coalesce(in_stock.in_stock_sales_rank, previous_in_stock.in_stock_sales_rank)
    ) as changed_rank

    from in_stock
    full outer join previous_in_stock
        on in_stock.in_stock_sales_rank = previous_in_stock.in_stock_sales_rank
    where
        {{ product_listing_differs('in_stock', 'previous_in_stock') }}

),

category_list_changes as (

    select
        coalesce(in_stock.category, previous_in_stock.category) as category,
        min(coalesce(
            in_stock.in_stock_category_sales_rank,
            previous_in_stock.in_stock_category_sales_rank
        )) as changed_rank

    from in_stock
    full outer join previous_in_stock
        on
            in_stock.category = previous_in_stock.category
            and in_stock.in_stock_category_sales_rank
            = previous_in_stock.in_stock_category_sales_rank
    where
        {{ product_listing_differs('in_stock', 'previous_in_stock') }}
    group by coalesce(in_stock.category, previous_in_stock.category)

),

previous_profiles as (

    select
        contact_id,
        favorite_category,
        is_favorite_category_engaged

    from {{ existing_relation('customer_profile') }}

),

{#-
  A contact's recommendations read the top 3 + (products bought in 90 days) of a list.
  The count as the last run left it: it differs from now only for contacts whose orders
  changed or crossed the 90-day window, which are affected anyway.
-#}
recently_bought as (

    select
        contact_id,
        products_bought_90d as bought_count

    from {{ existing_relation('int_order_facts') }}

),

shallowest_change as (

    select min(changed_rank) as changed_rank
    from (
        select changed_rank from store_list_change
        union all
        select changed_rank from category_list_changes
    ) as list_changes

),

{#-
  The contacts whose bought count takes them down to the shallowest changed rank of any
  list: the only ones a change below the top 3 can reach (few, unless a top rank changed).
-#}
deep_readers as (

    select
        recently_bought.contact_id,
        recently_bought.bought_count

    from recently_bought
    cross join shallowest_change
    where 3 + recently_bought.bought_count >= shallowest_change.changed_rank

),

{#-
  Every contact reads the top 3 of the store-wide list and of its favourite category's;
  only deep readers read further. So the 1M previous profiles are read whole only when the
  store's top 3 changed, and otherwise meet the categories whose top 3 changed and the deep
  readers (small tables), not every contact's count.
#}
recommendations_changed as (

    select previous_profiles.contact_id
    from previous_profiles
    inner join store_list_change on store_list_change.changed_rank <= 3

    union all

    select previous_profiles.contact_id
    from previous_profiles
    inner join category_list_changes
        on
            previous_profiles.favorite_category = category_list_changes.category
            and category_list_changes.changed_rank <= 3

    union all

    select previous_profiles.contact_id
    from deep_readers
    inner join previous_profiles
        on deep_readers.contact_id = previous_profiles.contact_id
    cross join store_list_change
    left join category_list_changes
        on previous_profiles.favorite_category = category_list_changes.category
    where
        3 + deep_readers.bought_count >= store_list_change.changed_rank
        or 3 + deep_readers.bought_count >= category_list_changes.changed_rank

),

{#- Contacts without engagement take the store's best-selling category. -#}
best_category_change as (

    select 1 as changed
    from {{ best_selling_category('product_sales') }} as best
    full outer join {{ best_selling_category('previous_product_sales') }} as previous_best
        on best.category = previous_best.category
    where best.category is null or previous_best.category is null

),

fallback_category_changed as (

    select previous_profiles.contact_id
    from previous_profiles
    inner join best_category_change on not previous_profiles.is_favorite_category_engaged

),

affected as (

    select contact_id from changed_contacts
    union
    select contact_id from previous_order_owners
    union
    select contact_id from {{ ref('stg_crm__contacts') }}
    where email_key in (select email_key from affected_emails)
    union
    select contact_id from recommendations_changed
    union
    select contact_id from fallback_category_changed

)

select contact_id from affected

{%- endif %}
