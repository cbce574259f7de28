//! Keyed set fingerprints (an invertible Bloom lookup table) that measure small symmetric differences without storing ids.
//!
//! Each member id is replaced by `h` = the first 8 bytes of HMAC-SHA256(key, id as 8
//! little-endian bytes); only XOR sums of such values, of `g(h)` and signed counts are
//! stored. Without the key nothing in a fingerprint can be tied to an id; with the key,
//! membership of a guessed id can be tested, so the key must stay secret (and should
//! differ from the one used for sticky noise).
//!
//! # Table shape and the number of cells
//!
//! The table has [`HASHES`] sub-tables of `sub_len(capacity) = 8 + ⌈3·capacity/10⌉`
//! cells each, and every element occupies exactly one cell in every sub-table, so its
//! cells are always distinct. In total
//!
//! ```text
//! cells_for(capacity) = HASHES · (8 + ⌈3·capacity/10⌉)  ≈  3·capacity + 80
//! ```
//!
//! Subtracting two tables leaves the D elements of the symmetric difference, and
//! peeling (repeatedly removing the element of a cell that holds exactly one) recovers
//! them unless some j of those elements form a *stopping set*: in every sub-table each
//! cell they touch is touched at least twice. For j elements thrown into a sub-table of
//! s cells, let q_j(s) be the chance that no cell gets exactly one (q_2 = 1/s, q_3 =
//! 1/s², q_4 ≈ 3/s², …); sub-tables are independent, so
//!
//! ```text
//! P(peeling fails) ≤ Σ_{j=2..D} C(D, j) · q_j(s)^HASHES
//! ```
//!
//! The j = 2 term, C(D,2)/s^HASHES (two elements sharing all their cells), dominates for
//! small D. With the three hash functions of a textbook IBLT it forces s ≈ 330 for D = 9
//! just to reach 1e-6 (≈ 20 KB, as much as a plain list of 2,500 ids); with ten, the
//! formula above keeps the bound at or below 1e-8 for every D ≤ capacity ≤ 100 (checked
//! by `union_bound_supports_cell_formula`), and for large capacities the ratio cells/D
//! ≥ 3 stays well above the peeling threshold for ten hashes (about 2.2). Measured
//! failure rates are in the tests.
//!
//! # Telling "large" from a wrong small number
//!
//! [`Fingerprint::difference`] returns a count only if peeling empties the table
//! completely, every peeled cell passed the 64-bit check `check_sum == g(key_sum)` and
//! sits where its element hashes to, at most `capacity` elements were peeled, and the
//! peeled elements account for the difference of the set sizes. A wrong count would need
//! a 64-bit check collision (about 2^-64 per peel step) or two members with the same h.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// Cells per element: one in each of this many sub-tables (see the module docs for why ten).
pub const HASHES: usize = 10;

/// The largest supported `capacity` (about 3.9 MB per fingerprint at this size).
pub const MAX_CAPACITY: usize = 1 << 16;

/// Bytes before the cells: magic+version, key tag, capacity, size.
const HEADER_LEN: usize = 4 + 8 + 4 + 8;
const CELL_LEN: usize = 4 + 8 + 8;
const MAGIC: [u8; 4] = *b"GFP1";

/// Message for the key tag. It is not 8 bytes long, so it cannot collide with a member's HMAC message.
const KEY_TAG_LABEL: &[u8] = b"cleanroom/guard/fingerprint/key-tag/v1";
/// Prefix of the unkeyed hash that turns h into g(h) and the cell positions. It cannot
/// take the key: `difference` must recompute it from a peeled key_sum alone.
const CELL_DOMAIN: &[u8] = b"cleanroom/guard/fingerprint/cell/v1";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Cell {
    count: i32,
    key_sum: u64,
    check_sum: u64,
}

impl Cell {
    fn is_empty(&self) -> bool {
        *self == Cell::default()
    }
}

/// A compact keyed summary of a set of member ids for measuring small set differences.
///
/// Built by [`Fingerprint::of`], compared by [`Fingerprint::difference`], stored with
/// [`Fingerprint::to_bytes`] / [`Fingerprint::from_bytes`]. Two fingerprints are
/// comparable only if made with the same key and capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// Number of distinct members summarised.
    pub size: u64,
    cells: Vec<Cell>,
    /// First 8 bytes of HMAC(key, KEY_TAG_LABEL): lets `difference` refuse to compare
    /// fingerprints made under different keys instead of returning a meaningless count.
    key_tag: u64,
    capacity: u32,
}

/// Cells in each sub-table for a given capacity (see the module docs).
const fn sub_len(capacity: usize) -> usize {
    8 + (3 * capacity).div_ceil(10)
}

/// The number of cells in a fingerprint of this capacity: `HASHES · (8 + ⌈3·capacity/10⌉)`.
pub const fn cells_for(capacity: usize) -> usize {
    HASHES * sub_len(capacity)
}

/// The length of [`Fingerprint::to_bytes`] for this capacity: `24 + 20 · cells_for(capacity)`.
pub const fn encoded_len(capacity: usize) -> usize {
    HEADER_LEN + CELL_LEN * cells_for(capacity)
}

fn keyed_mac(key: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

fn first_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("at least 8 bytes"))
}

/// g(h) and a 64-bit seed for h's cell positions, from one SHA-256 of h.
fn derive(h: u64) -> (u64, u64) {
    let digest = Sha256::new()
        .chain_update(CELL_DOMAIN)
        .chain_update(h.to_le_bytes())
        .finalize();
    (first_u64(&digest[..8]), first_u64(&digest[8..16]))
}

/// SplitMix64's output function: a bijective mixer, so distinct inputs give distinct outputs.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The cell of an element with position seed `seed` in sub-table `table`.
fn cell_index(seed: u64, table: usize, sub_len: usize) -> usize {
    let lane = mix(seed.wrapping_add((table as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    // Multiply-shift maps 64 bits onto [0, sub_len) with bias below sub_len / 2^64.
    let offset = ((u128::from(lane) * sub_len as u128) >> 64) as usize;
    table * sub_len + offset
}

/// Adds (`sign` = 1) or removes (`sign` = -1) the element h from a table of `hashes` sub-tables.
fn toggle(cells: &mut [Cell], hashes: usize, h: u64, sign: i32) {
    let sub_len = cells.len() / hashes;
    let (g, seed) = derive(h);
    for table in 0..hashes {
        let cell = &mut cells[cell_index(seed, table, sub_len)];
        cell.count = cell.count.wrapping_add(sign);
        cell.key_sum ^= h;
        cell.check_sum ^= g;
    }
}

/// Peels a difference table. Returns (elements with count +1, elements with count -1)
/// if it empties completely after at most `limit` elements, else `None`.
fn peel(cells: &mut [Cell], hashes: usize, limit: usize) -> Option<(u64, u64)> {
    let sub_len = cells.len() / hashes;
    let mut candidates: Vec<usize> = (0..cells.len())
        .filter(|&i| cells[i].count.unsigned_abs() == 1)
        .collect();
    let (mut plus, mut minus) = (0u64, 0u64);
    while let Some(i) = candidates.pop() {
        let cell = cells[i];
        if cell.count != 1 && cell.count != -1 {
            continue;
        }
        let (g, seed) = derive(cell.key_sum);
        // A cell is pure only if its check matches and its element really hashes here.
        if g != cell.check_sum || cell_index(seed, i / sub_len, sub_len) != i {
            continue;
        }
        if plus + minus == limit as u64 {
            return None; // more than `limit` elements: "large"
        }
        let sign = cell.count;
        toggle(cells, hashes, cell.key_sum, -sign);
        candidates.extend((0..hashes).map(|table| cell_index(seed, table, sub_len)));
        if sign == 1 { plus += 1 } else { minus += 1 }
    }
    cells.iter().all(Cell::is_empty).then_some((plus, minus))
}

impl Fingerprint {
    /// The fingerprint of `members` under `key`, able to measure differences up to `capacity`.
    ///
    /// `capacity` is the largest difference that must be measured exactly (e.g. k-1).
    /// The table has [`cells_for`]`(capacity)` cells, sized so that peeling a difference
    /// of up to `capacity` elements fails with probability below 1e-8 (derivation in the
    /// module docs). Duplicate ids count once and order does not matter.
    ///
    /// # Panics
    /// If `capacity > MAX_CAPACITY`.
    pub fn of(key: &[u8], members: impl IntoIterator<Item = i64>, capacity: usize) -> Self {
        assert!(
            capacity <= MAX_CAPACITY,
            "capacity {capacity} exceeds {MAX_CAPACITY}"
        );
        let mut ids: Vec<i64> = members.into_iter().collect();
        ids.sort_unstable();
        ids.dedup(); // a repeated id would cancel in the XOR sums but not in the counts
        let mac = keyed_mac(key);
        let mut cells = vec![Cell::default(); cells_for(capacity)];
        for &id in &ids {
            let mut m = mac.clone();
            m.update(&id.to_le_bytes());
            toggle(&mut cells, HASHES, first_u64(&m.finalize().into_bytes()), 1);
        }
        let mut tag = mac;
        tag.update(KEY_TAG_LABEL);
        Self {
            size: ids.len() as u64,
            cells,
            key_tag: first_u64(&tag.finalize().into_bytes()),
            capacity: capacity as u32,
        }
    }

    /// The capacity this fingerprint was built with.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// The exact symmetric difference size if it is at most `capacity`, else None ("large").
    ///
    /// Also `None` if the two were made with different keys or capacities. Exact
    /// whenever the true difference is at most `capacity`, except with probability
    /// below 1e-8 (then `None`); a difference above `capacity` gives `None` except with
    /// probability about 2^-64. See the module docs.
    pub fn difference(&self, other: &Self) -> Option<u64> {
        if self.key_tag != other.key_tag
            || self.capacity != other.capacity
            || self.cells.len() != other.cells.len()
        {
            return None;
        }
        let size_delta = i128::from(self.size) - i128::from(other.size);
        if size_delta.unsigned_abs() > u128::from(self.capacity) {
            return None; // at least |size_a - size_b| members differ
        }
        let mut cells: Vec<Cell> = self
            .cells
            .iter()
            .zip(&other.cells)
            .map(|(a, b)| Cell {
                count: a.count.wrapping_sub(b.count),
                key_sum: a.key_sum ^ b.key_sum,
                check_sum: a.check_sum ^ b.check_sum,
            })
            .collect();
        let (plus, minus) = peel(&mut cells, HASHES, self.capacity())?;
        (i128::from(plus) - i128::from(minus) == size_delta).then_some(plus + minus)
    }

    /// The fixed-layout encoding: `b"GFP1"`, key tag (u64), capacity (u32), size (u64),
    /// then per cell count (i32), key_sum (u64), check_sum (u64); all little endian.
    /// Its length is [`encoded_len`]`(capacity)`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + CELL_LEN * self.cells.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.key_tag.to_le_bytes());
        out.extend_from_slice(&self.capacity.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        for cell in &self.cells {
            out.extend_from_slice(&cell.count.to_le_bytes());
            out.extend_from_slice(&cell.key_sum.to_le_bytes());
            out.extend_from_slice(&cell.check_sum.to_le_bytes());
        }
        out
    }

    /// Parses [`Fingerprint::to_bytes`] output; `None` on a wrong magic or version, a
    /// capacity above [`MAX_CAPACITY`], or a length that does not match the capacity.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let header = bytes.get(..HEADER_LEN)?;
        if header[..4] != MAGIC {
            return None;
        }
        let key_tag = u64::from_le_bytes(header[4..12].try_into().ok()?);
        let capacity = u32::from_le_bytes(header[12..16].try_into().ok()?);
        let size = u64::from_le_bytes(header[16..24].try_into().ok()?);
        if capacity as usize > MAX_CAPACITY || bytes.len() != encoded_len(capacity as usize) {
            return None;
        }
        let cells = bytes[HEADER_LEN..]
            .chunks_exact(CELL_LEN)
            .map(|c| Cell {
                count: i32::from_le_bytes(c[..4].try_into().expect("4 bytes")),
                key_sum: first_u64(&c[4..12]),
                check_sum: first_u64(&c[12..20]),
            })
            .collect();
        Some(Self {
            size,
            cells,
            key_tag,
            capacity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;
    use std::collections::HashSet;

    const KEY: &[u8] = b"fingerprint test key";

    fn rng(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    /// A random set of `n` distinct ids.
    fn random_set(rng: &mut ChaCha20Rng, n: usize) -> HashSet<i64> {
        let mut set = HashSet::with_capacity(n);
        while set.len() < n {
            set.insert(rng.next_u64() as i64);
        }
        set
    }

    /// A random set `a` with 1..=5000 members and `b` at symmetric difference exactly
    /// `d`, with a random split between removed and added members.
    fn pair_at_distance(rng: &mut ChaCha20Rng, d: usize) -> (HashSet<i64>, HashSet<i64>) {
        let n = rng.random_range(1..=5000);
        let a = random_set(rng, n);
        let removed = rng.random_range(0..=d.min(a.len()));
        let mut b: HashSet<i64> = a.iter().copied().skip(removed).collect();
        while b.len() < a.len() - removed + (d - removed) {
            let id = rng.next_u64() as i64;
            if !a.contains(&id) {
                b.insert(id);
            }
        }
        (a, b)
    }

    fn fp(set: &HashSet<i64>, capacity: usize) -> Fingerprint {
        Fingerprint::of(KEY, set.iter().copied(), capacity)
    }

    #[test]
    fn exact_differences_up_to_capacity() {
        let mut rng = rng(1);
        let mut trials = 0;
        for (capacity, per_distance) in [(0, 20), (1, 20), (4, 30), (9, 60), (14, 50)] {
            for d in 0..=capacity {
                for _ in 0..per_distance {
                    let (a, b) = pair_at_distance(&mut rng, d);
                    let (fa, fb) = (fp(&a, capacity), fp(&b, capacity));
                    assert_eq!(
                        fa.difference(&fb),
                        Some(d as u64),
                        "capacity {capacity}, d {d}"
                    );
                    assert_eq!(
                        fb.difference(&fa),
                        Some(d as u64),
                        "capacity {capacity}, d {d}"
                    );
                    trials += 1;
                }
            }
        }
        println!("exact: {trials} pairs, 0 failures");
    }

    #[test]
    fn larger_differences_are_none() {
        let mut rng = rng(2);
        let mut trials = 0;
        for (capacity, per_distance) in [(0, 10), (1, 10), (4, 20), (9, 20), (14, 20)] {
            let distances = (capacity + 1..=3 * capacity.max(1)).chain([50, 400, 5000]);
            for d in distances {
                for _ in 0..per_distance {
                    let (a, b) = pair_at_distance(&mut rng, d);
                    assert_eq!(
                        fp(&a, capacity).difference(&fp(&b, capacity)),
                        None,
                        "capacity {capacity}, d {d}"
                    );
                    trials += 1;
                }
            }
        }
        println!("large: {trials} pairs, 0 wrong answers");
    }

    /// Peels `trials` random differences of exactly `d` elements in a table of `cells`
    /// cells with `hashes` sub-tables; returns how many failed to decode exactly.
    /// Random 64-bit values stand in for the HMAC outputs, which is what they look like.
    fn peel_failures(hashes: usize, cells: usize, d: usize, trials: u32, seed: u64) -> u32 {
        let mut rng = rng(seed);
        let mut table = vec![Cell::default(); cells];
        let mut failures = 0;
        for _ in 0..trials {
            table.fill(Cell::default());
            let mut plus = 0;
            for _ in 0..d {
                let sign = if rng.random::<bool>() { 1 } else { -1 };
                plus += u64::from(sign == 1);
                toggle(&mut table, hashes, rng.next_u64(), sign);
            }
            if peel(&mut table, hashes, d) != Some((plus, d as u64 - plus)) {
                failures += 1;
            }
        }
        failures
    }

    #[test]
    fn peeling_at_capacity_does_not_fail() {
        for capacity in [9, 14] {
            let failures = peel_failures(HASHES, cells_for(capacity), capacity, 200_000, 3);
            println!(
                "capacity {capacity}: {failures} failures in 200000 peels of {capacity} elements"
            );
            assert_eq!(failures, 0);
        }
    }

    #[test]
    #[ignore = "long: run with --ignored to measure the failure rate over millions of peels"]
    fn peeling_at_capacity_does_not_fail_long() {
        for capacity in [2, 9, 14, 30] {
            let failures = peel_failures(HASHES, cells_for(capacity), capacity, 5_000_000, 4);
            println!("capacity {capacity}: {failures} failures in 5000000 peels");
            assert_eq!(failures, 0);
        }
        for capacity in [100, 1000] {
            let failures = peel_failures(HASHES, cells_for(capacity), capacity, 20_000, 5);
            println!("capacity {capacity}: {failures} failures in 20000 peels");
            assert_eq!(failures, 0);
        }
    }

    #[test]
    fn three_hashes_would_fail_at_this_size() {
        // Why HASHES is not 3: with the same cell budget, two elements sharing all three
        // of their cells (probability about C(9,2)/36^3 ≈ 8e-4) is common enough to see.
        let cells = 3 * (cells_for(9) / 3);
        let failures = peel_failures(3, cells, 9, 100_000, 6);
        println!("3 hashes, {cells} cells, 9 elements: {failures} failures in 100000");
        assert!(failures > 10);
    }

    /// Σ_{j=2..d} C(d, j) q_j(s)^hashes from the module docs, with q_j(s) from the
    /// associated Stirling numbers (partitions of j balls into blocks of size >= 2).
    fn union_bound(d: usize, s: usize, hashes: usize) -> f64 {
        let mut stirling = vec![vec![0.0f64; d / 2 + 2]; d + 1];
        stirling[0][0] = 1.0;
        for n in 2..=d {
            for b in 1..=n / 2 {
                stirling[n][b] =
                    b as f64 * stirling[n - 1][b] + (n - 1) as f64 * stirling[n - 2][b - 1];
            }
        }
        let s_f = s as f64;
        let mut total = 0.0;
        let mut choose = d as f64; // C(d, 1)
        for (j, row) in stirling.iter().enumerate().skip(2) {
            choose *= (d - j + 1) as f64 / j as f64;
            let mut q = 0.0;
            for (b, &partitions) in row.iter().enumerate().take(j / 2 + 1).skip(1) {
                // S(j,b) · s(s-1)…(s-b+1) / s^j, arranged to stay in range; the falling
                // factorial is 0 once b > s (more blocks than cells).
                let falling: f64 = (0..b).map(|i| (s_f - i as f64).max(0.0) / s_f).product();
                q += partitions * falling / s_f.powi((j - b) as i32);
            }
            total += choose * q.powi(hashes as i32);
        }
        total
    }

    #[test]
    fn union_bound_supports_cell_formula() {
        let mut worst: f64 = 0.0;
        for capacity in 1..=100 {
            let bound = union_bound(capacity, sub_len(capacity), HASHES);
            worst = worst.max(bound);
            assert!(bound <= 1e-8, "capacity {capacity}: bound {bound}");
        }
        println!("worst union bound over capacities 1..=100: {worst:.2e}");
        // Sanity of the bound itself: the pair term alone for 3 hashes at s = 36, d = 9.
        assert!((union_bound(9, 36, 3) - 36.0 / 36f64.powi(3)).abs() < 1e-5);
    }

    #[test]
    fn identical_and_empty_sets() {
        let set = random_set(&mut rng(7), 3000);
        assert_eq!(fp(&set, 9).difference(&fp(&set, 9)), Some(0));
        let empty = HashSet::new();
        assert_eq!(fp(&empty, 9).difference(&fp(&empty, 9)), Some(0));
        let small = random_set(&mut rng(8), 9);
        assert_eq!(fp(&small, 9).difference(&fp(&empty, 9)), Some(9));
        let ten = random_set(&mut rng(9), 10);
        assert_eq!(fp(&ten, 9).difference(&fp(&empty, 9)), None);
    }

    #[test]
    fn duplicates_and_order_do_not_matter() {
        let ids = [5i64, -3, 5, 99, i64::MIN, i64::MAX, -3];
        let once = Fingerprint::of(KEY, [i64::MAX, 99, -3, 5, i64::MIN], 9);
        assert_eq!(Fingerprint::of(KEY, ids, 9), once);
        assert_eq!(once.size, 5);
    }

    #[test]
    fn different_keys_or_capacities_do_not_compare() {
        let set = random_set(&mut rng(10), 2);
        let a = Fingerprint::of(b"key one", set.iter().copied(), 9);
        let b = Fingerprint::of(b"key two", set.iter().copied(), 9);
        assert_ne!(a, b);
        // Two members under two keys would otherwise peel as a difference of 4.
        assert_eq!(a.difference(&b), None);
        let c = Fingerprint::of(b"key one", set.iter().copied(), 10);
        assert_eq!(a.difference(&c), None);
        assert_eq!(a.difference(&a.clone()), Some(0));
    }

    #[test]
    fn serialization_round_trips_and_rejects_malformed() {
        let mut rng = rng(11);
        for capacity in [0, 1, 9, 14, 100] {
            let f = fp(&random_set(&mut rng, 777), capacity);
            let bytes = f.to_bytes();
            assert_eq!(bytes.len(), encoded_len(capacity));
            assert_eq!(Fingerprint::from_bytes(&bytes), Some(f.clone()));

            assert_eq!(Fingerprint::from_bytes(&bytes[..bytes.len() - 1]), None);
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(Fingerprint::from_bytes(&longer), None);
            let mut wrong_magic = bytes.clone();
            wrong_magic[3] = b'2';
            assert_eq!(Fingerprint::from_bytes(&wrong_magic), None);
            // A capacity whose table has a different number of cells no longer fits the length.
            let mut wrong_capacity = bytes.clone();
            wrong_capacity[12..16].copy_from_slice(&(capacity as u32 + 10).to_le_bytes());
            assert_eq!(Fingerprint::from_bytes(&wrong_capacity), None);
            let mut huge_capacity = bytes.clone();
            huge_capacity[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
            assert_eq!(Fingerprint::from_bytes(&huge_capacity), None);
        }
        assert_eq!(Fingerprint::from_bytes(&[]), None);
        println!(
            "encoded bytes: capacity 9 = {}, capacity 14 = {}",
            encoded_len(9),
            encoded_len(14)
        );
    }

    #[test]
    fn bytes_contain_no_member_id() {
        // Ids are 1e9 apart from tiny values so that header fields such as the size (a
        // small number followed by zero bytes) cannot match one by coincidence.
        let ids: Vec<i64> = (0..1000).map(|i| 1_000_000_000 + 7919 * i).collect();
        for capacity in [9, 14] {
            let bytes = Fingerprint::of(KEY, ids.iter().copied(), capacity).to_bytes();
            let windows: HashSet<&[u8]> = bytes.windows(8).collect();
            for id in &ids {
                assert!(!windows.contains(&id.to_le_bytes()[..]), "id {id} appears");
                assert!(
                    !windows.contains(&id.to_be_bytes()[..]),
                    "id {id} appears (BE)"
                );
            }
        }
    }

    #[test]
    fn extreme_counts_never_panic() {
        // i32::MIN has no absolute value in i32: a naive `abs()` would overflow.
        let good = fp(&(0..50).collect(), 9);
        let mut bytes = good.to_bytes();
        for cell in bytes[HEADER_LEN..].chunks_exact_mut(CELL_LEN).step_by(3) {
            cell[..4].copy_from_slice(&i32::MIN.to_le_bytes());
        }
        let bad = Fingerprint::from_bytes(&bytes).unwrap();
        assert_eq!(bad.difference(&good), None);
        assert_eq!(good.difference(&bad), None);
    }

    proptest! {
        #[test]
        fn difference_is_exact_or_none(
            a in proptest::collection::hash_set(-40i64..40, 0..30),
            b in proptest::collection::hash_set(-40i64..40, 0..30),
            capacity in 0usize..20,
        ) {
            let truth = a.symmetric_difference(&b).count();
            let got = fp(&a, capacity).difference(&fp(&b, capacity));
            prop_assert_eq!(got, (truth <= capacity).then_some(truth as u64));
        }

        #[test]
        fn corrupted_cells_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..20)) {
            let set: HashSet<i64> = (0..50).collect();
            let good = fp(&set, 9);
            let mut bytes = good.to_bytes();
            for (at, value) in flips {
                let i = HEADER_LEN + at % (bytes.len() - HEADER_LEN);
                bytes[i] ^= value;
            }
            let bad = Fingerprint::from_bytes(&bytes).expect("same length and header");
            let _ = bad.difference(&good);
            let _ = good.difference(&bad);
        }
    }
}
