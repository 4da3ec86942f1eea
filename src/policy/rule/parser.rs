//! Recursive descent over the upstream's three levels.
//!
//! ```text
//! rule     = term { ("≡" | "≢") term }            left-assoc; ≡ and ≢ mix freely
//! term     = junction [ "⇒" junction { "⇒" junction } ]   right-assoc: a ⇒ (b ⇒ c)
//!          | junction "⇐" junction                 a second ⇐ needs parentheses
//! junction = factor { "∧" factor } | factor { "∨" factor }   one operator per level
//! factor   = ("¬" | "!" | "~") factor | "true" | "false" | identifier | "(" rule ")"
//! ```
//!
//! Why `⇐` does not chain: the upstream nests every chain to the right, so it reads
//! `a ⇐ b ⇐ c` as `a ⇐ (b ⇐ c)`, while the usual convention (the mirror image of `⇒`) reads
//! `(a ⇐ b) ⇐ c`. The two differ, so rather than silently pick one we ask for parentheses.
//! `⇒` chains to the right in both readings. `≡`/`≢` are associative, so their grouping
//! never changes a value.

use super::ast::{BinOp, Expr};
use super::lexer::{Tok, Token};
use super::ParseError;

const FACTOR_START: &str = "an identifier, `true`, `false`, `¬` or `(`";

pub struct Parser {
    toks: Vec<Token>,
    pos: usize,
    pub names: Vec<String>,
    depth: usize,
}

/// Deep nesting is refused rather than allowed to overflow the stack.
const MAX_DEPTH: usize = 256;

impl Parser {
    pub fn new(toks: Vec<Token>) -> Parser {
        Parser {
            toks,
            pos: 0,
            names: Vec::new(),
            depth: 0,
        }
    }

    fn peek(&self) -> &Token {
        // The lexer always ends the list with `End`, and `bump` never passes it.
        &self.toks[self.pos.min(self.toks.len() - 1)]
    }

    fn bump(&mut self) -> Token {
        let t = self.peek().clone();
        if self.pos < self.toks.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn error(&self, expected: &str) -> ParseError {
        let t = self.peek();
        let found = if t.tok == Tok::End {
            "the end of the rule".to_string()
        } else {
            format!("`{}`", t.text)
        };
        ParseError {
            col: t.col,
            message: format!("expected {expected}, found {found}"),
        }
    }

    pub fn parse_rule(&mut self) -> Result<Expr, ParseError> {
        let e = self.rule()?;
        if self.peek().tok != Tok::End {
            return Err(self.error("an operator or the end of the rule"));
        }
        Ok(e)
    }

    fn rule(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.term()?;
        loop {
            let op = match self.peek().tok {
                Tok::Op(BinOp::Equiv) => BinOp::Equiv,
                Tok::Op(BinOp::NotEquiv) => BinOp::NotEquiv,
                _ => return Ok(left),
            };
            self.bump();
            let right = self.term()?;
            left = Expr::bin(op, left, right);
        }
    }

    fn term(&mut self) -> Result<Expr, ParseError> {
        let first = self.junction()?;
        match self.peek().tok {
            Tok::Op(BinOp::Implies) => {
                let mut operands = vec![first];
                while self.peek().tok == Tok::Op(BinOp::Implies) {
                    self.bump();
                    operands.push(self.junction()?);
                }
                self.refuse_mix(Tok::Op(BinOp::Follows), "⇒", "⇐")?;
                let mut acc = operands.pop().unwrap_or(Expr::Const(true));
                while let Some(prev) = operands.pop() {
                    acc = Expr::bin(BinOp::Implies, prev, acc);
                }
                Ok(acc)
            }
            Tok::Op(BinOp::Follows) => {
                self.bump();
                let right = self.junction()?;
                if self.peek().tok == Tok::Op(BinOp::Follows) {
                    let t = self.peek();
                    return Err(ParseError {
                        col: t.col,
                        message: format!(
                            "a chain of `⇐` is ambiguous: add parentheses, e.g. `(a ⇐ b) {} c`",
                            t.text
                        ),
                    });
                }
                self.refuse_mix(Tok::Op(BinOp::Implies), "⇐", "⇒")?;
                Ok(Expr::bin(BinOp::Follows, first, right))
            }
            _ => Ok(first),
        }
    }

    fn junction(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.factor()?;
        let (op, tok, other, sym, other_sym) = match self.peek().tok {
            Tok::Op(BinOp::And) => (
                BinOp::And,
                Tok::Op(BinOp::And),
                Tok::Op(BinOp::Or),
                "∧",
                "∨",
            ),
            Tok::Op(BinOp::Or) => (BinOp::Or, Tok::Op(BinOp::Or), Tok::Op(BinOp::And), "∨", "∧"),
            _ => return Ok(left),
        };
        while self.peek().tok == tok {
            self.bump();
            let right = self.factor()?;
            left = Expr::bin(op, left, right);
        }
        self.refuse_mix(other, sym, other_sym)?;
        Ok(left)
    }

    fn refuse_mix(&self, other: Tok, sym: &str, other_sym: &str) -> Result<(), ParseError> {
        let t = self.peek();
        if t.tok == other {
            return Err(ParseError {
                col: t.col,
                message: format!(
                    "`{}` ({other_sym}) cannot follow `{sym}` at the same level: add parentheses",
                    t.text
                ),
            });
        }
        Ok(())
    }

    fn factor(&mut self) -> Result<Expr, ParseError> {
        if self.depth >= MAX_DEPTH {
            return Err(self.error("less nesting (at most 256 levels)"));
        }
        self.depth += 1;
        let r = self.factor_inner();
        self.depth -= 1;
        r
    }

    fn factor_inner(&mut self) -> Result<Expr, ParseError> {
        match self.peek().tok.clone() {
            Tok::Not => {
                self.bump();
                Ok(Expr::Not(Box::new(self.factor()?)))
            }
            Tok::True => {
                self.bump();
                Ok(Expr::Const(true))
            }
            Tok::False => {
                self.bump();
                Ok(Expr::Const(false))
            }
            Tok::Ident(name) => {
                self.bump();
                let id = match self.names.iter().position(|n| *n == name) {
                    Some(i) => i,
                    None => {
                        self.names.push(name);
                        self.names.len() - 1
                    }
                };
                Ok(Expr::Var(id))
            }
            Tok::LParen => {
                self.bump();
                let e = self.rule()?;
                if self.peek().tok != Tok::RParen {
                    return Err(self.error("an operator or `)`"));
                }
                self.bump();
                Ok(e)
            }
            _ => Err(self.error(FACTOR_START)),
        }
    }
}
