//! Requests to end a collaboration that a legal reviewer has not yet confirmed, rebuilt from the
//! audit trail at start as approvals are (module `ending` carries them out).

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::audit::{Event, Record};

/// An analyst's request waiting for legal.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The partner of the collaboration.
    pub partner: String,
    /// Why.
    pub reason: String,
    /// The analyst who asked.
    pub requested_by: String,
}

/// Requests to end a collaboration that legal has not yet confirmed, by contract.
#[derive(Debug, Default)]
pub struct Requests {
    pending: Mutex<BTreeMap<String, Pending>>,
}

impl Requests {
    /// The pending requests the audit trail holds: asked, and not destroyed since.
    pub fn from_history(history: &[Record]) -> Self {
        let mut pending = BTreeMap::new();
        for record in history.iter().filter(|r| r.entry.outcome == "ok") {
            match &record.entry.event {
                Some(Event::DestructionRequested { contract, reason }) => {
                    let asked = Pending {
                        partner: record.entry.partner.clone().unwrap_or_default(),
                        reason: reason.clone(),
                        requested_by: record.entry.principal.clone(),
                    };
                    pending.insert(contract.clone(), asked);
                }
                Some(Event::Destroyed(d)) => {
                    pending.remove(&d.contract);
                }
                _ => {}
            }
        }
        Self {
            pending: Mutex::new(pending),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, contract: &str) -> Option<Pending> {
        self.lock().get(contract).cloned()
    }

    pub(crate) fn insert(&self, contract: &str, pending: Pending) {
        self.lock().insert(contract.to_string(), pending);
    }

    pub(crate) fn remove(&self, contract: &str) {
        self.lock().remove(contract);
    }
}
