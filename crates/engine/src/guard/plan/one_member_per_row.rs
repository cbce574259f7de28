//! Rule `one-member-per-row`: every row the output aggregates belongs to one member. The guard
//! runs the query member by member, bounding what each one adds, so the output aggregate's input
//! must carry the member key; and a join may only bring together rows of one member: an inner
//! join that equates the member key of both sides, and uses the member key for nothing else.

use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Join, JoinType, LogicalPlan};

use super::lineage::{Lineage, bare_column};
use super::{Query, Rule};

const ONLY_WITH_MEMBER_KEY: &str = "member_key may only be equated with member_key";

/// The rule in the list.
pub(super) const RULE: Rule = Rule {
    name: "one-member-per-row",
    check,
};

fn check(query: &Query<'_>) -> Result<(), String> {
    for node in query.lineage.nodes() {
        if let LogicalPlan::Join(join) = node {
            check_join(node, join, &query.lineage)?;
        }
    }
    member_index(query).map(drop)
}

/// The column of the output aggregate's input that attributes each row to its member (the
/// shape's `member_index`).
pub(super) fn member_index(query: &Query<'_>) -> Result<usize, String> {
    let input = &query.output.aggregate.input;
    query
        .lineage
        .members(input)
        .first()
        .copied()
        .ok_or_else(|| {
            "output rows cannot be attributed to members: the aggregate's input must carry \
             member_key"
                .into()
        })
}

/// `join` (the join of `node`) is inner, both its sides carry the member key, and it equates
/// them, in its keys or in its filter.
fn check_join(node: &LogicalPlan, join: &Join, lineage: &Lineage<'_>) -> Result<(), String> {
    if join.join_type != JoinType::Inner {
        return Err("only inner joins on member_key are allowed".into());
    }
    let (left, right) = (lineage.members(&join.left), lineage.members(&join.right));
    if left.is_empty() || right.is_empty() {
        return Err("both sides of a join must carry member_key".into());
    }
    let mut equated = false;
    for (l, r) in &join.on {
        let l_index = bare_column(l, join.left.schema());
        let r_index = bare_column(r, join.right.schema());
        match (l_index, r_index) {
            (Some(li), Some(ri)) if left.contains(&li) && right.contains(&ri) => equated = true,
            _ if lineage.reads_member_key(l, &join.left)
                || lineage.reads_member_key(r, &join.right) =>
            {
                return Err(ONLY_WITH_MEMBER_KEY.into());
            }
            _ => {}
        }
    }
    equated |= join
        .filter
        .iter()
        .flat_map(split_conjunction)
        .any(|conjunct| lineage.equates_member_keys(join, conjunct));
    for conjunct in lineage.other_conjuncts(join) {
        if lineage.reads_member_key(conjunct, node) {
            return Err(ONLY_WITH_MEMBER_KEY.into());
        }
    }
    if !equated {
        return Err("joins must equate member_key of both sides".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use datafusion::functions_aggregate::expr_fn::count_distinct;
    use datafusion::logical_expr::{Expr, LogicalPlanBuilder, col, lit};

    use super::super::test_plans::*;
    use super::*;

    /// Buyers by gender over purchases joined to `members` by `join_type` on `keys` and `filter`.
    fn joined(
        join_type: JoinType,
        keys: (Vec<&str>, Vec<&str>),
        filter: Option<Expr>,
    ) -> LogicalPlan {
        purchases()
            .join(members().build().unwrap(), join_type, keys, filter)
            .unwrap()
            .aggregate(
                vec![col("gender")],
                vec![count_distinct(col("purchases.member_key")).alias("buyers")],
            )
            .and_then(LogicalPlanBuilder::build)
            .unwrap()
    }

    fn by_gender() -> crate::guard::Policy {
        policy(&["gender"], &["buyers"])
    }

    fn member_keys() -> (Vec<&'static str>, Vec<&'static str>) {
        (vec!["purchases.member_key"], vec!["members.member_key"])
    }

    #[test]
    fn an_inner_join_equating_member_keys_is_allowed() {
        accepted(&joined(JoinType::Inner, member_keys(), None), &by_gender());
        // The same equality written in the join's filter, beside a condition on other columns.
        let on = col("purchases.member_key")
            .eq(col("members.member_key"))
            .and(col("purchases.category").not_eq(col("members.gender")));
        let plan = joined(JoinType::Inner, (vec![], vec![]), Some(on));
        accepted(&plan, &by_gender());
    }

    #[test]
    fn only_inner_joins_are_allowed() {
        let plan = joined(JoinType::Left, member_keys(), None);
        let refusal = refused_by(RULE.name, &plan, &by_gender());
        assert!(refusal.contains("only inner joins"), "{refusal}");
    }

    #[test]
    fn a_join_must_equate_member_keys() {
        let plan = joined(
            JoinType::Inner,
            (vec!["purchases.category"], vec!["members.gender"]),
            None,
        );
        let refusal = refused_by(RULE.name, &plan, &by_gender());
        assert!(refusal.contains("must equate member_key"), "{refusal}");
    }

    #[test]
    fn a_member_key_is_equated_with_nothing_else() {
        let on = col("purchases.member_key").eq(col("members.member_key"));
        let beside = col("purchases.member_key").gt(col("purchases.quantity"));
        let plan = joined(JoinType::Inner, (vec![], vec![]), Some(on.and(beside)));
        let refusal = refused_by(RULE.name, &plan, &by_gender());
        assert!(
            refusal.contains("only be equated with member_key"),
            "{refusal}"
        );

        let keys = (
            vec!["purchases.member_key", "purchases.quantity"],
            vec!["members.member_key", "members.member_key"],
        );
        let refusal = refused_by(
            RULE.name,
            &joined(JoinType::Inner, keys, None),
            &by_gender(),
        );
        assert!(
            refusal.contains("only be equated with member_key"),
            "{refusal}"
        );
    }

    #[test]
    fn both_sides_of_a_join_carry_the_member_key() {
        let genders = members().project(vec![col("gender")]).unwrap();
        let plan = purchases()
            .join_on(genders.build().unwrap(), JoinType::Inner, [lit(true)])
            .unwrap()
            .aggregate(
                vec![col("gender")],
                vec![count_distinct(col("member_key")).alias("buyers")],
            )
            .and_then(LogicalPlanBuilder::build)
            .unwrap();
        let refusal = refused_by(RULE.name, &plan, &by_gender());
        assert!(refusal.contains("both sides"), "{refusal}");
    }

    #[test]
    fn the_output_aggregate_reads_rows_of_members() {
        let categories = purchases()
            .project(vec![col("category")])
            .unwrap()
            .aggregate(
                vec![col("category")],
                vec![datafusion::functions_aggregate::expr_fn::count(lit(1)).alias("rows")],
            )
            .and_then(LogicalPlanBuilder::build)
            .unwrap();
        let refusal = refused_by(RULE.name, &categories, &policy(&["category"], &["rows"]));
        assert!(refusal.contains("cannot be attributed"), "{refusal}");
    }
}
