//! The allow-list: reviewed query files in `queries/`, each SQL over the safe views plus metadata a
//! lawyer can read, among it each parameter's declared type, range, granularity and allowed
//! values.
//!
//! A caller's parameters are checked against those declarations in one place, the guard's
//! (`cleanroom_engine::guard::params`), and bound to placeholders as typed values: never spliced
//! into SQL text.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chrono::{Datelike, NaiveDate, Weekday};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::files::excerpt;
use crate::rules::Rules;
use crate::{Error, Result};

/// The largest per-member bound a metric may declare. Noise grows with the bound; beyond this a
/// released sum would carry no insight, and the guard's exact sampler is sized for it.
pub const MAX_METRIC_BOUND: u64 = 10_000_000;

/// One allow-listed query, as reviewed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryDef {
    /// Stable id; the file is `queries/<id>.toml`.
    pub id: String,
    /// Content version, raised on every edit.
    pub version: u32,
    /// Short title.
    pub title: String,
    /// Japanese title, when the reviewers keep one.
    #[serde(default)]
    pub title_ja: Option<String>,
    /// What the query answers, in plain language.
    pub description: String,
    /// Japanese description, when the reviewers keep one.
    #[serde(default)]
    pub description_ja: Option<String>,
    /// The consent purposes it may serve; a contract of another purpose cannot run it.
    pub purposes: Vec<String>,
    /// The contract clause that allows it.
    pub contract_clause: String,
    /// Partners it is open to (the contract must list it too).
    pub partners: Vec<String>,
    /// The query's own k; the effective k is never below the floor or the contract's k.
    pub k: u32,
    /// SQL over the safe views `members` and `purchases`, with `$name` placeholders.
    pub sql: String,
    /// Typed parameters.
    #[serde(default)]
    pub params: Vec<ParamSpec>,
    /// Output columns that group rows, in output order.
    #[serde(default)]
    pub dimensions: Vec<DimensionSpec>,
    /// Output columns that carry aggregates, in output order after the dimensions.
    pub metrics: Vec<String>,
    /// The most one member may add to a metric in one output row, for every metric that is not a
    /// count of distinct members (those add at most 1). The guard clamps each member's
    /// contribution to it and scales noise by it.
    #[serde(default)]
    pub metric_bounds: BTreeMap<String, u64>,
    /// The most output rows one member counts in per answer (a member who buys in eight
    /// categories counts in eight rows of a by-category query). The guard enforces it, capped by
    /// the contract's own limit, and scales noise with its square root.
    #[serde(default = "one_row")]
    pub max_rows_per_member: u32,
    /// Where the file was read from.
    #[serde(skip)]
    pub source: PathBuf,
    /// The file's text, kept so that reviewers can compare versions.
    #[serde(skip)]
    pub source_text: String,
    /// SHA-256 (hex) of the query's canonical content ([`QueryDef::canonical_content`]): what an
    /// approval is bound to.
    #[serde(skip)]
    pub content_sha256: String,
}

fn one_row() -> u32 {
    1
}

/// A typed parameter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// Placeholder name (`$name` in the SQL).
    pub name: String,
    /// Its type.
    #[serde(rename = "type")]
    pub kind: ParamKind,
    /// What it means.
    pub description: String,
    /// Inclusive lower bound (a date or an integer).
    #[serde(default)]
    pub min: Option<toml::Value>,
    /// Inclusive upper bound (a date or an integer).
    #[serde(default)]
    pub max: Option<toml::Value>,
    /// For dates: the calendar unit values must fall on.
    #[serde(default)]
    pub granularity: Option<Granularity>,
    /// For dates: a parameter this one must come strictly after (an exclusive window end).
    #[serde(default)]
    pub after: Option<String>,
    /// For enums: the allowed values, listed here.
    #[serde(default)]
    pub values: Option<Vec<String>>,
    /// For enums: the allowed values, taken from a named domain of the rules.
    #[serde(default)]
    pub domain: Option<String>,
    /// For a window's end (a date with `after`): the shortest window allowed, in days, after
    /// snapping. Short windows subtracted from longer ones isolate small groups.
    #[serde(default)]
    pub min_window_days: Option<u32>,
}

/// Parameter types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// A calendar date, `YYYY-MM-DD`, meaning local midnight.
    Date,
    /// A whole number.
    Int,
    /// One value from a fixed list.
    Enum,
}

impl ParamKind {
    /// Lowercase name, as the API describes it.
    pub fn as_str(self) -> &'static str {
        match self {
            ParamKind::Date => "date",
            ParamKind::Int => "int",
            ParamKind::Enum => "enum",
        }
    }
}

/// The calendar unit a date parameter snaps to. Coarse units stop trackers that subtract two
/// windows one day apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// Any day.
    Day,
    /// Mondays only.
    Week,
    /// The first of a month only.
    Month,
}

impl Granularity {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Day => "day",
            Granularity::Week => "week",
            Granularity::Month => "month",
        }
    }

    /// Whether a date falls on a boundary of this unit.
    pub fn admits(self, date: NaiveDate) -> bool {
        match self {
            Granularity::Day => true,
            Granularity::Week => date.weekday() == Weekday::Mon,
            Granularity::Month => date.day() == 1,
        }
    }

    /// The boundary on or before `date`.
    pub fn floor(self, date: NaiveDate) -> NaiveDate {
        match self {
            Granularity::Day => date,
            Granularity::Week => {
                date - chrono::Days::new(u64::from(date.weekday().num_days_from_monday()))
            }
            Granularity::Month => date.with_day(1).expect("the 1st exists"),
        }
    }

    /// The boundary on or after `date`.
    pub fn ceil(self, date: NaiveDate) -> NaiveDate {
        if self.admits(date) {
            return date;
        }
        match self {
            Granularity::Day => date,
            Granularity::Week => self.floor(date) + chrono::Days::new(7),
            Granularity::Month => self.floor(date) + chrono::Months::new(1),
        }
    }
}

/// A grouping column of the output and the domain its values come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DimensionSpec {
    /// Output column name.
    pub name: String,
    /// Domain name: built in (`age_band`, `prefecture`, `gender`, `partner_attribute`) or from the
    /// rules' `[domains]`.
    pub domain: String,
}

/// A checked, typed parameter value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum BoundValue {
    /// A date, to be bound as local midnight.
    Date(NaiveDate),
    /// An integer.
    Int(i64),
    /// One of the allowed strings.
    Str(String),
}

impl std::fmt::Display for BoundValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BoundValue::Date(d) => write!(f, "{d}"),
            BoundValue::Int(i) => write!(f, "{i}"),
            BoundValue::Str(s) => f.write_str(s),
        }
    }
}

/// A date bound (`min`, `max`) as the metadata writes it: a `YYYY-MM-DD` string or a TOML date.
pub fn bound_date(value: &toml::Value) -> Option<NaiveDate> {
    match value {
        toml::Value::String(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d").ok(),
        toml::Value::Datetime(dt) => dt
            .date
            .and_then(|d| NaiveDate::from_ymd_opt(i32::from(d.year), d.month.into(), d.day.into())),
        _ => None,
    }
}

impl QueryDef {
    /// Checks the metadata on its own and against the rules: parameter constraints present and
    /// well-formed, dimensions drawing on known domains, k at or above the floor.
    pub fn validate(&self, rules: &Rules) -> Result<()> {
        self.check_purposes(rules)?;
        self.check_k(rules)?;
        self.check_partners(rules)?;
        self.check_has_metric()?;
        self.check_params(rules)?;
        self.check_contribution_bounds()?;
        self.check_noise(rules)?;
        self.check_dimensions(rules)
    }

    /// A validation error about this query, prefixed with its id.
    fn fail<T>(&self, msg: String) -> Result<T> {
        Err(Error::Config(format!("query {}: {msg}", excerpt(&self.id))))
    }

    /// The query names at least one purpose, and only known ones.
    fn check_purposes(&self, rules: &Rules) -> Result<()> {
        if self.purposes.is_empty() {
            return self.fail("names no purpose".into());
        }
        for purpose in &self.purposes {
            if !rules.purposes.contains_key(purpose) {
                return self.fail(format!("unknown purpose `{}`", excerpt(purpose)));
            }
        }
        Ok(())
    }

    /// k lies between the rules' floor and [`crate::rules::MAX_K`].
    fn check_k(&self, rules: &Rules) -> Result<()> {
        if self.k > crate::rules::MAX_K {
            return self.fail(format!(
                "k {} is above the largest k, {}",
                self.k,
                crate::rules::MAX_K
            ));
        }
        if self.k < rules.privacy.k_floor {
            return self.fail(format!(
                "k {} is below the floor {}",
                self.k, rules.privacy.k_floor
            ));
        }
        Ok(())
    }

    /// Every partner the query is open to is known to the rules.
    fn check_partners(&self, rules: &Rules) -> Result<()> {
        for partner in &self.partners {
            if !rules.partners.contains_key(partner) {
                return self.fail(format!("unknown partner `{}`", excerpt(partner)));
            }
        }
        Ok(())
    }

    /// The query declares at least one metric.
    fn check_has_metric(&self) -> Result<()> {
        if self.metrics.is_empty() {
            return self.fail("declares no metric".into());
        }
        Ok(())
    }

    /// Every parameter is declared once, used in the SQL, constrained as its kind requires and,
    /// if it ends a window, well tied to its start.
    fn check_params(&self, rules: &Rules) -> Result<()> {
        let mut names = BTreeSet::new();
        for p in &self.params {
            if !names.insert(p.name.as_str()) {
                return self.fail(format!("parameter `{}` declared twice", excerpt(&p.name)));
            }
            if !self.sql.contains(&format!("${}", p.name)) {
                return self.fail(format!(
                    "parameter `{}` is not used in the SQL",
                    excerpt(&p.name)
                ));
            }
            self.check_param_constraints(p, rules)?;
            self.check_param_window(p)?;
        }
        Ok(())
    }

    /// The constraints a parameter's kind requires: dates need date bounds and a granularity,
    /// integers integer bounds, enums a value list or a known domain.
    fn check_param_constraints(&self, p: &ParamSpec, rules: &Rules) -> Result<()> {
        match p.kind {
            ParamKind::Date => self.check_date_constraints(p)?,
            ParamKind::Int => {
                let (Some(toml::Value::Integer(min)), Some(toml::Value::Integer(max))) =
                    (&p.min, &p.max)
                else {
                    return self.fail(format!(
                        "int parameter `{}` needs integer min and max",
                        excerpt(&p.name)
                    ));
                };
                if min > max {
                    return self.fail(format!(
                        "int parameter `{}`: min {min} is above max {max}",
                        excerpt(&p.name)
                    ));
                }
            }
            ParamKind::Enum => match (&p.values, &p.domain) {
                (Some(values), None) if !values.is_empty() => {}
                (None, Some(domain)) if rules.has_domain(domain) => {}
                _ => {
                    return self.fail(format!(
                        "enum parameter `{}` needs a non-empty `values` list or a known `domain`",
                        excerpt(&p.name)
                    ));
                }
            },
        }
        Ok(())
    }

    /// A date parameter's constraints: a granularity, and min and max dates of the calendar's
    /// years 1 to 9999 with min not after max.
    fn check_date_constraints(&self, p: &ParamSpec) -> Result<()> {
        let name = excerpt(&p.name);
        let (Some(min), Some(max)) = (&p.min, &p.max) else {
            return self.fail(format!("date parameter `{name}` needs min and max"));
        };
        let (Some(min), Some(max)) = (bound_date(min), bound_date(max)) else {
            return self.fail(format!("date parameter `{name}`: min/max must be dates"));
        };
        // Snapping moves a date by up to a month: bounds at the ends of the calendar chrono
        // knows made it overflow (found by the fuzzer); these years keep it far inside.
        let years = NaiveDate::from_ymd_opt(1, 1, 1)..=NaiveDate::from_ymd_opt(9999, 12, 31);
        if !years.contains(&Some(min)) || !years.contains(&Some(max)) {
            return self.fail(format!(
                "date parameter `{name}`: min and max must lie between 0001-01-01 and 9999-12-31"
            ));
        }
        // A range no date falls in would refuse every request.
        if min > max {
            return self.fail(format!(
                "date parameter `{name}`: min {min} is after max {max}"
            ));
        }
        if p.granularity.is_none() {
            return self.fail(format!("date parameter `{name}` needs a granularity"));
        }
        Ok(())
    }

    /// `after` names a parameter of the same type, and a date that ends a window (and only such a
    /// date) sets `min_window_days` of at least 1.
    fn check_param_window(&self, p: &ParamSpec) -> Result<()> {
        if let Some(after) = &p.after
            && !self
                .params
                .iter()
                .any(|o| &o.name == after && o.kind == p.kind)
        {
            return self.fail(format!(
                "parameter `{}`: `after` names no parameter of its type",
                excerpt(&p.name)
            ));
        }
        match (&p.after, p.kind, p.min_window_days) {
            (Some(_), ParamKind::Date, Some(days)) if days > 0 => {}
            (Some(_), ParamKind::Date, _) => {
                return self.fail(format!(
                    "parameter `{}` ends a window: it needs min_window_days of at least 1",
                    excerpt(&p.name)
                ));
            }
            (_, _, Some(_)) => {
                return self.fail(format!(
                    "parameter `{}`: min_window_days belongs on a date with `after`",
                    excerpt(&p.name)
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// What one member may contribute to an answer: rows per member within
    /// [`crate::rules::MAX_ROWS_PER_MEMBER`], and each metric bound positive, at most
    /// [`MAX_METRIC_BOUND`] and on a declared metric.
    fn check_contribution_bounds(&self) -> Result<()> {
        if !(1..=crate::rules::MAX_ROWS_PER_MEMBER).contains(&self.max_rows_per_member) {
            return self.fail(format!(
                "max_rows_per_member must be between 1 and {}",
                crate::rules::MAX_ROWS_PER_MEMBER
            ));
        }
        for (metric, bound) in &self.metric_bounds {
            if *bound > MAX_METRIC_BOUND {
                return self.fail(format!(
                    "metric_bounds.{} must be at most {MAX_METRIC_BOUND}",
                    excerpt(metric)
                ));
            }
            if !self.metrics.contains(metric) {
                return self.fail(format!(
                    "metric_bounds names `{}`, which is not a metric",
                    excerpt(metric)
                ));
            }
            if *bound == 0 {
                return self.fail(format!(
                    "metric_bounds.{} must be positive",
                    excerpt(metric)
                ));
            }
        }
        Ok(())
    }

    /// Every dimension draws on a known domain.
    fn check_dimensions(&self, rules: &Rules) -> Result<()> {
        for d in &self.dimensions {
            if !rules.has_domain(&d.domain) {
                return self.fail(format!(
                    "dimension `{}`: unknown domain `{}`",
                    excerpt(&d.name),
                    excerpt(&d.domain)
                ));
            }
        }
        Ok(())
    }

    /// Output column names in order: dimensions, then metrics.
    pub fn output_columns(&self) -> Vec<String> {
        self.dimensions
            .iter()
            .map(|d| d.name.clone())
            .chain(self.metrics.iter().cloned())
            .collect()
    }

    /// The values an enum parameter accepts, for a given partner.
    pub fn allowed_values(&self, spec: &ParamSpec, rules: &Rules, partner: &str) -> Vec<String> {
        match (&spec.values, &spec.domain) {
            (Some(values), _) => values.clone(),
            (None, Some(domain)) => rules.domain(domain, partner).unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    }

    /// A value of every declared parameter, of its declared type (its lower bound, or its first
    /// allowed value): enough to plan and check the query as the guard will, without a request.
    /// Only the types decide what DataFusion's analysis adds to a plan, so a plan checked with
    /// these values is checked for every value of those types.
    pub fn example_params(&self, rules: &Rules, partner: &str) -> BTreeMap<String, BoundValue> {
        self.params
            .iter()
            .map(|spec| {
                let value = match spec.kind {
                    ParamKind::Date => {
                        BoundValue::Date(spec.min.as_ref().and_then(bound_date).unwrap_or_default())
                    }
                    ParamKind::Int => BoundValue::Int(match spec.min {
                        Some(toml::Value::Integer(min)) => min,
                        _ => 0,
                    }),
                    ParamKind::Enum => BoundValue::Str(
                        self.allowed_values(spec, rules, partner)
                            .into_iter()
                            .next()
                            .unwrap_or_default(),
                    ),
                };
                (spec.name.clone(), value)
            })
            .collect()
    }
}

impl QueryDef {
    /// Parses a query file's text without checking it against the rules: for earlier versions
    /// kept for review, whose rules may have changed since.
    pub fn parse(text: &str) -> Result<Self> {
        let mut def: QueryDef =
            toml::from_str(text).map_err(|e| crate::files::toml_error(text, &e))?;
        def.source_text = text.to_string();
        def.content_sha256 = hex::encode(Sha256::digest(def.canonical_content().as_bytes()));
        Ok(def)
    }

    /// The content an approval covers, in a fixed textual form: the SQL plus every piece of
    /// metadata that changes what is released (parameters and their constraints, outputs, k,
    /// purposes, partners, contract clause). Titles, descriptions and the version number are left
    /// out so that a reworded explanation does not void an approval; any change to what the query
    /// computes or to whom it is open does.
    pub fn canonical_content(&self) -> String {
        let sql: String = self
            .sql
            .replace("\r\n", "\n")
            .lines()
            .map(str::trim_end)
            .collect::<Vec<_>>()
            .join("\n");
        format!(
            "id: {}\n{}\n--- sql\n{}\n",
            self.id,
            self.metadata_lines().join("\n"),
            sql.trim()
        )
    }

    /// Checks that every contract that may run this query can noise it: each metric's bound, the
    /// rows per member and the contract's budget give a noise scale the guard can sample. Metrics
    /// without a bound count members (at most 1 each).
    fn check_noise(&self, rules: &Rules) -> Result<()> {
        let bounds: Vec<u64> = self
            .metrics
            .iter()
            .map(|m| self.metric_bounds.get(m).copied().unwrap_or(1))
            .collect();
        for (id, contract) in &rules.contracts {
            if !self.partners.contains(&contract.partner) || !contract.queries.contains(&self.id) {
                continue;
            }
            let rows = self
                .max_rows_per_member
                .min(contract.protection.max_rows_per_member);
            contract
                .protection
                .guarantee()
                .and_then(|g| g.noise_plan(rows, &bounds))
                .map_err(|e| {
                    Error::Config(format!(
                        "query {} under contract {id}: {e}",
                        excerpt(&self.id)
                    ))
                })?;
        }
        Ok(())
    }

    /// The metadata that [`QueryDef::canonical_content`] covers, one fact per line, in the words a
    /// reviewer reads in a diff.
    pub fn metadata_lines(&self) -> Vec<String> {
        let sorted = |items: &[String]| {
            let mut items = items.to_vec();
            items.sort();
            items.join(", ")
        };
        let bound = |v: &Option<toml::Value>| match v {
            Some(toml::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => "-".to_string(),
        };
        let mut lines = vec![
            format!("purposes: {}", sorted(&self.purposes)),
            format!("contract clause: {}", self.contract_clause.trim()),
            format!("partners: {}", sorted(&self.partners)),
            format!("k: {}", self.k),
            format!("rows per member: at most {}", self.max_rows_per_member),
        ];
        for p in &self.params {
            let mut line = format!("parameter {}: {}", p.name, p.kind.as_str());
            if p.min.is_some() || p.max.is_some() {
                line.push_str(&format!(", from {} to {}", bound(&p.min), bound(&p.max)));
            }
            if let Some(g) = p.granularity {
                line.push_str(&format!(", snapped to whole {}s", g.as_str()));
            }
            if let Some(after) = &p.after {
                line.push_str(&format!(", after {after}"));
            }
            if let Some(days) = p.min_window_days {
                line.push_str(&format!(", window at least {days} days"));
            }
            if let Some(values) = &p.values {
                line.push_str(&format!(", one of: {}", values.join(", ")));
            }
            if let Some(domain) = &p.domain {
                line.push_str(&format!(", one of domain {domain}"));
            }
            lines.push(line);
        }
        for d in &self.dimensions {
            lines.push(format!("dimension {}: domain {}", d.name, d.domain));
        }
        for m in &self.metrics {
            match self.metric_bounds.get(m) {
                Some(b) => lines.push(format!("metric {m}: at most {b} per member and row")),
                None => lines.push(format!("metric {m}")),
            }
        }
        lines
    }
}

/// Reads and validates one query file.
pub fn read_query(path: &Path, rules: &Rules) -> Result<QueryDef> {
    let text = crate::files::read_config_file(path)?;
    let mut def = QueryDef::parse(&text).map_err(|e| crate::files::in_file(path, e))?;
    if path.file_stem().and_then(|s| s.to_str()) != Some(def.id.as_str()) {
        return Err(Error::Config(format!(
            "{}: file name must be <id>.toml",
            path.display()
        )));
    }
    def.validate(rules)?;
    def.source = path.to_path_buf();
    Ok(def)
}

/// A query file that could not be loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidQuery {
    /// The file's stem (normally the query id).
    pub id: String,
    /// Where it is.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

/// Every allow-listed query, by id.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    queries: BTreeMap<String, QueryDef>,
    invalid: Vec<InvalidQuery>,
}

fn query_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::Config(format!("cannot read allow-list {}: {e}", dir.display())))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    Ok(paths)
}

impl AllowList {
    /// Reads every `*.toml` file of a directory. A file whose name differs from its id, a duplicate
    /// id or a query that fails validation makes the whole load fail: half an allow-list is worse
    /// than none.
    pub fn load(dir: &Path, rules: &Rules) -> Result<Self> {
        let list = Self::scan(dir, rules)?;
        match list.invalid.first() {
            Some(bad) => Err(Error::Config(bad.reason.clone())),
            None => Ok(list),
        }
    }

    /// Reads every `*.toml` file of a directory, keeping the files that fail validation aside
    /// (with their reasons) instead of failing: a running service keeps serving the valid queries
    /// and shows reviewers the broken ones. Only an unreadable directory is an error.
    pub fn scan(dir: &Path, rules: &Rules) -> Result<Self> {
        let mut list = Self::default();
        for path in query_files(dir)? {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            match read_query(&path, rules) {
                Ok(def) if list.queries.contains_key(&def.id) => list.invalid.push(InvalidQuery {
                    id: stem,
                    path,
                    reason: format!("duplicate query id `{}`", def.id),
                }),
                Ok(def) => {
                    list.queries.insert(def.id.clone(), def);
                }
                Err(e) => list.invalid.push(InvalidQuery {
                    id: stem,
                    path,
                    reason: e.to_string(),
                }),
            }
        }
        Ok(list)
    }

    /// One query by id.
    pub fn get(&self, id: &str) -> Option<&QueryDef> {
        self.queries.get(id)
    }

    /// All queries in id order.
    pub fn iter(&self) -> impl Iterator<Item = &QueryDef> {
        self.queries.values()
    }

    /// Sets a valid query aside as invalid, with the reason: for a query the guard refuses,
    /// which must not be approved or run.
    pub fn set_aside(&mut self, id: &str, reason: String) {
        if let Some(query) = self.queries.remove(id) {
            self.invalid.push(InvalidQuery {
                id: query.id,
                path: query.source,
                reason,
            });
        }
    }

    /// The files that failed validation.
    pub fn invalid(&self) -> &[InvalidQuery] {
        &self.invalid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUERY: &str = r#"
id = "q"
version = 1
title = "t"
description = "d"
purposes = ["p"]
contract_clause = "c"
partners = ["acme"]
k = 10
sql = "SELECT 1"
metrics = ["n"]
"#;

    #[test]
    fn rewording_keeps_the_content_hash_and_a_real_edit_changes_it() {
        let base = QueryDef::parse(QUERY).unwrap();
        let reworded =
            QueryDef::parse(&QUERY.replace("description = \"d\"", "description = \"D\"")).unwrap();
        let bumped = QueryDef::parse(&QUERY.replace("version = 1", "version = 2")).unwrap();
        assert_eq!(base.content_sha256, reworded.content_sha256);
        assert_eq!(base.content_sha256, bumped.content_sha256);
        for edit in [
            QUERY.replace("k = 10", "k = 11"),
            QUERY.replace("SELECT 1", "SELECT 2"),
            QUERY.replace("[\"acme\"]", "[\"acme\", \"other\"]"),
            QUERY.replace("contract_clause = \"c\"", "contract_clause = \"c2\""),
        ] {
            assert_ne!(
                base.content_sha256,
                QueryDef::parse(&edit).unwrap().content_sha256,
                "{edit}"
            );
        }
    }

    /// Found by the query file fuzzer: a range no value falls in was accepted, and every
    /// request was then refused as out of range.
    #[test]
    fn a_parameter_range_that_admits_no_value_or_ends_off_the_calendar_is_refused() {
        let rules = Rules::parse(
            r#"
[privacy]
k_floor = 5
[purposes.p]
description = "d"
min_notice_version = 1
[partners]
[contracts]
"#,
        )
        .unwrap();
        let with = |param: &str| {
            let text = QUERY
                .replace("SELECT 1", "SELECT $x")
                .replace("partners = [\"acme\"]", "partners = []");
            QueryDef::parse(&format!(
                "{text}[[params]]\nname = \"x\"\ndescription = \"x\"\n{param}"
            ))
            .unwrap()
            .validate(&rules)
            .map_err(|e| e.to_string())
        };
        let e = with("type = \"int\"\nmin = 1000\nmax = 40").unwrap_err();
        assert!(e.contains("min 1000 is above max 40"), "{e}");
        let e =
            with("type = \"date\"\nmin = 2027-01-01\nmax = \"2026-01-01\"\ngranularity = \"day\"")
                .unwrap_err();
        assert!(e.contains("min 2027-01-01 is after max 2026-01-01"), "{e}");
        assert_eq!(with("type = \"int\"\nmin = 40\nmax = 40"), Ok(()));
        // Found by the parameter fuzzer: with a bound at the end of chrono's calendar, a request
        // for its last day made snapping to the next month overflow, a panic of the guard.
        for (min, max) in [
            ("2024-02-01", "+262142-12-31"),
            ("-262143-01-01", "2024-01-01"),
        ] {
            let e = with(&format!(
                "type = \"date\"\nmin = \"{min}\"\nmax = \"{max}\"\ngranularity = \"month\""
            ))
            .unwrap_err();
            assert!(e.contains("between 0001-01-01 and 9999-12-31"), "{e}");
        }
    }

    #[test]
    fn dates_snap_to_their_unit() {
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        // 2026-11-04 is a Wednesday.
        assert_eq!(Granularity::Week.floor(d("2026-11-04")), d("2026-11-02"));
        assert_eq!(Granularity::Week.ceil(d("2026-11-04")), d("2026-11-09"));
        assert_eq!(Granularity::Week.ceil(d("2026-11-02")), d("2026-11-02"));
        assert_eq!(Granularity::Month.floor(d("2026-12-31")), d("2026-12-01"));
        assert_eq!(Granularity::Month.ceil(d("2026-12-02")), d("2027-01-01"));
        assert_eq!(Granularity::Day.ceil(d("2026-12-02")), d("2026-12-02"));
    }
}

#[cfg(test)]
mod fuzz;
