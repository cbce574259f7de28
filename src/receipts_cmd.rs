//! The records of receipt from the command line: `cleanroom receipts` reads and verifies them in
//! a data directory (offline, like `destruction-certificate`) and writes them as CSV for a legal
//! reviewer; `cleanroom disclose` asks the running service for what it holds about one member
//! (the request is audited there, naming the member by a keyed digest only).

use std::path::Path;

use anyhow::{Context, Result};
use cleanroom_core::token::MasterSecret;
use cleanroom_server::audit::ChainKey;
use cleanroom_server::{disclosure, receipts};

/// Reads the verified records of receipt in `data_dir` and writes them as CSV to `csv` (or
/// prints how many there are); returns the line to print.
pub fn export(data_dir: &Path, secret: &MasterSecret, csv: Option<&Path>) -> Result<String> {
    let records = receipts::read(data_dir, &ChainKey::new(secret))
        .with_context(|| format!("verifying the records of receipt in {}", data_dir.display()))?;
    let shown: Vec<_> = records.iter().map(disclosure::receipt_record).collect();
    let mut summary = format!(
        "{}: {} records of receipt, keyed chain and checkpoint intact",
        data_dir.join(receipts::FILE).display(),
        shown.len()
    );
    if let Some(path) = csv {
        cleanroom_core::files::write_atomic(path, disclosure::csv(&shown).as_bytes())?;
        summary.push_str(&format!("; written to {}", path.display()));
    }
    Ok(summary)
}

/// Verifies the records of receipt in `data_dir` (for `verify-audit`): the line to print.
pub fn verify(data_dir: &Path, secret: &MasterSecret) -> Result<String> {
    let (records, purged) = receipts::verify(data_dir, &ChainKey::new(secret))
        .with_context(|| format!("verifying the records of receipt in {}", data_dir.display()))?;
    Ok(format!(
        "{}: {records} records of receipt, keyed chain and checkpoint intact{}",
        data_dir.join(receipts::FILE).display(),
        if purged > 0 {
            format!(" (records 1 to {purged} purged after their keeping period)")
        } else {
            String::new()
        }
    ))
}

/// What a member is told, in Japanese then English.
pub fn disclosure_text(d: &cleanroom_proto::v1::MemberDisclosure) -> String {
    format!(
        "開示 / Disclosure (APPI Art. 33(5)); audit record {}\n\n[日本語]\n{}\n[English]\n{}",
        d.audit_id, d.text_ja, d.text_en
    )
}
