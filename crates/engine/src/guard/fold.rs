//! The fold: the per-member plan's rows (one per member and group) into the cells of the output
//! domain, each member's contribution to a metric clamped to its bound and each member counted in
//! at most `rows_per_member` rows.
//!
//! It reads every row the plan returns, millions at a retailer's size, so it works in stages over
//! columns rather than row by row through maps of small vectors: each row's cell and clamped
//! values are read first ([`Rows::read`]), the rows are grouped by member with one counting sort
//! ([`ByMember::of`]), and the groups are added up per cell ([`CellTotals`]), the members split
//! over the cores when there are many rows. Only a member with more rows than the cap is handled
//! one row at a time, as before.

use std::collections::HashMap;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringViewArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use sha2::{Digest, Sha256};

use super::Policy;
use super::plan::Shape;
use crate::audience::MemberMap;
use crate::{Error, Result};

/// The most cells an output domain may have (the product of its dimensions' sizes).
pub(super) const MAX_DOMAIN_CELLS: usize = 1_000_000;

/// The output of the per-member plan folded into cells of the output domain.
pub(super) struct Cells {
    /// Domain size of each dimension.
    pub sizes: Vec<usize>,
    /// Cells with at least one member: how many members, and their summed, clamped values.
    pub cells: HashMap<usize, CellData>,
    /// Result rows whose dimension values fall outside the declared domain (dropped).
    pub out_of_domain_rows: u64,
    /// Members who had more rows than the limit.
    pub members_capped: u64,
}

/// One cell with members in it.
#[derive(Debug, Default, PartialEq)]
pub(super) struct CellData {
    /// Distinct members in the cell.
    pub members: u64,
    /// Each metric's sum of the members' clamped values.
    pub values: Vec<i64>,
}

impl Cells {
    pub fn count(&self) -> usize {
        self.sizes.iter().product()
    }

    pub fn size(&self, cell: usize) -> i64 {
        self.cells
            .get(&cell)
            .map_or(0, |c| i64::try_from(c.members).unwrap_or(i64::MAX))
    }
}

/// Where the per-member plan's output keeps what the fold reads.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// Its GROUP BY columns come first; the member key follows them.
    pub groups: usize,
    /// For each declared dimension, its GROUP BY column.
    pub dimension_groups: Vec<usize>,
    /// For each metric, its aggregate (counted after the member key) and its per-member bound.
    pub metrics: Vec<(usize, u64)>,
}

impl Layout {
    pub fn of(shape: &Shape) -> Self {
        Self {
            groups: shape.aggregate.group_expr.len(),
            dimension_groups: shape.dimension_groups.clone(),
            metrics: shape
                .metrics
                .iter()
                .map(|m| (m.aggregate, m.bound))
                .collect(),
        }
    }
}

/// Which of a capped member's rows count: ordered by a keyed hash of the answer, the member and
/// the cell, so the choice is stable and unguessable.
pub(super) struct CapKey<'a> {
    pub noise_key: &'a [u8; 32],
    pub answer_key: &'a str,
}

/// Folds the per-member rows into cells of the output domain.
pub(super) fn fold(
    batches: &[RecordBatch],
    layout: &Layout,
    policy: &Policy,
    cap_key: &CapKey<'_>,
) -> Result<Cells> {
    let sizes = domain_sizes(policy)?;
    let rows = Rows::read(batches, layout, policy, &sizes)?;
    let shards = if rows.members.len() >= PARALLEL_ROWS {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        1
    };
    let (totals, members_capped) = fold_in_shards(&rows, policy.rows_per_member, cap_key, shards)?;
    Ok(Cells {
        sizes,
        cells: totals.into_cells(),
        out_of_domain_rows: rows.out_of_domain,
        members_capped,
    })
}

/// Rows from which the fold is worth splitting over the cores.
const PARALLEL_ROWS: usize = 1 << 16;

/// Folds the rows in `shards` parts side by side, each part the members of one residue of the
/// pseudonym (uniform, so the parts are even), then adds the parts' totals: a member's rows all
/// fall in one part, so capping and counting a member once per cell need nothing from the others.
fn fold_in_shards(
    rows: &Rows,
    rows_per_member: u32,
    cap_key: &CapKey<'_>,
    shards: usize,
) -> Result<(CellTotals, u64)> {
    if shards <= 1 {
        return fold_shard(rows, rows_per_member, cap_key, |_| true);
    }
    let parts = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..shards as u64)
            .map(|shard| {
                scope.spawn(move || {
                    fold_shard(rows, rows_per_member, cap_key, |member| {
                        (member as u64) % (shards as u64) == shard
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| Error::Guard("folding an answer failed".into()))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let mut all = CellTotals::new(rows.width);
    let mut capped = 0;
    for (totals, part_capped) in parts {
        all.merge(&totals);
        capped += part_capped;
    }
    Ok((all, capped))
}

/// Folds the rows of the members `mine` selects.
fn fold_shard(
    rows: &Rows,
    rows_per_member: u32,
    cap_key: &CapKey<'_>,
    mine: impl Fn(i64) -> bool,
) -> Result<(CellTotals, u64)> {
    let cap = rows_per_member as usize;
    let by_member = ByMember::of(&rows.members, mine)?;
    let mut totals = CellTotals::new(rows.width);
    let mut members_capped = 0;
    for (number, group) in by_member.groups().enumerate() {
        if group.len() > cap {
            members_capped += 1;
            let member = rows.members[group[0] as usize];
            for (cell, values) in capped_rows(rows, group, cap, member, cap_key) {
                totals.add(number, cell, &values);
            }
        } else {
            for row in group.iter().map(|r| *r as usize) {
                totals.add(number, rows.cells[row] as usize, rows.values(row));
            }
        }
    }
    Ok((totals, members_capped))
}

/// Each dimension's domain size, refusing a domain too large to protect.
fn domain_sizes(policy: &Policy) -> Result<Vec<usize>> {
    let sizes: Vec<usize> = policy.dimensions.iter().map(|(_, d)| d.len()).collect();
    sizes
        .iter()
        .try_fold(1usize, |acc, s| acc.checked_mul(*s))
        .filter(|c| *c <= MAX_DOMAIN_CELLS)
        .ok_or_else(|| Error::Guard("the output domain is too large to protect".into()))?;
    Ok(sizes)
}

/// A capped member's rows: all of them in a fixed order first (they arrive in whatever order the
/// plan's partitions finish, here or on a cluster, so which rows the cap keeps cannot depend on
/// it), then ordered by the keyed hash, and the first `cap` kept.
fn capped_rows(
    rows: &Rows,
    group: &[u32],
    cap: usize,
    member: i64,
    key: &CapKey<'_>,
) -> Vec<(usize, Vec<i64>)> {
    let mut chosen: Vec<(usize, Vec<i64>)> = group
        .iter()
        .map(|r| {
            (
                rows.cells[*r as usize] as usize,
                rows.values(*r as usize).to_vec(),
            )
        })
        .collect();
    chosen.sort_unstable();
    chosen.sort_by_key(|(cell, _)| {
        let mut h = Sha256::new();
        h.update(key.noise_key);
        h.update(key.answer_key.as_bytes());
        h.update(member.to_le_bytes());
        h.update(cell.to_le_bytes());
        h.finalize()
    });
    chosen.truncate(cap);
    chosen
}

/// The plan's rows that fall in the domain, as columns: member, cell, and clamped values.
struct Rows {
    members: Vec<i64>,
    cells: Vec<u32>,
    /// Row-major, `width` values a row.
    values: Vec<i64>,
    width: usize,
    out_of_domain: u64,
}

impl Rows {
    fn values(&self, row: usize) -> &[i64] {
        &self.values[row * self.width..(row + 1) * self.width]
    }

    fn read(
        batches: &[RecordBatch],
        layout: &Layout,
        policy: &Policy,
        sizes: &[usize],
    ) -> Result<Self> {
        let domains: Vec<DomainIndex> = policy
            .dimensions
            .iter()
            .map(|(_, values)| DomainIndex::of(values))
            .collect();
        let mut rows = Rows {
            members: Vec::new(),
            cells: Vec::new(),
            values: Vec::new(),
            width: layout.metrics.len(),
            out_of_domain: 0,
        };
        for batch in batches {
            rows.read_batch(batch, layout, &domains, sizes)?;
        }
        Ok(rows)
    }

    fn read_batch(
        &mut self,
        batch: &RecordBatch,
        layout: &Layout,
        domains: &[DomainIndex],
        sizes: &[usize],
    ) -> Result<()> {
        let cells = batch_cells(batch, layout, domains, sizes)?;
        let members = cast(batch.column(layout.groups), &DataType::Int64)?;
        let members = members.as_primitive::<Int64Type>();
        let metrics = layout
            .metrics
            .iter()
            .map(|(aggregate, _)| {
                cast(
                    batch.column(layout.groups + 1 + aggregate),
                    &DataType::Int64,
                )
            })
            .collect::<std::result::Result<Vec<ArrayRef>, _>>()?;
        let bounds: Vec<i64> = layout
            .metrics
            .iter()
            .map(|(_, bound)| i64::try_from(*bound).unwrap_or(i64::MAX))
            .collect();
        for (row, cell) in cells.into_iter().enumerate() {
            let Some(cell) = cell else {
                self.out_of_domain += 1;
                continue;
            };
            if !members.is_valid(row) {
                continue;
            }
            self.members.push(members.value(row));
            self.cells.push(cell);
            for (column, bound) in metrics.iter().zip(&bounds) {
                let column = column.as_primitive::<Int64Type>();
                let value = if column.is_valid(row) {
                    column.value(row)
                } else {
                    0
                };
                self.values.push(value.clamp(0, *bound));
            }
        }
        Ok(())
    }
}

/// Each row's cell of the domain, or `None` where a dimension's value is outside its domain.
fn batch_cells(
    batch: &RecordBatch,
    layout: &Layout,
    domains: &[DomainIndex],
    sizes: &[usize],
) -> Result<Vec<Option<u32>>> {
    let mut cells = vec![Some(0u32); batch.num_rows()];
    for (d, group) in layout.dimension_groups.iter().enumerate() {
        // String views: the engine's own string type, so the cast is usually no copy.
        let texts = cast(batch.column(*group), &DataType::Utf8View)?;
        let texts = texts.as_string_view();
        let size = sizes[d] as u32;
        for (row, cell) in cells.iter_mut().enumerate() {
            *cell = match (*cell, domains[d].position(texts, row)) {
                (Some(cell), Some(position)) => Some(cell * size + position),
                _ => None,
            };
        }
    }
    Ok(cells)
}

/// A dimension's domain, to find a value's position in it. Short values (12 bytes or fewer, as
/// most domain values are) sit whole in a string view's 16 bytes, so they are found by the view
/// alone, without reading the string.
struct DomainIndex {
    short: datafusion::common::HashMap<u128, u32>,
    long: datafusion::common::HashMap<String, u32>,
}

/// Longest string a string view holds inline.
const INLINE_LEN: usize = 12;

impl DomainIndex {
    fn of(values: &[String]) -> Self {
        let mut index = Self {
            short: Default::default(),
            long: Default::default(),
        };
        // A value listed twice keeps its last position, as a map built in order would.
        for (position, value) in values.iter().enumerate() {
            let position = position as u32;
            if value.len() <= INLINE_LEN {
                index.short.insert(inline_view(value.as_bytes()), position);
            } else {
                index.long.insert(value.clone(), position);
            }
        }
        index
    }

    fn position(&self, texts: &StringViewArray, row: usize) -> Option<u32> {
        if texts.is_null(row) {
            return None;
        }
        let view = texts.views()[row];
        let len = view as u32 as usize;
        if len <= INLINE_LEN {
            self.short.get(&without_padding(view, len)).copied()
        } else {
            self.long.get(texts.value(row)).copied()
        }
    }
}

/// The string view of a value of at most 12 bytes: its length, then its bytes, zero-padded.
fn inline_view(bytes: &[u8]) -> u128 {
    let mut view = [0u8; 16];
    view[..4].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
    view[4..4 + bytes.len()].copy_from_slice(bytes);
    u128::from_le_bytes(view)
}

/// An inline view with whatever follows its bytes cleared (a writer need not zero it).
fn without_padding(view: u128, len: usize) -> u128 {
    let bits = 32 + 8 * len;
    if bits >= 128 {
        view
    } else {
        view & ((1u128 << bits) - 1)
    }
}

/// The rows grouped by member: a permutation of the row numbers in which each member's rows are
/// adjacent, and where each member's group starts.
struct ByMember {
    order: Vec<u32>,
    starts: Vec<u32>,
}

impl ByMember {
    /// The rows of the members `mine` selects.
    fn of(members: &[i64], mine: impl Fn(i64) -> bool) -> Result<Self> {
        let too_many = || Error::Guard("the query's result has too many rows to protect".into());
        u32::try_from(members.len()).map_err(|_| too_many())?;
        // Each chosen row and its member's number (in order of first appearance), and each
        // member's row count.
        let mut numbers: MemberMap<u32> = MemberMap::default();
        let mut number_of_row: Vec<(u32, u32)> = Vec::new();
        let mut counts: Vec<u32> = Vec::new();
        for (row, member) in members.iter().enumerate() {
            if !mine(*member) {
                continue;
            }
            let next = counts.len() as u32;
            let number = *numbers.entry(*member).or_insert(next);
            if number == next {
                counts.push(0);
            }
            counts[number as usize] += 1;
            number_of_row.push((row as u32, number));
        }
        let mut starts = Vec::with_capacity(counts.len() + 1);
        let mut at = 0u32;
        starts.push(at);
        for count in &counts {
            at += count;
            starts.push(at);
        }
        let mut next = starts[..counts.len()].to_vec();
        let mut order = vec![0u32; number_of_row.len()];
        for (row, number) in number_of_row {
            let slot = &mut next[number as usize];
            order[*slot as usize] = row;
            *slot += 1;
        }
        Ok(Self { order, starts })
    }

    /// Each member's rows, in order of arrival.
    fn groups(&self) -> impl Iterator<Item = &[u32]> {
        self.starts
            .windows(2)
            .map(|w| &self.order[w[0] as usize..w[1] as usize])
    }
}

/// Running totals per cell: distinct members, and each metric's sum.
struct CellTotals {
    width: usize,
    slot_of_cell: datafusion::common::HashMap<usize, usize>,
    cells: Vec<usize>,
    members: Vec<u64>,
    /// The member (its number, plus one) counted last in each cell: a member's rows are added
    /// together, so a second row of the same member in a cell (values that map to the same
    /// domain value) still makes one member.
    last_member: Vec<usize>,
    sums: Vec<i64>,
}

impl CellTotals {
    fn new(width: usize) -> Self {
        Self {
            width,
            slot_of_cell: Default::default(),
            cells: Vec::new(),
            members: Vec::new(),
            last_member: Vec::new(),
            sums: Vec::new(),
        }
    }

    /// Where `cell`'s totals are kept, made empty if it has none yet.
    fn slot(&mut self, cell: usize) -> usize {
        if let Some(slot) = self.slot_of_cell.get(&cell) {
            return *slot;
        }
        let slot = self.cells.len();
        self.slot_of_cell.insert(cell, slot);
        self.cells.push(cell);
        self.members.push(0);
        self.last_member.push(0);
        self.sums.extend(std::iter::repeat_n(0, self.width));
        slot
    }

    fn add(&mut self, member_number: usize, cell: usize, values: &[i64]) {
        let slot = self.slot(cell);
        if self.last_member[slot] != member_number + 1 {
            self.last_member[slot] = member_number + 1;
            self.members[slot] += 1;
        }
        let sums = &mut self.sums[slot * self.width..(slot + 1) * self.width];
        for (total, value) in sums.iter_mut().zip(values) {
            *total = total.saturating_add(*value);
        }
    }

    /// Adds another part's totals, over members disjoint from this one's.
    fn merge(&mut self, other: &CellTotals) {
        for (slot, cell) in other.cells.iter().enumerate() {
            let mine = self.slot(*cell);
            self.members[mine] += other.members[slot];
            let theirs = &other.sums[slot * self.width..(slot + 1) * self.width];
            let sums = &mut self.sums[mine * self.width..(mine + 1) * self.width];
            for (total, value) in sums.iter_mut().zip(theirs) {
                *total = total.saturating_add(*value);
            }
        }
    }

    fn into_cells(self) -> HashMap<usize, CellData> {
        let width = self.width;
        self.cells
            .into_iter()
            .zip(self.members)
            .enumerate()
            .map(|(slot, (cell, members))| {
                let values = self.sums[slot * width..(slot + 1) * width].to_vec();
                (cell, CellData { members, values })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
