//! Rule `metric-bounds`: the most one member can add to each metric in one row is known, so that
//! the guard can clamp each contribution and scale the metric's noise to it. A count of distinct
//! members adds at most 1; any other metric needs the query's declared per-member bound. COUNT
//! of distinct values of any other column has no such bound (one member can bring many values),
//! so it is refused, also when the member key only chooses which values are counted.

use super::lineage::bare_column;
use super::output_shape::OutputMetric;
use super::{MetricShape, Query, Rule};

/// The rule in the list.
pub(super) const RULE: Rule = Rule {
    name: "metric-bounds",
    check,
};

fn check(query: &Query<'_>) -> Result<(), String> {
    metrics(query).map(drop)
}

/// Each declared metric's shape: its aggregate, its per-member bound, and whether it is the count
/// of the row's members itself.
pub(super) fn metrics(query: &Query<'_>) -> Result<Vec<MetricShape>, String> {
    let names = query.policy.metrics.iter();
    names
        .zip(&query.output.metrics)
        .map(|(name, metric)| metric_shape(query, name, metric))
        .collect()
}

fn metric_shape(
    query: &Query<'_>,
    name: &str,
    metric: &OutputMetric<'_>,
) -> Result<MetricShape, String> {
    let input = &query.output.aggregate.input;
    let params = &metric.function.params;
    // What is counted must be the member key itself: a member key that only chooses which
    // values of another column are counted (`CASE WHEN member_key … THEN sku END`) counts those.
    let counts_members = params.distinct
        && params.args.len() == 1
        && query.lineage.yields_member_keys(&params.args[0], input);
    if params.distinct && !counts_members {
        return Err(format!(
            "metric `{name}`: COUNT(DISTINCT …) must count members; distinct values of other \
             columns cannot be bounded per member"
        ));
    }
    let member_count = metric.function.func.name() == "count"
        && counts_members
        && params.filter.is_none()
        && params.args.len() == 1
        && bare_column(&params.args[0], input.schema())
            .is_some_and(|i| query.lineage.members(input).contains(&i));
    let bound = if counts_members {
        1
    } else {
        *query.policy.metric_bounds.get(name).ok_or_else(|| {
            format!(
                "metric `{name}` needs a per-member bound in the query's metric_bounds: one \
                 member may add any amount to it"
            )
        })?
    };
    Ok(MetricShape {
        aggregate: metric.aggregate,
        bound,
        member_count,
    })
}

#[cfg(test)]
mod tests {
    use datafusion::functions_aggregate::expr_fn::{count_distinct, sum};
    use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, col, lit, when};

    use super::super::check_plan;
    use super::super::test_plans::*;
    use super::*;

    fn by_category(metrics: Vec<Expr>) -> LogicalPlan {
        purchases()
            .aggregate(vec![col("category")], metrics)
            .and_then(LogicalPlanBuilder::build)
            .unwrap()
    }

    #[test]
    fn counts_of_members_add_one_and_other_metrics_their_declared_bound() {
        let big_buyers = when(col("amount").gt(lit(10_000)), col("member_key"))
            .end()
            .unwrap();
        let plan = by_category(vec![
            count_distinct(col("member_key")).alias("buyers"),
            count_distinct(big_buyers).alias("big_buyers"),
            sum(col("amount")).alias("amount_yen"),
        ]);
        let mut declared = policy(&["category"], &["buyers", "big_buyers", "amount_yen"]);
        declared.metric_bounds.insert("amount_yen".into(), 30_000);
        let shape = check_plan(&plan, &declared).expect("accepted");
        let bounds: Vec<(u64, bool)> = shape
            .metrics
            .iter()
            .map(|m| (m.bound, m.member_count))
            .collect();
        assert_eq!(bounds, [(1, true), (1, false), (30_000, false)]);
    }

    #[test]
    fn a_metric_without_a_bound_is_refused() {
        let plan = by_category(vec![sum(col("amount")).alias("amount_yen")]);
        let refusal = refused_by(RULE.name, &plan, &policy(&["category"], &["amount_yen"]));
        assert!(refusal.contains("needs a per-member bound"), "{refusal}");
    }

    #[test]
    fn distinct_values_of_another_column_are_refused() {
        let plan = by_category(vec![count_distinct(col("sku")).alias("products")]);
        let mut declared = policy(&["category"], &["products"]);
        // Even with a bound declared: distinct values are not per-member contributions.
        declared.metric_bounds.insert("products".into(), 5);
        let refusal = refused_by(RULE.name, &plan, &declared);
        assert!(refusal.contains("must count members"), "{refusal}");
    }

    #[test]
    fn distinct_values_chosen_by_the_member_key_are_still_values_of_another_column() {
        // The member key only in the condition: the distinct values counted are SKUs, of which
        // one member can bring many, so the count is no count of members.
        let skus_of_members = when(col("member_key").is_not_null(), col("sku"))
            .end()
            .unwrap();
        let plan = by_category(vec![count_distinct(skus_of_members).alias("products")]);
        let refusal = refused_by(RULE.name, &plan, &policy(&["category"], &["products"]));
        assert!(refusal.contains("must count members"), "{refusal}");
        // A choice that yields the member key or nothing still counts members.
        let big_buyers = when(col("amount").gt(lit(10_000)), col("member_key"))
            .otherwise(lit(datafusion::scalar::ScalarValue::Int64(None)))
            .unwrap();
        let plan = by_category(vec![count_distinct(big_buyers).alias("big_buyers")]);
        check_plan(&plan, &policy(&["category"], &["big_buyers"])).expect("accepted");
    }
}
