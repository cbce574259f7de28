//! The rules a retailer analyst configures: purposes and their notice versions, partners, contracts,
//! the global k floor, sensitive columns and who may call the service. They are plain TOML so they
//! can be versioned and reviewed like code, and `validate` refuses a file that does not hang together.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use chrono::NaiveDate;
use serde::Deserialize;

use crate::files::excerpt;
use crate::generalize::{AGE_BANDS, GENDERS, PREFECTURES};
use crate::{Error, Result};

/// The longest period a budget or a list allowance may count over, in days. Charges and uploads
/// older than this never count again, so the high-water mark kept outside the data directory
/// need not remember them.
pub const MAX_WINDOW_DAYS: u32 = 366;

/// The whole rules file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Global privacy settings.
    pub privacy: Privacy,
    /// Facts about the retailer that shape the data.
    #[serde(default)]
    pub retailer: Retailer,
    /// Named value lists (categories, brands) that parameters and output dimensions draw from.
    #[serde(default)]
    pub domains: BTreeMap<String, Vec<String>>,
    /// Purposes members consent to, by id.
    pub purposes: BTreeMap<String, Purpose>,
    /// Partners (manufacturers), by id.
    pub partners: BTreeMap<String, Partner>,
    /// Contracts, by id. A contract is one collaboration: one partner, one purpose, one match key.
    pub contracts: BTreeMap<String, Contract>,
    /// Columns that hold special-category data and may never be used by a query.
    #[serde(default)]
    pub sensitive_columns: Vec<SensitiveColumn>,
    /// Who may call the service.
    #[serde(default)]
    pub principals: Vec<PrincipalEntry>,
    /// Limits on each principal's calls.
    #[serde(default)]
    pub limits: Limits,
    /// The directory of the file the rules were read from, where partners' declaration documents
    /// are found; `None` for rules parsed from text.
    #[serde(skip)]
    pub base_dir: Option<std::path::PathBuf>,
    /// How long the retailer's own data is kept, whatever the contracts say.
    #[serde(default)]
    pub retention: DataRetention,
}

/// The longest `[retention] purchases_days`: ten years.
pub const MAX_PURCHASES_DAYS: u32 = 3660;

/// `[retention]`: how long the retailer's purchases are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataRetention {
    /// Days a purchase is kept, counted back from the retailer's local today: the sweep removes
    /// every purchase made before local midnight of `today - purchases_days` from the purchases
    /// files (1 to [`MAX_PURCHASES_DAYS`]; absent: kept for as long as the data directory).
    #[serde(default)]
    pub purchases_days: Option<u32>,
}

impl DataRetention {
    /// The first local day whose purchases are kept on `today`; purchases before it are removed.
    pub fn purchases_kept_from(&self, today: NaiveDate) -> Option<NaiveDate> {
        let days = self.purchases_days?;
        today.checked_sub_days(chrono::Days::new(u64::from(days)))
    }
}

/// Limits on each principal's calls, whatever its role: one caller cannot crowd out the others.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Calls one principal may make per minute (a sliding window).
    #[serde(default = "default_calls_per_minute")]
    pub calls_per_minute: u32,
    /// The longest one call (a whole upload or ingest stream included) may take, in seconds:
    /// a stalled stream is cut, not held open. Read when the service starts.
    #[serde(default = "default_call_timeout_seconds")]
    pub call_timeout_seconds: u32,
    /// Calls one principal may have in flight at once, over all its connections.
    #[serde(default = "default_concurrent_calls_per_principal")]
    pub concurrent_calls_per_principal: u32,
    /// Calls in flight at once on one connection. Read when the service starts.
    #[serde(default = "default_concurrent_calls_per_connection")]
    pub concurrent_calls_per_connection: u32,
    /// The most bytes one partner list upload may carry, over all its messages.
    #[serde(default = "default_max_stream_bytes")]
    pub max_stream_bytes: u64,
    /// The most bytes one analyst ingest (members, purchases, consent) may carry: an export of
    /// any number of records is bounded by this and the disk, not by a record count.
    #[serde(default = "default_max_ingest_bytes")]
    pub max_ingest_bytes: u64,
    /// The longest an upload or ingest stream may go without sending a message, in seconds.
    #[serde(default = "default_stream_idle_seconds")]
    pub stream_idle_seconds: u32,
}

fn default_max_stream_bytes() -> u64 {
    1 << 30
}

fn default_max_ingest_bytes() -> u64 {
    1 << 38
}

fn default_stream_idle_seconds() -> u32 {
    60
}

fn default_calls_per_minute() -> u32 {
    600
}

fn default_call_timeout_seconds() -> u32 {
    600
}

fn default_concurrent_calls_per_principal() -> u32 {
    8
}

fn default_concurrent_calls_per_connection() -> u32 {
    16
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            calls_per_minute: default_calls_per_minute(),
            call_timeout_seconds: default_call_timeout_seconds(),
            concurrent_calls_per_principal: default_concurrent_calls_per_principal(),
            concurrent_calls_per_connection: default_concurrent_calls_per_connection(),
            max_stream_bytes: default_max_stream_bytes(),
            max_ingest_bytes: default_max_ingest_bytes(),
            stream_idle_seconds: default_stream_idle_seconds(),
        }
    }
}

/// Global privacy settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    /// No released row ever has fewer distinct members than this, whatever a contract or query says.
    pub k_floor: u32,
    /// The most records one list upload or ingest may carry.
    #[serde(default = "default_max_upload_records")]
    pub max_upload_records: u64,
}

fn default_max_upload_records() -> u64 {
    2_000_000
}

/// Facts about the retailer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retailer {
    /// Offset of the retailer's local time from UTC, in minutes. Date parameters mean local
    /// midnight. Japan: 540.
    #[serde(default = "default_utc_offset")]
    pub utc_offset_minutes: i32,
}

impl Retailer {
    /// The retailer's offset from UTC (UTC itself if the configured one is out of range, which
    /// validation refuses).
    pub fn offset(&self) -> chrono::FixedOffset {
        chrono::FixedOffset::east_opt(self.utc_offset_minutes.saturating_mul(60))
            .unwrap_or_else(|| chrono::FixedOffset::east_opt(0).expect("zero offset"))
    }

    /// The retailer's local date at `now`: the one place it is computed. Contracts expire, ages
    /// turn over, answers are keyed and windows begin on local dates.
    pub fn today(&self, now: chrono::DateTime<chrono::Utc>) -> chrono::NaiveDate {
        now.with_timezone(&self.offset()).date_naive()
    }
}

impl Default for Retailer {
    fn default() -> Self {
        Self {
            utc_offset_minutes: default_utc_offset(),
        }
    }
}

fn default_utc_offset() -> i32 {
    540
}

/// A purpose members can consent to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Purpose {
    /// What the purpose is, as the privacy notice says it.
    pub description: String,
    /// Grants of an older notice version do not count.
    pub min_notice_version: u32,
    /// Grants older than this many days do not count, if set.
    #[serde(default)]
    pub grant_valid_days: Option<u32>,
}

/// A partner (manufacturer).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partner {
    /// Display name.
    pub name: String,
    /// What the partner's own per-customer attribute means (for example `loyalty_tier`).
    pub attribute: String,
    /// The values the attribute may take. A fixed list keeps a partner from tagging single customers.
    pub attribute_values: Vec<String>,
    /// How the partner came by its customers' data (APPI Art. 30); no list is received without
    /// a current one.
    #[serde(default)]
    pub declaration: Option<crate::declaration::Declaration>,
}

/// A contract between the retailer and one partner.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contract {
    /// The partner it binds.
    pub partner: String,
    /// The purpose its queries serve; only members who consented to it are counted.
    pub purpose: String,
    /// The clause that allows the data use, as a reviewer would cite it.
    pub clause: String,
    /// Minimum distinct members per released row under this contract.
    pub k: u32,
    /// The last day the contract is in force.
    pub expires: NaiveDate,
    /// Version of the match key in use. Raising it rotates the key.
    #[serde(default = "default_key_version")]
    pub key_version: u32,
    /// Days the previous key version stays usable after a rotation (0 to
    /// [`MAX_KEY_OVERLAP_DAYS`]; default 0: it is destroyed at once). Counted from the moment
    /// the new version's key was made in the key store, so a restart cannot extend it.
    #[serde(default)]
    pub key_overlap_days: u32,
    /// Ids of the allow-listed queries the partner may run.
    pub queries: Vec<String>,
    /// The most answers the partner may receive in any 24 hours; unlimited if absent. Bounds how
    /// many overlapping answers a reconstruction attack can collect.
    #[serde(default)]
    pub max_queries_per_day: Option<u32>,
    /// How the guard defends this collaboration beyond the k threshold.
    #[serde(default)]
    pub protection: Protection,
    /// How long what the collaboration leaves is kept after it ends.
    #[serde(default)]
    pub retention: Retention,
}

/// The longest grace period after a contract's expiry, in days.
pub const MAX_GRACE_DAYS: u32 = 30;

/// The longest a previous key version stays usable after a rotation, in days.
pub const MAX_KEY_OVERLAP_DAYS: u32 = 90;

/// The most list versions a contract may keep.
pub const MAX_KEEP_VERSIONS: u32 = 12;

/// The longest a contract may keep one list, in days.
pub const MAX_LIST_DAYS: u32 = 3660;

/// `[contracts.X.retention]`: what is kept of a collaboration, and for how long.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Days after the contract's last day before its lists, member tokens, stored answers and
    /// key are destroyed (0 to 30; default 0: the day after it expires).
    #[serde(default)]
    pub grace_days: u32,
    /// List versions kept (1 to [`MAX_KEEP_VERSIONS`]; default 1): a new upload destroys the
    /// versions beyond this, once no answer is being computed over them.
    #[serde(default = "default_keep_versions")]
    pub keep_versions: u32,
    /// The longest a list is kept after its upload, in days (1 to [`MAX_LIST_DAYS`]; absent:
    /// until a newer version or the collaboration's end replaces it). A list uploaded on day D
    /// is destroyed on day D + `max_list_days`, and the partner's questions are refused until it
    /// uploads a new one.
    #[serde(default)]
    pub max_list_days: Option<u32>,
}

fn default_keep_versions() -> u32 {
    1
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            grace_days: 0,
            keep_versions: default_keep_versions(),
            max_list_days: None,
        }
    }
}

impl Contract {
    /// The first day on which the collaboration is destroyed: the day after its last day plus
    /// its grace period, in the retailer's local time.
    pub fn destruction_day(&self) -> NaiveDate {
        self.expires + chrono::Days::new(u64::from(self.retention.grace_days) + 1)
    }

    /// The day a list uploaded on `uploaded` (local date) is destroyed under `max_list_days`, if
    /// the contract limits how long a list is kept.
    pub fn list_destruction_day(&self, uploaded: NaiveDate) -> Option<NaiveDate> {
        let days = self.retention.max_list_days?;
        uploaded.checked_add_days(chrono::Days::new(u64::from(days)))
    }
}

/// The guard's settings for one contract beyond the k threshold (see the README's privacy
/// promise). Every answer is a differentially private release with the member as the unit; the
/// contract states the guarantee it buys per period, and the guard charges every fresh answer
/// its share. Every field has a default, so a contract names only what it changes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Protection {
    /// Matched, consenting members the partner's list must reach before a query answers. The
    /// audience is counted with discrete Gaussian noise, charged as part of every answer.
    #[serde(default = "default_min_audience")]
    pub min_audience: u32,
    /// List versions the partner may upload per `list_window_days`.
    #[serde(default = "default_max_list_versions")]
    pub max_list_versions: u32,
    /// The period `max_list_versions` counts over, in days.
    #[serde(default = "default_list_window_days")]
    pub list_window_days: u32,
    /// ε of everything the partner receives over one period, every answer together.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// δ of everything the partner receives over one period (half of it pays for the hard k).
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// The period the guarantee and the budget count over, in days (a rolling window).
    #[serde(default = "default_list_window_days")]
    pub period_days: u32,
    /// Fresh answers the period's budget pays for, each costing the same share; repeats of an
    /// answer already paid for are free.
    #[serde(default = "default_answers_per_period")]
    pub answers_per_period: u32,
    /// The most output rows one member counts in per answer, whatever a query declares.
    #[serde(default = "default_max_rows_per_member")]
    pub max_rows_per_member: u32,
}

impl Default for Protection {
    fn default() -> Self {
        Self {
            min_audience: default_min_audience(),
            max_list_versions: default_max_list_versions(),
            list_window_days: default_list_window_days(),
            epsilon: default_epsilon(),
            delta: default_delta(),
            period_days: default_list_window_days(),
            answers_per_period: default_answers_per_period(),
            max_rows_per_member: default_max_rows_per_member(),
        }
    }
}

impl Protection {
    /// The guarantee these settings buy, and what each answer costs.
    pub fn guarantee(&self) -> Result<crate::accounting::Guarantee> {
        crate::accounting::Guarantee::new(
            self.epsilon,
            self.delta,
            self.period_days,
            self.answers_per_period,
        )
    }
}

fn default_min_audience() -> u32 {
    100
}
fn default_max_list_versions() -> u32 {
    4
}
fn default_list_window_days() -> u32 {
    30
}
fn default_epsilon() -> f64 {
    4.0
}
fn default_delta() -> f64 {
    1e-6
}
fn default_answers_per_period() -> u32 {
    40
}
fn default_max_rows_per_member() -> u32 {
    8
}

fn default_key_version() -> u32 {
    1
}

/// A column tagged as special-category personal data (APPI 要配慮個人情報, GDPR Art. 9).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensitiveColumn {
    /// Column name as the safe views spell it.
    pub column: String,
    /// The category it falls under: one of [`SENSITIVE_CATEGORIES`].
    pub category: String,
}

/// Special categories of personal data: APPI Art. 2(3) 要配慮個人情報 (with the Cabinet Order's
/// additions) and GDPR Art. 9(1). A sensitive column names one of these ids.
pub const SENSITIVE_CATEGORIES: &[(&str, &str)] = &[
    ("race", "人種 / racial or ethnic origin (APPI, GDPR)"),
    (
        "creed",
        "信条 / religious or philosophical beliefs, political opinions (APPI, GDPR)",
    ),
    ("social_status", "社会的身分 / social status (APPI)"),
    (
        "medical_history",
        "病歴 / medical history, health (APPI, GDPR)",
    ),
    ("criminal_record", "犯罪の経歴 / criminal record (APPI)"),
    (
        "crime_victim",
        "犯罪により害を被った事実 / having been a victim of crime (APPI)",
    ),
    (
        "disability",
        "心身の機能の障害 / physical or mental disability (APPI Order)",
    ),
    (
        "health_checkup",
        "健康診断等の結果 / results of health check-ups (APPI Order)",
    ),
    (
        "medical_care",
        "診療・調剤 / medical guidance, treatment or dispensing (APPI Order)",
    ),
    (
        "criminal_procedure",
        "刑事事件に関する手続 / criminal proceedings (APPI Order)",
    ),
    (
        "juvenile_procedure",
        "少年の保護事件に関する手続 / juvenile proceedings (APPI Order)",
    ),
    ("trade_union", "trade union membership (GDPR)"),
    ("genetic", "genetic data (GDPR; ゲノム情報 under APPI)"),
    ("biometric", "biometric data for identification (GDPR)"),
    ("sex_life", "sex life or sexual orientation (GDPR)"),
];

/// The three kinds of user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A manufacturer's data team.
    Partner,
    /// A retailer analyst who loads data and configures rules.
    Analyst,
    /// A legal reviewer.
    Legal,
}

impl Role {
    /// Lowercase name, as audit records spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Partner => "partner",
            Role::Analyst => "analyst",
            Role::Legal => "legal",
        }
    }
}

/// One caller and how its bearer token is checked. The token itself is never stored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalEntry {
    /// Who it is, for the audit trail.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// For partners: which partner.
    #[serde(default)]
    pub partner: Option<String>,
    /// The public id of a token minted by `cleanroom token new` (its `cr1.<id>.` prefix).
    #[serde(default)]
    pub token_id: Option<String>,
    /// Argon2id (PHC string) of that token's secret part: a stolen rules file does not let
    /// anyone test guesses cheaply.
    #[serde(default)]
    pub token_hash: Option<String>,
    /// The demo form: hex SHA-256 of a whole token of any length. `cleanroom serve` refuses it
    /// unless started with `--allow-demo-tokens`.
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// Hex SHA-256 of the client certificate (DER) this principal must also present over mutual
    /// TLS; none: the token alone identifies it.
    #[serde(default)]
    pub client_cert_sha256: Option<String>,
}

/// A minted token's public id: 16 lowercase hex digits.
pub fn is_token_id(text: &str) -> bool {
    text.len() == 16
        && text
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

/// A rules-file error, as every check of [`Rules::validate`] reports it.
fn fail<T>(msg: String) -> Result<T> {
    Err(Error::Config(msg))
}

/// Checks a principal's client certificate pin and credential form, and returns the credential
/// that must be unique among principals: the minted token's id or the demo token's hash.
fn principal_credential(p: &PrincipalEntry) -> Result<&String> {
    if p.client_cert_sha256
        .as_deref()
        .is_some_and(|c| !is_sha256_hex(c))
    {
        return fail(format!(
            "principal `{}`: client_cert_sha256 must be 64 lowercase hex digits",
            excerpt(&p.name)
        ));
    }
    match (&p.token_id, &p.token_hash, &p.token_sha256) {
        (Some(id), Some(hash), None) => {
            if !is_token_id(id) || !hash.starts_with("$argon2id$") {
                return fail(format!(
                    "principal `{}`: token_id must be 16 lowercase hex digits and \
                     token_hash an $argon2id$ string (as `cleanroom token new` prints)",
                    excerpt(&p.name)
                ));
            }
            Ok(id)
        }
        (None, None, Some(sha)) if is_sha256_hex(sha) => Ok(sha),
        (None, None, Some(_)) => fail(format!(
            "principal `{}`: token_sha256 must be 64 lowercase hex digits",
            excerpt(&p.name)
        )),
        _ => fail(format!(
            "principal `{}`: needs token_id and token_hash (from `cleanroom token \
             new`), or the demo form token_sha256, and not both",
            excerpt(&p.name)
        )),
    }
}

/// A contract's rotation overlap lies in its range.
fn check_key_overlap(id: &str, contract: &Contract) -> Result<()> {
    if contract.key_overlap_days > MAX_KEY_OVERLAP_DAYS {
        return fail(format!(
            "contracts.{id}.key_overlap_days must be between 0 and {MAX_KEY_OVERLAP_DAYS} \
             (got {})",
            contract.key_overlap_days
        ));
    }
    Ok(())
}

/// A contract's `[retention]` values lie in their ranges.
fn check_retention(id: &str, retention: &Retention) -> Result<()> {
    if retention.grace_days > MAX_GRACE_DAYS {
        return fail(format!(
            "contracts.{id}.retention.grace_days must be between 0 and {MAX_GRACE_DAYS}"
        ));
    }
    if !(1..=MAX_KEEP_VERSIONS).contains(&retention.keep_versions) {
        return fail(format!(
            "contracts.{id}.retention.keep_versions must be between 1 and {MAX_KEEP_VERSIONS}"
        ));
    }
    if retention
        .max_list_days
        .is_some_and(|days| !(1..=MAX_LIST_DAYS).contains(&days))
    {
        return fail(format!(
            "contracts.{id}.retention.max_list_days must be between 1 and {MAX_LIST_DAYS}"
        ));
    }
    Ok(())
}

/// The largest k any floor, contract or query may set.
pub const MAX_K: u32 = 1000;

/// The most output rows a contract or a query may let one member count in per answer: noise
/// grows with its square root, and a domain wider than this is better asked in parts.
pub const MAX_ROWS_PER_MEMBER: u32 = 64;

/// The built-in domains the guard knows without configuration.
pub const BUILTIN_DOMAINS: &[&str] = &["age_band", "prefecture", "gender", "partner_attribute"];

/// The value the safe views give a matched customer whose partner attribute is missing.
pub const UNKNOWN_ATTRIBUTE: &str = "unknown";

impl Rules {
    /// Reads and validates a rules file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::files::read_config_file(path)?;
        let mut rules = Self::parse(&text).map_err(|e| crate::files::in_file(path, e))?;
        rules.base_dir = Some(match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        });
        Ok(rules)
    }

    /// Whether partner `partner`'s declaration is current on `today` (the retailer's local date).
    pub fn declaration_status(
        &self,
        partner: &str,
        today: NaiveDate,
    ) -> crate::declaration::DeclarationStatus {
        let declaration = self
            .partners
            .get(partner)
            .and_then(|p| p.declaration.as_ref());
        crate::declaration::status_of(declaration, self.base_dir.as_deref(), today)
    }

    /// Parses and validates rules from TOML text.
    pub fn parse(text: &str) -> Result<Self> {
        let rules: Rules = toml::from_str(text).map_err(|e| crate::files::toml_error(text, &e))?;
        rules.validate()?;
        Ok(rules)
    }

    /// Checks that the rules hang together: every reference resolves, every k is at least the
    /// floor's minimum, every partner has at most one contract, every token is unique.
    pub fn validate(&self) -> Result<()> {
        self.check_privacy()?;
        self.check_domains()?;
        self.check_partners()?;
        self.check_contracts()?;
        self.check_sensitive_columns()?;
        self.check_limits()?;
        self.check_data_retention()?;
        self.check_principals()
    }

    /// `[retention] purchases_days` lies between 1 and [`MAX_PURCHASES_DAYS`].
    fn check_data_retention(&self) -> Result<()> {
        if self
            .retention
            .purchases_days
            .is_some_and(|days| !(1..=MAX_PURCHASES_DAYS).contains(&days))
        {
            return fail(format!(
                "retention.purchases_days must be between 1 and {MAX_PURCHASES_DAYS}"
            ));
        }
        Ok(())
    }

    /// The global k floor lies between 2 and [`MAX_K`].
    fn check_privacy(&self) -> Result<()> {
        if self.privacy.k_floor < 2 || self.privacy.k_floor > MAX_K {
            return fail(format!("privacy.k_floor must be between 2 and {MAX_K}"));
        }
        Ok(())
    }

    /// Configured domains leave the built-in ones alone and each list distinct values.
    fn check_domains(&self) -> Result<()> {
        for name in self.domains.keys() {
            if BUILTIN_DOMAINS.contains(&name.as_str()) {
                return fail(format!(
                    "domains.{name}: built-in domain cannot be redefined"
                ));
            }
        }
        for (name, values) in &self.domains {
            if values.is_empty() || values.iter().collect::<BTreeSet<_>>().len() != values.len() {
                return fail(format!(
                    "domains.{}: must be a non-empty list of distinct values",
                    excerpt(name)
                ));
            }
        }
        Ok(())
    }

    /// Each partner's attribute values are non-empty, distinct and leave out the reserved
    /// [`UNKNOWN_ATTRIBUTE`].
    fn check_partners(&self) -> Result<()> {
        for (id, partner) in &self.partners {
            let distinct: BTreeSet<_> = partner.attribute_values.iter().collect();
            if partner.attribute_values.is_empty()
                || distinct.len() != partner.attribute_values.len()
            {
                return fail(format!(
                    "partners.{}.attribute_values: must be non-empty and distinct",
                    excerpt(id)
                ));
            }
            if distinct.contains(&UNKNOWN_ATTRIBUTE.to_string()) {
                return fail(format!(
                    "partners.{}.attribute_values: `{UNKNOWN_ATTRIBUTE}` is reserved",
                    excerpt(id)
                ));
            }
            if let Some(declaration) = &partner.declaration {
                declaration.check(id)?;
            }
        }
        Ok(())
    }

    /// Every contract is well-formed on its own, and no partner has two.
    fn check_contracts(&self) -> Result<()> {
        let mut contract_of_partner = HashMap::new();
        for (id, contract) in &self.contracts {
            self.check_contract(id, contract)?;
            if let Some(other) = contract_of_partner.insert(&contract.partner, id) {
                return fail(format!(
                    "partner `{}` has two contracts ({other}, {id}); one collaboration per partner",
                    excerpt(&contract.partner)
                ));
            }
        }
        Ok(())
    }

    /// One contract names a known partner and purpose, a k and key version in range, and a
    /// protection that holds.
    fn check_contract(&self, id: &str, contract: &Contract) -> Result<()> {
        // The id names the collaboration's files in the key store.
        crate::keys::check_contract_id(id)?;
        if !self.partners.contains_key(&contract.partner) {
            return fail(format!(
                "contracts.{id}: unknown partner `{}`",
                excerpt(&contract.partner)
            ));
        }
        if !self.purposes.contains_key(&contract.purpose) {
            return fail(format!(
                "contracts.{id}: unknown purpose `{}`",
                excerpt(&contract.purpose)
            ));
        }
        if contract.k == 0 || contract.k > MAX_K {
            return fail(format!("contracts.{id}.k must be between 1 and {MAX_K}"));
        }
        if contract.key_version == 0 {
            return fail(format!("contracts.{id}.key_version must be positive"));
        }
        check_retention(id, &contract.retention)?;
        check_key_overlap(id, contract)?;
        self.check_protection(id, contract)
    }

    /// A contract's protection: an audience of at least 5 × k, list limits and rows per member in
    /// range, and a privacy guarantee that can be computed.
    fn check_protection(&self, id: &str, contract: &Contract) -> Result<()> {
        let protection = &contract.protection;
        let k = self.effective_k(contract, 0);
        if protection.min_audience < 5 * k {
            return fail(format!(
                "contracts.{id}.protection.min_audience must be at least 5 × k = {}",
                5 * k
            ));
        }
        if protection.max_list_versions == 0
            || !(1..=MAX_WINDOW_DAYS).contains(&protection.list_window_days)
        {
            return fail(format!(
                "contracts.{id}.protection: max_list_versions must be positive and \
                 list_window_days between 1 and {MAX_WINDOW_DAYS}"
            ));
        }
        if !(1..=MAX_ROWS_PER_MEMBER).contains(&protection.max_rows_per_member) {
            return fail(format!(
                "contracts.{id}.protection.max_rows_per_member must be between 1 and {MAX_ROWS_PER_MEMBER}"
            ));
        }
        if let Err(e) = protection.guarantee() {
            return fail(format!("contracts.{id}.protection: {e}"));
        }
        Ok(())
    }

    /// Every sensitive column names one of the [`SENSITIVE_CATEGORIES`].
    fn check_sensitive_columns(&self) -> Result<()> {
        for c in &self.sensitive_columns {
            if !SENSITIVE_CATEGORIES.iter().any(|(id, _)| *id == c.category) {
                let known: Vec<&str> = SENSITIVE_CATEGORIES.iter().map(|(id, _)| *id).collect();
                return fail(format!(
                    "sensitive column `{}`: category `{}` is not one of {}",
                    excerpt(&c.column),
                    excerpt(&c.category),
                    known.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Every value under `[limits]` is at least 1.
    fn check_limits(&self) -> Result<()> {
        let limits = &self.limits;
        if limits.calls_per_minute == 0
            || limits.call_timeout_seconds == 0
            || limits.concurrent_calls_per_principal == 0
            || limits.concurrent_calls_per_connection == 0
            || limits.max_stream_bytes == 0
            || limits.max_ingest_bytes == 0
            || limits.stream_idle_seconds == 0
        {
            return fail("every value under [limits] must be at least 1".into());
        }
        Ok(())
    }

    /// Every principal has a well-formed credential no other principal shares, and names a
    /// partner exactly when its role is partner.
    fn check_principals(&self) -> Result<()> {
        let mut tokens = BTreeSet::new();
        for p in &self.principals {
            let credential = principal_credential(p)?;
            if !tokens.insert(credential) {
                return fail(format!(
                    "principal `{}`: token shared with another principal",
                    excerpt(&p.name)
                ));
            }
            self.check_principal_partner(p)?;
        }
        Ok(())
    }

    /// A partner principal names a known partner; no other principal names one.
    fn check_principal_partner(&self, p: &PrincipalEntry) -> Result<()> {
        match (p.role, &p.partner) {
            (Role::Partner, Some(partner)) if self.partners.contains_key(partner) => {}
            (Role::Partner, _) => {
                return fail(format!(
                    "principal `{}`: a partner principal needs a known partner",
                    excerpt(&p.name)
                ));
            }
            (_, Some(_)) => {
                return fail(format!(
                    "principal `{}`: only partner principals name a partner",
                    excerpt(&p.name)
                ));
            }
            (_, None) => {}
        }
        Ok(())
    }

    /// The contract of a partner, if it has one.
    pub fn contract_of(&self, partner: &str) -> Option<(&str, &Contract)> {
        self.contracts
            .iter()
            .find(|(_, c)| c.partner == partner)
            .map(|(id, c)| (id.as_str(), c))
    }

    /// The values a named domain holds, for one partner (the partner attribute depends on it).
    pub fn domain(&self, name: &str, partner: &str) -> Option<Vec<String>> {
        let owned = |values: &[&str]| values.iter().map(|v| v.to_string()).collect();
        match name {
            "age_band" => Some(owned(AGE_BANDS)),
            "prefecture" => Some(owned(PREFECTURES)),
            "gender" => Some(owned(GENDERS)),
            "partner_attribute" => self.partners.get(partner).map(|p| {
                let mut values = p.attribute_values.clone();
                values.push(UNKNOWN_ATTRIBUTE.to_string());
                values
            }),
            other => self.domains.get(other).cloned(),
        }
    }

    /// Whether a domain name is known (built in or configured).
    pub fn has_domain(&self, name: &str) -> bool {
        BUILTIN_DOMAINS.contains(&name) || self.domains.contains_key(name)
    }

    /// The effective threshold of a query under a contract: the largest of the global floor, the
    /// contract's k and the query's k.
    pub fn effective_k(&self, contract: &Contract, query_k: u32) -> u32 {
        self.privacy.k_floor.max(contract.k).max(query_k)
    }

    /// Names of the columns tagged sensitive.
    pub fn sensitive_column_names(&self) -> BTreeSet<String> {
        self.sensitive_columns
            .iter()
            .map(|c| c.column.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [privacy]
        k_floor = 5
        [purposes.p]
        description = "d"
        min_notice_version = 2
        [partners.acme]
        name = "Acme"
        attribute = "tier"
        attribute_values = ["a", "b"]
        [contracts.c1]
        partner = "acme"
        purpose = "p"
        clause = "§1"
        k = 8
        expires = "2027-01-31"
        queries = []
    "#;

    #[test]
    fn effective_k_is_the_largest() {
        let rules = Rules::parse(MINIMAL).unwrap();
        let (_, contract) = rules.contract_of("acme").unwrap();
        assert_eq!(rules.effective_k(contract, 3), 8);
        assert_eq!(rules.effective_k(contract, 20), 20);
    }

    #[test]
    fn retention_values_out_of_range_are_refused_by_name() {
        let with = |section: &str| format!("{MINIMAL}\n{section}\n");
        let cases = [
            (
                "[contracts.c1.retention]\nkeep_versions = 0",
                "contracts.c1.retention.keep_versions must be between 1 and 12",
            ),
            (
                "[contracts.c1.retention]\nkeep_versions = 13",
                "contracts.c1.retention.keep_versions must be between 1 and 12",
            ),
            (
                "[contracts.c1.retention]\nmax_list_days = 0",
                "contracts.c1.retention.max_list_days must be between 1 and 3660",
            ),
            (
                "[contracts.c1.retention]\ngrace_days = 31",
                "contracts.c1.retention.grace_days must be between 0 and 30",
            ),
            (
                "[retention]\npurchases_days = 0",
                "retention.purchases_days must be between 1 and 3660",
            ),
            (
                "[retention]\npurchases_days = 3661",
                "retention.purchases_days must be between 1 and 3660",
            ),
        ];
        for (section, message) in cases {
            match Rules::parse(&with(section)) {
                Err(Error::Config(m)) => assert_eq!(m, message, "{section}"),
                other => panic!("{section}: {other:?}"),
            }
        }
        let kept = Rules::parse(&with(
            "[contracts.c1.retention]\nkeep_versions = 3\nmax_list_days = 30\n\
             [retention]\npurchases_days = 730",
        ))
        .unwrap();
        let contract = &kept.contracts["c1"];
        assert_eq!(contract.retention.keep_versions, 3);
        let day = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        assert_eq!(
            contract.list_destruction_day(day),
            NaiveDate::from_ymd_opt(2026, 1, 31)
        );
        assert_eq!(
            kept.retention.purchases_kept_from(day),
            // 730 days back from 2026-01-01 crosses 29 February 2024.
            NaiveDate::from_ymd_opt(2024, 1, 2)
        );
        let defaults = Rules::parse(MINIMAL).unwrap();
        assert_eq!(defaults.contracts["c1"].retention.keep_versions, 1);
        assert_eq!(defaults.retention.purchases_kept_from(day), None);
    }

    #[test]
    fn key_overlap_days_defaults_to_zero_and_is_bounded() {
        let with =
            |days: &str| MINIMAL.replace("k = 8", &format!("k = 8\nkey_overlap_days = {days}"));
        assert_eq!(
            Rules::parse(MINIMAL).unwrap().contracts["c1"].key_overlap_days,
            0
        );
        assert_eq!(
            Rules::parse(&with("90")).unwrap().contracts["c1"].key_overlap_days,
            90
        );
        match Rules::parse(&with("91")) {
            Err(Error::Config(m)) => assert_eq!(
                m,
                "contracts.c1.key_overlap_days must be between 0 and 90 (got 91)"
            ),
            other => panic!("{other:?}"),
        }
        assert!(
            Rules::parse(&with("-1")).is_err(),
            "a negative overlap is not a u32"
        );
    }

    #[test]
    fn broken_references_are_refused() {
        let broken = MINIMAL.replace("purpose = \"p\"", "purpose = \"nope\"");
        assert!(
            matches!(Rules::parse(&broken), Err(Error::Config(m)) if m.contains("unknown purpose"))
        );
        let unknown_key = format!("{MINIMAL}\n[extra]\nx = 1\n");
        assert!(Rules::parse(&unknown_key).is_err());
    }
}

#[cfg(test)]
mod fuzz;
