{#-
  The order lines the per-contact models read: lines of orders not cancelled and placed up
  to the reference time, with the contact that owns the order's email. In an incremental
  run, the slice int_identity__contact_order_lines holds the recomputed contacts' lines: one
  scan of every order and every order line per run, instead of one per model that reads
  them (~0.35 s of DuckDB time each at 1M contacts). A model built whole (first run, full
  refresh, unit tests) reads every contact's lines from the same query.

  Orders reach their contact as in int_identity__contact_orders (by normalised email through
  int_identity__contact_emails), not through that model: the slice and the models reading it
  need not wait for it and its tests (~0.5 s of an incremental run at 1M contacts).
-#}
{% macro contact_order_lines_query(affected_only) -%}
    select
        order_lines.order_line_id,
        orders.order_id,
        identity.contact_id,
        order_lines.product_id,
        orders.created_at

    from {{ ref('stg_shop__orders') }} as orders
    inner join {{ ref('int_identity__contact_emails') }} as identity
        on orders.email_key = identity.email_key
    inner join {{ ref('stg_shop__order_lines') }} as order_lines
        on orders.order_id = order_lines.order_id
    where
        not orders.is_cancelled
        and orders.created_at <= {{ as_of() }}
    {%- if affected_only %}
        and identity.contact_id in {{ affected_contacts() }}
    {%- endif %}
{%- endmacro %}

{#-
  As a subquery for the model being built: the slice in an incremental run, narrowed to
  int_affected_contacts (a slice an earlier run left adds nothing); otherwise every
  contact's lines. The model needs `-- depends_on: {{ ref('int_identity__contact_order_lines') }}`.
-#}
{% macro contact_order_lines() -%}
    {%- if is_incremental() -%}
        (
            select * from {{ ref('int_identity__contact_order_lines') }}
            where contact_id in {{ affected_contacts() }}
        )
    {%- else -%}
        ({{ contact_order_lines_query(affected_only=false) }})
    {%- endif -%}
{%- endmacro %}
