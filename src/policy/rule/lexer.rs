//! Splits a rule into tokens, each with the 1-based character column it starts at.

use super::ast::BinOp;
use super::ParseError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tok {
    Ident(String),
    True,
    False,
    Not,
    Op(BinOp),
    LParen,
    RParen,
    End,
}

#[derive(Clone, Debug)]
pub struct Token {
    pub tok: Tok,
    /// 1-based character column, so errors point where an editor does.
    pub col: usize,
    /// What was written (`&&` or `∧`), so errors quote the user's own spelling.
    pub text: String,
}

/// Identifiers: a letter or `_`, then letters, digits, `_` or `-` (manager names such as
/// `down0` or `night-shift`).
pub fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_'
}

pub fn is_ident_continue(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-'
}

pub fn tokenize(src: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident_continue(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let tok = match word.as_str() {
                "true" => Tok::True,
                "false" => Tok::False,
                _ => Tok::Ident(word.clone()),
            };
            out.push(Token {
                tok,
                col,
                text: word,
            });
            continue;
        }
        let next = chars.get(i + 1).copied();
        let (tok, len) = match (c, next) {
            ('¬' | '~', _) => (Tok::Not, 1),
            ('∧', _) => (Tok::Op(BinOp::And), 1),
            ('∨', _) => (Tok::Op(BinOp::Or), 1),
            ('⇒', _) => (Tok::Op(BinOp::Implies), 1),
            ('⇐', _) => (Tok::Op(BinOp::Follows), 1),
            ('≡', _) => (Tok::Op(BinOp::Equiv), 1),
            ('≢', _) => (Tok::Op(BinOp::NotEquiv), 1),
            ('(', _) => (Tok::LParen, 1),
            (')', _) => (Tok::RParen, 1),
            ('&', Some('&')) => (Tok::Op(BinOp::And), 2),
            ('|', Some('|')) => (Tok::Op(BinOp::Or), 2),
            ('=', Some('>')) => (Tok::Op(BinOp::Implies), 2),
            ('=', Some('=')) => (Tok::Op(BinOp::Equiv), 2),
            ('<', Some('=')) => (Tok::Op(BinOp::Follows), 2),
            ('!', Some('=')) => (Tok::Op(BinOp::NotEquiv), 2),
            ('!', _) => (Tok::Not, 1),
            _ => {
                let hint = match c {
                    '&' => " (did you mean `&&`?)",
                    '|' => " (did you mean `||`?)",
                    '=' => " (did you mean `==` or `=>`?)",
                    '<' => " (did you mean `<=`?)",
                    _ => "",
                };
                return Err(ParseError {
                    col,
                    message: format!("unexpected character `{c}`{hint}"),
                });
            }
        };
        out.push(Token {
            tok,
            col,
            text: chars[i..i + len].iter().collect(),
        });
        i += len;
    }
    out.push(Token {
        tok: Tok::End,
        col: chars.len() + 1,
        text: String::new(),
    });
    Ok(out)
}
