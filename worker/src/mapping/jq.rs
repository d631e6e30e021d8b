//! jaq, as the mapping uses it: an expression compiled once (or why it does not compile), a JSON
//! value converted for it, and an expression's first value on an input.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Ctx, Native, RcIter};
use jaq_json::Val;
use serde_json::Value;

/// A compiled expression.
pub(super) type Filter = jaq_core::Filter<Native<Val>>;

/// The first value `filter` yields on `input` (`null` when it yields none), or its error's text.
pub(super) fn first(filter: &Filter, input: &Val) -> Result<Value, String> {
    let run = || {
        let inputs = RcIter::new(core::iter::empty());
        let mut out = filter.run((Ctx::new([], &inputs), input.clone()));
        match out.next() {
            None => Ok(Value::Null),
            Some(Ok(value)) => Ok(Value::from(value)),
            Some(Err(error)) => {
                // `error("text")` shows as the JSON string; the text reads better.
                let text = error.to_string();
                let unquoted = text.strip_prefix('"').and_then(|t| t.strip_suffix('"'));
                Err(unquoted.unwrap_or(&text).to_owned())
            }
        }
    };
    catch_unwind(AssertUnwindSafe(run))
        .unwrap_or_else(|_| Err("the expression failed (jaq panicked)".to_owned()))
}

/// Compiles one JQ expression, or says why it does not.
pub(super) fn compile(code: &str) -> Result<Filter, String> {
    let defs = jaq_std::defs().chain(jaq_json::defs());
    let loader = Loader::new(defs);
    let arena = Arena::default();
    let modules = loader
        .load(&arena, File { code, path: () })
        .map_err(|errors| {
            let reasons: Vec<String> = errors
                .into_iter()
                .flat_map(|(_, error)| match error {
                    jaq_core::load::Error::Io(io) => io
                        .into_iter()
                        .map(|(path, e)| format!("{path}: {e}"))
                        .collect::<Vec<_>>(),
                    jaq_core::load::Error::Lex(lex) => lex
                        .into_iter()
                        .map(|(expect, at)| {
                            format!("expected {} at `{}`", expect.as_str(), near(at))
                        })
                        .collect(),
                    jaq_core::load::Error::Parse(parse) => parse
                        .into_iter()
                        .map(|(expect, at)| {
                            format!("expected {} at `{}`", expect.as_str(), near(at))
                        })
                        .collect(),
                })
                .collect();
            format!("does not parse: {}", reasons.join("; "))
        })?;
    jaq_core::Compiler::default()
        .with_funs(jaq_std::funs().chain(jaq_json::funs()))
        .compile(modules)
        .map_err(|errors| {
            let reasons: Vec<String> = errors
                .into_iter()
                .flat_map(|(_, undefined)| undefined)
                .map(|(name, what)| format!("undefined {}: `{name}`", undefined_kind(&what)))
                .collect();
            format!("does not compile: {}", reasons.join("; "))
        })
}

fn undefined_kind(what: &jaq_core::compile::Undefined) -> String {
    use jaq_core::compile::Undefined;
    match what {
        Undefined::Mod => "module".into(),
        Undefined::Var => "variable".into(),
        Undefined::Label => "label".into(),
        Undefined::Filter(arity) => format!("filter of {arity} arguments"),
        _ => "name".into(),
    }
}

/// The start of the text at an error, for the message.
fn near(rest: &str) -> String {
    let shown: String = rest.chars().take(24).collect();
    if shown.is_empty() {
        "the end".into()
    } else {
        shown
    }
}

/// jaq's value of a JSON value, converted in place (jaq-json's `From` takes the value whole
/// and reads every number back from its text).
pub(super) fn val(value: &Value) -> Val {
    match value {
        Value::Null => Val::Null,
        Value::Bool(b) => Val::Bool(*b),
        Value::Number(n) => match n.as_i64().and_then(|i| isize::try_from(i).ok()) {
            Some(i) => Val::Int(i),
            None => Val::Num(Rc::new(n.to_string())),
        },
        Value::String(s) => Val::Str(Rc::new(s.clone())),
        Value::Array(items) => Val::Arr(Rc::new(items.iter().map(val).collect())),
        Value::Object(fields) => Val::obj(
            fields
                .iter()
                .map(|(k, v)| (Rc::new(k.clone()), val(v)))
                .collect(),
        ),
    }
}
