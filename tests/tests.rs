//! The integration tests: one binary, a module per area. Every test that touches the service starts
//! its own server on 127.0.0.1:0 with the bundled sample data and calls it through the public gRPC
//! API, as a partner, an analyst or an attacker would.

// Shared harness: a loaded service, clients, parameter helpers.
mod util;
// Ground truth computed from the raw sample files, independently of the service.
mod truth;

// Normalization and HMAC against the standards' test vectors.
mod vectors;
// Each allowed query's output: golden files, checked against the ground truth.
mod golden;
// The same answers from the checked plans executed on a Ballista cluster on loopback.
mod cluster;
// Consent at query time: withdrawals, old notices, expiry.
mod consent;
// Attacks from docs/threats.md carried out against the running service (4, 8–11, daily budgets).
mod attacks;
// THREATS 1–7 and 13–16 (docs/threats.md) against the accounted guard, with k − 1 known companions.
mod privacy;
// Bad input gets a precise status and leaves nothing half-ingested.
mod bad_input;
// Exports as Arrow columns (from CSV or Parquet) store what their records store.
mod columnar;
// Reflection and health, as a client without our stubs sees them.
mod discovery;
// `cleanroom queries lint` on good and broken allow-lists.
mod lint;
// Legal review (approvals, the review page's API), live rules and `rules validate`.
mod review;
// TLS and mutual TLS on gRPC and the review page.
mod tls;
// The metrics endpoint: series that move with calls, for reviewers only, naming no member.
mod metrics;
// Minted tokens, demo tokens refused by `serve`, limited guesses.
mod credentials;
// Uploads read as they arrive, bounded in bytes and silence; one upload holds up no one else.
mod streams;
// Torn records, lost ledgers: crash safety of the data directory.
mod crash;
// Collaboration keys: a destroyed key stays destroyed, a restored backup does not bring it back.
mod keys;
// `kill -9` of the real binary during ingests, uploads, queries and destructions.
mod kill;
// Retention rules: superseded and old list versions, old purchases, contracts a reload removes.
mod retention;
// Key rotation with an overlap: both versions match during it, the old key is gone after it.
mod rotation;
// Operator faults: a lost or older manifest, refused starts that change nothing, audit ids.
mod operator;
// Writes retried with their request id after a broken connection: stored exactly once.
mod retries;
// Records of receipt (APPI Art. 30) and disclosure to a member (Art. 33(5)).
mod receipts;
// A member's erasure: in no file afterwards, counts that fall by their rows, no consent back.
mod erasure;
