//! Every expression a plan evaluates up to its output, each with the node whose columns it reads
//! and the place it sits in, listed once per plan. The rules about expressions
//! (`cannot-fail-on-data`, `allowed-expressions`, `sensitive-columns`, `member-key-use`) all read
//! this one list, so none of them can miss an expression another one sees.

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr, LogicalPlan};

use super::lineage::Lineage;
use super::output_shape::Output;

/// Where an expression sits: it decides which aggregates the expression may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    /// Evaluated on rows: a projection, a filter, a sort, a join condition, a GROUP BY.
    Row,
    /// An aggregate of a subquery, whose per-member values are then aggregated again.
    InnerAggregate,
    /// An aggregate of the output aggregate: a released metric.
    OutputAggregate,
}

/// One expression the plan evaluates.
pub(super) struct Site<'a> {
    /// The expression.
    pub(super) expr: &'a Expr,
    /// The node whose output columns the expression reads.
    pub(super) input: &'a LogicalPlan,
    /// Where it sits.
    pub(super) place: Place,
}

/// Every expression of the nodes above the output aggregate, of the nodes under it, and of the
/// output aggregate itself, in that order. A join's equalities of member keys are left out: they
/// are the join's own work, checked by `one-member-per-row`.
pub(super) fn sites<'a>(output: &Output<'a>, lineage: &Lineage<'a>) -> Vec<Site<'a>> {
    let mut sites = Vec::new();
    for &node in output.above.iter().chain(lineage.nodes()) {
        node_sites(node, lineage, &mut sites);
    }
    let aggregate = output.aggregate;
    for expr in &aggregate.group_expr {
        sites.push(Site {
            expr,
            input: &aggregate.input,
            place: Place::Row,
        });
    }
    for expr in &aggregate.aggr_expr {
        sites.push(Site {
            expr,
            input: &aggregate.input,
            place: Place::OutputAggregate,
        });
    }
    sites
}

/// The expressions `node` evaluates. A node of a kind `allowed-nodes` refuses has none.
fn node_sites<'a>(node: &'a LogicalPlan, lineage: &Lineage<'a>, sites: &mut Vec<Site<'a>>) {
    let mut push = |expr: &'a Expr, input: &'a LogicalPlan, place: Place| {
        sites.push(Site { expr, input, place });
    };
    match node {
        LogicalPlan::Projection(p) => p.expr.iter().for_each(|e| push(e, &p.input, Place::Row)),
        LogicalPlan::Sort(s) => s
            .expr
            .iter()
            .for_each(|e| push(&e.expr, &s.input, Place::Row)),
        LogicalPlan::Filter(f) => push(&f.predicate, &f.input, Place::Row),
        LogicalPlan::Aggregate(a) => {
            a.group_expr
                .iter()
                .for_each(|e| push(e, &a.input, Place::Row));
            a.aggr_expr
                .iter()
                .for_each(|e| push(e, &a.input, Place::InnerAggregate));
        }
        LogicalPlan::Join(join) => {
            for (left, right) in &join.on {
                push(left, &join.left, Place::Row);
                push(right, &join.right, Place::Row);
            }
            for conjunct in lineage.other_conjuncts(join) {
                push(conjunct, node, Place::Row);
            }
        }
        _ => {}
    }
}

/// The first problem `problem` finds, reading the sites in order and each expression from its
/// root down.
pub(super) fn first_problem(
    sites: &[Site<'_>],
    mut problem: impl FnMut(&Expr, &Site<'_>) -> Option<String>,
) -> Result<(), String> {
    for site in sites {
        let mut found = None;
        let walked = site.expr.apply(|e| {
            found = problem(e, site);
            Ok(match found {
                Some(_) => TreeNodeRecursion::Stop,
                None => TreeNodeRecursion::Continue,
            })
        });
        if let Err(e) = walked {
            return Err(format!("an expression could not be read: {e}"));
        }
        if let Some(problem) = found {
            return Err(problem);
        }
    }
    Ok(())
}
