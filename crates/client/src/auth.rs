//! The bearer token on every call.

use tonic::metadata::{Ascii, MetadataValue};

use crate::error::Error;

/// Adds `authorization: Bearer <token>` to every call of a client (nothing
/// without a token). The token never shows in `Debug` output.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// Sends `token` (surrounding whitespace removed).
    pub fn new(token: &str) -> Result<Self, Error> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| Error::InvalidToken)?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }

    /// Sends no authorization header (`Login` needs none).
    pub fn none() -> Self {
        Self(None)
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(<redacted>)"
        } else {
            "Bearer(none)"
        })
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn the_token_is_sent_trimmed_and_never_printed() {
        let mut bearer = Bearer::new("  secret-token\n").unwrap();
        let request = bearer.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer secret-token"
        );
        assert!(!format!("{bearer:?}").contains("secret"));
        let request = Bearer::none().call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
        assert!(matches!(Bearer::new("a\u{7}b"), Err(Error::InvalidToken)));
    }
}
