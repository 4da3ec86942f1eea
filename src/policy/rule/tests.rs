use std::collections::HashMap;

use super::*;

fn canon(src: &str) -> String {
    match Rule::parse(src) {
        Ok(r) => r.to_string(),
        Err(e) => panic!("{src:?}: {e}"),
    }
}

fn err(src: &str) -> String {
    match Rule::parse(src) {
        Ok(r) => panic!("{src:?} parsed as {r}"),
        Err(e) => e.to_string(),
    }
}

/// Values by name; counts every lookup so short-circuiting can be checked.
struct Vals {
    rule_names: Vec<String>,
    known: HashMap<&'static str, bool>,
    asked: Vec<String>,
}

impl Vals {
    fn new(rule: &Rule, known: &[(&'static str, bool)]) -> Vals {
        Vals {
            rule_names: rule.names().to_vec(),
            known: known.iter().copied().collect(),
            asked: Vec::new(),
        }
    }
}

impl Env for Vals {
    fn value(&mut self, var: usize) -> Option<bool> {
        let name = self.rule_names[var].clone();
        let v = self.known.get(name.as_str()).copied();
        self.asked.push(name);
        v
    }
}

fn run(src: &str, known: &[(&'static str, bool)]) -> (Outcome, Vec<String>) {
    let rule = Rule::parse(src).unwrap();
    let mut env = Vals::new(&rule, known);
    let out = rule.eval(&mut env);
    (out, env.asked)
}

#[test]
fn precedence_and_associativity() {
    let table = [
        ("a", "a"),
        ("a ∧ b ∧ c", "a ∧ b ∧ c"),
        ("a ∨ (b ∧ c)", "a ∨ (b ∧ c)"),
        ("a ∧ b ⇒ c ∨ d", "a ∧ b ⇒ c ∨ d"),
        ("a ⇒ b ≡ c ⇐ d", "a ⇒ b ≡ c ⇐ d"),
        ("a ⇒ b ⇒ c", "a ⇒ b ⇒ c"),
        ("(a ⇒ b) ⇒ c", "(a ⇒ b) ⇒ c"),
        ("a ≡ b ≢ c", "a ≡ b ≢ c"),
        ("a ≡ (b ≢ c)", "a ≡ (b ≢ c)"),
        ("¬a ∧ ¬(b ∨ c)", "¬a ∧ ¬(b ∨ c)"),
        ("((a))", "a"),
        ("a ≡ b ≢ ¬c ⇒ d", "a ≡ b ≢ ¬c ⇒ d"),
        ("(a ⇐ b) ⇐ c", "(a ⇐ b) ⇐ c"),
        ("true ∧ false", "true ∧ false"),
    ];
    for (src, want) in table {
        assert_eq!(canon(src), want, "{src}");
    }
}

#[test]
fn implication_chains_to_the_right() {
    // a = false separates the two groupings: a ⇒ (b ⇒ c) is true, (a ⇒ b) ⇒ c is false.
    let (out, _) = run("a ⇒ b ⇒ c", &[("a", false), ("b", true), ("c", false)]);
    assert_eq!(out, Outcome::Known(true));
    let (out, _) = run("(a ⇒ b) ⇒ c", &[("a", false), ("b", true), ("c", false)]);
    assert_eq!(out, Outcome::Known(false));
}

#[test]
fn ascii_and_unicode_spell_the_same_tree() {
    let pairs = [
        ("!a && b || c", None),
        ("!a && b", Some("¬a ∧ b")),
        ("~a", Some("¬a")),
        ("a || b", Some("a ∨ b")),
        ("a => b", Some("a ⇒ b")),
        ("a <= b", Some("a ⇐ b")),
        ("a == b", Some("a ≡ b")),
        ("a != b", Some("a ≢ b")),
        ("a&&b=>c==d", Some("a ∧ b ⇒ c ≡ d")),
    ];
    for (src, want) in pairs {
        match want {
            Some(w) => assert_eq!(canon(src), w, "{src}"),
            None => assert!(Rule::parse(src).is_err(), "{src}"),
        }
    }
}

#[test]
fn errors_point_at_the_problem() {
    let table = [
        (
            "a ∧ ∧ b",
            "at 5: expected an identifier, `true`, `false`, `¬` or `(`, found `∧`",
        ),
        (
            "a ∧",
            "at 4: expected an identifier, `true`, `false`, `¬` or `(`, found the end of the rule",
        ),
        (
            "a ∨ b ∧ c",
            "at 7: `∧` (∧) cannot follow `∨` at the same level: add parentheses",
        ),
        (
            "a || b && c",
            "at 8: `&&` (∧) cannot follow `∨` at the same level: add parentheses",
        ),
        (
            "a ⇒ b ⇐ c",
            "at 7: `⇐` (⇐) cannot follow `⇒` at the same level: add parentheses",
        ),
        (
            "a ⇐ b ⇒ c",
            "at 7: `⇒` (⇒) cannot follow `⇐` at the same level: add parentheses",
        ),
        (
            "a ⇐ b ⇐ c",
            "at 7: a chain of `⇐` is ambiguous: add parentheses, e.g. `(a ⇐ b) ⇐ c`",
        ),
        (
            "(a ∧ b",
            "at 7: expected an operator or `)`, found the end of the rule",
        ),
        (
            "a b",
            "at 3: expected an operator or the end of the rule, found `b`",
        ),
        (
            "a & b",
            "at 3: unexpected character `&` (did you mean `&&`?)",
        ),
        (
            "a = b",
            "at 3: unexpected character `=` (did you mean `==` or `=>`?)",
        ),
        ("a ∧ #", "at 5: unexpected character `#`"),
        (
            "",
            "at 1: expected an identifier, `true`, `false`, `¬` or `(`, found the end of the rule",
        ),
        (
            ")",
            "at 1: expected an identifier, `true`, `false`, `¬` or `(`, found `)`",
        ),
    ];
    for (src, want) in table {
        assert_eq!(err(src), want, "{src}");
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let src = format!("{}a{}", "(".repeat(10_000), ")".repeat(10_000));
    assert!(err(&src).contains("less nesting"));
    let src = format!("{}a", "¬".repeat(10_000));
    assert!(err(&src).contains("less nesting"));
}

#[test]
fn short_circuit_consults_only_what_it_reaches() {
    let (out, asked) = run("a ∧ b", &[("a", false), ("b", true)]);
    assert_eq!((out, asked), (Outcome::Known(false), vec!["a".to_string()]));
    let (out, asked) = run("a ∨ b", &[("a", true), ("b", true)]);
    assert_eq!((out, asked), (Outcome::Known(true), vec!["a".to_string()]));
    let (out, asked) = run("a ⇒ b", &[("a", false), ("b", true)]);
    assert_eq!((out, asked), (Outcome::Known(true), vec!["a".to_string()]));
    let (out, asked) = run("a ⇐ b", &[("a", true), ("b", false)]);
    assert_eq!((out, asked), (Outcome::Known(true), vec!["a".to_string()]));
    let (out, asked) = run("a ≡ b", &[("a", true), ("b", true)]);
    assert_eq!((out, asked.len()), (Outcome::Known(true), 2));
    let (out, asked) = run("(a ∨ b) ∧ c", &[("a", true), ("b", true), ("c", true)]);
    assert_eq!(
        (out, asked),
        (Outcome::Known(true), vec!["a".into(), "c".into()])
    );
}

#[test]
fn truth_tables() {
    let ops = [
        ("a ∧ b", [false, false, false, true]),
        ("a ∨ b", [false, true, true, true]),
        ("a ⇒ b", [true, true, false, true]),
        ("a ⇐ b", [true, false, true, true]),
        ("a ≡ b", [true, false, false, true]),
        ("a ≢ b", [false, true, true, false]),
    ];
    for (src, table) in ops {
        for (i, want) in table.iter().enumerate() {
            let a = i & 2 != 0;
            let b = i & 1 != 0;
            let (out, _) = run(src, &[("a", a), ("b", b)]);
            assert_eq!(out, Outcome::Known(*want), "{src} with a={a} b={b}");
        }
    }
}

#[test]
fn unknown_names_leave_a_reduced_predicate() {
    type Known = &'static [(&'static str, bool)];
    let table: [(&str, Known, Outcome); 9] = [
        ("x", &[], Outcome::Unresolved("x".into())),
        ("a ∧ x", &[("a", true)], Outcome::Unresolved("x".into())),
        ("x ∧ a", &[("a", false)], Outcome::Known(false)),
        ("x ∨ a", &[("a", false)], Outcome::Unresolved("x".into())),
        ("x ≡ a", &[("a", false)], Outcome::Unresolved("¬x".into())),
        ("x ⇒ a", &[("a", false)], Outcome::Unresolved("¬x".into())),
        (
            "x ∧ y ∧ a",
            &[("a", true)],
            Outcome::Unresolved("x ∧ y".into()),
        ),
        (
            "¬(x ∨ a) ⇒ y",
            &[("a", false)],
            Outcome::Unresolved("¬x ⇒ y".into()),
        ),
        ("x ≡ x", &[], Outcome::Known(true)),
    ];
    for (src, known, want) in table {
        let (out, _) = run(src, known);
        assert_eq!(out, want, "{src}");
    }
}
