{#-
  The order lines of the contacts this run recomputes (macros/contact_order_lines.sql):
  lines of their orders not cancelled, placed up to the reference time. Rebuilt on every
  run; on a first run int_affected_contacts lists every contact. A full refresh leaves it
  empty: every per-contact model is then built whole and reads the orders-lines join
  itself, not this (at 1M contacts it would cost ~5 s of CPU for 3.8M rows nobody reads).
-#}
{{ config(materialized='table') }}
-- depends_on: {{ ref('int_affected_contacts') }}
select * from ({{ contact_order_lines_query(affected_only=true) }}) as order_lines
{% if full_refresh() %} where 1 = 0 {% endif %}
