{#-
  A primary key: never null and never shared by two rows (dbt's not_null and unique in one
  query, so one test per key instead of two). Fails with one row per null or repeated key.
  A `where` config scopes it like unique (macros/tests_scope.sql).
-#}
{% test primary_key(model, column_name) %}

select
    {{ column_name }} as key_value,
    count(*) as n_records

from {{ model }}
group by {{ column_name }}
having {{ column_name }} is null or count(*) > 1

{% endtest %}
