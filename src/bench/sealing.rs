//! What sealing costs a collaboration's file: the same token rows written through the store's
//! staging area twice, once sealed with a data key (Parquet modular encryption, plus the unsealed
//! copy written into a hash for the content digest) and once as plain Parquet, in the same run.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use cleanroom_core::keys::KeyStore;
use cleanroom_core::token::MasterSecret;
use cleanroom_engine::arrow::array::{FixedSizeBinaryArray, Int64Array, UInt32Array};
use cleanroom_engine::arrow::record_batch::RecordBatch;
use cleanroom_engine::ingest::{BATCH_ROWS, Sink, Table};
use cleanroom_engine::store::{DataKeys, KeyRef, Store};
use rand::RngCore as _;
use serde::Serialize;

/// Rows written each way, in batches of the store's row-group size.
const ROWS: usize = 1_000_000;
/// Each way is written this many times, alternating, and keeps its best round.
const ROUNDS: usize = 3;

/// Rows per second written and synced, sealed and plain.
#[derive(Debug, Default, Serialize)]
pub struct SealingFigures {
    pub rows: usize,
    pub sealed_rows_per_s: f64,
    pub plain_rows_per_s: f64,
}

/// Writes [`ROWS`] member tokens sealed and unsealed through fresh stores in a scratch directory.
pub fn measure() -> Result<SealingFigures> {
    let scratch = tempfile::tempdir()?;
    let secret = MasterSecret::new(vec![7; 32])?;
    let keys = KeyStore::open(&scratch.path().join("keys"), secret)?;
    let key = KeyRef {
        contract: "bench".into(),
        version: 1,
    };
    keys.key(&key.contract, key.version, chrono::Utc::now())?;
    let keys: Arc<dyn DataKeys> = keys;
    let sealed = Store::open_with_keys(&scratch.path().join("sealed"), keys)?;
    let plain = Store::open(&scratch.path().join("plain"))?;
    let batches = token_batches()?;
    let table = Table::MemberTokens(key.contract.clone());
    let mut figures = SealingFigures {
        rows: ROWS,
        ..Default::default()
    };
    for _ in 0..ROUNDS {
        let rate = rows_per_s(&sealed, &table, Some(&key), &batches)?;
        figures.sealed_rows_per_s = figures.sealed_rows_per_s.max(rate);
        let rate = rows_per_s(&plain, &table, None, &batches)?;
        figures.plain_rows_per_s = figures.plain_rows_per_s.max(rate);
    }
    Ok(figures)
}

/// Stages `batches` as `table` (sealed with `key` if given), closes the file (written and synced)
/// and discards it; the rate of rows through.
fn rows_per_s(
    store: &Store,
    table: &Table,
    key: Option<&KeyRef>,
    batches: &[RecordBatch],
) -> Result<f64> {
    let started = Instant::now();
    let mut staging = store.staging();
    if let Some(key) = key {
        staging.seal(table.clone(), key.clone())?;
    }
    for batch in batches {
        staging.write(table, batch.clone())?;
    }
    staging.close()?;
    let rate = ROWS as f64 / started.elapsed().as_secs_f64();
    drop(staging);
    Ok(rate)
}

/// Member tokens as a members ingest writes them: owner, key version, a random 32-byte MAC.
fn token_batches() -> Result<Vec<RecordBatch>> {
    let schema = cleanroom_engine::tables::tokens::schema(false);
    let mut rng = rand::rng();
    let mut batches = Vec::new();
    for start in (0..ROWS).step_by(BATCH_ROWS) {
        let rows = BATCH_ROWS.min(ROWS - start);
        let mut macs = vec![0u8; rows * 32];
        rng.fill_bytes(&mut macs);
        let owners = Int64Array::from_iter_values((start..start + rows).map(|i| i as i64));
        let versions = UInt32Array::from(vec![1u32; rows]);
        let macs = FixedSizeBinaryArray::try_new(32, macs.into(), None)?;
        batches.push(RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(owners), Arc::new(versions), Arc::new(macs)],
        )?);
    }
    Ok(batches)
}
