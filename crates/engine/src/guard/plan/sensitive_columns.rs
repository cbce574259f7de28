//! Rule `sensitive-columns`: no expression reads a column the rules tag sensitive, whatever a
//! template says and wherever in the query it would read it (a filter, a join, a subquery).

use datafusion::logical_expr::Expr;

use super::expressions::first_problem;
use super::{Query, Rule};

/// The rule in the list.
pub(super) const RULE: Rule = Rule {
    name: "sensitive-columns",
    check,
};

fn check(query: &Query<'_>) -> Result<(), String> {
    let sensitive = &query.policy.sensitive_columns;
    first_problem(&query.expressions, |expr, _| match expr {
        Expr::Column(c) if sensitive.contains(&c.name) => {
            Some(format!("column `{}` is tagged sensitive", c.name))
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use datafusion::functions_aggregate::expr_fn::count_distinct;
    use datafusion::logical_expr::{JoinType, LogicalPlan, LogicalPlanBuilder, col, lit};

    use super::super::test_plans::*;
    use super::*;

    /// Buyers by `dimension`, over purchases joined to members, filtered by `filter`.
    fn buyers_by(dimension: &str, filter: Expr) -> LogicalPlan {
        purchases()
            .join(
                members().build().unwrap(),
                JoinType::Inner,
                (vec!["purchases.member_key"], vec!["members.member_key"]),
                None,
            )
            .unwrap()
            .filter(filter)
            .unwrap()
            .aggregate(
                vec![col(dimension)],
                vec![count_distinct(col("purchases.member_key")).alias("buyers")],
            )
            .and_then(LogicalPlanBuilder::build)
            .unwrap()
    }

    /// Buyers by `dimension`, with `gender` tagged sensitive.
    fn gender_sensitive(dimension: &str) -> crate::guard::Policy {
        let mut policy = policy(&[dimension], &["buyers"]);
        policy.sensitive_columns.insert("gender".into());
        policy
    }

    #[test]
    fn other_columns_may_be_read() {
        let plan = buyers_by("prefecture", col("age_band").not_eq(lit("10s")));
        accepted(&plan, &gender_sensitive("prefecture"));
    }

    #[test]
    fn a_sensitive_column_is_refused_wherever_it_is_read() {
        let plan = buyers_by("gender", lit(true));
        let refusal = refused_by(RULE.name, &plan, &gender_sensitive("gender"));
        assert!(
            refusal.contains("`gender` is tagged sensitive"),
            "{refusal}"
        );

        let plan = buyers_by("prefecture", col("gender").eq(lit("f")));
        let refusal = refused_by(RULE.name, &plan, &gender_sensitive("prefecture"));
        assert!(
            refusal.contains("`gender` is tagged sensitive"),
            "{refusal}"
        );
    }
}
