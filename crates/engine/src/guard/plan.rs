//! Plan checks: what a query's `LogicalPlan` may contain, whatever its template says, and the
//! rewrite that lets the guard compute every released value member by member.
//!
//! `check_plan` is a short pipeline, modelled on DataFusion's analyzer: a list of named rules,
//! one file each, each with its own tests. The `output-shape` rule runs first because it finds
//! the output aggregate every other rule reads; then the member-key lineage of the aggregate's
//! input is computed once (`lineage`), and so is every expression the plan evaluates before its
//! output (`expressions`); then the rules of `RULES` run in order. Every refusal starts with the
//! name of the rule that made it.
//!
//! - `output-shape`: the output is exactly the declared columns, each the output aggregate's own
//!   GROUP BY expression (a dimension) or aggregate (a metric, a whole number); no HAVING, LIMIT,
//!   ROLLUP or arithmetic on top of the aggregates;
//! - `safe-views`: only the safe views are scanned, whole;
//! - `allowed-nodes`: the aggregate's input is built of scans, filters, projections, aliases,
//!   aggregates and joins only;
//! - `one-member-per-row`: every row the output aggregates belongs to one member: it carries
//!   `member_key`, and joins are inner joins equating `member_key` of both sides;
//! - `member-key-use`: `member_key` is only passed through, grouped on as a bare column inside a
//!   subquery, or counted; never filtered on or computed with;
//! - `no-member-key-in-output`: `member_key` does not group the output;
//! - `cannot-fail-on-data`: no expression can fail on a row's value (also applied to the
//!   optimised plan that runs, `plan_that_runs`);
//! - `allowed-expressions`: only listed expression kinds, functions and aggregates;
//! - `sensitive-columns`: no column tagged sensitive is read;
//! - `metric-bounds`: every metric has a per-member bound: a count of distinct members adds 1,
//!   any other metric declares its bound.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::common::{Column, ParamValues, ScalarValue};
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement;

use super::Policy;
use crate::{Error, Result};

mod allowed_expressions;
mod allowed_nodes;
mod cannot_fail_on_data;
mod expressions;
mod lineage;
mod member_key_use;
mod metric_bounds;
mod no_member_key_in_output;
mod one_member_per_row;
mod output_shape;
mod safe_views;
mod sensitive_columns;
#[cfg(test)]
mod test_plans;

use expressions::Site;
use lineage::Lineage;
use output_shape::Output;

/// One check of the list: its name prefixes every refusal it makes.
struct Rule {
    name: &'static str,
    /// Why the query is refused, if it is.
    check: fn(&Query<'_>) -> std::result::Result<(), String>,
}

/// The rules `check_plan` runs after `output-shape`, in order: the first refusal is the answer.
const RULES: &[Rule] = &[
    safe_views::RULE,
    allowed_nodes::RULE,
    one_member_per_row::RULE,
    member_key_use::RULE,
    no_member_key_in_output::RULE,
    cannot_fail_on_data::RULE,
    allowed_expressions::RULE,
    sensitive_columns::RULE,
    metric_bounds::RULE,
];

/// What every rule reads, computed once per plan.
struct Query<'a> {
    policy: &'a Policy,
    /// The output aggregate and how the output columns map onto it.
    output: Output<'a>,
    /// Which columns of each node under the output aggregate carry the member key.
    lineage: Lineage<'a>,
    /// Every expression the plan evaluates, with the node whose columns it reads.
    expressions: Vec<Site<'a>>,
}

/// A rule's verdict as the guard's refusal, prefixed with the rule's name.
fn named<T>(rule: &str, verdict: std::result::Result<T, String>) -> Result<T> {
    verdict.map_err(|reason| Error::Guard(format!("{rule}: {reason}")))
}

fn refuse<T>(reason: impl Into<String>) -> Result<T> {
    Err(Error::Guard(reason.into()))
}

/// The most tokens (words, numbers, operators) a query's SQL may hold: the reviewed queries hold
/// under a hundred. DataFusion's planner copies an expression recursively, and a chain of some
/// thousand additions overflowed the stack of the thread planning it (found by the fuzzer).
pub(crate) const MAX_SQL_TOKENS: usize = 1024;

/// Refuses SQL of more than [`MAX_SQL_TOKENS`] tokens, before DataFusion parses or plans it.
fn check_length(sql: &str) -> Result<()> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|_| Error::Guard("the query is not valid SQL".into()))?;
    let counted = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .count();
    if counted > MAX_SQL_TOKENS {
        return refuse(format!(
            "the query is too long: at most {MAX_SQL_TOKENS} SQL tokens (words, numbers, \
             operators)"
        ));
    }
    Ok(())
}

/// Parses exactly one SELECT, plans it against the session's tables (only the safe views), binds
/// the parameters' values and analyses it: the plan the checks read is the one DataFusion will
/// run, with every cast its type coercion adds.
pub(crate) async fn analysed_plan(
    ctx: &SessionContext,
    sql: &str,
    values: HashMap<String, ScalarValue>,
) -> Result<LogicalPlan> {
    check_length(sql)?;
    let state = ctx.state();
    let mut statements = datafusion::sql::parser::DFParser::parse_sql(sql)
        .map_err(|_| Error::Guard("the query is not valid SQL".into()))?;
    if statements.len() != 1 {
        return refuse("a query must be exactly one statement");
    }
    let statement = statements.pop_front().expect("one statement");
    if !matches!(&statement, Statement::Statement(s) if matches!(**s, datafusion::sql::sqlparser::ast::Statement::Query(_)))
    {
        return refuse("a query must be a single SELECT");
    }
    let plan = state.statement_to_plan(statement).await.map_err(|e| {
        // The planner's message can name tables and columns; keep it in the server log only.
        tracing::debug!(error = %e, "query failed to plan against the safe views");
        Error::Guard(
            "the query does not plan against the safe views (unknown table or column?)".into(),
        )
    })?;
    let plan = plan
        .with_param_values(ParamValues::from(values))
        .map_err(|_| Error::Guard("the query's parameters do not match its placeholders".into()))?;
    state
        .analyzer()
        .execute_and_check(plan, state.config_options(), |_, _| {})
        .map_err(|e| {
            tracing::debug!(error = %e, "query failed analysis against the safe views");
            Error::Guard("the query's types do not agree (DataFusion's analysis refused it)".into())
        })
}

/// The plan DataFusion will execute for `plan`: optimised, then checked once more for anything
/// that could fail on a row's value, since every rewrite happens before execution.
pub(crate) fn plan_that_runs(ctx: &SessionContext, plan: &LogicalPlan) -> Result<LogicalPlan> {
    let optimized = ctx.state().optimize(plan).map_err(|e| {
        tracing::debug!(error = %e, "a checked plan failed to optimise");
        Error::Guard("the query could not be optimised".into())
    })?;
    cannot_fail_on_data::check_plan_that_runs(&optimized)?;
    Ok(optimized)
}

/// What the guard needs to know of an accepted plan to run it member by member.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    /// The output aggregate.
    pub aggregate: Aggregate,
    /// Index, in the aggregate's input schema, of a column carrying the member key.
    pub member_index: usize,
    /// For each declared dimension, the index of its GROUP BY expression.
    pub dimension_groups: Vec<usize>,
    /// For each declared metric, how it is computed.
    pub metrics: Vec<MetricShape>,
}

/// One output metric: which aggregate computes it, and how much one member may add to a row.
#[derive(Debug, Clone)]
pub(crate) struct MetricShape {
    /// Index in the aggregate's `aggr_expr`.
    pub aggregate: usize,
    /// The most one member adds to one row: 1 for a count of distinct members, otherwise the
    /// query's declared bound.
    pub bound: u64,
    /// The count of the row's distinct members itself, `COUNT(DISTINCT member_key)`: it is
    /// released as the row's noisy member count, with no noise of its own.
    pub member_count: bool,
}

/// Checks the plan and returns its shape. The output must be the output aggregate's own columns
/// (renamed at most): dimensions are its GROUP BY expressions, metrics its aggregates. Anything
/// computed on top of the aggregates (ratios, HAVING, LIMIT) is refused: the guard computes the
/// released values itself, member by member, and a partner derives ratios from released cells.
pub(crate) fn check_plan(plan: &LogicalPlan, policy: &Policy) -> Result<Shape> {
    // Every other rule reads the output aggregate, so the rule that finds it runs first.
    let output = named(output_shape::NAME, output_shape::output(plan, policy))?;
    let lineage = Lineage::of(&output.aggregate.input);
    let expressions = expressions::sites(&output, &lineage);
    let query = Query {
        policy,
        output,
        lineage,
        expressions,
    };
    for rule in RULES {
        named(rule.name, (rule.check)(&query))?;
    }
    // The rules that passed computed these parts; asking them again cannot refuse.
    let member_index = named(
        one_member_per_row::RULE.name,
        one_member_per_row::member_index(&query),
    )?;
    let metrics = named(metric_bounds::RULE.name, metric_bounds::metrics(&query))?;
    Ok(Shape {
        aggregate: query.output.aggregate.clone(),
        member_index,
        dimension_groups: query.output.dimension_groups.clone(),
        metrics,
    })
}

/// The plan that computes every output aggregate per member and row: the output aggregate grouped
/// by its dimensions and the member key. Its columns are the group expressions, the member key,
/// then the aggregates.
///
/// A count of the row's distinct members is released as the row's noisy member count, so one
/// member's own value of it is never read: per member it is computed as a plain count, not as a
/// distinct count (a hash set per member and row, most of a question's time at a million
/// members), in the same place, so every other aggregate keeps its column.
pub(crate) fn per_member_plan(shape: &Shape) -> Result<LogicalPlan> {
    let a = &shape.aggregate;
    let (qualifier, field) = a.input.schema().qualified_field(shape.member_index);
    let member = Expr::Column(Column::new(qualifier.cloned(), field.name()));
    let mut group_expr = a.group_expr.clone();
    group_expr.push(member.clone());
    let member_count = |i: usize| {
        shape
            .metrics
            .iter()
            .any(|m| m.member_count && m.aggregate == i)
    };
    let aggr_expr = a
        .aggr_expr
        .iter()
        .enumerate()
        .map(|(i, e)| {
            if member_count(i) {
                count(member.clone()).alias(e.schema_name().to_string())
            } else {
                e.clone()
            }
        })
        .collect();
    Ok(LogicalPlan::Aggregate(Aggregate::try_new(
        Arc::clone(&a.input),
        group_expr,
        aggr_expr,
    )?))
}

#[cfg(test)]
mod tests {
    use super::test_plans::*;
    use super::*;

    #[test]
    fn every_rule_has_its_own_name() {
        let mut names: Vec<&str> = RULES.iter().map(|r| r.name).collect();
        names.push(output_shape::NAME);
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "{names:?}");
    }

    #[test]
    fn an_accepted_plan_has_the_shape_the_guard_runs() {
        let shape = check_plan(&buyers_by_category(), &policy(&["category"], &["buyers"]))
            .expect("accepted");
        assert_eq!(shape.dimension_groups, vec![0]);
        let input = shape.aggregate.input.schema();
        assert_eq!(input.field(shape.member_index).name(), "member_key");
        assert_eq!(shape.metrics.len(), 1);
        assert!(shape.metrics[0].member_count);
        assert_eq!(shape.metrics[0].bound, 1);
    }

    #[test]
    fn the_per_member_plan_groups_by_the_member_key_too() {
        let shape = check_plan(&buyers_by_category(), &policy(&["category"], &["buyers"]))
            .expect("accepted");
        let LogicalPlan::Aggregate(per_member) = per_member_plan(&shape).expect("plans") else {
            panic!("not an aggregate");
        };
        assert_eq!(per_member.group_expr.len(), 2);
        // The member count is computed per member as a plain count, in the same column.
        let names: Vec<String> = per_member
            .schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(names, ["category", "member_key", "buyers"]);
        assert!(!format!("{}", per_member.aggr_expr[0]).contains("DISTINCT"));
    }
}
