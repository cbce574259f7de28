//! The proof of a collaboration's end, read from the audit trail: the destruction certificate a
//! lawyer hands to the partner, and the checks `verify-audit` makes that nothing destroyed came
//! back (a file in the data directory, a key seed in the key store).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use cleanroom_core::keys::KeyStore;
use cleanroom_core::token::MasterSecret;
use cleanroom_engine::store::DestroyedFile;
use cleanroom_server::audit::{self, Destruction, Event, Record};

/// Every destruction the trail records, with its record.
pub fn destructions(records: &[Record]) -> Vec<(&Record, &Destruction)> {
    records
        .iter()
        .filter(|r| r.entry.outcome == "ok")
        .filter_map(|r| match &r.entry.event {
            Some(Event::Destroyed(d)) => Some((r, d.as_ref())),
            _ => None,
        })
        .collect()
}

/// Every file a retention destroyed (list versions, purchases files), with its record.
fn retired_files(records: &[Record]) -> impl Iterator<Item = (&Record, &DestroyedFile)> {
    records
        .iter()
        .filter(|r| r.entry.outcome == "ok")
        .filter_map(|r| match &r.entry.event {
            Some(Event::Retired(retired)) => Some((r, retired.files.as_slice())),
            _ => None,
        })
        .flat_map(|(r, files)| files.iter().map(move |f| (r, f)))
}

/// Key versions a rotation's end destroyed whose seed is in the key store again.
fn rotated_back(records: &[Record], keys: &KeyStore) -> Result<Vec<String>> {
    let mut back = Vec::new();
    for record in records.iter().filter(|r| r.entry.outcome == "ok") {
        let Some(Event::Retired(r)) = &record.entry.event else {
            continue;
        };
        let (Some(contract), Some(version)) = (&r.contract, r.key_version) else {
            continue;
        };
        if keys.existing_key(contract, version)?.is_some() {
            back.push(format!(
                "the key store holds a seed of contract {contract} v{version}, which audit \
                 record {} destroyed at the end of its rotation overlap",
                record.id
            ));
        }
    }
    Ok(back)
}

/// What came back after it was destroyed: a file in `data_dir`, or a key seed in the store.
pub fn resurrected(
    records: &[Record],
    data_dir: &Path,
    keys: Option<&KeyStore>,
) -> Result<Vec<String>> {
    let mut back = Vec::new();
    for (record, file) in retired_files(records) {
        if data_dir.join(&file.name).exists() {
            back.push(format!(
                "{}: destroyed under the retention rules by audit record {} ({}), is in the \
                 data directory again",
                file.name, record.id, record.at
            ));
        }
    }
    if let Some(keys) = keys {
        back.extend(rotated_back(records, keys)?);
    }
    for (record, d) in destructions(records) {
        for file in &d.files {
            if data_dir.join(&file.name).exists() {
                back.push(format!(
                    "{}: destroyed by audit record {} ({}), is in the data directory again",
                    file.name, record.id, record.at
                ));
            }
        }
        let Some(keys) = keys else { continue };
        for key in keys.status()? {
            if key.contract == d.contract && key.destroyed.is_none() {
                back.push(format!(
                    "the key store holds a live key of contract {} (v{}, id {}), whose \
                     collaboration audit record {} ended",
                    d.contract, key.version, key.key_id, record.id
                ));
            }
        }
        for (contract, version) in keys.undestroyed()? {
            if contract == d.contract {
                back.push(format!(
                    "the key store still holds the seed of contract {contract} v{version} \
                     beside its tombstone"
                ));
            }
        }
    }
    Ok(back)
}

/// The certificate of `contract`'s destruction, in Japanese and English, signed with a key of
/// the master secret. It is deterministic: made again from the same trail it is the same text,
/// which is how the retailer checks a certificate shown to it.
pub fn certificate(data_dir: &Path, secret: &MasterSecret, contract: &str) -> Result<String> {
    let path = data_dir.join("audit.jsonl");
    let chain = audit::ChainKey::new(secret);
    audit::verify(&path, &chain, None)
        .with_context(|| format!("verifying {} first", path.display()))?;
    let records = audit::read(&path)?;
    let Some((record, d)) = destructions(&records)
        .into_iter()
        .rev()
        .find(|(_, d)| d.contract == contract)
    else {
        bail!("the audit trail records no destruction of contract `{contract}`");
    };
    let back = resurrected(&records, data_dir, None)?;
    if !back.is_empty() {
        bail!("no certificate: {}", back.join("; "));
    }
    let body = statement(record, d);
    let signature = cleanroom_core::token::hmac_sha256(
        &secret.guard_key("destruction-certificate"),
        body.as_bytes(),
    );
    Ok(format!(
        "{body}署名 / signature (HMAC-SHA256): {}\n",
        signature
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

/// The statement itself: what was destroyed, when, why, on whose word, and where the audit
/// trail records it.
fn statement(record: &Record, d: &Destruction) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "データ消去証明書 / Certificate of destruction");
    let _ = writeln!(text);
    let _ = writeln!(
        text,
        "契約 {} (提供元 {}) に関して保有していた下記のデータおよび照合鍵を消去しました。",
        d.contract, d.partner
    );
    let _ = writeln!(
        text,
        "The data and the match key below, held for contract {} (partner {}), were destroyed.",
        d.contract, d.partner
    );
    let _ = writeln!(text);
    let _ = writeln!(text, "日時 / destroyed at: {}", record.at);
    let _ = writeln!(text, "理由 / reason: {}", d.reason);
    let _ = writeln!(text, "申請 / requested by: {}", d.requested_by);
    let _ = writeln!(text, "承認 / confirmed by: {}", record.entry.principal);
    let _ = writeln!(
        text,
        "照合鍵 / match key: version {}, id {} (the key's seed was overwritten and removed)",
        d.key_version, d.key_id
    );
    let _ = writeln!(text, "ファイル / files (name, SHA-256, rows):");
    for f in &d.files {
        let _ = writeln!(text, "  {} {} {}", f.name, f.sha256, f.rows);
    }
    let _ = writeln!(
        text,
        "保存済み回答 / stored answers destroyed: {}",
        d.stored_answers
    );
    let _ = writeln!(
        text,
        "監査記録 / audit record: {} (seq {}, chain hash {})",
        record.id, record.seq, record.hash
    );
    text
}
