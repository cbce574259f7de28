//! The list allowance: a partner may upload at most `max_list_versions` list versions per
//! `list_window_days`. The allowance depends only on the partner's own uploads, never on which
//! members matched, so a refusal tells the partner nothing it did not know; the upload's response
//! (records received and accepted) is computed on the partner's own records alone. Nothing about
//! a list is decided on member data at upload time: every version answers as itself, and what it
//! matched is only ever seen through charged, noisy answers.

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Duration, Utc};

use crate::Result;

/// Upload times, per partner.
#[derive(Debug, Default)]
pub(crate) struct Lists {
    uploads: HashMap<String, VecDeque<DateTime<Utc>>>,
}

impl Lists {
    /// The ledger of earlier accepted uploads (partner, time), from the store's record.
    pub fn open(uploads: impl IntoIterator<Item = (String, DateTime<Utc>)>) -> Self {
        let mut by_partner: HashMap<String, VecDeque<DateTime<Utc>>> = HashMap::new();
        for (partner, at) in uploads {
            by_partner.entry(partner).or_default().push_back(at);
        }
        for times in by_partner.values_mut() {
            times.make_contiguous().sort();
        }
        Self {
            uploads: by_partner,
        }
    }

    /// Every upload held, oldest first per partner.
    pub fn all(&self) -> Vec<(String, DateTime<Utc>)> {
        let mut all: Vec<(String, DateTime<Utc>)> = self
            .uploads
            .iter()
            .flat_map(|(p, times)| times.iter().map(move |t| (p.clone(), *t)))
            .collect();
        all.sort();
        all
    }

    /// Adds uploads made elsewhere (carried over after a restore).
    pub fn extend(&mut self, uploads: impl IntoIterator<Item = (String, DateTime<Utc>)>) {
        for (partner, at) in uploads {
            let times = self.uploads.entry(partner).or_default();
            times.push_back(at);
            times.make_contiguous().sort();
        }
    }

    /// Takes one upload from the partner's allowance, or refuses with the time the next one is
    /// possible.
    pub fn take(
        &mut self,
        partner: &str,
        max_versions: u32,
        window_days: u32,
        now: DateTime<Utc>,
    ) -> Result<()> {
        self.check(partner, max_versions, window_days, now)?;
        self.uploads
            .entry(partner.to_string())
            .or_default()
            .push_back(now);
        Ok(())
    }

    /// Refuses, as [`Lists::take`] would, without taking: checked before an upload's records
    /// are read or hashed.
    pub fn check(
        &mut self,
        partner: &str,
        max_versions: u32,
        window_days: u32,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let times = self.uploads.entry(partner.to_string()).or_default();
        let window = Duration::days(i64::from(window_days));
        while times.front().is_some_and(|t| *t + window <= now) {
            times.pop_front();
        }
        if times.len() >= max_versions as usize {
            let next = times.front().map(|t| *t + window).unwrap_or(now);
            return Err(cleanroom_core::Error::Limit(format!(
                "list uploads are limited to {max_versions} per {window_days} days; the next \
                 upload is possible at {}",
                next.to_rfc3339()
            ))
            .into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowance_counts_over_a_rolling_window() {
        let now = Utc::now();
        let mut lists = Lists::open([("p".to_string(), now - Duration::days(40))]);
        lists.take("p", 2, 30, now).unwrap();
        lists.take("p", 2, 30, now).unwrap();
        assert!(lists.take("p", 2, 30, now).is_err());
        assert!(lists.take("q", 2, 30, now).is_ok(), "partners are separate");
        assert!(lists.take("p", 2, 30, now + Duration::days(31)).is_ok());
    }
}
