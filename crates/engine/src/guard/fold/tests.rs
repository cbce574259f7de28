//! The fold against a reference written as the rules read (one member at a time, through maps),
//! which is the fold the guard used before it worked by columns: every input must fold the same.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use datafusion::arrow::array::{Int64Array, StringArray, StringViewArray};
use datafusion::arrow::datatypes::{Field, Schema};
use proptest::prelude::*;

use super::*;

const NOISE_KEY: [u8; 32] = [7; 32];

fn policy(dimensions: Vec<Vec<String>>, rows_per_member: u32) -> Policy {
    Policy {
        k: 2,
        dimensions: dimensions
            .into_iter()
            .enumerate()
            .map(|(i, d)| (format!("d{i}"), d))
            .collect(),
        metrics: vec!["m0".into(), "m1".into()],
        metric_bounds: BTreeMap::new(),
        sensitive_columns: BTreeSet::new(),
        rows_per_member,
    }
}

fn layout(dimensions: usize) -> Layout {
    Layout {
        groups: dimensions,
        dimension_groups: (0..dimensions).rev().collect(),
        metrics: vec![(0, 1), (1, 500)],
    }
}

/// The fold as it was: per member a list of (cell, values), capped member by member.
fn reference(
    batches: &[RecordBatch],
    layout: &Layout,
    policy: &Policy,
) -> (Vec<(usize, CellData)>, u64, u64) {
    let sizes: Vec<usize> = policy.dimensions.iter().map(|(_, d)| d.len()).collect();
    let positions: Vec<HashMap<&str, usize>> = policy
        .dimensions
        .iter()
        .map(|(_, d)| d.iter().enumerate().map(|(i, v)| (v.as_str(), i)).collect())
        .collect();
    let mut per_member: HashMap<i64, Vec<(usize, Vec<i64>)>> = HashMap::new();
    let mut out_of_domain = 0;
    for batch in batches {
        let members = batch.column(layout.groups).as_primitive::<Int64Type>();
        'rows: for row in 0..batch.num_rows() {
            let mut cell = 0;
            for (d, g) in layout.dimension_groups.iter().enumerate() {
                let texts = cast(batch.column(*g), &DataType::Utf8).unwrap();
                let texts = texts.as_string::<i32>();
                let Some(p) = texts
                    .is_valid(row)
                    .then(|| positions[d].get(texts.value(row)))
                    .flatten()
                else {
                    out_of_domain += 1;
                    continue 'rows;
                };
                cell = cell * sizes[d] + p;
            }
            if !members.is_valid(row) {
                continue;
            }
            let values = layout
                .metrics
                .iter()
                .map(|(a, bound)| {
                    let c = batch
                        .column(layout.groups + 1 + a)
                        .as_primitive::<Int64Type>();
                    let v = if c.is_valid(row) { c.value(row) } else { 0 };
                    v.clamp(0, *bound as i64)
                })
                .collect();
            per_member
                .entry(members.value(row))
                .or_default()
                .push((cell, values));
        }
    }
    let cap = policy.rows_per_member as usize;
    let mut cells: HashMap<usize, (Vec<i64>, Vec<i64>)> = HashMap::new();
    let mut capped = 0;
    for (member, mut rows) in per_member {
        if rows.len() > cap {
            rows.sort_unstable();
            capped += 1;
            rows.sort_by_key(|(cell, _)| {
                let mut h = Sha256::new();
                h.update(NOISE_KEY);
                h.update(b"answer");
                h.update(member.to_le_bytes());
                h.update(cell.to_le_bytes());
                h.finalize()
            });
            rows.truncate(cap);
        }
        for (cell, values) in rows {
            let data = cells.entry(cell).or_default();
            if data.1.is_empty() {
                data.1 = vec![0; values.len()];
            }
            if data.0.last() != Some(&member) {
                data.0.push(member);
            }
            for (t, v) in data.1.iter_mut().zip(values) {
                *t = t.saturating_add(v);
            }
        }
    }
    let mut cells: Vec<(usize, CellData)> = cells
        .into_iter()
        .map(|(c, (m, values))| {
            (
                c,
                CellData {
                    members: m.len() as u64,
                    values,
                },
            )
        })
        .collect();
    cells.sort_by_key(|(c, _)| *c);
    (cells, out_of_domain, capped)
}

/// One row of the per-member plan's output: two dimension values, the member, two metrics.
type Row = (
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

/// One batch of the per-member plan's output: two dimension columns (the second a string view,
/// the first plain strings), the member key, then two metrics.
fn batch(rows: &[Row]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("g0", DataType::Utf8, true),
        Field::new("g1", DataType::Utf8View, true),
        Field::new("member", DataType::Int64, true),
        Field::new("a0", DataType::Int64, true),
        Field::new("a1", DataType::Int64, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(rows.iter().map(|r| r.0.clone()).collect::<StringArray>()),
            Arc::new(
                rows.iter()
                    .map(|r| r.1.clone())
                    .collect::<StringViewArray>(),
            ),
            Arc::new(rows.iter().map(|r| r.2).collect::<Int64Array>()),
            Arc::new(rows.iter().map(|r| r.3).collect::<Int64Array>()),
            Arc::new(rows.iter().map(|r| r.4).collect::<Int64Array>()),
        ],
    )
    .unwrap()
}

/// Domain values short and long (a view holds 12 bytes inline), and values outside the domain.
fn text() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some("a".to_string())),
        Just(Some("twelve_bytes".to_string())),
        Just(Some("thirteen_byte".to_string())),
        Just(Some("a much longer domain value".to_string())),
        Just(Some("outside".to_string())),
        Just(Some(String::new())),
    ]
}

fn domain() -> Vec<String> {
    [
        "a",
        "twelve_bytes",
        "thirteen_byte",
        "a much longer domain value",
        "",
    ]
    .map(String::from)
    .to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn folds_as_the_reference(
        chunks in prop::collection::vec(
            prop::collection::vec(
                (text(), text(), prop::option::weighted(0.95, 0i64..12),
                 prop::option::of(-3i64..5), prop::option::of(-100i64..900)),
                0..40),
            1..4),
        cap in 1u32..5,
        shards in 1usize..4,
    ) {
        let batches: Vec<RecordBatch> = chunks.iter().map(|c| batch(c)).collect();
        let policy = policy(vec![domain(), domain()], cap);
        let layout = layout(2);
        let key = CapKey { noise_key: &NOISE_KEY, answer_key: "answer" };
        let (expected, out_of_domain, capped) = reference(&batches, &layout, &policy);

        let folded = fold(&batches, &layout, &policy, &key).unwrap();
        let mut cells: Vec<(usize, CellData)> = folded.cells.into_iter().collect();
        cells.sort_by_key(|(c, _)| *c);
        prop_assert_eq!(&cells, &expected);
        prop_assert_eq!(folded.out_of_domain_rows, out_of_domain);
        prop_assert_eq!(folded.members_capped, capped);

        // Split over cores (as a large result is), the same.
        let rows = Rows::read(&batches, &layout, &policy, &[5, 5]).unwrap();
        let (totals, split_capped) = fold_in_shards(&rows, cap, &key, shards).unwrap();
        let mut split: Vec<(usize, CellData)> = totals.into_cells().into_iter().collect();
        split.sort_by_key(|(c, _)| *c);
        prop_assert_eq!(split, expected);
        prop_assert_eq!(split_capped, capped);
    }
}

#[test]
fn a_view_with_bytes_after_its_value_still_finds_it() {
    let view = inline_view(b"abc");
    let dirty = view | (0xff_u128 << 120);
    assert_eq!(without_padding(dirty, 3), view);
    assert_eq!(
        without_padding(inline_view(b"twelve_bytes"), 12),
        inline_view(b"twelve_bytes")
    );
}

#[test]
fn a_domain_too_large_is_refused() {
    let big: Vec<String> = (0..1001).map(|i| i.to_string()).collect();
    let policy = policy(vec![big.clone(), big], 1);
    let key = CapKey {
        noise_key: &NOISE_KEY,
        answer_key: "answer",
    };
    let refused = fold(&[], &layout(2), &policy, &key);
    assert!(matches!(refused, Err(Error::Guard(m)) if m.contains("too large")));
}
