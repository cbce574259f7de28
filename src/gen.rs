//! Generator of fictional retailer and partner data: the sample_data/ files, at any scale.
//!
//! Nothing here describes a real person. Names are random pairings of common names, e-mail
//! addresses use only the reserved `example.*` domains, and phone numbers sit in ranges Japan
//! never assigns (a subscriber number starting with 0). Identifiers are kept canonical
//! (lowercase ASCII e-mail, national digits) and only made messy when written, so a member and
//! the same person on a partner's list always normalise to one identity.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::{Datelike, Months, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What to generate and where; the same options always produce the same bytes.
pub struct GenOptions {
    /// Seed for every random choice.
    pub seed: u64,
    /// Number of random retailer members (the attack target comes on top).
    pub members: usize,
    /// Reference day: ages are taken on it, and all purchases and consent events precede it.
    pub as_of: NaiveDate,
    /// Receives the CSV files and a `partner_lists/` directory.
    pub out_dir: PathBuf,
}

/// Row counts of what was written, for the caller to print.
pub struct GenReport {
    /// Rows in `members.csv`.
    pub members: usize,
    /// Rows in `purchases.csv`.
    pub purchases: usize,
    /// Rows in `consent_events.csv`.
    pub consent_events: usize,
    /// Rows per partner list, keyed by partner (the file stem under `partner_lists/`).
    pub list_records: Vec<(String, usize)>,
}

/// Kanji, katakana reading, romaji: kept together so a name, its kana and its e-mail agree.
type Name = (&'static str, &'static str, &'static str);

#[rustfmt::skip]
const SURNAMES: [Name; 40] = [
    ("佐藤", "サトウ", "sato"), ("鈴木", "スズキ", "suzuki"), ("高橋", "タカハシ", "takahashi"),
    ("田中", "タナカ", "tanaka"), ("伊藤", "イトウ", "ito"), ("渡辺", "ワタナベ", "watanabe"),
    ("山本", "ヤマモト", "yamamoto"), ("中村", "ナカムラ", "nakamura"), ("小林", "コバヤシ", "kobayashi"),
    ("加藤", "カトウ", "kato"), ("吉田", "ヨシダ", "yoshida"), ("山田", "ヤマダ", "yamada"),
    ("佐々木", "ササキ", "sasaki"), ("山口", "ヤマグチ", "yamaguchi"), ("松本", "マツモト", "matsumoto"),
    ("井上", "イノウエ", "inoue"), ("木村", "キムラ", "kimura"), ("林", "ハヤシ", "hayashi"),
    ("斎藤", "サイトウ", "saito"), ("清水", "シミズ", "shimizu"), ("山崎", "ヤマザキ", "yamazaki"),
    ("森", "モリ", "mori"), ("池田", "イケダ", "ikeda"), ("橋本", "ハシモト", "hashimoto"),
    ("阿部", "アベ", "abe"), ("石川", "イシカワ", "ishikawa"), ("山下", "ヤマシタ", "yamashita"),
    ("中島", "ナカジマ", "nakajima"), ("石井", "イシイ", "ishii"), ("小川", "オガワ", "ogawa"),
    ("前田", "マエダ", "maeda"), ("岡田", "オカダ", "okada"), ("長谷川", "ハセガワ", "hasegawa"),
    ("藤田", "フジタ", "fujita"), ("後藤", "ゴトウ", "goto"), ("近藤", "コンドウ", "kondo"),
    ("村上", "ムラカミ", "murakami"), ("遠藤", "エンドウ", "endo"), ("青木", "アオキ", "aoki"),
    ("坂本", "サカモト", "sakamoto"),
];

#[rustfmt::skip]
const FEMALE_NAMES: [Name; 20] = [
    ("陽子", "ヨウコ", "yoko"), ("恵子", "ケイコ", "keiko"), ("美穂", "ミホ", "miho"), ("由美", "ユミ", "yumi"),
    ("直美", "ナオミ", "naomi"), ("裕子", "ユウコ", "yuko"), ("真由美", "マユミ", "mayumi"),
    ("智子", "トモコ", "tomoko"), ("久美子", "クミコ", "kumiko"), ("愛", "アイ", "ai"), ("彩", "アヤ", "aya"),
    ("美咲", "ミサキ", "misaki"), ("さくら", "サクラ", "sakura"), ("結衣", "ユイ", "yui"), ("陽菜", "ヒナ", "hina"),
    ("葵", "アオイ", "aoi"), ("花子", "ハナコ", "hanako"), ("明美", "アケミ", "akemi"), ("麻衣", "マイ", "mai"),
    ("千尋", "チヒロ", "chihiro"),
];

#[rustfmt::skip]
const MALE_NAMES: [Name; 20] = [
    ("太郎", "タロウ", "taro"), ("一郎", "イチロウ", "ichiro"), ("健太", "ケンタ", "kenta"),
    ("翔太", "ショウタ", "shota"), ("大輔", "ダイスケ", "daisuke"), ("拓也", "タクヤ", "takuya"),
    ("直樹", "ナオキ", "naoki"), ("誠", "マコト", "makoto"), ("浩", "ヒロシ", "hiroshi"),
    ("隆", "タカシ", "takashi"), ("健一", "ケンイチ", "kenichi"), ("和也", "カズヤ", "kazuya"),
    ("蓮", "レン", "ren"), ("大翔", "ヒロト", "hiroto"), ("悠真", "ユウマ", "yuma"), ("亮", "リョウ", "ryo"),
    ("学", "マナブ", "manabu"), ("修", "オサム", "osamu"), ("剛", "ツヨシ", "tsuyoshi"),
    ("翼", "ツバサ", "tsubasa"),
];

/// Weights are populations in units of 10,000 (2020 census, rounded), so members cluster the
/// way real customers do and small prefectures still appear.
#[rustfmt::skip]
const PREFECTURES: [(&str, u32); 47] = [
    ("北海道", 522), ("青森県", 124), ("岩手県", 121), ("宮城県", 230), ("秋田県", 96), ("山形県", 107),
    ("福島県", 183), ("茨城県", 287), ("栃木県", 193), ("群馬県", 194), ("埼玉県", 734), ("千葉県", 628),
    ("東京都", 1404), ("神奈川県", 923), ("新潟県", 220), ("富山県", 103), ("石川県", 113), ("福井県", 77),
    ("山梨県", 81), ("長野県", 205), ("岐阜県", 198), ("静岡県", 363), ("愛知県", 754), ("三重県", 177),
    ("滋賀県", 141), ("京都府", 258), ("大阪府", 884), ("兵庫県", 547), ("奈良県", 133), ("和歌山県", 92),
    ("鳥取県", 55), ("島根県", 67), ("岡山県", 189), ("広島県", 280), ("山口県", 134), ("徳島県", 72),
    ("香川県", 95), ("愛媛県", 133), ("高知県", 69), ("福岡県", 514), ("佐賀県", 81), ("長崎県", 131),
    ("熊本県", 174), ("大分県", 112), ("宮崎県", 107), ("鹿児島県", 159), ("沖縄県", 147),
];

/// Generic ward and town names found all over Japan, so no address points at a real place.
#[rustfmt::skip]
const CITIES: [&str; 8] = ["中央区", "北区", "南区", "東区", "西区", "緑区", "青葉市", "桜台市"];
#[rustfmt::skip]
const TOWNS: [&str; 8] = ["本町", "栄町", "緑町", "旭町", "幸町", "新町", "宮前", "若松町"];

/// Only domains reserved for documentation (RFC 2606 and JPRS), never a real mailbox.
#[rustfmt::skip]
const EMAIL_DOMAINS: [(&str, u32); 5] = [
    ("example.jp", 30), ("example.com", 25), ("example.co.jp", 20), ("example.ne.jp", 15),
    ("example.or.jp", 10),
];

/// Mobile prefixes and two big-city area codes; the subscriber part always starts with 0.
#[rustfmt::skip]
const PHONE_PREFIXES: [(&str, u32); 5] =
    [("090", 45), ("080", 30), ("070", 10), ("03", 9), ("06", 6)];

/// Name, share of an average member's basket, unit price range in yen.
#[rustfmt::skip]
const CATEGORIES: [(&str, u32, (u32, u32)); 8] = [
    ("beverages", 240, (98, 398)), ("snacks", 180, (98, 398)), ("instant_food", 110, (120, 300)),
    ("dairy", 140, (150, 350)), ("household", 140, (200, 900)), ("cosmetics", 90, (800, 4800)),
    ("small_appliances", 22, (3980, 29800)), ("pet", 60, (300, 2500)),
];

/// Manufacturer, brand, SKU prefix, category.
#[rustfmt::skip]
const BRANDS: [(&str, &str, &str, &str); 13] = [
    ("Sakura Foods", "Sakura Cha", "SCH", "beverages"),
    ("Sakura Foods", "Sakura Senbei", "SSB", "snacks"),
    ("Sakura Foods", "Sakura Ramen", "SRM", "instant_food"),
    ("Kumo Denki", "Kumo Air", "KAR", "small_appliances"),
    ("Kumo Denki", "Kumo Kitchen", "KKT", "small_appliances"),
    ("Kumo Denki", "Kumo Clean", "KCL", "household"),
    ("Fuji Dairy", "Fuji Milk", "FML", "dairy"),
    ("Fuji Dairy", "Fuji Yogurt", "FYG", "dairy"),
    ("Hoshi Cosmetics", "Hoshi Skin", "HSK", "cosmetics"),
    ("Nami Household", "Nami Wash", "NWS", "household"),
    ("Yama Pet", "Yama Paw", "YPW", "pet"),
    ("Tori Beverages", "Tori Soda", "TSD", "beverages"),
    ("Kaze Snacks", "Kaze Chips", "KCH", "snacks"),
];

/// Consent purposes in file order: (purpose, current notice version, older versions).
const PURPOSES: [(&str, u32, &[u32]); 2] = [
    ("appliance_research", 2, &[1]),
    ("product_insight", 3, &[1, 2]),
];

const SOURCES: [(&str, u32); 3] = [("app", 45), ("web", 35), ("store", 20)];

/// Japan keeps no daylight saving, so a fixed +09:00 is exact for every local timestamp.
const JST: &str = "%Y-%m-%dT%H:%M:%S+09:00";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Lower,
    Title,
    Upper,
    UpperDomain,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum EmailStyle {
    Plain,
    Mixed,
    FullWidth,
    Padded,
    Empty,
    Invalid,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PhoneStyle {
    Hyphen,
    Bare,
    FullWidth,
    LongMark,
    International,
    Brackets,
    Empty,
    Invalid,
}

/// How people type into the retailer's sign-up forms, per mille.
#[rustfmt::skip]
const MEMBER_EMAIL: [(EmailStyle, u32); 6] = [
    (EmailStyle::Plain, 745), (EmailStyle::Mixed, 100), (EmailStyle::FullWidth, 40),
    (EmailStyle::Padded, 30), (EmailStyle::Empty, 80), (EmailStyle::Invalid, 5),
];
#[rustfmt::skip]
const MEMBER_PHONE: [(PhoneStyle, u32); 8] = [
    (PhoneStyle::Hyphen, 545), (PhoneStyle::Bare, 150), (PhoneStyle::FullWidth, 80),
    (PhoneStyle::LongMark, 40), (PhoneStyle::International, 50), (PhoneStyle::Brackets, 50),
    (PhoneStyle::Empty, 80), (PhoneStyle::Invalid, 5),
];
/// Partners run their own systems, hence their own habits; their bad rows are added separately.
#[rustfmt::skip]
const PARTNER_PHONE: [(PhoneStyle, u32); 6] = [
    (PhoneStyle::Hyphen, 40), (PhoneStyle::Bare, 25), (PhoneStyle::International, 20),
    (PhoneStyle::FullWidth, 8), (PhoneStyle::Brackets, 4), (PhoneStyle::LongMark, 3),
];
#[rustfmt::skip]
const PARTNER_CASE: [(Case, u32); 4] =
    [(Case::Lower, 55), (Case::Title, 10), (Case::Upper, 15), (Case::UpperDomain, 20)];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Story {
    Current,
    Withdrawn,
    OldNotice,
    Expired,
    Regranted,
    Silent,
}

#[rustfmt::skip]
const STORIES: [(Story, u32); 6] = [
    (Story::Current, 60), (Story::Withdrawn, 10), (Story::OldNotice, 8), (Story::Expired, 5),
    (Story::Regranted, 5), (Story::Silent, 12),
];

/// A member as the later files need them. Identifiers are canonical and kept only when the
/// member file shows them usably, since a partner can hold no more than the member gave out.
struct Member {
    id: String,
    age: u32,
    gender: &'static str,
    email: Option<String>,
    phone: Option<String>,
}

/// What a member bought, as far as the partners' lists depend on it.
#[derive(Clone, Copy, Default)]
struct Basket {
    kumo_air: bool,
    kumo_kitchen: bool,
    kumo_any: bool,
    sakura_lines: u32,
}

/// Generates every sample file under `opts.out_dir`, replacing any earlier run.
pub fn generate(opts: &GenOptions) -> Result<GenReport> {
    let (dir, seed) = (opts.out_dir.as_path(), opts.seed);
    let lists_dir = dir.join("partner_lists");
    fs::create_dir_all(&lists_dir).with_context(|| format!("creating {}", lists_dir.display()))?;
    // One registry for members and partners' outsiders keeps their identifiers disjoint.
    let mut ids = Identities::default();
    let members = write_members(dir, &mut stream(seed, 1), opts, &mut ids)?;
    let (purchases, baskets) = write_purchases(dir, &mut stream(seed, 2), opts.as_of, &members)?;
    let consent_events = write_consents(dir, &mut stream(seed, 3), opts.as_of, &members)?;
    let (target_purchases, target_consents) = append_target(dir, opts.as_of, members.len())?;
    let (purchases, consent_events) = (
        purchases + target_purchases,
        consent_events + target_consents,
    );
    let partners = [
        PartnerSpec {
            name: "sakura_foods",
            member_share: 0.55,
            buyer_lift: 1.5,
            outsider_share: 0.20,
            is_buyer: |b| b.sakura_lines > 0,
            attribute: loyalty_tier,
        },
        PartnerSpec {
            name: "kumo_denki",
            member_share: 0.35,
            buyer_lift: 2.0,
            outsider_share: 0.15,
            is_buyer: |b| b.kumo_any,
            attribute: owned_model,
        },
    ];
    let mut list_records = Vec::new();
    for (n, spec) in (4..).zip(&partners) {
        let rng = &mut stream(seed, n);
        let rows = write_partner_list(&lists_dir, rng, &members, &baskets, &mut ids, spec)?;
        list_records.push((spec.name.to_string(), rows));
    }
    let members = members.len() + 1;
    Ok(GenReport {
        members,
        purchases,
        consent_events,
        list_records,
    })
}

/// The sample's attack target, `TARGET_ID` after `n` random members: a fictional member whom the
/// attack tests (THREATS 1–7) try to learn about. She consented to both purposes at the current
/// notice, lives in a small prefecture (鳥取県), bought pet food exactly once (144 days before the
/// export, in the week of 2026-06-08 for the bundled sample) and Sakura Senbei once (46 days
/// before), and is on no partner's list, so every attack starts from a partner that knows her
/// e-mail and wants one fact about her.
fn append_target(dir: &Path, as_of: NaiveDate, n: usize) -> Result<(usize, usize)> {
    let id = format!("M{:07}", n + 1);
    append_rows(dir, "members.csv", target_member_rows(&id, as_of))?;
    let purchases = append_rows(dir, "purchases.csv", target_purchase_rows(&id, as_of))?;
    let consents = append_rows(dir, "consent_events.csv", target_consent_rows(&id, as_of))?;
    Ok((purchases, consents))
}

/// A JST timestamp `days_before` days before `as_of`, at `time`.
fn day_at(as_of: NaiveDate, days_before: u64, time: &str) -> String {
    let date = as_of - chrono::Days::new(days_before);
    format!("{date}T{time}+09:00")
}

fn row(fields: &[&str]) -> Vec<String> {
    fields.iter().map(|f| f.to_string()).collect()
}

/// Appends `rows` to the existing `file` under `dir`, without a header; returns how many.
fn append_rows(dir: &Path, file: &str, rows: Vec<Vec<String>>) -> Result<usize> {
    let path = dir.join(file);
    let handle = fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .with_context(|| format!("appending to {}", path.display()))?;
    let mut writer = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(handle);
    let count = rows.len();
    for row in rows {
        writer.write_record(row)?;
    }
    writer.flush()?;
    Ok(count)
}

fn target_member_rows(id: &str, as_of: NaiveDate) -> Vec<Vec<String>> {
    let birth = as_of - chrono::Months::new(12 * 36 + 5);
    vec![row(&[
        id,
        "的場　花子",
        "マトバ　ハナコ",
        "Hanako.Matoba@example.jp",
        "090-0777-1234",
        "680-0000",
        "鳥取県",
        "鳥取県鳥取市栄町1-2-3",
        &birth.to_string(),
        "F",
    ])]
}

fn target_purchase_rows(id: &str, as_of: NaiveDate) -> Vec<Vec<String>> {
    vec![
        row(&[
            id,
            &day_at(as_of, 144, "19:20:00"),
            "YPW-170",
            "Yama Paw",
            "Yama Pet",
            "pet",
            "1",
            "2480",
        ]),
        row(&[
            id,
            &day_at(as_of, 46, "12:05:00"),
            "SSB-101",
            "Sakura Senbei",
            "Sakura Foods",
            "snacks",
            "1",
            "398",
        ]),
    ]
}

fn target_consent_rows(id: &str, as_of: NaiveDate) -> Vec<Vec<String>> {
    let granted = day_at(as_of, 200, "09:00:00");
    vec![
        row(&[id, "product_insight", "3", "granted", &granted, "app", ""]),
        row(&[
            id,
            "appliance_research",
            "2",
            "granted",
            &granted,
            "app",
            "",
        ]),
    ]
}

/// A separate ChaCha stream per file, so changing how one file is drawn does not shift the
/// random sequence of the others.
fn stream(seed: u64, n: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(n);
    rng
}

/// Integer weights keep every draw exact and identical across platforms.
fn pick<T: Copy>(rng: &mut impl Rng, table: &[(T, u32)]) -> T {
    let total: u32 = table.iter().map(|&(_, w)| w).sum();
    let mut x = rng.random_range(0..total.max(1));
    for &(item, w) in table {
        if x < w {
            return item;
        }
        x -= w;
    }
    table[table.len() - 1].0
}

fn one_of<T: Copy>(rng: &mut impl Rng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

fn jst(t: NaiveDateTime) -> String {
    t.format(JST).to_string()
}

/// Hands out canonical identifiers never used before, so no two people share an e-mail or a
/// phone and a match between files is always the same person.
#[derive(Default)]
struct Identities {
    emails: HashSet<String>,
    phones: HashSet<String>,
}

impl Identities {
    fn email(&mut self, rng: &mut impl Rng, given: &str, surname: &str, year: i32) -> String {
        for attempt in 0.. {
            let digits = match rng.random_range(0..3) {
                0 => format!("{:02}", year % 100),
                1 => rng.random_range(1..1000).to_string(),
                _ => String::new(),
            };
            let mut local = match rng.random_range(0..4) {
                0 => format!("{given}.{surname}{digits}"),
                1 => format!("{surname}.{given}{digits}"),
                2 => format!("{}{surname}{digits}", &given[..1]),
                _ => format!("{given}_{surname}{digits}"),
            };
            // Popular names run out of short forms at scale; a counter guarantees progress.
            if attempt > 8 {
                local.push_str(&self.emails.len().to_string());
            }
            let email = format!("{local}@{}", pick(rng, &EMAIL_DOMAINS));
            if self.emails.insert(email.clone()) {
                return email;
            }
        }
        unreachable!("the attempt counter is unbounded")
    }

    fn phone(&mut self, rng: &mut impl Rng) -> String {
        loop {
            let prefix = pick(rng, &PHONE_PREFIXES);
            let (mid, last) = (rng.random_range(0..1000), rng.random_range(0..10000));
            let phone = format!("{prefix}0{mid:03}{last:04}");
            if self.phones.insert(phone.clone()) {
                return phone;
            }
        }
    }
}

fn full_width(s: &str) -> String {
    let wide = |c: char| char::from_u32(c as u32 + 0xFEE0).unwrap_or(c);
    s.chars()
        .map(|c| if c.is_ascii_graphic() { wide(c) } else { c })
        .collect()
}

fn title_case(s: &str) -> String {
    let mut prev = '.';
    let upper_after_non_letter = |c: char| {
        let up = !prev.is_ascii_alphabetic();
        prev = c;
        if up { c.to_ascii_uppercase() } else { c }
    };
    s.chars().map(upper_after_non_letter).collect()
}

/// Recases the way people and legacy systems do, e.g. `Taro.Yamada82@Example.CO.JP`.
fn recase(email: &str, case: Case) -> String {
    let (local, domain) = email.split_once('@').unwrap_or((email, ""));
    let (host, suffix) = domain.split_once('.').unwrap_or((domain, ""));
    match case {
        Case::Lower => email.to_string(),
        Case::Upper => email.to_ascii_uppercase(),
        Case::UpperDomain => format!("{local}@{}", domain.to_ascii_uppercase()),
        Case::Title => {
            let suffix = suffix.to_ascii_uppercase();
            format!("{}@{}.{suffix}", title_case(local), title_case(host))
        }
    }
}

fn pad(rng: &mut impl Rng, s: &str) -> String {
    one_of(rng, &[" ", "", "  "]).to_string() + s + one_of(rng, &[" ", "  "])
}

fn invalid_email(rng: &mut impl Rng, email: &str) -> String {
    email.replacen('@', one_of(rng, &[".", "@@"]), 1)
}

fn invalid_phone(rng: &mut impl Rng) -> String {
    one_of(rng, &["12345", "12345", "TEL"]).to_string()
}

fn member_email(rng: &mut impl Rng, email: &str, style: EmailStyle) -> String {
    match style {
        EmailStyle::Plain => email.to_string(),
        EmailStyle::Mixed => recase(email, one_of(rng, &[Case::Title, Case::Title, Case::Upper])),
        EmailStyle::FullWidth => full_width(email),
        EmailStyle::Padded => pad(rng, email),
        EmailStyle::Empty => String::new(),
        EmailStyle::Invalid => invalid_email(rng, email),
    }
}

fn partner_email(rng: &mut impl Rng, email: &str) -> String {
    let mut shown = recase(email, pick(rng, &PARTNER_CASE));
    if rng.random_bool(0.08) {
        shown = full_width(&shown);
    }
    if rng.random_bool(0.05) {
        shown = pad(rng, &shown);
    }
    shown
}

/// `digits` is a national number: a 3-digit mobile or 2-digit area code, then 4 + 4 digits.
fn render_phone(rng: &mut impl Rng, digits: &str, style: PhoneStyle) -> String {
    let n = digits.len();
    let (area, mid, last) = (&digits[..n - 8], &digits[n - 8..n - 4], &digits[n - 4..]);
    match style {
        PhoneStyle::Hyphen => format!("{area}-{mid}-{last}"),
        PhoneStyle::Bare => digits.to_string(),
        PhoneStyle::FullWidth => full_width(&format!("{area}-{mid}-{last}")),
        PhoneStyle::LongMark => format!("{area}ー{mid}ー{last}"),
        PhoneStyle::International => format!("+81 {} {mid} {last}", &area[1..]),
        PhoneStyle::Brackets => format!("({area}) {mid} {last}"),
        PhoneStyle::Empty => String::new(),
        PhoneStyle::Invalid => invalid_phone(rng),
    }
}

/// A CSV written as `<name>.tmp` and renamed into place once complete, so a reader never sees
/// half a file and a failed run leaves the previous data intact.
struct CsvOut {
    writer: csv::Writer<fs::File>,
    tmp: PathBuf,
    path: PathBuf,
}

impl CsvOut {
    fn create(path: PathBuf, header: &str) -> Result<Self> {
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut writer =
            csv::Writer::from_path(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        writer.write_record(header.split(','))?;
        Ok(Self { writer, tmp, path })
    }

    fn write<T: AsRef<[u8]>>(&mut self, record: impl IntoIterator<Item = T>) -> Result<()> {
        let context = || format!("writing {}", self.tmp.display());
        self.writer.write_record(record).with_context(context)
    }

    fn finish(self) -> Result<()> {
        let file = self.writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        let context = || format!("renaming to {}", self.path.display());
        fs::rename(&self.tmp, &self.path).with_context(context)
    }
}

fn write_members(
    dir: &Path,
    rng: &mut ChaCha8Rng,
    opts: &GenOptions,
    ids: &mut Identities,
) -> Result<Vec<Member>> {
    let header =
        "member_id,name,name_kana,email,phone,postal_code,prefecture,address,birth_date,gender";
    let mut out = CsvOut::create(dir.join("members.csv"), header)?;
    let mut members = Vec::with_capacity(opts.members);
    for serial in 1..=opts.members {
        let gender = pick(rng, &[("F", 52), ("M", 46), ("", 2)]);
        let surname = one_of(rng, &SURNAMES);
        let given = given_name(rng, gender);
        let space = if rng.random_bool(0.7) { "\u{3000}" } else { "" };
        // Mostly working-age adults; the tails keep students and seniors in every segment.
        let (youngest, oldest) = pick(rng, &[((25, 65), 3), ((16, 85), 1)]);
        let age: u32 = rng.random_range(youngest..=oldest);
        let birth = opts.as_of - Months::new(12 * age) - TimeDelta::days(rng.random_range(0..365));
        let email = ids.email(rng, given.2, surname.2, birth.year());
        let phone = ids.phone(rng);
        let mut email_style = pick(rng, &MEMBER_EMAIL);
        let phone_style = pick(rng, &MEMBER_PHONE);
        if email_style == EmailStyle::Empty && phone_style == PhoneStyle::Empty {
            email_style = EmailStyle::Plain; // the sign-up form insists on one way to reach them
        }
        let prefecture = pick(rng, &PREFECTURES);
        let postal = [rng.random_range(0..1000), rng.random_range(0..10000)];
        let id = format!("M{serial:07}");
        out.write([
            id.as_str(),
            &format!("{}{space}{}", surname.0, given.0),
            &format!("{}{space}{}", surname.1, given.1),
            &member_email(rng, &email, email_style),
            &render_phone(rng, &phone, phone_style),
            &format!("{:03}-{:04}", postal[0], postal[1]),
            prefecture,
            &address(rng, prefecture),
            &birth.format("%Y-%m-%d").to_string(),
            gender,
        ])?;
        let email_ok = !matches!(email_style, EmailStyle::Empty | EmailStyle::Invalid);
        let phone_ok = !matches!(phone_style, PhoneStyle::Empty | PhoneStyle::Invalid);
        let (email, phone) = (email_ok.then_some(email), phone_ok.then_some(phone));
        members.push(Member {
            id,
            age,
            gender,
            email,
            phone,
        });
    }
    out.finish()?;
    Ok(members)
}

/// Ward, town and chome-ban-go; generic names keep every address fictional.
fn address(rng: &mut impl Rng, prefecture: &str) -> String {
    let (city, town) = (one_of(rng, &CITIES), one_of(rng, &TOWNS));
    let chome = rng.random_range(1..=5);
    let (ban, go) = (rng.random_range(1..=30), rng.random_range(1..=20));
    format!("{prefecture}{city}{town}{chome}-{ban}-{go}")
}

/// Follows the member's gender where known, so name and gender columns agree.
fn given_name(rng: &mut impl Rng, gender: &str) -> Name {
    let male = gender == "M" || (gender.is_empty() && rng.random_bool(0.5));
    let names: &[Name] = if male { &MALE_NAMES } else { &FEMALE_NAMES };
    one_of(rng, names)
}

/// Per-category basket weights, bent by age and gender so segment aggregates differ visibly.
fn category_weights(member: &Member, pet_owner: bool) -> [(&'static str, u32); 8] {
    let (age, female) = (member.age, member.gender == "F");
    CATEGORIES.map(|(category, weight, _)| {
        let percent = match category {
            "cosmetics" if female => 200,
            "cosmetics" if member.gender == "M" => 20,
            "instant_food" if age < 30 => 220,
            "instant_food" if age >= 50 => 50,
            "snacks" if age < 30 => 140,
            "dairy" if age >= 60 => 150,
            "small_appliances" if (30..60).contains(&age) => 160,
            "small_appliances" => 50,
            "pet" if pet_owner => 300,
            "pet" => 0,
            _ => 100,
        };
        (category, weight * percent / 100)
    })
}

fn brand_in(rng: &mut impl Rng, category: &str) -> usize {
    let of_category = || (0..BRANDS.len()).filter(|&i| BRANDS[i].3 == category);
    let nth = rng.random_range(0..of_category().count());
    of_category().nth(nth).unwrap_or(0)
}

/// Shelf prices end in 8 (or 80 for dearer goods), as Japanese retail prices usually do.
fn shelf_price(rng: &mut impl Rng, category: &str) -> u32 {
    let (min, max) = CATEGORIES
        .iter()
        .find(|c| c.0 == category)
        .map_or((100, 100), |c| c.2);
    let step = if max > 1000 { 100 } else { 10 };
    (rng.random_range(min / step..=max / step + 1) * step - step / 5).clamp(min, max)
}

fn write_purchases(
    dir: &Path,
    rng: &mut ChaCha8Rng,
    as_of: NaiveDate,
    members: &[Member],
) -> Result<(usize, Vec<Basket>)> {
    // (sku, unit price) per brand, indexed like BRANDS.
    let catalogue: Vec<Vec<(String, u32)>> = BRANDS
        .iter()
        .map(|&(_, _, code, category)| {
            let skus = rng.random_range(3..=5);
            (1..=skus)
                .map(|i| {
                    let sku = format!("{code}-{}", i * 100 + rng.random_range(0..100));
                    (sku, shelf_price(rng, category))
                })
                .collect()
        })
        .collect();
    let header = "member_id,purchased_at,sku,brand,manufacturer,category,quantity,amount";
    let mut out = CsvOut::create(dir.join("purchases.csv"), header)?;
    let midnight = as_of.and_time(NaiveTime::MIN);
    let (mut total, mut baskets) = (0, Vec::with_capacity(members.len()));
    for member in members {
        let weights = category_weights(member, rng.random_bool(0.3));
        // Loyal members keep returning to one everyday brand, which repeat-purchase queries need.
        let staples = weights.map(|(c, w)| (c, if c == "small_appliances" { 0 } else { w }));
        let favourite_category = pick(rng, &staples);
        let favourite = brand_in(rng, favourite_category);
        let loyal = rng.random_bool(0.4);
        let lines = match pick(rng, &[("none", 10), ("regular", 75), ("heavy", 15)]) {
            "none" => 0,
            "regular" => rng.random_range(1..=12),
            _ => rng.random_range(16..=32),
        };
        let mut bought: Vec<(NaiveDateTime, usize, usize, u32)> = Vec::with_capacity(lines);
        for _ in 0..lines {
            let brand = if loyal && rng.random_bool(0.5) {
                favourite
            } else {
                let category = pick(rng, &weights);
                brand_in(rng, category)
            };
            let sku = rng.random_range(0..catalogue[brand].len());
            let quantity = match BRANDS[brand].3 {
                "small_appliances" => 1,
                _ => pick(rng, &[(1, 70), (2, 18), (3, 8), (4, 4)]),
            };
            let at = waking_moment(rng, midnight - TimeDelta::days(365), 365);
            bought.push((at, brand, sku, quantity));
        }
        bought.sort_by_key(|line| line.0);
        let mut basket = Basket::default();
        for (at, brand, sku, quantity) in bought {
            let (manufacturer, name, _, category) = BRANDS[brand];
            let (code, price) = &catalogue[brand][sku];
            basket.kumo_air |= name == "Kumo Air";
            basket.kumo_kitchen |= name == "Kumo Kitchen";
            basket.kumo_any |= manufacturer == "Kumo Denki";
            basket.sakura_lines += u32::from(manufacturer == "Sakura Foods");
            let (quantity, amount) = (quantity.to_string(), (quantity * price).to_string());
            let at = jst(at);
            out.write([
                &member.id,
                &at,
                code,
                name,
                manufacturer,
                category,
                &quantity,
                &amount,
            ])?;
            total += 1;
        }
        baskets.push(basket);
    }
    out.finish()?;
    Ok((total, baskets))
}

/// `n` strictly increasing instants on the days in `[start, end)`, at waking hours.
fn increasing_times(
    rng: &mut impl Rng,
    start: NaiveDateTime,
    end: NaiveDateTime,
    n: usize,
) -> Vec<NaiveDateTime> {
    let days = (end - start).num_days().max(1);
    let mut times: Vec<_> = (0..n).map(|_| waking_moment(rng, start, days)).collect();
    times.sort();
    for i in 1..times.len() {
        times[i] = times[i].max(times[i - 1] + TimeDelta::seconds(1));
    }
    times
}

/// A moment between 07:00 and 23:00 on one of `days` days from `first_midnight`: shops and
/// people sleep at night.
fn waking_moment(rng: &mut impl Rng, first_midnight: NaiveDateTime, days: i64) -> NaiveDateTime {
    let day = rng.random_range(0..days);
    first_midnight
        + TimeDelta::days(day)
        + TimeDelta::seconds(rng.random_range(7 * 3600..23 * 3600))
}

/// One consent event: action, notice version, when, and when the consent lapses (if ever).
type Event = (&'static str, u32, NaiveDateTime, Option<NaiveDateTime>);

/// One member's history for one purpose; together the stories cover every state the consent
/// logic must resolve: current, withdrawn, stale notice, lapsed, and re-granted.
fn consent_story(rng: &mut impl Rng, now: NaiveDateTime, current: u32, old: &[u32]) -> Vec<Event> {
    let story = pick(rng, &STORIES);
    let steps = match story {
        Story::Current | Story::Expired => vec![("granted", current)],
        Story::Withdrawn => vec![("granted", current), ("withdrawn", current)],
        Story::OldNotice => vec![("granted", one_of(rng, old))],
        Story::Regranted => {
            let first = rng.random_range(1..=current);
            vec![
                ("granted", first),
                ("withdrawn", first),
                ("granted", current),
            ]
        }
        Story::Silent => vec![],
    };
    let lapsed = now - TimeDelta::days(rng.random_range(1..=90));
    let end = if story == Story::Expired { lapsed } else { now };
    let times = increasing_times(rng, now - TimeDelta::days(730), end, steps.len());
    let mut events = Vec::with_capacity(steps.len());
    for ((action, version), at) in steps.into_iter().zip(times) {
        let expires = match (action, story) {
            ("withdrawn", _) => None,
            (_, Story::Expired) => Some(lapsed),
            _ if rng.random_bool(0.2) => Some(now + TimeDelta::days(rng.random_range(365..=730))),
            _ => None,
        };
        events.push((action, version, at, expires));
    }
    events
}

fn write_consents(
    dir: &Path,
    rng: &mut ChaCha8Rng,
    as_of: NaiveDate,
    members: &[Member],
) -> Result<usize> {
    let header = "member_id,purpose,notice_version,action,at,source,expires_at";
    let mut out = CsvOut::create(dir.join("consent_events.csv"), header)?;
    let now = as_of.and_time(NaiveTime::MIN);
    let mut total = 0;
    for member in members {
        for (purpose, current, old) in PURPOSES {
            for (action, version, at, expires) in consent_story(rng, now, current, old) {
                let (version, at) = (version.to_string(), jst(at));
                let expires = expires.map(jst).unwrap_or_default();
                let source = pick(rng, &SOURCES);
                out.write([&member.id, purpose, &version, action, &at, source, &expires])?;
                total += 1;
            }
        }
    }
    out.finish()?;
    Ok(total)
}

/// How one partner's customer list relates to the retailer's members.
struct PartnerSpec {
    name: &'static str,
    /// Share of members who are also this partner's customers.
    member_share: f64,
    /// How much likelier a member who bought the partner's products is to be on its list.
    buyer_lift: f64,
    /// Customers the retailer has never seen, as a share of the member count.
    outsider_share: f64,
    is_buyer: fn(&Basket) -> bool,
    attribute: fn(&mut ChaCha8Rng, Option<&Basket>) -> &'static str,
}

fn loyalty_tier(rng: &mut ChaCha8Rng, basket: Option<&Basket>) -> &'static str {
    if basket.is_some_and(|b| b.sakura_lines >= 3) {
        pick(rng, &[("bronze", 45), ("silver", 38), ("gold", 17)])
    } else {
        pick(rng, &[("bronze", 66), ("silver", 27), ("gold", 7)])
    }
}

fn owned_model(rng: &mut ChaCha8Rng, basket: Option<&Basket>) -> &'static str {
    let b = basket.copied().unwrap_or_default();
    match (b.kumo_air, b.kumo_kitchen) {
        (true, false) => pick(rng, &[("KA-100", 45), ("KA-200", 45), ("KK-10", 10)]),
        (false, true) => pick(rng, &[("KA-100", 15), ("KA-200", 10), ("KK-10", 75)]),
        _ => pick(rng, &[("KA-100", 45), ("KA-200", 25), ("KK-10", 30)]),
    }
}

/// The partner's view of a person: some rows carry only an e-mail or only a phone, each in the
/// partner's own format, and about 1% are unusable.
fn partner_row(
    rng: &mut impl Rng,
    email: Option<&str>,
    phone: Option<&str>,
) -> Option<[String; 2]> {
    let (want_email, want_phone) = pick(
        rng,
        &[((true, false), 30), ((false, true), 20), ((true, true), 50)],
    );
    let email = email.filter(|_| want_email || phone.is_none());
    let phone = phone.filter(|_| want_phone || email.is_none());
    let mut row = [String::new(), String::new()];
    if let Some(email) = email {
        row[0] = partner_email(rng, email);
    }
    if let Some(phone) = phone {
        let style = pick(rng, &PARTNER_PHONE);
        row[1] = render_phone(rng, phone, style);
    }
    if rng.random_bool(0.01) {
        match email {
            Some(email) => row[0] = invalid_email(rng, email),
            None => row[1] = invalid_phone(rng),
        }
    }
    (email.is_some() || phone.is_some()).then_some(row)
}

fn write_partner_list(
    dir: &Path,
    rng: &mut ChaCha8Rng,
    members: &[Member],
    baskets: &[Basket],
    ids: &mut Identities,
    spec: &PartnerSpec,
) -> Result<usize> {
    // The base rate that keeps the overall share on target despite the buyers' lift.
    let buyers = baskets.iter().filter(|b| (spec.is_buyer)(b)).count();
    let buyer_share = buyers as f64 / members.len().max(1) as f64;
    let base = spec.member_share / (1.0 + (spec.buyer_lift - 1.0) * buyer_share);
    let mut rows = Vec::new();
    for (member, basket) in members.iter().zip(baskets) {
        let lift = if (spec.is_buyer)(basket) {
            spec.buyer_lift
        } else {
            1.0
        };
        if !rng.random_bool((base * lift).min(1.0)) {
            continue;
        }
        let (email, phone) = (member.email.as_deref(), member.phone.as_deref());
        if let Some([email, phone]) = partner_row(rng, email, phone) {
            rows.push([
                email,
                phone,
                (spec.attribute)(rng, Some(basket)).to_string(),
            ]);
        }
    }
    let outsiders = (members.len() as f64 * spec.outsider_share).round() as usize;
    for _ in 0..outsiders {
        let surname = one_of(rng, &SURNAMES);
        let given = given_name(rng, "");
        let year = rng.random_range(1940..2010);
        let email = ids.email(rng, given.2, surname.2, year);
        let phone = ids.phone(rng);
        if let Some([email, phone]) = partner_row(rng, Some(&email), Some(&phone)) {
            rows.push([email, phone, (spec.attribute)(rng, None).to_string()]);
        }
    }
    // Members first would tell anyone reading the file who overlaps.
    rows.shuffle(rng);
    let mut out = CsvOut::create(
        dir.join(format!("{}.csv", spec.name)),
        "email,phone,attribute",
    )?;
    for row in &rows {
        out.write(row)?;
    }
    out.finish()?;
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILES: [&str; 5] = [
        "members.csv",
        "purchases.csv",
        "consent_events.csv",
        "partner_lists/sakura_foods.csv",
        "partner_lists/kumo_denki.csv",
    ];

    fn run(tag: &str, seed: u64) -> PathBuf {
        let out_dir =
            std::env::temp_dir().join(format!("cleanroom-gen-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&out_dir);
        let as_of = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
        let opts = GenOptions {
            seed,
            members: 300,
            as_of,
            out_dir: out_dir.clone(),
        };
        // The random members, then the attack target.
        assert_eq!(generate(&opts).unwrap().members, 301);
        out_dir
    }

    #[test]
    fn same_seed_gives_same_bytes() {
        let (a, b, other) = (run("same-a", 7), run("same-b", 7), run("other", 8));
        for file in FILES {
            let bytes = fs::read(a.join(file)).unwrap();
            assert!(
                bytes == fs::read(b.join(file)).unwrap(),
                "{file} differs between runs"
            );
            assert!(
                bytes != fs::read(other.join(file)).unwrap(),
                "{file} ignores the seed"
            );
        }
        for dir in [a, b, other] {
            fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn every_member_has_email_or_phone() {
        let dir = run("reachable", 11);
        let mut reader = csv::Reader::from_path(dir.join("members.csv")).unwrap();
        for row in reader.records() {
            let row = row.unwrap();
            assert!(
                !row[3].is_empty() || !row[4].is_empty(),
                "{} has no contact",
                &row[0]
            );
        }
        fs::remove_dir_all(dir).unwrap();
    }
}
