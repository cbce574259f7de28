//! The guard: the one place where the clean room's privacy rules are enforced. Query templates
//! cannot switch any of it off: it works on the DataFusion `LogicalPlan` of every query and on the
//! partner's ledger, whatever the template says.
//!
//! [`Guard::answer`] is the only function that releases query results. Its front half (`ask`)
//! admits the partner and the query ([`admission`]), then types and snaps the parameters to the
//! query's declared granularity and minimum window ([`params`]), once; the run that follows
//! reads as its stages:
//! 1. **plan and check** the SQL against the safe views (`plan`). Admission, parameters and plan
//!    depend only on the request and the allow-list, never on data, so their refusals cost
//!    nothing;
//! 2. **key** the answer by the question and the data's version (ingest and upload counters, the
//!    day), and serve a stored answer again at no cost ([`answers`]);
//! 3. **charge** the partner's ledger one answer's ρ, on disk, before anything is computed
//!    ([`budget`]): a failure afterwards is not given back;
//! 4. **audience**: the matched, consenting audience, counted with discrete Gaussian noise, must
//!    reach the contract's minimum;
//! 5. **execute** the query member by member, each member in at most `rows_per_member` rows and
//!    each contribution clamped to the metric's declared bound;
//! 6. **release**: every cell of the output domain gets a discrete Gaussian noisy member count;
//!    a cell is released only if its true count is at least k *and* its noisy count reaches
//!    k + τ, and its metrics get discrete Gaussian noise too. Post-processing keeps released
//!    values plausible (no negative counts or sums, no sum beyond its members' bounds);
//! 7. **store** the outcome, released or refused, so the same question is answered the same way.
//!
//! Every decision a partner can observe that depends on member data (the audience refusal, which
//! cells are released, every value) is a function of the noisy counts of one charged answer: the
//! answer is ρ-zCDP with the member as the unit, plus the hard k's δ share
//! (`cleanroom_core::accounting`, `docs/privacy.md`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use cleanroom_core::accounting::{Guarantee, NoisePlan, interval95};
use cleanroom_core::allowlist::QueryDef;
use cleanroom_core::consent::Requirement;
use cleanroom_core::rules::{Contract, Rules};
use cleanroom_core::token::MasterSecret;
use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::common::ScalarValue;
use datafusion::prelude::SessionContext;
use sha2::{Digest, Sha256};

use crate::audience::{AudienceOf, Audiences};
use crate::executor::{ExecutorConfig, PlanExecutor, Queue};
use crate::store::{CommitRecord, Snapshot, Staging, Store, WriteFacts};
use crate::views::SafeViews;
use crate::{Error, Result};

pub mod admission;
pub mod answers;
mod ask;
pub mod budget;
mod fold;
mod lists;
pub mod noise;
pub mod params;
mod plan;

pub use admission::{AdmittedPartner, AdmittedQuery, Approvals, admit_partner, admit_query};
pub use answers::{NoiseReport, Outcome, Release, ReleaseFacts};
pub use ask::{Answered, Ask, AuditFacts, Refused};
pub use budget::{Charge, LedgerFile, RhoLedger, Spend, Terms};
use lists::Lists;
pub use params::{RawValue, bind_value};

/// The suffix of the column that carries each metric's 95 % half-width.
pub const INTERVAL_SUFFIX: &str = "_ci95";

/// The partner's current list, or why it has none: never uploaded, or destroyed by a retention
/// rule or a rotation's end (naming the day). Refused before anything is charged.
fn current_list<'a>(
    snapshot: &'a Snapshot,
    partner: &str,
) -> Result<&'a crate::store::PartnerList> {
    if let Some(list) = snapshot.lists.get(partner) {
        return Ok(list);
    }
    let why = if let Some(day) = snapshot.lists_destroyed.get(partner) {
        format!(
            "the customer list was destroyed on {day} under the contract's retention rules \
             (retention.max_list_days); nothing is charged, upload a new list (UploadList) to \
             ask again"
        )
    } else if let Some(gone) = snapshot.lists_key_destroyed.get(partner) {
        format!(
            "the customer list was destroyed on {} with key version {}, at the end of its \
             rotation overlap; nothing is charged, upload a new list under the contract's \
             current key version (UploadList) to ask again",
            gone.on, gone.key_version
        )
    } else {
        "no customer list uploaded yet: call UploadList first".to_string()
    };
    Err(cleanroom_core::Error::Precondition(why).into())
}

/// Refuses a question whose list's key version has no member tokens: a contract added, or a
/// key rotated, after the retailer's last members ingest.
fn require_member_tokens(
    snapshot: &Snapshot,
    contract_id: &str,
    list: &crate::store::PartnerList,
) -> Result<()> {
    let Some(held) = snapshot.member_token_versions.get(contract_id) else {
        return Err(cleanroom_core::Error::Precondition(
            "the retailer has not yet computed its members' tokens for this contract (it \
             was added, or its key rotated, after the last members ingest); nothing is \
             charged, ask again after the retailer's next members ingest"
                .into(),
        )
        .into());
    };
    match list.key_versions.iter().find(|v| !held.contains(v)) {
        None => Ok(()),
        Some(version) => Err(cleanroom_core::Error::Precondition(format!(
            "the retailer has not yet computed its members' tokens under key version \
             {version} of this contract (the key was rotated after the last members ingest); \
             nothing is charged, ask again after the retailer's next members ingest"
        ))
        .into()),
    }
}

/// The one refusal for a query whose execution failed: the same words whatever the data, and
/// charged like an answer.
const EXECUTION_REFUSAL: &str = "this query could not be answered for these parameters; the \
     answer's privacy cost is charged, and asking again returns this same refusal";

/// What the guard enforces for one query run.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Minimum distinct members behind every released row.
    pub k: u32,
    /// Output dimensions, in order, each with every value it may take.
    pub dimensions: Vec<(String, Vec<String>)>,
    /// Output metric columns, in order after the dimensions.
    pub metrics: Vec<String>,
    /// The most one member may add to each metric in one row (metrics that count distinct
    /// members need none).
    pub metric_bounds: BTreeMap<String, u64>,
    /// Column names no query may touch.
    pub sensitive_columns: BTreeSet<String>,
    /// The most output rows one member counts in: the query's limit within the contract's.
    pub rows_per_member: u32,
}

impl Policy {
    /// The policy of one allow-listed query run by one partner under its contract: the effective
    /// k, the dimensions' domains as that partner sees them, and the rules' sensitive columns.
    pub fn for_query(rules: &Rules, query: &QueryDef, contract: &Contract, partner: &str) -> Self {
        Self {
            k: rules.effective_k(contract, query.k),
            dimensions: query
                .dimensions
                .iter()
                .map(|d| {
                    (
                        d.name.clone(),
                        rules.domain(&d.domain, partner).unwrap_or_default(),
                    )
                })
                .collect(),
            metrics: query.metrics.clone(),
            metric_bounds: query.metric_bounds.clone(),
            sensitive_columns: rules.sensitive_column_names(),
            rows_per_member: query
                .max_rows_per_member
                .min(contract.protection.max_rows_per_member),
        }
    }

    fn output_columns(&self) -> Vec<String> {
        self.dimensions
            .iter()
            .map(|(name, _)| name.clone())
            .chain(self.metrics.iter().cloned())
            .collect()
    }
}

/// A query to answer: only an admitted query with its checked parameters makes one
/// ([`admission`], [`params`]), so nothing reaches [`Guard::run`] without passing both.
struct QueryRequest<'a> {
    rules: &'a Rules,
    query: &'a QueryDef,
    partner: &'a str,
    contract_id: &'a str,
    /// The query's canonical parameters: typed and snapped.
    params: params::Snapped,
    snapshot: Arc<Snapshot>,
    now: DateTime<Utc>,
}

impl<'a> QueryRequest<'a> {
    /// The admitted query, asked with checked parameters of the data in `snapshot`.
    fn new(admitted: AdmittedQuery<'a>, params: params::Snapped, snapshot: Arc<Snapshot>) -> Self {
        let partner = admitted.partner;
        Self {
            rules: partner.rules,
            query: admitted.query,
            partner: partner.partner,
            contract_id: partner.contract_id,
            params,
            snapshot,
            now: partner.now,
        }
    }
}

/// What this call was charged, and what the partner's period has left.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChargeReport {
    /// Whether the answer was computed now (and charged) rather than served again.
    pub fresh: bool,
    /// ρ (zCDP) charged by this call: one answer's share, or 0 for a repeat.
    pub rho_spent: f64,
    /// This call alone as (ε, δ)-DP: one answer's guarantee, or 0 for a repeat.
    pub epsilon_spent: f64,
    /// This call's δ (0 for a repeat).
    pub delta_spent: f64,
    /// The contract's guarantee per period: ε of every answer together.
    pub period_epsilon: f64,
    /// The contract's guarantee per period: δ.
    pub period_delta: f64,
    /// The period, in days.
    pub period_days: u32,
    /// Fresh answers the period pays for, and how many are used.
    pub answers_per_period: u32,
    /// Fresh answers used in the period, this one included.
    pub answers_used: u32,
    /// When the oldest charge leaves the period.
    pub budget_resets_at: Option<DateTime<Utc>>,
}

/// What the guard enforced for one answer and what it cost: the typed record the retailer's
/// audit trail keeps (never shown to the partner beyond what its response states).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GuardReport {
    /// Computed and charged now, rather than served again.
    pub fresh: bool,
    /// The hard k on true counts.
    pub k: u32,
    /// The partner's list version that answered.
    pub list_version: u32,
    /// ρ (zCDP) charged by this call.
    pub rho_spent: f64,
    /// This call alone as (ε, δ)-DP (0 for a repeat).
    pub epsilon_spent: f64,
    /// This call's δ.
    pub delta_spent: f64,
    /// The noisy member count a cell had to reach (k + τ).
    pub release_threshold: u64,
    /// The most rows one member counted in.
    pub rows_per_member: u32,
    /// The fate of every cell of the output domain, counted.
    pub cells: ReleaseFacts,
}

/// A released answer, as the partner receives it.
#[derive(Debug)]
pub struct Answer {
    /// Released rows, in domain order: the declared dimensions and metrics, then each metric's
    /// 95 % half-width.
    pub batch: RecordBatch,
    /// The stored release (Arrow IPC bytes, parameters, noise), identical on every repeat.
    pub release: Release,
    /// What this call cost.
    pub charge: ChargeReport,
}

impl Answer {
    /// What the guard enforced for this answer, for the audit trail.
    pub fn report(&self) -> GuardReport {
        let noise = &self.release.noise;
        GuardReport {
            fresh: self.charge.fresh,
            k: noise.k,
            list_version: self.release.list_version,
            rho_spent: self.charge.rho_spent,
            epsilon_spent: self.charge.epsilon_spent,
            delta_spent: self.charge.delta_spent,
            release_threshold: noise.release_threshold,
            rows_per_member: noise.rows_per_member,
            cells: self.release.audit.clone(),
        }
    }
}

/// A new version of a partner's list, to be admitted and stored.
pub struct ListUpload<'a> {
    /// The partner, admitted under its contract.
    pub partner: AdmittedPartner<'a>,
    /// The hashed list, staged (`tables::tokens::schema(true)` rows).
    pub list: Staging,
    /// What the upload was, for the store's record of it.
    pub facts: WriteFacts,
    /// Where lists are kept.
    pub store: &'a Store,
}

/// The guard and the state its defences keep.
pub struct Guard {
    noise_key: [u8; 32],
    /// The audiences' shared parts (matched lists, consent states).
    audiences: Audiences,
    /// Where questions execute (this machine's memory pool, query threads and plans at once, or
    /// a Ballista cluster).
    executor: Arc<dyn PlanExecutor>,
    /// The memory pool questions and kept audiences are charged to (on a cluster, only the
    /// audiences: the executors hold the memory of execution).
    memory: Arc<dyn datafusion::execution::memory_pool::MemoryPool>,
    ledger: RhoLedger,
    answers: answers::Answers,
    lists: Mutex<Lists>,
}

/// How busy query execution is now, for the metrics: nothing about any question or member.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Questions waiting for a place among the plans executing, and plans executing.
    pub queue: Queue,
    /// Bytes reserved in the query memory pool.
    pub memory_bytes: usize,
    /// The pool's limit, if it has one.
    pub memory_limit_bytes: Option<usize>,
}

/// A partner's own spending in its contract's current period (a rolling window), for the
/// metrics: what its answers cost, never anything about the members they counted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spending {
    /// ρ spent in the period.
    pub rho_used: f64,
    /// ρ the period allows.
    pub rho_budget: f64,
    /// Fresh answers paid for in the period.
    pub answers_used: u32,
    /// Fresh answers the period pays for.
    pub answers_per_period: u32,
}

/// Plans and checks a query without running it, over safe views with no rows, as `queries lint`,
/// the allow-list's loading and the review page do: the same checks the guard makes before each
/// answer, on the plan analysed with a value of each parameter's type.
pub async fn check(
    rules: &Rules,
    query: &QueryDef,
    contract: &Contract,
    partner: &str,
) -> Result<()> {
    let policy = Policy::for_query(rules, query, contract, partner);
    let values = params::literals(
        &query.example_params(rules, partner),
        rules.retailer.utc_offset_minutes,
    );
    let ctx = SafeViews::empty().session()?;
    checked_plan(&ctx, &query.sql, values, &policy)
        .await
        .map(|_| ())
}

/// [`check`] for callers outside an async context (loading the allow-list). Planning over tables
/// with no rows waits on nothing, so it completes on the calling thread.
pub fn check_now(
    rules: &Rules,
    query: &QueryDef,
    contract: &Contract,
    partner: &str,
) -> Result<()> {
    futures::executor::block_on(check(rules, query, contract, partner))
}

/// What the guard decided for one cell of the output domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Fewer than k true members: withheld whatever the noise (the hard k).
    BelowK,
    /// At least k true members, but the noisy count missed k + τ.
    BelowThreshold,
    /// Released, with noisy values.
    Released,
}

impl Fate {
    /// The hard k on the true count AND the noisy count against k + τ: never the true count
    /// alone, whose boundary would be a one-member oracle.
    fn of(size: i64, noisy_count: i64, k: i64, threshold: i64) -> Self {
        if size < k {
            Fate::BelowK
        } else if noisy_count < threshold {
            Fate::BelowThreshold
        } else {
            Fate::Released
        }
    }
}

impl ReleaseFacts {
    fn count(&mut self, fate: Fate) {
        match fate {
            Fate::BelowK => self.below_k += 1,
            Fate::BelowThreshold => self.below_threshold += 1,
            Fate::Released => self.released += 1,
        }
    }
}

/// The question being answered, once it passed every check that depends only on the request.
struct Question<'a> {
    request: &'a QueryRequest<'a>,
    contract: &'a Contract,
    guarantee: Guarantee,
    policy: Policy,
    list: &'a crate::store::PartnerList,
    key: String,
}

impl Guard {
    /// Opens the guard's state in `data_dir/guard` (the privacy ledger as start-up read it),
    /// with keys derived from the master secret. `uploads` are the partners' accepted list
    /// uploads (partner, time), from the store's record: the list allowance is rebuilt from them.
    pub fn open(
        data_dir: &Path,
        secret: &MasterSecret,
        ledger: LedgerFile,
        uploads: impl IntoIterator<Item = (String, DateTime<Utc>)>,
        executor: &ExecutorConfig,
        keys: Arc<dyn crate::store::DataKeys>,
    ) -> Result<Self> {
        let dir = data_dir.join("guard");
        std::fs::create_dir_all(&dir)?;
        let executor = crate::executor::from_config(executor)?;
        let memory = Arc::clone(&executor.env().memory_pool);
        Ok(Self {
            noise_key: secret.guard_key("noise"),
            audiences: Audiences::charged_to(Arc::clone(&memory)),
            executor,
            memory,
            ledger: RhoLedger::open(ledger)?,
            answers: answers::Answers::open(dir.join("answers"), keys)?,
            lists: Mutex::new(Lists::open(uploads)),
        })
    }

    /// Where the privacy ledger of a data directory is.
    pub fn ledger_path(data_dir: &Path) -> std::path::PathBuf {
        data_dir.join("guard").join("ledger.jsonl")
    }

    /// Every charge on the privacy ledger (for the high-water mark kept outside the data
    /// directory).
    pub fn spends(&self) -> Vec<Spend> {
        self.ledger.spends()
    }

    /// Carries charges over onto the ledger (charges a restored ledger lacks).
    pub fn carry(&self, spends: &[Spend]) -> Result<()> {
        self.ledger.carry(spends)
    }

    /// The list uploads the allowances count (partner, time).
    pub fn uploads(&self) -> Vec<(String, DateTime<Utc>)> {
        self.lists.lock().expect("list ledger lock poisoned").all()
    }

    /// Takes list uploads into the allowance (uploads a restored data directory lacks).
    pub fn carry_uploads(&self, uploads: impl IntoIterator<Item = (String, DateTime<Utc>)>) {
        self.lists
            .lock()
            .expect("list ledger lock poisoned")
            .extend(uploads);
    }

    /// Refuses an upload the partner's list allowance would refuse, before any of its records
    /// is read or hashed; [`Guard::store_list`] takes the allowance when it stores.
    pub fn check_list_allowance(&self, partner: &AdmittedPartner<'_>) -> Result<()> {
        self.list_allowance(partner, false)
    }

    /// The contract in force and the list allowance: checked, and with `take` also taken.
    fn list_allowance(&self, partner: &AdmittedPartner<'_>, take: bool) -> Result<()> {
        partner.require_in_force()?;
        let protection = &partner.contract.protection;
        let mut lists = self.lists.lock().expect("list ledger lock poisoned");
        let (max, days) = (protection.max_list_versions, protection.list_window_days);
        if take {
            lists.take(partner.partner, max, days, partner.now)
        } else {
            lists.check(partner.partner, max, days, partner.now)
        }
    }

    /// The torn last records cut from the guard's files at open (for the audit trail).
    pub fn recovered(&self) -> Vec<cleanroom_core::files::TornTail> {
        self.ledger.torn().into_iter().cloned().collect()
    }

    /// Destroys every stored answer of a partner whose collaboration ended; returns how many.
    /// Its charges stay on the ledger: a budget is never refilled.
    pub fn forget_answers(&self, partner: &str) -> Result<u64> {
        self.answers.remove_partner(partner)
    }

    /// Forgets the audiences kept for the next questions (matched lists, consent states): after a
    /// destruction, a retention or an erasure nothing of what went stays in memory either. The
    /// next question computes what it needs again.
    pub fn forget_kept_audiences(&self) {
        self.audiences.forget_all();
    }

    /// Forgets the kept matches of `contract_id`'s list versions a retention destroyed: all but
    /// the current one (`current`, by digest; all when the retention destroyed every version).
    pub fn forget_destroyed_matches(&self, contract_id: &str, current: Option<&str>) {
        self.audiences.forget_matches_except(contract_id, current);
    }

    /// Destroys a partner's stored answers computed over its list versions up to `through` (the
    /// retention rules destroyed them); returns how many. Their charges stay on the ledger.
    pub fn forget_answers_through(&self, partner: &str, through: u32) -> Result<u64> {
        self.answers.remove_through(partner, through)
    }

    /// How busy query execution is now: questions waiting and executing, memory reserved.
    pub fn load(&self) -> Load {
        use datafusion::execution::memory_pool::MemoryLimit;
        Load {
            queue: self.executor.queue(),
            memory_bytes: self.memory.reserved(),
            memory_limit_bytes: match self.memory.memory_limit() {
                MemoryLimit::Finite(bytes) => Some(bytes),
                MemoryLimit::Infinite | MemoryLimit::Unknown => None,
            },
        }
    }

    /// What the partner of `contract` spent in the contract's current period at `now`.
    pub fn spending(&self, contract: &Contract, now: DateTime<Utc>) -> Result<Spending> {
        let guarantee = contract.protection.guarantee()?;
        let (rho_used, _) = self
            .ledger
            .usage(&contract.partner, guarantee.period_days, now);
        Ok(Spending {
            rho_used,
            rho_budget: guarantee.rho_period,
            answers_used: (rho_used / guarantee.rho_answer).round() as u32,
            answers_per_period: guarantee.answers_per_period,
        })
    }

    /// Charges on the privacy ledger: never fewer than the charged answers the audit trail
    /// records, unless the ledger was lost or rolled back.
    pub fn charges(&self) -> usize {
        self.ledger.charges()
    }

    /// Admits and stores a new version of a partner's list, within the upload allowance. Nothing
    /// about the members it matches is decided or shown here. Returns the new version number.
    pub fn store_list(&self, upload: ListUpload<'_>) -> Result<CommitRecord> {
        self.list_allowance(&upload.partner, true)?;
        upload
            .store
            .commit_list(upload.partner.partner, upload.list, upload.facts)
    }

    /// The list version `partner` holds on `snapshot` and the members it matches under
    /// `contract_id` (pseudonyms, ascending), matched once for this and every question that
    /// follows: the same kept matching [`Guard::prepare`] and the questions use.
    pub async fn list_members(
        &self,
        snapshot: &Arc<Snapshot>,
        contract_id: &str,
        partner: &str,
    ) -> Result<Option<(u32, Vec<i64>)>> {
        let Some(list) = snapshot.lists.get(partner) else {
            return Ok(None);
        };
        let matched = self.audiences.matched(snapshot, contract_id, list).await?;
        Ok(Some((list.version, matched.members())))
    }

    /// Computes ahead what questions on `snapshot` will share: each contract's matched list and
    /// its purpose's consent state, as many as the audience cache keeps. Run after a commit, so
    /// the first question after an upload or an ingest does not wait for them. Nothing is
    /// decided, charged or released here.
    pub async fn prepare(&self, snapshot: &Arc<Snapshot>, rules: &Rules) -> Result<()> {
        let current = rules
            .contracts
            .iter()
            .filter_map(|(id, c)| Some((id, c, snapshot.lists.get(&c.partner)?)))
            .take(crate::audience::KEPT);
        for (contract_id, contract, list) in current {
            self.audiences
                .prepare(snapshot, contract_id, list, &contract.purpose)
                .await?;
        }
        Ok(())
    }

    /// Answers one admitted query with checked parameters: the guard's back half, which only
    /// [`Guard::answer`] calls.
    async fn run(&self, request: QueryRequest<'_>) -> Result<Answer> {
        let question = self.question(&request)?;
        let partner = request.partner;
        // A repeat is served before anything is planned: its answer was checked, charged and
        // stored when it was first asked.
        if let Some(outcome) = self.answers.get(partner, &question.key)? {
            let period = question.guarantee.period_days;
            let (rho_used, resets_at) = self.ledger.usage(partner, period, request.now);
            let usage = Charge {
                rho_spent: 0.0,
                rho_used,
                resets_at,
            };
            return self.serve(&question, outcome, usage);
        }
        let noise = self.noise_plan(&question).await?;
        let charge = self.charge(&question)?;
        let outcome = match self.compute(&question, &noise).await {
            Ok(outcome) => outcome,
            Err(Error::Engine(e)) if out_of_memory(&e) => {
                // Short of memory now, not of anything in the data: nothing is stored, the
                // charge stays, and asking again (free, it is paid for) computes it.
                // DataFusion's message names the operator and the bytes, never a value.
                tracing::warn!(query = %request.query.id, error = %e, "a question ran out of query memory");
                return Err(cleanroom_core::Error::Busy(
                    "the service is short of memory for this question now; ask again in a \
                     moment (it is paid for: asking again costs nothing)"
                        .into(),
                )
                .into());
            }
            Err(Error::Domain(cleanroom_core::Error::Precondition(message))) => {
                Outcome::Refused(message)
            }
            Err(Error::Engine(e)) => {
                // Only the error's kind: its text can quote the value of the row it failed on.
                tracing::warn!(query = %request.query.id, kind = engine_error_kind(&e), "execution failed; answered with the fixed refusal");
                Outcome::Refused(EXECUTION_REFUSAL.into())
            }
            // Storage failures are the service's, not the data's: the charge stays, nothing is
            // stored, and the caller sees an internal error.
            Err(other) => return Err(other),
        };
        // Sealed with the list's key: the answer goes when the collaboration's key goes.
        let sealed = question.list.sealed();
        self.answers.put(
            partner,
            &question.key,
            question.list.version,
            &outcome,
            sealed,
        )?;
        self.serve(&question, outcome, charge)
    }

    /// What is asked, from the request and the allow-list alone: the contract and its
    /// guarantee, the policy, the list, the answer's key. Nothing is planned.
    fn question<'a>(&self, request: &'a QueryRequest<'a>) -> Result<Question<'a>> {
        let rules = request.rules;
        let contract = rules.contracts.get(request.contract_id).ok_or_else(|| {
            cleanroom_core::Error::Precondition("the partner has no contract".into())
        })?;
        let guarantee = contract.protection.guarantee()?;
        let policy = Policy::for_query(rules, request.query, contract, request.partner);
        let list = current_list(&request.snapshot, request.partner)?;
        // Whether the retailer has computed its members' tokens under the list's key version
        // depends on its ingests, never on a member: refused here, before anything is charged.
        require_member_tokens(&request.snapshot, request.contract_id, list)?;
        let key = self.answer_key(request, list);
        Ok(Question {
            request,
            contract,
            guarantee,
            policy,
            list,
            key,
        })
    }

    /// Plans and checks a fresh question over views with no rows (so neither can depend on data,
    /// and a refusal costs nothing) and returns the noise its metrics' bounds call for.
    async fn noise_plan(&self, question: &Question<'_>) -> Result<NoisePlan> {
        let request = question.request;
        let ctx = SafeViews::empty().session()?;
        let offset = request.rules.retailer.utc_offset_minutes;
        let values = request.params.literals(offset);
        let checked = checked_plan(&ctx, &request.query.sql, values, &question.policy).await?;
        let bounds: Vec<u64> = checked
            .shape
            .metrics
            .iter()
            .filter(|m| !m.member_count)
            .map(|m| m.bound)
            .collect();
        let rows = question.policy.rows_per_member;
        Ok(question.guarantee.noise_plan(rows, &bounds)?)
    }

    /// The answer's key, which also keys its noise: the question (partner, query content,
    /// snapped parameters) and the data it reads: the retailer's data version (its committed
    /// files, by name and digest), the partner's list version and its digest, and the retailer's
    /// day (consent expiries and ages move with it). Every ingest and upload makes a new key, as
    /// counters did; the digests make different data get a different key even when a restore from
    /// backup brings old counters back, so noise is never replayed on new data. Whether a key
    /// was seen before depends on the partner's own uploads and on whether the retailer ingested
    /// anything, never on one member.
    fn answer_key(&self, request: &QueryRequest<'_>, list: &crate::store::PartnerList) -> String {
        let day = request.rules.retailer.today(request.now);
        let text = format!(
            "answer/v2|{}|{}|{}|{}|{}|{}|{}|{}|{}",
            request.partner,
            request.contract_id,
            request.query.id,
            request.query.content_sha256,
            request.params.key(),
            request.snapshot.data_version,
            list.version,
            list.digest,
            day
        );
        hex::encode(Sha256::digest(text.as_bytes()))
    }

    /// Charges a fresh answer to the partner's ledger, on disk: one of today's answers and its ρ
    /// of the period's budget (nothing for a repeat).
    fn charge(&self, question: &Question<'_>) -> Result<Charge> {
        let request = question.request;
        let g = &question.guarantee;
        let terms = Terms {
            rho: g.rho_answer,
            budget: g.rho_period,
            period_days: g.period_days,
            per_day: question.contract.max_queries_per_day,
        };
        self.ledger
            .charge(request.partner, &question.key, &terms, request.now)
    }

    /// Turns a stored or fresh outcome into the partner's answer, with what this call cost.
    fn serve(&self, question: &Question<'_>, outcome: Outcome, charge: Charge) -> Result<Answer> {
        let release = match outcome {
            Outcome::Released(release) => release,
            Outcome::Refused(message) => {
                return Err(cleanroom_core::Error::Precondition(message).into());
            }
        };
        let batch = decode_ipc(&release.arrow_ipc)?;
        let g = &question.guarantee;
        let Charge {
            rho_spent,
            rho_used,
            resets_at,
        } = charge;
        let fresh = rho_spent > 0.0;
        Ok(Answer {
            batch,
            release,
            charge: ChargeReport {
                fresh,
                rho_spent,
                epsilon_spent: if fresh { g.answer_epsilon } else { 0.0 },
                delta_spent: if fresh { g.answer_delta } else { 0.0 },
                period_epsilon: g.epsilon,
                period_delta: g.delta,
                period_days: g.period_days,
                answers_per_period: g.answers_per_period,
                answers_used: (rho_used / g.rho_answer).round() as u32,
                budget_resets_at: resets_at,
            },
        })
    }

    /// The charged part: audience check, execution, release. Runs only after the charge is on
    /// disk.
    async fn compute(&self, question: &Question<'_>, noise: &NoisePlan) -> Result<Outcome> {
        let request = question.request;
        let contract = question.contract;
        let purpose = request
            .rules
            .purposes
            .get(&contract.purpose)
            .ok_or_else(|| {
                cleanroom_core::Error::Precondition(
                    "the contract's purpose is not configured".into(),
                )
            })?;
        let audience = self
            .audiences
            .audience(AudienceOf {
                snapshot: &request.snapshot,
                contract_id: request.contract_id,
                list: question.list,
                purpose: &contract.purpose,
                requirement: Requirement {
                    min_notice_version: purpose.min_notice_version,
                    grant_valid_days: purpose.grant_valid_days,
                },
                now: request.now,
            })
            .await?;
        self.check_audience(question, noise, audience.len())?;
        let views = SafeViews::of(&request.snapshot, Arc::clone(&audience))?;
        let ctx = views.session_in(self.executor.env())?;
        // Planned again over the real views: the same SQL and schemas give the same checks.
        let offset = request.rules.retailer.utc_offset_minutes;
        let values = request.params.literals(offset);
        let checked = checked_plan(&ctx, &request.query.sql, values, &question.policy).await?;
        let batches = self
            .executor
            .collect(ctx, checked.runs.clone(), audience)
            .await?;
        let cells = self.fold(batches, &checked.shape, question).await?;
        self.release(question, noise, &checked.shape, &cells)
    }

    /// The audience check: the matched, consenting audience plus discrete Gaussian noise must
    /// reach the contract's minimum. Sensitivity 1; its ρ is part of the answer's charge.
    fn check_audience(
        &self,
        question: &Question<'_>,
        noise: &NoisePlan,
        audience: usize,
    ) -> Result<()> {
        let noise = self.draw(&question.key, &[b"audience"], noise.audience);
        let minimum = i64::from(question.contract.protection.min_audience);
        if (audience as i64).saturating_add(noise) < minimum {
            return Err(cleanroom_core::Error::Precondition(format!(
                "your list's matched, consenting audience is below this contract's minimum of \
                 about {minimum} members (judged with noise, and charged like an answer); no \
                 query answers until a larger list is uploaded"
            ))
            .into());
        }
        Ok(())
    }

    /// One draw of discrete Gaussian noise, keyed by the answer and the mechanism's part: the same
    /// question on the same data gets the same noise, and nothing else does.
    fn draw(&self, key: &str, parts: &[&[u8]], variance: u64) -> i64 {
        let mut all: Vec<&[u8]> = vec![b"gauss/v1", key.as_bytes()];
        all.extend_from_slice(parts);
        noise::discrete_gaussian(&mut noise::seeded_rng(&self.noise_key, &all), variance)
    }

    /// Folds the per-member rows into cells (work in proportion to the rows, so off the async
    /// workers that serve stored answers).
    async fn fold(
        &self,
        batches: Vec<RecordBatch>,
        shape: &plan::Shape,
        question: &Question<'_>,
    ) -> Result<fold::Cells> {
        let layout = fold::Layout::of(shape);
        let (policy, noise_key, answer_key) = (
            question.policy.clone(),
            self.noise_key,
            question.key.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let cap_key = fold::CapKey {
                noise_key: &noise_key,
                answer_key: &answer_key,
            };
            fold::fold(&batches, &layout, &policy, &cap_key)
        })
        .await
        .map_err(|e| Error::Guard(format!("folding an answer: {e}")))?
    }

    /// The release: a noisy member count for every cell of the domain, the hard k and the noisy
    /// threshold k + τ, noisy metrics for released cells, then plausibility (post-processing).
    fn release(
        &self,
        question: &Question<'_>,
        noise: &NoisePlan,
        shape: &plan::Shape,
        cells: &fold::Cells,
    ) -> Result<Outcome> {
        let policy = &question.policy;
        let k = i64::from(policy.k);
        let threshold = k.saturating_add(i64::try_from(noise.margin).unwrap_or(i64::MAX));
        let variances = metric_variances(shape, noise);
        let total = cells.count();
        let mut facts = ReleaseFacts {
            out_of_domain_rows: cells.out_of_domain_rows,
            members_capped: cells.members_capped,
            ..Default::default()
        };
        let mut values: Vec<Option<Vec<i64>>> = vec![None; total];
        for (cell, slot) in values.iter_mut().enumerate() {
            let cell_bytes = (cell as u64).to_le_bytes();
            let size = cells.size(cell);
            let noisy_count = size.saturating_add(self.draw(
                &question.key,
                &[b"count", &cell_bytes],
                noise.count,
            ));
            let fate = Fate::of(size, noisy_count, k, threshold);
            facts.count(fate);
            if fate != Fate::Released {
                continue;
            }
            let data = &cells.cells[&cell];
            let released = shape
                .metrics
                .iter()
                .enumerate()
                .map(|(m, metric)| match variances[m] {
                    None => noisy_count,
                    Some(variance) => {
                        let name = policy.metrics[m].as_bytes();
                        let raw = data.values[m].saturating_add(self.draw(
                            &question.key,
                            &[b"metric", name, &cell_bytes],
                            variance,
                        ));
                        // A released cell's noisy count is at least k + τ > 0; `max(0)` keeps
                        // the bound well-formed (clamp panics on min > max) whatever happens.
                        let most = noisy_count
                            .max(0)
                            .saturating_mul(i64::try_from(metric.bound).unwrap_or(i64::MAX));
                        raw.clamp(0, most)
                    }
                })
                .collect();
            *slot = Some(released);
        }
        let report = self.noise_report(question, noise, shape, &variances, threshold);
        let batch = output_batch(policy, &cells.sizes, &values, &report)?;
        let suppressed_rows = (total as u64) - facts.released;
        Ok(Outcome::Released(Release {
            arrow_ipc: encode_ipc(&batch)?,
            suppressed_rows,
            params: question.request.params.shown(),
            list_version: question.list.version,
            consent_snapshot_id: question.request.snapshot.consent_snapshot_id.clone(),
            noise: report,
            audit: facts,
        }))
    }

    fn noise_report(
        &self,
        question: &Question<'_>,
        noise: &NoisePlan,
        shape: &plan::Shape,
        variances: &[Option<u64>],
        threshold: i64,
    ) -> NoiseReport {
        let policy = &question.policy;
        let variance_of = |m: usize| variances[m].unwrap_or(noise.count);
        NoiseReport {
            noise_sd: (0..policy.metrics.len())
                .map(|m| (policy.metrics[m].clone(), (variance_of(m) as f64).sqrt()))
                .collect(),
            interval95: (0..policy.metrics.len())
                .map(|m| (policy.metrics[m].clone(), interval95(variance_of(m))))
                .collect(),
            per_member_bound: policy
                .metrics
                .iter()
                .cloned()
                .zip(shape.metrics.iter().map(|m| m.bound))
                .collect(),
            rows_per_member: noise.rows_per_member,
            k: policy.k,
            release_threshold: threshold as u64,
        }
    }
}

/// A query's plan, checked: its shape (how its output folds into cells) and the per-member plan
/// exactly as DataFusion will run it.
struct CheckedPlan {
    shape: plan::Shape,
    runs: datafusion::logical_expr::LogicalPlan,
}

/// Plans a query's SQL in `ctx` with its parameters' values bound, analyses it, checks the
/// analysed plan, and derives and checks the optimised per-member plan that will run.
async fn checked_plan(
    ctx: &SessionContext,
    sql: &str,
    values: HashMap<String, ScalarValue>,
    policy: &Policy,
) -> Result<CheckedPlan> {
    let analysed = plan::analysed_plan(ctx, sql, values).await?;
    let shape = plan::check_plan(&analysed, policy)?;
    let runs = plan::plan_that_runs(ctx, &plan::per_member_plan(&shape)?)?;
    Ok(CheckedPlan { shape, runs })
}

/// Whether execution failed for want of memory in the query pool.
fn out_of_memory(e: &datafusion::error::DataFusionError) -> bool {
    matches!(
        e.find_root(),
        datafusion::error::DataFusionError::ResourcesExhausted(_)
    )
}

/// A DataFusion error's kind, without its message (which can quote a row's value).
fn engine_error_kind(e: &datafusion::error::DataFusionError) -> &'static str {
    use datafusion::error::DataFusionError as E;
    match e.find_root() {
        E::ArrowError(..) => "arrow",
        E::ResourcesExhausted(_) => "resources exhausted",
        E::Execution(_) | E::ExecutionJoin(_) => "execution",
        E::IoError(_) | E::ObjectStore(_) | E::ParquetError(_) => "io",
        E::Internal(_) => "internal",
        _ => "other",
    }
}

/// Each metric's noise variance, in shape order: `None` for a count of the cell's members, which
/// is released as the noisy member count itself.
fn metric_variances(shape: &plan::Shape, noise: &NoisePlan) -> Vec<Option<u64>> {
    let mut noisy = noise.metrics.iter();
    shape
        .metrics
        .iter()
        .map(|m| {
            if m.member_count {
                None
            } else {
                noisy.next().copied()
            }
        })
        .collect()
}

/// The released rows as a batch: dimension values from the domain, metric values as released,
/// then each metric's 95 % half-width.
fn output_batch(
    policy: &Policy,
    sizes: &[usize],
    values: &[Option<Vec<i64>>],
    report: &NoiseReport,
) -> Result<RecordBatch> {
    let cells: Vec<usize> = (0..values.len()).filter(|c| values[*c].is_some()).collect();
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (d, (name, domain)) in policy.dimensions.iter().enumerate() {
        let stride: usize = sizes[d + 1..].iter().product();
        let column: StringArray = cells
            .iter()
            .map(|c| Some(domain[(c / stride) % sizes[d]].clone()))
            .collect();
        fields.push(Field::new(name, DataType::Utf8, false));
        columns.push(Arc::new(column));
    }
    for (m, name) in policy.metrics.iter().enumerate() {
        let column: Int64Array = cells
            .iter()
            .map(|c| values[*c].as_ref().map(|v| v[m]))
            .collect();
        fields.push(Field::new(name, DataType::Int64, false));
        columns.push(Arc::new(column));
    }
    for name in &policy.metrics {
        let width = i64::try_from(report.interval95[name]).unwrap_or(i64::MAX);
        let column = Int64Array::from(vec![width; cells.len()]);
        fields.push(Field::new(
            format!("{name}{INTERVAL_SUFFIX}"),
            DataType::Int64,
            false,
        ));
        columns.push(Arc::new(column));
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// A batch as Arrow IPC stream bytes.
pub fn encode_ipc(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    {
        let mut writer = StreamWriter::try_new(&mut bytes, &batch.schema())?;
        writer.write(batch)?;
        writer.finish()?;
    }
    Ok(bytes)
}

fn decode_ipc(bytes: &[u8]) -> Result<RecordBatch> {
    let reader = StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    let schema = reader.schema();
    let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(datafusion::arrow::compute::concat_batches(
        &schema, &batches,
    )?)
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retailers_day_turns_at_local_midnight() {
        let at = DateTime::parse_from_rfc3339("2026-03-31T15:30:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let local = |utc_offset_minutes| {
            cleanroom_core::rules::Retailer { utc_offset_minutes }
                .today(at)
                .to_string()
        };
        assert_eq!(local(540), "2026-04-01");
        assert_eq!(local(0), "2026-03-31");
    }
}
