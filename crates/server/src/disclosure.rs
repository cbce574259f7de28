//! The records of receipt as a reviewer reads them (`LegalService.ListReceipts`, the review page
//! and its CSV export), and disclosure to a member (`LegalService.DiscloseMember`, APPI Art.
//! 33(5)): the records that name the member, their consent timeline, per contract the periods in
//! which they were matched and consenting, and the destructions of those collaborations.
//!
//! The member id asked for is turned into the member's pseudonym at once and is never written
//! anywhere: the audit record names it by a keyed digest only ([`Event::Disclosed`]). The records
//! of receipt name members by their receipts digest ([`crate::receipts`]), computed here from the
//! pseudonym as it was when the record was written.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use cleanroom_core::consent::Requirement;
use cleanroom_core::declaration::DeclarationStatus;
use cleanroom_core::rules::{Role, Rules};
use cleanroom_engine::member::ConsentEvent;
use cleanroom_proto::v1::{
    ConsentChange, DestructionNote, MatchedPeriod, MemberDisclosure, PartnerDeclaration,
    ReceiptRecord, ReceiptsPage,
};

use crate::Result;
use crate::audit::{Destruction, Entry, Event, Record};
use crate::context::Call;
use crate::receipts::Receipt;
use crate::state::App;

/// Refuses a caller who is not a legal reviewer (or, to read the records, an analyst).
fn allowed(call: &Call, method: &str, analyst_too: bool) -> Result<()> {
    let role = call.principal.role;
    if role == Role::Legal || (analyst_too && role == Role::Analyst) {
        return Ok(());
    }
    Err(cleanroom_core::Error::Permission(format!(
        "{method} is for the legal role{}; the caller is {}",
        if analyst_too { " and analysts" } else { "" },
        role.as_str()
    ))
    .into())
}

/// `ListReceipts`: every partner's declaration with its status today, and the records of
/// receipt (of one partner, if `partner` is set), oldest first.
pub(crate) fn list(app: &App, call: &Call, partner: &str) -> Result<ReceiptsPage> {
    allowed(call, "ListReceipts", true)?;
    let rules = &call.live.rules;
    let (purged_through, records) = app.receipts.records_after_purge()?;
    Ok(ReceiptsPage {
        generated_at: call.now.to_rfc3339(),
        declarations: declarations(rules, call.today),
        receipts: records
            .iter()
            .filter(|r| partner.is_empty() || r.entry.partner == partner)
            .map(receipt_record)
            .collect(),
        purged_through,
    })
}

/// Every partner's declaration as the rules hold it, with its status on `today`.
pub fn declarations(rules: &Rules, today: chrono::NaiveDate) -> Vec<PartnerDeclaration> {
    rules
        .partners
        .iter()
        .map(|(id, partner)| {
            let status = rules.declaration_status(id, today);
            let mut shown = PartnerDeclaration {
                partner: id.clone(),
                name: partner.name.clone(),
                status: status_word(&status).into(),
                status_detail: status.sentence(),
                ..Default::default()
            };
            if let Some(d) = &partner.declaration {
                shown.legal_name = d.legal_name.clone();
                shown.address = d.address.clone();
                shown.representative = d.representative.clone();
                shown.acquisition = d.acquisition.clone();
                shown.basis = d.basis.clone();
                shown.document = d.document.display().to_string();
                shown.sha256 = d.sha256.clone();
                shown.valid_until = d.valid_until.to_string();
            }
            shown
        })
        .collect()
}

fn status_word(status: &DeclarationStatus) -> &'static str {
    match status {
        DeclarationStatus::Current { .. } => "current",
        DeclarationStatus::Missing => "missing",
        DeclarationStatus::Expired { .. } => "expired",
        DeclarationStatus::Unreadable(_) => "unreadable",
        DeclarationStatus::Changed { .. } => "changed",
    }
}

/// A record of receipt in its wire form: the members by their number only.
pub fn receipt_record(record: &Record<Receipt>) -> ReceiptRecord {
    let r = &record.entry;
    ReceiptRecord {
        id: record.id.clone(),
        seq: record.seq,
        recorded_at: record.at.clone(),
        received_on: r.received_on.to_string(),
        keep_until: r.keep_until().to_string(),
        partner: r.partner.clone(),
        legal_name: r.provider.legal_name.clone(),
        address: r.provider.address.clone(),
        representative: r.provider.representative.clone(),
        acquisition: r.acquisition.clone(),
        basis: r.basis.clone(),
        declaration_document: r.declaration_document.clone(),
        declaration_sha256: r.declaration_sha256.clone(),
        contract: r.contract.clone(),
        clause: r.clause.clone(),
        purpose: r.purpose.clone(),
        items: r.items.clone(),
        list_version: r.list_version,
        commit: r.commit,
        records_received: r.records.0,
        records_accepted: r.records.1,
        members: r.members.len() as u64,
        hash: record.hash.clone(),
    }
}

/// The header of the CSV export, one column per field of [`ReceiptRecord`].
pub const CSV_HEADER: &str = "id,seq,recorded_at,received_on,keep_until,partner,legal_name,\
address,representative,acquisition,basis,declaration_document,declaration_sha256,contract,\
clause,purpose,items,list_version,commit,records_received,records_accepted,members,hash";

/// The records as CSV (RFC 4180 quoting), with [`CSV_HEADER`].
pub fn csv(records: &[ReceiptRecord]) -> String {
    let mut out = format!("{CSV_HEADER}\n");
    for r in records {
        let fields = [
            r.id.clone(),
            r.seq.to_string(),
            r.recorded_at.clone(),
            r.received_on.clone(),
            r.keep_until.clone(),
            r.partner.clone(),
            r.legal_name.clone(),
            r.address.clone(),
            r.representative.clone(),
            r.acquisition.clone(),
            r.basis.clone(),
            r.declaration_document.clone(),
            r.declaration_sha256.clone(),
            r.contract.clone(),
            r.clause.clone(),
            r.purpose.clone(),
            r.items.join("; "),
            r.list_version.to_string(),
            r.commit.to_string(),
            r.records_received.to_string(),
            r.records_accepted.to_string(),
            r.members.to_string(),
            r.hash.clone(),
        ];
        let quoted: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        let _ = writeln!(out, "{}", quoted.join(","));
    }
    out
}

/// A CSV field, quoted when it must be; a leading `=`, `+`, `-` or `@` is prefixed with `'` so a
/// spreadsheet never runs it as a formula.
fn csv_field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@']) {
        format!("'{text}")
    } else {
        text.to_string()
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

/// `DiscloseMember`: what the retailer holds about the member with id `member_id` (module docs).
/// The audit `entry` gets only a keyed digest of the id.
pub(crate) fn disclose(
    app: &App,
    call: &Call,
    entry: &mut Entry,
    member_id: &str,
) -> Result<MemberDisclosure> {
    allowed(call, "DiscloseMember", false)?;
    if member_id.trim().is_empty() {
        return Err(cleanroom_core::Error::Input("a member id is needed".into()).into());
    }
    let member_digest = app.audit.key().digest("member-id", member_id.as_bytes());
    let member = app.secret.pseudonym_key().pseudonym(member_id);
    let named = crate::receipts::member_digest(&app.secret, member);
    let receipts: Vec<Record<Receipt>> = app
        .receipts
        .records()?
        .into_iter()
        .filter(|r| r.entry.names(named))
        .collect();
    entry.event = Some(Event::Disclosed {
        member_digest,
        receipts: receipts.len() as u64,
    });
    if receipts.is_empty() {
        // Named by no record of receipt: nothing was received about this member.
        return Ok(text_of(MemberDisclosure::default()));
    }
    let consent = cleanroom_engine::member::consent_events(&app.store.snapshot(), member)?;
    let destructions = destructions_of(app, &receipts)?;
    let all = app.receipts.records()?;
    let judged = (&call.live.rules, call.now);
    let periods = matched_periods(&all, named, &consent, &destructions, judged);
    Ok(text_of(MemberDisclosure {
        receipts: receipts.iter().map(receipt_record).collect(),
        consent: consent.iter().map(consent_change).collect(),
        periods,
        destructions: destructions
            .iter()
            .map(|(id, at, d)| destruction_note(id, at, d))
            .collect(),
        ..Default::default()
    }))
}

fn consent_change(e: &ConsentEvent) -> ConsentChange {
    ConsentChange {
        purpose: e.purpose.clone(),
        notice_version: e.notice_version,
        action: e.action.clone(),
        at: e.at.to_rfc3339(),
        source: e.source.clone(),
        expires_at: e.expires_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
    }
}

/// The destructions the audit trail records of the contracts `receipts` were received under:
/// each with its record id and time.
fn destructions_of(
    app: &App,
    receipts: &[Record<Receipt>],
) -> Result<Vec<(String, DateTime<Utc>, Destruction)>> {
    let records = crate::audit::read(app.audit.path())?;
    Ok(records
        .into_iter()
        .filter(|r| r.entry.outcome == "ok")
        .filter_map(|r| match r.entry.event {
            Some(Event::Destroyed(d)) => {
                let at = DateTime::parse_from_rfc3339(&r.at).ok()?.to_utc();
                Some((r.id, at, *d))
            }
            _ => None,
        })
        .filter(|(_, _, d)| receipts.iter().any(|r| r.entry.contract == d.contract))
        .collect())
}

fn destruction_note(id: &str, at: &DateTime<Utc>, d: &Destruction) -> DestructionNote {
    DestructionNote {
        contract: d.contract.clone(),
        partner: d.partner.clone(),
        destroyed_at: at.to_rfc3339(),
        reason: d.reason.clone(),
        key_id: d.key_id.clone(),
        files: d
            .files
            .iter()
            .map(|f| format!("{} sha256:{}", f.name, f.sha256))
            .collect(),
        audit_id: id.to_string(),
    }
}

/// A span of time; `None` as its end while it lasts.
type Span = (DateTime<Utc>, Option<DateTime<Utc>>);

/// Per contract, the spans in which the member was both in the partner's current list and
/// consenting to the contract's purpose. A list version is current from its record until the next
/// version's record or the collaboration's destruction.
fn matched_periods(
    all: &[Record<Receipt>],
    member: i64,
    consent: &[ConsentEvent],
    destructions: &[(String, DateTime<Utc>, Destruction)],
    (rules, now): (&Rules, DateTime<Utc>),
) -> Vec<MatchedPeriod> {
    let mut by_contract: BTreeMap<&str, Vec<&Record<Receipt>>> = BTreeMap::new();
    for record in all {
        by_contract
            .entry(record.entry.contract.as_str())
            .or_default()
            .push(record);
    }
    let mut periods = Vec::new();
    for (contract, versions) in by_contract {
        let ended = destructions
            .iter()
            .filter(|(_, _, d)| d.contract == contract)
            .map(|(_, at, _)| *at)
            .min();
        let listed = listed_spans(&versions, member, ended);
        if listed.is_empty() {
            continue;
        }
        let first = &versions[0].entry;
        // A purpose the rules no longer hold admits no grant, as a question would find.
        let Some(purpose) = rules.purposes.get(&first.purpose) else {
            continue;
        };
        let requirement = Requirement {
            min_notice_version: purpose.min_notice_version,
            grant_valid_days: purpose.grant_valid_days,
        };
        let consenting = consent_spans(consent, &first.purpose, &requirement, now);
        for (from, until) in intersect(&listed, &consenting) {
            periods.push(MatchedPeriod {
                contract: contract.to_string(),
                partner: first.partner.clone(),
                purpose: first.purpose.clone(),
                from: from.to_rfc3339(),
                until: until.map(|t| t.to_rfc3339()).unwrap_or_default(),
            });
        }
    }
    periods
}

/// The spans in which a list version naming `member` was current.
fn listed_spans(
    versions: &[&Record<Receipt>],
    member: i64,
    ended: Option<DateTime<Utc>>,
) -> Vec<Span> {
    let at = |r: &Record<Receipt>| DateTime::parse_from_rfc3339(&r.at).ok().map(|t| t.to_utc());
    let mut spans: Vec<Span> = Vec::new();
    for (i, record) in versions.iter().enumerate() {
        let (Some(from), true) = (at(record), record.entry.names(member)) else {
            continue;
        };
        let next = versions.get(i + 1).and_then(|r| at(r));
        let until = match (next, ended) {
            (Some(n), Some(e)) => Some(n.min(e)),
            (n, e) => n.or(e),
        };
        match spans.last_mut() {
            Some(last) if last.1 == Some(from) => last.1 = until,
            _ => spans.push((from, until)),
        }
    }
    spans
}

/// The spans in which the member's latest event for `purpose` was a grant that counted, as a
/// question judges it ([`cleanroom_core::consent::admits`]): for a notice version the purpose
/// still accepts, until the next event, the grant's own expiry or the end of the purpose's
/// `grant_valid_days`, whichever comes first. The rules in force judge every grant, as they
/// would if the question were asked now.
fn consent_spans(
    events: &[ConsentEvent],
    purpose: &str,
    requirement: &Requirement,
    now: DateTime<Utc>,
) -> Vec<Span> {
    let events: Vec<&ConsentEvent> = events.iter().filter(|e| e.purpose == purpose).collect();
    let mut spans = Vec::new();
    for (i, event) in events.iter().enumerate() {
        if event.action != "granted"
            || event.at > now
            || event.notice_version < requirement.min_notice_version
        {
            continue;
        }
        let aged = requirement
            .grant_valid_days
            .map(|days| event.at + chrono::Duration::days(i64::from(days)));
        let until = [events.get(i + 1).map(|e| e.at), event.expires_at, aged]
            .into_iter()
            .flatten()
            .min();
        spans.push((event.at, until));
    }
    spans
}

/// The overlaps of two lists of spans.
fn intersect(a: &[Span], b: &[Span]) -> Vec<Span> {
    let end = |s: &Span| s.1.unwrap_or(DateTime::<Utc>::MAX_UTC);
    let mut out = Vec::new();
    for x in a {
        for y in b {
            let from = x.0.max(y.0);
            let until = end(x).min(end(y));
            if from < until {
                out.push((from, (until != DateTime::<Utc>::MAX_UTC).then_some(until)));
            }
        }
    }
    out
}

/// Fills the answer's text, in Japanese and English, from its parts.
fn text_of(mut d: MemberDisclosure) -> MemberDisclosure {
    let (mut ja, mut en) = (String::new(), String::new());
    if d.receipts.is_empty() {
        ja.push_str("この会員について第三者から受領した記録はありません。\n");
        en.push_str("No record of receipt from a third party names this member.\n");
    }
    for r in &d.receipts {
        let (line_ja, line_en) = receipt_lines(r);
        ja.push_str(&line_ja);
        en.push_str(&line_en);
    }
    for c in &d.consent {
        let _ = writeln!(
            ja,
            "同意: {} {} (目的 {}、通知 v{})",
            c.at, c.action, c.purpose, c.notice_version
        );
        let _ = writeln!(
            en,
            "Consent: {} {} (purpose {}, notice v{})",
            c.at, c.action, c.purpose, c.notice_version
        );
    }
    for p in &d.periods {
        let until = if p.until.is_empty() {
            "現在"
        } else {
            &p.until
        };
        let until_en = if p.until.is_empty() { "now" } else { &p.until };
        let _ = writeln!(
            ja,
            "照合かつ同意の期間: 契約 {} {} 〜 {}",
            p.contract, p.from, until
        );
        let _ = writeln!(
            en,
            "Matched and consenting: contract {} from {} until {}",
            p.contract, p.from, until_en
        );
    }
    for x in &d.destructions {
        let _ = writeln!(
            ja,
            "消去: 契約 {} のデータと照合鍵を {} に消去 (監査記録 {})",
            x.contract, x.destroyed_at, x.audit_id
        );
        let _ = writeln!(
            en,
            "Destroyed: the data and match key of contract {} on {} (audit record {})",
            x.contract, x.destroyed_at, x.audit_id
        );
    }
    d.text_ja = ja;
    d.text_en = en;
    d
}

/// One record of receipt as the member reads it, in Japanese and English.
fn receipt_lines(r: &ReceiptRecord) -> (String, String) {
    let ja = format!(
        "受領記録 {}: {} に {} ({}、代表者 {}) から受領。取得の経緯: {}。根拠: {}。契約 {} (目的 {})。\n",
        r.id,
        r.received_on,
        r.legal_name,
        r.address,
        r.representative,
        r.acquisition,
        r.basis,
        r.contract,
        r.purpose
    );
    let en = format!(
        "Record of receipt {}: received on {} from {} ({}, represented by {}). Acquired: {}. \
         Basis: {}. Contract {} (purpose {}).\n",
        r.id,
        r.received_on,
        r.legal_name,
        r.address,
        r.representative,
        r.acquisition,
        r.basis,
        r.contract,
        r.purpose
    );
    (ja, en)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(d: u32) -> DateTime<Utc> {
        format!("2026-10-{d:02}T00:00:00Z").parse().unwrap()
    }

    fn event(action: &str, notice_version: u32, at: u32, expires: Option<u32>) -> ConsentEvent {
        ConsentEvent {
            purpose: "p".into(),
            notice_version,
            action: action.into(),
            at: day(at),
            source: "app".into(),
            expires_at: expires.map(day),
        }
    }

    const RULES: Requirement = Requirement {
        min_notice_version: 2,
        grant_valid_days: Some(5),
    };

    #[test]
    fn a_grant_counts_only_as_a_question_would_count_it() {
        let events = [
            // Notice version 1: the purpose no longer accepts it.
            event("granted", 1, 1, None),
            // Counts from the 3rd until it is five days old (the 8th), before the withdrawal.
            event("granted", 2, 3, None),
            event("withdrawn", 2, 10, None),
            // Counts until its own expiry (the 14th), before its five days end.
            event("granted", 3, 12, Some(14)),
            // Another purpose's grant is not this purpose's.
            ConsentEvent {
                purpose: "other".into(),
                ..event("granted", 3, 20, None)
            },
        ];
        let spans = consent_spans(&events, "p", &RULES, day(30));
        assert_eq!(
            spans,
            vec![(day(3), Some(day(8))), (day(12), Some(day(14)))]
        );
        // With no age limit and every notice accepted, the first grant counts until the next
        // event and the last until its expiry.
        let lenient = Requirement {
            min_notice_version: 1,
            grant_valid_days: None,
        };
        let spans = consent_spans(&events, "p", &lenient, day(30));
        assert_eq!(spans[0], (day(1), Some(day(3))));
        assert_eq!(spans[1], (day(3), Some(day(10))));
        // A grant after `now` has not happened yet.
        assert_eq!(consent_spans(&events, "p", &lenient, day(2)).len(), 1);
    }
}
