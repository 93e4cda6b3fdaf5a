//! Every way loading or running a model can fail, as values the caller can show to a user.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("not a valid ONNX model: {0}")]
    Parse(String),
    #[error("external data for `{tensor}`: {reason}")]
    ExternalData { tensor: String, reason: String },
    #[error("unsupported operator {op_type} (node `{node}`, opset {opset}): {reason}")]
    Unsupported {
        op_type: String,
        node: String,
        opset: i64,
        reason: String,
    },
    #[error("node `{node}` ({op_type}): {reason}")]
    Node {
        node: String,
        op_type: String,
        reason: String,
    },
    #[error("dimension `{0}` has no value: bind it with --dim {0}=N")]
    UnboundDimension(String),
    #[error("input `{name}`: {reason}")]
    Input { name: String, reason: String },
    #[error("missing inputs: {}", .0.join(", "))]
    MissingInputs(Vec<String>),
    #[error("no WebGPU adapter available: {0}")]
    NoAdapter(String),
    #[error("GPU device: {0}")]
    Device(String),
    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),
    #[error("tensor of {bytes} bytes (`{name}`) exceeds this GPU's {what} of {limit} bytes")]
    TooLarge {
        name: String,
        bytes: u64,
        limit: u64,
        /// Which limit: "storage binding limit" or "buffer size".
        what: &'static str,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn parse(message: impl Into<String>) -> Self {
        Error::Parse(message.into())
    }
}
