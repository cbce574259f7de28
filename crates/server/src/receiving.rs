//! Receiving a partner's list as APPI Art. 30 asks: the partner's declaration is confirmed
//! current before any record is read ([`confirm_declaration`]), and every accepted version
//! writes a record of receipt ([`store_and_record`]) naming the members concerned by a keyed
//! digest of their pseudonyms, kept apart from the list ([`crate::receipts`]).

use cleanroom_core::rules::{Partner, Rules};
use cleanroom_engine::guard::ListUpload;
use cleanroom_engine::guard::admission::shown;
use cleanroom_engine::store::CommitRecord;

use crate::Result;
use crate::receipts::{Provider, Receipt};
use crate::state::App;

/// The partner `partner` of the rules (NOT_FOUND if there is none), if its declaration is
/// current on `today` (the retailer's local date): in the rules, in date, and its document the
/// one whose SHA-256 the rules hold. Otherwise the upload is refused (FAILED_PRECONDITION).
pub(crate) fn declared_partner<'a>(
    rules: &'a Rules,
    partner: &str,
    today: chrono::NaiveDate,
) -> Result<&'a Partner> {
    let found = rules.partners.get(partner).ok_or_else(|| {
        cleanroom_core::Error::NotFound(format!("no partner `{}`", shown(partner)))
    })?;
    rules
        .declaration_status(partner, today)
        .require_current(partner)?;
    Ok(found)
}

/// Stores an accepted list version and writes its record of receipt, one upload at a time (so
/// the list the record's members are read from is the version just stored). Returns the commit
/// and the record's id.
pub(crate) async fn store_and_record(
    app: &App,
    rules: &Rules,
    upload: ListUpload<'_>,
    today: chrono::NaiveDate,
) -> Result<(CommitRecord, String)> {
    let _one_at_a_time = app.receipts.hold().await;
    let partner = upload.partner.partner().to_string();
    let contract_id = upload.partner.contract_id().to_string();
    let at = upload.facts.at;
    let record = app.guard.store_list(upload)?;
    let members = matched_now(app, &contract_id, &partner, &record).await?;
    let receipt = receipt_of(rules, &partner, &contract_id, &record, today, members)?;
    let id = app.receipts.append(receipt, at)?;
    Ok((record, id))
}

/// The members the list version just stored names, matched once for both this record and the
/// questions that follow (the guard keeps the matching). Should the guard's query memory not hold
/// it now, the record is still written: it is matched here, outside the pool, as at start-up.
async fn matched_now(
    app: &App,
    contract_id: &str,
    partner: &str,
    record: &CommitRecord,
) -> Result<Vec<i64>> {
    let snapshot = app.store.snapshot();
    let found = match app
        .guard
        .list_members(&snapshot, contract_id, partner)
        .await
    {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "matching a new list in query memory failed; matching it outside");
            cleanroom_engine::member::list_members(&snapshot, contract_id, partner)?
        }
    };
    current_members(app, found, record)
}

/// The record of receipt of the list version `record` stored for `partner`, which names
/// `members` (pseudonyms, ascending).
fn receipt_of(
    rules: &Rules,
    partner: &str,
    contract_id: &str,
    record: &CommitRecord,
    today: chrono::NaiveDate,
    members: Vec<i64>,
) -> Result<Receipt> {
    let declaration = rules
        .partners
        .get(partner)
        .and_then(|p| p.declaration.clone())
        .ok_or_else(|| crate::Error::Internal("a list was stored without a declaration".into()))?;
    let contract = rules
        .contracts
        .get(contract_id)
        .ok_or_else(|| crate::Error::Internal("a list was stored without its contract".into()))?;
    let attribute = rules.partners.get(partner).map(|p| p.attribute.clone());
    Ok(Receipt {
        received_on: today,
        partner: partner.to_string(),
        provider: Provider {
            legal_name: declaration.legal_name,
            address: declaration.address,
            representative: declaration.representative,
        },
        acquisition: declaration.acquisition,
        basis: declaration.basis,
        declaration_document: declaration.document.display().to_string(),
        declaration_sha256: declaration.sha256,
        declaration_valid_until: declaration.valid_until,
        contract: contract_id.to_string(),
        clause: contract.clause.clone(),
        purpose: contract.purpose.clone(),
        items: vec![
            "e-mail address and phone number, as keyed match tokens (HMAC-SHA256 under the \
             collaboration key)"
                .to_string(),
            format!(
                "the partner's attribute of each customer (`{}`)",
                attribute.unwrap_or_default()
            ),
        ],
        list_version: record.list_version.unwrap_or_default(),
        commit: record.seq,
        records: (record.received, record.accepted),
        members,
    })
}

/// The members of the store's current list, if it is the version `record` stored, by their
/// receipts digest ([`crate::receipts::member_digest`]), ascending.
fn current_members(
    app: &App,
    found: Option<(u32, Vec<i64>)>,
    record: &CommitRecord,
) -> Result<Vec<i64>> {
    match found {
        Some((version, members)) if Some(version) == record.list_version => {
            let mut named: Vec<i64> = members
                .into_iter()
                .map(|m| crate::receipts::member_digest(&app.secret, m))
                .collect();
            named.sort_unstable();
            Ok(named)
        }
        _ => Err(crate::Error::Internal(
            "the store's current list is not the version just stored".into(),
        )),
    }
}

/// [`record_missing`] while the service runs, one upload's record at a time: for a retried
/// upload whose first attempt committed its list but could not write the record.
pub(crate) async fn record_missing_now(app: &App) -> Result<usize> {
    let _one_at_a_time = app.receipts.hold().await;
    record_missing(app)
}

/// Writes the record of receipt of each partner's current list that has none: a crash between
/// the list's commit and its record (the commit comes first) is finished at the next start, as a
/// destruction is. Run at start, before any call is served. Returns how many it wrote.
pub(crate) fn record_missing(app: &App) -> Result<usize> {
    let live = app.live();
    let rules = &live.rules;
    let recorded: std::collections::BTreeSet<u64> = app
        .receipts
        .records()?
        .iter()
        .map(|r| r.entry.commit)
        .collect();
    let snapshot = app.store.snapshot();
    let mut written = 0;
    for record in app.store.log() {
        let Some(partner) = record.partner.as_deref() else {
            continue;
        };
        let current = snapshot.lists.get(partner).map(|l| l.version);
        if record.list_version.is_none()
            || record.list_version != current
            || recorded.contains(&record.seq)
        {
            continue;
        }
        let Some((contract_id, _)) = rules.contract_of(partner) else {
            continue;
        };
        let today = rules.retailer.today(record.at);
        let members = cleanroom_engine::member::list_members(&snapshot, contract_id, partner)?;
        let members = current_members(app, members, &record)?;
        let receipt = receipt_of(rules, partner, contract_id, &record, today, members)?;
        app.receipts.append(receipt, record.at)?;
        tracing::warn!(partner = %partner, "wrote a record of receipt a crash or a full disk cut short");
        written += 1;
    }
    Ok(written)
}
