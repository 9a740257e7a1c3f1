//! TLS termination: the certificate and key of each `server.tls` listener, loaded and checked
//! when the config compiles (so `breakwater check` and a reload's new process refuse a file
//! that does not parse, or a key that does not match its certificate, before any socket is
//! touched), and the acceptor settings the listener is built with.

use pingora::listeners::tls::TlsSettings;
use pingora::tls::pkey::PKey;
use pingora::tls::ssl::SslMode;
use pingora::tls::x509::X509;
use std::path::Path;

/// A `server.tls` listener's certificate and key, ready to serve.
pub struct TlsAcceptor {
    pub settings: TlsSettings,
}

/// Which of the two files a failure is about, for a located config error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
}

impl TlsFile {
    pub fn field(self) -> &'static str {
        match self {
            TlsFile::Cert => "cert",
            TlsFile::Key => "key",
        }
    }
}

impl TlsAcceptor {
    /// Loads `cert` (a PEM chain) and `key` (its PEM private key) with Mozilla's intermediate
    /// settings, checks they belong together, and offers h2 then HTTP/1.1 through ALPN.
    pub fn load(cert: &Path, key: &Path) -> Result<TlsAcceptor, (TlsFile, String)> {
        // Parse each file first, for a message that names the file at fault rather than an
        // OpenSSL error stack about either.
        let read = |which: TlsFile, path: &Path| {
            std::fs::read(path).map_err(|e| (which, format!("cannot read {}: {e}", path.display())))
        };
        let chain = X509::stack_from_pem(&read(TlsFile::Cert, cert)?).unwrap_or_default();
        if chain.is_empty() {
            let message = format!("{} holds no PEM certificate", cert.display());
            return Err((TlsFile::Cert, message));
        }
        if let Err(e) = PKey::private_key_from_pem(&read(TlsFile::Key, key)?) {
            let message = format!("{} is not a PEM private key: {e}", key.display());
            return Err((TlsFile::Key, message));
        }
        let mut settings =
            TlsSettings::intermediate(&cert.to_string_lossy(), &key.to_string_lossy()).map_err(
                |e| {
                    (
                        TlsFile::Cert,
                        format!("cannot load certificate and key: {e}"),
                    )
                },
            )?;
        settings.check_private_key().map_err(|e| {
            let message = format!(
                "the private key {} does not match the certificate {}: {e}",
                key.display(),
                cert.display()
            );
            (TlsFile::Key, message)
        })?;
        // An idle TLS connection then holds no OpenSSL read or write buffer.
        settings.set_mode(SslMode::RELEASE_BUFFERS);
        settings.enable_h2();
        Ok(TlsAcceptor { settings })
    }
}
