//! The data store: immutable snapshots of Arrow tables in memory, persisted as Parquet files in a
//! data directory with a manifest as the single commit point.
//!
//! A write arrives as a stream: its rows are written, a batch at a time, to temporary files in the
//! data directory ([`Staging`]) while the stream is read. Committing syncs them, renames them into
//! place and replaces the manifest; only then does the new snapshot become visible. A crash or a
//! rejected upload at any step leaves the previous state intact (temporary files are removed when
//! the write is dropped, or at the next start), and readers always see one whole snapshot.
//!
//! The retailer's tables are kept in memory as well; partners' lists are not: they are read from
//! their files, a batch at a time, when an answer needs them.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::{
    ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder,
};
use datafusion::parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ingest::{BATCH_ROWS, Sink, Table};
use crate::{Error, Result};

/// A partner's current customer list. It is kept on disk only and read a batch at a time when an
/// answer needs it, so a list of any length costs the service no memory between answers.
#[derive(Debug, Clone)]
pub struct PartnerList {
    /// Version, counting from 1 with every accepted upload.
    pub version: u32,
    file: PathBuf,
}

impl PartnerList {
    /// The list's rows (`tokens_schema(true)`), a batch at a time.
    pub fn batches(&self) -> Result<impl Iterator<Item = Result<RecordBatch>> + use<>> {
        Ok(parquet_batches(&self.file)?.map(|batch| Ok(batch?)))
    }
}

/// One consistent state of everything the engine reads.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The member table, once members have been ingested.
    pub members: Vec<Arc<RecordBatch>>,
    /// Member tokens by collaboration (contract) id.
    pub member_tokens: BTreeMap<String, Vec<Arc<RecordBatch>>>,
    /// Purchases, every ingest's batches in order.
    pub purchases: Vec<Arc<RecordBatch>>,
    /// Consent events, every ingest's batches in order.
    pub consent: Vec<Arc<RecordBatch>>,
    /// Current customer list of each partner.
    pub lists: BTreeMap<String, PartnerList>,
    /// Identifies the consent log's exact content: every ingest changes it.
    pub consent_snapshot_id: String,
    /// Identifies the retailer's data (members, purchases, consent) exactly; partners' lists are
    /// not part of it. The guard keys repeatable answers on it, so that one partner's upload
    /// does not change another partner's answers.
    pub data_version: String,
}

/// What the data directory holds; rewriting it is the commit point of every write.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Manifest {
    members: Option<String>,
    member_tokens: BTreeMap<String, String>,
    purchases: Vec<String>,
    consent: Vec<String>,
    /// Running SHA-256 over the consent files' digests, in ingest order.
    consent_chain: String,
    /// Per partner: every list version's file, oldest first (kept so any result can be traced).
    lists: BTreeMap<String, Vec<String>>,
    next_file: u64,
    /// Writes committed since the directory was created (manifests from before this counter
    /// read 0): checked against the audit trail's records of writes at start-up.
    #[serde(default)]
    commits: u64,
}

impl Manifest {
    fn data_version(&self) -> String {
        format!(
            "{}|{}|{}",
            self.members.as_deref().unwrap_or("-"),
            self.purchases.last().map(String::as_str).unwrap_or("-"),
            self.consent_snapshot_id()
        )
    }

    fn consent_snapshot_id(&self) -> String {
        if self.consent.is_empty() {
            "cs-0-empty".to_string()
        } else {
            format!("cs-{}-{}", self.consent.len(), &self.consent_chain[..12])
        }
    }

    /// Every file the manifest names.
    fn files(&self) -> impl Iterator<Item = &String> {
        self.members
            .iter()
            .chain(self.member_tokens.values())
            .chain(&self.purchases)
            .chain(&self.consent)
            .chain(self.lists.values().flatten())
    }
}

/// The store: the data directory plus the current snapshot.
pub struct Store {
    dir: PathBuf,
    current: RwLock<Arc<Snapshot>>,
    /// Serializes commits (renames and the manifest, never the writing of a table); readers never
    /// wait for it.
    writer: Mutex<Manifest>,
    /// Files no manifest named, removed at open (a crash between writing and committing).
    collected: Vec<String>,
}

const MANIFEST: &str = "manifest.json";

impl Store {
    /// Opens a data directory as its service: loads the committed state and removes the files no
    /// manifest names (see [`Store::collected`]). Only the one service of a directory may do this.
    pub fn open_for_service(dir: &Path) -> Result<Self> {
        let mut store = Self::open(dir)?;
        let manifest = store.writer.lock().expect("writer lock poisoned").clone();
        store.collected = collect_orphans(dir, &manifest)?;
        Ok(store)
    }

    /// Opens (or creates) a data directory and loads the committed state, changing nothing on
    /// disk (for tools reading beside a running service).
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let manifest_path = dir.join(MANIFEST);
        let manifest: Manifest = if manifest_path.exists() {
            serde_json::from_slice(&std::fs::read(&manifest_path)?)
                .map_err(|e| Error::Storage(format!("manifest is corrupt: {e}")))?
        } else {
            Manifest::default()
        };
        let read = |name: &String| read_parquet(&dir.join(name));
        let read_all = |names: &[String]| -> Result<Vec<Arc<RecordBatch>>> {
            Ok(names
                .iter()
                .map(read)
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .flatten()
                .collect())
        };
        let snapshot = Snapshot {
            members: manifest
                .members
                .as_ref()
                .map(read)
                .transpose()?
                .unwrap_or_default(),
            member_tokens: manifest
                .member_tokens
                .iter()
                .map(|(k, f)| Ok((k.clone(), read(f)?)))
                .collect::<Result<_>>()?,
            purchases: read_all(&manifest.purchases)?,
            consent: read_all(&manifest.consent)?,
            lists: manifest
                .lists
                .iter()
                .filter_map(|(partner, files)| files.last().map(|f| (partner, files.len(), f)))
                .map(|(partner, count, file)| {
                    let list = PartnerList {
                        version: u32::try_from(count).unwrap_or(u32::MAX),
                        file: dir.join(file),
                    };
                    (partner.clone(), list)
                })
                .collect(),
            consent_snapshot_id: manifest.consent_snapshot_id(),
            data_version: manifest.data_version(),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            current: RwLock::new(Arc::new(snapshot)),
            writer: Mutex::new(manifest),
            collected: Vec::new(),
        })
    }

    /// The files no manifest named that open removed.
    pub fn collected(&self) -> &[String] {
        &self.collected
    }

    /// Writes committed so far.
    pub fn commits(&self) -> u64 {
        self.writer.lock().expect("writer lock poisoned").commits
    }

    /// The current snapshot. Holding it keeps its data alive and unchanged.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().expect("snapshot lock poisoned").clone()
    }

    /// A new write's staging area, in the data directory.
    pub fn staging(&self) -> Staging {
        Staging {
            dir: self.dir.clone(),
            tables: BTreeMap::new(),
        }
    }

    /// Commits one write: `stage` gets the manifest, a function that moves a staged table into
    /// place under a new file name, and the current snapshot, and returns the new snapshot. Only
    /// renames and the manifest happen under the commit lock; the tables were written and synced
    /// before. Files the write replaced are removed once it is committed.
    fn commit(
        &self,
        stage: impl FnOnce(&mut Manifest, &mut Placer<'_>, &Snapshot) -> Result<Snapshot>,
    ) -> Result<()> {
        let mut committed = self.writer.lock().expect("writer lock poisoned");
        let mut manifest = committed.clone();
        let base = self.snapshot();
        let mut placed: Vec<PathBuf> = Vec::new();
        let mut next_file = manifest.next_file;
        let result = {
            let mut place = |stem: &str, staged: &mut Staged| -> Result<String> {
                next_file += 1;
                let name = format!("{stem}-{next_file:06}.parquet");
                let path = self.dir.join(&name);
                std::fs::rename(&staged.tmp, &path)?;
                staged.placed = true;
                placed.push(path);
                Ok(name)
            };
            stage(&mut manifest, &mut place, &base).and_then(|snapshot| {
                sync_dir(&self.dir)?;
                Ok(snapshot)
            })
        };
        let mut snapshot = match result {
            Ok(snapshot) => snapshot,
            Err(e) => {
                // Files placed for a failed write are not in any manifest: remove them.
                for f in placed {
                    let _ = std::fs::remove_file(f);
                }
                return Err(e);
            }
        };
        manifest.next_file = next_file;
        manifest.commits += 1;
        snapshot.data_version = manifest.data_version();
        let bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| Error::Storage(format!("manifest: {e}")))?;
        write_atomic(&self.dir.join(MANIFEST), &bytes)?;
        let replaced: Vec<&String> = committed
            .files()
            .filter(|f| !manifest.files().any(|kept| kept == *f))
            .collect();
        for file in replaced {
            // Best effort: a file left behind is collected at the next start.
            let _ = std::fs::remove_file(self.dir.join(file));
        }
        *committed = manifest;
        *self.current.write().expect("snapshot lock poisoned") = Arc::new(snapshot);
        Ok(())
    }

    /// Replaces the member table and every collaboration's member tokens with a staged member
    /// ingest.
    pub fn commit_members(&self, mut staging: Staging) -> Result<()> {
        staging.close()?;
        self.commit(|manifest, place, base| {
            let mut next = base.clone();
            let members = staging.table(&Table::Members)?;
            manifest.members = Some(place("members", members)?);
            next.members = std::mem::take(&mut members.batches);
            manifest.member_tokens.clear();
            next.member_tokens.clear();
            for (table, staged) in &mut staging.tables {
                let Table::MemberTokens(contract) = table else {
                    continue;
                };
                let file = place(&format!("member_tokens-{}", file_safe(contract)), staged)?;
                manifest.member_tokens.insert(contract.clone(), file);
                next.member_tokens
                    .insert(contract.clone(), std::mem::take(&mut staged.batches));
            }
            Ok(next)
        })
    }

    /// Appends a staged purchase ingest.
    pub fn commit_purchases(&self, mut staging: Staging) -> Result<()> {
        staging.close()?;
        self.commit(|manifest, place, base| {
            let mut next = base.clone();
            let purchases = staging.table(&Table::Purchases)?;
            manifest.purchases.push(place("purchases", purchases)?);
            next.purchases.append(&mut purchases.batches);
            Ok(next)
        })
    }

    /// Appends a staged consent ingest and returns the new consent snapshot id.
    pub fn commit_consent(&self, mut staging: Staging) -> Result<String> {
        staging.close()?;
        let digest = staging.table(&Table::Consent)?.digest;
        let mut id = String::new();
        self.commit(|manifest, place, base| {
            let mut next = base.clone();
            let consent = staging.table(&Table::Consent)?;
            let file = place("consent", consent)?;
            let mut chain = Sha256::new();
            chain.update(manifest.consent_chain.as_bytes());
            chain.update(digest);
            manifest.consent_chain = hex::encode(chain.finalize());
            manifest.consent.push(file);
            next.consent.append(&mut consent.batches);
            next.consent_snapshot_id = manifest.consent_snapshot_id();
            id = next.consent_snapshot_id.clone();
            Ok(next)
        })?;
        Ok(id)
    }

    /// Stores a staged list as the new version of a partner's list and returns its version.
    pub fn commit_list(&self, partner: &str, mut staging: Staging) -> Result<u32> {
        staging.close()?;
        let mut version = 0;
        self.commit(|manifest, place, base| {
            let mut next = base.clone();
            let file = place(
                &format!("list-{}", file_safe(partner)),
                staging.table(&Table::List)?,
            )?;
            let history = manifest.lists.entry(partner.to_string()).or_default();
            history.push(file.clone());
            version = u32::try_from(history.len()).unwrap_or(u32::MAX);
            let list = PartnerList {
                version,
                file: self.dir.join(file),
            };
            next.lists.insert(partner.to_string(), list);
            Ok(next)
        })?;
        Ok(version)
    }
}

/// Moves a staged table into the data directory under a new name (`<stem>-<n>.parquet`).
type Placer<'a> = dyn FnMut(&str, &mut Staged) -> Result<String> + 'a;

/// One write's tables while its stream is read: Parquet files under temporary names in the data
/// directory, filled a batch at a time, invisible until [`Store`] commits them. Dropped without a
/// commit, it removes its files.
pub struct Staging {
    dir: PathBuf,
    tables: BTreeMap<Table, Staged>,
}

/// One staged table.
struct Staged {
    tmp: PathBuf,
    writer: Option<ArrowWriter<HashingFile>>,
    /// SHA-256 of the file, once closed.
    digest: [u8; 32],
    /// The rows, kept for the snapshot; not for lists, which are read from disk when needed.
    batches: Vec<Arc<RecordBatch>>,
    /// Renamed into place by a commit: no longer this staging's to remove.
    placed: bool,
}

/// Numbers staging files within this process; files of earlier processes are collected at start.
static STAGED_FILES: AtomicU64 = AtomicU64::new(0);

impl Staged {
    fn create(dir: &Path, schema: SchemaRef) -> Result<Self> {
        let n = STAGED_FILES.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("staging-{}-{n}.tmp", std::process::id()));
        let file = HashingFile {
            file: File::create(&tmp)?,
            sha: Sha256::new(),
        };
        let writer = ArrowWriter::try_new(file, schema, Some(writer_properties()))?;
        Ok(Self {
            tmp,
            writer: Some(writer),
            digest: [0; 32],
            batches: Vec::new(),
            placed: false,
        })
    }
}

impl Sink for Staging {
    fn write(&mut self, table: &Table, batch: RecordBatch) -> Result<()> {
        if !self.tables.contains_key(table) {
            let staged = Staged::create(&self.dir, batch.schema())?;
            self.tables.insert(table.clone(), staged);
        }
        let staged = self.tables.get_mut(table).expect("inserted above");
        let writer = staged
            .writer
            .as_mut()
            .ok_or_else(|| Error::Storage("a staged table was written after closing".into()))?;
        writer.write(&batch)?;
        // Row groups are flushed as they fill, so the writer holds at most one in memory.
        if *table != Table::List && batch.num_rows() > 0 {
            staged.batches.push(Arc::new(batch));
        }
        Ok(())
    }
}

/// A file that hashes what is written to it, so a staged table's digest costs no second read.
struct HashingFile {
    file: File,
    sha: Sha256,
}

impl std::io::Write for HashingFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let written = self.file.write(bytes)?;
        self.sha.update(&bytes[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Staging {
    /// Finishes every table's file and syncs it to disk. A commit does this too; done before,
    /// on the thread that wrote the tables, the commit has only renames and the manifest left.
    pub fn close(&mut self) -> Result<()> {
        for staged in self.tables.values_mut() {
            if let Some(writer) = staged.writer.take() {
                let written = writer.into_inner()?;
                written.file.sync_all()?;
                staged.digest = written.sha.finalize().into();
            }
        }
        Ok(())
    }

    fn table(&mut self, table: &Table) -> Result<&mut Staged> {
        self.tables
            .get_mut(table)
            .ok_or_else(|| Error::Storage(format!("the write staged no {table:?} table")))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        for staged in self.tables.values_mut() {
            // Close the file before removing it; errors do not matter for a file being discarded.
            drop(staged.writer.take());
            if !staged.placed {
                let _ = std::fs::remove_file(&staged.tmp);
            }
        }
    }
}

/// Keeps only characters safe in a file name; ids are configuration, but never trust them as paths.
fn file_safe(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Removes the data files (and temporary files) of `dir` that `manifest` does not name: what a
/// crash between writing a file and committing the manifest leaves. Never visible, now gone.
fn collect_orphans(dir: &Path, manifest: &Manifest) -> Result<Vec<String>> {
    let named: std::collections::BTreeSet<&str> = manifest.files().map(String::as_str).collect();
    let mut collected = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let data_file = name.ends_with(".parquet") || name.ends_with(".tmp");
        if data_file && entry.file_type()?.is_file() && !named.contains(name.as_str()) {
            std::fs::remove_file(entry.path())?;
            collected.push(name);
        }
    }
    collected.sort();
    Ok(collected)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Parquet files are written in row groups of [`BATCH_ROWS`] rows: the writer holds at most one.
fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_max_row_group_row_count(Some(BATCH_ROWS))
        .build()
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)?.sync_all()?;
    Ok(())
}

fn parquet_batches(path: &Path) -> Result<ParquetRecordBatchReader> {
    Ok(ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?
        .with_batch_size(BATCH_ROWS)
        .build()?)
}

fn read_parquet(path: &Path) -> Result<Vec<Arc<RecordBatch>>> {
    parquet_batches(path)?
        .map(|batch| Ok(Arc::new(batch?)))
        .collect()
}
