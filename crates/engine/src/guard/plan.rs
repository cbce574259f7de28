//! Plan checks: what a query's `LogicalPlan` may contain, whatever its template says, and the
//! rewrite that lets the guard compute every released value member by member.
//!
//! Only the safe views; aggregate output only; member keys used only to join, to group inside a
//! subquery, or to be counted; only listed functions; no sensitive column; output columns exactly
//! as declared, each a GROUP BY expression (a dimension) or an aggregate (a metric).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, ParamValues, ScalarValue};
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Expr, Filter, JoinType, LogicalPlan, Operator, Projection, SubqueryAlias,
};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement;

use super::Policy;
use crate::views::{MEMBER_KEY, SAFE_VIEWS};
use crate::{Error, Result};

mod fallible;

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

fn refuse<T>(reason: impl Into<String>) -> Result<T> {
    Err(Error::Guard(reason.into()))
}

/// Parses exactly one SELECT, plans it against the session's tables (only the safe views), binds
/// the parameters' values and analyses it: the plan the checks read is the one DataFusion will
/// run, with every cast its type coercion adds.
pub(crate) async fn analysed_plan(
    ctx: &SessionContext,
    sql: &str,
    values: HashMap<String, ScalarValue>,
) -> Result<LogicalPlan> {
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
    fallible::check_plan_that_runs(&optimized)?;
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
    let declared = policy.output_columns();
    let actual: Vec<String> = plan
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    if actual != declared {
        return refuse(format!(
            "output columns {actual:?} differ from the declared dimensions and metrics {declared:?}"
        ));
    }
    // Output column i is column `mapping[i]` of the node being looked at.
    let mut mapping: Vec<usize> = (0..declared.len()).collect();
    let mut node = plan;
    let aggregate = loop {
        match node {
            LogicalPlan::Projection(p) => {
                check_expressions(&p.expr, p.input.schema(), &BTreeSet::new(), &[], policy)?;
                for m in mapping.iter_mut() {
                    *m = bare_column(&p.expr[*m], p.input.schema()).ok_or_else(|| {
                        Error::Guard(format!(
                            "output column `{}` is computed on top of the aggregates; output the \
                             aggregates themselves (ratios and shares are computed from released \
                             cells)",
                            p.schema.field(*m).name()
                        ))
                    })?;
                }
                node = &p.input;
            }
            LogicalPlan::Sort(s) => {
                let exprs: Vec<Expr> = s.expr.iter().map(|e| e.expr.clone()).collect();
                check_expressions(&exprs, s.input.schema(), &BTreeSet::new(), &[], policy)?;
                node = &s.input;
            }
            LogicalPlan::SubqueryAlias(s) => node = &s.input,
            LogicalPlan::Filter(_) => {
                return refuse(
                    "HAVING is not allowed: the guard alone decides which rows are released",
                );
            }
            LogicalPlan::Limit(_) => {
                return refuse(
                    "LIMIT is not allowed on the output: every row of the domain is released or suppressed",
                );
            }
            LogicalPlan::Aggregate(a) => break a,
            _ => {
                return refuse(
                    "the output must be an aggregate over the safe views (GROUP BY or COUNT)",
                );
            }
        }
    };
    let members = member_columns(&aggregate.input, policy)?;
    let Some(&member_index) = members.iter().next() else {
        return refuse(
            "output rows cannot be attributed to members: the aggregate's input must carry member_key",
        );
    };
    let input_schema = aggregate.input.schema();
    for group in &aggregate.group_expr {
        if references(group, input_schema, &members) {
            return refuse("member_key may not group the output");
        }
        if matches!(group, Expr::GroupingSet(_)) {
            return refuse("ROLLUP, CUBE and GROUPING SETS are not allowed: totals leak");
        }
    }
    check_expressions(&aggregate.group_expr, input_schema, &members, &[], policy)?;
    check_expressions(
        &aggregate.aggr_expr,
        input_schema,
        &members,
        OUTPUT_AGGREGATES,
        policy,
    )?;

    let groups = aggregate.group_expr.len();
    let dims = policy.dimensions.len();
    let mut dimension_groups = Vec::with_capacity(dims);
    for (i, (name, _)) in policy.dimensions.iter().enumerate() {
        if mapping[i] >= groups {
            return refuse(format!("dimension `{name}` must be a GROUP BY expression"));
        }
        dimension_groups.push(mapping[i]);
    }
    let covered: BTreeSet<usize> = dimension_groups.iter().copied().collect();
    if covered.len() != groups || dimension_groups.len() != groups {
        return refuse("every GROUP BY expression must be output once, as a declared dimension");
    }
    let mut metrics = Vec::with_capacity(policy.metrics.len());
    for (j, name) in policy.metrics.iter().enumerate() {
        let column = mapping[dims + j];
        if column < groups {
            return refuse(format!("metric `{name}` must be an aggregate"));
        }
        let index = column - groups;
        let field = aggregate.schema.field(column);
        if !field.data_type().is_integer() {
            return refuse(format!(
                "metric `{name}` must be a whole number (COUNT, or SUM of whole numbers) so that its noise can be exact"
            ));
        }
        let mut expr = &aggregate.aggr_expr[index];
        while let Expr::Alias(alias) = expr {
            expr = &alias.expr;
        }
        let Expr::AggregateFunction(function) = expr else {
            return refuse(format!("metric `{name}` must be COUNT or SUM"));
        };
        let counts_members = function.params.distinct
            && function
                .params
                .args
                .iter()
                .any(|a| references(a, input_schema, &members));
        if function.params.distinct && !counts_members {
            return refuse(format!(
                "metric `{name}`: COUNT(DISTINCT …) must count members; distinct values of other columns cannot be bounded per member"
            ));
        }
        let member_count = function.func.name() == "count"
            && counts_members
            && function.params.filter.is_none()
            && function.params.args.len() == 1
            && bare_column(&function.params.args[0], input_schema)
                .is_some_and(|i| members.contains(&i));
        let bound = if counts_members {
            1
        } else {
            match policy.metric_bounds.get(name) {
                Some(bound) => *bound,
                None => {
                    return refuse(format!(
                        "metric `{name}` needs a per-member bound in the query's metric_bounds: one member may add any amount to it"
                    ));
                }
            }
        };
        metrics.push(MetricShape {
            aggregate: index,
            bound,
            member_count,
        });
    }
    Ok(Shape {
        aggregate: aggregate.clone(),
        member_index,
        dimension_groups,
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

/// The output columns of `plan` that carry the member key, checking every node and expression of
/// the subtree on the way. Member keys may be passed through, joined on, grouped by (inside a
/// subquery) and counted; any other use is refused.
fn member_columns(plan: &LogicalPlan, policy: &Policy) -> Result<BTreeSet<usize>> {
    match plan {
        LogicalPlan::TableScan(scan) => {
            let name = scan.table_name.table();
            if !SAFE_VIEWS.contains(&name) {
                return refuse(format!("table `{name}` is not a safe view"));
            }
            if !scan.filters.is_empty() || scan.fetch.is_some() {
                return refuse("pre-filtered scans are not allowed");
            }
            Ok(scan
                .projected_schema
                .fields()
                .iter()
                .position(|f| f.name() == MEMBER_KEY)
                .into_iter()
                .collect())
        }
        LogicalPlan::SubqueryAlias(SubqueryAlias { input, .. }) => member_columns(input, policy),
        LogicalPlan::Filter(Filter {
            predicate, input, ..
        }) => {
            let members = member_columns(input, policy)?;
            if references(predicate, input.schema(), &members) {
                return refuse("member_key may not be filtered on");
            }
            check_expressions(
                std::slice::from_ref(predicate),
                input.schema(),
                &members,
                &[],
                policy,
            )?;
            Ok(members)
        }
        LogicalPlan::Projection(Projection { expr, input, .. }) => {
            let members = member_columns(input, policy)?;
            let mut out = BTreeSet::new();
            for (i, e) in expr.iter().enumerate() {
                if bare_column(e, input.schema()).is_some_and(|index| members.contains(&index)) {
                    out.insert(i);
                    continue;
                }
                if references(e, input.schema(), &members) {
                    return refuse("member_key may only be passed through, joined on or counted");
                }
            }
            check_expressions(expr, input.schema(), &members, &[], policy)?;
            Ok(out)
        }
        LogicalPlan::Aggregate(Aggregate {
            input,
            group_expr,
            aggr_expr,
            ..
        }) => {
            let members = member_columns(input, policy)?;
            let mut out = BTreeSet::new();
            for (i, e) in group_expr.iter().enumerate() {
                match bare_column(e, input.schema()) {
                    Some(index) if members.contains(&index) => {
                        out.insert(i);
                    }
                    _ if references(e, input.schema(), &members) => {
                        return refuse("member_key may only be grouped on as a bare column");
                    }
                    _ => {}
                }
            }
            check_expressions(group_expr, input.schema(), &members, &[], policy)?;
            check_expressions(
                aggr_expr,
                input.schema(),
                &members,
                INNER_AGGREGATES,
                policy,
            )?;
            Ok(out)
        }
        LogicalPlan::Join(join) => {
            if join.join_type != JoinType::Inner {
                return refuse("only inner joins on member_key are allowed");
            }
            let left = member_columns(&join.left, policy)?;
            let right = member_columns(&join.right, policy)?;
            if left.is_empty() || right.is_empty() {
                return refuse("both sides of a join must carry member_key");
            }
            let left_len = join.left.schema().fields().len();
            let members: BTreeSet<usize> = left
                .iter()
                .copied()
                .chain(right.iter().map(|i| i + left_len))
                .collect();
            let mut equated = false;
            for (l, r) in &join.on {
                check_expressions(
                    std::slice::from_ref(l),
                    join.left.schema(),
                    &left,
                    &[],
                    policy,
                )?;
                check_expressions(
                    std::slice::from_ref(r),
                    join.right.schema(),
                    &right,
                    &[],
                    policy,
                )?;
                match (
                    bare_column(l, join.left.schema()),
                    bare_column(r, join.right.schema()),
                ) {
                    (Some(li), Some(ri)) if left.contains(&li) && right.contains(&ri) => {
                        equated = true
                    }
                    _ if references(l, join.left.schema(), &left)
                        || references(r, join.right.schema(), &right) =>
                    {
                        return refuse("member_key may only be equated with member_key");
                    }
                    _ => {}
                }
            }
            if let Some(filter) = &join.filter {
                for conjunct in split_conjunction(filter) {
                    if let Expr::BinaryExpr(BinaryExpr {
                        left: a,
                        op: Operator::Eq,
                        right: b,
                    }) = conjunct
                    {
                        let (ai, bi) = (bare_column(a, &join.schema), bare_column(b, &join.schema));
                        if let (Some(ai), Some(bi)) = (ai, bi) {
                            let (lo, hi) = (ai.min(bi), ai.max(bi));
                            if left.contains(&lo)
                                && hi >= left_len
                                && right.contains(&(hi - left_len))
                            {
                                equated = true;
                                continue;
                            }
                        }
                    }
                    if references(conjunct, &join.schema, &members) {
                        return refuse("member_key may only be equated with member_key");
                    }
                    check_expressions(
                        std::slice::from_ref(conjunct),
                        &join.schema,
                        &members,
                        &[],
                        policy,
                    )?;
                }
            }
            if !equated {
                return refuse("joins must equate member_key of both sides");
            }
            Ok(members)
        }
        other => refuse(format!("`{}` is not allowed in a query", node_name(other))),
    }
}

fn node_name(plan: &LogicalPlan) -> String {
    plan.display()
        .to_string()
        .split(':')
        .next()
        .unwrap_or("node")
        .to_string()
}

/// The input index of `expr` if it is a bare column (possibly aliased).
fn bare_column(expr: &Expr, schema: &DFSchema) -> Option<usize> {
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

/// Checks every expression node: only allowed kinds, functions and aggregates; member keys only
/// inside COUNT; no sensitive column.
fn check_expressions(
    exprs: &[Expr],
    schema: &DFSchema,
    members: &BTreeSet<usize>,
    aggregates: &[&str],
    policy: &Policy,
) -> Result<()> {
    for expr in exprs {
        let mut verdict = Ok(());
        expr.apply(|e| {
            let problem = fallible::problem(e, schema).or_else(|| match e {
                Expr::Alias(_)
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
                Expr::Column(c) => policy
                    .sensitive_columns
                    .contains(&c.name)
                    .then(|| format!("column `{}` is tagged sensitive", c.name)),
                Expr::ScalarFunction(f) => (!SCALAR_FUNCTIONS.contains(&f.name()))
                    .then(|| format!("function `{}` is not allowed", f.name())),
                Expr::AggregateFunction(f) => {
                    let name = f.func.name();
                    if !aggregates.contains(&name) {
                        Some(format!("aggregate `{name}` is not allowed here"))
                    } else if name != "count"
                        && f.params.args.iter().any(|a| references(a, schema, members))
                    {
                        Some(format!(
                            "member_key may only be counted, not passed to `{name}`"
                        ))
                    } else if f
                        .params
                        .filter
                        .as_ref()
                        .is_some_and(|flt| references(flt, schema, members))
                    {
                        Some("member_key may not be filtered on".to_string())
                    } else {
                        None
                    }
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
            });
            if let Some(problem) = problem {
                verdict = refuse(problem);
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        verdict?;
    }
    Ok(())
}
