//! Rule `no-member-key-in-output`: the member key does not group the output. A row per member,
//! or per anything computed from the pseudonym, would release the pseudonym or single out its
//! member; member keys are counted, never output. (A metric cannot output it either: the output
//! aggregates may only count it, `member-key-use`.)

use super::{Query, Rule};

/// The rule in the list.
pub(super) const RULE: Rule = Rule {
    name: "no-member-key-in-output",
    check,
};

fn check(query: &Query<'_>) -> Result<(), String> {
    let aggregate = query.output.aggregate;
    let grouped_by_member_key = aggregate
        .group_expr
        .iter()
        .any(|group| query.lineage.reads_member_key(group, &aggregate.input));
    if grouped_by_member_key {
        return Err("member_key may not group the output".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use datafusion::functions_aggregate::expr_fn::count;
    use datafusion::logical_expr::{LogicalPlanBuilder, col, lit};

    use super::super::test_plans::*;
    use super::*;

    #[test]
    fn members_are_counted_not_grouped_on() {
        accepted(&buyers_by_category(), &policy(&["category"], &["buyers"]));
    }

    #[test]
    fn grouping_the_output_by_the_member_key_is_refused() {
        let per_member = purchases()
            .aggregate(
                vec![col("member_key").alias("partner_attribute")],
                vec![count(lit(1)).alias("purchases")],
            )
            .and_then(LogicalPlanBuilder::build)
            .unwrap();
        let declared = policy(&["partner_attribute"], &["purchases"]);
        let refusal = refused_by(RULE.name, &per_member, &declared);
        assert!(refusal.contains("may not group the output"), "{refusal}");

        let buckets = purchases()
            .aggregate(
                vec![(col("member_key") % lit(10)).alias("bucket")],
                vec![count(lit(1)).alias("purchases")],
            )
            .and_then(LogicalPlanBuilder::build)
            .unwrap();
        let declared = policy(&["bucket"], &["purchases"]);
        let refusal = refused_by(RULE.name, &buckets, &declared);
        assert!(refusal.contains("may not group the output"), "{refusal}");
    }
}
