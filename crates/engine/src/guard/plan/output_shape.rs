//! Rule `output-shape`: the output is exactly the declared columns, each one of the output
//! aggregate's own columns, renamed at most: a dimension is a GROUP BY expression, a metric an
//! aggregate whose value is a whole number (so that its noise can be exact).
//!
//! The guard computes every released value itself, member by member, from that aggregate, and
//! decides alone which rows are released. Anything a query computes on top of it (a ratio, HAVING,
//! LIMIT, ROLLUP's totals) would escape that protection, so it is refused; a partner derives ratios
//! from released cells. This rule finds the output aggregate every other rule reads, so it runs
//! first, before the list.

use std::collections::BTreeSet;

use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan};

use super::Policy;
use super::lineage::bare_column;

/// The rule's name, which prefixes its refusals.
pub(super) const NAME: &str = "output-shape";

/// The output aggregate of an accepted plan, and how the declared columns map onto it.
pub(super) struct Output<'a> {
    /// The aggregate whose columns are the output.
    pub(super) aggregate: &'a Aggregate,
    /// The projections and sorts between the plan's root and the aggregate, root first: they
    /// compute nothing that is released, but their expressions are still evaluated.
    pub(super) above: Vec<&'a LogicalPlan>,
    /// For each declared dimension, the index of its GROUP BY expression.
    pub(super) dimension_groups: Vec<usize>,
    /// For each declared metric, the aggregate that computes it.
    pub(super) metrics: Vec<OutputMetric<'a>>,
}

/// A declared metric's aggregate.
pub(super) struct OutputMetric<'a> {
    /// Index in the output aggregate's `aggr_expr`.
    pub(super) aggregate: usize,
    /// The aggregate function, without its alias.
    pub(super) function: &'a AggregateFunction,
}

type Verdict<T> = std::result::Result<T, String>;

/// The output of `plan`, or why its shape is refused.
pub(super) fn output<'a>(plan: &'a LogicalPlan, policy: &Policy) -> Verdict<Output<'a>> {
    let declared = policy.output_columns();
    let actual: Vec<String> = plan
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    if actual != declared {
        return Err(format!(
            "output columns {actual:?} differ from the declared dimensions and metrics {declared:?}"
        ));
    }
    let (aggregate, above, columns) = output_aggregate(plan)?;
    if aggregate
        .group_expr
        .iter()
        .any(|g| matches!(g, Expr::GroupingSet(_)))
    {
        return Err("ROLLUP, CUBE and GROUPING SETS are not allowed: totals leak".into());
    }
    let (dimensions, metrics) = columns.split_at(policy.dimensions.len());
    Ok(Output {
        aggregate,
        above,
        dimension_groups: dimension_groups(aggregate, policy, dimensions)?,
        metrics: metrics_of(aggregate, policy, metrics)?,
    })
}

/// The aggregate under `plan`'s projections, sorts and aliases, those nodes, and for each output
/// column the aggregate's column it is.
fn output_aggregate(plan: &LogicalPlan) -> Verdict<(&Aggregate, Vec<&LogicalPlan>, Vec<usize>)> {
    // Output column i is column `columns[i]` of the node being looked at.
    let mut columns: Vec<usize> = (0..plan.schema().fields().len()).collect();
    let mut above = Vec::new();
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Projection(p) => {
                for c in columns.iter_mut() {
                    *c = bare_column(&p.expr[*c], p.input.schema()).ok_or_else(|| {
                        format!(
                            "output column `{}` is computed on top of the aggregates; output the \
                             aggregates themselves (ratios and shares are computed from released \
                             cells)",
                            p.schema.field(*c).name()
                        )
                    })?;
                }
                above.push(node);
                node = &p.input;
            }
            LogicalPlan::Sort(s) => {
                above.push(node);
                node = &s.input;
            }
            LogicalPlan::SubqueryAlias(s) => node = &s.input,
            LogicalPlan::Filter(_) => {
                return Err(
                    "HAVING is not allowed: the guard alone decides which rows are released".into(),
                );
            }
            LogicalPlan::Limit(_) => {
                return Err(
                    "LIMIT is not allowed on the output: every row of the domain is \
                            released or suppressed"
                        .into(),
                );
            }
            LogicalPlan::Aggregate(a) => return Ok((a, above, columns)),
            _ => {
                return Err(
                    "the output must be an aggregate over the safe views (GROUP BY or COUNT)"
                        .into(),
                );
            }
        }
    }
}

/// Each dimension's GROUP BY expression, given the aggregate columns the dimensions are.
fn dimension_groups(
    aggregate: &Aggregate,
    policy: &Policy,
    columns: &[usize],
) -> Verdict<Vec<usize>> {
    let groups = aggregate.group_expr.len();
    for ((name, _), &column) in policy.dimensions.iter().zip(columns) {
        if column >= groups {
            return Err(format!("dimension `{name}` must be a GROUP BY expression"));
        }
    }
    let covered: BTreeSet<usize> = columns.iter().copied().collect();
    if covered.len() != groups || columns.len() != groups {
        return Err(
            "every GROUP BY expression must be output once, as a declared dimension".into(),
        );
    }
    Ok(columns.to_vec())
}

/// Each metric's aggregate, given the aggregate columns the metrics are.
fn metrics_of<'a>(
    aggregate: &'a Aggregate,
    policy: &Policy,
    columns: &[usize],
) -> Verdict<Vec<OutputMetric<'a>>> {
    let groups = aggregate.group_expr.len();
    let mut metrics = Vec::with_capacity(columns.len());
    for (name, &column) in policy.metrics.iter().zip(columns) {
        if column < groups {
            return Err(format!("metric `{name}` must be an aggregate"));
        }
        if !aggregate.schema.field(column).data_type().is_integer() {
            return Err(format!(
                "metric `{name}` must be a whole number (COUNT, or SUM of whole numbers) so that \
                 its noise can be exact"
            ));
        }
        let index = column - groups;
        let mut expr = &aggregate.aggr_expr[index];
        while let Expr::Alias(alias) = expr {
            expr = &alias.expr;
        }
        let Expr::AggregateFunction(function) = expr else {
            return Err(format!("metric `{name}` must be COUNT or SUM"));
        };
        metrics.push(OutputMetric {
            aggregate: index,
            function,
        });
    }
    Ok(metrics)
}

#[cfg(test)]
mod tests {
    use datafusion::functions_aggregate::expr_fn::{avg, count_distinct, sum};
    use datafusion::logical_expr::{Expr, GroupingSet, col, lit};

    use super::super::test_plans::*;
    use super::super::{check_plan, named};
    use super::*;

    fn by_category(aggregates: Vec<Expr>) -> datafusion::logical_expr::LogicalPlanBuilder {
        purchases()
            .aggregate(vec![col("category")], aggregates)
            .unwrap()
    }

    fn buyers() -> Expr {
        count_distinct(col("member_key")).alias("buyers")
    }

    #[test]
    fn renamed_and_sorted_aggregate_columns_are_the_output() {
        let plan = by_category(vec![buyers()])
            .sort(vec![col("buyers").sort(false, true)])
            .unwrap()
            .project(vec![
                col("category").alias("kind"),
                col("buyers").alias("members"),
            ])
            .unwrap()
            .build()
            .unwrap();
        let policy = policy(&["kind"], &["members"]);
        let output = named(NAME, output(&plan, &policy)).expect("accepted");
        assert_eq!(output.dimension_groups, vec![0]);
        assert_eq!(output.metrics[0].aggregate, 0);
        assert_eq!(output.above.len(), 2);
        check_plan(&plan, &policy).expect("accepted by every rule");
    }

    #[test]
    fn output_columns_must_be_the_declared_ones() {
        let plan = buyers_by_category();
        let refusal = refused_by(NAME, &plan, &policy(&["category"], &["members"]));
        assert!(refusal.contains("differ from the declared"), "{refusal}");
    }

    #[test]
    fn nothing_is_computed_on_top_of_the_aggregates() {
        let ratio = by_category(vec![buyers(), sum(col("amount")).alias("amount")])
            .project(vec![
                col("category"),
                (col("amount") / col("buyers")).alias("per_buyer"),
            ])
            .unwrap()
            .build()
            .unwrap();
        let refusal = refused_by(NAME, &ratio, &policy(&["category"], &["per_buyer"]));
        assert!(
            refusal.contains("computed on top of the aggregates"),
            "{refusal}"
        );

        let having = by_category(vec![buyers()])
            .having(col("buyers").gt(lit(10)))
            .unwrap()
            .build()
            .unwrap();
        let refusal = refused_by(NAME, &having, &policy(&["category"], &["buyers"]));
        assert!(refusal.contains("HAVING"), "{refusal}");

        let limit = by_category(vec![buyers()])
            .limit(0, Some(3))
            .unwrap()
            .build()
            .unwrap();
        let refusal = refused_by(NAME, &limit, &policy(&["category"], &["buyers"]));
        assert!(refusal.contains("LIMIT"), "{refusal}");
    }

    #[test]
    fn the_output_must_be_an_aggregate() {
        let rows = purchases()
            .project(vec![col("category")])
            .unwrap()
            .build()
            .unwrap();
        let refusal = refused_by(NAME, &rows, &policy(&["category"], &[]));
        assert!(refusal.contains("must be an aggregate"), "{refusal}");
    }

    #[test]
    fn dimensions_are_group_by_expressions_and_metrics_whole_aggregates() {
        // A dimension that is an aggregate, and a metric that is a group.
        let swapped = by_category(vec![buyers()])
            .project(vec![col("buyers"), col("category")])
            .unwrap()
            .build()
            .unwrap();
        let refusal = refused_by(NAME, &swapped, &policy(&["buyers"], &["category"]));
        assert!(
            refusal.contains("must be a GROUP BY expression"),
            "{refusal}"
        );

        // A GROUP BY expression left out of the output.
        let hidden = purchases()
            .aggregate(vec![col("category"), col("brand")], vec![buyers()])
            .unwrap()
            .project(vec![col("category"), col("buyers")])
            .unwrap()
            .build()
            .unwrap();
        let refusal = refused_by(NAME, &hidden, &policy(&["category"], &["buyers"]));
        assert!(refusal.contains("output once"), "{refusal}");

        let fractional = by_category(vec![avg(col("amount")).alias("mean")])
            .build()
            .unwrap();
        let refusal = refused_by(NAME, &fractional, &policy(&["category"], &["mean"]));
        assert!(refusal.contains("whole number"), "{refusal}");
    }

    #[test]
    fn totals_are_not_output() {
        let rollup = Expr::GroupingSet(GroupingSet::Rollup(vec![col("category")]));
        let plan = purchases()
            .aggregate(vec![rollup], vec![buyers()])
            .unwrap()
            .project(vec![col("category"), col("buyers")])
            .unwrap()
            .build()
            .unwrap();
        let refusal = refused_by(NAME, &plan, &policy(&["category"], &["buyers"]));
        assert!(refusal.contains("ROLLUP"), "{refusal}");
    }
}
