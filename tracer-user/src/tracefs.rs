//! tracefs: where it is mounted and the field offsets of classic tracepoint records.

use std::{
    fs,
    path::{Path, PathBuf},
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted at {0} (run `cargo xtask setup` or `mount -t tracefs nodev {0}`)"
    )]
    NotMounted(String),
    #[error("tracepoint {0} does not exist on this kernel")]
    NoTracepoint(String),
    #[error("tracepoint {tp} has no field {field}")]
    NoField { tp: String, field: String },
}

#[derive(Clone, Debug)]
pub struct Tracefs {
    root: PathBuf,
}

impl Tracefs {
    /// Opens tracefs at `root`, which must be mounted (it must have an `events` folder).
    pub fn open(root: &Path) -> Result<Self, TracefsError> {
        if root.join("events").is_dir() {
            Ok(Tracefs {
                root: root.to_path_buf(),
            })
        } else {
            Err(TracefsError::NotMounted(root.display().to_string()))
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn has_tracepoint(&self, category: &str, name: &str) -> bool {
        self.root
            .join("events")
            .join(category)
            .join(name)
            .join("format")
            .is_file()
    }

    /// Offset of `field` in the record of `category/name`.
    pub fn field_offset(
        &self,
        category: &str,
        name: &str,
        field: &str,
    ) -> Result<u32, TracefsError> {
        let tp = format!("{category}/{name}");
        let format = fs::read_to_string(
            self.root
                .join("events")
                .join(category)
                .join(name)
                .join("format"),
        )
        .map_err(|_| TracefsError::NoTracepoint(tp.clone()))?;
        parse_field_offset(&format, field).ok_or(TracefsError::NoField {
            tp,
            field: field.into(),
        })
    }
}

/// Finds `field` in a tracepoint `format` file: lines like
/// `field:dev_t dev;<TAB>offset:8;<TAB>size:4;<TAB>signed:0;` (arrays: `char rwbs[10]`).
pub fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?.split(';').next()?;
        let name = decl.split_whitespace().last()?.split('[').next()?;
        if name != field {
            return None;
        }
        let off = line.split("offset:").nth(1)?.split(';').next()?;
        off.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE: &str = "name: block_rq_issue\nID: 1380\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;\n\
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;\n\
\tfield:__data_loc char[] cmd;\toffset:60;\tsize:4;\tsigned:0;\n";

    #[test]
    fn field_offsets() {
        assert_eq!(parse_field_offset(ISSUE, "dev"), Some(8));
        assert_eq!(parse_field_offset(ISSUE, "sector"), Some(16));
        assert_eq!(parse_field_offset(ISSUE, "rwbs"), Some(34));
        assert_eq!(parse_field_offset(ISSUE, "cmd"), Some(60));
        assert_eq!(parse_field_offset(ISSUE, "nr_sector"), None);
    }
}
