//! Records of each ingest kind, as the streams bring them: the sample exports' values, their near
//! misses, any text, the ends of every number type.

use proptest::prelude::*;

use super::*;
use crate::ingest::{
    ConsentIngest, ConsentInput, ListIngest, ListInput, ListKeys, MemberInput, MembersIngest,
    PurchaseInput, PurchasesIngest,
};

const MEMBER_IDS: &[&str] = &["M0000001", "M0000002", "M0000003", " M0000001", "", " "];
const EMAILS: &[&str] = &[
    "ishii.ren82@example.ne.jp",
    "tanaka.hiroto673@example.co.jp",
    "manabu_murakami933@EXAMPLE.NE.JP",
    "Taro.Yamada+shop@GMail.com",
    "a@b",
    "@example.jp",
    "",
];
const PHONES: &[&str] = &[
    "090-0614-1726",
    "0309005280",
    "+81 90 1234 5678",
    "12345",
    "",
];
const PREFECTURES: &[&str] = &[
    "東京都",
    "東京",
    "京都",
    " 大阪府 ",
    "北海道",
    "Tokyo",
    "",
    "県",
];
const BIRTH_DATES: &[&str] = &[
    "1982-09-30",
    "2006-11-01",
    "2026-11-02",
    "0000-01-01",
    "+262143-12-31",
    "-262144-01-01",
    "1999-02-29",
    "1982/09/30",
    "",
];
const GENDERS: &[&str] = &["M", "F", "女性", "other", "ｍ", ""];
const TIMES: &[&str] = &[
    "2026-02-02T12:47:15+09:00",
    "2026-02-02T12:47:15Z",
    "2026-02-02 12:47:15+09:00",
    "9999-12-31T23:59:59-23:59",
    "0000-01-01T00:00:00+23:59",
    "2026-02-30T00:00:00Z",
    "2026-02-02T23:59:60Z",
    "2026-02-02",
    "",
];
const CATEGORIES: &[&str] = &["beverages", "dairy", " pet ", "Beverages", "", "unknown"];
const TEXT: &[&str] = &["SCH-118", "Sakura Cha", "Sakura Foods", "", "app", "web"];
const PURPOSES: &[&str] = &["product_insight", " appliance_research", "marketing", ""];
const ACTIONS: &[&str] = &["granted", "withdrawn", " granted ", "GRANTED", ""];
const ATTRIBUTES: &[&str] = &["gold", "silver", " bronze ", "platinum", "unknown", ""];

fn whole() -> impl Strategy<Value = i64> + Clone {
    prop_oneof![-2..6i64, Just(i64::MIN), Just(i64::MAX), any::<i64>()]
}

fn member() -> impl Strategy<Value = MemberInput> + Clone {
    let fields = (
        field(MEMBER_IDS),
        field(EMAILS),
        field(PHONES),
        field(PREFECTURES),
        field(BIRTH_DATES),
        field(GENDERS),
    );
    fields.prop_map(
        |(member_id, email, phone, prefecture, birth_date, gender)| MemberInput {
            member_id,
            email,
            phone,
            prefecture,
            birth_date,
            gender,
        },
    )
}

pub(super) fn purchase() -> impl Strategy<Value = PurchaseInput> + Clone {
    let text = (
        field(MEMBER_IDS),
        field(TIMES),
        field(TEXT),
        field(TEXT),
        field(TEXT),
    );
    (text, field(CATEGORIES), whole(), whole()).prop_map(
        |((member_id, purchased_at, sku, brand, manufacturer), category, quantity, amount)| {
            PurchaseInput {
                member_id,
                purchased_at,
                sku,
                brand,
                manufacturer,
                category,
                quantity,
                amount,
            }
        },
    )
}

fn consent() -> impl Strategy<Value = ConsentInput> + Clone {
    let version = prop_oneof![0..5u32, any::<u32>()];
    let text = (
        field(MEMBER_IDS),
        field(PURPOSES),
        field(ACTIONS),
        field(TIMES),
    );
    (text, version, field(TEXT), field(TIMES)).prop_map(
        |((member_id, purpose, action, at), notice_version, source, expires_at)| ConsentInput {
            member_id,
            purpose,
            notice_version,
            action,
            at,
            source,
            expires_at,
        },
    )
}

/// A customer of a list: raw identifiers, tokens made with the collaboration's key (or another
/// version's, or damaged), or both.
fn customer() -> impl Strategy<Value = ListInput> + Clone {
    let token = prop_oneof![
        2 => field(EMAILS).prop_map(|e| list_key(1).token(&e).to_string()),
        1 => field(EMAILS).prop_map(|e| list_key(2).token(&e).to_string()),
        1 => (field(EMAILS), edits(JUNK, 2))
            .prop_map(|(e, edits)| apply(&list_key(1).token(&e).to_string(), &edits)),
        1 => Just(String::new()),
    ];
    let raw = (field(EMAILS), field(PHONES));
    (raw, token.clone(), token, field(ATTRIBUTES), 0..3u8).prop_map(
        |((email, phone), email_token, phone_token, attribute, form)| {
            let (raw, tokens) = (form != 1, form != 0);
            ListInput {
                email: if raw { email } else { String::new() },
                phone: if raw { phone } else { String::new() },
                email_token: if tokens { email_token } else { String::new() },
                phone_token: if tokens { phone_token } else { String::new() },
                attribute,
            }
        },
    )
}

fn list_key(version: u32) -> cleanroom_core::token::CollaborationKey {
    secret().collaboration_key("ctr-sakura-2026", version, &[1; 32])
}

proptest! {
    #![proptest_config(cleanroom_fuzzing::config(128))]

    #[test]
    fn members_are_kept_or_refused_by_a_fixed_reason(chunks in chunks(member())) {
        let records = chunks.iter().map(Vec::len).sum();
        let (_dir, keys) = key_store();
        let ingest = |strict| MembersIngest::new(&rules(), &secret(), &keys, now(), strict);
        let mut rows = Batches::default();
        let lenient = run(ingest(false).expect("starts"), chunks.clone(), &mut rows)
            .expect("a lenient ingest takes anything");
        check_lenient(&lenient, records, false)?;
        prop_assert_eq!(rows.rows(|t| *t == Table::Members), lenient.accepted);
        let strict = run(ingest(true).expect("starts"), chunks, &mut Batches::default());
        check_strict(strict, &lenient, records)?;
    }

    #[test]
    fn purchases_are_kept_or_refused_by_a_fixed_reason(chunks in chunks(purchase())) {
        let records = chunks.iter().map(Vec::len).sum();
        let ingest = |strict| PurchasesIngest::new(&rules(), &secret(), strict);
        let mut rows = Batches::default();
        let lenient = run(ingest(false), chunks.clone(), &mut rows)
            .expect("a lenient ingest takes anything");
        check_lenient(&lenient, records, true)?;
        prop_assert_eq!(rows.rows(|t| matches!(t, Table::Purchases(_))), lenient.accepted);
        let strict = run(ingest(true), chunks, &mut Batches::default());
        check_strict(strict, &lenient, records)?;
    }

    #[test]
    fn consent_events_are_kept_or_refused_by_a_fixed_reason(chunks in chunks(consent())) {
        let records = chunks.iter().map(Vec::len).sum();
        let ingest = |strict| ConsentIngest::new(&rules(), &secret(), strict);
        let mut rows = Batches::default();
        let lenient = run(ingest(false), chunks.clone(), &mut rows)
            .expect("a lenient ingest takes anything");
        check_lenient(&lenient, records, true)?;
        prop_assert_eq!(rows.rows(|t| *t == Table::Consent), lenient.accepted);
        let strict = run(ingest(true), chunks, &mut Batches::default());
        check_strict(strict, &lenient, records)?;
    }

    #[test]
    fn list_customers_are_kept_or_refused_by_a_fixed_reason(chunks in chunks(customer())) {
        let records = chunks.iter().map(Vec::len).sum();
        let rules = rules();
        let partner = &rules.partners["sakura_foods"];
        let ingest = |strict| ListIngest::new(partner, ListKeys::current("c", list_key(1)), strict);
        let mut rows = Batches::default();
        let lenient = run(ingest(false), chunks.clone(), &mut rows)
            .expect("a lenient ingest takes anything");
        check_lenient(&lenient, records, false)?;
        // A customer counts once, through one row per good identifier.
        let tokens = rows.rows(|t| *t == Table::List);
        prop_assert!((lenient.accepted..=2 * lenient.accepted).contains(&tokens));
        let strict = run(ingest(true), chunks, &mut Batches::default());
        check_strict(strict, &lenient, records)?;
    }
}
