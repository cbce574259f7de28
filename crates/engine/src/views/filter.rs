//! The audience applied inside the plan: an operator over a retailer table's scan that keeps
//! only the rows of the question's audience (by member key) and adds the partner attribute where
//! the view has it. Only the columns the query reads are touched.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{Int64Type, SchemaRef};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
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
        }
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
        Ok(Arc::new(Self::new(
            children.swap_remove(0),
            Arc::clone(&self.audience),
            self.key,
            self.outputs.clone(),
            Arc::clone(&self.schema),
        )))
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

/// The rows of `batch` whose member is in the audience, as the view's columns.
fn keep(
    batch: &RecordBatch,
    audience: &Audience,
    key: usize,
    outputs: &[Output],
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let members = batch.column(key).as_primitive::<Int64Type>();
    let mask: BooleanArray = members
        .values()
        .iter()
        .map(|m| Some(audience.contains(*m)))
        .collect();
    let kept = filter_record_batch(batch, &mask)?;
    let kept_members = kept.column(key).as_primitive::<Int64Type>();
    let columns = outputs
        .iter()
        .map(|output| match output {
            Output::Column(at) => Arc::clone(kept.column(*at)),
            Output::Attribute => {
                let attributes: StringArray = kept_members
                    .values()
                    .iter()
                    .map(|m| audience.attribute(*m))
                    .collect();
                Arc::new(attributes) as ArrayRef
            }
        })
        .collect();
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(kept.num_rows())),
    )?)
}
