//! Consent as a log of events, evaluated at query time. A member counts for a purpose only if their
//! latest event for it is a grant of at least the purpose's current notice version that has not
//! expired. There is no deemed consent: silence, or a grant of an older notice, counts as no.

use chrono::{DateTime, Utc};

/// What a consent event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The member agreed to the purpose under a given notice version.
    Granted,
    /// The member withdrew; it takes effect at the next query.
    Withdrawn,
}

impl Action {
    /// Parses `granted` / `withdrawn`.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "granted" => Some(Self::Granted),
            "withdrawn" => Some(Self::Withdrawn),
            _ => None,
        }
    }

    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Granted => "granted",
            Self::Withdrawn => "withdrawn",
        }
    }
}

/// The parts of one event that decide consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Grant or withdrawal.
    pub action: Action,
    /// Notice version the member saw.
    pub notice_version: u32,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// When a grant stops counting, if it says so itself.
    pub expires_at: Option<DateTime<Utc>>,
}

/// What a purpose requires of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    /// The oldest notice version a grant may be for.
    pub min_notice_version: u32,
    /// A grant older than this many days no longer counts, when the purpose sets it.
    pub grant_valid_days: Option<u32>,
}

/// Folds one event into the running "latest event" of a member, so a caller can stream events in
/// any order. Events after `now` are ignored; at equal timestamps a withdrawal wins, because
/// counting someone who withdrew is the worse mistake.
pub fn keep_latest(latest: &mut Option<Event>, event: Event, now: DateTime<Utc>) {
    if event.at > now {
        return;
    }
    let newer = match latest {
        None => true,
        Some(current) => {
            event.at > current.at || (event.at == current.at && event.action == Action::Withdrawn)
        }
    };
    if newer {
        *latest = Some(event);
    }
}

/// Whether a member whose latest event is `latest` counts for a purpose at `now`.
pub fn admits(latest: Option<&Event>, requirement: &Requirement, now: DateTime<Utc>) -> bool {
    let Some(event) = latest else {
        return false;
    };
    if event.action != Action::Granted || event.notice_version < requirement.min_notice_version {
        return false;
    }
    if event.expires_at.is_some_and(|expiry| expiry <= now) {
        return false;
    }
    if let Some(days) = requirement.grant_valid_days
        && now - event.at > chrono::Duration::days(i64::from(days))
    {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(day: u32) -> DateTime<Utc> {
        format!("2026-10-{day:02}T00:00:00Z").parse().unwrap()
    }

    fn event(action: Action, version: u32, day: u32) -> Event {
        Event {
            action,
            notice_version: version,
            at: at(day),
            expires_at: None,
        }
    }

    const REQ: Requirement = Requirement {
        min_notice_version: 3,
        grant_valid_days: None,
    };

    fn decide(events: &[Event], now_day: u32) -> bool {
        let mut latest = None;
        for e in events {
            keep_latest(&mut latest, *e, at(now_day));
        }
        admits(latest.as_ref(), &REQ, at(now_day))
    }

    #[test]
    fn silence_old_notices_and_withdrawals_count_as_no() {
        assert!(!decide(&[], 20));
        assert!(!decide(&[event(Action::Granted, 2, 1)], 20));
        assert!(!decide(
            &[event(Action::Granted, 3, 1), event(Action::Withdrawn, 3, 5)],
            20
        ));
        assert!(decide(&[event(Action::Granted, 3, 1)], 20));
    }

    #[test]
    fn order_of_arrival_does_not_matter_and_future_events_wait() {
        let grant = event(Action::Granted, 3, 1);
        let withdraw = event(Action::Withdrawn, 3, 5);
        assert!(!decide(&[withdraw, grant], 20));
        assert!(
            decide(&[withdraw, grant], 3),
            "a withdrawal dated later is not yet in force"
        );
        assert!(decide(&[withdraw, grant, event(Action::Granted, 3, 9)], 20));
    }

    #[test]
    fn expired_grants_do_not_count() {
        let mut grant = event(Action::Granted, 3, 1);
        grant.expires_at = Some(at(10));
        assert!(decide(&[grant], 9));
        assert!(!decide(&[grant], 10));
        let mut latest = None;
        keep_latest(&mut latest, event(Action::Granted, 3, 1), at(20));
        let short = Requirement {
            min_notice_version: 3,
            grant_valid_days: Some(7),
        };
        assert!(!admits(latest.as_ref(), &short, at(20)));
    }
}
