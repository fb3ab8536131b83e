with

source as (

    select * from {{ raw_source('shop', 'shop_products', 'updated_at', 'record') }}

),

product_variants as (

    select
        source.id as product_id,
        {{ json_array_elements("source.record -> 'variants'") }} as variant

    from source

),

variants as (

    select
        product_id,
        cast(variant ->> 'price' as decimal(18, 2)) as price,
        coalesce(cast(variant ->> 'inventory_quantity' as integer), 0) as inventory_quantity

    from product_variants

),

stock as (

    select
        product_id,
        sum(case when inventory_quantity > 0 then inventory_quantity else 0 end)
            as inventory_quantity,
        -- The price a recommendation shows: the cheapest variant one can buy now.
        min(case when inventory_quantity > 0 then price end) as in_stock_price,
        min(price) as min_price

    from variants
    group by product_id

),

renamed as (

    select
        cast(source.id as {{ dbt.type_string() }}) as product_id,
        trim(source.record ->> 'title') as title,
        source.record ->> 'handle' as handle,
        nullif(trim(source.record ->> 'product_type'), '') as category,
        source.record ->> 'status' as status,
        coalesce(stock.inventory_quantity, 0) as inventory_quantity,
        coalesce(stock.in_stock_price, stock.min_price) as price,
        coalesce(source.record ->> 'status' = 'active' and stock.inventory_quantity > 0, false)
            as is_in_stock,
        source.updated_at,
        source._loaded_at as loaded_at

    from source
    left join stock on source.id = stock.product_id

)

select * from renamed
