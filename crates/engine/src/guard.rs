//! The guard: the one place where the clean room's privacy rules are enforced, on the DataFusion
//! `LogicalPlan` of every query, whatever its template says.
//!
//! [`run`] is the only entry point that releases data. In order, it:
//! 1. plans the SQL against a session holding only the safe views;
//! 2. checks the plan: aggregate output only, only allowed nodes and functions, member keys used
//!    only to join and to count, no sensitive column, output columns exactly as declared;
//! 3. binds the typed parameters as literal values (never as SQL text);
//! 4. adds a distinct-member count to the output aggregate and executes;
//! 5. releases only rows with at least k distinct members, over the full declared domain of the
//!    output, and suppresses complementary cells so that no withheld cell can be derived from a
//!    total minus the released cells.
//!
//! Withheld rows are reported only as a count over the full domain, so the response looks the same
//! whether a withheld row had no member or some below k.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use datafusion::arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use datafusion::arrow::compute::{cast, concat_batches, take_record_batch};
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, ParamValues, ScalarValue};
use datafusion::functions_aggregate::expr_fn::count_distinct;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Expr, Filter, JoinType, Limit, LogicalPlan, Operator, Projection, Sort,
    SubqueryAlias,
};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement;

use cleanroom_core::allowlist::{BoundValue, QueryDef};
use cleanroom_core::rules::{Contract, Rules};

use crate::views::{MEMBER_KEY, SAFE_VIEWS};
use crate::{Error, Result};

/// Name of the column the guard adds to count distinct members per output row. It never leaves
/// the guard.
const MEMBER_COUNT: &str = "__cleanroom_member_count";

/// Aggregates a query may output. MIN and MAX are absent: they release one member's value.
const OUTPUT_AGGREGATES: &[&str] = &["count", "sum", "avg"];

/// Aggregates allowed inside a query, for per-member intermediate values that are then counted.
const INNER_AGGREGATES: &[&str] = &["count", "sum", "avg", "min", "max"];

/// Scalar functions a query may use.
const SCALAR_FUNCTIONS: &[&str] = &[
    "date_trunc",
    "date_part",
    "coalesce",
    "nullif",
    "round",
    "floor",
    "ceil",
    "abs",
    "lower",
    "upper",
];

/// The largest output domain (product of the dimensions' domain sizes) the guard will enumerate.
const MAX_DOMAIN_CELLS: usize = 1_000_000;

/// What the guard enforces for one query run.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Minimum distinct members behind every released row.
    pub k: u32,
    /// Output dimensions, in order, each with every value it may take.
    pub dimensions: Vec<(String, Vec<String>)>,
    /// Output metric columns, in order after the dimensions.
    pub metrics: Vec<String>,
    /// Column names no query may touch.
    pub sensitive_columns: BTreeSet<String>,
}

impl Policy {
    /// The policy of one allow-listed query run by one partner under its contract: the effective
    /// k, the dimensions' domains as that partner sees them, and the rules' sensitive columns.
    pub fn for_query(rules: &Rules, query: &QueryDef, contract: &Contract, partner: &str) -> Self {
        Self {
            k: rules.effective_k(contract, query.k),
            dimensions: query
                .dimensions
                .iter()
                .map(|d| {
                    (
                        d.name.clone(),
                        rules.domain(&d.domain, partner).unwrap_or_default(),
                    )
                })
                .collect(),
            metrics: query.metrics.clone(),
            sensitive_columns: rules.sensitive_column_names(),
        }
    }

    fn output_columns(&self) -> Vec<String> {
        self.dimensions
            .iter()
            .map(|(name, _)| name.clone())
            .chain(self.metrics.iter().cloned())
            .collect()
    }
}

/// The released part of a query's answer.
#[derive(Debug)]
pub struct Released {
    /// Released rows, in domain order, with the declared output columns only.
    pub batch: RecordBatch,
    /// Cells of the output domain not released (below k, empty, or complementary).
    pub suppressed_rows: u64,
    /// Of those, cells that had at least k members but were withheld to protect another cell.
    /// For the audit trail only: it must not reach the partner.
    pub complementary_suppressed: u64,
    /// Result rows whose dimension values fall outside the declared domain; dropped. For the
    /// audit trail only.
    pub out_of_domain_rows: u64,
}

/// Per-partner query budgets over a rolling 24 hours: how many answers a partner has received
/// recently. Spent budgets refuse with the time the next answer becomes possible.
#[derive(Debug, Default)]
pub struct Budgets {
    answered: std::sync::Mutex<HashMap<String, std::collections::VecDeque<DateTime<Utc>>>>,
}

/// The window a budget counts over.
const BUDGET_WINDOW_HOURS: i64 = 24;

impl Budgets {
    /// Rebuilds the ledger from earlier answers (partner, time), for example from the audit trail,
    /// so a restart does not refill anyone's budget.
    pub fn from_history(history: impl IntoIterator<Item = (String, DateTime<Utc>)>) -> Self {
        let mut answered: HashMap<String, std::collections::VecDeque<DateTime<Utc>>> =
            HashMap::new();
        for (partner, at) in history {
            answered.entry(partner).or_default().push_back(at);
        }
        for times in answered.values_mut() {
            times.make_contiguous().sort();
        }
        Self {
            answered: std::sync::Mutex::new(answered),
        }
    }

    /// Refuses if the partner has already had `limit` answers in the last 24 hours.
    pub fn check(&self, partner: &str, limit: Option<u32>, now: DateTime<Utc>) -> Result<()> {
        let Some(limit) = limit else { return Ok(()) };
        let mut answered = self.answered.lock().expect("budget lock poisoned");
        let times = answered.entry(partner.to_string()).or_default();
        let window = chrono::Duration::hours(BUDGET_WINDOW_HOURS);
        while times.front().is_some_and(|t| *t + window <= now) {
            times.pop_front();
        }
        if times.len() >= limit as usize {
            let reset = times.front().map(|t| *t + window).unwrap_or(now);
            return Err(cleanroom_core::Error::Limit(format!(
                "query budget of {limit} answers per 24 hours is spent; the next answer is possible at {}",
                reset.to_rfc3339()
            ))
            .into());
        }
        Ok(())
    }

    /// Counts one answer released to the partner.
    pub fn spend(&self, partner: &str, now: DateTime<Utc>) {
        let mut answered = self.answered.lock().expect("budget lock poisoned");
        answered
            .entry(partner.to_string())
            .or_default()
            .push_back(now);
    }
}

/// Turns a checked parameter into the literal bound to its placeholder. Dates mean local midnight
/// at the retailer's UTC offset.
pub fn bind_value(value: &BoundValue, utc_offset_minutes: i32) -> ScalarValue {
    match value {
        BoundValue::Date(date) => {
            let micros = local_midnight_micros(*date, utc_offset_minutes);
            ScalarValue::TimestampMicrosecond(Some(micros), Some("UTC".into()))
        }
        BoundValue::Int(i) => ScalarValue::Int64(Some(*i)),
        BoundValue::Str(s) => ScalarValue::Utf8(Some(s.clone())),
    }
}

fn local_midnight_micros(date: NaiveDate, utc_offset_minutes: i32) -> i64 {
    let midnight = date.and_time(NaiveTime::MIN).and_utc().timestamp_micros();
    midnight - i64::from(utc_offset_minutes) * 60_000_000
}

fn refuse<T>(reason: impl Into<String>) -> Result<T> {
    Err(Error::Guard(reason.into()))
}

/// Plans and checks a query without running it, as `queries lint` and the server's start-up do.
pub async fn check(ctx: &SessionContext, sql: &str, policy: &Policy) -> Result<()> {
    let plan = plan_sql(ctx, sql).await?;
    check_plan(&plan, policy).map(|_| ())
}

/// Runs one query under the guard. This is the only function that releases query results.
pub async fn run(
    ctx: &SessionContext,
    sql: &str,
    params: &BTreeMap<String, ScalarValue>,
    policy: &Policy,
) -> Result<Released> {
    let plan = plan_sql(ctx, sql).await?;
    let member_index = check_plan(&plan, policy)?;
    let values: HashMap<String, ScalarValue> =
        params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let bound = plan
        .with_param_values(ParamValues::from(values))
        .map_err(|_| Error::Guard("the query's parameters do not match its placeholders".into()))?;
    let counted = add_member_count(&bound, member_index)?;
    let frame = ctx.execute_logical_plan(counted).await?;
    let planned_schema = Arc::new(frame.schema().as_arrow().clone());
    let batches = frame.collect().await?;
    // No group at all (nobody eligible) yields no batch: an empty result of the planned schema.
    let schema = batches
        .first()
        .map(|b| b.schema())
        .unwrap_or(planned_schema);
    let batch = concat_batches(&schema, &batches)?;
    release(&batch, policy)
}

/// Parses exactly one SELECT and plans it against the session's tables (only the safe views).
async fn plan_sql(ctx: &SessionContext, sql: &str) -> Result<LogicalPlan> {
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
    state.statement_to_plan(statement).await.map_err(|e| {
        // The planner's message can name tables and columns; keep it in the server log only.
        tracing::debug!(error = %e, "query failed to plan against the safe views");
        Error::Guard(
            "the query does not plan against the safe views (unknown table or column?)".into(),
        )
    })
}

/// Checks the plan and returns the index, in the output aggregate's input schema, of a column
/// that carries the member key.
fn check_plan(plan: &LogicalPlan, policy: &Policy) -> Result<usize> {
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
    let mut node = plan;
    let aggregate = loop {
        match node {
            LogicalPlan::Projection(p) => {
                check_expressions(&p.expr, p.input.schema(), &BTreeSet::new(), &[], policy)?;
                node = &p.input;
            }
            LogicalPlan::Filter(f) => {
                check_expressions(
                    std::slice::from_ref(&f.predicate),
                    f.input.schema(),
                    &BTreeSet::new(),
                    &[],
                    policy,
                )?;
                node = &f.input;
            }
            LogicalPlan::Sort(s) => {
                let exprs: Vec<Expr> = s.expr.iter().map(|e| e.expr.clone()).collect();
                check_expressions(&exprs, s.input.schema(), &BTreeSet::new(), &[], policy)?;
                node = &s.input;
            }
            LogicalPlan::Limit(l) => node = &l.input,
            LogicalPlan::SubqueryAlias(s) => node = &s.input,
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
    }
    check_expressions(&aggregate.group_expr, input_schema, &members, &[], policy)?;
    check_expressions(
        &aggregate.aggr_expr,
        input_schema,
        &members,
        OUTPUT_AGGREGATES,
        policy,
    )?;
    Ok(member_index)
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
            let problem = match e {
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
                | Expr::Cast(_)
                | Expr::TryCast(_)
                | Expr::InList(_)
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
            };
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

/// Adds `count(DISTINCT member_key)` to the output aggregate and carries it up to the output.
fn add_member_count(plan: &LogicalPlan, member_index: usize) -> Result<LogicalPlan> {
    let rebuilt = match plan {
        LogicalPlan::Aggregate(a) => {
            let (qualifier, field) = a.input.schema().qualified_field(member_index);
            let member = Expr::Column(Column::new(qualifier.cloned(), field.name()));
            let mut aggr_expr = a.aggr_expr.clone();
            aggr_expr.push(count_distinct(member).alias(MEMBER_COUNT));
            LogicalPlan::Aggregate(Aggregate::try_new(
                Arc::clone(&a.input),
                a.group_expr.clone(),
                aggr_expr,
            )?)
        }
        LogicalPlan::Projection(p) => {
            let input = add_member_count(&p.input, member_index)?;
            let (qualifier, field) = input
                .schema()
                .qualified_field_with_unqualified_name(MEMBER_COUNT)?;
            let mut expr = p.expr.clone();
            expr.push(Expr::Column(Column::new(qualifier.cloned(), field.name())));
            LogicalPlan::Projection(Projection::try_new(expr, Arc::new(input))?)
        }
        LogicalPlan::Filter(f) => {
            let input = add_member_count(&f.input, member_index)?;
            LogicalPlan::Filter(Filter::try_new(f.predicate.clone(), Arc::new(input))?)
        }
        LogicalPlan::Sort(s) => {
            let input = add_member_count(&s.input, member_index)?;
            LogicalPlan::Sort(Sort {
                expr: s.expr.clone(),
                input: Arc::new(input),
                fetch: s.fetch,
            })
        }
        LogicalPlan::Limit(l) => {
            let input = add_member_count(&l.input, member_index)?;
            LogicalPlan::Limit(Limit {
                skip: l.skip.clone(),
                fetch: l.fetch.clone(),
                input: Arc::new(input),
            })
        }
        LogicalPlan::SubqueryAlias(s) => {
            let input = add_member_count(&s.input, member_index)?;
            LogicalPlan::SubqueryAlias(SubqueryAlias::try_new(Arc::new(input), s.alias.clone())?)
        }
        _ => return refuse("the output must be an aggregate"),
    };
    Ok(rebuilt)
}

/// Applies the threshold and complementary suppression over the output's full domain, and returns
/// the released rows in domain order.
fn release(batch: &RecordBatch, policy: &Policy) -> Result<Released> {
    let dims = policy.dimensions.len();
    let count_column = batch.num_columns() - 1;
    let counts = cast(batch.column(count_column), &DataType::Int64)?;
    let counts = counts.as_primitive::<Int64Type>();
    let sizes: Vec<usize> = policy.dimensions.iter().map(|(_, d)| d.len()).collect();
    let cells = sizes
        .iter()
        .try_fold(1usize, |acc, s| acc.checked_mul(*s))
        .filter(|c| *c <= MAX_DOMAIN_CELLS)
        .ok_or_else(|| Error::Guard("the output domain is too large to protect".into()))?;
    let positions: Vec<HashMap<&str, usize>> = policy
        .dimensions
        .iter()
        .map(|(_, domain)| {
            domain
                .iter()
                .enumerate()
                .map(|(i, v)| (v.as_str(), i))
                .collect()
        })
        .collect();
    let dim_text = (0..dims)
        .map(|i| cast(batch.column(i), &DataType::Utf8))
        .collect::<std::result::Result<Vec<_>, _>>()?;

    // Every cell of the domain starts with zero members; result rows fill in theirs.
    let mut member_count = vec![0i64; cells];
    let mut row_of_cell: Vec<Option<u32>> = vec![None; cells];
    let mut out_of_domain_rows = 0u64;
    'rows: for row in 0..batch.num_rows() {
        let mut cell = 0usize;
        for (d, text) in dim_text.iter().enumerate() {
            let text = text.as_string::<i32>();
            let position = text
                .is_valid(row)
                .then(|| positions[d].get(text.value(row)))
                .flatten();
            let Some(position) = position else {
                out_of_domain_rows += 1;
                continue 'rows;
            };
            cell = cell * sizes[d] + position;
        }
        if row_of_cell[cell].is_some() {
            return refuse("the output has two rows for the same dimension values");
        }
        member_count[cell] = if counts.is_valid(row) {
            counts.value(row)
        } else {
            0
        };
        row_of_cell[cell] = Some(u32::try_from(row).expect("fewer rows than cells"));
    }

    let k = i64::from(policy.k);
    let mut released: Vec<bool> = member_count.iter().map(|c| *c >= k).collect();
    let below_k = released.iter().filter(|r| !**r).count();
    complementary_suppression(&sizes, &member_count, &mut released, k);
    let released_cells: Vec<u32> = (0..cells)
        .filter(|c| released[*c])
        .map(|c| row_of_cell[c].expect("a released cell has a row"))
        .collect();
    let released_count = released_cells.len();
    let kept = take_record_batch(batch, &UInt32Array::from(released_cells))?;
    let output = kept.project(&(0..count_column).collect::<Vec<_>>())?;
    Ok(Released {
        batch: output,
        suppressed_rows: (cells - released_count) as u64,
        complementary_suppressed: (cells - released_count - below_k) as u64,
        out_of_domain_rows,
    })
}

/// Complementary suppression along every dimension. For each line of the grid (all cells that
/// share every coordinate but one), if it withholds any cell but none with at least k members,
/// the released cell with the fewest members is withheld too. The line's total minus its released
/// cells then sums a group of at least k members and cannot be split back into the small cells.
///
/// The rule looks only at which cells are below k, never at how far below: a cell with no member
/// and a cell with k−1 lead to the same decisions.
fn complementary_suppression(sizes: &[usize], member_count: &[i64], released: &mut [bool], k: i64) {
    let cells = member_count.len();
    loop {
        let mut changed = false;
        for (d, &size) in sizes.iter().enumerate() {
            let stride: usize = sizes[d + 1..].iter().product();
            for base in (0..cells).filter(|c| (c / stride).is_multiple_of(size)) {
                let line = (0..size).map(|j| base + j * stride);
                let withholds = line.clone().any(|c| !released[c]);
                let protected = line.clone().any(|c| !released[c] && member_count[c] >= k);
                if withholds
                    && !protected
                    && let Some(c) = line
                        .filter(|c| released[*c])
                        .min_by_key(|c| (member_count[*c], *c))
                {
                    released[c] = false;
                    changed = true;
                }
            }
        }
        if !changed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_small_cell_takes_the_smallest_released_cell_with_it() {
        let counts = [3, 50, 12, 40];
        let mut released: Vec<bool> = counts.iter().map(|c| *c >= 10).collect();
        complementary_suppression(&[4], &counts, &mut released, 10);
        assert_eq!(released, [false, true, false, true]);
    }

    #[test]
    fn zero_and_small_cells_lead_to_the_same_decisions() {
        let decide = |small: i64| {
            let counts = [small, 50, 12, 40, 0, 33, 80, 45, 61];
            let mut released: Vec<bool> = counts.iter().map(|c| *c >= 10).collect();
            complementary_suppression(&[3, 3], &counts, &mut released, 10);
            released
        };
        let with_zero = decide(0);
        assert!(with_zero.iter().any(|r| *r), "something is still released");
        for small in 1..10 {
            assert_eq!(decide(small), with_zero, "small = {small}");
        }
    }

    #[test]
    fn dates_bind_as_local_midnight() {
        let date = NaiveDate::from_ymd_opt(2026, 4, 1).unwrap();
        let ScalarValue::TimestampMicrosecond(Some(micros), _) =
            bind_value(&BoundValue::Date(date), 540)
        else {
            panic!("not a timestamp");
        };
        let utc = chrono::DateTime::from_timestamp_micros(micros).unwrap();
        assert_eq!(utc.to_rfc3339(), "2026-03-31T15:00:00+00:00");
    }
}
