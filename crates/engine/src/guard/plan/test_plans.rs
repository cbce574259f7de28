//! Plans and policies for the rules' tests, built with DataFusion's `LogicalPlanBuilder` over
//! scans with the safe views' schemas (no session, no data).

use std::collections::{BTreeMap, BTreeSet};

use datafusion::functions_aggregate::expr_fn::count_distinct;
use datafusion::logical_expr::logical_plan::builder::table_scan;
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder, col};

use super::{Policy, check_plan};
use crate::Error;
use crate::views::members_view_schema;

/// A scan of the `members` view.
pub(super) fn members() -> LogicalPlanBuilder {
    table_scan(Some("members"), &members_view_schema(), None).expect("scan")
}

/// A scan of the `purchases` view.
pub(super) fn purchases() -> LogicalPlanBuilder {
    table_scan(Some("purchases"), &crate::tables::purchases::schema(), None).expect("scan")
}

/// `SELECT category, COUNT(DISTINCT member_key) AS buyers FROM purchases GROUP BY category`: a
/// plan every rule accepts under `policy(&["category"], &["buyers"])`.
pub(super) fn buyers_by_category() -> LogicalPlan {
    purchases()
        .aggregate(
            vec![col("category")],
            vec![count_distinct(col("member_key")).alias("buyers")],
        )
        .and_then(LogicalPlanBuilder::build)
        .expect("plan")
}

/// A policy declaring these dimensions and metrics, no metric bound and no sensitive column.
pub(super) fn policy(dimensions: &[&str], metrics: &[&str]) -> Policy {
    Policy {
        k: 10,
        dimensions: dimensions
            .iter()
            .map(|d| (d.to_string(), Vec::new()))
            .collect(),
        metrics: metrics.iter().map(|m| m.to_string()).collect(),
        metric_bounds: BTreeMap::new(),
        sensitive_columns: BTreeSet::new(),
        rows_per_member: 1,
    }
}

/// The refusal `check_plan` makes of `plan`, which must be rule `rule`'s.
pub(super) fn refused_by(rule: &str, plan: &LogicalPlan, policy: &Policy) -> String {
    match check_plan(plan, policy) {
        Err(Error::Guard(refusal)) => {
            assert!(
                refusal.starts_with(&format!("{rule}: ")),
                "refused, but not by `{rule}`: {refusal}"
            );
            refusal
        }
        Err(other) => panic!("not a guard refusal: {other}"),
        Ok(_) => panic!(
            "accepted, where `{rule}` refuses:\n{}",
            plan.display_indent()
        ),
    }
}

/// Checks that every rule accepts `plan`.
pub(super) fn accepted(plan: &LogicalPlan, policy: &Policy) {
    if let Err(refusal) = check_plan(plan, policy) {
        panic!("{refusal}:\n{}", plan.display_indent());
    }
}
