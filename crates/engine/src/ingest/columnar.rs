//! Chunks that arrive as Arrow IPC rather than as records: an export moves as columns, and each
//! row is read in place (no string is copied until it is stored). A chunk is one Arrow IPC stream
//! whose columns are named as the fields of the record it replaces; text columns may be any Arrow
//! string type and number columns any integer type. A column the record does not have is refused:
//! nothing the clean room does not take (a name, an address) is read by accident.

use std::io::Cursor;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::record_batch::RecordBatch;

use crate::Result;

/// The most memory one decoded chunk may take (compressed IPC expands as it is decoded).
const MAX_CHUNK_BYTES: usize = 256 * 1024 * 1024;

fn refused(why: String) -> crate::Error {
    cleanroom_core::Error::Input(why).into()
}

/// The batches of one chunk, each checked to carry only `fields`, all of them.
pub(crate) fn batches(ipc: &[u8], fields: &[&str]) -> Result<Vec<RecordBatch>> {
    let reader = StreamReader::try_new(Cursor::new(ipc), None)
        .map_err(|_| refused("a chunk is not an Arrow IPC stream".into()))?;
    let mut batches = Vec::new();
    let mut size = 0;
    for batch in reader {
        let batch = batch.map_err(|_| refused("a chunk's Arrow IPC stream is damaged".into()))?;
        size += batch.get_array_memory_size();
        if size > MAX_CHUNK_BYTES {
            return Err(refused(format!(
                "a chunk may decode to at most {} MiB; send smaller batches",
                MAX_CHUNK_BYTES >> 20
            )));
        }
        check_fields(&batch, fields)?;
        batches.push(batch);
    }
    Ok(batches)
}

fn check_fields(batch: &RecordBatch, fields: &[&str]) -> Result<()> {
    let schema = batch.schema();
    if let Some(extra) = schema
        .fields()
        .iter()
        .find(|f| !fields.contains(&f.name().as_str()))
    {
        // The column's name is the client's own schema, not a member's value.
        return Err(refused(format!(
            "column `{}` is not a field of this record; the clean room takes only {}",
            extra.name(),
            fields.join(", ")
        )));
    }
    match fields.iter().find(|f| schema.index_of(f).is_err()) {
        Some(missing) => Err(refused(format!("a chunk has no column `{missing}`"))),
        None => Ok(()),
    }
}

/// A text column, whatever string type it arrived as (a null reads as empty).
pub(crate) fn text(batch: &RecordBatch, name: &str) -> Result<StringArray> {
    let column = column_as(batch, name, &DataType::Utf8, "text")?;
    Ok(column.as_string::<i32>().clone())
}

/// A whole-number column, whatever integer type it arrived as.
pub(crate) fn whole(batch: &RecordBatch, name: &str) -> Result<Int64Array> {
    let column = column_as(batch, name, &DataType::Int64, "whole numbers")?;
    Ok(column.as_primitive().clone())
}

fn column_as(batch: &RecordBatch, name: &str, to: &DataType, kind: &str) -> Result<ArrayRef> {
    let column = batch
        .column_by_name(name)
        .ok_or_else(|| refused(format!("a chunk has no column `{name}`")))?;
    let accepted = match to {
        DataType::Utf8 => matches!(
            column.data_type(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ),
        _ => column.data_type().is_integer(),
    };
    if !accepted {
        return Err(refused(format!(
            "column `{name}` must hold {kind}, not {}",
            column.data_type()
        )));
    }
    cast(column, to).map_err(|_| refused(format!("column `{name}` cannot be read as {kind}")))
}

/// The value of row `i` of a text column ("" if null).
pub(crate) fn text_at(column: &StringArray, i: usize) -> &str {
    if column.is_valid(i) {
        column.value(i)
    } else {
        ""
    }
}

/// The value of row `i` of a whole-number column, if it has one.
pub(crate) fn whole_at(column: &Int64Array, i: usize) -> Option<i64> {
    column.is_valid(i).then(|| column.value(i))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int32Array, StringViewArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::arrow::ipc::writer::StreamWriter;

    use super::*;

    fn ipc(batch: &RecordBatch) -> Vec<u8> {
        let mut out = Vec::new();
        let mut writer = StreamWriter::try_new(&mut out, &batch.schema()).unwrap();
        writer.write(batch).unwrap();
        writer.finish().unwrap();
        drop(writer);
        out
    }

    fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
        let fields: Vec<Field> = columns
            .iter()
            .map(|(n, c)| Field::new(*n, c.data_type().clone(), true))
            .collect();
        RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns.into_iter().map(|(_, c)| c).collect(),
        )
        .unwrap()
    }

    #[test]
    fn any_string_and_integer_type_reads_as_text_and_whole_numbers() {
        let b = batch(vec![
            ("a", Arc::new(StringViewArray::from(vec![Some("x"), None]))),
            ("n", Arc::new(Int32Array::from(vec![Some(3), None]))),
        ]);
        let got = batches(&ipc(&b), &["a", "n"]).unwrap();
        let (a, n) = (text(&got[0], "a").unwrap(), whole(&got[0], "n").unwrap());
        assert_eq!((text_at(&a, 0), text_at(&a, 1)), ("x", ""));
        assert_eq!((whole_at(&n, 0), whole_at(&n, 1)), (Some(3), None));
    }

    #[test]
    fn a_column_the_record_does_not_have_is_refused_by_name() {
        let b = batch(vec![
            ("a", Arc::new(StringArray::from(vec!["x"]))),
            ("full_name", Arc::new(StringArray::from(vec!["山田 花子"]))),
        ]);
        let e = batches(&ipc(&b), &["a"]).unwrap_err().to_string();
        assert!(e.contains("column `full_name` is not a field"), "{e}");
        assert!(!e.contains("山田"), "a value must never be echoed: {e}");
    }

    #[test]
    fn a_missing_column_a_wrong_type_and_garbage_are_refused() {
        let b = batch(vec![("a", Arc::new(StringArray::from(vec!["x"])))]);
        let e = batches(&ipc(&b), &["a", "n"]).unwrap_err().to_string();
        assert!(e.contains("no column `n`"), "{e}");
        let got = batches(&ipc(&b), &["a"]).unwrap();
        let e = whole(&got[0], "a").unwrap_err().to_string();
        assert!(e.contains("column `a` must hold whole numbers"), "{e}");
        let e = batches(b"not arrow at all", &["a"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an Arrow IPC stream"), "{e}");
    }
}
