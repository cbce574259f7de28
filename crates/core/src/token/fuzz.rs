//! Fuzzing the token texts a partner sends (`v<version>.<base64url HMAC>`, from `cleanroom prep`)
//! and the exported key `cleanroom prep` reads (`v<version>.<hex>`): any text, and valid texts
//! mutated, parse to a value that prints back to an equal value, or are refused with the one
//! fixed input error, which quotes nothing.

use cleanroom_fuzzing::{Edit, apply, config, edits};
use proptest::prelude::*;

use super::*;

/// Characters and pieces that keep a mutated token near the format.
const POOL: &[&str] = &[
    "v",
    "V",
    ".",
    "..",
    "+",
    "-",
    "_",
    "/",
    "=",
    "0",
    "1",
    "4294967295",
    "4294967296",
    "A",
    "a",
    " ",
    "\t",
    "\n",
    "\u{0}",
    "é",
    "ｖ",
    "v1.",
    "v+1.",
    "v01.",
    "v-1.",
];

fn key() -> CollaborationKey {
    MasterSecret::new(vec![7; 32])
        .expect("32 bytes")
        .collaboration_key("ctr-fuzz", 3, &[5; 32])
}

/// Valid texts to start from: a token and an exported key.
fn valid(seed: u8) -> (String, String) {
    (
        key().token(&format!("member{seed}@example.jp")).to_string(),
        key().export(),
    )
}

fn check_token(text: &str) -> std::result::Result<(), TestCaseError> {
    match text.parse::<Token>() {
        Ok(token) => prop_assert_eq!(token.to_string().parse::<Token>(), Ok(token)),
        Err(Error::Input(message)) => {
            prop_assert_eq!(message, "token must look like v<version>.<base64url HMAC>")
        }
        Err(other) => prop_assert!(false, "not an input error: {other:?}"),
    }
    Ok(())
}

fn check_key(text: &str) -> std::result::Result<(), TestCaseError> {
    match CollaborationKey::from_export(text) {
        Ok(key) => prop_assert_eq!(CollaborationKey::from_export(&key.export()), Ok(key)),
        Err(Error::Input(message)) => prop_assert_eq!(
            message,
            "collaboration key must look like v<version>.<64 hex digits>"
        ),
        Err(other) => prop_assert!(false, "not an input error: {other:?}"),
    }
    Ok(())
}

/// A master secret as the environment or a key file gives it: hex of at least 32 bytes.
fn check_secret(text: &str) -> std::result::Result<(), TestCaseError> {
    match MasterSecret::from_hex(text) {
        Ok(_) => prop_assert!(hex::decode(text.trim()).is_ok_and(|b| b.len() >= 32)),
        Err(Error::Config(message)) => prop_assert!(
            message == "master secret is not valid hex"
                || message.starts_with("master secret must be at least 32 bytes, got "),
            "{message}"
        ),
        Err(other) => prop_assert!(false, "not a config error: {other:?}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn any_text_is_a_token_key_and_secret_or_the_fixed_error(text in "(?s).{0,96}") {
        check_token(&text)?;
        check_key(&text)?;
        check_secret(&text)?;
    }

    #[test]
    fn valid_texts_mutated_parse_to_what_they_print_or_the_fixed_error(
        seed in any::<u8>(),
        edits in edits(POOL, 3),
    ) {
        let (token, exported) = valid(seed);
        check_token(&apply(&token, &edits))?;
        check_key(&apply(&exported, &edits))?;
        check_secret(&apply(&exported[3..], &edits))?;
    }

    #[test]
    fn a_flipped_character_of_a_token_never_parses_as_the_same_token(
        seed in any::<u8>(),
        at in any::<usize>(),
        with in select_char(),
    ) {
        let (token, _) = valid(seed);
        let original: Token = token.parse().expect("valid");
        // One character replaced, none added: a token's surrounding space is trimmed on purpose.
        let edit = Edit::Splice { at: at % token.len(), len: 1, text: with.to_string() };
        let flipped = apply(&token, &[edit]);
        if flipped != token && let Ok(parsed) = flipped.parse::<Token>() {
            prop_assert_ne!(parsed, original, "{} and {} parse alike", flipped, token);
        }
    }
}

/// A character of the token alphabet, or one outside it.
fn select_char() -> impl Strategy<Value = char> {
    prop_oneof![
        proptest::char::ranges(vec!['a'..='z', 'A'..='Z', '0'..='9'].into()),
        Just('-'),
        Just('_'),
        any::<char>(),
    ]
}
