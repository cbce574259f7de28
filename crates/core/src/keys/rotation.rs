//! Rotation with an overlap. Raising a contract's `key_version` from v to v+1 makes v+1 current;
//! v stays usable for `key_overlap_days` (lists of either version are accepted and matched, a
//! members ingest computes tokens under both), then the service's sweep destroys v.
//!
//! The overlap is counted from the moment the next version's seed was made: its seed file's
//! `created`, written once when the seed is linked into place and never rewritten. A restart
//! cannot extend it, and neither can a restored data directory (the key store is kept apart from
//! it and from its backups). Where no newer seed exists yet, the current one is made when the
//! rotation is first seen (at start-up, a reload's sweep, or an ingest), which anchors it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::{Entry, KeyStore};
use crate::Result;

/// A previous version of a contract's key that the store still holds, usable until its overlap
/// ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retiring {
    /// The key version.
    pub version: u32,
    /// When the version after it was made: the overlap is counted from here.
    pub replaced_at: DateTime<Utc>,
    /// When the overlap ends; from then on the sweep destroys the key (reason `rotation`).
    pub ends: DateTime<Utc>,
}

impl Retiring {
    /// Whether its overlap has ended at `now`.
    pub fn ended(&self, now: DateTime<Utc>) -> bool {
        now >= self.ends
    }
}

/// One version the store holds or held: when it was made, and whether it was destroyed.
#[derive(Debug, Clone, Copy)]
struct Held {
    created: DateTime<Utc>,
    destroyed: bool,
}

impl KeyStore {
    /// The versions of `contract`'s key older than `current` that the store still holds (a seed
    /// and no tombstone), oldest first, each with the end of its overlap of `overlap_days`. Where
    /// no newer version was made yet, the `current` key is made at `now` to anchor the overlap;
    /// none is made for a collaboration whose current key was destroyed (it has ended).
    pub fn retiring(
        &self,
        contract: &str,
        current: u32,
        overlap_days: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<Retiring>> {
        let held = self.versions_of(contract)?;
        let older_left = held.iter().any(|(v, h)| *v < current && !h.destroyed);
        if older_left && !held.contains_key(&current) {
            self.key(contract, current, now)?;
        }
        self.overlaps(contract, current, overlap_days)
    }

    /// As [`KeyStore::retiring`], changing nothing (for `cleanroom keys status`): an old
    /// version with no newer one made yet is left out (the service anchors its overlap when it
    /// first sees the rotation).
    pub fn overlaps(
        &self,
        contract: &str,
        current: u32,
        overlap_days: u32,
    ) -> Result<Vec<Retiring>> {
        let held = self.versions_of(contract)?;
        let overlap = chrono::Duration::days(i64::from(overlap_days));
        let mut retiring = Vec::new();
        for (version, h) in held.range(..current) {
            if h.destroyed {
                continue;
            }
            let Some((_, next)) = held.range(version + 1..).next() else {
                continue;
            };
            retiring.push(Retiring {
                version: *version,
                replaced_at: next.created,
                ends: next.created + overlap,
            });
        }
        Ok(retiring)
    }

    /// The versions of `contract`'s key usable at `now`, newest first: `current`, then each
    /// older one whose overlap has not ended. Empty once the current key was destroyed.
    pub fn live_versions(
        &self,
        contract: &str,
        current: u32,
        overlap_days: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<u32>> {
        if self.tombstone(contract, current)?.is_some() {
            return Ok(Vec::new());
        }
        let mut live = vec![current];
        for old in self
            .retiring(contract, current, overlap_days, now)?
            .iter()
            .rev()
        {
            if !old.ended(now) {
                live.push(old.version);
            }
        }
        Ok(live)
    }

    /// Every version of `contract` the store holds or held.
    fn versions_of(&self, contract: &str) -> Result<BTreeMap<u32, Held>> {
        let mut held = BTreeMap::new();
        for (name, version, kind) in self.entries()? {
            if name != contract {
                continue;
            }
            let entry = match kind {
                Entry::Tombstone => match self.tombstone(contract, version)? {
                    Some(t) => Held {
                        created: t.created,
                        destroyed: true,
                    },
                    None => continue,
                },
                Entry::Seed => match self.read_seed(contract, version)? {
                    Some(seed) => Held {
                        created: seed.created,
                        destroyed: false,
                    },
                    None => continue,
                },
            };
            // A tombstone wins over a seed a crash left beside it.
            held.entry(version)
                .and_modify(|h: &mut Held| h.destroyed |= entry.destroyed)
                .or_insert(entry);
        }
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;
    use crate::token::MasterSecret;

    fn at(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, day, 9, 0, 0).unwrap()
    }

    fn store() -> (tempfile::TempDir, std::sync::Arc<KeyStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::open(dir.path(), MasterSecret::new(vec![7u8; 32]).unwrap()).unwrap();
        (dir, store)
    }

    #[test]
    fn the_overlap_counts_from_the_new_version_being_made_and_a_reopen_does_not_move_it() {
        let (dir, store) = store();
        store.key("c", 1, at(1)).unwrap();
        assert_eq!(store.live_versions("c", 1, 7, at(2)).unwrap(), vec![1]);
        // The rules move to version 2 on day 3: the first look makes its key and anchors there.
        assert_eq!(store.live_versions("c", 2, 7, at(3)).unwrap(), vec![2, 1]);
        drop(store);
        let store = KeyStore::open(dir.path(), MasterSecret::new(vec![7u8; 32]).unwrap()).unwrap();
        let retiring = store.retiring("c", 2, 7, at(9)).unwrap();
        assert_eq!(retiring.len(), 1);
        assert_eq!(retiring[0].replaced_at, at(3), "not the reopen's day");
        assert_eq!(retiring[0].ends, at(10));
        assert_eq!(store.live_versions("c", 2, 7, at(9)).unwrap(), vec![2, 1]);
        assert_eq!(store.live_versions("c", 2, 7, at(10)).unwrap(), vec![2]);
        store.destroy("c", 1, "rotation", at(10)).unwrap();
        assert!(store.retiring("c", 2, 7, at(11)).unwrap().is_empty());
        assert_eq!(store.live_versions("c", 2, 7, at(11)).unwrap(), vec![2]);
    }

    #[test]
    fn no_overlap_ends_at_once_and_an_ended_collaboration_makes_nothing() {
        let (dir, store) = store();
        store.key("c", 1, at(1)).unwrap();
        assert_eq!(store.live_versions("c", 2, 0, at(2)).unwrap(), vec![2]);
        assert!(store.retiring("c", 2, 0, at(2)).unwrap()[0].ended(at(2)));
        store.destroy("c", 3, "expiry", at(4)).unwrap();
        assert!(store.live_versions("c", 3, 0, at(4)).unwrap().is_empty());
        assert!(!dir.path().join("c.v3.seed").exists());
        // A contract with only its current key has nothing retiring, and no key is made for it.
        assert!(store.retiring("d", 1, 7, at(4)).unwrap().is_empty());
        assert!(!dir.path().join("d.v1.seed").exists());
    }

    #[test]
    fn each_old_version_counts_from_its_own_successor() {
        let (_dir, store) = store();
        store.key("c", 1, at(1)).unwrap();
        store.key("c", 2, at(3)).unwrap();
        store.key("c", 3, at(5)).unwrap();
        let retiring = store.retiring("c", 3, 7, at(6)).unwrap();
        let ends: Vec<_> = retiring.iter().map(|r| (r.version, r.ends)).collect();
        assert_eq!(ends, vec![(1, at(10)), (2, at(12))]);
        assert_eq!(store.live_versions("c", 3, 7, at(11)).unwrap(), vec![3, 2]);
    }
}
