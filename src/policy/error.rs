use std::path::PathBuf;

/// Every message starts with the file, then the manager (`[[hostMatcher]] "blocked"`) and
/// key, so a wrong line can be found without reading code.
#[derive(Debug, thiserror::Error)]
pub enum PolicyConfigError {
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: {section} {name:?}: {key}: {message}")]
    Manager {
        file: String,
        section: String,
        name: String,
        key: String,
        message: String,
    },
    #[error("{file}: {key}: {message}")]
    Top {
        file: String,
        key: String,
        message: String,
    },
    #[error("{}: {message}", path.display())]
    State { path: PathBuf, message: String },
}

/// Builds `PolicyConfigError::Manager` for one manager entry.
pub(crate) struct At<'a> {
    pub file: &'a str,
    pub section: &'a str,
    pub name: &'a str,
}

impl At<'_> {
    pub fn err(&self, key: impl Into<String>, message: impl Into<String>) -> PolicyConfigError {
        PolicyConfigError::Manager {
            file: self.file.to_string(),
            section: self.section.to_string(),
            name: self.name.to_string(),
            key: key.into(),
            message: message.into(),
        }
    }
}
