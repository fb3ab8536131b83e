{#-
  Per contact: the category with the highest engagement score in the last 90 days. Ties go
  to the category engaged with most recently, then to the first by name.
-#}
{{ config(
    materialized='incremental',
    incremental_strategy='append',
    pre_hook="{{ delete_affected_contacts() }}",
) }}
-- depends_on: {{ ref('int_affected_contacts') }}
with

scores as (

    select * from {{ ref('int_engagement__category_scores') }}
    {% if is_incremental() %} where contact_id in {{ affected_contacts() }} {% endif %}

),

ranked as (

    select
        contact_id,
        category,
        score,
        row_number() over (
            partition by contact_id
            order by score desc, last_engaged_at desc, category asc
        ) as category_rank

    from scores

),

favorite as (

    select
        contact_id,
        category as favorite_category,
        score as favorite_category_score

    from ranked
    where category_rank = 1

)

select * from favorite
