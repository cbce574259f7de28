//! The data store: immutable snapshots of Arrow tables in memory, persisted as Parquet files in a
//! data directory with a manifest as the single commit point.
//!
//! A write arrives as a stream: its rows are written, a batch at a time, to temporary files in the
//! data directory ([`Staging`]) while the stream is read. Committing syncs them, renames them into
//! place and replaces the manifest; only then does the new snapshot become visible. A crash or a
//! rejected upload at any step leaves the previous state intact (temporary files are removed when
//! the write is dropped, or at the next start), and readers always see one whole snapshot.
//!
//! The manifest is the store's record: every file with its SHA-256, and a log of every committed
//! write (what it was, for whom, its request id, the files it placed and replaced), from which
//! a retried write is recognised and the partners' list allowances are rebuilt. Opening checks
//! before it changes anything ([`Found`]): a manifest missing while data files exist, or naming a
//! file that is gone, refuses the start instead of deleting or ignoring data.
//!
//! Nothing of the tables is kept in memory: questions scan the committed files through DataFusion
//! (purchases in a file per month of each ingest, so a window reads only its months' row groups),
//! and lists, member tokens and consent events are read a batch at a time when needed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::{
    ArrowReaderOptions, ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder,
};
use datafusion::parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use cleanroom_core::files;

use crate::ingest::{BATCH_ROWS, IngestReport, Sink, Table};
use crate::{Error, Result};

mod erasure;
mod retention;
mod rotation;
mod sealing;
pub use erasure::{ERASE_MEMBERS, Erased, ErasureAsk, tombstone_rows};
pub use retention::{ListVersion, PurchasesRemoved, SWEEP};
pub use rotation::{KeyDestroyed, Rotated, TokensRemoved};
pub use sealing::{DataKeys, KeyRef, NoKeys, Sealed};

/// A partner's current customer list. It is kept on disk only and read a batch at a time when an
/// answer needs it, so a list of any length costs the service no memory between answers.
#[derive(Debug, Clone)]
pub struct PartnerList {
    /// Version, counting from 1 with every accepted upload.
    pub version: u32,
    /// SHA-256 of the list's file: the content the answers over it read.
    pub digest: String,
    /// The key versions of its tokens: one (a list is under one version), or none if empty.
    pub key_versions: BTreeSet<u32>,
    file: TableFile,
}

impl PartnerList {
    /// The list's rows (`tables::tokens::schema(true)`), a batch at a time.
    pub fn batches(&self) -> Result<impl Iterator<Item = Result<RecordBatch>> + use<>> {
        self.file.batches()
    }

    /// The key its file is sealed with: answers over it are stored sealed with the same key.
    pub fn sealed(&self) -> Option<&Sealed> {
        self.file.sealed.as_ref()
    }
}

/// A committed table file: read a batch at a time, or scanned by DataFusion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFile {
    /// Where it is.
    pub path: PathBuf,
    /// The key it is sealed with, for a collaboration's file (member tokens, a list version).
    pub sealed: Option<Sealed>,
}

impl TableFile {
    /// How many rows it holds (from its footer).
    pub fn rows(&self) -> Result<u64> {
        let builder = self.reader()?;
        Ok(u64::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0))
    }

    /// Its rows, a batch at a time.
    pub fn batches(&self) -> Result<impl Iterator<Item = Result<RecordBatch>> + use<>> {
        let reader = self.reader()?.with_batch_size(BATCH_ROWS).build()?;
        Ok(reader.map(|batch| Ok(batch?)))
    }

    /// A reader of the file, opened with its data key if it is sealed.
    fn reader(&self) -> Result<ParquetRecordBatchReaderBuilder<File>> {
        let mut options = ArrowReaderOptions::new();
        if let Some(sealed) = &self.sealed {
            options = options.with_file_decryption_properties(sealed.decryption()?);
        }
        Ok(ParquetRecordBatchReaderBuilder::try_new_with_options(
            File::open(&self.path)?,
            options,
        )?)
    }
}

/// One consistent state of everything the engine reads: the committed files of each table.
/// Nothing of the tables is held in memory; questions scan the files, and the operating system's
/// page cache keeps what is read often.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The member table's file, once members have been ingested.
    pub members: Option<TableFile>,
    /// Member tokens by collaboration (contract) id.
    pub member_tokens: BTreeMap<String, TableFile>,
    /// The key versions each collaboration's member tokens were computed under (during a
    /// rotation's overlap, two), by contract id.
    pub member_token_versions: BTreeMap<String, BTreeSet<u32>>,
    /// Each collaboration's member-tokens file and the digest of its content, by contract id:
    /// what a list's matches depend on besides the list and the member table (a tokens-only
    /// ingest or a rotation changes it alone).
    pub member_tokens_version: BTreeMap<String, String>,
    /// Purchases: a file per month of each ingest, in ingest order.
    pub purchases: Vec<TableFile>,
    /// Consent events: a file per ingest, in ingest order.
    pub consent: Vec<TableFile>,
    /// Current customer list of each partner.
    pub lists: BTreeMap<String, PartnerList>,
    /// Identifies the consent log's exact content: every ingest changes it.
    pub consent_snapshot_id: String,
    /// A digest of the retailer's data (members, member tokens, purchases, consent): of its
    /// committed files' names and SHA-256s, so that every ingest makes a new version and
    /// different data never has the same one, even after a restore from backup. Partners' lists
    /// are not part of it, so one partner's upload does not change another partner's answers. The
    /// guard keys answers and noise on it.
    pub data_version: String,
    /// The member table's file and SHA-256 (each collaboration's member tokens are written with
    /// it): what a list's matches depend on, besides the list.
    pub members_version: String,
    /// Partners whose every list version the retention rules destroyed (`max_list_days`), with
    /// the local day they did, until the partner uploads a new list.
    pub lists_destroyed: BTreeMap<String, chrono::NaiveDate>,
    /// Erasure tombstones (`tables::erasures`), once a member has been erased: read by consent
    /// ingests only, so not part of [`Snapshot::data_version`].
    pub erasures: Option<TableFile>,
    /// Partners whose every list version went with a key version a rotation destroyed, until
    /// the partner uploads a new list.
    pub lists_key_destroyed: BTreeMap<String, KeyDestroyed>,
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
    /// SHA-256 of every file named above (files of older manifests are hashed when opened).
    #[serde(default)]
    digests: BTreeMap<String, String>,
    /// Every write committed since the log began, oldest first.
    #[serde(default)]
    log: Vec<CommitRecord>,
    /// Per partner: list versions destroyed from the front of its `lists` (retention, or the
    /// collaboration's end), so a version keeps its number when older ones are gone.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    lists_dropped: BTreeMap<String, u32>,
    /// Per partner: the local day the retention rules destroyed its current list, until it
    /// uploads a new one ([`Snapshot::lists_destroyed`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    lists_destroyed: BTreeMap<String, chrono::NaiveDate>,
    /// The erasure tombstones' file, replaced whole by each erasure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    erasures: Option<String>,
    /// The key versions of the tokens in each token file (member tokens, lists), by file name:
    /// recorded as the file is written (files of older manifests are read when opened).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    key_versions: BTreeMap<String, BTreeSet<u32>>,
    /// Per partner: the key version a rotation destroyed with its last list versions, and the
    /// day, until it uploads a new list ([`Snapshot::lists_key_destroyed`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    lists_key_destroyed: BTreeMap<String, KeyDestroyed>,
    /// The key each sealed file (a collaboration's member tokens, a list version) was sealed
    /// with, by file name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    keys: BTreeMap<String, KeyRef>,
    /// The SHA-256 of each sealed file's content as unsealed Parquet, by file name: what the
    /// data version and a list's digest are made of, so that sealing (a fresh nonce each time)
    /// changes no answer's key, and the same content keeps the same noise.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    contents: BTreeMap<String, String>,
}

/// One committed write, as the manifest remembers it: enough to answer a retry of it, to rebuild
/// list allowances, and to name it in the audit trail if a crash lost its record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// Its place among the directory's commits, from 1.
    pub seq: u64,
    /// When it was committed.
    pub at: DateTime<Utc>,
    /// The call that made it (`IngestMembers`, `UploadList`, ...).
    pub method: String,
    /// The partner whose list it was, for list uploads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner: Option<String>,
    /// The caller's request id, if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Records received.
    pub received: u64,
    /// Records accepted.
    pub accepted: u64,
    /// Records skipped, by reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rejected: BTreeMap<String, u64>,
    /// The data files it placed.
    pub files: Vec<String>,
    /// The data files it replaced (removed once it was committed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaced: Vec<String>,
    /// The list version it stored, for list uploads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_version: Option<u32>,
    /// The consent snapshot it produced, for consent ingests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_snapshot_id: Option<String>,
    /// The collaboration (contract) whose files it destroyed, for a destruction: start-up
    /// finishes a destruction a crash cut after this commit (its stored answers and key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// For a destruction, each file it destroyed (name, SHA-256, rows): the proof start-up writes
    /// when a crash cut the destruction before its audit record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destroyed: Vec<DestroyedFile>,
    /// For a destruction, why (`expiry`, `manual`, ...), for the same proof.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One destroyed file, as a destruction's proof names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestroyedFile {
    /// Its name in the data directory.
    pub name: String,
    /// The SHA-256 of its content.
    pub sha256: String,
    /// Rows it held.
    pub rows: u64,
}

/// What a commit produced besides its files, for its record.
#[derive(Debug, Default)]
struct Produced {
    list_version: Option<u32>,
    consent_snapshot_id: Option<String>,
    ended: Option<String>,
    destroyed: Vec<DestroyedFile>,
    reason: Option<String>,
}

/// What a write is, for its commit record (the store adds where it went).
#[derive(Debug, Clone)]
pub struct WriteFacts {
    /// When.
    pub at: DateTime<Utc>,
    /// The call (`IngestMembers`, `UploadList`, ...).
    pub method: String,
    /// The partner whose list it is, for list uploads.
    pub partner: Option<String>,
    /// The caller's request id, if any.
    pub request_id: Option<String>,
    /// What happened to its records.
    pub report: IngestReport,
}

impl Manifest {
    /// The SHA-256 of the retailer's files, each by its role, name and SHA-256, in a fixed order.
    /// The names change with every commit (as counters did), so an ingest always makes new data,
    /// whatever it holds; the content digests make it differ whenever the content differs, even
    /// after a restore from backup reuses a name.
    fn data_version(&self) -> String {
        let mut hash = Sha256::new();
        let mut part = |role: &str, file: &str| {
            for field in [role, file, self.content(file)] {
                hash.update(field.as_bytes());
                hash.update([0]);
            }
        };
        if let Some(members) = &self.members {
            part("members", members);
        }
        for (contract, file) in &self.member_tokens {
            part(&format!("member_tokens/{contract}"), file);
        }
        for file in &self.purchases {
            part("purchases", file);
        }
        for file in &self.consent {
            part("consent", file);
        }
        hex::encode(hash.finalize())
    }

    /// The state this manifest commits, as files under `dir`, sealed files opened through `keys`.
    fn snapshot(&self, dir: &Path, keys: &Arc<dyn DataKeys>) -> Snapshot {
        let file = |name: &String| self.table_file(dir, keys, name);
        Snapshot {
            members: self.members.as_ref().map(file),
            member_tokens: self
                .member_tokens
                .iter()
                .map(|(contract, name)| (contract.clone(), file(name)))
                .collect(),
            member_token_versions: self
                .member_tokens
                .iter()
                .map(|(contract, name)| (contract.clone(), self.versions_in(name)))
                .collect(),
            member_tokens_version: self
                .member_tokens
                .iter()
                .map(|(contract, name)| {
                    (contract.clone(), format!("{name}:{}", self.content(name)))
                })
                .collect(),
            purchases: self.purchases.iter().map(file).collect(),
            consent: self.consent.iter().map(file).collect(),
            lists: self
                .lists
                .iter()
                .filter_map(|(partner, files)| files.last().map(|f| (partner, f)))
                .map(|(partner, name)| {
                    let list = PartnerList {
                        version: self.list_version(partner),
                        digest: self.content(name).to_string(),
                        key_versions: self.versions_in(name),
                        file: file(name),
                    };
                    (partner.clone(), list)
                })
                .collect(),
            consent_snapshot_id: self.consent_snapshot_id(),
            data_version: self.data_version(),
            members_version: self.members_version(),
            lists_destroyed: self.lists_destroyed.clone(),
            erasures: self.erasures.as_ref().map(file),
            lists_key_destroyed: self.lists_key_destroyed.clone(),
        }
    }

    /// The committed file `name` under `dir`, with the key it is sealed with.
    fn table_file(&self, dir: &Path, keys: &Arc<dyn DataKeys>, name: &str) -> TableFile {
        TableFile {
            path: dir.join(name),
            sealed: self
                .keys
                .get(name)
                .map(|key| Sealed::new(key.clone(), Arc::clone(keys))),
        }
    }

    /// The key versions of a token file's tokens, as recorded.
    fn versions_in(&self, file: &str) -> BTreeSet<u32> {
        self.key_versions.get(file).cloned().unwrap_or_default()
    }

    /// Every token file the manifest names: member tokens and list versions.
    fn token_files(&self) -> impl Iterator<Item = &String> {
        self.member_tokens
            .values()
            .chain(self.lists.values().flatten())
    }

    /// The number of a partner's newest list version: versions destroyed from the front keep
    /// counting.
    fn list_version(&self, partner: &str) -> u32 {
        let held = self.lists.get(partner).map_or(0, Vec::len);
        let dropped = self.lists_dropped.get(partner).copied().unwrap_or(0);
        dropped.saturating_add(u32::try_from(held).unwrap_or(u32::MAX))
    }

    /// The member table's file and digest.
    fn members_version(&self) -> String {
        match &self.members {
            Some(file) => format!("{file}:{}", self.digest(file)),
            None => "-".into(),
        }
    }

    /// A file's SHA-256, as recorded.
    fn digest(&self, file: &str) -> &str {
        self.digests.get(file).map_or("", String::as_str)
    }

    /// The SHA-256 of a file's content: of its bytes, or for a sealed file of its content as
    /// unsealed Parquet.
    fn content(&self, file: &str) -> &str {
        self.contents
            .get(file)
            .map_or_else(|| self.digest(file), String::as_str)
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
            .chain(&self.erasures)
    }
}

/// What a data directory holds, read without changing anything: the manifest (if any), the data
/// files no manifest names, and the files it names that are gone. Start-up decides on this
/// before it repairs anything, so a refused start leaves the directory as it found it.
#[derive(Debug)]
pub struct Found {
    dir: PathBuf,
    manifest: Option<Manifest>,
    /// Data files (`*.parquet`) in the directory.
    data_files: Vec<String>,
    /// Data files the manifest does not name: written by a write that never committed, or
    /// replaced by one that did.
    orphans: Vec<String>,
    /// Files the manifest names that are not there.
    missing: Vec<String>,
}

impl Found {
    /// Reads the data directory `dir` (a missing directory reads as empty).
    pub fn read(dir: &Path) -> Result<Self> {
        let manifest_path = dir.join(MANIFEST);
        let manifest: Option<Manifest> = match std::fs::read(&manifest_path) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| {
                Error::Storage(format!(
                    "{}: not a manifest (line {}, column {})",
                    manifest_path.display(),
                    e.line(),
                    e.column()
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::Storage(format!("{}: {e}", manifest_path.display()))),
        };
        let data_files = data_files(dir)?;
        let named: BTreeSet<&str> = manifest
            .iter()
            .flat_map(|m| m.files())
            .map(String::as_str)
            .collect();
        let orphans = data_files
            .iter()
            .filter(|f| !named.contains(f.as_str()))
            .cloned()
            .collect();
        let present: BTreeSet<&str> = data_files.iter().map(String::as_str).collect();
        let missing = named
            .iter()
            .filter(|f| !present.contains(*f))
            .map(|f| f.to_string())
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            data_files,
            orphans,
            missing,
        })
    }

    /// Why the service must not start on this directory, if it must not: data files without a
    /// manifest, or a manifest naming files that are gone. The message names the manifest and
    /// says how to recover.
    pub fn refusal(&self) -> Option<String> {
        let manifest = self.dir.join(MANIFEST);
        match &self.manifest {
            None if !self.data_files.is_empty() => Some(format!(
                "{} is missing while the data directory holds {} data files ({}, ...): the \
                 manifest is the record of which of them were committed. Restore manifest.json \
                 from the backup these files came from (or the whole data directory from one \
                 backup). Nothing was changed",
                manifest.display(),
                self.data_files.len(),
                self.data_files[0]
            )),
            Some(_) if !self.missing.is_empty() => Some(format!(
                "{} names {} files that are not in the data directory ({}, ...): restore the \
                 data directory whole from one backup. Nothing was changed",
                manifest.display(),
                self.missing.len(),
                self.missing[0]
            )),
            _ => None,
        }
    }

    /// Writes committed, as the manifest counts them.
    pub fn commits(&self) -> u64 {
        self.manifest.as_ref().map_or(0, |m| m.commits)
    }

    /// The manifest's log of committed writes.
    pub fn log(&self) -> &[CommitRecord] {
        self.manifest.as_ref().map_or(&[], |m| m.log.as_slice())
    }

    /// The members the tombstones file names, by digest, with the instant of their latest
    /// erasure ([`Store::erased`]).
    pub fn erased(&self) -> Result<BTreeMap<i64, i64>> {
        let file = self.manifest.as_ref().and_then(|m| m.erasures.as_ref());
        let file = file.map(|name| TableFile {
            path: self.dir.join(name),
            sealed: None,
        });
        erasure::erased_in(file.as_ref())
    }

    /// Data files no manifest names; opening the store removes them.
    pub fn orphans(&self) -> &[String] {
        &self.orphans
    }

    /// Data files some committed write replaced (removed after its commit, or at the next start).
    pub fn replaced(&self) -> BTreeSet<&str> {
        self.log()
            .iter()
            .flat_map(|c| &c.replaced)
            .map(String::as_str)
            .collect()
    }
}

/// The data files (`*.parquet`) of `dir`, sorted; none if it does not exist.
fn data_files(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Storage(format!("{}: {e}", dir.display()))),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".parquet") && entry.file_type()?.is_file() {
            files.push(name);
        }
    }
    files.sort();
    Ok(files)
}

/// The store: the data directory plus the current snapshot.
pub struct Store {
    dir: PathBuf,
    current: RwLock<Arc<Snapshot>>,
    /// Serializes commits (renames and the manifest, never the writing of a table); readers never
    /// wait for it.
    writer: Mutex<Manifest>,
    /// Every snapshot this store replaced, weakly: one still alive is being read (an answer being
    /// computed over it), so the list versions it names are not destroyed yet.
    replaced: Mutex<Vec<std::sync::Weak<Snapshot>>>,
    /// Where the data keys of sealed files come from.
    keys: Arc<dyn DataKeys>,
    /// The erased members, by digest ([`Store::erased`]), as the tombstones file holds them.
    erased: Mutex<BTreeMap<i64, i64>>,
}

const MANIFEST: &str = "manifest.json";

impl Store {
    /// Opens a data directory as its service, once start-up has decided on what it found: removes
    /// the data files no manifest names (a crash between writing and committing; files a commit
    /// replaced), records the digests an older manifest lacks, and loads the committed state.
    /// Refuses what [`Found::refusal`] refuses. Only the one service of a directory may do this.
    /// A collaboration's files are sealed and opened with data keys from `keys`.
    pub fn open_found(found: Found, keys: Arc<dyn DataKeys>) -> Result<Self> {
        if let Some(why) = found.refusal() {
            return Err(Error::Storage(why));
        }
        std::fs::create_dir_all(&found.dir)?;
        for orphan in &found.orphans {
            std::fs::remove_file(found.dir.join(orphan))?;
        }
        if !found.orphans.is_empty() {
            files::sync_dir(&found.dir)?;
        }
        let mut manifest = found.manifest.unwrap_or_default();
        let digested = add_digests(&found.dir, &mut manifest)?;
        if add_key_versions(&found.dir, &mut manifest)? || digested {
            write_manifest(&found.dir, &manifest)?;
        }
        Self::load(&found.dir, manifest, keys)
    }

    /// Opens a data directory to read it beside a running service (tools), changing nothing on
    /// disk; refuses what [`Found::refusal`] refuses. A collaboration's sealed files cannot be
    /// read this way ([`NoKeys`]); [`Store::open_with_keys`] reads them.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with_keys(dir, Arc::new(NoKeys))
    }

    /// [`Store::open`], opening sealed files with data keys from `keys`.
    pub fn open_with_keys(dir: &Path, keys: Arc<dyn DataKeys>) -> Result<Self> {
        let found = Found::read(dir)?;
        if let Some(why) = found.refusal() {
            return Err(Error::Storage(why));
        }
        std::fs::create_dir_all(dir)?;
        let mut manifest = found.manifest.unwrap_or_default();
        add_digests(dir, &mut manifest)?;
        add_key_versions(dir, &mut manifest)?;
        Self::load(dir, manifest, keys)
    }

    fn load(dir: &Path, manifest: Manifest, keys: Arc<dyn DataKeys>) -> Result<Self> {
        let snapshot = manifest.snapshot(dir, &keys);
        let erased = erasure::erased_in(snapshot.erasures.as_ref())?;
        Ok(Self {
            erased: Mutex::new(erased),
            dir: dir.to_path_buf(),
            current: RwLock::new(Arc::new(snapshot)),
            writer: Mutex::new(manifest),
            replaced: Mutex::new(Vec::new()),
            keys,
        })
    }

    /// The committed file `name`, with the key it is sealed with.
    fn table_file(&self, manifest: &Manifest, name: &str) -> TableFile {
        manifest.table_file(&self.dir, &self.keys, name)
    }

    /// The committed file `name` as the manifest records it now, and a staging for the file that
    /// rewrites it as `table`, sealed with the same key: a rewrite (an erasure, a rotation, a
    /// retention) keeps a file's seal.
    fn rewrite_of(&self, name: &str, table: &Table) -> Result<(TableFile, Staging)> {
        let file = {
            let manifest = self.writer.lock().expect("writer lock poisoned");
            self.table_file(&manifest, name)
        };
        let mut staging = self.staging();
        if let Some(sealed) = &file.sealed {
            staging.seal(table.clone(), sealed.key.clone())?;
        }
        Ok((file, staging))
    }

    /// Whether the store opens sealed files: false when it was opened without its key store.
    pub fn opens_sealed(&self) -> bool {
        self.keys.seals()
    }

    /// Writes committed so far.
    pub fn commits(&self) -> u64 {
        self.writer.lock().expect("writer lock poisoned").commits
    }

    /// The committed writes, oldest first.
    pub fn log(&self) -> Vec<CommitRecord> {
        self.writer
            .lock()
            .expect("writer lock poisoned")
            .log
            .clone()
    }

    /// The committed write a retry names: the same call, for the same partner, with the same
    /// request id.
    pub fn committed(
        &self,
        method: &str,
        partner: Option<&str>,
        request_id: &str,
    ) -> Option<CommitRecord> {
        self.writer
            .lock()
            .expect("writer lock poisoned")
            .log
            .iter()
            .rfind(|c| {
                c.method == method
                    && c.partner.as_deref() == partner
                    && c.request_id.as_deref() == Some(request_id)
            })
            .cloned()
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
            keys: Arc::clone(&self.keys),
            seals: BTreeMap::new(),
        }
    }

    /// Commits one write: `stage` gets the manifest, a function that moves a staged table into
    /// place under a new file name, and the current snapshot, and returns the new snapshot. Only
    /// renames and the manifest happen under the commit lock; the tables were written and synced
    /// before. Files the write replaced are removed once it is committed. Returns the write's
    /// record in the manifest's log.
    fn commit(
        &self,
        facts: WriteFacts,
        stage: impl FnOnce(&mut Manifest, &mut Placer<'_>) -> Result<Produced>,
    ) -> Result<CommitRecord> {
        let mut committed = self.writer.lock().expect("writer lock poisoned");
        let mut manifest = committed.clone();
        let mut placed: Vec<(String, String)> = Vec::new();
        let mut versions: Vec<(String, BTreeSet<u32>)> = Vec::new();
        let mut sealed: Vec<(String, KeyRef, String)> = Vec::new();
        let mut next_file = manifest.next_file;
        let result = {
            let mut place = |stem: &str, staged: &mut Staged| -> Result<String> {
                next_file += 1;
                let name = format!("{stem}-{next_file:06}.parquet");
                std::fs::rename(&staged.tmp, self.dir.join(&name))?;
                staged.placed = true;
                placed.push((name.clone(), hex::encode(staged.digest)));
                if let Some(held) = &staged.key_versions {
                    versions.push((name.clone(), held.clone()));
                }
                if let Some(seal) = &staged.seal {
                    sealed.push((name.clone(), seal.key.clone(), hex::encode(seal.content)));
                }
                Ok(name)
            };
            stage(&mut manifest, &mut place).and_then(|produced| {
                files::sync_dir(&self.dir)?;
                Ok(produced)
            })
        };
        let produced = match result {
            Ok(produced) => produced,
            Err(e) => {
                // Files placed for a failed write are not in any manifest: remove them.
                for (name, _) in placed {
                    let _ = std::fs::remove_file(self.dir.join(name));
                }
                return Err(e);
            }
        };
        manifest.key_versions.extend(versions);
        for (name, key, content) in sealed {
            manifest.keys.insert(name.clone(), key);
            manifest.contents.insert(name, content);
        }
        let record = self.record(
            &mut manifest,
            &committed,
            facts,
            &placed,
            next_file,
            produced,
        );
        let snapshot = manifest.snapshot(&self.dir, &self.keys);
        if let Err(e) = write_manifest(&self.dir, &manifest) {
            for (name, _) in placed {
                let _ = std::fs::remove_file(self.dir.join(name));
            }
            return Err(e);
        }
        for file in &record.replaced {
            // Best effort: a file left behind is collected at the next start.
            let _ = std::fs::remove_file(self.dir.join(file));
        }
        *committed = manifest;
        let before = std::mem::replace(
            &mut *self.current.write().expect("snapshot lock poisoned"),
            Arc::new(snapshot),
        );
        let mut replaced = self.replaced.lock().expect("replaced lock poisoned");
        replaced.retain(|old| old.strong_count() > 0);
        replaced.push(Arc::downgrade(&before));
        Ok(record)
    }

    /// Adds a write's digests and its record to the manifest about to be committed.
    fn record(
        &self,
        manifest: &mut Manifest,
        before: &Manifest,
        facts: WriteFacts,
        placed: &[(String, String)],
        next_file: u64,
        produced: Produced,
    ) -> CommitRecord {
        manifest.next_file = next_file;
        manifest.commits += 1;
        for (name, digest) in placed {
            manifest.digests.insert(name.clone(), digest.clone());
        }
        let kept: BTreeSet<&String> = manifest.files().collect();
        let replaced: Vec<String> = before
            .files()
            .filter(|f| !kept.contains(f))
            .cloned()
            .collect();
        for file in &replaced {
            manifest.digests.remove(file);
            manifest.key_versions.remove(file);
            manifest.keys.remove(file);
            manifest.contents.remove(file);
        }
        let record = CommitRecord {
            seq: manifest.commits,
            at: facts.at,
            method: facts.method,
            partner: facts.partner,
            request_id: facts.request_id,
            received: facts.report.received,
            accepted: facts.report.accepted,
            rejected: facts.report.rejected,
            files: placed.iter().map(|(name, _)| name.clone()).collect(),
            replaced,
            list_version: produced.list_version,
            consent_snapshot_id: produced.consent_snapshot_id,
            ended: produced.ended,
            destroyed: produced.destroyed,
            reason: produced.reason,
        };
        manifest.log.push(record.clone());
        record
    }

    /// Destroys a collaboration's files: its member tokens and every version of its partner's
    /// list. The manifest is the commit point, as for every write: once it no longer names them,
    /// the files are removed (a file a crash left is removed at the next start, as any replaced
    /// file is). Returns the commit and each file's name, SHA-256 and rows.
    pub fn commit_destruction(
        &self,
        contract: &str,
        partner: &str,
        reason: &str,
        facts: WriteFacts,
    ) -> Result<(CommitRecord, Vec<DestroyedFile>)> {
        let mut destroyed = Vec::new();
        let record = self.commit(facts, |manifest, _| {
            let mut names: Vec<String> = manifest
                .member_tokens
                .remove(contract)
                .into_iter()
                .collect();
            let lists = manifest.lists.remove(partner).unwrap_or_default();
            *manifest
                .lists_dropped
                .entry(partner.to_string())
                .or_default() += u32::try_from(lists.len()).unwrap_or(u32::MAX);
            names.extend(lists);
            for name in names {
                let rows = self.table_file(manifest, &name).rows()?;
                let sha256 = manifest.digest(&name).to_string();
                destroyed.push(DestroyedFile { name, sha256, rows });
            }
            Ok(Produced {
                ended: Some(contract.to_string()),
                destroyed: destroyed.clone(),
                reason: Some(reason.to_string()),
                ..Produced::default()
            })
        })?;
        Ok((record, destroyed))
    }

    /// Replaces the member table and every collaboration's member tokens with a staged member
    /// ingest.
    pub fn commit_members(&self, mut staging: Staging, facts: WriteFacts) -> Result<CommitRecord> {
        staging.close()?;
        self.commit(facts, |manifest, place| {
            let members = staging.table(&Table::Members)?;
            manifest.members = Some(place("members", members)?);
            manifest.member_tokens.clear();
            place_member_tokens(manifest, place, &mut staging)?;
            Ok(Produced::default())
        })
    }

    /// Replaces the member tokens of the collaborations a tokens-only members ingest staged,
    /// leaving the member table and every other collaboration's tokens. Refused (busy) when the
    /// member table is no longer `members_version`, the one the ingest checked its export against.
    pub fn commit_member_tokens(
        &self,
        mut staging: Staging,
        facts: WriteFacts,
        members_version: &str,
    ) -> Result<CommitRecord> {
        staging.close()?;
        self.commit(facts, |manifest, place| {
            if manifest.members_version() != members_version {
                return Err(cleanroom_core::Error::Busy(
                    "the members were ingested while the tokens were computed; send it again"
                        .into(),
                )
                .into());
            }
            place_member_tokens(manifest, place, &mut staging)?;
            Ok(Produced::default())
        })
    }

    /// Appends a staged purchase ingest: a file per month it holds.
    pub fn commit_purchases(
        &self,
        mut staging: Staging,
        facts: WriteFacts,
    ) -> Result<CommitRecord> {
        staging.close()?;
        self.commit(facts, |manifest, place| {
            let mut months = 0;
            for (table, staged) in &mut staging.tables {
                let Table::Purchases(month) = table else {
                    continue;
                };
                let file = place(&format!("purchases-{}", file_safe(month)), staged)?;
                manifest.purchases.push(file);
                months += 1;
            }
            if months == 0 {
                return Err(Error::Storage("the write staged no purchases".into()));
            }
            Ok(Produced::default())
        })
    }

    /// Appends a staged consent ingest; its record names the new consent snapshot. `erasures` is
    /// the tombstones file the ingest checked its events against: an erasure committed since
    /// refuses the commit (busy), so no event of a member erased meanwhile gets in.
    pub fn commit_consent(
        &self,
        mut staging: Staging,
        facts: WriteFacts,
        erasures: Option<&TableFile>,
    ) -> Result<CommitRecord> {
        staging.close()?;
        let digest = staging.table(&Table::Consent)?.digest;
        self.commit(facts, |manifest, place| {
            if manifest.erasures.as_ref().map(|name| self.dir.join(name))
                != erasures.map(|f| f.path.clone())
            {
                return Err(cleanroom_core::Error::Busy(
                    "members were erased while the consent export was read; send it again".into(),
                )
                .into());
            }
            let file = place("consent", staging.table(&Table::Consent)?)?;
            let mut chain = Sha256::new();
            chain.update(manifest.consent_chain.as_bytes());
            chain.update(digest);
            manifest.consent_chain = hex::encode(chain.finalize());
            manifest.consent.push(file);
            Ok(Produced {
                consent_snapshot_id: Some(manifest.consent_snapshot_id()),
                ..Default::default()
            })
        })
    }

    /// Stores a staged list as the new version of a partner's list; its record names the version.
    pub fn commit_list(
        &self,
        partner: &str,
        mut staging: Staging,
        facts: WriteFacts,
    ) -> Result<CommitRecord> {
        staging.close()?;
        self.commit(facts, |manifest, place| {
            let file = place(
                &format!("list-{}", file_safe(partner)),
                staging.table(&Table::List)?,
            )?;
            manifest
                .lists
                .entry(partner.to_string())
                .or_default()
                .push(file);
            manifest.lists_destroyed.remove(partner);
            manifest.lists_key_destroyed.remove(partner);
            Ok(Produced {
                list_version: Some(manifest.list_version(partner)),
                ..Default::default()
            })
        })
    }
}

/// Places every collaboration's member tokens `staging` holds as that collaboration's file.
fn place_member_tokens(
    manifest: &mut Manifest,
    place: &mut Placer<'_>,
    staging: &mut Staging,
) -> Result<()> {
    for (table, staged) in &mut staging.tables {
        let Table::MemberTokens(contract) = table else {
            continue;
        };
        let file = place(&format!("member_tokens-{}", file_safe(contract)), staged)?;
        manifest.member_tokens.insert(contract.clone(), file);
    }
    Ok(())
}

/// Moves a staged table into the data directory under a new name (`<stem>-<n>.parquet`).
type Placer<'a> = dyn FnMut(&str, &mut Staged) -> Result<String> + 'a;

/// One write's tables while its stream is read: Parquet files under temporary names in the data
/// directory, filled a batch at a time, invisible until [`Store`] commits them. Dropped without a
/// commit, it removes its files.
pub struct Staging {
    dir: PathBuf,
    tables: BTreeMap<Table, Staged>,
    keys: Arc<dyn DataKeys>,
    /// The key each collaboration's table is to be sealed with ([`Staging::seal`]).
    seals: BTreeMap<Table, KeyRef>,
}

/// One staged table.
struct Staged {
    tmp: PathBuf,
    writer: Option<ArrowWriter<HashingFile>>,
    /// SHA-256 of the file, once closed.
    digest: [u8; 32],
    /// Renamed into place by a commit: no longer this staging's to remove.
    placed: bool,
    /// For a table of match tokens, the key versions of the tokens written to it.
    key_versions: Option<BTreeSet<u32>>,
    /// For a sealed table, its key and the digest of its content as unsealed Parquet.
    seal: Option<Seal>,
}

/// A staged table's seal: the key its file is encrypted with, and the same rows written as
/// unsealed Parquet to nothing but a hash, for the content digest ([`Manifest::content`]).
struct Seal {
    key: KeyRef,
    plain: Option<ArrowWriter<HashingFile<std::io::Sink>>>,
    content: [u8; 32],
}

/// Numbers staging files within this process; files of earlier processes are collected at start.
static STAGED_FILES: AtomicU64 = AtomicU64::new(0);

impl Staged {
    /// A new staged file for `table`, sealed with `sealed` when given.
    fn create(
        dir: &Path,
        table: &Table,
        schema: SchemaRef,
        sealed: Option<Sealed>,
    ) -> Result<Self> {
        let n = STAGED_FILES.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("staging-{}-{n}.tmp", std::process::id()));
        let mut properties = writer_properties();
        let mut seal = None;
        if let Some(sealed) = sealed {
            properties = properties
                .into_builder()
                .with_file_encryption_properties(sealed.encryption()?)
                .build();
            let plain = HashingFile {
                file: std::io::sink(),
                sha: Sha256::new(),
            };
            seal = Some(Seal {
                key: sealed.key,
                plain: Some(ArrowWriter::try_new(
                    plain,
                    Arc::clone(&schema),
                    Some(writer_properties()),
                )?),
                content: [0; 32],
            });
        }
        let file = HashingFile {
            file: File::create(&tmp)?,
            sha: Sha256::new(),
        };
        let writer = ArrowWriter::try_new(file, schema, Some(properties))?;
        Ok(Self {
            tmp,
            writer: Some(writer),
            digest: [0; 32],
            placed: false,
            key_versions: table.holds_tokens().then(BTreeSet::new),
            seal,
        })
    }
}

impl Sink for Staging {
    fn write(&mut self, table: &Table, batch: RecordBatch) -> Result<()> {
        if !self.tables.contains_key(table) {
            let sealed = self.sealed(table)?;
            let staged = Staged::create(&self.dir, table, batch.schema(), sealed)?;
            self.tables.insert(table.clone(), staged);
        }
        let staged = self.tables.get_mut(table).expect("inserted above");
        if let Some(held) = &mut staged.key_versions {
            held.extend(key_versions_of(&batch)?);
        }
        if let Some(plain) = staged.seal.as_mut().and_then(|s| s.plain.as_mut()) {
            plain.write(&batch)?;
        }
        let writer = staged
            .writer
            .as_mut()
            .ok_or_else(|| Error::Storage("a staged table was written after closing".into()))?;
        // Row groups are flushed as they fill, so the writer holds at most one in memory.
        writer.write(&batch)?;
        Ok(())
    }
}

/// A file that hashes what is written to it, so a staged table's digest costs no second read.
struct HashingFile<W = File> {
    file: W,
    sha: Sha256,
}

impl<W: std::io::Write> std::io::Write for HashingFile<W> {
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
    /// Seals `table` with `key`: its file is written encrypted with that key's data key. Every
    /// table of a collaboration's match tokens must be sealed before its first row is written,
    /// unless the store has no keys at all ([`NoKeys`]: tools and engine tests).
    pub fn seal(&mut self, table: Table, key: KeyRef) -> Result<()> {
        if self.tables.contains_key(&table) && self.seals.get(&table) != Some(&key) {
            return Err(Error::Storage(format!(
                "the {table:?} table was sealed after its first rows were written"
            )));
        }
        self.seals.insert(table, key);
        Ok(())
    }

    /// The seal of a new staged `table`, refusing a collaboration's table nobody sealed.
    fn sealed(&self, table: &Table) -> Result<Option<Sealed>> {
        match self.seals.get(table) {
            Some(key) => Ok(Some(Sealed::new(key.clone(), Arc::clone(&self.keys)))),
            None if table.holds_tokens() && self.keys.seals() => Err(Error::Storage(format!(
                "the {table:?} table holds a collaboration's tokens and was not sealed with \
                 its key"
            ))),
            None => Ok(None),
        }
    }

    /// Finishes every table's file and syncs it to disk. A commit does this too; done before,
    /// on the thread that wrote the tables, the commit has only renames and the manifest left.
    pub fn close(&mut self) -> Result<()> {
        for staged in self.tables.values_mut() {
            if let Some(writer) = staged.writer.take() {
                let written = writer.into_inner()?;
                written.file.sync_all()?;
                staged.digest = written.sha.finalize().into();
            }
            if let Some(seal) = &mut staged.seal
                && let Some(plain) = seal.plain.take()
            {
                seal.content = plain.into_inner()?.sha.finalize().into();
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

/// Records the SHA-256 of every file the manifest names but has no digest for (manifests written
/// before digests were kept). Returns whether any was added.
fn add_digests(dir: &Path, manifest: &mut Manifest) -> Result<bool> {
    let lacking: Vec<String> = manifest
        .files()
        .filter(|f| !manifest.digests.contains_key(*f))
        .cloned()
        .collect();
    for file in &lacking {
        let mut hashing = HashingFile {
            file: std::io::sink(),
            sha: Sha256::new(),
        };
        std::io::copy(&mut File::open(dir.join(file))?, &mut hashing)?;
        manifest
            .digests
            .insert(file.clone(), hex::encode(hashing.sha.finalize()));
    }
    Ok(!lacking.is_empty())
}

/// Records the key versions of every token file the manifest names but has none for (manifests
/// written before they were kept): read from the files. Returns whether any was added.
fn add_key_versions(dir: &Path, manifest: &mut Manifest) -> Result<bool> {
    let lacking: Vec<String> = manifest
        .token_files()
        .filter(|f| !manifest.key_versions.contains_key(*f))
        .cloned()
        .collect();
    for file in &lacking {
        let mut held = BTreeSet::new();
        for batch in parquet_batches(&dir.join(file))? {
            held.extend(key_versions_of(&batch?)?);
        }
        manifest.key_versions.insert(file.clone(), held);
    }
    Ok(!lacking.is_empty())
}

/// The distinct key versions of a batch of match tokens.
fn key_versions_of(batch: &RecordBatch) -> Result<BTreeSet<u32>> {
    use datafusion::arrow::array::AsArray as _;
    use datafusion::arrow::datatypes::UInt32Type;
    let column = batch
        .columns()
        .get(crate::tables::tokens::KEY_VERSION)
        .and_then(|c| c.as_primitive_opt::<UInt32Type>())
        .ok_or_else(|| Error::Storage("a token table without its key_version column".into()))?;
    Ok(column.values().iter().copied().collect())
}

/// Replaces the manifest: the commit point of every write.
fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(manifest)
        .map_err(|e| Error::Storage(format!("manifest: {e}")))?;
    Ok(files::write_atomic(&dir.join(MANIFEST), &bytes)?)
}

/// Parquet files are written in row groups of [`BATCH_ROWS`] rows: the writer holds at most one.
fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_max_row_group_row_count(Some(BATCH_ROWS))
        .build()
}

/// An unsealed file's rows, a batch at a time.
fn parquet_batches(path: &Path) -> Result<ParquetRecordBatchReader> {
    Ok(ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?
        .with_batch_size(BATCH_ROWS)
        .build()?)
}
