//! Rule `allowed-nodes`: the output aggregate's input is built only of scans, filters,
//! projections, aliases, aggregates and joins. Each of these passes the member key on in a way
//! the lineage follows, so every row can be attributed to its member; anything else (a union, a
//! window, a sort or a limit inside a subquery, a row of constants) is refused.

use datafusion::logical_expr::LogicalPlan;

use super::{Query, Rule};

/// The rule in the list.
pub(super) const RULE: Rule = Rule {
    name: "allowed-nodes",
    check,
};

fn check(query: &Query<'_>) -> Result<(), String> {
    for node in query.lineage.nodes() {
        match node {
            LogicalPlan::TableScan(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Projection(_)
            | LogicalPlan::Aggregate(_)
            | LogicalPlan::Join(_) => {}
            other => return Err(format!("`{}` is not allowed in a query", node_name(other))),
        }
    }
    Ok(())
}

/// The kind of a plan node, as DataFusion displays it (`Union`, `Sort`, …).
fn node_name(plan: &LogicalPlan) -> String {
    plan.display()
        .to_string()
        .split(':')
        .next()
        .unwrap_or("node")
        .to_string()
}

#[cfg(test)]
mod tests {
    use datafusion::functions_aggregate::expr_fn::{count, count_distinct};
    use datafusion::logical_expr::{LogicalPlanBuilder, col, lit};

    use super::super::test_plans::*;
    use super::*;

    /// Buyers by category, counted over `input`.
    fn buyers_over(input: LogicalPlanBuilder) -> LogicalPlan {
        input
            .aggregate(
                vec![col("category")],
                vec![count_distinct(col("member_key")).alias("buyers")],
            )
            .and_then(LogicalPlanBuilder::build)
            .unwrap()
    }

    #[test]
    fn a_subquery_of_filters_projections_aliases_and_aggregates_is_allowed() {
        let per_member = purchases()
            .filter(col("amount").gt(lit(0)))
            .unwrap()
            .aggregate(
                vec![col("member_key"), col("category")],
                vec![count(lit(1)).alias("occasions")],
            )
            .unwrap()
            .project(vec![col("member_key"), col("category"), col("occasions")])
            .unwrap()
            .alias("per_member")
            .unwrap();
        accepted(
            &buyers_over(per_member),
            &policy(&["category"], &["buyers"]),
        );
    }

    #[test]
    fn a_union_is_refused() {
        let both = purchases().union(purchases().build().unwrap()).unwrap();
        let refusal = refused_by(
            RULE.name,
            &buyers_over(both),
            &policy(&["category"], &["buyers"]),
        );
        assert!(refusal.contains("`Union` is not allowed"), "{refusal}");
    }

    #[test]
    fn a_sort_or_limit_inside_the_query_is_refused() {
        let sorted = purchases()
            .sort(vec![col("amount").sort(false, true)])
            .unwrap();
        let refusal = refused_by(
            RULE.name,
            &buyers_over(sorted),
            &policy(&["category"], &["buyers"]),
        );
        assert!(refusal.contains("`Sort` is not allowed"), "{refusal}");

        let limited = purchases().limit(0, Some(100)).unwrap();
        let refusal = refused_by(
            RULE.name,
            &buyers_over(limited),
            &policy(&["category"], &["buyers"]),
        );
        assert!(refusal.contains("`Limit` is not allowed"), "{refusal}");
    }
}
