use std::os::unix::fs::PermissionsExt as _;

use chrono::TimeZone as _;

use super::*;

fn secret() -> MasterSecret {
    MasterSecret::new(vec![7u8; 32]).unwrap()
}

fn at(day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, day, 9, 0, 0).unwrap()
}

fn seed_hex(dir: &Path, contract: &str, version: u32) -> String {
    let text = std::fs::read_to_string(dir.join(format!("{contract}.v{version}.seed"))).unwrap();
    let file: SeedFile = serde_json::from_str(&text).unwrap();
    file.seed
}

#[test]
fn a_key_is_made_once_and_read_back_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = KeyStore::open(dir.path(), secret()).unwrap();
    let made = store.key("sakura_foods", 1, at(1)).unwrap();
    assert_eq!(store.key("sakura_foods", 1, at(2)).unwrap(), made);
    drop(store);
    let reopened = KeyStore::open(dir.path(), secret()).unwrap();
    assert_eq!(reopened.key("sakura_foods", 1, at(3)).unwrap(), made);
    let listed = reopened.status().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].created, at(1), "the first making's date is kept");
}

#[test]
fn neither_the_master_secret_nor_the_store_alone_gives_the_key() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = KeyStore::open(one.path(), secret()).unwrap();
    let b = KeyStore::open(two.path(), secret()).unwrap();
    let key = a.key("sakura_foods", 1, at(1)).unwrap();
    assert_ne!(
        key,
        b.key("sakura_foods", 1, at(1)).unwrap(),
        "the same master secret with another seed is another key"
    );
    let other_secret = MasterSecret::new(vec![9u8; 32]).unwrap();
    let stolen = KeyStore::open(one.path(), other_secret).unwrap();
    assert_ne!(
        key,
        stolen.key("sakura_foods", 1, at(1)).unwrap(),
        "the seed with another master secret is another key"
    );
    assert_ne!(key, a.key("sakura_foods", 2, at(1)).unwrap());
    assert_ne!(key, a.key("kumo_denki", 1, at(1)).unwrap());
}

#[test]
fn a_destroyed_key_is_gone_refused_with_its_date_and_never_made_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = KeyStore::open(dir.path(), secret()).unwrap();
    let key = store.key("sakura_foods", 1, at(1)).unwrap();
    let seed = seed_hex(dir.path(), "sakura_foods", 1);
    let tombstone = store.destroy("sakura_foods", 1, "manual", at(5)).unwrap();
    assert_eq!(tombstone.key_id, key_id(&key));
    assert!(!dir.path().join("sakura_foods.v1.seed").exists());
    for file in std::fs::read_dir(dir.path()).unwrap() {
        let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
        assert!(!text.contains(&seed), "no file keeps the seed");
    }
    let reopened = KeyStore::open(dir.path(), secret()).unwrap();
    let refused = reopened.key("sakura_foods", 1, at(6)).unwrap_err();
    assert!(
        matches!(&refused, Error::Precondition(m) if m.contains("destroyed on 2026-11-05")),
        "{refused}"
    );
    assert_eq!(reopened.existing_key("sakura_foods", 1).unwrap(), None);
    let listed = reopened.status().unwrap();
    assert_eq!(listed[0].destroyed, Some((at(5), "manual".to_string())));
    assert_eq!(listed[0].key_id, tombstone.key_id);
    assert_eq!(
        reopened.destroy("sakura_foods", 1, "again", at(7)).unwrap(),
        tombstone,
        "destroying twice reports the first destruction"
    );
}

#[test]
fn a_destruction_cut_by_a_crash_is_finished_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = KeyStore::open(dir.path(), secret()).unwrap();
    store.key("sakura_foods", 1, at(1)).unwrap();
    let seed_file = dir.path().join("sakura_foods.v1.seed");
    let kept = std::fs::read(&seed_file).unwrap();
    store.destroy("sakura_foods", 1, "expiry", at(5)).unwrap();
    // The crash came after the tombstone and before the seed was removed.
    std::fs::write(&seed_file, kept).unwrap();
    assert_eq!(
        store.undestroyed().unwrap(),
        vec![("sakura_foods".into(), 1)]
    );
    let reopened = KeyStore::open(dir.path(), secret()).unwrap();
    assert!(!seed_file.exists());
    assert!(reopened.undestroyed().unwrap().is_empty());
    assert!(reopened.key("sakura_foods", 1, at(6)).is_err());
}

#[test]
fn two_processes_making_one_key_at_once_end_with_one_key() {
    for _ in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<CollaborationKey> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let store = KeyStore::open(dir.path(), secret()).unwrap();
                        store.key("sakura_foods", 1, at(1)).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.windows(2).all(|w| w[0] == w[1]));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left");
    }
}

#[test]
fn the_store_is_private_to_its_owner_and_its_listing_holds_no_key_material() {
    let dir = tempfile::tempdir().unwrap();
    let at_dir = dir.path().join("keys");
    let store = KeyStore::open(&at_dir, secret()).unwrap();
    let key = store.key("sakura_foods", 1, at(1)).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&at_dir), 0o700);
    assert_eq!(mode(&at_dir.join("sakura_foods.v1.seed")), 0o600);
    let listing = serde_json::to_string(&store.status().unwrap()).unwrap();
    let seed = seed_hex(&at_dir, "sakura_foods", 1);
    let exported = key.export();
    let key_hex = exported.split_once('.').unwrap().1;
    assert!(!listing.contains(&seed) && !listing.contains(key_hex));
}

#[test]
fn contract_ids_that_could_name_another_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = KeyStore::open(dir.path(), secret()).unwrap();
    for bad in ["../x", "a/b", "", "a.b", &"x".repeat(65)] {
        assert!(
            matches!(store.key(bad, 1, at(1)), Err(Error::Config(_))),
            "{bad:?}"
        );
    }
}
