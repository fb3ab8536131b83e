{#-
  Orders with the contact that owns their normalised email (through
  int_identity__contact_emails), cancelled ones too: int_identity__contact_orders, and what
  int_order_facts and int_identity__contact_order_lines read. They run the query themselves
  rather than read that model, so the per-contact models need not wait for it and its key
  test (~0.5 s of an incremental run at 1M contacts). `affected_only`: only the contacts
  this run recomputes (int_affected_contacts).
-#}
{% macro contact_orders_query(affected_only) -%}
    select
        orders.order_id,
        identity.contact_id,
        orders.created_at,
        orders.is_cancelled,
        orders.total_price,
        orders.refunded_amount,
        orders.total_price - orders.refunded_amount as net_total

    from {{ ref('stg_shop__orders') }} as orders
    inner join {{ ref('int_identity__contact_emails') }} as identity
        on orders.email_key = identity.email_key
    {%- if affected_only %}
    where identity.contact_id in {{ affected_contacts() }}
    {%- endif %}
{%- endmacro %}

{#-
  The order lines the per-contact models read: lines of orders not cancelled and placed up
  to the reference time, with their contact. In an incremental run, the slice
  int_identity__contact_order_lines holds the recomputed contacts' lines: one scan of every
  order and every order line per run, instead of one per model that reads them (~0.35 s of
  DuckDB time each at 1M contacts). A model built whole (first run, full refresh, unit
  tests) reads every contact's lines from the same query.
-#}
{% macro contact_order_lines_query(affected_only) -%}
    select
        order_lines.order_line_id,
        orders.order_id,
        orders.contact_id,
        order_lines.product_id,
        orders.created_at

    from ({{ contact_orders_query(affected_only) }}) as orders
    inner join {{ ref('stg_shop__order_lines') }} as order_lines
        on orders.order_id = order_lines.order_id
    where
        not orders.is_cancelled
        and orders.created_at <= {{ as_of() }}
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

{#- Whether this run is a full refresh (`--full-refresh`): a macro, so unit tests can set it. -#}
{% macro full_refresh() -%}
    {{ return(flags.FULL_REFRESH) }}
{%- endmacro %}
