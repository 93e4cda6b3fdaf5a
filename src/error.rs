//! Errors of the pipeline layer (model folders, parameters, tokenizer), wrapping the engine's.

use thiserror::Error;

use crate::engine;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Engine(#[from] engine::Error),
    /// A parameter or configuration value that cannot be used.
    #[error("{0}")]
    Invalid(String),
    #[error("model folder `{folder}` is missing {}", .missing.join(", "))]
    MissingFiles {
        folder: String,
        missing: Vec<String>,
    },
    #[error("{file}: {reason}")]
    BadFile { file: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("generation was cancelled")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for [`Error::Invalid`].
pub(crate) fn invalid<T>(message: impl Into<String>) -> Result<T> {
    Err(Error::Invalid(message.into()))
}

/// Shorthand for [`Error::BadFile`].
pub(crate) fn bad_file(file: impl Into<String>, reason: impl ToString) -> Error {
    Error::BadFile {
        file: file.into(),
        reason: reason.to_string(),
    }
}
