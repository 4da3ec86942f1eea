//! Left-to-right, short-circuit evaluation with partial results.
//!
//! A variable the environment cannot resolve stays symbolic; the operators then simplify
//! what they can (`x ∧ false` is `false`, `x ≡ true` is `x`), so the result is either a
//! value or the reduced predicate. Nothing is allocated unless a variable is unresolved.

use super::ast::{BinOp, Expr};

/// Supplies variable values; `None` means "no manager by that name".
pub trait Env {
    fn value(&mut self, var: usize) -> Option<bool>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Val {
    Known(bool),
    Residual(Expr),
}

pub fn eval(e: &Expr, env: &mut impl Env) -> Val {
    match e {
        Expr::Const(b) => Val::Known(*b),
        Expr::Var(i) => match env.value(*i) {
            Some(b) => Val::Known(b),
            None => Val::Residual(Expr::Var(*i)),
        },
        Expr::Not(inner) => not(eval(inner, env)),
        Expr::Bin(op, a, b) => {
            let va = eval(a, env);
            if let Val::Known(x) = va {
                if let Some(decided) = short_circuit(*op, x) {
                    return Val::Known(decided);
                }
            }
            let vb = eval(b, env);
            combine(*op, va, vb)
        }
    }
}

/// The value of `a op _` when `a` alone decides it.
fn short_circuit(op: BinOp, a: bool) -> Option<bool> {
    match (op, a) {
        (BinOp::And, false) => Some(false),
        (BinOp::Or, true) => Some(true),
        (BinOp::Implies, false) => Some(true),
        (BinOp::Follows, true) => Some(true),
        _ => None,
    }
}

fn not(v: Val) -> Val {
    match v {
        Val::Known(b) => Val::Known(!b),
        Val::Residual(Expr::Not(inner)) => Val::Residual(*inner),
        Val::Residual(r) => Val::Residual(Expr::Not(Box::new(r))),
    }
}

fn combine(op: BinOp, a: Val, b: Val) -> Val {
    use Val::{Known, Residual};
    match op {
        BinOp::And => match (a, b) {
            (Known(x), Known(y)) => Known(x && y),
            (Known(true), r) | (r, Known(true)) => r,
            (Known(false), _) | (_, Known(false)) => Known(false),
            (Residual(x), Residual(y)) if x == y => Residual(x),
            (Residual(x), Residual(y)) => Residual(Expr::bin(op, x, y)),
        },
        BinOp::Or => match (a, b) {
            (Known(x), Known(y)) => Known(x || y),
            (Known(false), r) | (r, Known(false)) => r,
            (Known(true), _) | (_, Known(true)) => Known(true),
            (Residual(x), Residual(y)) if x == y => Residual(x),
            (Residual(x), Residual(y)) => Residual(Expr::bin(op, x, y)),
        },
        // Two unknowns keep the arrow, which reads better than the `∨` it stands for.
        BinOp::Implies | BinOp::Follows => match (a, b) {
            (Residual(x), Residual(y)) if x == y => Known(true),
            (Residual(x), Residual(y)) => Residual(Expr::bin(op, x, y)),
            // a ⇒ b is ¬a ∨ b; a ⇐ b is a ∨ ¬b.
            (a, b) if op == BinOp::Implies => combine(BinOp::Or, not(a), b),
            (a, b) => combine(BinOp::Or, a, not(b)),
        },
        BinOp::Equiv | BinOp::NotEquiv => {
            let flip = op == BinOp::NotEquiv;
            match (a, b) {
                (Known(x), Known(y)) => Known((x == y) != flip),
                (Known(x), r) | (r, Known(x)) => {
                    if x != flip {
                        r
                    } else {
                        not(r)
                    }
                }
                (Residual(x), Residual(y)) if x == y => Known(!flip),
                (Residual(x), Residual(y)) => Residual(Expr::bin(op, x, y)),
            }
        }
    }
}
