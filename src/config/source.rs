//! Where a config error is: the file's text kept to find a field's line, serde_yaml errors
//! turned into ours with their field path, and [`ConfigError`], which names file, line and
//! field.

use crate::values::FieldError;
use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration that failed to load: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted path to the field, e.g. `services.users.upstreams[0]`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": invalid config")?;
        if !self.field.is_empty() {
            write!(f, " at field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The config file's name and text, kept to point errors at a line.
#[derive(Debug, Clone)]
pub struct Source {
    path: PathBuf,
    text: String,
}

impl Source {
    /// Reads `path`.
    pub fn read(path: &Path) -> Result<Source, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            field: String::new(),
            message: format!("cannot read file: {e}"),
        })?;
        Ok(Source::new(text, path))
    }

    /// `text` as if read from `path` (which only names it in errors).
    pub fn new(text: impl Into<String>, path: &Path) -> Source {
        Source {
            path: path.to_path_buf(),
            text: text.into(),
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// An error at the dotted `field`, its line found by scanning the text (and, from there,
    /// for `needle` when given), best effort.
    pub fn error(
        &self,
        field: impl Into<String>,
        needle: Option<&str>,
        message: impl Into<String>,
    ) -> ConfigError {
        let field = field.into();
        ConfigError {
            file: self.path.clone(),
            line: locate(&self.text, &field, needle),
            column: None,
            field,
            message: message.into(),
        }
    }

    /// A section's error: `e.field` is below `section` (e.g. `services.users`).
    pub fn section_error(&self, section: &str, e: FieldError) -> ConfigError {
        let quoted = e.needle.as_ref().map(|n| format!("\"{n}\""));
        let needle = match &quoted {
            Some(q) if e.quoted_first && self.text.contains(q.as_str()) => Some(q.as_str()),
            _ => e.needle.as_deref(),
        };
        self.error(format!("{section}{}", e.field), needle, e.message)
    }

    /// An error without a line: the fault is outside the file (a key file, a variable).
    pub fn error_without_line(
        &self,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            line: None,
            column: None,
            field: field.into(),
            message: message.into(),
        }
    }

    /// Turns a serde_yaml error into ours, keeping its location and field path.
    pub(super) fn yaml_error(&self, e: serde_yaml::Error) -> ConfigError {
        let text = self.text.as_str();
        let (line, column) = match e.location() {
            Some(loc) => (Some(loc.line()), Some(loc.column())),
            None => (None, None),
        };
        let mut message = e.to_string();
        if let Some(pos) = message.rfind(" at line ") {
            message.truncate(pos);
        }
        // serde_yaml prefixes the message with the field path ("services.users: ..."), except at
        // the top level.
        let (field, message) = match message.split_once(": ") {
            Some((field, rest))
                if !field.contains(' ') && !field.is_empty() && !field.contains('`') =>
            {
                (field.to_string(), rest.to_string())
            }
            _ => (String::new(), message),
        };
        // Errors raised by a field's own parser (durations, sizes, hosts) carry the path of the
        // enclosing mapping and point at its start; find the key whose value the message quotes.
        // Unknown fields point at the key itself. Upstream entries are named when the pool
        // compiles.
        let (field, line) = if field.ends_with("upstreams") {
            (field, line)
        } else if let Some((key, key_line)) = key_of_value(text, line, &message) {
            (join_field(field, key), Some(key_line))
        } else if let Some(key) = key_at(text, line, column) {
            (join_field(field, key), line)
        } else {
            (field, line)
        };
        ConfigError {
            file: self.path.clone(),
            line,
            column,
            field,
            message,
        }
    }
}

fn join_field(field: String, key: &str) -> String {
    if field.is_empty() {
        key.to_string()
    } else if field.ends_with(key) {
        field
    } else {
        format!("{field}.{key}")
    }
}

/// The key (and its 1-based line) whose value is the one quoted in `message`, searched from
/// the error's line through the rest of that mapping (deeper or equally indented lines).
fn key_of_value<'t>(text: &'t str, line: Option<usize>, message: &str) -> Option<(&'t str, usize)> {
    let value = message.split('"').nth(1).filter(|v| !v.is_empty())?;
    let start = line? - 1;
    let indent = |row: &str| row.len() - row.trim_start().len();
    let first_indent = indent(text.lines().nth(start)?);
    for (i, row) in text.lines().enumerate().skip(start) {
        if i > start && !row.trim().is_empty() && indent(row) < first_indent {
            break;
        }
        let at = row
            .find(&format!(": {value}"))
            .or_else(|| row.find(&format!(": \"{value}\"")))
            .or_else(|| row.find(&format!(": '{value}'")));
        if let Some(at) = at {
            let before = &row[..at];
            let from = before
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .map_or(0, |i| i + 1);
            let key = &before[from..];
            if !key.is_empty() {
                return Some((key, i + 1));
            }
        }
    }
    None
}

/// The mapping key written at a 1-based line and column, if one starts there.
fn key_at(text: &str, line: Option<usize>, column: Option<usize>) -> Option<&str> {
    let rest = text.lines().nth(line? - 1)?.get(column? - 1..)?;
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(rest.len());
    let key = &rest[..end];
    let after = rest[end..].trim_start();
    (!key.is_empty() && after.starts_with(':')).then_some(key)
}

/// Finds the 1-based line of a field in the YAML text, for checks that run after parsing.
///
/// Walks the dotted path key by key through block-style mappings, then, when `needle` is
/// given, looks for the value from there on (this also covers flow style such as
/// `routes: [{path_prefix: /a}]`). Best effort: `None` when the text is too unusual.
fn locate(text: &str, field: &str, needle: Option<&str>) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut from = 0;
    let keys = field
        .split('.')
        .map(|k| k.split('[').next().unwrap_or(k))
        .filter(|k| !k.is_empty());
    for key in keys {
        let pattern = format!("{key}:");
        let found = lines.iter().enumerate().skip(from).find(|(_, l)| {
            let t = l
                .trim_start()
                .trim_start_matches("- ")
                .trim_start_matches('{');
            t.starts_with(&pattern) || l.contains(&format!(" {pattern}"))
        });
        match found {
            Some((i, _)) => from = i,
            None => break,
        }
    }
    if let Some(needle) = needle {
        if let Some((i, _)) = lines
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, l)| l.contains(needle))
        {
            return Some(i + 1);
        }
    }
    Some(from + 1)
}
