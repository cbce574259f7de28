//! The tables the store keeps, in one place: each one's schema and its columns, by name and by
//! position. Whoever writes or reads a stored table (ingest, the store, the audience, the safe
//! views) takes both from here, so no column is read by a bare number, and a change of a table is
//! a change of this file.
//!
//! Nothing here holds an identifier: members are keyed by pseudonym, and partners' customers by
//! their record number in the list.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Instants, in microseconds since the epoch, UTC.
fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// A schema from columns listed with their positions, which must be 0, 1, 2, … in order: the
/// position constants of each table are checked against its field list every time it is built.
fn schema_of(columns: Vec<(usize, &str, DataType, bool)>) -> SchemaRef {
    let fields: Vec<Field> = columns
        .into_iter()
        .enumerate()
        .map(|(at, (position, name, data_type, nullable))| {
            assert_eq!(
                at, position,
                "column {name} is declared at the wrong position"
            );
            Field::new(name, data_type, nullable)
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// Every retailer table (members, purchases, consent) keeps its member key at the same place.
const _: () = assert!(
    members::MEMBER_KEY == purchases::MEMBER_KEY && members::MEMBER_KEY == consent::MEMBER_KEY
);

/// The member keys of a batch of a retailer table (members, purchases, consent); `None` if the
/// batch has no such column.
pub fn member_keys(
    batch: &datafusion::arrow::record_batch::RecordBatch,
) -> Option<&datafusion::arrow::array::Int64Array> {
    use datafusion::arrow::array::AsArray as _;
    use datafusion::arrow::datatypes::Int64Type;
    batch
        .columns()
        .get(members::MEMBER_KEY)
        .and_then(|c| c.as_primitive_opt::<Int64Type>())
}

/// The member table: one row per retailer member, replaced whole by a member ingest.
pub mod members {
    use super::*;

    /// The member's pseudonym (a keyed hash of the retailer's member id).
    pub const MEMBER_KEY: usize = 0;
    /// Ten-year age band on the export's date.
    pub const AGE_BAND: usize = 1;
    /// Prefecture.
    pub const PREFECTURE: usize = 2;
    /// Gender, generalized.
    pub const GENDER: usize = 3;

    /// The stored member table.
    pub fn schema() -> SchemaRef {
        schema_of(vec![
            (MEMBER_KEY, "member_key", DataType::Int64, false),
            (AGE_BAND, "age_band", DataType::Utf8, false),
            (PREFECTURE, "prefecture", DataType::Utf8, false),
            (GENDER, "gender", DataType::Utf8, false),
        ])
    }
}

/// Match tokens: a collaboration's member tokens (one table per contract), or a partner's
/// customer list (with the partner's attribute of each customer).
pub mod tokens {
    use super::*;

    /// The member key for member tokens; the record's number in the list for a partner list.
    pub const OWNER: usize = 0;
    /// The collaboration key's version the token was made with.
    pub const KEY_VERSION: usize = 1;
    /// HMAC-SHA256 of the normalized identifier under the collaboration key (32 bytes).
    pub const MAC: usize = 2;
    /// A partner list's attribute of the customer (lists only; may be empty).
    pub const ATTRIBUTE: usize = 3;

    /// The stored tokens, with the attribute column for a partner list.
    pub fn schema(with_attribute: bool) -> SchemaRef {
        let mut columns = vec![
            (OWNER, "owner", DataType::Int64, false),
            (KEY_VERSION, "key_version", DataType::UInt32, false),
            (MAC, "mac", DataType::FixedSizeBinary(32), false),
        ];
        if with_attribute {
            columns.push((ATTRIBUTE, "attribute", DataType::Utf8, true));
        }
        schema_of(columns)
    }
}

/// Purchases: one row per purchase line, a file per local month of each ingest. Its schema is
/// also the `purchases` safe view's.
pub mod purchases {
    use super::*;

    /// The buyer's pseudonym.
    pub const MEMBER_KEY: usize = 0;
    /// When, UTC.
    pub const PURCHASED_AT: usize = 1;
    /// Product code.
    pub const SKU: usize = 2;
    /// Brand.
    pub const BRAND: usize = 3;
    /// Manufacturer.
    pub const MANUFACTURER: usize = 4;
    /// Category (in the rules' domain when one is set).
    pub const CATEGORY: usize = 5;
    /// Units.
    pub const QUANTITY: usize = 6;
    /// Amount in yen.
    pub const AMOUNT: usize = 7;

    /// The stored purchases table.
    pub fn schema() -> SchemaRef {
        schema_of(vec![
            (MEMBER_KEY, "member_key", DataType::Int64, false),
            (PURCHASED_AT, "purchased_at", timestamp(), false),
            (SKU, "sku", DataType::Utf8, false),
            (BRAND, "brand", DataType::Utf8, false),
            (MANUFACTURER, "manufacturer", DataType::Utf8, false),
            (CATEGORY, "category", DataType::Utf8, false),
            (QUANTITY, "quantity", DataType::Int64, false),
            (AMOUNT, "amount", DataType::Int64, false),
        ])
    }
}

/// The consent log: every grant and withdrawal, as received (the latest per member and purpose
/// decides).
pub mod consent {
    use super::*;

    /// The member's pseudonym.
    pub const MEMBER_KEY: usize = 0;
    /// The purpose consented to or withdrawn from.
    pub const PURPOSE: usize = 1;
    /// The notice version the member saw.
    pub const NOTICE_VERSION: usize = 2;
    /// `granted` or `withdrawn`.
    pub const ACTION: usize = 3;
    /// When, UTC.
    pub const AT: usize = 4;
    /// Capture channel.
    pub const SOURCE: usize = 5;
    /// When a grant lapses, if it does.
    pub const EXPIRES_AT: usize = 6;

    /// The stored consent log.
    pub fn schema() -> SchemaRef {
        schema_of(vec![
            (MEMBER_KEY, "member_key", DataType::Int64, false),
            (PURPOSE, "purpose", DataType::Utf8, false),
            (NOTICE_VERSION, "notice_version", DataType::UInt32, false),
            (ACTION, "action", DataType::Utf8, false),
            (AT, "at", timestamp(), false),
            (SOURCE, "source", DataType::Utf8, false),
            (EXPIRES_AT, "expires_at", timestamp(), true),
        ])
    }
}

/// Erasure tombstones: for every erased member and purpose, a withdrawal at the erasure, so a
/// later consent ingest cannot bring back an event from before it. The member is named by a keyed
/// digest of their pseudonym under a key of its own (`MasterSecret::member_digest_key("erasure")`),
/// never by the pseudonym: every table joins on the pseudonym, and an erased member's must be in
/// no file. This table is read only by consent ingests; no question or view reads it.
pub mod erasures {
    use super::*;

    /// The member's erasure digest.
    pub const MEMBER_DIGEST: usize = 0;
    /// The purpose withdrawn.
    pub const PURPOSE: usize = 1;
    /// When the member was erased, UTC: consent events up to then are refused.
    pub const ERASED_AT: usize = 2;

    /// The stored tombstones.
    pub fn schema() -> SchemaRef {
        schema_of(vec![
            (MEMBER_DIGEST, "member_digest", DataType::Int64, false),
            (PURPOSE, "purpose", DataType::Utf8, false),
            (ERASED_AT, "erased_at", timestamp(), false),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Building each schema checks its position constants (a wrong one panics).
    #[test]
    fn every_column_sits_at_its_declared_position() {
        let named = [
            (members::schema(), members::GENDER, "gender"),
            (tokens::schema(true), tokens::ATTRIBUTE, "attribute"),
            (tokens::schema(false), tokens::MAC, "mac"),
            (purchases::schema(), purchases::AMOUNT, "amount"),
            (consent::schema(), consent::EXPIRES_AT, "expires_at"),
            (erasures::schema(), erasures::ERASED_AT, "erased_at"),
        ];
        for (schema, last, name) in named {
            assert_eq!(schema.fields().len(), last + 1);
            assert_eq!(schema.field(last).name(), name);
        }
    }

    #[test]
    #[should_panic(expected = "wrong position")]
    fn a_column_declared_out_of_place_is_caught() {
        schema_of(vec![
            (0, "a", DataType::Int64, false),
            (2, "b", DataType::Int64, false),
        ]);
    }
}
