//! The bundled sample data (`sample_data/`): its demo bearer tokens, its export date, and loading it
//! into a running service through the public API, as the demo and the tests do.

use std::path::Path;
use std::time::{Duration, Instant};

use cleanroom_proto::v1::{
    ApproveQueryRequest, IngestHeader, IngestSummary, ListAllowListRequest, ReviewDecisionResponse,
    UploadListResponse,
};

use crate::{Connection, Result};

/// Bearer token of the sample analyst principal. Sample data only.
pub const ANALYST_TOKEN: &str = "demo-analyst-token";
/// Bearer token of the sample legal principal. Sample data only.
pub const LEGAL_TOKEN: &str = "demo-legal-token";
/// Sample partners and their bearer tokens. Sample data only.
pub const PARTNERS: &[(&str, &str)] = &[
    ("sakura_foods", "demo-sakura-token"),
    ("kumo_denki", "demo-kumo-token"),
];

/// The instant the sample data was exported (`cleanroom gen --as-of 2026-11-01`), noon in Tokyo.
/// Consent expiries and age bands in the sample are relative to it, so the demo and the tests pin
/// the service's clock here.
pub const AS_OF: &str = "2026-11-01T12:00:00+09:00";

/// The bearer token of a sample partner.
pub fn partner_token(partner: &str) -> &'static str {
    PARTNERS
        .iter()
        .find(|(p, _)| *p == partner)
        .map(|(_, t)| *t)
        .expect("a sample partner")
}

/// What loading the sample did.
pub struct Loaded {
    /// Each step's name, summary and duration.
    pub ingests: Vec<(String, IngestSummary, Duration)>,
    /// Each partner's list upload and duration.
    pub lists: Vec<(String, UploadListResponse, Duration)>,
}

/// Ingests the retailer's three exports as the analyst, then uploads each partner's raw list as
/// that partner.
pub async fn load(conn: &Connection, dir: &Path) -> Result<Loaded> {
    let mut admin = conn.admin(ANALYST_TOKEN)?;
    let header = |source: &str| IngestHeader {
        source: source.into(),
        strict: false,
        request_id: crate::new_request_id(),
        tokens_only: false,
    };
    let mut ingests = Vec::new();

    let started = Instant::now();
    let members = crate::read_members(&dir.join("members.csv"))?;
    let summary = crate::ingest_members(&mut admin, header("members.csv"), members).await?;
    ingests.push(("members".to_string(), summary, started.elapsed()));

    let started = Instant::now();
    let purchases = crate::read_purchases(&dir.join("purchases.csv"))?;
    let summary = crate::ingest_purchases(&mut admin, header("purchases.csv"), purchases).await?;
    ingests.push(("purchases".to_string(), summary, started.elapsed()));

    let started = Instant::now();
    let consent = crate::read_consent(&dir.join("consent_events.csv"))?;
    let summary = crate::ingest_consent(&mut admin, header("consent_events.csv"), consent).await?;
    ingests.push(("consent events".to_string(), summary, started.elapsed()));

    let mut lists = Vec::new();
    for (partner, token) in PARTNERS {
        let started = Instant::now();
        let records = crate::read_list(&dir.join("partner_lists").join(format!("{partner}.csv")))?;
        let response = crate::upload_list(&mut conn.partner(token)?, false, records).await?;
        lists.push((partner.to_string(), response, started.elapsed()));
    }
    Ok(Loaded { ingests, lists })
}

/// As the sample's legal reviewer, approves the current version of every query that is not
/// approved yet (the demo's and the tests' stand-in for a real review). Returns what it approved.
pub async fn approve_all(conn: &Connection) -> Result<Vec<(String, ReviewDecisionResponse)>> {
    let mut legal = conn.legal(LEGAL_TOKEN)?;
    let review = legal
        .list_allow_list(ListAllowListRequest {})
        .await?
        .into_inner();
    let mut approved = Vec::new();
    for query in review.queries {
        if query.state == "approved" || query.state == "invalid" {
            continue;
        }
        let response = legal
            .approve_query(ApproveQueryRequest {
                query_id: query.id.clone(),
                content_sha256: query.content_sha256,
                expires: None,
                note: "sample review".into(),
            })
            .await?
            .into_inner();
        approved.push((query.id, response));
    }
    Ok(approved)
}
