//! The safe views as standard DataFusion nodes, for a cluster. A Ballista scheduler and its
//! executors know only DataFusion's own plan nodes, not this crate's [`super::SafeView`] and its
//! [`super::filter::AudienceExec`]. So, after the guard has checked and optimised a plan, each scan
//! of a safe view in it is replaced by what the view is: the table's committed Parquet files
//! joined, on the member key, with the audience written as a Parquet file (a semi-join for
//! `purchases`, an inner join carrying the partner attribute for `members`), under the view's
//! name and with the columns the scan read. The plan above is unchanged, and so is its answer.

use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::Transformed;
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::{DefaultTableSource, MemTable, provider_as_source};
use datafusion::logical_expr::{
    EmptyRelation, Expr, JoinType, LogicalPlan, LogicalPlanBuilder, TableScan,
};

use super::{MEMBER_KEY, PARTNER_ATTRIBUTE as ATTRIBUTE, SafeView, file_table};
use crate::{Error, Result};

/// The audience file's schema: each member of the audience and its partner attribute.
pub(crate) fn audience_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new(MEMBER_KEY, DataType::Int64, false),
        Field::new(ATTRIBUTE, DataType::Utf8, false),
    ]))
}

/// `plan` with every safe view's scan replaced by standard nodes over `audience_file`.
pub(crate) fn with_standard_scans(plan: LogicalPlan, audience_file: &Path) -> Result<LogicalPlan> {
    let audience = file_table(audience_schema(), &[audience_file])?;
    // The first refusal of a scan, kept as the guard's own error: passed through DataFusion's
    // error type it would read as an execution failure.
    let mut refused = None;
    let rewritten = plan.transform_up_with_subqueries(|node| {
        let LogicalPlan::TableScan(scan) = &node else {
            return Ok(Transformed::no(node));
        };
        match standard_scan(scan, &audience) {
            Ok(standard) => Ok(Transformed::yes(standard)),
            Err(e) => {
                refused.get_or_insert(e);
                Ok(Transformed::no(node))
            }
        }
    })?;
    match refused {
        Some(e) => Err(e),
        None => Ok(rewritten.data),
    }
}

/// The standard nodes for one scan of a safe view. Any other scan is refused: a checked plan
/// reads safe views only.
fn standard_scan(scan: &TableScan, audience: &Arc<dyn TableProvider>) -> Result<LogicalPlan> {
    let view = scan
        .source
        .downcast_ref::<DefaultTableSource>()
        .and_then(|s| s.table_provider.downcast_ref::<SafeView>())
        .ok_or_else(|| {
            Error::Guard("a checked plan read something other than a safe view".into())
        })?;
    if scan.fetch.is_some() {
        return Err(Error::Guard("a checked plan limited a scan".into()));
    }
    let wanted: Vec<usize> = match &scan.projection {
        Some(p) => p.clone(),
        None => (0..view.schema.fields().len()).collect(),
    };
    let table = &view.source;
    if table.is::<MemTable>() {
        // A table with no committed file: no rows, the scan's columns.
        let schema = DFSchema::try_from_qualified_schema(
            scan.table_name.clone(),
            &view.schema.project(&wanted)?,
        )?;
        return Ok(LogicalPlan::EmptyRelation(EmptyRelation {
            produce_one_row: false,
            schema: Arc::new(schema),
        }));
    }
    let stored = table.schema().fields().len();
    let table_col = |i: usize| Expr::Column(Column::new(Some("t"), table.schema().field(i).name()));
    let audience_col = |name: &str| Expr::Column(Column::new(Some("a"), name));
    let joined = LogicalPlanBuilder::scan("t", provider_as_source(Arc::clone(table)), None)?;
    let audience = LogicalPlanBuilder::scan("a", provider_as_source(Arc::clone(audience)), None)?;
    let keys = (
        vec![Column::new(Some("t"), MEMBER_KEY)],
        vec![Column::new(Some("a"), MEMBER_KEY)],
    );
    // Only `members` carries the attribute; `purchases` keeps its own rows of audience members.
    let attribute_wanted = wanted.iter().any(|c| *c >= stored);
    let join_type = if attribute_wanted {
        JoinType::Inner
    } else {
        JoinType::LeftSemi
    };
    let joined = joined.join(audience.build()?, join_type, keys, None)?;
    let columns = wanted.iter().map(|c| {
        let source = if *c < stored {
            table_col(*c)
        } else {
            audience_col(ATTRIBUTE)
        };
        source.alias(view.schema.field(*c).name())
    });
    Ok(joined
        .project(columns)?
        .alias(scan.table_name.clone())?
        .build()?)
}
