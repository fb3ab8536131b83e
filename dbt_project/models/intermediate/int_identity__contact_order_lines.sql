{#-
  The order lines of the contacts this run recomputes (macros/contact_order_lines.sql):
  lines of their orders not cancelled, placed up to the reference time. Rebuilt on every
  run; on a first run or a full refresh int_affected_contacts lists every contact.
-#}
{{ config(materialized='table') }}
-- depends_on: {{ ref('int_affected_contacts') }}
{{ contact_order_lines_query(affected_only=true) }}
