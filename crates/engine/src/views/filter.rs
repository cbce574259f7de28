//! The audience applied inside the plan: an operator over a retailer table's scan that keeps
//! only the rows of the question's audience (by member key) and adds the partner attribute where
//! the view has it. Only the columns the query reads are touched.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray};
use datafusion::arrow::buffer::BooleanBuffer;
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{Int64Type, SchemaRef};
use datafusion::common::Statistics;
use datafusion::common::stats::Precision;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::statistics::{ChildStats, StatisticsArgs};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
};
use futures::StreamExt;

use crate::audience::Audience;

/// Where an output column comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Output {
    /// A column of the scan, by position.
    Column(usize),
    /// The partner attribute of the row's member.
    Attribute,
}

/// How many rows a member has in the table under the view: what the planner may expect of the
/// view's size (it picks a join's smaller side by it).
#[derive(Debug, Clone, Copy)]
pub(crate) enum RowsPerMember {
    /// At most one (members): the view has at most the audience's size.
    One,
    /// Any number (purchases): at most the table's own size.
    Many,
}

/// Keeps the audience's rows of its input.
#[derive(Debug)]
pub(crate) struct AudienceExec {
    input: Arc<dyn ExecutionPlan>,
    audience: Arc<Audience>,
    /// The input column holding the member key.
    key: usize,
    outputs: Vec<Output>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    rows: RowsPerMember,
}

impl AudienceExec {
    pub(crate) fn new(
        input: Arc<dyn ExecutionPlan>,
        audience: Arc<Audience>,
        key: usize,
        outputs: Vec<Output>,
        schema: SchemaRef,
    ) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            input.output_partitioning().clone(),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Self {
            input,
            audience,
            key,
            outputs,
            schema,
            properties,
            rows: RowsPerMember::Many,
        }
    }

    /// The same, expecting `rows` per member in its input.
    pub(crate) fn with_rows(mut self, rows: RowsPerMember) -> Self {
        self.rows = rows;
        self
    }
}

impl DisplayAs for AudienceExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "AudienceExec: {} members", self.audience.len())
    }
}

#[allow(deprecated)]
impl ExecutionPlan for AudienceExec {
    fn name(&self) -> &str {
        "AudienceExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(
            Self::new(
                children.swap_remove(0),
                Arc::clone(&self.audience),
                self.key,
                self.outputs.clone(),
                Arc::clone(&self.schema),
            )
            .with_rows(self.rows),
        ))
    }

    fn child_stats_requests(&self, partition: Option<usize>) -> Vec<ChildStats> {
        vec![ChildStats::At(partition)]
    }

    /// An estimate only (the rows kept are known when they are scanned): at most the scan's
    /// rows, and for a table of one row per member at most the audience's size.
    fn statistics_from_inputs(
        &self,
        input_stats: &[Arc<Statistics>],
        _args: &StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        let scanned = input_stats
            .first()
            .map_or(Precision::Absent, |s| s.num_rows.to_inexact());
        let num_rows = match self.rows {
            RowsPerMember::Many => scanned,
            RowsPerMember::One => match scanned.get_value() {
                Some(n) => Precision::Inexact((*n).min(self.audience.len())),
                None => Precision::Inexact(self.audience.len()),
            },
        };
        Ok(Arc::new(Statistics {
            num_rows,
            total_byte_size: Precision::Absent,
            column_statistics: Statistics::unknown_column(&self.schema),
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let (audience, key) = (Arc::clone(&self.audience), self.key);
        let (outputs, schema) = (self.outputs.clone(), Arc::clone(&self.schema));
        let kept = input.map(move |batch| keep(&batch?, &audience, key, &outputs, &schema));
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            kept,
        )))
    }
}

/// The rows of `batch` whose member is in the audience, as the view's columns. One look-up per
/// scanned row decides the row and, where the view shows it, finds the member's attribute.
fn keep(
    batch: &RecordBatch,
    audience: &Audience,
    key: usize,
    outputs: &[Output],
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let members = batch.column(key).as_primitive::<Int64Type>().values();
    let shows_attribute = outputs.iter().any(|o| matches!(o, Output::Attribute));
    let mut attributes = Vec::new();
    let mask = BooleanBuffer::collect_bool(members.len(), |row| {
        match audience.attribute_index(members[row]) {
            Some(attribute) => {
                if shows_attribute {
                    attributes.push(attribute);
                }
                true
            }
            None => false,
        }
    });
    let kept = filter_record_batch(batch, &BooleanArray::new(mask, None))?;
    let columns = outputs
        .iter()
        .map(|output| match output {
            Output::Column(at) => Arc::clone(kept.column(*at)),
            Output::Attribute => {
                let texts: StringArray = attributes
                    .iter()
                    .map(|a| Some(audience.attribute_text(*a)))
                    .collect();
                Arc::new(texts) as ArrayRef
            }
        })
        .collect();
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(kept.num_rows())),
    )?)
}
