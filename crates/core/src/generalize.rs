//! Generalization of quasi-identifiers at ingest: birth dates become age bands, prefectures and
//! genders are checked against fixed domains. The fixed domains are also the output domains the
//! guard uses to make suppressed rows indistinguishable.

use chrono::{Datelike, NaiveDate};
use unicode_normalization::UnicodeNormalization;

/// Age bands, youngest first. `unknown` holds members without a usable birth date.
pub const AGE_BANDS: &[&str] = &[
    "under_20", "20-29", "30-39", "40-49", "50-59", "60-69", "70_plus", "unknown",
];

/// Gender values kept after ingest.
pub const GENDERS: &[&str] = &["F", "M", "other"];

/// The 47 prefectures of Japan, in JIS X 0401 order.
pub const PREFECTURES: &[&str] = &[
    "北海道",
    "青森県",
    "岩手県",
    "宮城県",
    "秋田県",
    "山形県",
    "福島県",
    "茨城県",
    "栃木県",
    "群馬県",
    "埼玉県",
    "千葉県",
    "東京都",
    "神奈川県",
    "新潟県",
    "富山県",
    "石川県",
    "福井県",
    "山梨県",
    "長野県",
    "岐阜県",
    "静岡県",
    "愛知県",
    "三重県",
    "滋賀県",
    "京都府",
    "大阪府",
    "兵庫県",
    "奈良県",
    "和歌山県",
    "鳥取県",
    "島根県",
    "岡山県",
    "広島県",
    "山口県",
    "徳島県",
    "香川県",
    "愛媛県",
    "高知県",
    "福岡県",
    "佐賀県",
    "長崎県",
    "熊本県",
    "大分県",
    "宮崎県",
    "鹿児島県",
    "沖縄県",
];

/// The age band of someone born on `birth` as of `as_of`; `unknown` for a missing, unparsable or
/// future birth date, so a bad date never drops the member.
pub fn age_band(birth: &str, as_of: NaiveDate) -> &'static str {
    let Ok(birth) = NaiveDate::parse_from_str(birth.trim(), "%Y-%m-%d") else {
        return "unknown";
    };
    let Some(mut age) = as_of.year().checked_sub(birth.year()) else {
        return "unknown";
    };
    if (as_of.month(), as_of.day()) < (birth.month(), birth.day()) {
        age -= 1;
    }
    match age {
        a if a < 0 => "unknown",
        0..=19 => "under_20",
        20..=29 => "20-29",
        30..=39 => "30-39",
        40..=49 => "40-49",
        50..=59 => "50-59",
        60..=69 => "60-69",
        _ => "70_plus",
    }
}

/// The canonical prefecture name, accepting full-width or padded input and a missing suffix
/// (`東京` for `東京都`).
pub fn prefecture(raw: &str) -> Option<&'static str> {
    let folded: String = raw.nfkc().collect();
    let name = folded.trim();
    if name.is_empty() {
        return None;
    }
    PREFECTURES.iter().copied().find(|p| {
        *p == name || (p.starts_with(name) && p.chars().count() == name.chars().count() + 1)
    })
}

/// The kept gender value: `F`, `M`, or `other` for anything else, including empty.
pub fn gender(raw: &str) -> &'static str {
    let folded: String = raw.nfkc().collect();
    match folded.trim().to_ascii_uppercase().as_str() {
        "F" | "FEMALE" | "女" | "女性" => "F",
        "M" | "MALE" | "男" | "男性" => "M",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_band_counts_birthdays() {
        let as_of = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
        assert_eq!(age_band("2006-11-01", as_of), "20-29");
        assert_eq!(age_band("2006-11-02", as_of), "under_20");
        assert_eq!(age_band("1950-01-01", as_of), "70_plus");
        assert_eq!(age_band("not a date", as_of), "unknown");
        assert_eq!(age_band("2030-01-01", as_of), "unknown");
    }

    #[test]
    fn prefecture_accepts_short_and_full_width_forms() {
        assert_eq!(prefecture("東京"), Some("東京都"));
        assert_eq!(prefecture(" 大阪府 "), Some("大阪府"));
        assert_eq!(prefecture("北海道"), Some("北海道"));
        assert_eq!(prefecture("Atlantis"), None);
        assert_eq!(PREFECTURES.len(), 47);
    }
}
