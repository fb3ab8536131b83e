{#-
  Orders matched to the contact that owns their normalised email; unmatched orders drop out
  (macros/contact_order_lines.sql).
-#}
{{ config(
    materialized='incremental',
    incremental_strategy='affected_contacts',
) }}
-- depends_on: {{ ref('int_affected_contacts') }}
{{ contact_orders_query(affected_only=is_incremental()) }}
