//! Rule `member-key-use`: the member key may be passed through, grouped on as a bare column
//! inside a subquery, joined on (`one-member-per-row`) and counted, and nothing else. A filter on
//! it, a value computed from it or an aggregate other than COUNT of it would single out members by
//! their pseudonym, or release something of it.

use datafusion::logical_expr::{Expr, LogicalPlan};

use super::expressions::{Site, first_problem};
use super::lineage::Lineage;
use super::{Query, Rule};

/// The rule in the list.
pub(super) const RULE: Rule = Rule {
    name: "member-key-use",
    check,
};

const NOT_FILTERED_ON: &str = "member_key may not be filtered on";

fn check(query: &Query<'_>) -> Result<(), String> {
    for node in query.lineage.nodes() {
        check_node(node, &query.lineage)?;
    }
    first_problem(&query.expressions, |expr, site| {
        aggregate_problem(expr, site, &query.lineage)
    })
}

/// The member key is not filtered on, and projections and GROUP BYs take it as a bare column.
fn check_node(node: &LogicalPlan, lineage: &Lineage<'_>) -> Result<(), String> {
    let computed = |exprs: &[Expr], input: &LogicalPlan| {
        exprs
            .iter()
            .any(|e| !lineage.is_member_key(e, input) && lineage.reads_member_key(e, input))
    };
    match node {
        LogicalPlan::Filter(f) if lineage.reads_member_key(&f.predicate, &f.input) => {
            Err(NOT_FILTERED_ON.into())
        }
        LogicalPlan::Projection(p) if computed(&p.expr, &p.input) => {
            Err("member_key may only be passed through, joined on or counted".into())
        }
        LogicalPlan::Aggregate(a) if computed(&a.group_expr, &a.input) => {
            Err("member_key may only be grouped on as a bare column".into())
        }
        _ => Ok(()),
    }
}

/// Why an aggregate reads the member key other than to count it, if it does.
fn aggregate_problem(expr: &Expr, site: &Site<'_>, lineage: &Lineage<'_>) -> Option<String> {
    let Expr::AggregateFunction(f) = expr else {
        return None;
    };
    let name = f.func.name();
    let reads = |e: &Expr| lineage.reads_member_key(e, site.input);
    if name != "count" && f.params.args.iter().any(reads) {
        Some(format!(
            "member_key may only be counted, not passed to `{name}`"
        ))
    } else if f.params.filter.as_deref().is_some_and(reads) {
        Some(NOT_FILTERED_ON.into())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use datafusion::functions_aggregate::expr_fn::{count, count_distinct, max, sum};
    use datafusion::logical_expr::{ExprFunctionExt, LogicalPlanBuilder, col, lit};

    use super::super::test_plans::*;
    use super::*;

    /// `metric` by category, over purchases passed through `input`.
    fn by_category(input: LogicalPlanBuilder, metric: Expr) -> LogicalPlan {
        input
            .aggregate(vec![col("category")], vec![metric])
            .and_then(LogicalPlanBuilder::build)
            .unwrap()
    }

    fn buyers() -> Expr {
        count_distinct(col("member_key")).alias("buyers")
    }

    #[test]
    fn passed_through_grouped_bare_and_counted_is_allowed() {
        let per_member = purchases()
            .project(vec![col("member_key").alias("who"), col("category")])
            .unwrap()
            .aggregate(
                vec![col("who").alias("member_key"), col("category")],
                vec![count(col("who")).alias("rows")],
            )
            .unwrap();
        let repeat = count(col("member_key"))
            .distinct()
            .filter(col("rows").gt_eq(lit(2)))
            .build()
            .unwrap()
            .alias("repeat_buyers");
        let plan = by_category(per_member, repeat);
        accepted(&plan, &policy(&["category"], &["repeat_buyers"]));
    }

    #[test]
    fn a_filter_on_the_member_key_is_refused() {
        let some = purchases().filter(col("member_key").lt(lit(1000))).unwrap();
        let plan = by_category(some, buyers());
        let refusal = refused_by(RULE.name, &plan, &policy(&["category"], &["buyers"]));
        assert!(refusal.contains("may not be filtered on"), "{refusal}");

        let counted_if = count(col("amount"))
            .filter(col("member_key").lt(lit(1000)))
            .build()
            .unwrap()
            .alias("purchases");
        let plan = by_category(purchases(), counted_if);
        let refusal = refused_by(RULE.name, &plan, &policy(&["category"], &["purchases"]));
        assert!(refusal.contains("may not be filtered on"), "{refusal}");
    }

    #[test]
    fn a_value_computed_from_the_member_key_is_refused() {
        let shifted = purchases()
            .project(vec![
                col("member_key"),
                (col("member_key") + lit(1)).alias("next"),
                col("category"),
            ])
            .unwrap();
        let plan = by_category(shifted, buyers());
        let refusal = refused_by(RULE.name, &plan, &policy(&["category"], &["buyers"]));
        assert!(refusal.contains("only be passed through"), "{refusal}");

        let halves = purchases()
            .aggregate(
                vec![
                    col("member_key"),
                    (col("member_key") % lit(2)).alias("half"),
                ],
                vec![max(col("category")).alias("category")],
            )
            .unwrap();
        let plan = by_category(halves, buyers());
        let refusal = refused_by(RULE.name, &plan, &policy(&["category"], &["buyers"]));
        assert!(refusal.contains("grouped on as a bare column"), "{refusal}");
    }

    #[test]
    fn the_member_key_is_only_counted() {
        let plan = by_category(purchases(), sum(col("member_key")).alias("keys"));
        let refusal = refused_by(RULE.name, &plan, &policy(&["category"], &["keys"]));
        assert!(refusal.contains("not passed to `sum`"), "{refusal}");
    }
}
