//! The workflow layer's errors: a definition refused (naming the step and field), a history
//! the store could not write or read, a name or id that is not there.

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkflowError {
    /// A definition that cannot run; `at` names the field (`steps[2] (search).after`).
    #[error("workflow `{workflow}`: {at}: {reason}")]
    Definition {
        /// The workflow's name (`?` before it is known).
        workflow: String,
        /// The field at fault.
        at: String,
        /// Why.
        reason: String,
    },
    /// An engine setting that cannot work; `field` names it.
    #[error("workflow engine: {field}: {reason}")]
    Config {
        /// The setting at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// No workflow of this name is registered.
    #[error("no workflow `{0}` is registered")]
    UnknownWorkflow(String),
    /// No execution has this id (or it is past retention).
    #[error("no execution {0}")]
    UnknownExecution(u64),
    /// The execution already ended.
    #[error("execution {0} has already ended")]
    Ended(u64),
    /// The history store failed.
    #[error("workflow history: {0}")]
    Store(String),
}

impl From<rusqlite::Error> for WorkflowError {
    fn from(e: rusqlite::Error) -> Self {
        WorkflowError::Store(e.to_string())
    }
}
