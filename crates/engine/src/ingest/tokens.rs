//! Rows of match tokens, for a collaboration's member tokens and for a partner's list.

use std::sync::Arc;

use cleanroom_core::token::Token;
use datafusion::arrow::array::{
    ArrayBuilder, ArrayRef, FixedSizeBinaryBuilder, Int64Builder, StringBuilder, UInt32Builder,
};
use datafusion::arrow::record_batch::RecordBatch;

use super::Rows;
use crate::{Result, tables};

/// Tokens of one identifier pair under every collaboration key, in a fixed order.
pub(super) struct TokenBuilder {
    owner: Int64Builder,
    version: UInt32Builder,
    mac: FixedSizeBinaryBuilder,
    attribute: Option<StringBuilder>,
}

impl TokenBuilder {
    pub(super) fn new(with_attribute: bool) -> Self {
        Self {
            owner: Int64Builder::new(),
            version: UInt32Builder::new(),
            mac: FixedSizeBinaryBuilder::new(32),
            attribute: with_attribute.then(StringBuilder::new),
        }
    }

    pub(super) fn push(&mut self, owner: i64, token: Token, attribute: Option<&str>) -> Result<()> {
        self.owner.append_value(owner);
        self.version.append_value(token.version);
        self.mac.append_value(token.mac)?;
        if let Some(builder) = &mut self.attribute {
            builder.append_option(attribute);
        }
        Ok(())
    }
}

impl Rows for TokenBuilder {
    fn len(&self) -> usize {
        self.owner.len()
    }

    fn take(&mut self) -> Result<RecordBatch> {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.owner.finish()),
            Arc::new(self.version.finish()),
            Arc::new(self.mac.finish()),
        ];
        if let Some(builder) = &mut self.attribute {
            columns.push(Arc::new(builder.finish()));
        }
        Ok(RecordBatch::try_new(
            tables::tokens::schema(self.attribute.is_some()),
            columns,
        )?)
    }
}
