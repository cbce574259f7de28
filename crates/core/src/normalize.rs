//! Normalization of emails and phone numbers before they are keyed, following the UID2 rules for
//! emails and E.164 for phones, with Japanese input (full-width forms, domestic numbers) folded in.
//!
//! A rejected identifier is never hashed: a keyed hash of garbage would only create false matches.
//! Rejection reasons are fixed strings that never echo the input, so they can be logged and counted.

use unicode_normalization::UnicodeNormalization;

/// Why an identifier was rejected. The text is stable and contains no part of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rejection(pub &'static str);

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// NFKC of `raw`, borrowed when it is ASCII: every ASCII string is already in NFKC, and most
/// e-mails and phone numbers of an export are ASCII, so they skip the Unicode tables.
fn nfkc(raw: &str) -> std::borrow::Cow<'_, str> {
    if raw.is_ascii() {
        std::borrow::Cow::Borrowed(raw)
    } else {
        std::borrow::Cow::Owned(raw.nfkc().collect())
    }
}

/// Normalizes an email address: NFKC, trim, ASCII lowercase, and for gmail.com only, remove the
/// dots of the local part and drop everything from the first `+`.
pub fn email(raw: &str) -> Result<String, Rejection> {
    let mut normalized = String::new();
    email_into(raw, &mut normalized)?;
    Ok(normalized)
}

/// [`email`] into `out` (cleared first), so an ingest that normalizes millions of addresses
/// reuses one buffer instead of allocating one per address. On a rejection `out` holds nothing
/// meaningful.
pub fn email_into(raw: &str, out: &mut String) -> Result<(), Rejection> {
    out.clear();
    if raw.is_ascii() {
        // Most e-mails of an export: one pass over the bytes instead of several over the text.
        return email_ascii(raw.as_bytes(), out);
    }
    // Lowering ASCII letters and dropping gmail's dots can bring a combining mark next to a
    // letter it composes with (`taro.\u{301}y` becomes `taro\u{301}y`): folded once more, the
    // result is its own normal form, so both spellings of one address give one token.
    let normalized = email_reference(&nfkc(raw))?;
    out.push_str(&nfkc(&normalized));
    Ok(())
}

/// Whitespace as `char::is_whitespace` sees it, among ASCII bytes.
fn ascii_space(b: &u8) -> bool {
    matches!(b, b'\t'..=b'\r' | b' ')
}

/// [`email`] for ASCII input: the same checks in the same order, so the same result and the
/// same rejection (a property test holds it to [`email_reference`]), written into `out`.
fn email_ascii(raw: &[u8], out: &mut String) -> Result<(), Rejection> {
    let Some(start) = raw.iter().position(|b| !ascii_space(b)) else {
        return Err(Rejection("email: empty"));
    };
    let end = raw
        .iter()
        .rposition(|b| !ascii_space(b))
        .map_or(start, |e| e + 1);
    let trimmed = &raw[start..end];
    if trimmed.iter().any(ascii_space) {
        return Err(Rejection("email: contains whitespace"));
    }
    let Some(at) = trimmed.iter().position(|b| *b == b'@') else {
        return Err(Rejection("email: no @"));
    };
    let (local, domain) = (&trimmed[..at], &trimmed[at + 1..]);
    if domain.contains(&b'@') {
        return Err(Rejection("email: more than one @"));
    }
    if local.is_empty() {
        return Err(Rejection("email: empty local part"));
    }
    if domain.is_empty()
        || !domain.contains(&b'.')
        || domain.starts_with(b".")
        || domain.ends_with(b".")
    {
        return Err(Rejection("email: invalid domain"));
    }
    if domain.eq_ignore_ascii_case(b"gmail.com") {
        let lower = |b: &u8| char::from(b.to_ascii_lowercase());
        let without_tag = local.split(|b| *b == b'+').next().unwrap_or_default();
        out.extend(without_tag.iter().filter(|b| **b != b'.').map(lower));
        if out.is_empty() {
            return Err(Rejection("email: empty local part"));
        }
        out.push('@');
        out.extend(domain.iter().map(lower));
        return Ok(());
    }
    // One copy, lowered in place (the input is ASCII, so it is UTF-8 as it is).
    out.push_str(std::str::from_utf8(trimmed).expect("ASCII is UTF-8"));
    out.make_ascii_lowercase();
    Ok(())
}

/// [`email`] on any text, already in NFKC: the rules as written.
fn email_reference(folded: &str) -> Result<String, Rejection> {
    let trimmed = folded.trim();
    if trimmed.is_empty() {
        return Err(Rejection("email: empty"));
    }
    if trimmed.chars().any(char::is_whitespace) {
        return Err(Rejection("email: contains whitespace"));
    }
    let lower = trimmed.to_ascii_lowercase();
    let mut parts = lower.split('@');
    let (Some(local), Some(domain)) = (parts.next(), parts.next()) else {
        return Err(Rejection("email: no @"));
    };
    if parts.next().is_some() {
        return Err(Rejection("email: more than one @"));
    }
    if local.is_empty() {
        return Err(Rejection("email: empty local part"));
    }
    if domain.is_empty()
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
    {
        return Err(Rejection("email: invalid domain"));
    }
    if domain == "gmail.com" {
        let without_tag = local.split('+').next().unwrap_or_default();
        let canonical: String = without_tag.chars().filter(|c| *c != '.').collect();
        if canonical.is_empty() {
            return Err(Rejection("email: empty local part"));
        }
        return Ok(format!("{canonical}@{domain}"));
    }
    // Exactly one `@` between two non-empty parts: `lower` is already `local@domain`.
    Ok(lower)
}

/// Characters accepted as separators inside a phone number. NFKC keeps the katakana long mark
/// (U+30FC) and some dashes, which Japanese forms often use between digit groups.
fn is_phone_separator(c: char) -> bool {
    matches!(
        c,
        ' ' | '-' | '(' | ')' | '.' | '\u{30FC}' | '\u{2010}'..='\u{2015}' | '\u{2212}'
    )
}

/// Shortest and longest E.164 numbers, in digits after the `+`.
const E164_MIN_DIGITS: usize = 8;
const E164_MAX_DIGITS: usize = 15;

/// Normalizes a phone number to E.164. A Japanese domestic number (leading 0) becomes `+81`
/// followed by the rest of its digits.
pub fn phone(raw: &str) -> Result<String, Rejection> {
    let folded = nfkc(raw);
    let trimmed = folded.trim();
    if trimmed.is_empty() {
        return Err(Rejection("phone: empty"));
    }
    let (international, body) = match trimmed.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, trimmed),
    };
    let mut digits = String::with_capacity(body.len());
    for c in body.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else if !is_phone_separator(c) {
            return Err(
                if digits.is_empty() && !body.chars().any(|c| c.is_ascii_digit()) {
                    Rejection("phone: no digits")
                } else {
                    Rejection("phone: invalid character")
                },
            );
        }
    }
    if digits.is_empty() {
        return Err(Rejection("phone: no digits"));
    }
    let e164_digits = if international {
        digits
    } else if let Some(domestic) = digits.strip_prefix('0') {
        // Japanese domestic numbers are 10 or 11 digits with the trunk prefix 0.
        if !(9..=10).contains(&domestic.len()) {
            return Err(Rejection(if domestic.len() < 9 {
                "phone: too short"
            } else {
                "phone: too long"
            }));
        }
        format!("81{domestic}")
    } else if digits.len() < E164_MIN_DIGITS {
        return Err(Rejection("phone: too short"));
    } else {
        return Err(Rejection("phone: no country code"));
    };
    if e164_digits.len() < E164_MIN_DIGITS {
        return Err(Rejection("phone: too short"));
    }
    if e164_digits.len() > E164_MAX_DIGITS {
        return Err(Rejection("phone: too long"));
    }
    if e164_digits.starts_with('0') {
        return Err(Rejection("phone: invalid country code"));
    }
    Ok(format!("+{e164_digits}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejections_never_echo_input() {
        let secret = "secret-local-part";
        let err = email(&format!("{secret}@@example.com")).unwrap_err();
        assert!(!err.0.contains(secret));
    }

    #[test]
    fn ascii_emails_take_the_fast_path_to_the_same_result() {
        for raw in [
            " Taro.Yamada+shop@GMail.com ",
            "a@b.c",
            "+@gmail.com",
            "..@gmail.com",
            "a@@b.c",
            "a b@c.d",
            "\x0b",
            "x@.jp",
            "x@jp.",
            "@x.jp",
            "x\x0b@y.jp",
        ] {
            assert_eq!(
                email_ascii_owned(raw.as_bytes()),
                email_reference(raw),
                "{raw:?}"
            );
        }
    }

    /// Found by the normalization fuzzer: the result was not its own normal form when dropping
    /// gmail's dots (or lowering an ASCII letter) left a combining mark that composes.
    #[test]
    fn a_combining_mark_brought_next_to_a_letter_is_composed() {
        let composed = "taróyamada@gmail.com";
        assert_eq!(
            email("Taro.\u{301}Yamada+shop@GMail.com").as_deref(),
            Ok(composed)
        );
        assert_eq!(email(composed).as_deref(), Ok(composed));
        assert_eq!(
            email("J\u{30c}@example.jp").as_deref(),
            Ok("\u{1f0}@example.jp")
        );
    }

    /// The fast path into a fresh buffer, as the reference returns it.
    pub(super) fn email_ascii_owned(raw: &[u8]) -> Result<String, Rejection> {
        let mut out = String::new();
        email_ascii(raw, &mut out).map(|()| out)
    }

    proptest! {
        #[test]
        fn a_reused_buffer_gives_what_a_fresh_one_gives(
            addresses in proptest::collection::vec("\\PC{0,30}|[a-zA-Z.+]{1,9}@(gmail|example)[.](com|jp)", 1..8)
        ) {
            // What a rejection leaves in the buffer, or a longer address before a shorter one,
            // must never reach the next address's result.
            let mut buffer = String::from("left over from an earlier address");
            for raw in &addresses {
                let into = email_into(raw, &mut buffer).map(|()| buffer.clone());
                prop_assert_eq!(into, email(raw));
            }
        }

        #[test]
        fn the_ascii_fast_path_agrees_with_the_rules_as_written(
            s in "[ \t\x0b\x0c\r\naAzZ09@.+_-]{0,24}(@(gmail|GMAIL|example)?[.]?(com|jp)?[.]?)?"
        ) {
            prop_assert_eq!(email_ascii_owned(s.as_bytes()), email_reference(&s));
        }

        #[test]
        fn email_normalization_is_idempotent(s in "\\PC{0,40}") {
            if let Ok(once) = email(&s) {
                prop_assert_eq!(email(&once), Ok(once.clone()));
            }
        }

        #[test]
        fn phone_normalization_is_idempotent_and_e164(s in "[+]?[0-9０-９ー() -]{0,20}") {
            if let Ok(once) = phone(&s) {
                prop_assert!(once.starts_with('+'));
                prop_assert!(once[1..].chars().all(|c| c.is_ascii_digit()));
                prop_assert_eq!(phone(&once), Ok(once.clone()));
            }
        }
    }
}

#[cfg(test)]
mod fuzz;
