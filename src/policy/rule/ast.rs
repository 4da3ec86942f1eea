//! The parsed predicate and its canonical (Unicode) text.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    And,
    Or,
    Implies,
    Follows,
    Equiv,
    NotEquiv,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::And => "∧",
            BinOp::Or => "∨",
            BinOp::Implies => "⇒",
            BinOp::Follows => "⇐",
            BinOp::Equiv => "≡",
            BinOp::NotEquiv => "≢",
        }
    }

    /// Larger binds tighter.
    fn level(self) -> u8 {
        match self {
            BinOp::Equiv | BinOp::NotEquiv => 1,
            BinOp::Implies | BinOp::Follows => 2,
            BinOp::And | BinOp::Or => 3,
        }
    }
}

/// Variables are indices into the rule's name table, so evaluation never compares strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Const(bool),
    Var(usize),
    Not(Box<Expr>),
    Bin(BinOp, Box<Expr>, Box<Expr>),
}

impl Expr {
    pub fn bin(op: BinOp, a: Expr, b: Expr) -> Expr {
        Expr::Bin(op, Box::new(a), Box::new(b))
    }

    pub fn display<'a>(&'a self, names: &'a [String]) -> Shown<'a> {
        Shown { expr: self, names }
    }
}

pub struct Shown<'a> {
    expr: &'a Expr,
    names: &'a [String],
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_expr(f, self.expr, self.names)
    }
}

fn write_expr(f: &mut fmt::Formatter<'_>, e: &Expr, names: &[String]) -> fmt::Result {
    match e {
        Expr::Const(b) => write!(f, "{b}"),
        Expr::Var(i) => f.write_str(names.get(*i).map(String::as_str).unwrap_or("?")),
        Expr::Not(inner) => {
            f.write_str("¬")?;
            write_child(f, inner, names, matches!(**inner, Expr::Bin(..)))
        }
        Expr::Bin(op, a, b) => {
            write_child(f, a, names, needs_parens(*op, a, true))?;
            write!(f, " {} ", op.symbol())?;
            write_child(f, b, names, needs_parens(*op, b, false))
        }
    }
}

fn write_child(
    f: &mut fmt::Formatter<'_>,
    e: &Expr,
    names: &[String],
    parens: bool,
) -> fmt::Result {
    if parens {
        f.write_str("(")?;
        write_expr(f, e, names)?;
        f.write_str(")")
    } else {
        write_expr(f, e, names)
    }
}

/// Parentheses exactly where the parser would otherwise read a different tree (see the
/// associativity rules in `parser.rs`).
fn needs_parens(parent: BinOp, child: &Expr, is_left: bool) -> bool {
    let Expr::Bin(op, ..) = child else {
        return false;
    };
    match op.level().cmp(&parent.level()) {
        std::cmp::Ordering::Greater => false,
        std::cmp::Ordering::Less => true,
        std::cmp::Ordering::Equal => match parent {
            BinOp::And | BinOp::Or => *op != parent,
            BinOp::Implies => is_left || *op != parent,
            BinOp::Follows => true,
            BinOp::Equiv | BinOp::NotEquiv => !is_left,
        },
    }
}
