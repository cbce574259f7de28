//! `cleanroom queries lint`: checks every allow-list file before anyone approves it. Metadata must
//! hang together (parameter constraints present, k at or above the floor, known purposes, partners
//! and domains), and the SQL must pass the guard's plan checks for every partner it is open to
//! (safe views only, aggregate output, member keys only joined or counted, no sensitive column).
//! Each problem points at the file and the line.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cleanroom_core::allowlist::read_query;
use cleanroom_core::rules::Rules;
use cleanroom_engine::guard;

/// One problem found.
pub struct Finding {
    pub path: PathBuf,
    pub line: usize,
    pub message: String,
}

/// The line of the first line of `text` that starts with `prefix` (1 if none).
fn line_of(text: &str, matches: impl Fn(&str) -> bool) -> usize {
    text.lines()
        .position(|l| matches(l.trim_start()))
        .map_or(1, |i| i + 1)
}

/// Guesses the line a metadata message is about from the names it quotes.
fn metadata_line(text: &str, message: &str) -> usize {
    if let Some(name) = message.split('`').nth(1)
        && (message.contains("parameter") || message.contains("dimension"))
    {
        let quoted = format!("\"{name}\"");
        return line_of(text, |l| l.starts_with("name") && l.contains(&quoted));
    }
    let key = ["k ", "purpose", "partner", "metric"]
        .into_iter()
        .find(|k| message.contains(k.trim()));
    match key {
        Some("k ") => line_of(text, |l| l.starts_with("k =") || l.starts_with("k=")),
        Some(k) => line_of(text, |l| l.starts_with(k)),
        None => 1,
    }
}

/// Lints every `*.toml` of `dir` against `rules`.
pub async fn lint(dir: &Path, rules: &Rules) -> Result<(usize, Vec<Finding>)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    let mut findings = Vec::new();
    let mut ids = Vec::new();
    for path in &paths {
        // Only to place messages on a line; read as the service reads query files.
        let text = cleanroom_core::files::read_config_file(path).unwrap_or_default();
        let finding = |line, message: String| Finding {
            path: path.clone(),
            line,
            message,
        };
        let query = match read_query(path, rules) {
            Ok(query) => query,
            Err(e) => {
                let message = e.to_string();
                // TOML errors carry their own position (`<file>:<line>:<column>: …`); point at
                // it and keep the column with the message.
                let prefix = format!("{}:", path.display());
                let positioned = message.split_once(&prefix).and_then(|(_, rest)| {
                    let (line, rest) = rest.split_once(':')?;
                    Some((line.parse().ok()?, rest.trim_start().to_string()))
                });
                let (line, message) = match positioned {
                    Some((line, rest)) => (line, format!("column {rest}")),
                    None => (metadata_line(&text, &message), message),
                };
                findings.push(finding(line, message));
                continue;
            }
        };
        ids.push(query.id.clone());
        let sql_line = line_of(&text, |l| l.starts_with("sql"));
        let with_contract: Vec<_> = query
            .partners
            .iter()
            .filter_map(|p| rules.contract_of(p).map(|(_, c)| (p, c)))
            .collect();
        if with_contract.is_empty() {
            findings.push(finding(
                line_of(&text, |l| l.starts_with("partners")),
                "no partner of this query has a contract".into(),
            ));
        }
        for (partner, contract) in with_contract {
            if let Err(e) = guard::check(rules, &query, contract, partner).await {
                findings.push(finding(sql_line, format!("for partner {partner}: {e}")));
            }
        }
    }
    for (id, contract) in &rules.contracts {
        for query in contract.queries.iter().filter(|q| !ids.contains(q)) {
            findings.push(Finding {
                path: dir.to_path_buf(),
                line: 0,
                message: format!(
                    "contract {id} lists `{query}`, which is not a valid allow-list file"
                ),
            });
        }
    }
    Ok((paths.len(), findings))
}
