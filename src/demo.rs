//! `cleanroom demo`: the whole path on the bundled sample data, through the real gRPC API. A
//! throwaway service (fresh data directory, random master secret, clock pinned to the sample's
//! export date) on loopback; the analyst loads the retailer's exports; each partner uploads its
//! list and runs every query open to it; then requests the service must refuse.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use chrono::{DateTime, Datelike, Duration, NaiveDate};
use cleanroom_client::pki::ThrowawayPki;
use cleanroom_client::{Connection, PartnerClient, sample};
use cleanroom_core::allowlist::AllowList;
use cleanroom_core::rules::Rules;
use cleanroom_core::token::MasterSecret;
use cleanroom_engine::executor::ExecutorConfig;
use cleanroom_proto::v1::{
    ConsentRecord, DescribeQueryRequest, IngestHeader, ListQueriesRequest, ParamValue,
    QueryDescription, RunQueryRequest, RunQueryResponse, param_value, value::Kind,
};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use rand::RngCore;

/// The window every demo query asks about: the sample's last twelve months.
const WINDOW: (&str, &str) = ("2025-11-01", "2026-11-01");

/// How the demo runs.
pub struct DemoOptions<'a> {
    /// The sample data directory.
    pub sample_dir: &'a Path,
    /// The allow-list directory.
    pub queries_dir: &'a Path,
    /// gRPC address (loopback).
    pub listen: SocketAddr,
    /// Review page address (loopback).
    pub review_listen: SocketAddr,
    /// Keep serving the loaded sample after the demo.
    pub keep_serving: bool,
    /// Serve both ports over TLS with a throwaway CA, written to this directory (`ca.pem`,
    /// `server.pem`/`server.key` and a client certificate per partner).
    pub tls_dir: Option<&'a Path>,
}

/// Runs the demo: each step prints its own part of the story, in this order.
pub async fn run(options: DemoOptions<'_>) -> Result<()> {
    let service = start(&options).await?;
    approve_allow_list(&service.conn).await?;
    load_sample(&service.conn, options.sample_dir).await?;
    for (partner, token) in sample::PARTNERS {
        run_partner_queries(&service.conn, partner, token).await?;
    }
    show_refusals(&service.conn, options.sample_dir, service.as_of).await?;
    if !options.keep_serving {
        end_collaboration(&service).await?;
    }
    finish(service, options.keep_serving).await
}

/// The running throwaway service and the demo's connection to it. Fields drop in declaration
/// order, so on an early return the connection closes first, then the server, and the data
/// directory it writes to is removed last.
struct Service {
    conn: Connection,
    server: cleanroom_server::Running,
    /// Whether both ports serve TLS.
    tls: bool,
    /// The pinned clock: the sample's export date.
    as_of: DateTime<chrono::Utc>,
    /// The throwaway master secret, which signs the destruction certificate.
    secret: MasterSecret,
    /// Dropping it removes the throwaway data directory.
    data_dir: tempfile::TempDir,
}

/// Starts a throwaway service on the sample's rules and allow-list (fresh data directory, random
/// master secret, clock pinned to the sample's export date) and connects to it.
async fn start(options: &DemoOptions<'_>) -> Result<Service> {
    let rules_path = options.sample_dir.join("rules.toml");
    let rules = Rules::load(&rules_path)?;
    let allowlist = AllowList::load(options.queries_dir, &rules)?;
    let data_dir = tempfile::tempdir().context("creating a throwaway data directory")?;
    let mut secret = vec![0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let secret = MasterSecret::new(secret)?;
    let as_of: DateTime<chrono::Utc> = DateTime::parse_from_rfc3339(sample::AS_OF)?.into();
    let app = cleanroom_server::App::new(cleanroom_server::AppConfig {
        data_dir: data_dir.path().join("data"),
        rules,
        allowlist,
        secret: secret.clone(),
        clock: Arc::new(cleanroom_server::FixedClock(as_of)),
        // Edits of the rules or the allow-list take effect while the demo keeps serving.
        sources: Some(cleanroom_server::Sources {
            rules: rules_path,
            queries: options.queries_dir.to_path_buf(),
            poll: std::time::Duration::from_millis(500),
        }),
        // The demo runs on the published sample tokens.
        allow_demo_tokens: true,
        mark: data_dir.path().join("high-water-mark.json"),
        accept_restore: false,
        engine: ExecutorConfig::with_defaults(data_dir.path().join("data/spill")),
        keys: data_dir.path().join("keys"),
    })?;
    let (server, conn) = serve_and_connect(app, options).await?;
    Ok(Service {
        conn,
        server,
        tls: options.tls_dir.is_some(),
        as_of,
        secret,
        data_dir,
    })
}

/// Serves `app` on loopback (over TLS with a throwaway CA when asked), says where, and opens the
/// demo's connection.
async fn serve_and_connect(
    app: Arc<cleanroom_server::App>,
    options: &DemoOptions<'_>,
) -> Result<(cleanroom_server::Running, Connection)> {
    let pki = match options.tls_dir {
        Some(dir) => Some(throwaway_pki(dir)?),
        None => None,
    };
    let server_tls = pki
        .as_ref()
        .map(|pki| {
            cleanroom_server::tls::Tls::from_pem(
                pki.server.cert_pem.as_bytes(),
                pki.server.key_pem.as_bytes(),
                Some(pki.ca_pem.as_bytes()),
            )
        })
        .transpose()?;
    let scheme = if pki.is_some() { "https" } else { "http" };
    let server =
        cleanroom_server::spawn_with_tls(app, options.listen, options.review_listen, server_tls)
            .await?;
    println!(
        "clean room listening on {scheme}://{} (throwaway data dir, random master secret)",
        server.addr
    );
    println!("review page on {scheme}://{}/", server.review_addr);
    if let Some(dir) = options.tls_dir {
        println!(
            "TLS with a throwaway CA: trust {}",
            dir.join("ca.pem").display()
        );
    }
    println!(
        "clock pinned to the sample's export date {}\n",
        sample::AS_OF
    );
    let url = format!("{scheme}://{}", server.addr);
    let conn = match &pki {
        Some(pki) => Connection::open_tls(&url, &pki.client_tls(None)).await?,
        None => Connection::open(&url).await?,
    };
    Ok((server, conn))
}

/// The legal reviewer approves every query on the allow-list.
async fn approve_allow_list(conn: &Connection) -> Result<()> {
    println!(
        "== Legal reviewer: approve the allow-list (approvals are bound to content hashes) =="
    );
    for (id, response) in sample::approve_all(conn).await? {
        let decision = response.decision.unwrap_or_default();
        println!(
            "{id:>32}: approved content {} by {}, audit {}",
            &decision.content_sha256[..12],
            decision.by,
            response.audit_id
        );
    }
    Ok(())
}

/// The analyst ingests the retailer's exports and each partner uploads its customer list.
async fn load_sample(conn: &Connection, sample_dir: &Path) -> Result<()> {
    println!("\n== Retailer analyst: ingest (identifiers are keyed and dropped on arrival) ==");
    let loaded = sample::load(conn, sample_dir).await?;
    for (name, summary, took) in &loaded.ingests {
        println!(
            "{name:>15}: {} received, {} accepted in {} ms{}",
            summary.records_received,
            summary.records_accepted,
            took.as_millis(),
            reasons(&summary.rejected_by_reason)
        );
    }
    println!("\n== Partners: customer lists (raw identifiers hashed on arrival, never stored) ==");
    for (partner, response, took) in &loaded.lists {
        println!(
            "{partner:>15}: list v{}: {} received, {} accepted in {} ms{}",
            response.list_version,
            response.records_received,
            response.records_accepted,
            took.as_millis(),
            reasons(&response.rejected_by_reason)
        );
    }
    Ok(())
}

/// One partner runs every query open to it, with the demo's parameters, and sees the answers.
async fn run_partner_queries(conn: &Connection, partner: &str, token: &str) -> Result<()> {
    let mut client = conn.partner(token)?;
    let queries = client
        .list_queries(ListQueriesRequest {})
        .await?
        .into_inner()
        .queries;
    println!(
        "\n== Partner {partner}: {} allowed queries ==",
        queries.len()
    );
    for summary in queries {
        let description = client
            .describe_query(DescribeQueryRequest {
                query_id: summary.id.clone(),
            })
            .await?
            .into_inner();
        let params = demo_params(&description);
        let response = client
            .run_query(RunQueryRequest {
                query_id: summary.id.clone(),
                params: params.clone(),
            })
            .await
            .with_context(|| format!("running {}", summary.id))?
            .into_inner();
        print_result(&description, &params, &response);
    }
    Ok(())
}

/// Requests the service must refuse or defuse, made as Sakura Foods, then a consent withdrawal.
async fn show_refusals(
    conn: &Connection,
    sample_dir: &Path,
    as_of: DateTime<chrono::Utc>,
) -> Result<()> {
    println!("\n== Refused and withdrawn ==");
    let mut sakura = conn.partner(sample::partner_token("sakura_foods"))?;
    refuse_foreign_query(&mut sakura).await;
    refuse_injection(&mut sakura).await;
    upload_plus_one(&mut sakura, sample_dir).await?;
    day_tracker(&mut sakura).await?;
    refuse_analyst_method(conn).await?;
    withdrawal(conn, &mut sakura, sample_dir, as_of).await
}

/// A query on the allow-list, but not on Sakura Foods' part of it.
async fn refuse_foreign_query(sakura: &mut PartnerClient) {
    show_refusal(
        "Sakura Foods runs Kumo Denki's query",
        sakura
            .run_query(RunQueryRequest {
                query_id: "appliance_buyers_by_owned_model".into(),
                params: BTreeMap::new(),
            })
            .await,
    );
}

/// SQL in a parameter: parameters are checked against their allowed values, never spliced.
async fn refuse_injection(sakura: &mut PartnerClient) {
    let mut injected = window_params();
    injected.insert("brand".into(), text("Sakura Cha' OR '1'='1"));
    show_refusal(
        "Sakura Foods puts SQL in a parameter",
        sakura
            .run_query(RunQueryRequest {
                query_id: "brand_buyers_by_prefecture".into(),
                params: injected,
            })
            .await,
    );
}

/// List differencing (THREATS 2): the same list plus one person is accepted as a new version,
/// but every answer over it is a fresh, noisy, charged release: the difference it could show
/// is one member, far inside the noise, and each look costs budget.
async fn upload_plus_one(sakura: &mut PartnerClient, sample_dir: &Path) -> Result<()> {
    let mut plus_one =
        cleanroom_client::read_list(&sample_dir.join("partner_lists/sakura_foods.csv"))?;
    plus_one.push(cleanroom_proto::v1::CustomerRecord {
        email: "hanako.matoba@example.jp".into(),
        attribute: "gold".into(),
        ..Default::default()
    });
    let upload = cleanroom_client::upload_list(sakura, false, plus_one).await?;
    println!(
        "  Sakura Foods re-uploads its list plus one person: accepted as list v{}; its answers \
         are new, noisy and charged like any other",
        upload.list_version
    );
    Ok(())
}

/// A day tracker (THREATS 3): days 1–10 and 1–9 of June snap to the same month.
async fn day_tracker(sakura: &mut PartnerClient) -> Result<()> {
    let mut answers = Vec::new();
    for end in ["2026-06-11", "2026-06-10"] {
        let params = BTreeMap::from([
            ("start".to_string(), date("2026-06-01")),
            ("end".to_string(), date(end)),
        ]);
        answers.push(
            sakura
                .run_query(RunQueryRequest {
                    query_id: "category_buyers_by_age_band".into(),
                    params,
                })
                .await?
                .into_inner(),
        );
    }
    println!(
        "  Sakura Foods asks for June 1-10, then June 1-9: both run as {} .. {}, same answer: {}",
        answers[0].effective_params["start"],
        answers[0].effective_params["end"],
        answers[0].rows == answers[1].rows
    );
    Ok(())
}

/// A partner's token on the analyst's service: methods are bound to roles.
async fn refuse_analyst_method(conn: &Connection) -> Result<()> {
    let mut admin_as_partner = conn.admin(sample::partner_token("sakura_foods"))?;
    show_refusal(
        "Sakura Foods calls an analyst method",
        cleanroom_client::ingest_consent(
            &mut admin_as_partner,
            IngestHeader::default(),
            Vec::new(),
        )
        .await
        .map_err(|e| match e {
            cleanroom_client::Error::Status(s) => s,
            other => tonic::Status::unknown(other.to_string()),
        }),
    );
    Ok(())
}

/// Ends Kumo Denki's collaboration early: the analyst asks, the legal reviewer confirms, Kumo is
/// refused from then on, and the certificate of destruction is printed.
async fn end_collaboration(service: &Service) -> Result<()> {
    const CONTRACT: &str = "ctr-kumo-2026";
    println!("\n== the end of a collaboration: {CONTRACT} ends early");
    service
        .conn
        .admin(sample::ANALYST_TOKEN)?
        .request_destruction(cleanroom_proto::v1::RequestDestructionRequest {
            contract_id: CONTRACT.into(),
            reason: "the campaign ended early (demo)".into(),
        })
        .await?;
    println!("  the analyst asks; nothing changes until a legal reviewer confirms");
    let done = service
        .conn
        .legal(sample::LEGAL_TOKEN)?
        .confirm_destruction(cleanroom_proto::v1::ConfirmDestructionRequest {
            contract_id: CONTRACT.into(),
        })
        .await?
        .into_inner();
    println!(
        "  legal confirms: {} files, {} stored answers and key {} destroyed",
        done.files.len(),
        done.stored_answers,
        done.key_id
    );
    let kumo = sample::PARTNERS.iter().find(|(p, _)| *p == "kumo_denki");
    if let Some((_, token)) = kumo {
        let refused = service
            .conn
            .partner(token)?
            .list_queries(cleanroom_proto::v1::ListQueriesRequest {})
            .await;
        show_refusal("Kumo Denki lists its queries", refused);
    }
    let data_dir = service.data_dir.path().join("data");
    let certificate = crate::destruction::certificate(&data_dir, &service.secret, CONTRACT)?;
    println!("\n{certificate}");
    show_receipts(service).await
}

/// The records of receipt (APPI Art. 30), which the destruction keeps: per partner, how many and
/// the latest, as the legal reviewer reads them.
async fn show_receipts(service: &Service) -> Result<()> {
    let page = service
        .conn
        .legal(sample::LEGAL_TOKEN)?
        .list_receipts(cleanroom_proto::v1::ListReceiptsRequest::default())
        .await?
        .into_inner();
    println!("== records of receipt (APPI Art. 30), kept after the destruction");
    let mut by_partner: BTreeMap<&str, Vec<&cleanroom_proto::v1::ReceiptRecord>> = BTreeMap::new();
    for r in &page.receipts {
        by_partner.entry(r.partner.as_str()).or_default().push(r);
    }
    for (partner, records) in by_partner {
        let Some(latest) = records.last() else {
            continue;
        };
        println!(
            "  {partner}: {} record(s); the latest, {}, received on {} from {} under {} ({} basis), \
             names {} members by keyed digest and is kept until {}",
            records.len(),
            latest.id,
            latest.received_on,
            latest.legal_name,
            latest.contract,
            latest.basis,
            latest.members,
            latest.keep_until
        );
    }
    Ok(())
}

/// Closes the demo's connection, keeps serving until interrupted when asked, then stops the
/// service. The data directory goes when `service`'s last field drops, after the farewell line.
async fn finish(service: Service, keep_serving: bool) -> Result<()> {
    drop(service.conn);
    if keep_serving {
        serve_until_interrupted(&service.server, service.tls).await?;
    }
    service.server.stop().await?;
    println!("\ndemo finished: the throwaway data directory is removed.");
    Ok(())
}

/// Waits for Ctrl-C or SIGTERM while the loaded sample stays served.
async fn serve_until_interrupted(server: &cleanroom_server::Running, tls: bool) -> Result<()> {
    println!(
        "\nserving the loaded sample on {} until interrupted",
        server.addr
    );
    if tls {
        println!("TLS on both ports (https)");
    }
    use std::io::Write as _;
    std::io::stdout().flush()?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}

/// A throwaway CA, server certificate and one client certificate per sample partner, written to
/// `dir` for clients to trust.
fn throwaway_pki(dir: &Path) -> Result<ThrowawayPki> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let partners: Vec<&str> = sample::PARTNERS.iter().map(|(p, _)| *p).collect();
    let pki = ThrowawayPki::generate(&partners)?;
    pki.write(dir)?;
    Ok(pki)
}

/// Withdraws the consent of members who count for Sakura Foods and shows the next query no longer
/// counts them.
async fn withdrawal(
    conn: &Connection,
    sakura: &mut PartnerClient,
    sample_dir: &Path,
    as_of: DateTime<chrono::Utc>,
) -> Result<()> {
    let overlap = |r: &RunQueryResponse| -> i64 {
        r.rows
            .iter()
            .filter_map(
                |row| match row.values.get(1).and_then(|v| v.kind.as_ref()) {
                    Some(Kind::IntValue(i)) => Some(*i),
                    _ => None,
                },
            )
            .sum()
    };
    let run_overlap = |mut client: PartnerClient| async move {
        client
            .run_query(RunQueryRequest {
                query_id: "matched_overlap".into(),
                params: BTreeMap::new(),
            })
            .await
            .map(|r| r.into_inner())
    };
    let before = run_overlap(sakura.clone()).await?;

    // The retailer knows who consented; it withdraws 40 current product_insight grants, as if those
    // members had opted out in the app a minute ago.
    let events = cleanroom_client::read_consent(&sample_dir.join("consent_events.csv"))?;
    let mut latest: BTreeMap<&str, &ConsentRecord> = BTreeMap::new();
    for e in events.iter().filter(|e| e.purpose == "product_insight") {
        latest.insert(&e.member_id, e);
    }
    let at = (as_of - Duration::minutes(1)).to_rfc3339();
    let withdrawals: Vec<ConsentRecord> = latest
        .values()
        .filter(|e| e.action == "granted" && e.notice_version >= 3 && e.expires_at.is_empty())
        .take(40)
        .map(|e| ConsentRecord {
            member_id: e.member_id.clone(),
            purpose: "product_insight".into(),
            notice_version: e.notice_version,
            action: "withdrawn".into(),
            at: at.clone(),
            source: "app".into(),
            expires_at: String::new(),
        })
        .collect();
    let mut admin = conn.admin(sample::ANALYST_TOKEN)?;
    let summary = cleanroom_client::ingest_consent(
        &mut admin,
        IngestHeader {
            source: "app-withdrawals".into(),
            strict: true,
            request_id: cleanroom_client::new_request_id(),
            tokens_only: false,
        },
        withdrawals,
    )
    .await?;
    let after = run_overlap(sakura.clone()).await?;
    println!(
        "  40 members withdraw consent (snapshot {} -> {}): matched_overlap released {} -> {} \
         members, within noise (withdrawn members in Sakura's list leave at once: new data is a \
         new, charged answer)",
        before.consent_snapshot_id,
        summary.consent_snapshot_id,
        overlap(&before),
        overlap(&after)
    );
    Ok(())
}

fn show_refusal<T>(what: &str, result: std::result::Result<T, tonic::Status>) {
    match result {
        Ok(_) => println!("  {what}: NOT refused (unexpected)"),
        Err(status) => println!(
            "  {what}: refused, {:?}: {}",
            status.code(),
            status.message()
        ),
    }
}

fn reasons(rejected: &BTreeMap<String, u64>) -> String {
    if rejected.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = rejected.iter().map(|(r, n)| format!("{r} x{n}")).collect();
    format!("; skipped: {}", parts.join(", "))
}

fn text(s: &str) -> ParamValue {
    ParamValue {
        kind: Some(param_value::Kind::StringValue(s.into())),
    }
}

fn date(s: &str) -> ParamValue {
    ParamValue {
        kind: Some(param_value::Kind::DateValue(s.into())),
    }
}

fn window_params() -> BTreeMap<String, ParamValue> {
    BTreeMap::from([
        ("start".to_string(), date(WINDOW.0)),
        ("end".to_string(), date(WINDOW.1)),
    ])
}

/// Parameters for a query: the sample's last twelve months (snapped to Mondays for weekly
/// windows), and the first allowed value of each enum.
pub(crate) fn demo_params(description: &QueryDescription) -> BTreeMap<String, ParamValue> {
    let monday_on_or_after = |s: &str| {
        let mut d = NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("demo window date");
        while d.weekday() != chrono::Weekday::Mon {
            d += Duration::days(1);
        }
        d.to_string()
    };
    description
        .parameters
        .iter()
        .map(|p| {
            let value = match (p.r#type.as_str(), p.name.as_str(), p.granularity.as_str()) {
                ("date", "start", "week") => date(&monday_on_or_after(WINDOW.0)),
                ("date", "end", "week") => date(&monday_on_or_after(WINDOW.1)),
                ("date", "start", _) => date(WINDOW.0),
                ("date", _, _) => date(WINDOW.1),
                _ => text(
                    p.allowed_values
                        .first()
                        .map(String::as_str)
                        .unwrap_or_default(),
                ),
            };
            (p.name.clone(), value)
        })
        .collect()
}

fn print_result(
    description: &QueryDescription,
    params: &BTreeMap<String, ParamValue>,
    response: &RunQueryResponse,
) {
    let shown: Vec<String> = params
        .iter()
        .map(|(k, v)| match &v.kind {
            Some(param_value::Kind::StringValue(s) | param_value::Kind::DateValue(s)) => {
                format!("{k}={s}")
            }
            Some(param_value::Kind::IntValue(i)) => format!("{k}={i}"),
            None => k.clone(),
        })
        .collect();
    println!(
        "\n-- {} ({}) {}",
        description.title,
        description.id,
        shown.join(" ")
    );
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(response.columns.iter().map(|c| c.name.clone()));
    for row in &response.rows {
        table.add_row(row.values.iter().map(|v| match &v.kind {
            Some(Kind::StringValue(s)) => s.clone(),
            Some(Kind::IntValue(i)) => i.to_string(),
            Some(Kind::DoubleValue(d)) => format!("{d:.2}"),
            Some(Kind::NullValue(_)) | None => "NULL".into(),
        }));
    }
    if response.rows.is_empty() {
        println!("(no row reaches k = {})", response.effective_k);
    } else {
        println!("{table}");
    }
    println!(
        "released {} rows, suppressed {} of the output domain (k = {}); consent snapshot {}, list v{}, {} ms, audit {}",
        response.rows.len(),
        response.suppressed_rows,
        response.effective_k,
        response.consent_snapshot_id,
        response.list_version,
        response.elapsed_ms,
        response.audit_id
    );
    if let Some(p) = &response.protection {
        let intervals: Vec<String> = p
            .interval95
            .iter()
            .map(|(m, w)| format!("{m} ±{w}"))
            .collect();
        let cost = if p.fresh {
            format!(
                "this answer cost ε {:.3} (δ {:.1e})",
                p.epsilon_spent, p.delta_spent
            )
        } else {
            "a repeat: served again at no cost".to_string()
        };
        println!(
            "protection: rows need a noisy member count of {}; 95% intervals {}; {cost}; {} of {} \
             fresh answers used this period (ε {} δ {:.0e} per {} days)",
            p.release_threshold,
            intervals.join(", "),
            p.answers_used,
            p.answers_per_period,
            p.period_epsilon,
            p.period_delta,
            p.period_days
        );
    }
}
