//! Turns the guard's released Arrow batch into the two forms a partner receives: typed rows, and
//! Arrow IPC stream bytes that pyarrow, Polars or pandas read without copying.

use cleanroom_engine::arrow::array::{Array, AsArray, RecordBatch};
use cleanroom_engine::arrow::compute::cast;
use cleanroom_engine::arrow::datatypes::{DataType, Float64Type, Int64Type};
use cleanroom_engine::arrow::ipc::writer::StreamWriter;
use cleanroom_proto::v1::{Column, Row, Value, value::Kind};

use crate::{Error, Result};

fn column_kind(data_type: &DataType) -> (&'static str, DataType) {
    match data_type {
        t if t.is_integer() => ("int", DataType::Int64),
        t if t.is_floating()
            || matches!(t, DataType::Decimal128(..) | DataType::Decimal256(..)) =>
        {
            ("double", DataType::Float64)
        }
        _ => ("string", DataType::Utf8),
    }
}

/// The column list and typed rows of a batch.
pub fn rows(batch: &RecordBatch) -> Result<(Vec<Column>, Vec<Row>)> {
    let schema = batch.schema();
    let mut columns = Vec::with_capacity(batch.num_columns());
    let mut values: Vec<Vec<Value>> =
        vec![Vec::with_capacity(batch.num_columns()); batch.num_rows()];
    for (field, array) in schema.fields().iter().zip(batch.columns()) {
        let (kind, target) = column_kind(field.data_type());
        columns.push(Column {
            name: field.name().clone(),
            r#type: kind.to_string(),
        });
        let array =
            cast(array, &target).map_err(|e| Error::Internal(format!("result column: {e}")))?;
        for (row, out) in values.iter_mut().enumerate() {
            let value = if array.is_null(row) {
                Kind::NullValue(true)
            } else {
                match target {
                    DataType::Int64 => Kind::IntValue(array.as_primitive::<Int64Type>().value(row)),
                    DataType::Float64 => {
                        Kind::DoubleValue(array.as_primitive::<Float64Type>().value(row))
                    }
                    _ => Kind::StringValue(array.as_string::<i32>().value(row).to_string()),
                }
            };
            out.push(Value { kind: Some(value) });
        }
    }
    Ok((
        columns,
        values.into_iter().map(|values| Row { values }).collect(),
    ))
}

/// The batch as an Arrow IPC stream.
pub fn arrow_ipc(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut writer = StreamWriter::try_new(&mut bytes, &batch.schema())
        .map_err(|e| Error::Internal(format!("arrow ipc: {e}")))?;
    writer
        .write(batch)
        .map_err(|e| Error::Internal(format!("arrow ipc: {e}")))?;
    writer
        .finish()
        .map_err(|e| Error::Internal(format!("arrow ipc: {e}")))?;
    drop(writer);
    Ok(bytes)
}
