//! Conversions between the wire (`cleanroom.v1`) and the domain, in one place: records into
//! ingest inputs, request parameters into raw values, and answers, descriptions, audit records and
//! decisions into the messages callers read.

use std::collections::BTreeMap;
use std::time::Duration;

use cleanroom_core::allowlist::{ParamKind, QueryDef};
use cleanroom_core::rules::Rules;
use cleanroom_engine::arrow::array::{Array, AsArray, RecordBatch};
use cleanroom_engine::arrow::compute::cast;
use cleanroom_engine::arrow::datatypes::{DataType, Float64Type, Int64Type};
use cleanroom_engine::guard::{Answer, Answered, RawValue};
use cleanroom_engine::ingest::{ConsentInput, ListInput, MemberInput, PurchaseInput};
use cleanroom_engine::store::CommitRecord;
use cleanroom_proto::v1::{
    AuditRecord, Column, ConsentRecord, CustomerRecord, DimensionSpec, IngestSummary, MemberRecord,
    ParamValue, ParameterSpec, Protection, PurchaseRecord, QueryDescription, QueryVersion,
    ReviewDecision, Row, RunQueryResponse, UploadListResponse, Value, param_value, value::Kind,
};

use crate::audit::Record;
use crate::review::{Decision, VersionHistory};
use crate::{Error, Result};

/// A member record as ingest takes it.
pub fn member_input(r: MemberRecord) -> MemberInput {
    MemberInput {
        member_id: r.member_id,
        email: r.email,
        phone: r.phone,
        prefecture: r.prefecture,
        birth_date: r.birth_date,
        gender: r.gender,
    }
}

/// A purchase record as ingest takes it.
pub fn purchase_input(r: PurchaseRecord) -> PurchaseInput {
    PurchaseInput {
        member_id: r.member_id,
        purchased_at: r.purchased_at,
        sku: r.sku,
        brand: r.brand,
        manufacturer: r.manufacturer,
        category: r.category,
        quantity: r.quantity,
        amount: r.amount,
    }
}

/// A consent record as ingest takes it.
pub fn consent_input(r: ConsentRecord) -> ConsentInput {
    ConsentInput {
        member_id: r.member_id,
        purpose: r.purpose,
        notice_version: r.notice_version,
        action: r.action,
        at: r.at,
        source: r.source,
        expires_at: r.expires_at,
    }
}

/// A customer record as ingest takes it.
pub fn list_input(r: CustomerRecord) -> ListInput {
    ListInput {
        email: r.email,
        phone: r.phone,
        email_token: r.email_token,
        phone_token: r.phone_token,
        attribute: r.attribute,
    }
}

/// What an ingest did, as the analyst reads it.
pub fn ingest_summary(record: &CommitRecord, already_committed: bool) -> IngestSummary {
    IngestSummary {
        records_received: record.received,
        records_accepted: record.accepted,
        rejected_by_reason: record.rejected.clone().into_iter().collect(),
        consent_snapshot_id: record.consent_snapshot_id.clone().unwrap_or_default(),
        audit_id: String::new(),
        already_committed,
    }
}

/// The response to a list upload, from the store's record of it (the original's, for a retry).
pub fn upload_response(record: &CommitRecord, already_committed: bool) -> UploadListResponse {
    UploadListResponse {
        list_version: record.list_version.unwrap_or_default(),
        records_received: record.received,
        records_accepted: record.accepted,
        rejected_by_reason: record.rejected.clone().into_iter().collect(),
        audit_id: String::new(),
        already_committed,
    }
}

/// A RunQuery's parameters as the guard takes them, unchecked: the guard types them (a parameter
/// sent without a value is refused there, named by the query's own spelling).
pub fn raw_params(params: BTreeMap<String, ParamValue>) -> BTreeMap<String, RawValue> {
    params
        .into_iter()
        .map(|(name, value)| {
            let value = match value.kind {
                Some(param_value::Kind::StringValue(s)) => RawValue::Str(s),
                Some(param_value::Kind::IntValue(i)) => RawValue::Int(i),
                Some(param_value::Kind::DateValue(d)) => RawValue::Date(d),
                None => RawValue::Absent,
            };
            (name, value)
        })
        .collect()
}

/// The answer to a RunQuery, as the partner reads it: typed rows beside the Arrow IPC bytes, the
/// effective parameters, how the answer was protected and what it cost. `elapsed` is the
/// server's time on it; the audit id is filled in once the record is written.
pub fn run_response(answered: &Answered, elapsed: Duration) -> Result<RunQueryResponse> {
    let answer = &answered.answer;
    let release = &answer.release;
    let (columns, rows) = rows(&answer.batch)?;
    Ok(RunQueryResponse {
        query_id: answered.query_id.clone(),
        query_version: answered.query_version,
        columns,
        rows,
        arrow_ipc: release.arrow_ipc.clone(),
        suppressed_rows: release.suppressed_rows,
        effective_k: answered.effective_k,
        consent_snapshot_id: release.consent_snapshot_id.clone(),
        list_version: release.list_version,
        audit_id: String::new(),
        elapsed_ms: coarse_millis(elapsed),
        effective_params: release.params.clone(),
        protection: Some(protection(answer)),
    })
}

/// Server time rounded up to a multiple of 250 ms: coarse enough that it says little about the
/// data or about other partners' load.
fn coarse_millis(elapsed: Duration) -> u64 {
    let millis = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    millis.div_ceil(250).max(1).saturating_mul(250)
}

/// A parameter bound (`min`, `max`) as text.
pub fn bound_text(value: &Option<toml::Value>) -> String {
    match value {
        Some(toml::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// A query as the partner it is open to reads it.
pub fn description(
    query: &QueryDef,
    rules: &Rules,
    partner: &str,
    effective_k: u32,
) -> QueryDescription {
    QueryDescription {
        id: query.id.clone(),
        version: query.version,
        title: query.title.clone(),
        description: query.description.clone(),
        purposes: query.purposes.clone(),
        contract_clause: query.contract_clause.clone(),
        parameters: query
            .params
            .iter()
            .map(|p| ParameterSpec {
                name: p.name.clone(),
                r#type: p.kind.as_str().to_string(),
                description: p.description.clone(),
                allowed_values: if p.kind == ParamKind::Enum {
                    query.allowed_values(p, rules, partner)
                } else {
                    Vec::new()
                },
                min: bound_text(&p.min),
                max: bound_text(&p.max),
                granularity: p
                    .granularity
                    .map(|g| g.as_str().to_string())
                    .unwrap_or_default(),
                min_window_days: p.min_window_days.unwrap_or(0),
            })
            .collect(),
        dimensions: query
            .dimensions
            .iter()
            .map(|d| DimensionSpec {
                name: d.name.clone(),
                domain: rules.domain(&d.domain, partner).unwrap_or_default(),
            })
            .collect(),
        metrics: query.metrics.clone(),
        effective_k,
        content_sha256: query.content_sha256.clone(),
    }
}

/// How an answer was protected and what it cost, as the partner reads it.
pub fn protection(answer: &Answer) -> Protection {
    let noise = &answer.release.noise;
    let charge = &answer.charge;
    Protection {
        mode: "dp".into(),
        noise_sd: noise.noise_sd.clone(),
        per_member_bound: noise.per_member_bound.clone(),
        release_threshold: noise.release_threshold,
        interval95: noise.interval95.clone(),
        rows_per_member: noise.rows_per_member,
        fresh: charge.fresh,
        rho_spent: charge.rho_spent,
        epsilon_spent: charge.epsilon_spent,
        delta_spent: charge.delta_spent,
        period_epsilon: charge.period_epsilon,
        period_delta: charge.period_delta,
        period_days: charge.period_days,
        answers_per_period: charge.answers_per_period,
        answers_used: charge.answers_used,
        budget_resets_at: charge
            .budget_resets_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
    }
}

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

/// The column list and typed rows of a released batch (its Arrow IPC bytes travel beside them).
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

/// A reviewer's decision as ListAllowList and the decision calls show it.
pub fn decision(d: &Decision) -> ReviewDecision {
    ReviewDecision {
        decision: if d.approved { "approved" } else { "rejected" }.into(),
        by: d.by.clone(),
        role: d.role.clone(),
        at: d.at.to_rfc3339(),
        expires: d.expires.map(|e| e.to_string()),
        note: d.note.clone(),
        content_sha256: d.content_sha256.clone(),
    }
}

/// A query version's history as the review page shows it.
pub fn query_version(v: &VersionHistory) -> QueryVersion {
    QueryVersion {
        content_sha256: v.content_sha256.clone(),
        version: v.version,
        first_seen: v.first_seen.clone(),
        decisions: v.decisions.iter().map(decision).collect(),
    }
}

/// An audit record as ListAudit shows it.
pub fn audit_record(r: &Record) -> AuditRecord {
    let e = &r.entry;
    let params = match &e.params {
        Some(serde_json::Value::Object(map)) => map
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    let mut details = match &e.event {
        Some(event) => event.display(),
        None => e.details.clone().unwrap_or_default(),
    };
    if let Some((received, accepted)) = e.records {
        details.insert(
            "records".into(),
            format!("{accepted} of {received} accepted"),
        );
    }
    AuditRecord {
        id: r.id.clone(),
        seq: r.seq,
        at: r.at.clone(),
        principal: e.principal.clone(),
        role: e.role.clone(),
        partner: e.partner.clone(),
        method: e.method.clone(),
        query_id: e.query_id.clone(),
        query_sha256: e.query_sha256.clone(),
        params,
        rows_released: e.rows_released,
        rows_suppressed: e.rows_suppressed,
        consent_snapshot: e.consent_snapshot.clone(),
        list_version: e.list_version,
        outcome: e.outcome.clone(),
        details,
    }
}
