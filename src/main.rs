//! `cleanroom`: the one binary. It serves the clean room, runs the demo on the bundled sample data,
//! generates sample data at any scale, and hashes a partner's list locally (`prep`).

mod bench;
mod cluster;
mod demo;
mod destruction;
mod r#gen;
mod lint;
mod receipts_cmd;
mod rules_cmd;
mod settings;
mod utility;
mod write_cmd;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use cleanroom_core::normalize;
use cleanroom_core::token::CollaborationKey;

/// A self-hosted data clean room: k-anonymous aggregates over consented, matched retail members.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// How log records are written to standard error: `text` for people, `json` (one object per
    /// line) for a log collector. Status lines such as "cleanroom serving gRPC on …" stay text.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Load the bundled sample data into a throwaway service on loopback and run every allowed
    /// query as each partner, then show refused requests.
    Demo(DemoArgs),
    /// Run the gRPC service.
    Serve(ServeArgs),
    /// Generate fictional sample data (members, purchases, consent events, two partner lists).
    Gen(GenArgs),
    /// Partner side: hash a customer list locally with the collaboration key, so that no raw
    /// identifier leaves the partner. Input columns: email,phone,attribute; output columns:
    /// email_token,phone_token,attribute.
    Prep(PrepArgs),
    /// Work with the allow-list.
    Queries {
        #[command(subcommand)]
        command: QueriesCommand,
    },
    /// Retailer analyst: check a rules change before it is applied.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Retailer analyst: stream one export file into a running service.
    Ingest(IngestArgs),
    /// Partner: upload a customer list (raw, or tokens from `prep`) to a running service.
    UploadList(UploadListArgs),
    /// Start an Apache Ballista scheduler and executors on loopback, for `[engine] cluster`
    /// (prints `scheduler df://127.0.0.1:PORT`; runs until interrupted). The data directory's
    /// path must be the same for the service and the cluster, as it is on one machine.
    Cluster(ClusterArgs),
    /// Speed and memory at a retailer's size, against baselines in the same run (Markdown on
    /// stdout): ingest, a new question against raw DataFusion, repeats, member tokens against
    /// bare HMAC, and a gRPC load test. Run it on a release build.
    Bench(BenchArgs),
    /// Benchmark report: how much of the true answer survives each protection setting, on a
    /// generated dataset of any size (Markdown on stdout).
    Utility(UtilityArgs),
    /// Legal reviewer: verify the audit trail's keyed chain and checkpoint in a data directory,
    /// and print the signed checkpoint to keep elsewhere. The chain key comes from the master
    /// secret (CLEANROOM_MASTER_SECRET, or the service configuration's key file).
    VerifyAudit(VerifyAuditArgs),
    /// Mint bearer tokens for the rules' principals.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Write a throwaway CA's certificate, a server certificate for the given names and client
    /// certificates, to try TLS and mutual TLS (evaluation only: use your own CA in production).
    ThrowawayPki(ThrowawayPkiArgs),
    /// Retailer side: print a collaboration's match key for its partner's `prep` (made now in
    /// the key store if the collaboration has none yet).
    ExportKey(ExportKeyArgs),
    /// Retailer analyst: ask to end a collaboration early. Its lists, member tokens, stored
    /// answers and key are destroyed once a legal reviewer confirms (`confirm-destruction`).
    Destroy(DestroyArgs),
    /// Retailer analyst: erase members (`--members FILE`, one member id per line): their rows
    /// leave the member table, every collaboration's member tokens, the purchases and the consent
    /// log in one commit, leaving a withdrawal tombstone per purpose. Prints counts only.
    Erase(EraseArgs),
    /// Legal reviewer: confirm an analyst's request to end a collaboration, and destroy it
    /// (prints what was destroyed: each file with its SHA-256 and rows, and the key's id).
    ConfirmDestruction(ConfirmDestructionArgs),
    /// Legal reviewer: print the certificate of a collaboration's destruction (Japanese and
    /// English), read from the verified audit trail and signed with a key of the master secret.
    /// Made again from the same trail it is the same text.
    DestructionCertificate(DestructionCertificateArgs),
    /// Legal reviewer: verify the records of receipt of partners' lists (APPI Art. 30) in the
    /// service's data directory and write them as CSV (`--csv FILE`).
    Receipts(ReceiptsArgs),
    /// Legal reviewer: disclose to a member what the retailer received about them (APPI Art.
    /// 33(5)), in Japanese and English: the records of receipt that name them, their consent,
    /// the periods they were matched and consenting, and the destructions. The service records
    /// the request with a keyed digest of the member id, never the id.
    Disclose(DiscloseArgs),
    /// The key store: each collaboration's keys, with creation and destruction dates.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(clap::Args)]
struct DestroyArgs {
    /// The contract (collaboration) id.
    #[arg(long)]
    contract: String,
    /// Why the collaboration ends early (kept in the audit trail).
    #[arg(long)]
    reason: String,
    #[command(flatten)]
    service: ServiceArgs,
}

#[derive(clap::Args)]
struct EraseArgs {
    /// The member ids to erase: UTF-8 text, one id per line, no header (at most 10,000).
    #[arg(long)]
    members: PathBuf,
    #[command(flatten)]
    service: ServiceArgs,
    /// Names this erasure for its retries: a retry of one that committed is answered with its
    /// counts and erases nothing again. Default: a new id, printed; give the printed id again to
    /// retry an erasure whose outcome was not known.
    #[arg(long)]
    request_id: Option<String>,
}

#[derive(clap::Args)]
struct ConfirmDestructionArgs {
    /// The contract (collaboration) id.
    #[arg(long)]
    contract: String,
    #[command(flatten)]
    service: ServiceArgs,
}

#[derive(clap::Args)]
struct DestructionCertificateArgs {
    /// The service configuration file.
    #[arg(long)]
    config: PathBuf,
    /// The contract (collaboration) id.
    #[arg(long)]
    contract: String,
}

#[derive(clap::Args)]
struct ReceiptsArgs {
    /// The service configuration file.
    #[arg(long)]
    config: PathBuf,
    /// Write the records as CSV to this file.
    #[arg(long)]
    csv: Option<PathBuf>,
}

#[derive(clap::Args)]
struct DiscloseArgs {
    /// The retailer's member id.
    #[arg(long)]
    member_id: String,
    #[command(flatten)]
    service: ServiceArgs,
}

#[derive(clap::Subcommand)]
enum KeysCommand {
    /// List every collaboration key the store holds or held: contract, version, public key id,
    /// created, destroyed (never key material).
    Status(KeysStatusArgs),
}

#[derive(clap::Args)]
struct KeysStatusArgs {
    /// The service configuration file.
    #[arg(long)]
    config: PathBuf,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// The sample data directory.
    #[arg(long, default_value = "sample_data")]
    sample_dir: PathBuf,
    /// The allow-list directory.
    #[arg(long, default_value = "queries")]
    queries: PathBuf,
    /// Loopback address to serve on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Loopback address of the review page (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    review_listen: std::net::SocketAddr,
    /// After the demo, keep serving the loaded sample until interrupted (for clients such as
    /// grpcurl or tests/python/stubless_client.py).
    #[arg(long)]
    keep_serving: bool,
    /// Serve both ports over TLS with a throwaway CA, written to this directory for clients
    /// to trust (ca.pem; server and per-partner client certificates and keys).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The service configuration file (see config/cleanroom.example.toml).
    #[arg(long)]
    config: PathBuf,
    /// Listen address, overriding the file and CLEANROOM__LISTEN.
    #[arg(long)]
    listen: Option<String>,
    /// Data directory, overriding the file and CLEANROOM__DATA_DIR.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Accept principals in the demo token form (token_sha256, as the sample rules use with
    /// their published tokens). Never on a real deployment.
    #[arg(long)]
    allow_demo_tokens: bool,
    /// Start on a data directory restored from backup (behind the high-water mark): the
    /// privacy charges and list uploads it lacks are carried over from the mark, never
    /// refilled, and the restore is recorded in the audit trail.
    #[arg(long)]
    accept_restore: bool,
}

#[derive(clap::Args)]
struct GenArgs {
    /// Seed: the same seed and options give the same bytes.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Number of random retailer members; the attack tests' target member is added on top.
    #[arg(long, default_value_t = 4000)]
    members: usize,
    /// Export date; purchases cover the year before it.
    #[arg(long, default_value = "2026-11-01")]
    as_of: chrono::NaiveDate,
    /// Output directory.
    #[arg(long, default_value = "sample_data")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct PrepArgs {
    /// File holding the collaboration key (`v<version>.<hex>`), as `export-key` prints it.
    #[arg(long)]
    key_file: PathBuf,
    /// The raw list.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the tokens.
    #[arg(long)]
    output: PathBuf,
}

#[derive(clap::Args)]
struct IngestArgs {
    /// What the file holds.
    #[arg(long, value_enum)]
    kind: IngestKind,
    /// The CSV export (purchases: CSV, or Parquet if the name ends in `.parquet`; either
    /// goes to the service as Arrow record batches).
    #[arg(long)]
    file: PathBuf,
    #[command(flatten)]
    service: ServiceArgs,
    /// Fail the whole file on the first invalid record instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// Names this write for its retries: a retry of a write that committed is answered with
    /// the original result and stores nothing new. Default: a new id, printed; give the
    /// printed id again to retry a write whose outcome was not known.
    #[arg(long)]
    request_id: Option<String>,
    /// Members only: compute the member tokens of the collaborations that have none under
    /// their current key version (a contract added, a key rotated) from the export of the last
    /// members ingest, leaving the member table and the other collaborations' tokens as they are.
    #[arg(long)]
    tokens_only: bool,
}

#[derive(clap::Args)]
struct UploadListArgs {
    /// The list: email,phone,attribute or email_token,phone_token,attribute.
    #[arg(long)]
    file: PathBuf,
    #[command(flatten)]
    service: ServiceArgs,
    /// Fail the whole upload on the first invalid identifier instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// Upload as the retailer analyst on this partner's behalf (the token is the analyst's).
    #[arg(long)]
    on_behalf_of: Option<String>,
    /// Names this write for its retries: a retry of a write that committed is answered with
    /// the original result and stores nothing new. Default: a new id, printed; give the
    /// printed id again to retry a write whose outcome was not known.
    #[arg(long)]
    request_id: Option<String>,
}

#[derive(clap::Args)]
struct ClusterArgs {
    /// How many executors.
    #[arg(long, default_value_t = 2)]
    executors: usize,
    /// Task slots per executor.
    #[arg(long, default_value_t = 1)]
    slots: usize,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Retailer members to generate.
    #[arg(long, default_value_t = 100_000)]
    members: usize,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Keep the generated files and the data directory here (files of the same size and
    /// seed are reused); a temporary directory otherwise.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Concurrent clients of each load level.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    /// Distinct questions per load level (repeats: four times as many).
    #[arg(long, default_value_t = 64)]
    questions: usize,
    /// Also write the figures as JSON (for bench/peers.py).
    #[arg(long)]
    json: Option<PathBuf>,
    /// The service's query memory pool (`[engine] memory_mb`); default as in `serve`.
    #[arg(long)]
    memory_mb: Option<usize>,
    /// The allow-list directory.
    #[arg(long, default_value = "queries")]
    queries: PathBuf,
    /// The rules (budgets are widened for the run).
    #[arg(long, default_value = "sample_data/rules.toml")]
    rules: PathBuf,
}

#[derive(clap::Args)]
struct UtilityArgs {
    /// Retailer members to generate.
    #[arg(long, default_value_t = 20_000)]
    members: usize,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// The allow-list directory.
    #[arg(long, default_value = "queries")]
    queries: PathBuf,
    /// The rules whose partners and contracts are measured.
    #[arg(long, default_value = "sample_data/rules.toml")]
    rules: PathBuf,
}

#[derive(clap::Args)]
struct VerifyAuditArgs {
    /// The service's data directory.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// The service configuration, for its master secret file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A checkpoint printed by an earlier run, kept elsewhere: the trail must extend it.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ThrowawayPkiArgs {
    /// Directory for ca.pem, server.pem, server.key, server.spki (the browser pin) and a
    /// .pem and .key per client.
    #[arg(long)]
    dir: PathBuf,
    /// A DNS name or IP address the server certificate is for (repeat for several).
    #[arg(long = "name", required = true)]
    names: Vec<String>,
    /// A client certificate to issue (repeat for several).
    #[arg(long = "client")]
    clients: Vec<String>,
}

#[derive(clap::Args)]
struct ExportKeyArgs {
    /// The service configuration file.
    #[arg(long)]
    config: PathBuf,
    /// The contract (collaboration) id.
    #[arg(long)]
    contract: String,
}

/// Where a command-line client reaches the service, and as whom.
#[derive(clap::Args, Debug)]
struct ServiceArgs {
    /// Service address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// The caller's bearer token, of the role the command is for.
    #[arg(long, env = "CLEANROOM_TOKEN", hide_env_values = true)]
    token: String,
    #[command(flatten)]
    tls: TlsArgs,
}

impl ServiceArgs {
    async fn connect(&self) -> Result<cleanroom_client::Connection> {
        connect(&self.addr, &self.tls).await
    }
}

/// How a command-line client reaches a service over TLS.
#[derive(clap::Args, Debug)]
struct TlsArgs {
    /// CA certificate (PEM) that the service's certificate must chain to; with it, the address
    /// is https://.
    #[arg(long, env = "CLEANROOM_CA")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM), for mutual TLS.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
}

/// Connects in plain text (loopback) or, with a CA, over TLS.
async fn connect(addr: &str, tls: &TlsArgs) -> Result<cleanroom_client::Connection> {
    match &tls.ca {
        None if tls.cert.is_some() => bail!("--cert needs --ca"),
        None => Ok(cleanroom_client::Connection::open(addr).await?),
        Some(ca) => {
            let config = cleanroom_client::ClientTls::from_files(
                ca,
                tls.cert.as_deref(),
                tls.key.as_deref(),
            )?;
            Ok(cleanroom_client::Connection::open_tls(addr, &config).await?)
        }
    }
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a fresh token (256 random bits) once, and the `[[principals]]` entry that holds only
    /// its public id and an Argon2id hash of its secret.
    New(TokenNewArgs),
}

#[derive(clap::Args)]
struct TokenNewArgs {
    /// The principal's role.
    #[arg(long, value_parser = ["partner", "analyst", "legal"])]
    role: String,
    /// For a partner principal: the partner id.
    #[arg(long)]
    partner: Option<String>,
    /// The principal's name in the audit trail.
    #[arg(long)]
    name: String,
}

#[derive(Subcommand)]
enum QueriesCommand {
    /// Check every query file against the rules and the guard's plan checks; exits non-zero with
    /// `file:line: reason` for each problem.
    Lint(QueriesLintArgs),
}

#[derive(clap::Args)]
struct QueriesLintArgs {
    /// The rules file.
    #[arg(long, default_value = "sample_data/rules.toml")]
    rules: PathBuf,
    /// The allow-list directory.
    #[arg(long, default_value = "queries")]
    queries: PathBuf,
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Dry run: validate proposed rules and print what they would change against the rules in
    /// force (unrunnable queries, access lost and gained, effective k, consent filter counts).
    /// Exits non-zero, with the reason, if the proposed rules are invalid.
    Validate(RulesValidateArgs),
}

#[derive(clap::Args)]
struct RulesValidateArgs {
    /// The proposed rules file.
    #[arg(long)]
    rules: PathBuf,
    /// The rules in force.
    #[arg(long, default_value = "sample_data/rules.toml")]
    current: PathBuf,
    /// The allow-list directory.
    #[arg(long, default_value = "queries")]
    queries: PathBuf,
    /// A data directory, to count the members each consent filter admits (read only).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The service's settings: their key store opens the partners' sealed lists, to count the
    /// members in them too (read only).
    #[arg(long, requires = "data_dir")]
    config: Option<PathBuf>,
    /// Evaluate consent and contract dates at this instant (RFC 3339) instead of now.
    #[arg(long)]
    as_of: Option<chrono::DateTime<chrono::FixedOffset>>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum IngestKind {
    Members,
    Purchases,
    Consent,
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to standard error, filtered by `RUST_LOG` (warnings by default). No record carries an
/// identifier, a token or a parameter value: the code logs kinds, counts and shown names only.
fn init_logs(format: LogFormat) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(args) => demo(args),
        Command::Cluster(args) => cluster(args),
        Command::Serve(args) => serve(args),
        Command::Token {
            command: TokenCommand::New(args),
        } => token_new(&args.role, args.partner.as_deref(), &args.name),
        Command::ThrowawayPki(args) => throwaway_pki(args),
        Command::Gen(args) => generate(args),
        Command::Prep(args) => prep(&args.key_file, &args.input, &args.output),
        Command::Queries {
            command: QueriesCommand::Lint(args),
        } => lint_queries(args),
        Command::Rules {
            command: RulesCommand::Validate(args),
        } => validate_rules(args),
        Command::Ingest(args) => ingest(args),
        Command::UploadList(args) => upload_list(args),
        Command::Bench(args) => bench(args),
        Command::Utility(args) => utility(args),
        Command::VerifyAudit(args) => verify_audit(
            &args.data_dir,
            args.config.as_deref(),
            args.checkpoint.as_deref(),
        ),
        Command::ExportKey(args) => export_key(args),
        Command::Keys {
            command: KeysCommand::Status(args),
        } => keys_status(args),
        Command::Destroy(args) => destroy(args),
        Command::ConfirmDestruction(args) => confirm_destruction(args),
        Command::Erase(args) => erase(args),
        Command::Receipts(args) => {
            let settings = settings::Settings::load(&args.config, None, None)?;
            let secret = settings.master_secret()?;
            let summary = receipts_cmd::export(&settings.data_dir, &secret, args.csv.as_deref())?;
            println!("{summary}");
            Ok(())
        }
        Command::Disclose(args) => disclose(args),
        Command::DestructionCertificate(args) => {
            let settings = settings::Settings::load(&args.config, None, None)?;
            let secret = settings.master_secret()?;
            print!(
                "{}",
                destruction::certificate(&settings.data_dir, &secret, &args.contract)?
            );
            Ok(())
        }
    }
}

fn demo(args: DemoArgs) -> Result<()> {
    for addr in [args.listen, args.review_listen] {
        if !addr.ip().is_loopback() {
            bail!("{addr}: the demo serves on loopback only");
        }
    }
    runtime()?.block_on(demo::run(demo::DemoOptions {
        sample_dir: &args.sample_dir,
        queries_dir: &args.queries,
        listen: args.listen,
        review_listen: args.review_listen,
        keep_serving: args.keep_serving,
        tls_dir: args.tls_dir.as_deref(),
    }))
}

fn cluster(args: ClusterArgs) -> Result<()> {
    if args.executors == 0 || args.slots == 0 {
        bail!("--executors and --slots must be at least 1");
    }
    runtime()?.block_on(cluster::run(args.executors, args.slots))
}

fn serve(args: ServeArgs) -> Result<()> {
    let settings = settings::Settings::load(&args.config, args.listen, args.data_dir)?;
    runtime()?.block_on(serve_until_stopped(
        settings,
        args.allow_demo_tokens,
        args.accept_restore,
    ))
}

fn throwaway_pki(args: ThrowawayPkiArgs) -> Result<()> {
    let ThrowawayPkiArgs {
        dir,
        names,
        clients,
    } = args;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let clients: Vec<&str> = clients.iter().map(String::as_str).collect();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    cleanroom_client::pki::ThrowawayPki::generate_for(&names, &clients)?.write(&dir)?;
    println!(
        "wrote a throwaway CA (ca.pem), a server certificate for {} and {} client \
         certificate(s) to {}",
        names.join(", "),
        clients.len(),
        dir.display()
    );
    Ok(())
}

fn generate(args: GenArgs) -> Result<()> {
    let report = r#gen::generate(&r#gen::GenOptions {
        seed: args.seed,
        members: args.members,
        as_of: args.as_of,
        out_dir: args.out.clone(),
    })?;
    println!(
        "wrote {}: {} members, {} purchases, {} consent events, lists {:?}",
        args.out.display(),
        report.members,
        report.purchases,
        report.consent_events,
        report.list_records
    );
    Ok(())
}

fn lint_queries(args: QueriesLintArgs) -> Result<()> {
    let rules = cleanroom_core::rules::Rules::load(&args.rules)?;
    let (files, findings) = runtime()?.block_on(lint::lint(&args.queries, &rules))?;
    for f in &findings {
        println!("{}:{}: {}", f.path.display(), f.line, f.message);
    }
    if findings.is_empty() {
        println!("{files} queries checked, no problem found");
        Ok(())
    } else {
        bail!("{} problem(s) in {} query file(s)", findings.len(), files)
    }
}

fn validate_rules(args: RulesValidateArgs) -> Result<()> {
    let now = args.as_of.map(Into::into).unwrap_or_else(chrono::Utc::now);
    let keys = match &args.config {
        Some(config) => Some(std::sync::Arc::new(
            settings::Settings::load(config, None, None)?.inspect_key_store()?,
        )),
        None => None,
    };
    let data_dir = args
        .data_dir
        .as_deref()
        .map(|dir| rules_cmd::DataDir { dir, keys });
    let report = rules_cmd::validate(&args.current, &args.rules, &args.queries, data_dir, now)?;
    print!("{report}");
    Ok(())
}

fn ingest(args: IngestArgs) -> Result<()> {
    if args.tokens_only && !matches!(args.kind, IngestKind::Members) {
        bail!("--tokens-only is for --kind members: only members have tokens");
    }
    runtime()?.block_on(async {
        let conn = args.service.connect().await?;
        let write = write_cmd::Write {
            file: &args.file,
            strict: args.strict,
            request_id: args.request_id,
            tokens_only: args.tokens_only,
        };
        write_cmd::ingest(args.kind, write, &conn, &args.service.token).await
    })
}

fn upload_list(args: UploadListArgs) -> Result<()> {
    runtime()?.block_on(async {
        let conn = args.service.connect().await?;
        let write = write_cmd::Write {
            file: &args.file,
            strict: args.strict,
            request_id: args.request_id,
            tokens_only: false,
        };
        let on_behalf_of = args.on_behalf_of.as_deref();
        write_cmd::upload_list(write, on_behalf_of, &conn, &args.service.token).await
    })
}

fn bench(args: BenchArgs) -> Result<()> {
    let opts = bench::BenchOptions {
        members: args.members,
        seed: args.seed,
        dir: args.dir,
        clients: args.clients,
        questions: args.questions,
        json: args.json,
        memory_mb: args.memory_mb,
    };
    let report = runtime()?.block_on(bench::run(opts, &args.queries, &args.rules))?;
    print!("{report}");
    Ok(())
}

fn utility(args: UtilityArgs) -> Result<()> {
    let UtilityArgs {
        members,
        seed,
        queries,
        rules,
    } = args;
    let report = runtime()?.block_on(utility::run(members, seed, &queries, &rules))?;
    print!("{report}");
    Ok(())
}

fn export_key(args: ExportKeyArgs) -> Result<()> {
    let ExportKeyArgs { config, contract } = args;
    let settings = settings::Settings::load(&config, None, None)?;
    let rules = settings.rules()?;
    let Some(c) = rules.contracts.get(&contract) else {
        bail!("no contract `{contract}` in {}", settings.rules.display());
    };
    let key = settings
        .open_key_store()?
        .key(&contract, c.key_version, chrono::Utc::now())?;
    println!("{}", key.export());
    Ok(())
}

fn destroy(args: DestroyArgs) -> Result<()> {
    let status = runtime()?.block_on(async {
        let conn = args.service.connect().await?;
        let request = cleanroom_proto::v1::RequestDestructionRequest {
            contract_id: args.contract,
            reason: args.reason,
        };
        anyhow::Ok(
            conn.admin(&args.service.token)?
                .request_destruction(request)
                .await?,
        )
    })?;
    let status = status.into_inner();
    println!(
        "the end of {} is requested (audit {}); a legal reviewer confirms it with \
         `cleanroom confirm-destruction --contract {}`",
        status.contract_id, status.audit_id, status.contract_id
    );
    Ok(())
}

fn erase(args: EraseArgs) -> Result<()> {
    // The file is read and checked whole before the service is called: a bad file erases no one.
    let member_ids = cleanroom_client::read_member_ids(&args.members)?;
    let s = runtime()?.block_on(async {
        let conn = args.service.connect().await?;
        write_cmd::erase(member_ids, args.request_id, &conn, &args.service.token).await
    })?;
    println!(
        "erased {} of {} members asked (commit {}, audit {})",
        s.members_found, s.members_asked, s.commit, s.audit_id
    );
    println!(
        "rows removed: members {}, member tokens {}, purchases {}, consent {}; {} withdrawal \
         tombstones; {} files replaced",
        s.member_rows,
        s.member_token_rows,
        s.purchase_rows,
        s.consent_rows,
        s.tombstones,
        s.files_replaced
    );
    Ok(())
}

fn confirm_destruction(args: ConfirmDestructionArgs) -> Result<()> {
    let status = runtime()?.block_on(async {
        let conn = args.service.connect().await?;
        let request = cleanroom_proto::v1::ConfirmDestructionRequest {
            contract_id: args.contract,
        };
        anyhow::Ok(
            conn.legal(&args.service.token)?
                .confirm_destruction(request)
                .await?,
        )
    })?;
    let s = status.into_inner();
    println!(
        "{} destroyed at {} (asked by {}, confirmed by {}; reason: {}; audit {})",
        s.contract_id, s.destroyed_at, s.requested_by, s.confirmed_by, s.reason, s.audit_id
    );
    println!("key v{} id {}", s.key_version, s.key_id);
    for f in &s.files {
        println!("file {} sha256 {} rows {}", f.name, f.sha256, f.rows);
    }
    println!("stored answers: {}", s.stored_answers);
    Ok(())
}

fn disclose(args: DiscloseArgs) -> Result<()> {
    let disclosure = runtime()?.block_on(async {
        let conn = args.service.connect().await?;
        let request = cleanroom_proto::v1::DiscloseMemberRequest {
            member_id: args.member_id,
        };
        anyhow::Ok(
            conn.legal(&args.service.token)?
                .disclose_member(request)
                .await?,
        )
    })?;
    print!(
        "{}",
        receipts_cmd::disclosure_text(&disclosure.into_inner())
    );
    Ok(())
}

fn keys_status(args: KeysStatusArgs) -> Result<()> {
    let settings = settings::Settings::load(&args.config, None, None)?;
    let keys = settings.inspect_key_store()?;
    let rules = settings.rules()?;
    let mut table = comfy_table::Table::new();
    table.set_header([
        "contract",
        "version",
        "key id",
        "created",
        "destroyed",
        "why",
    ]);
    for key in keys.status()? {
        let (destroyed, why) = match key.destroyed {
            Some((at, why)) => (at.to_rfc3339(), why),
            None => scheduled_destruction(&keys, &rules, &key.contract, key.version)?,
        };
        table.add_row([
            key.contract,
            key.version.to_string(),
            key.key_id,
            key.created.to_rfc3339(),
            destroyed,
            why,
        ]);
    }
    println!("key store {}", keys.dir().display());
    println!("{table}");
    Ok(())
}

/// When a live key is due to be destroyed: an old version in its rotation overlap is, at the
/// overlap's end (the service's sweep destroys it then); any other live key is not scheduled.
fn scheduled_destruction(
    keys: &cleanroom_core::keys::KeyStore,
    rules: &cleanroom_core::rules::Rules,
    contract: &str,
    version: u32,
) -> Result<(String, String)> {
    let unscheduled = ("-".to_string(), "-".to_string());
    let Some(c) = rules.contracts.get(contract) else {
        return Ok(unscheduled);
    };
    let due = keys
        .overlaps(contract, c.key_version, c.key_overlap_days)?
        .into_iter()
        .find(|r| r.version == version);
    Ok(due.map_or(unscheduled, |r| {
        (
            format!("due {}", r.ends.to_rfc3339()),
            format!("rotation (key_overlap_days = {})", c.key_overlap_days),
        )
    }))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Verifies a trail and prints its signed head.
fn verify_audit(data_dir: &Path, config: Option<&Path>, kept: Option<&Path>) -> Result<()> {
    let secret = match config {
        Some(config) => settings::Settings::load(config, None, None)?.master_secret()?,
        None => {
            let hex = std::env::var("CLEANROOM_MASTER_SECRET")
                .context("the chain key needs the master secret: set CLEANROOM_MASTER_SECRET or pass --config")?;
            cleanroom_core::token::MasterSecret::from_hex(&hex)
                .context("CLEANROOM_MASTER_SECRET")?
        }
    };
    let kept = match kept {
        Some(path) => {
            let text = cleanroom_core::files::read_config_file(path)?;
            Some(
                serde_json::from_str::<cleanroom_server::audit::Checkpoint>(&text)
                    .with_context(|| format!("{}: not a checkpoint", path.display()))?,
            )
        }
        None => None,
    };
    let path = data_dir.join("audit.jsonl");
    let key = cleanroom_server::audit::ChainKey::new(&secret);
    let verified = cleanroom_server::audit::verify(&path, &key, kept.as_ref())
        .with_context(|| format!("verifying {}", path.display()))?;
    println!(
        "{}: {} records, keyed chain and checkpoint intact{}",
        path.display(),
        verified.records,
        if kept.is_some() {
            ", extends the kept checkpoint"
        } else {
            ""
        }
    );
    if let Some(torn) = verified.torn {
        println!(
            "  plus a torn last record ({} bytes, a cut write): the service drops it at its next \
             start and records that it did",
            torn.dropped_bytes
        );
    }
    check_nothing_destroyed_came_back(data_dir, config, &path)?;
    println!("{}", receipts_cmd::verify(data_dir, &secret)?);
    println!("checkpoint to keep elsewhere:");
    println!("{}", serde_json::to_string(&verified.checkpoint)?);
    Ok(())
}

/// Fails if a file or key some destruction in the trail destroyed is back (the key store is
/// checked when the configuration names it).
fn check_nothing_destroyed_came_back(
    data_dir: &Path,
    config: Option<&Path>,
    trail: &Path,
) -> Result<()> {
    let records = cleanroom_server::audit::read(trail)?;
    let keys = match config {
        Some(config) => Some(settings::Settings::load(config, None, None)?.inspect_key_store()?),
        None => None,
    };
    let back = destruction::resurrected(&records, data_dir, keys.as_ref())?;
    if !back.is_empty() {
        bail!("destroyed data is back: {}", back.join("; "));
    }
    let ended = destruction::destructions(&records).len();
    if ended > 0 {
        println!("  {ended} destruction(s) recorded; nothing they destroyed is back");
    }
    Ok(())
}

/// Prints a minted token and its rules entry. The token is shown only here.
fn token_new(role: &str, partner: Option<&str>, name: &str) -> Result<()> {
    match (role, partner) {
        ("partner", None) => bail!("a partner principal needs --partner"),
        ("partner", Some(_)) | (_, None) => {}
        (_, Some(_)) => bail!("only a partner principal names a partner (--partner)"),
    }
    let minted = cleanroom_server::auth::mint_token()?;
    let toml_str = |s: &str| toml::Value::String(s.to_string()).to_string();
    println!("token (give it to {name} over a safe channel; it is not shown again):");
    println!("  {}", minted.token);
    println!("\nadd to the rules:\n[[principals]]");
    println!("name = {}", toml_str(name));
    println!("role = {}", toml_str(role));
    if let Some(partner) = partner {
        println!("partner = {}", toml_str(partner));
    }
    println!("token_id = {}", toml_str(&minted.id));
    println!("token_hash = {}", toml_str(&minted.hash));
    Ok(())
}

async fn serve_until_stopped(
    settings: settings::Settings,
    allow_demo_tokens: bool,
    accept_restore: bool,
) -> Result<()> {
    let tls = settings.tls()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let app = cleanroom_server::App::new(settings.app_config(allow_demo_tokens, accept_restore)?)?;
    let listen: std::net::SocketAddr = settings.listen.parse()?;
    let running =
        cleanroom_server::spawn_with_tls(app, listen, settings.review_addr()?, tls).await?;
    eprintln!("cleanroom serving gRPC on {scheme}://{}", running.addr);
    eprintln!("review page on {scheme}://{}/", running.review_addr);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    running.stop().await?;
    Ok(())
}

/// Hashes a raw list with the collaboration key. Writes through a temporary file so a failed run
/// leaves no half-written output.
fn prep(key_file: &Path, input: &Path, output: &Path) -> Result<()> {
    let key_text = cleanroom_core::files::read_config_file(key_file)?;
    let key = CollaborationKey::from_export(&key_text)?;
    let records = cleanroom_client::read_list(input)?;
    let tmp = output.with_extension("tmp");
    let mut writer =
        csv::Writer::from_path(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    writer.write_record(["email_token", "phone_token", "attribute"])?;
    let (mut written, mut rejected) = (0u64, std::collections::BTreeMap::<&str, u64>::new());
    for record in records {
        let token = |raw: &str,
                     f: fn(&str) -> Result<String, normalize::Rejection>,
                     rejected: &mut std::collections::BTreeMap<&str, u64>| {
            if raw.trim().is_empty() {
                return String::new();
            }
            match f(raw) {
                Ok(n) => key.token(&n).to_string(),
                Err(reason) => {
                    *rejected.entry(reason.0).or_default() += 1;
                    String::new()
                }
            }
        };
        let email = token(&record.email, normalize::email, &mut rejected);
        let phone = token(&record.phone, normalize::phone, &mut rejected);
        if email.is_empty() && phone.is_empty() {
            continue;
        }
        writer.write_record([email, phone, record.attribute])?;
        written += 1;
    }
    writer.flush()?;
    drop(writer);
    std::fs::rename(&tmp, output)?;
    println!("wrote {written} hashed records to {}", output.display());
    for (reason, count) in rejected {
        println!("  skipped identifier ({reason}): {count}");
    }
    Ok(())
}
