{#-
  Per product: units sold in orders not cancelled (last 90 days and all time) and its rank
  among the products in stock now, store-wide and within its category. Best sellers are
  ranked by units in the last 90 days, then all time, then product id.
-#}
with

products as (

    select * from {{ ref('stg_shop__products') }}

),

sold as (

    select
        order_lines.product_id,
        sum(
            case
                when order_lines.order_created_at > {{ dbt.dateadd('day', -90, as_of()) }}
                    then order_lines.quantity
                else 0
            end
        ) as units_sold_90d,
        sum(order_lines.quantity) as units_sold

    from {{ ref('stg_shop__order_lines') }} as order_lines
    where
        not order_lines.is_order_cancelled
        and order_lines.order_created_at <= {{ as_of() }}
    group by order_lines.product_id

),

joined as (

    select
        products.product_id,
        products.title,
        products.handle,
        products.category,
        products.price,
        products.is_in_stock,
        coalesce(sold.units_sold_90d, 0) as units_sold_90d,
        coalesce(sold.units_sold, 0) as units_sold

    from products
    left join sold on products.product_id = sold.product_id

),

ranked as (

    select
        *,
        case
            when is_in_stock
                then row_number() over (
                    partition by is_in_stock
                    order by units_sold_90d desc, units_sold desc, product_id asc
                )
        end as in_stock_sales_rank,
        case
            when is_in_stock
                then row_number() over (
                    partition by is_in_stock, category
                    order by units_sold_90d desc, units_sold desc, product_id asc
                )
        end as in_stock_category_sales_rank

    from joined

)

select * from ranked
