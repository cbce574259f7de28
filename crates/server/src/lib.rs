//! The clean room's gRPC service.
//!
//! A call's path: the authentication layer ([`layer`]) checks the caller's credentials and limits
//! and builds the call's context ([`context::Call`]); a handler ([`partner`], [`admin`],
//! [`legal`]) reads that context and the shared state ([`state::App`]), converts the request
//! ([`convert`]), hands it to the engine (for a query, one call:
//! [`cleanroom_engine::guard::Guard::answer`]), and ends with [`state::App`]'s `finish`, which
//! writes the audit record before anything is answered. [`startup`] opens the state and serves;
//! [`status`] is the one place errors become gRPC statuses.
//!
//! Modules depend one way: state and configuration ([`live`], [`state`]) know no handler; the
//! per-call context builds on the state; handlers on both; start-up on everything.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod context;
pub mod convert;
pub mod disclosure;
pub mod ending;
pub mod erasure;
pub mod error;
pub mod faults;
pub mod layer;
pub mod legal;
mod limit;
pub mod live;
pub mod mark;
pub mod metrics;
pub mod page;
pub mod partner;
pub mod receipts;
mod receiving;
mod recovery;
mod requests;
mod retention;
mod retry;
pub mod review;
mod rotation;
pub mod startup;
pub mod state;
pub mod status;
mod stream;
pub mod tls;

pub use error::{Error, Result};
pub use live::{Reload, Sources};
pub use startup::{
    CONFIG_HEALTH, MAX_MESSAGE_BYTES, Running, serve, spawn, spawn_with_page, spawn_with_tls,
};
pub use state::{App, AppConfig, Clock, FixedClock, SystemClock};

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    /// The modules a source file names through `crate::` in its code (doc comments and its
    /// tests aside): `crate::a::b` and `crate::{a, b::c}` both count.
    fn imports(source: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
        let code: String = source
            .split("#[cfg(test)]")
            .next()
            .unwrap_or_default()
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut found = BTreeSet::new();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .collect(),
                None => vec![rest],
            };
            for name in names {
                let module: String = name
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if modules.contains(&module) {
                    found.insert(module);
                }
            }
        }
        found
    }

    /// Issue 9, item 10: state, per-call context, handlers and start-up wiring are separate
    /// modules, and no chain of imports leads from a module back to itself.
    #[test]
    fn modules_import_one_way() {
        let src =
            std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("src");
        let files: BTreeMap<String, String> = std::fs::read_dir(&src)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "rs"))
            .map(|p| {
                let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
                (stem, std::fs::read_to_string(&p).unwrap())
            })
            .collect();
        let modules: BTreeSet<String> = files.keys().cloned().collect();
        for expected in [
            "state", "context", "layer", "startup", "convert", "partner", "legal",
        ] {
            assert!(modules.contains(expected), "no module `{expected}`");
        }
        let graph: BTreeMap<&String, BTreeSet<String>> = files
            .iter()
            .map(|(module, source)| {
                let mut uses = imports(source, &modules);
                uses.remove(module);
                (module, uses)
            })
            .collect();
        for start in graph.keys() {
            let mut path = vec![(*start).clone()];
            let mut stack = vec![(*start).clone()];
            let mut seen = BTreeSet::new();
            while let Some(module) = stack.pop() {
                for next in &graph[&module] {
                    assert!(
                        next != *start,
                        "import circle through `{start}` (via `{module}`, from {path:?})"
                    );
                    if seen.insert(next.clone()) {
                        stack.push(next.clone());
                        path.push(next.clone());
                    }
                }
            }
        }
    }
}
