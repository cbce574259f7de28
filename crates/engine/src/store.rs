//! The data store: immutable snapshots of Arrow tables in memory, persisted as Parquet files in a
//! data directory with a manifest as the single commit point.
//!
//! A write builds its files under temporary names, renames them into place, then replaces the
//! manifest; only then does the new snapshot become visible. A crash or a rejected upload at any
//! step leaves the previous state intact, and readers always see one whole snapshot.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::record_batch::{RecordBatch, RecordBatchReader};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ingest::{self, IngestReport};
use crate::{Error, Result};

/// A partner's current customer list.
#[derive(Debug, Clone)]
pub struct PartnerList {
    /// Version, counting from 1 with every accepted upload.
    pub version: u32,
    /// `tokens_schema(true)` rows.
    pub tokens: Arc<RecordBatch>,
}

/// One consistent state of everything the engine reads.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The member table, once members have been ingested.
    pub members: Option<Arc<RecordBatch>>,
    /// Member tokens by collaboration (contract) id.
    pub member_tokens: BTreeMap<String, Arc<RecordBatch>>,
    /// Purchase batches, one per ingest.
    pub purchases: Vec<Arc<RecordBatch>>,
    /// Consent event batches, one per ingest.
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
}

/// Writes one batch as a new Parquet file and returns its name in the data directory.
type FileWriter<'a> = dyn FnMut(&str, &RecordBatch) -> Result<String> + 'a;

/// The store: the data directory plus the current snapshot.
pub struct Store {
    dir: PathBuf,
    current: RwLock<Arc<Snapshot>>,
    /// Serializes writers; readers never wait for it.
    writer: Mutex<Manifest>,
    /// Earlier list versions read back from disk, by file name.
    list_cache: Mutex<BTreeMap<String, Arc<RecordBatch>>>,
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
        let read = |name: &String| read_parquet(&dir.join(name)).map(Arc::new);
        let snapshot = Snapshot {
            members: manifest.members.as_ref().map(read).transpose()?,
            member_tokens: manifest
                .member_tokens
                .iter()
                .map(|(k, f)| Ok((k.clone(), read(f)?)))
                .collect::<Result<_>>()?,
            purchases: manifest.purchases.iter().map(read).collect::<Result<_>>()?,
            consent: manifest.consent.iter().map(read).collect::<Result<_>>()?,
            lists: manifest
                .lists
                .iter()
                .filter_map(|(partner, files)| files.last().map(|f| (partner, files.len(), f)))
                .map(|(partner, count, file)| {
                    let version = u32::try_from(count).unwrap_or(u32::MAX);
                    Ok((
                        partner.clone(),
                        PartnerList {
                            version,
                            tokens: read(file)?,
                        },
                    ))
                })
                .collect::<Result<_>>()?,
            consent_snapshot_id: manifest.consent_snapshot_id(),
            data_version: manifest.data_version(),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            current: RwLock::new(Arc::new(snapshot)),
            writer: Mutex::new(manifest),
            list_cache: Mutex::new(BTreeMap::new()),
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

    /// Commits one write: `stage` gets the manifest and a file-writer, returns the new snapshot.
    fn commit(
        &self,
        stage: impl FnOnce(&mut Manifest, &mut FileWriter<'_>, &Snapshot) -> Result<Snapshot>,
    ) -> Result<()> {
        let mut committed = self.writer.lock().expect("writer lock poisoned");
        let mut manifest = committed.clone();
        let base = self.snapshot();
        let dir = self.dir.clone();
        let mut files: Vec<PathBuf> = Vec::new();
        let mut next_file = manifest.next_file;
        let result = {
            let mut writer = |stem: &str, batch: &RecordBatch| -> Result<String> {
                next_file += 1;
                let name = format!("{stem}-{next_file:06}.parquet");
                let path = dir.join(&name);
                write_parquet_atomic(&path, batch)?;
                files.push(path);
                Ok(name)
            };
            stage(&mut manifest, &mut writer, &base)
        };
        let mut snapshot = match result {
            Ok(snapshot) => snapshot,
            Err(e) => {
                // Files written for a failed write are not in any manifest: remove them.
                for f in files {
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
        *committed = manifest;
        *self.current.write().expect("snapshot lock poisoned") = Arc::new(snapshot);
        Ok(())
    }

    /// Replaces the member table and every collaboration's member tokens.
    pub fn replace_members(&self, tables: ingest::MemberTables) -> Result<IngestReport> {
        self.commit(|manifest, write, base| {
            let mut next = base.clone();
            manifest.members = Some(write("members", &tables.members)?);
            next.members = Some(Arc::new(tables.members));
            manifest.member_tokens.clear();
            next.member_tokens.clear();
            for (contract, batch) in tables.tokens {
                let file = write(&format!("member_tokens-{}", file_safe(&contract)), &batch)?;
                manifest.member_tokens.insert(contract.clone(), file);
                next.member_tokens.insert(contract, Arc::new(batch));
            }
            Ok(next)
        })?;
        Ok(tables.report)
    }

    /// Appends a batch of purchases.
    pub fn append_purchases(&self, batch: RecordBatch) -> Result<()> {
        self.commit(|manifest, write, base| {
            let mut next = base.clone();
            manifest.purchases.push(write("purchases", &batch)?);
            next.purchases.push(Arc::new(batch));
            Ok(next)
        })
    }

    /// Appends consent events and returns the new consent snapshot id.
    pub fn append_consent(&self, batch: RecordBatch) -> Result<String> {
        let mut id = String::new();
        self.commit(|manifest, write, base| {
            let mut next = base.clone();
            let file = write("consent", &batch)?;
            let digest = Sha256::digest(std::fs::read(self.dir.join(&file))?);
            let mut chain = Sha256::new();
            chain.update(manifest.consent_chain.as_bytes());
            chain.update(digest);
            manifest.consent_chain = hex::encode(chain.finalize());
            manifest.consent.push(file);
            next.consent.push(Arc::new(batch));
            next.consent_snapshot_id = manifest.consent_snapshot_id();
            id = next.consent_snapshot_id.clone();
            Ok(next)
        })?;
        Ok(id)
    }

    /// Stores a new version of a partner's list and returns its version number.
    pub fn append_list(&self, partner: &str, batch: RecordBatch) -> Result<u32> {
        let mut version = 0;
        self.commit(|manifest, write, base| {
            let mut next = base.clone();
            let file = write(&format!("list-{}", file_safe(partner)), &batch)?;
            let history = manifest.lists.entry(partner.to_string()).or_default();
            history.push(file);
            version = u32::try_from(history.len()).unwrap_or(u32::MAX);
            next.lists.insert(
                partner.to_string(),
                PartnerList {
                    version,
                    tokens: Arc::new(batch),
                },
            );
            Ok(next)
        })?;
        Ok(version)
    }
}

impl Store {
    /// Every version of a partner's list, oldest first (version n at index n − 1). Earlier
    /// versions are read from their Parquet files once and kept: the guard compares new lists
    /// with them and answers frozen lists from them.
    pub fn list_versions(&self, partner: &str) -> Result<Vec<Arc<RecordBatch>>> {
        let files = {
            let manifest = self.writer.lock().expect("writer lock poisoned");
            manifest.lists.get(partner).cloned().unwrap_or_default()
        };
        let mut cache = self.list_cache.lock().expect("list cache lock poisoned");
        files
            .iter()
            .map(|file| match cache.get(file) {
                Some(batch) => Ok(Arc::clone(batch)),
                None => {
                    let batch = Arc::new(read_parquet(&self.dir.join(file))?);
                    cache.insert(file.clone(), Arc::clone(&batch));
                    Ok(batch)
                }
            })
            .collect()
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
    let named: std::collections::BTreeSet<&str> = manifest
        .members
        .iter()
        .chain(manifest.member_tokens.values())
        .chain(&manifest.purchases)
        .chain(&manifest.consent)
        .chain(manifest.lists.values().flatten())
        .map(String::as_str)
        .collect();
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
    sync_dir(path)
}

fn write_parquet_atomic(path: &Path, batch: &RecordBatch) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let file = File::create(&tmp)?;
    let mut writer = ArrowWriter::try_new(file, batch.schema(), None)?;
    writer.write(batch)?;
    let file = writer.into_inner()?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

fn read_parquet(path: &Path) -> Result<RecordBatch> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?.build()?;
    let schema = reader.schema();
    let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(concat_batches(&schema, &batches)?)
}
