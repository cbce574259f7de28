//! Plan rule `cannot-fail-on-data`: nothing in a plan may fail on a row's value (THREATS 15, 16).
//!
//! Whether a query runs must never depend on a member's row. An expression that errors on one
//! value (a cast of `'鳥取県'` to a number, a division by zero, a date unit read from a column)
//! turns the engine's error into a certain answer about the one member whose row holds that value,
//! and no noise can hide it. DataFusion adds casts of its own while it analyses a plan (type
//! coercion of a comparison, a CASE, an IN list, COALESCE), so the rule is applied to the plan
//! after analysis, and again to the optimised plan that is executed.
//!
//! An expression passes only if it cannot fail on any value of its input types:
//! - a cast whose every source value has a target value (widening numbers, anything to text, a
//!   coarser time unit), or a cast of a constant that succeeds now (and so always);
//! - arithmetic on whole and floating-point numbers (DataFusion wraps on overflow), division and
//!   modulo only by a constant other than 0 and −1 (`i64::MIN / −1` overflows);
//! - LIKE with a constant pattern, and date functions with a constant unit;
//! - comparisons, AND/OR, CASE, IN, COALESCE and the other listed expressions, whose own work
//!   cannot fail once their operands are of one type.

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::logical_expr::{BinaryExpr, Cast, Expr, ExprSchemable, LogicalPlan, Operator};

use super::expressions::first_problem;
use super::{Query, Rule};
use crate::{Error, Result};

/// The rule's name, which prefixes its refusals.
const NAME: &str = "cannot-fail-on-data";

/// The rule in the list, over every expression of the plan as it is checked.
pub(super) const RULE: Rule = Rule { name: NAME, check };

fn check(query: &Query<'_>) -> std::result::Result<(), String> {
    first_problem(&query.expressions, |expr, site| {
        problem(expr, site.input.schema())
    })
}

/// Why `expr` itself (not its children) can fail on a value of its input, if it can. `schema` is
/// the schema the expression is evaluated against.
fn problem(expr: &Expr, schema: &DFSchema) -> Option<String> {
    match expr {
        Expr::Cast(cast) => cast_problem(cast, schema),
        Expr::BinaryExpr(binary) => binary_problem(binary, schema),
        Expr::Like(like) if constant(&like.pattern).is_none() => Some(
            "a LIKE pattern must be a constant: a pattern read from a row can be malformed on one \
             row"
            .into(),
        ),
        Expr::Negative(inner) => match inner.get_type(schema) {
            Ok(t) if is_plain_number(&t) => None,
            _ => Some("only whole and floating-point numbers can be negated".into()),
        },
        Expr::ScalarFunction(f) => {
            let constant_arg = match f.name() {
                "date_trunc" | "date_part" => Some(0),
                "round" if f.args.len() > 1 => Some(1),
                _ => None,
            };
            match constant_arg {
                Some(i) if f.args.get(i).and_then(constant).is_none() => Some(format!(
                    "argument {} of `{}` must be a constant: a value read from a row can be \
                     invalid on one row",
                    i + 1,
                    f.name()
                )),
                _ => None,
            }
        }
        _ => None,
    }
}

fn cast_problem(cast: &Cast, schema: &DFSchema) -> Option<String> {
    let to = cast.field.data_type();
    if let Some(value) = constant(&cast.expr) {
        // A constant converts the same way on every run: if it converts now, it always does.
        return match value.cast_to(to) {
            Ok(_) => None,
            Err(_) => Some(format!(
                "a constant cannot be converted to {to}; compare values of one type"
            )),
        };
    }
    let from = match cast.expr.get_type(schema) {
        Ok(from) => from,
        Err(_) => return Some("the type of a cast's input cannot be determined".into()),
    };
    if cannot_fail(&from, to) {
        return None;
    }
    Some(format!(
        "converting {from} to {to} can fail on one row's value (DataFusion adds such casts \
         itself to compare or combine values of different types: a CASE, IN list or COALESCE \
         that mixes text and numbers, a time compared with text); compare values of one type, or \
         use TRY_CAST"
    ))
}

fn binary_problem(binary: &BinaryExpr, schema: &DFSchema) -> Option<String> {
    use Operator::*;
    let numbers = || {
        [&binary.left, &binary.right]
            .iter()
            .all(|e| e.get_type(schema).is_ok_and(|t| is_plain_number(&t)))
    };
    match binary.op {
        Eq | NotEq | Lt | LtEq | Gt | GtEq | And | Or | IsDistinctFrom | IsNotDistinctFrom
        | StringConcat => None,
        LikeMatch | ILikeMatch | NotLikeMatch | NotILikeMatch => {
            constant(&binary.right).is_none().then(|| {
                "a LIKE pattern must be a constant: a pattern read from a row can be malformed on \
                 one row"
                    .to_string()
            })
        }
        Plus | Minus | Multiply if numbers() => None,
        Plus | Minus | Multiply => Some(
            "arithmetic is allowed on whole and floating-point numbers only: on dates, times \
             and decimals it can overflow on one row's value"
                .into(),
        ),
        Divide | Modulo if numbers() && safe_divisor(&binary.right) => None,
        Divide | Modulo => Some(
            "division and modulo need a constant divisor other than 0 and -1: dividing by a \
             column fails on a zero, which would answer differently for one row"
                .into(),
        ),
        other => Some(format!("operator `{other}` is not allowed")),
    }
}

/// The value of an expression that is a constant (a literal, possibly aliased or cast), if it
/// is one and it converts.
fn constant(expr: &Expr) -> Option<ScalarValue> {
    match expr {
        Expr::Literal(value, _) => Some(value.clone()),
        Expr::Alias(alias) => constant(&alias.expr),
        Expr::Cast(cast) => constant(&cast.expr)?.cast_to(cast.field.data_type()).ok(),
        _ => None,
    }
}

/// A divisor that cannot fail: a non-null constant other than zero and minus one.
fn safe_divisor(expr: &Expr) -> bool {
    let Some(value) = constant(expr) else {
        return false;
    };
    let data_type = value.data_type();
    let is = |n: i64| {
        ScalarValue::Int64(Some(n))
            .cast_to(&data_type)
            .is_ok_and(|v| v == value)
    };
    !value.is_null() && !is(0) && !is(-1) && !is_float_zero(&value)
}

/// Zero of either sign (`-0.0` is not equal to the integer zero cast to a float).
fn is_float_zero(value: &ScalarValue) -> bool {
    match value {
        ScalarValue::Float64(Some(f)) => *f == 0.0,
        ScalarValue::Float32(Some(f)) => *f == 0.0,
        _ => false,
    }
}

/// Whole or floating-point numbers, on which DataFusion's arithmetic wraps instead of failing.
fn is_plain_number(t: &DataType) -> bool {
    t.is_integer() || t.is_floating() || *t == DataType::Null
}

/// The number of decimal digits every value of an integer type fits in.
fn integer_digits(t: &DataType) -> Option<u8> {
    use DataType::*;
    Some(match t {
        Int8 | UInt8 => 3,
        Int16 | UInt16 => 5,
        Int32 | UInt32 => 10,
        Int64 => 19,
        UInt64 => 20,
        _ => return None,
    })
}

/// Whether every value of `from` converts to `to` without an error.
fn cannot_fail(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    if from == to {
        return true;
    }
    match (from, to) {
        (Null, _) => true,
        (Dictionary(_, values), to) => cannot_fail(values, to),
        (from, Utf8 | LargeUtf8 | Utf8View) => {
            from.is_numeric()
                || from.is_temporal()
                || matches!(from, Boolean | Utf8 | LargeUtf8 | Utf8View)
        }
        (Boolean, to) => to.is_integer() || to.is_floating(),
        (from, to) if from.is_integer() && to.is_integer() => integer_widens(from, to),
        (from, Float32 | Float64) => from.is_integer() || from.is_floating(),
        (from, Decimal128(precision, scale)) if from.is_integer() => {
            let room = i16::from(*precision) - i16::from(*scale);
            integer_digits(from).is_some_and(|digits| room >= i16::from(digits))
        }
        (Date32, Date64) => true,
        (Date32, Timestamp(unit, _)) => *unit != TimeUnit::Nanosecond,
        (Timestamp(_, _), Date32 | Date64) => true,
        (Timestamp(from_unit, _), Timestamp(to_unit, _)) => {
            unit_rank(to_unit) <= unit_rank(from_unit)
        }
        _ => false,
    }
}

/// Finer units multiply (and can overflow); coarser ones divide.
fn unit_rank(unit: &TimeUnit) -> u8 {
    match unit {
        TimeUnit::Second => 0,
        TimeUnit::Millisecond => 1,
        TimeUnit::Microsecond => 2,
        TimeUnit::Nanosecond => 3,
    }
}

fn integer_widens(from: &DataType, to: &DataType) -> bool {
    let (Some(from_digits), Some(to_digits)) = (integer_digits(from), integer_digits(to)) else {
        return false;
    };
    let signed = |t: &DataType| t.is_signed_integer();
    match (signed(from), signed(to)) {
        (true, true) | (false, false) => to_digits >= from_digits && bits(to) >= bits(from),
        (false, true) => bits(to) > bits(from),
        (true, false) => false,
    }
}

fn bits(t: &DataType) -> u32 {
    t.primitive_width().map_or(0, |bytes| bytes as u32 * 8)
}

/// Checks every expression of every node of `plan`: the optimised plan, exactly as it will be
/// executed, after every rewrite DataFusion made.
pub(super) fn check_plan_that_runs(plan: &LogicalPlan) -> Result<()> {
    let mut verdict = Ok(());
    plan.apply(|node| {
        let schema = evaluation_schema(node)?;
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                if let Some(why) = problem(e, &schema) {
                    verdict = Err(Error::Guard(format!("{NAME}: {why}")));
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    })?;
    verdict
}

/// The schema a node's expressions are evaluated against: its input's, both sides' for a join,
/// the table's for a scan's filters.
fn evaluation_schema(node: &LogicalPlan) -> datafusion::error::Result<DFSchema> {
    match node {
        LogicalPlan::Join(join) => Ok(join.schema.as_ref().clone()),
        LogicalPlan::TableScan(scan) => DFSchema::try_from_qualified_schema(
            scan.table_name.clone(),
            scan.source.schema().as_ref(),
        ),
        other => Ok(match other.inputs().first() {
            Some(input) => input.schema().as_ref().clone(),
            None => other.schema().as_ref().clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::functions_aggregate::expr_fn::count_distinct;
    use datafusion::logical_expr::{LogicalPlanBuilder, cast, col, lit};

    use super::super::test_plans::*;
    use super::*;

    /// Buyers by category, among purchases where `filter` holds.
    fn buyers_where(filter: Expr) -> LogicalPlan {
        purchases()
            .filter(filter)
            .unwrap()
            .aggregate(
                vec![col("category")],
                vec![count_distinct(col("member_key")).alias("buyers")],
            )
            .and_then(LogicalPlanBuilder::build)
            .unwrap()
    }

    #[test]
    fn expressions_that_cannot_fail_are_accepted() {
        let filter = (col("amount") / lit(2_i64))
            .gt(lit(100_i64))
            .and(cast(col("quantity"), DataType::Utf8).like(lit("1%")));
        let plan = buyers_where(filter);
        accepted(&plan, &policy(&["category"], &["buyers"]));
        check_plan_that_runs(&plan).expect("nothing can fail");
    }

    #[test]
    fn an_expression_that_can_fail_on_a_row_is_refused() {
        let by_a_column = (col("amount") / col("quantity")).gt(lit(100_i64));
        let refusal = refused_by(
            NAME,
            &buyers_where(by_a_column),
            &policy(&["category"], &["buyers"]),
        );
        assert!(refusal.contains("constant divisor"), "{refusal}");

        let text_as_number = cast(col("brand"), DataType::Int64).gt(lit(0_i64));
        let plan = buyers_where(text_as_number);
        let refusal = refused_by(NAME, &plan, &policy(&["category"], &["buyers"]));
        assert!(refusal.contains("converting Utf8 to Int64"), "{refusal}");
        // The plan that runs is held to the same rule, and its refusals name it too.
        let Err(Error::Guard(refusal)) = check_plan_that_runs(&plan) else {
            panic!("the plan that runs is not refused");
        };
        assert!(refusal.starts_with(&format!("{NAME}: ")), "{refusal}");
    }

    #[test]
    fn only_conversions_that_cannot_fail_pass() {
        use DataType::*;
        let utc = Some("UTC".into());
        for (from, to) in [
            (Int32, Int64),
            (UInt32, Int64),
            (Int64, Float64),
            (Int64, Utf8),
            (Timestamp(TimeUnit::Microsecond, utc.clone()), Utf8),
            (Utf8, Utf8View),
            (Date32, Timestamp(TimeUnit::Microsecond, utc.clone())),
            (
                Timestamp(TimeUnit::Nanosecond, None),
                Timestamp(TimeUnit::Microsecond, utc.clone()),
            ),
            (Int64, Decimal128(20, 0)),
            (Null, Int64),
        ] {
            assert!(cannot_fail(&from, &to), "{from} -> {to}");
        }
        for (from, to) in [
            (Utf8, Int64),
            (Utf8, Timestamp(TimeUnit::Nanosecond, utc.clone())),
            (Int64, Int32),
            (Int64, UInt64),
            (UInt64, Int64),
            (Float64, Int64),
            (
                Timestamp(TimeUnit::Microsecond, utc.clone()),
                Timestamp(TimeUnit::Nanosecond, utc),
            ),
            (Int64, Decimal128(10, 2)),
            (Binary, Utf8),
        ] {
            assert!(!cannot_fail(&from, &to), "{from} -> {to}");
        }
    }

    #[test]
    fn a_divisor_must_be_a_constant_other_than_zero_and_minus_one() {
        let lit = |v: ScalarValue| Expr::Literal(v, None);
        assert!(safe_divisor(&lit(ScalarValue::Int64(Some(2)))));
        assert!(safe_divisor(&lit(ScalarValue::Float64(Some(0.5)))));
        assert!(!safe_divisor(&lit(ScalarValue::Int64(Some(0)))));
        assert!(!safe_divisor(&lit(ScalarValue::Int64(Some(-1)))));
        assert!(!safe_divisor(&lit(ScalarValue::Float64(Some(-0.0)))));
        assert!(!safe_divisor(&lit(ScalarValue::Int64(None))));
        assert!(!safe_divisor(&Expr::Column("amount".into())));
    }
}
