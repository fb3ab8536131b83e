{#-
  Up to three recommended products per contact, ranked: only products in stock now, never
  one the contact bought in the last 90 days, products of the favourite category first (by
  sales rank), then the store's best sellers in stock. A contact who bought n products
  recently can lose at most n candidates from each list, so the top 3 + n of each suffice.
-#}
{{ config(
    materialized='incremental',
    incremental_strategy='affected_contacts',
    on_schema_change='fail',
) }}
-- depends_on: {{ ref('int_affected_contacts') }}
-- depends_on: {{ ref('int_identity__contact_order_lines') }}
with

contacts as (

    select contact_id from {{ ref('stg_crm__contacts') }}
    {% if is_incremental() %} where contact_id in {{ affected_contacts() }} {% endif %}

),

favorite as (

    select * from {{ ref('int_engagement__favorite_category') }}
    {% if is_incremental() %} where contact_id in {{ affected_contacts() }} {% endif %}

),

-- Every contact of customer_profile with its favorite_category, as customer_profile has it,
-- read from the same models rather than from customer_profile: so this builds beside it,
-- not after it.
profiles as (

    select
        contacts.contact_id,
        {{ favorite_or_best_selling_category('favorite.favorite_category') }}
            as favorite_category

    from contacts
    left join favorite on contacts.contact_id = favorite.contact_id

),

products as (

    select * from {{ ref('int_product_sales') }}
    where is_in_stock

),

bought as (

    select distinct
        contact_id,
        product_id

    from {{ contact_order_lines() }} as order_lines
    where created_at > {{ dbt.dateadd('day', -90, as_of()) }}

),

bought_counts as (

    select
        profiles.contact_id,
        profiles.favorite_category,
        count(bought.product_id) as bought_count

    from profiles
    left join bought on profiles.contact_id = bought.contact_id
    group by profiles.contact_id, profiles.favorite_category

),

favorite_category_candidates as (

    select
        bought_counts.contact_id,
        products.product_id,
        1 as priority,
        products.in_stock_category_sales_rank as priority_rank

    from bought_counts
    inner join products
        on
            bought_counts.favorite_category = products.category
            and products.in_stock_category_sales_rank <= 3 + bought_counts.bought_count

),

best_seller_candidates as (

    select
        bought_counts.contact_id,
        products.product_id,
        2 as priority,
        products.in_stock_sales_rank as priority_rank

    from bought_counts
    inner join products
        on products.in_stock_sales_rank <= 3 + bought_counts.bought_count

),

candidates as (

    select * from favorite_category_candidates
    union all
    select * from best_seller_candidates

),

not_bought as (

    select
        candidates.contact_id,
        candidates.product_id,
        min(candidates.priority * 1000000000 + candidates.priority_rank) as sort_key

    from candidates
    left join bought
        on
            candidates.contact_id = bought.contact_id
            and candidates.product_id = bought.product_id
    where bought.product_id is null
    group by candidates.contact_id, candidates.product_id

),

ranked as (

    select
        contact_id,
        product_id,
        row_number() over (
            partition by contact_id order by sort_key asc, product_id asc
        ) as recommendation_rank

    from not_bought

),

recommendations as (

    select
        {{ dbt.concat([
            'ranked.contact_id', "'-'",
            'cast(ranked.recommendation_rank as ' ~ dbt.type_string() ~ ')'
        ]) }} as recommendation_id,
        cast(ranked.contact_id as {{ dbt.type_string() }}) as contact_id,
        cast(ranked.recommendation_rank as {{ dbt.type_bigint() }}) as recommendation_rank,
        cast(ranked.product_id as {{ dbt.type_string() }}) as product_id,
        cast(products.title as {{ dbt.type_string() }}) as title,
        {{ dbt.concat([
            "'" ~ var('store_url').rstrip('/') ~ "/products/'", 'products.handle'
        ]) }} as url,
        cast(products.price as decimal(18, 2)) as price,
        cast(products.category as {{ dbt.type_string() }}) as category

    from ranked
    inner join products on ranked.product_id = products.product_id
    where ranked.recommendation_rank <= 3

)

select * from recommendations
