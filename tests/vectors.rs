//! Normalization and HMAC against every row of the standards' test vectors, copied byte for byte
//! into tests/data/vectors so the tests stand alone on any clone.

use base64::Engine as _;
use cleanroom_core::normalize;
use cleanroom_core::token::hmac_sha256;
use sha2::{Digest, Sha256};

use crate::util::{read, root};

fn rows(name: &str) -> Vec<Vec<String>> {
    read(&root().join("tests/data/vectors").join(name))
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

#[test]
fn normalization_follows_every_vector() {
    let cases = rows("normalization.tsv");
    assert!(cases.len() >= 20, "the vector file should have its cases");
    for case in cases {
        let (kind, input, expected) = (&case[0], &case[1], &case[2]);
        let got = match kind.as_str() {
            "email" => normalize::email(input),
            "phone" => normalize::phone(input),
            other => panic!("unknown kind {other}"),
        };
        if expected == "!" {
            let reason = got.expect_err(&format!("{kind} {input:?} must be rejected"));
            assert!(
                reason.0.starts_with(kind.as_str()),
                "reason names the field: {reason}"
            );
        } else {
            assert_eq!(got.as_deref(), Ok(expected.as_str()), "{kind} {input:?}");
        }
    }
}

#[test]
fn normalized_bytes_match_the_uid2_sha256_vectors() {
    for case in rows("sha256_uid2.tsv") {
        let (normalized, expected) = (&case[0], &case[1]);
        let digest =
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(normalized.as_bytes()));
        assert_eq!(&digest, expected, "{normalized}");
        // The published normalized form is a fixed point of our normalizer.
        let again = if normalized.starts_with('+') {
            normalize::phone(normalized)
        } else {
            normalize::email(normalized)
        };
        assert_eq!(again.as_deref(), Ok(normalized.as_str()));
    }
}

#[test]
fn hmac_follows_rfc_4231() {
    let cases = rows("hmac_sha256_rfc4231.tsv");
    assert_eq!(cases.len(), 2);
    for case in cases {
        let key = hex::decode(&case[1]).unwrap();
        let data = hex::decode(&case[2]).unwrap();
        assert_eq!(
            hex::encode(hmac_sha256(&key, &data)),
            case[3],
            "RFC 4231 case {}",
            case[0]
        );
    }
}
