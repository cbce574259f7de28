//! Rule `safe-views`: a query reads only the safe views, and reads them whole. The views show only
//! the question's audience and no identifying column; a scan of anything else, or a scan the plan
//! has already filtered or limited, would not be the view the guard protects.

use datafusion::logical_expr::LogicalPlan;

use super::{Query, Rule};
use crate::views::SAFE_VIEWS;

/// The rule in the list.
pub(super) const RULE: Rule = Rule {
    name: "safe-views",
    check,
};

fn check(query: &Query<'_>) -> Result<(), String> {
    for node in query.lineage.nodes() {
        let LogicalPlan::TableScan(scan) = node else {
            continue;
        };
        let name = scan.table_name.table();
        if !SAFE_VIEWS.contains(&name) {
            return Err(format!("table `{name}` is not a safe view"));
        }
        if !scan.filters.is_empty() || scan.fetch.is_some() {
            return Err("pre-filtered scans are not allowed".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use datafusion::functions_aggregate::expr_fn::count_distinct;
    use datafusion::logical_expr::logical_plan::builder::{
        table_scan, table_scan_with_filter_and_fetch,
    };
    use datafusion::logical_expr::{JoinType, LogicalPlanBuilder, col, lit};

    use super::super::test_plans::*;
    use super::*;
    use crate::tables;

    fn buyers_by_category(scan: LogicalPlanBuilder) -> datafusion::logical_expr::LogicalPlan {
        scan.aggregate(
            vec![col("category")],
            vec![count_distinct(col("member_key")).alias("buyers")],
        )
        .and_then(LogicalPlanBuilder::build)
        .unwrap()
    }

    #[test]
    fn both_safe_views_may_be_read() {
        let plan = purchases()
            .join(
                members().build().unwrap(),
                JoinType::Inner,
                (vec!["purchases.member_key"], vec!["members.member_key"]),
                None,
            )
            .unwrap()
            .aggregate(
                vec![col("gender")],
                vec![count_distinct(col("purchases.member_key")).alias("buyers")],
            )
            .unwrap()
            .build()
            .unwrap();
        accepted(&plan, &policy(&["gender"], &["buyers"]));
    }

    #[test]
    fn another_table_is_refused() {
        let consent = table_scan(Some("consent"), &tables::consent::schema(), None).unwrap();
        let plan = consent
            .aggregate(
                vec![col("purpose")],
                vec![count_distinct(col("member_key")).alias("members")],
            )
            .unwrap()
            .build()
            .unwrap();
        let refusal = refused_by(RULE.name, &plan, &policy(&["purpose"], &["members"]));
        assert!(
            refusal.contains("`consent` is not a safe view"),
            "{refusal}"
        );
    }

    #[test]
    fn a_filtered_or_limited_scan_is_refused() {
        let schema = tables::purchases::schema();
        let filtered = vec![col("amount").gt(lit(0))];
        for (filters, fetch) in [(filtered, None), (vec![], Some(10))] {
            let scan =
                table_scan_with_filter_and_fetch(Some("purchases"), &schema, None, filters, fetch)
                    .unwrap();
            let plan = buyers_by_category(scan);
            let refusal = refused_by(RULE.name, &plan, &policy(&["category"], &["buyers"]));
            assert!(refusal.contains("pre-filtered"), "{refusal}");
        }
    }
}
