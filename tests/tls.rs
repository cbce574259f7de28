//! TLS and mutual TLS on both ports (issue 9, item 1), played against the running service with a
//! throwaway CA made for each run: clients that trust the CA get through; a client that trusts
//! another CA, or speaks plain text, gets nothing; a partner bound to a client certificate is
//! refused with its token alone or with another partner's certificate.

use std::sync::Arc;

use cleanroom_client::pki::ThrowawayPki;
use cleanroom_client::{ClientTls, Connection, sample};
use cleanroom_proto::v1::ListQueriesRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tonic::Code;

use crate::util::{Harness, Setup, bare_app, sample_rules, year};

/// Sample rules with Sakura Foods' token bound to the client certificate issued to it.
fn bound_rules(pki: &ThrowawayPki) -> cleanroom_core::rules::Rules {
    let mut rules = sample_rules();
    let sakura = pki.client("sakura_foods").unwrap().cert_sha256.clone();
    for p in &mut rules.principals {
        if p.partner.as_deref() == Some("sakura_foods") {
            p.client_cert_sha256 = Some(sakura.clone());
        }
    }
    rules
}

async fn over_tls(h: &Harness, tls: &ClientTls) -> Result<Connection, cleanroom_client::Error> {
    Connection::open_tls(&format!("https://{}", h.addr()), tls).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_binds_partners_to_their_certificates_and_refuses_strangers() {
    let pki = ThrowawayPki::generate(&["sakura_foods", "kumo_denki"]).unwrap();
    let h = Harness::start_with(Setup {
        rules: bound_rules(&pki),
        tls: Some(pki.clone()),
        ..Default::default()
    })
    .await;
    let token = sample::partner_token("sakura_foods");

    // Its own certificate and token: answered, over TLS.
    let with_cert = over_tls(&h, &pki.client_tls(Some("sakura_foods")))
        .await
        .unwrap();
    let answer = with_cert
        .partner(token)
        .unwrap()
        .run_query(crate::util::request("repeat_purchase_rate", &year()))
        .await
        .expect("Sakura with its certificate is answered");
    assert!(!answer.into_inner().rows.is_empty());

    // The token alone, or with Kumo Denki's certificate (valid, same CA): refused.
    for (what, tls) in [
        ("no certificate", pki.client_tls(None)),
        ("Kumo's certificate", pki.client_tls(Some("kumo_denki"))),
    ] {
        let conn = over_tls(&h, &tls).await.unwrap();
        let status = conn
            .partner(token)
            .unwrap()
            .list_queries(ListQueriesRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert!(status.message().contains("client certificate"), "{what}");
    }
    // Kumo Denki is not bound: its token works over TLS without a certificate.
    let plain_tls = over_tls(&h, &pki.client_tls(None)).await.unwrap();
    plain_tls
        .partner(sample::partner_token("kumo_denki"))
        .unwrap()
        .list_queries(ListQueriesRequest {})
        .await
        .expect("an unbound partner needs only its token");

    // A client that trusts another CA does not connect.
    let stranger = ThrowawayPki::generate(&[]).unwrap();
    assert!(
        over_tls(&h, &stranger.client_tls(None)).await.is_err(),
        "a server certificate from an untrusted CA is refused"
    );
    // A plain-text client gets no answer from the TLS port.
    let plain = Connection::open(&format!("http://{}", h.addr())).await;
    if let Ok(plain) = plain {
        let status = plain
            .partner(sample::partner_token("kumo_denki"))
            .unwrap()
            .list_queries(ListQueriesRequest {})
            .await
            .unwrap_err();
        // The TLS port drops the connection: a failure of the client's own transport (it
        // carries its cause), never a status the service sent.
        assert!(std::error::Error::source(&status).is_some(), "{status:?}");
    }
    h.stop().await;
}

/// One HTTPS request to the review page, trusting `ca_pem`.
async fn https_get(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    path: &str,
) -> std::io::Result<String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        sample::LEGAL_TOKEN
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    // A TLS peer may close without close_notify once the body is sent; what arrived counts.
    let _ = stream.read_to_end(&mut response).await;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_review_page_is_served_over_https_only() {
    let pki = ThrowawayPki::generate(&[]).unwrap();
    let h = Harness::start_with(Setup {
        tls: Some(pki.clone()),
        load_sample: false,
        ..Default::default()
    })
    .await;
    let page = https_get(h.review_addr(), &pki.ca_pem, "/").await.unwrap();
    assert!(
        page.starts_with("HTTP/1.1 200"),
        "{}",
        &page[..page.len().min(200)]
    );
    assert!(page.contains("<html"), "the page itself");
    let api = https_get(h.review_addr(), &pki.ca_pem, "/api/allowlist")
        .await
        .unwrap();
    assert!(api.starts_with("HTTP/1.1 200") && api.contains("repeat_purchase_rate"));

    let stranger = ThrowawayPki::generate(&[]).unwrap();
    assert!(
        https_get(h.review_addr(), &stranger.ca_pem, "/")
            .await
            .is_err(),
        "a browser that does not trust the service's CA gets no page"
    );
    // Plain HTTP to the HTTPS port: no HTTP response comes back.
    let mut tcp = tokio::net::TcpStream::connect(h.review_addr())
        .await
        .unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ = tcp.read_to_end(&mut response).await;
    assert!(
        !String::from_utf8_lossy(&response).starts_with("HTTP/1.1 200"),
        "plain HTTP is not served"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_only_loopback_is_served() {
    // A data directory of its own: a bare temporary directory would put the high-water mark and
    // the key store straight into the shared /tmp, beside every other run's.
    let dir = crate::util::DataDir::new();
    let everywhere = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let refused = cleanroom_server::spawn_with_page(bare_app(dir.path()), everywhere, everywhere)
        .await
        .err()
        .expect("a non-loopback address without TLS is refused");
    assert!(refused.to_string().contains("only loopback"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_clients_speak_tls_with_a_ca() {
    let pki = ThrowawayPki::generate(&[]).unwrap();
    let h = Harness::start_with(Setup {
        tls: Some(pki.clone()),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    pki.write(dir.path()).unwrap();
    let list = crate::util::sample_dir().join("partner_lists/sakura_foods.csv");
    let upload = |ca: Option<&std::path::Path>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"));
        cmd.args(["upload-list", "--file"])
            .arg(&list)
            .args(["--addr", &format!("https://{}", h.addr())])
            .env("CLEANROOM_TOKEN", sample::partner_token("sakura_foods"))
            .env_remove("CLEANROOM_CA");
        if let Some(ca) = ca {
            cmd.arg("--ca").arg(ca);
        }
        cmd.output().unwrap()
    };
    let ok = upload(Some(&dir.path().join("ca.pem")));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("list v2"));
    let stranger = ThrowawayPki::generate(&[]).unwrap();
    let other = tempfile::tempdir().unwrap();
    stranger.write(other.path()).unwrap();
    let refused = upload(Some(&other.path().join("ca.pem")));
    assert!(
        !refused.status.success(),
        "a CA the service does not use is refused"
    );
    h.stop().await;
}

/// `cleanroom serve` on a non-loopback address, inside a network namespace this test makes
/// (`unshare -rn`, a veth pair with 10.200.0.1): refused without TLS, served with it, and reached
/// there by `cleanroom upload-list` trusting the CA.
#[test]
fn serve_on_a_non_loopback_address_needs_tls_and_works_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ThrowawayPki::generate_for(&["10.200.0.1"], &[]).unwrap();
    pki.write(dir.path()).unwrap();
    let config = |name: &str, tls: bool| {
        let mut text = format!(
            "listen = \"10.200.0.1:50443\"\nreview_listen = \"10.200.0.1:50444\"\n\
             data_dir = {:?}\nrules = {:?}\nqueries = {:?}\n",
            dir.path()
                .join(format!("data-{name}"))
                .display()
                .to_string(),
            crate::util::sample_dir()
                .join("rules.toml")
                .display()
                .to_string(),
            crate::util::root().join("queries").display().to_string(),
        );
        if tls {
            text.push_str(&format!(
                "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
                dir.path().join("server.pem").display().to_string(),
                dir.path().join("server.key").display().to_string(),
            ));
        }
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let (plain, tls) = (config("plain", false), config("tls", true));
    let script = r#"
set -e
ip link set lo up
ip link add v0 type veth peer name v1
ip addr add 10.200.0.1/24 dev v0
ip link set v0 up
ip link set v1 up
if "$BIN" serve --allow-demo-tokens --config "$PLAIN" 2> "$DIR/plain.err"; then
  echo "served without TLS"; exit 1
fi
grep -q "only loopback addresses are allowed without TLS" "$DIR/plain.err"
"$BIN" serve --allow-demo-tokens --config "$TLS" 2> "$DIR/serve.err" &
server=$!
for i in $(seq 1 300); do grep -q "serving gRPC on https://10.200.0.1:50443" "$DIR/serve.err" && break; sleep 0.2; done
"$BIN" upload-list --file "$LIST" --addr https://10.200.0.1:50443 --ca "$DIR/ca.pem"
kill $server
"#;
    let out = std::process::Command::new("unshare")
        .args(["-rn", "sh", "-c", script])
        .env("BIN", env!("CARGO_BIN_EXE_cleanroom"))
        .env("DIR", dir.path())
        .env("PLAIN", &plain)
        .env("TLS", &tls)
        .env(
            "LIST",
            crate::util::sample_dir().join("partner_lists/sakura_foods.csv"),
        )
        .env("CLEANROOM_MASTER_SECRET", "00".repeat(32))
        .env("CLEANROOM_TOKEN", sample::partner_token("sakura_foods"))
        .output()
        .expect("unshare runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.path().join("serve.err")).unwrap_or_default()
    );
    assert!(stdout.contains("list v1:"), "{stdout}");
}
