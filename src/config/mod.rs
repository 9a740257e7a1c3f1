//! The configuration file: its schema (`schema`, composed of the sections each feature
//! declares in its own module), the rules that span several fields or sections (`rules`),
//! and errors that name the file, line and field (`source`).
//!
//! Parsing happens in two steps. serde_yaml checks shapes, types and unknown fields, and the
//! field types (durations, addresses, route prefixes) check their own values while they are
//! parsed, so those errors carry serde_yaml's line and column. The rules run afterwards and
//! find their line by scanning the file's text ([`Source`]); so do the errors of each
//! section's compile step (see `runtime::compile`), which checks that section's own values.

mod rules;
mod schema;
mod source;

pub use schema::{
    AdminConfig, AdminToken, Config, ListenAddr, ServerConfig, ServiceConfig, TlsListener,
};
pub use source::{ConfigError, Source};

impl Config {
    /// Parses the file and checks the rules that span several fields or sections. Each
    /// section's own values are checked when it compiles (`runtime::compile`).
    pub fn parse(source: &Source) -> Result<Config, ConfigError> {
        let config: Config =
            serde_yaml::from_str(source.text()).map_err(|e| source.yaml_error(e))?;
        rules::check(&config, source)?;
        Ok(config)
    }

    /// Routes over all services.
    pub fn route_count(&self) -> usize {
        self.services.values().map(|s| s.routes.len()).sum()
    }
}

#[cfg(test)]
mod tests;
