//! The PMProxy rule language: parsing never panics; the canonical form a rule prints
//! parses back to the same rule (same text, same names, same answers); and partial
//! evaluation is sound: a result known with some names unknown stays the same once
//! they are known, and the reduced predicate left over, parsed and evaluated with the
//! rest, comes to what the whole rule does.
//!
//! The input: two bytes say which of the first 16 names are known, two more their
//! values (names past 16 are unknown; in the complete environment, false), then the
//! rule's text.

use anyproxy::policy::rule::Env;
use anyproxy::policy::{Outcome, Rule};

pub fn check(data: &[u8]) {
    let Some((bits, text)) = data.split_first_chunk::<4>() else {
        return;
    };
    let known = u16::from_le_bytes([bits[0], bits[1]]);
    let values = u16::from_le_bytes([bits[2], bits[3]]);
    let text = String::from_utf8_lossy(text);
    let Ok(rule) = Rule::parse(&text) else {
        return;
    };
    let names = rule.names().to_vec();
    let value = |name: &str| -> (bool, bool) {
        let i = names
            .iter()
            .position(|n| n == name)
            .expect("a name of the rule");
        let bit = |m: u16| i < 16 && m >> i & 1 == 1;
        (bit(known), bit(values))
    };
    let partial = |name: &str| {
        let (k, v) = value(name);
        k.then_some(v)
    };
    let complete = |name: &str| Some(value(name).1);

    let canonical = rule.to_string();
    let again = Rule::parse(&canonical)
        .unwrap_or_else(|e| panic!("canonical form {canonical:?} does not parse: {e}"));
    assert_eq!(
        again.to_string(),
        canonical,
        "canonical form is a fixed point"
    );
    assert_eq!(again.names(), rule.names(), "same names in the same order");

    let full = eval(&rule, &complete);
    let Outcome::Known(answer) = full else {
        panic!("every name known, still {full:?}");
    };
    assert_eq!(eval(&again, &complete), full);
    let part = eval(&rule, &partial);
    assert_eq!(
        eval(&again, &partial),
        part,
        "canonical form, partial answer"
    );
    match part {
        Outcome::Known(b) => assert_eq!(b, answer, "knowing more changed a known answer"),
        Outcome::Unresolved(rest) => {
            let rest_rule = Rule::parse(&rest)
                .unwrap_or_else(|e| panic!("reduced predicate {rest:?} does not parse: {e}"));
            for name in rest_rule.names() {
                assert!(
                    partial(name).is_none(),
                    "{name} is known but left in {rest:?}"
                );
            }
            assert_eq!(
                eval(&rest_rule, &complete),
                Outcome::Known(answer),
                "{rest:?}"
            );
        }
    }
}

/// Evaluates `rule` with the values `lookup` gives by name.
fn eval(rule: &Rule, lookup: &dyn Fn(&str) -> Option<bool>) -> Outcome {
    struct ByName<'a> {
        names: &'a [String],
        lookup: &'a dyn Fn(&str) -> Option<bool>,
    }
    impl Env for ByName<'_> {
        fn value(&mut self, var: usize) -> Option<bool> {
            (self.lookup)(&self.names[var])
        }
    }
    rule.eval(&mut ByName {
        names: rule.names(),
        lookup,
    })
}
