//! The member-key lineage: which output columns of each node under the output aggregate carry
//! the member key, computed once per plan and read by every rule about member keys.
//!
//! A column carries the member key if it is a scan's `member_key` column, or that column
//! passed on unchanged: through a filter or an alias, as a bare column of a projection or of an
//! aggregate's GROUP BY, or from either side of a join. Anything computed from it does not carry
//! it; the rules decide whether such a computation is allowed.

use std::collections::{BTreeSet, HashMap};

use datafusion::common::DFSchema;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, Join, LogicalPlan, Operator};

use crate::views::MEMBER_KEY;

/// The columns of a node that carry no member key (a node outside the lineage, such as the
/// output aggregate and anything above it).
static NO_COLUMNS: BTreeSet<usize> = BTreeSet::new();

/// The member-key columns of every node of a plan's subtree.
pub(super) struct Lineage<'a> {
    /// Every node of the subtree, each after its inputs: the order the rules read them in.
    nodes: Vec<&'a LogicalPlan>,
    /// Each node's output columns that carry the member key, by the node's address in the plan.
    members: HashMap<*const LogicalPlan, BTreeSet<usize>>,
}

impl<'a> Lineage<'a> {
    /// The lineage of every node of `root`'s subtree, `root` included.
    pub(super) fn of(root: &'a LogicalPlan) -> Self {
        let mut lineage = Self {
            nodes: Vec::new(),
            members: HashMap::new(),
        };
        lineage.visit(root);
        lineage
    }

    fn visit(&mut self, node: &'a LogicalPlan) {
        for input in node.inputs() {
            self.visit(input);
        }
        let members = self.carried_by(node);
        let address: *const LogicalPlan = node;
        self.members.insert(address, members);
        self.nodes.push(node);
    }

    /// The output columns of `node` that carry the member key, its inputs' being known.
    fn carried_by(&self, node: &LogicalPlan) -> BTreeSet<usize> {
        match node {
            LogicalPlan::TableScan(scan) => scan
                .projected_schema
                .fields()
                .iter()
                .position(|f| f.name() == MEMBER_KEY)
                .into_iter()
                .collect(),
            LogicalPlan::SubqueryAlias(alias) => self.members(&alias.input).clone(),
            LogicalPlan::Filter(filter) => self.members(&filter.input).clone(),
            LogicalPlan::Projection(projection) => {
                self.passed_on(&projection.expr, &projection.input)
            }
            LogicalPlan::Aggregate(aggregate) => {
                self.passed_on(&aggregate.group_expr, &aggregate.input)
            }
            LogicalPlan::Join(join) => {
                let left_len = join.left.schema().fields().len();
                let right = self.members(&join.right).iter().map(|i| i + left_len);
                self.members(&join.left)
                    .iter()
                    .copied()
                    .chain(right)
                    .collect()
            }
            // Any other node is refused (`allowed-nodes`); it passes no member key on.
            _ => BTreeSet::new(),
        }
    }

    /// The positions among `exprs` of bare member-key columns of `input`.
    fn passed_on(&self, exprs: &[Expr], input: &LogicalPlan) -> BTreeSet<usize> {
        (0..exprs.len())
            .filter(|&i| self.is_member_key(&exprs[i], input))
            .collect()
    }

    /// Every node of the subtree, each after its inputs.
    pub(super) fn nodes(&self) -> &[&'a LogicalPlan] {
        &self.nodes
    }

    /// The output columns of `node` that carry the member key; none for a node outside the
    /// subtree.
    pub(super) fn members(&self, node: &LogicalPlan) -> &BTreeSet<usize> {
        let address: *const LogicalPlan = node;
        self.members.get(&address).unwrap_or(&NO_COLUMNS)
    }

    /// Whether `expr`, evaluated on `input`'s output, is a bare (possibly renamed) member-key
    /// column.
    pub(super) fn is_member_key(&self, expr: &Expr, input: &LogicalPlan) -> bool {
        bare_column(expr, input.schema()).is_some_and(|i| self.members(input).contains(&i))
    }

    /// Whether every value `expr` can take on `input`'s output is a member key or NULL: a bare
    /// member-key column, or a CASE whose every result is one (its conditions may read
    /// anything). Such an expression's distinct values are members.
    pub(super) fn yields_member_keys(&self, expr: &Expr, input: &LogicalPlan) -> bool {
        match expr {
            Expr::Alias(a) => self.yields_member_keys(&a.expr, input),
            Expr::Literal(value, _) => value.is_null(),
            Expr::Case(case) => {
                case.when_then_expr
                    .iter()
                    .all(|(_, then)| self.yields_member_keys(then, input))
                    && case
                        .else_expr
                        .as_deref()
                        .is_none_or(|other| self.yields_member_keys(other, input))
            }
            _ => self.is_member_key(expr, input),
        }
    }

    /// Whether `expr`, evaluated on `input`'s output, reads a member-key column at all.
    pub(super) fn reads_member_key(&self, expr: &Expr, input: &LogicalPlan) -> bool {
        references(expr, input.schema(), self.members(input))
    }

    /// Whether a conjunct of `join`'s filter equates a member-key column of its left side with
    /// one of its right side: the join's own work, which no other rule needs to read.
    pub(super) fn equates_member_keys(&self, join: &Join, conjunct: &Expr) -> bool {
        let Expr::BinaryExpr(BinaryExpr {
            left: a,
            op: Operator::Eq,
            right: b,
        }) = conjunct
        else {
            return false;
        };
        let (Some(a), Some(b)) = (bare_column(a, &join.schema), bare_column(b, &join.schema))
        else {
            return false;
        };
        let left_len = join.left.schema().fields().len();
        let (lo, hi) = (a.min(b), a.max(b));
        self.members(&join.left).contains(&lo)
            && hi >= left_len
            && self.members(&join.right).contains(&(hi - left_len))
    }

    /// The conjuncts of `join`'s filter other than member-key equalities.
    pub(super) fn other_conjuncts<'j>(&self, join: &'j Join) -> Vec<&'j Expr> {
        join.filter
            .iter()
            .flat_map(split_conjunction)
            .filter(|conjunct| !self.equates_member_keys(join, conjunct))
            .collect()
    }
}

/// The input index of `expr` if it is a bare column (possibly aliased).
pub(super) fn bare_column(expr: &Expr, schema: &DFSchema) -> Option<usize> {
    match expr {
        Expr::Column(c) => schema.index_of_column(c).ok(),
        Expr::Alias(a) => bare_column(&a.expr, schema),
        _ => None,
    }
}

/// Whether `expr` reads any of the given input columns.
fn references(expr: &Expr, schema: &DFSchema, columns: &BTreeSet<usize>) -> bool {
    expr.column_refs().into_iter().any(|c| {
        schema
            .index_of_column(c)
            .is_ok_and(|i| columns.contains(&i))
    })
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::{JoinType, col, lit};

    use super::super::test_plans::*;
    use super::*;

    #[test]
    fn the_member_key_is_followed_through_aliases_projections_groups_and_joins() {
        let members_side = members()
            .alias("m")
            .unwrap()
            .project(vec![col("m.gender"), col("m.member_key").alias("who")])
            .unwrap()
            .build()
            .unwrap();
        let plan = purchases()
            .filter(col("amount").gt(lit(0)))
            .unwrap()
            .aggregate(vec![col("category"), col("member_key")], Vec::<Expr>::new())
            .unwrap()
            .join(
                members_side,
                JoinType::Inner,
                (vec!["member_key"], vec!["who"]),
                None,
            )
            .unwrap()
            .build()
            .unwrap();
        let lineage = Lineage::of(&plan);
        // category, member_key | gender, who
        assert_eq!(lineage.members(&plan), &BTreeSet::from([1, 3]));
        let LogicalPlan::Join(join) = &plan else {
            panic!("not a join");
        };
        assert_eq!(lineage.members(&join.right), &BTreeSet::from([1]));
        assert_eq!(lineage.nodes().last(), Some(&&plan));
    }

    #[test]
    fn a_computed_column_carries_no_member_key() {
        let plan = purchases()
            .project(vec![(col("member_key") + lit(1)).alias("member_key")])
            .unwrap()
            .build()
            .unwrap();
        let lineage = Lineage::of(&plan);
        assert!(lineage.members(&plan).is_empty());
        let LogicalPlan::Projection(projection) = &plan else {
            panic!("not a projection");
        };
        assert!(lineage.reads_member_key(&projection.expr[0], &projection.input));
        assert!(!lineage.is_member_key(&projection.expr[0], &projection.input));
    }
}
