//! The service's metrics, in the Prometheus text format (version 0.0.4), served at `/metrics` on
//! the review page's port to the legal and analyst roles: calls by method and status, refused
//! calls by reason, answer latency (fresh and stored), stream bytes, ingested rows, each
//! partner's own privacy spending, and how busy query execution is.
//!
//! Every label value comes from a fixed set: the service's method names, gRPC status code names,
//! fixed reason and table words, and partner ids from the rules (configuration, not member data).
//! Label values are `&'static str` wherever they can be, so that no request text can become one;
//! the one exception, partner ids, comes from the rules in force. No query parameter, identifier,
//! token or free text ever reaches a series.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use cleanroom_engine::guard::{Load, Spending};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::Code;

use crate::{Error, Result};

/// The `Content-Type` of a scrape: the Prometheus text format, which every scraper reads.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every gRPC method the service serves: the only values a `method` label takes (anything else
/// is counted as `other`, so a caller cannot add a series by calling a made-up path).
pub const METHODS: &[&str] = &[
    "ListQueries",
    "DescribeQuery",
    "RunQuery",
    "UploadList",
    "IngestMembers",
    "IngestPurchases",
    "IngestConsent",
    "IngestPartnerList",
    "RequestDestruction",
    "EraseMembers",
    "ListAllowList",
    "ApproveQuery",
    "RejectQuery",
    "ListAudit",
    "ConfirmDestruction",
    "ListReceipts",
    "DiscloseMember",
];

/// The method's name from [`METHODS`], or `other`.
pub fn known_method(method: &str) -> &'static str {
    METHODS
        .iter()
        .find(|known| **known == method)
        .copied()
        .unwrap_or("other")
}

/// A gRPC status code as the gRPC specification spells it (`OK`, `FAILED_PRECONDITION`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Why a call was refused, in one fixed word: never the refusal's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No valid credentials (before any handler ran).
    Unauthenticated,
    /// Over the principal's rate or in-flight limit (before any handler ran).
    Limited,
    /// A question over the partner's answers per day or its period's privacy budget.
    Budget,
    /// A question whose plan the guard's checks refused.
    Plan,
    /// A question asked without what it needs: a contract in force, an approved query, a list.
    Precondition,
    /// A question whose parameters are not what the query declares.
    Parameters,
    /// A question not on the caller's allow-list.
    NotVisible,
    /// A question from a caller whose role may not ask.
    Permission,
}

impl Refused {
    /// The reason's label value.
    pub fn word(self) -> &'static str {
        match self {
            Refused::Unauthenticated => "unauthenticated",
            Refused::Limited => "limited",
            Refused::Budget => "budget",
            Refused::Plan => "plan",
            Refused::Precondition => "precondition",
            Refused::Parameters => "parameters",
            Refused::NotVisible => "not_visible",
            Refused::Permission => "permission",
        }
    }
}

/// The tables an ingest or an upload adds rows to: the only values of a `table` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// The retailer's members.
    Members,
    /// The retailer's purchases.
    Purchases,
    /// The retailer's consent events.
    Consent,
    /// Partners' customer lists (hashed on arrival).
    PartnerLists,
}

impl Table {
    fn word(self) -> &'static str {
        match self {
            Table::Members => "members",
            Table::Purchases => "purchases",
            Table::Consent => "consent",
            Table::PartnerLists => "partner_lists",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabel {
    table: &'static str,
}

/// A partner id from the rules in force.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartnerLabel {
    partner: String,
}

/// Answer latency buckets: 5 ms (a stored answer) doubling up to 41 s (a heavy fresh one).
fn answer_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// What is read from the service's state at each scrape rather than counted as it happens.
#[derive(Debug, Clone, Default)]
pub struct Readings {
    /// Query execution's queue and memory.
    pub load: Load,
    /// Each partner's own spending in its current period, by partner id.
    pub spending: Vec<(String, Spending)>,
}

/// The service's metrics, registered once when the service starts.
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    refused: Family<ReasonLabel, Counter>,
    answer_seconds: Family<KindLabel, Histogram, fn() -> Histogram>,
    stream_bytes: Family<MethodLabel, Counter>,
    ingest_rows: Family<TableLabel, Counter>,
    budget_used: Family<PartnerLabel, Gauge<f64, AtomicU64>>,
    answers_used: Family<PartnerLabel, Gauge>,
    waiting: Gauge,
    running: Gauge,
    memory: Gauge,
    memory_limit: Gauge,
    /// Held while a scrape sets the read gauges and encodes them, so two scrapes at once never
    /// see each other's half-set partner gauges.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every series, registered under the `cleanroom_` prefix.
    pub fn new() -> Self {
        let metrics = Self {
            registry: Registry::with_prefix("cleanroom"),
            calls: Family::default(),
            refused: Family::default(),
            answer_seconds: Family::new_with_constructor(answer_histogram),
            stream_bytes: Family::default(),
            ingest_rows: Family::default(),
            budget_used: Family::default(),
            answers_used: Family::default(),
            waiting: Gauge::default(),
            running: Gauge::default(),
            memory: Gauge::default(),
            memory_limit: Gauge::default(),
            scrape: Mutex::new(()),
        };
        metrics.registered()
    }

    fn registered(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "calls",
            "gRPC calls answered by a handler, by method and status code",
            self.calls.clone(),
        );
        r.register(
            "refused_calls",
            "Calls refused: before a handler (unauthenticated, limited) or by the guard",
            self.refused.clone(),
        );
        r.register(
            "answer_seconds",
            "Time to answer a question, until its audit record is durable: fresh or stored",
            self.answer_seconds.clone(),
        );
        r.register(
            "stream_bytes",
            "Encoded bytes received on upload and ingest streams, by method",
            self.stream_bytes.clone(),
        );
        r.register(
            "ingest_rows",
            "Rows committed by ingests and list uploads, by table",
            self.ingest_rows.clone(),
        );
        r.register(
            "privacy_budget_used",
            "The partner's own privacy spending (rho) in its current period, as a fraction of its budget",
            self.budget_used.clone(),
        );
        r.register(
            "privacy_answers_used",
            "Fresh answers the partner was charged for in its current period",
            self.answers_used.clone(),
        );
        r.register(
            "queries_waiting",
            "Questions waiting for a place among the plans executing",
            self.waiting.clone(),
        );
        r.register(
            "queries_running",
            "Plans executing now",
            self.running.clone(),
        );
        r.register(
            "query_memory_bytes",
            "Bytes reserved in the query memory pool",
            self.memory.clone(),
        );
        r.register(
            "query_memory_limit_bytes",
            "The query memory pool's limit (0: none on this service, as on a cluster)",
            self.memory_limit.clone(),
        );
        self
    }

    /// Counts a call to `method` answered with `code`.
    pub fn call(&self, method: &str, code: Code) {
        let labels = CallLabels {
            method: known_method(method),
            code: code_name(code),
        };
        self.calls.get_or_create(&labels).inc();
    }

    /// Counts a refused call.
    pub fn refused(&self, reason: Refused) {
        let labels = ReasonLabel {
            reason: reason.word(),
        };
        self.refused.get_or_create(&labels).inc();
    }

    /// Records how long a question took to answer, fresh (computed now) or stored.
    pub fn answered(&self, fresh: bool, took: Duration) {
        let kind = if fresh { "fresh" } else { "stored" };
        self.answer_seconds
            .get_or_create(&KindLabel { kind })
            .observe(took.as_secs_f64());
    }

    /// The counter of bytes received on `method`'s streams, to count them as they arrive.
    pub fn stream_bytes(&self, method: &str) -> Counter {
        let labels = MethodLabel {
            method: known_method(method),
        };
        self.stream_bytes.get_or_create_owned(&labels)
    }

    /// Counts rows committed to `table`.
    pub fn ingested(&self, table: Table, rows: u64) {
        let labels = TableLabel {
            table: table.word(),
        };
        self.ingest_rows.get_or_create(&labels).inc_by(rows);
    }

    /// The metrics in the Prometheus text format, with the read gauges set from `now`.
    pub fn encode(&self, now: &Readings) -> Result<String> {
        let _scrape = self
            .scrape
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.set_readings(now);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .map_err(|e| Error::Internal(format!("encoding the metrics: {e}")))?;
        Ok(text)
    }

    fn set_readings(&self, now: &Readings) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.waiting.set(gauge(now.load.queue.waiting));
        self.running.set(gauge(now.load.queue.running));
        self.memory.set(gauge(now.load.memory_bytes));
        self.memory_limit
            .set(gauge(now.load.memory_limit_bytes.unwrap_or(0)));
        // Partners removed from the rules leave the series with them.
        self.budget_used.clear();
        self.answers_used.clear();
        for (partner, spending) in &now.spending {
            let labels = PartnerLabel {
                partner: partner.clone(),
            };
            let fraction = if spending.rho_budget > 0.0 {
                spending.rho_used / spending.rho_budget
            } else {
                0.0
            };
            self.budget_used.get_or_create(&labels).set(fraction);
            self.answers_used
                .get_or_create(&labels)
                .set(i64::from(spending.answers_used));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The method list is the proto's: a new RPC cannot be counted as `other` by oversight.
    #[test]
    fn the_method_list_is_every_rpc_of_the_proto() {
        let proto = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../proto/cleanroom/v1/cleanroom.proto");
        let text = std::fs::read_to_string(proto).unwrap();
        let rpcs: Vec<&str> = text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("rpc "))
            .map(|rest| rest.split('(').next().unwrap().trim())
            .collect();
        let mut listed = METHODS.to_vec();
        let mut declared = rpcs.clone();
        listed.sort_unstable();
        declared.sort_unstable();
        assert_eq!(listed, declared);
        assert_eq!(known_method("RunQuery"), "RunQuery");
        assert_eq!(known_method("M0000001"), "other");
    }

    #[test]
    fn a_scrape_is_prometheus_text_with_fixed_labels() {
        let metrics = Metrics::new();
        metrics.call("RunQuery", Code::FailedPrecondition);
        metrics.call("/made/up?email=a@b", Code::Unimplemented);
        metrics.refused(Refused::Budget);
        metrics.answered(true, Duration::from_millis(30));
        metrics.stream_bytes("UploadList").inc_by(100);
        metrics.ingested(Table::Members, 7);
        let spending = Spending {
            rho_used: 0.25,
            rho_budget: 1.0,
            answers_used: 2,
            answers_per_period: 8,
        };
        let readings = Readings {
            spending: vec![("sakura_foods".into(), spending)],
            ..Readings::default()
        };
        let text = metrics.encode(&readings).unwrap();
        for line in [
            "# TYPE cleanroom_calls_total counter",
            r#"cleanroom_calls_total{method="RunQuery",code="FAILED_PRECONDITION"} 1"#,
            r#"cleanroom_calls_total{method="other",code="UNIMPLEMENTED"} 1"#,
            r#"cleanroom_refused_calls_total{reason="budget"} 1"#,
            r#"cleanroom_answer_seconds_count{kind="fresh"} 1"#,
            r#"cleanroom_stream_bytes_total{method="UploadList"} 100"#,
            r#"cleanroom_ingest_rows_total{table="members"} 7"#,
            r#"cleanroom_privacy_budget_used{partner="sakura_foods"} 0.25"#,
            r#"cleanroom_privacy_answers_used{partner="sakura_foods"} 2"#,
            "cleanroom_queries_waiting 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("made/up") && !text.contains("a@b"));
    }
}
