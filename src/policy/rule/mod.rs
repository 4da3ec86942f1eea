//! The rule language: the upstream's predicate syntax (`¬ ∧ ∨ ⇒ ⇐ ≡ ≢`) with ASCII
//! spellings, parsed once at load and evaluated per request.

mod ast;
mod eval;
mod lexer;
mod parser;

#[cfg(test)]
mod tests;

pub use ast::{BinOp, Expr};
pub use eval::Env;
pub use lexer::{is_ident_continue, is_ident_start};

/// A parse error at a 1-based character column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at {col}: {message}")]
pub struct ParseError {
    pub col: usize,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct Rule {
    expr: Expr,
    names: Vec<String>,
}

/// What a rule came to for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Known(bool),
    /// Some name had no value; the text is the predicate left after substituting and
    /// simplifying everything that was known.
    Unresolved(String),
}

impl Rule {
    pub fn parse(src: &str) -> Result<Rule, ParseError> {
        let toks = lexer::tokenize(src)?;
        let mut p = parser::Parser::new(toks);
        let expr = p.parse_rule()?;
        Ok(Rule {
            expr,
            names: p.names,
        })
    }

    /// The distinct identifiers, in order of first appearance; `Env::value` receives
    /// indices into this list.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn eval(&self, env: &mut impl Env) -> Outcome {
        match eval::eval(&self.expr, env) {
            eval::Val::Known(b) => Outcome::Known(b),
            eval::Val::Residual(r) => Outcome::Unresolved(r.display(&self.names).to_string()),
        }
    }
}

impl std::fmt::Display for Rule {
    /// The canonical Unicode form, with only the parentheses the grammar needs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.expr.display(&self.names))
    }
}
