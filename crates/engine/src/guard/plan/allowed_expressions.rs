//! Rule `allowed-expressions`: only listed expression kinds, scalar functions and aggregates.
//! Each listed one has a known effect on what one member can change in an answer; anything else
//! (a window, a subquery in an expression, ROLLUP's totals, an unlisted function) is refused.

use datafusion::logical_expr::Expr;

use super::expressions::{Place, first_problem};
use super::{Query, Rule};

/// The rule in the list.
pub(super) const RULE: Rule = Rule {
    name: "allowed-expressions",
    check,
};

/// Aggregates a query may output. MIN and MAX release one member's value; AVG and COUNT of
/// distinct non-member values cannot be split into per-member contributions.
const OUTPUT_AGGREGATES: &[&str] = &["count", "sum"];

/// Aggregates allowed inside a query, for per-member intermediate values that are then counted.
const INNER_AGGREGATES: &[&str] = &["count", "sum", "avg", "min", "max"];

/// Scalar functions a query may use. None of them can fail on a row's value: a function that
/// errors on one value (an overflowing `abs`, a failing cast) would answer differently for one
/// member, so it is left out.
const SCALAR_FUNCTIONS: &[&str] = &[
    "date_trunc",
    "date_part",
    "coalesce",
    "nullif",
    "round",
    "floor",
    "ceil",
    "lower",
    "upper",
];

fn check(query: &Query<'_>) -> Result<(), String> {
    first_problem(&query.expressions, |expr, site| problem(expr, site.place))
}

/// The aggregates an expression may call where it sits.
fn aggregates(place: Place) -> &'static [&'static str] {
    match place {
        Place::Row => &[],
        Place::InnerAggregate => INNER_AGGREGATES,
        Place::OutputAggregate => OUTPUT_AGGREGATES,
    }
}

/// Why `expr` itself (not its children) is not allowed where it sits, if it is not.
fn problem(expr: &Expr, place: Place) -> Option<String> {
    match expr {
        Expr::Alias(_)
        | Expr::Column(_)
        | Expr::Literal(..)
        | Expr::BinaryExpr(_)
        | Expr::Like(_)
        | Expr::Not(_)
        | Expr::IsNotNull(_)
        | Expr::IsNull(_)
        | Expr::IsTrue(_)
        | Expr::IsFalse(_)
        | Expr::IsNotTrue(_)
        | Expr::IsNotFalse(_)
        | Expr::Negative(_)
        | Expr::Between(_)
        | Expr::Case(_)
        | Expr::TryCast(_)
        | Expr::InList(_)
        | Expr::Cast(_)
        | Expr::Placeholder(_) => None,
        Expr::ScalarFunction(f) => (!SCALAR_FUNCTIONS.contains(&f.name()))
            .then(|| format!("function `{}` is not allowed", f.name())),
        Expr::AggregateFunction(f) => {
            let name = f.func.name();
            (!aggregates(place).contains(&name))
                .then(|| format!("aggregate `{name}` is not allowed here"))
        }
        Expr::WindowFunction(_) => Some("window functions are not allowed".to_string()),
        Expr::GroupingSet(_) => {
            Some("ROLLUP, CUBE and GROUPING SETS are not allowed: totals leak".to_string())
        }
        Expr::ScalarSubquery(_)
        | Expr::Exists(_)
        | Expr::InSubquery(_)
        | Expr::SetComparison(_)
        | Expr::OuterReferenceColumn(..) => {
            Some("subqueries in expressions are not allowed".to_string())
        }
        other => Some(format!(
            "expression `{}` is not allowed",
            other.variant_name()
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::functions::expr_fn::{abs, date_trunc, lower};
    use datafusion::functions_aggregate::expr_fn::{avg, count_distinct, max, min};
    use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder, col, lit, scalar_subquery};

    use super::super::test_plans::*;
    use super::*;

    /// Buyers by `dimension` (an expression, output as `dimension`), among purchases where
    /// `filter` holds.
    fn buyers_by(dimension: Expr, filter: Expr) -> LogicalPlan {
        purchases()
            .filter(filter)
            .unwrap()
            .aggregate(
                vec![dimension.alias("dimension")],
                vec![count_distinct(col("member_key")).alias("buyers")],
            )
            .and_then(LogicalPlanBuilder::build)
            .unwrap()
    }

    fn by_dimension() -> crate::guard::Policy {
        policy(&["dimension"], &["buyers"])
    }

    #[test]
    fn listed_functions_and_inner_aggregates_are_allowed() {
        let month = date_trunc(lit("month"), col("purchased_at"));
        let filter = lower(col("brand"))
            .eq(lit("sakura"))
            .and(col("quantity").between(lit(1), lit(10)));
        accepted(&buyers_by(month, filter), &by_dimension());

        // AVG, MIN and MAX per member, inside a subquery.
        let per_member = purchases()
            .aggregate(
                vec![col("member_key")],
                vec![
                    avg(col("amount")).alias("mean"),
                    min(col("amount")).alias("least"),
                    max(col("amount")).alias("most"),
                ],
            )
            .unwrap()
            .filter(col("most").gt(col("least")).and(col("mean").gt(lit(100.0))))
            .unwrap()
            .aggregate(
                Vec::<Expr>::new(),
                vec![count_distinct(col("member_key")).alias("buyers")],
            )
            .and_then(LogicalPlanBuilder::build)
            .unwrap();
        accepted(&per_member, &policy(&[], &["buyers"]));
    }

    #[test]
    fn an_unlisted_function_is_refused() {
        let plan = buyers_by(abs(col("quantity")), lit(true));
        let refusal = refused_by(RULE.name, &plan, &by_dimension());
        assert!(
            refusal.contains("function `abs` is not allowed"),
            "{refusal}"
        );
    }

    #[test]
    fn min_is_not_an_output_aggregate() {
        let plan = purchases()
            .aggregate(
                vec![col("category")],
                vec![min(col("quantity")).alias("least")],
            )
            .and_then(LogicalPlanBuilder::build)
            .unwrap();
        let refusal = refused_by(RULE.name, &plan, &policy(&["category"], &["least"]));
        assert!(
            refusal.contains("aggregate `min` is not allowed here"),
            "{refusal}"
        );
    }

    #[test]
    fn a_subquery_in_an_expression_is_refused() {
        let biggest = purchases()
            .aggregate(Vec::<Expr>::new(), vec![max(col("amount"))])
            .and_then(LogicalPlanBuilder::build)
            .unwrap();
        let filter = col("amount").eq(scalar_subquery(Arc::new(biggest)));
        let plan = buyers_by(col("category"), filter);
        let refusal = refused_by(RULE.name, &plan, &by_dimension());
        assert!(refusal.contains("subqueries in expressions"), "{refusal}");
    }
}
