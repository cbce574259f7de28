//! Chunks that arrive as Arrow IPC rather than as records: an export moves as columns, and each
//! row is read in place (no string is copied until it is stored). A chunk is one Arrow IPC stream
//! whose columns are named as the fields of the record it replaces; text columns may be any Arrow
//! string type and number columns any integer type. A column the record does not have is refused:
//! nothing the clean room does not take (a name, an address) is read by accident. Buffers must be
//! uncompressed (the gRPC channel may compress): Arrow's decoder trusts a compressed buffer's
//! declared length.

use std::io::Cursor;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::{MessageHeader, root_as_message};
use datafusion::arrow::record_batch::RecordBatch;

use crate::Result;

/// The most memory one decoded chunk may take (compressed IPC expands as it is decoded).
const MAX_CHUNK_BYTES: usize = 256 * 1024 * 1024;

fn refused(why: String) -> crate::Error {
    cleanroom_core::Error::Input(why).into()
}

/// The batches of one chunk, each checked to carry only `fields`, all of them.
pub(crate) fn batches(ipc: &[u8], fields: &[&str]) -> Result<Vec<RecordBatch>> {
    check_framing(ipc)?;
    // Arrow's decoder unwraps parts of the metadata a damaged stream may lack (a field's type,
    // a dictionary's index type): its panic refuses this chunk, it does not fail the service.
    let batches = std::panic::catch_unwind(|| decode(ipc))
        .unwrap_or_else(|_| Err(refused("a chunk's Arrow IPC stream is damaged".into())))?;
    for batch in &batches {
        check_fields(batch, fields)?;
    }
    Ok(batches)
}

/// Arrow's decoding of a chunk whose framing [`check_framing`] found sound, within
/// [`MAX_CHUNK_BYTES`].
fn decode(ipc: &[u8]) -> Result<Vec<RecordBatch>> {
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
        batches.push(batch);
    }
    Ok(batches)
}

/// Walks the messages of a chunk before Arrow's reader does, and refuses what that reader would
/// trust: a length of metadata or body beyond the bytes that follow (it allocates the declared
/// length before reading: a damaged length aborted the whole service), and compressed buffers
/// (it allocates each one's declared length, and an LZ4 frame inflates without bound).
fn check_framing(ipc: &[u8]) -> Result<()> {
    let mut rest = ipc;
    let mut first = true;
    let word = |bytes: &[u8]| {
        bytes
            .get(..4)
            .map(|w| i32::from_le_bytes([w[0], w[1], w[2], w[3]]))
    };
    // Fewer than four bytes left reads as the end of the stream, as Arrow's reader reads it.
    while let Some(mut length) = word(rest) {
        let broken = || {
            refused(if first {
                "a chunk is not an Arrow IPC stream".into()
            } else {
                "a chunk's Arrow IPC stream is damaged".into()
            })
        };
        rest = &rest[4..];
        // A continuation marker (0xFFFFFFFF) comes before the length in current streams.
        if length == -1 {
            length = word(rest).ok_or_else(broken)?;
            rest = &rest[4..];
        }
        if length == 0 {
            return Ok(());
        }
        let length = usize::try_from(length).ok().filter(|l| *l <= rest.len());
        let (metadata, after) = rest.split_at(length.ok_or_else(broken)?);
        // Copied, as Arrow's reader copies it: the flatbuffer is read aligned.
        let metadata = metadata.to_vec();
        let message = root_as_message(&metadata).map_err(|_| broken())?;
        let body = usize::try_from(message.bodyLength())
            .ok()
            .filter(|b| *b <= after.len());
        rest = &after[body.ok_or_else(broken)?..];
        let batch = match message.header_type() {
            MessageHeader::RecordBatch => message.header_as_record_batch(),
            MessageHeader::DictionaryBatch => {
                message.header_as_dictionary_batch().and_then(|d| d.data())
            }
            _ => None,
        };
        if batch.is_some_and(|b| b.compression().is_some()) {
            return Err(refused(
                "a chunk's Arrow IPC stream is compressed; send uncompressed batches".into(),
            ));
        }
        first = false;
    }
    Ok(())
}

fn check_fields(batch: &RecordBatch, fields: &[&str]) -> Result<()> {
    let schema = batch.schema();
    if let Some(extra) = schema
        .fields()
        .iter()
        .find(|f| !fields.contains(&f.name().as_str()))
    {
        // The column's name is the client's own schema, not a member's value; quoted as an
        // excerpt, since a client may name a column anything.
        return Err(refused(format!(
            "column `{}` is not a field of this record; the clean room takes only {}",
            cleanroom_core::files::excerpt(extra.name()),
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
        // Found by the Arrow IPC fuzzer: a name was quoted whole, control characters and all.
        let odd = format!("\0{}", "x".repeat(500));
        let b = batch(vec![(
            odd.as_str(),
            Arc::new(StringArray::from(vec!["x"])) as ArrayRef,
        )]);
        let e = batches(&ipc(&b), &["a"]).unwrap_err().to_string();
        assert!(e.contains("column `\\0xxx") && e.len() < 200, "{e}");
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

    /// Where the batch message of a one-batch stream starts: after the schema message.
    fn second_message(stream: &[u8]) -> usize {
        let length = |at: usize| {
            let word: [u8; 4] = stream[at + 4..at + 8].try_into().unwrap();
            i32::from_le_bytes(word) as usize
        };
        let schema = root_as_message(&stream[8..8 + length(0)]).unwrap();
        8 + length(0) + schema.bodyLength() as usize
    }

    /// Found by the Arrow IPC fuzzer: a body length overwritten by a huge one made Arrow's reader
    /// allocate it before reading, and the allocation's failure aborted the whole process.
    #[test]
    fn a_huge_declared_body_is_refused_before_arrow_allocates_it() {
        let b = batch(vec![("a", Arc::new(StringArray::from(vec!["x"])))]);
        let valid = ipc(&b);
        let at = second_message(&valid);
        let meta = at + 8..at + 8 + (valid.len() - at - 8).min(1024);
        let body = root_as_message(&valid[meta.clone()]).unwrap().bodyLength();
        for huge in [1i64 << 50, i64::MAX, -8] {
            let mut damaged = valid.clone();
            // The body length is the one 8-byte word of the metadata that holds it.
            let word = (meta.start..meta.end - 8)
                .step_by(8)
                .find(|&w| damaged[w..w + 8] == body.to_le_bytes())
                .expect("the body length in the metadata");
            damaged[word..word + 8].copy_from_slice(&huge.to_le_bytes());
            let e = batches(&damaged, &["a"]).unwrap_err().to_string();
            assert!(e.contains("Arrow IPC stream is damaged"), "{e}");
        }
    }

    /// Found by the Arrow IPC fuzzer: Arrow allocates a compressed buffer's declared length (a
    /// damaged one aborted the process) and an LZ4 frame inflates without bound.
    #[test]
    fn compressed_buffers_are_refused() {
        use datafusion::arrow::ipc::CompressionType;
        use datafusion::arrow::ipc::writer::IpcWriteOptions;
        let b = batch(vec![("a", Arc::new(StringArray::from(vec!["x"; 100])))]);
        for compression in [CompressionType::LZ4_FRAME, CompressionType::ZSTD] {
            let options = IpcWriteOptions::default()
                .try_with_compression(Some(compression))
                .unwrap();
            let mut out = Vec::new();
            let mut writer = StreamWriter::try_new_with_options(&mut out, &b.schema(), options);
            let writer = writer.as_mut().unwrap();
            writer.write(&b).unwrap();
            writer.finish().unwrap();
            let e = batches(&out, &["a"]).unwrap_err().to_string();
            assert!(e.contains("Arrow IPC stream is compressed"), "{e}");
        }
    }

    /// Found by the Arrow IPC fuzzer: Arrow's decoder unwraps parts of the metadata a damaged
    /// stream may lack (one bit flipped in a field's type was enough). Every single flipped bit
    /// of a small chunk is refused precisely or read, never a panic of the caller.
    #[test]
    fn every_single_flipped_bit_of_a_chunk_is_refused_or_read() {
        let b = batch(vec![
            ("a", Arc::new(StringArray::from(vec!["x"]))),
            ("n", Arc::new(Int32Array::from(vec![3]))),
        ]);
        let valid = ipc(&b);
        for at in 0..valid.len() {
            for bit in 0..8 {
                let mut damaged = valid.clone();
                damaged[at] ^= 1 << bit;
                if let Err(e) = batches(&damaged, &["a", "n"]) {
                    let e = e.to_string();
                    assert!(e.starts_with("invalid input: "), "byte {at} bit {bit}: {e}");
                }
            }
        }
    }
}
