//! Which JQ expressions may run without end, refused when a mapping is read (at start and by
//! `mapping check`): jaq has no bound on time or depth, and an expression that recursed for ever
//! would overflow the stack and abort the worker, one that looped for ever would hold a runtime
//! thread. Refused: a definition that calls itself, directly or through others (jq's own
//! recursive filters, such as `..`, `recurse` and `paths`, end on the finite JSON the worker
//! reads), and the builtins that loop until a condition the data may never meet (`repeat`,
//! `while`, `until`, `recurse` with a filter, `range` with a step, `limit` of those aside).

use std::collections::{BTreeMap, BTreeSet};

use jaq_core::load::lex::StrPart;
use jaq_core::load::parse::{Def, Pattern, Term};

/// Builtins that may never end, with their arity.
const UNBOUNDED: [(&str, usize); 6] = [
    ("repeat", 1),
    ("while", 2),
    ("until", 2),
    ("recurse", 1),
    ("recurse", 2),
    ("range", 3),
];

/// Why `code` may run without end, if it may.
pub fn unbounded(code: &str) -> Option<String> {
    let term = jaq_core::load::parse(code, |p| p.term())?;
    let mut walk = Walk::default();
    walk.term(&term, None);
    if let Some((name, arity)) = walk.unbounded.first() {
        return Some(format!(
            "calls `{name}` (with {arity} argument{}), which may loop for ever: not allowed in \
             a mapping",
            if *arity == 1 { "" } else { "s" }
        ));
    }
    walk.recursive().map(|name| {
        format!(
            "defines `{name}`, which calls itself: recursion is not allowed in a mapping (it \
             could exhaust the worker's stack)"
        )
    })
}

#[derive(Default)]
struct Walk<'s> {
    /// Each definition's name, and the names its body calls (shadowing ignored: a name
    /// defined twice is one, which can only find more cycles, never fewer).
    calls: BTreeMap<&'s str, BTreeSet<&'s str>>,
    unbounded: Vec<(&'s str, usize)>,
}

impl<'s> Walk<'s> {
    fn term(&mut self, term: &Term<&'s str>, within: Option<&'s str>) {
        match term {
            Term::Id | Term::Recurse | Term::Num(_) | Term::Var(_) | Term::Break(_) => {}
            Term::Str(_, parts) => {
                for part in parts {
                    if let StrPart::Term(t) = part {
                        self.term(t, within);
                    }
                }
            }
            Term::Arr(inner) => {
                if let Some(t) = inner {
                    self.term(t, within);
                }
            }
            Term::Obj(pairs) => {
                for (key, value) in pairs {
                    self.term(key, within);
                    if let Some(v) = value {
                        self.term(v, within);
                    }
                }
            }
            Term::Neg(t) | Term::Label(_, t) => self.term(t, within),
            Term::Pipe(l, pattern, r) => {
                self.term(l, within);
                if let Some(p) = pattern {
                    self.pattern(p, within);
                }
                self.term(r, within);
            }
            Term::BinOp(l, _, r) => {
                self.term(l, within);
                self.term(r, within);
            }
            Term::Fold(_, xs, pattern, args) => {
                self.term(xs, within);
                self.pattern(pattern, within);
                for a in args {
                    self.term(a, within);
                }
            }
            Term::TryCatch(t, catch) => {
                self.term(t, within);
                if let Some(c) = catch {
                    self.term(c, within);
                }
            }
            Term::IfThenElse(branches, otherwise) => {
                for (cond, then) in branches {
                    self.term(cond, within);
                    self.term(then, within);
                }
                if let Some(o) = otherwise {
                    self.term(o, within);
                }
            }
            Term::Def(defs, rest) => {
                for def in defs {
                    self.def(def);
                }
                self.term(rest, within);
            }
            Term::Call(name, args) => {
                if UNBOUNDED.contains(&(*name, args.len())) {
                    self.unbounded.push((name, args.len()));
                }
                if let Some(caller) = within {
                    self.calls.entry(caller).or_default().insert(name);
                }
                for a in args {
                    self.term(a, within);
                }
            }
            Term::Path(t, path) => {
                self.term(t, within);
                for (part, _) in &path.0 {
                    match part {
                        jaq_core::path::Part::Index(i) => self.term(i, within),
                        jaq_core::path::Part::Range(from, to) => {
                            for t in from.iter().chain(to) {
                                self.term(t, within);
                            }
                        }
                    }
                }
            }
        }
    }

    fn pattern(&mut self, pattern: &Pattern<&'s str>, within: Option<&'s str>) {
        match pattern {
            Pattern::Var(_) => {}
            Pattern::Arr(items) => {
                for p in items {
                    self.pattern(p, within);
                }
            }
            Pattern::Obj(pairs) => {
                for (key, p) in pairs {
                    self.term(key, within);
                    self.pattern(p, within);
                }
            }
        }
    }

    fn def(&mut self, def: &Def<&'s str>) {
        self.calls.entry(def.name).or_default();
        self.term(&def.body, Some(def.name));
    }

    /// A definition that reaches itself through the calls, if one does.
    fn recursive(&self) -> Option<&'s str> {
        self.calls.keys().copied().find(|&start| {
            let mut seen = BTreeSet::new();
            let mut next: Vec<&str> = self.calls[start].iter().copied().collect();
            while let Some(name) = next.pop() {
                if name == start {
                    return true;
                }
                if seen.insert(name)
                    && let Some(callees) = self.calls.get(name)
                {
                    next.extend(callees.iter().copied());
                }
            }
            false
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loops_and_recursion_are_found_and_ordinary_expressions_pass() {
        for (code, found) in [
            ("def f: f; f", "defines `f`"),
            ("def f: .a | g; def g: f; f", "defines `f`"),
            ("def f(x): x | f(x); f(.)", "defines `f`"),
            ("[limit(3; repeat(.))]", "calls `repeat`"),
            (".a | until(false; .)", "calls `until`"),
            ("last(recurse(. + 1))", "calls `recurse`"),
            ("{a: [range(0; 10; 0)]}", "calls `range`"),
        ] {
            let reason = unbounded(code).unwrap_or_else(|| panic!("{code} passed"));
            assert!(reason.contains(found), "{code}: {reason}");
        }
        for code in [
            ".__repository.name + \":\" + ((.tags // [])[0].name // \"untagged\")",
            "def tag: .tags[0].name; tag // \"none\"",
            "def a: 1; def b: a + a; b",
            "[.. | numbers] | add",
            "[paths] | length",
            "[range(10)]",
            "reduce .[] as [$k, $v] ({}; .[$k] = $v)",
            ".scan_overview | to_entries | first | .value.scan_status // \"Not Scanned\"",
        ] {
            assert_eq!(unbounded(code), None, "{code}");
        }
    }
}
