//! The mapping from Harbor's objects to Port entities, in Port Ocean's port-app-config format:
//! per kind (`project`, `repository`, `artifact`), a JQ `selector.query` and JQ
//! `port.entity.mappings`, evaluated by jaq. Every expression is compiled once, when the file is
//! read; a file that does not parse, an expression that does not compile, or one that may run
//! without end (recursion, `repeat`, `until`...: see `bounded`) is refused then, with a message
//! naming the file, the resource (index and kind), the field and the error.
//!
//! The object a kind's expressions see is what Harbor's API answers for it, with `.__project` on
//! repositories and artifacts and `.__repository` on artifacts (each as Harbor answers it), and
//! `.__harbor` (`url`, `name`) on all: which Harbor it comes from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::rc::Rc;

use jaq_json::Val;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::entities::Entity;

mod bounded;
mod jq;

use jq::{Filter, compile, val};

/// The mapping used without `MAPPING_FILE`: today's entities, property for property.
pub const DEFAULT: &str = include_str!("../../deploy/port/mapping.yaml");

/// What a resource maps: one of Harbor's three kinds of object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `GET /projects/{name}`.
    Project,
    /// `GET /projects/{p}/repositories/{r}`, with `.__project`.
    Repository,
    /// `GET .../artifacts/{digest}` with tags, labels and scan overview, with `.__project` and
    /// `.__repository`.
    Artifact,
}

impl Kind {
    /// Its name in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Project => "project",
            Self::Repository => "repository",
            Self::Artifact => "artifact",
        }
    }

    /// A kind by its name in the file.
    pub fn parse(name: &str) -> Option<Self> {
        // Port Ocean's own Harbor integration names them in the plural.
        match name {
            "project" | "projects" => Some(Self::Project),
            "repository" | "repositories" => Some(Self::Repository),
            "artifact" | "artifacts" => Some(Self::Artifact),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mapping file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct MappingError {
    file: String,
    message: String,
}

/// An object the mapping could not turn into entities: a bad entity, or an expression that
/// failed at run time. Names the resource and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mapping resource {index} ({kind}), {field}: {message}")]
pub struct RenderError {
    index: usize,
    kind: Kind,
    field: String,
    message: String,
}

/// An entity and the blueprint it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    /// The blueprint's identifier.
    pub blueprint: String,
    /// The entity.
    pub entity: Entity,
}

/// What an object maps to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rendered {
    /// One entity per resource of the kind whose selector took the object.
    pub entities: Vec<Mapped>,
    /// A resource of the kind left the object out (its selector was false): entities of it
    /// that this integration wrote earlier are to be deleted.
    pub excluded: bool,
}

/// A compiled expression.
struct Expression {
    filter: Filter,
}

struct Resource {
    index: usize,
    kind: Kind,
    selector: Expression,
    identifier: Expression,
    title: Option<Expression>,
    blueprint: Expression,
    properties: Vec<(String, Expression)>,
    relations: Vec<(String, Expression)>,
}

/// A compiled mapping.
pub struct Mapping {
    resources: Vec<Resource>,
    /// `deleteDependentEntities`: Port deletes the entities that depend on one deleted.
    pub delete_dependents: bool,
    /// `createMissingRelatedEntities`: Port creates a related entity that does not exist yet.
    pub create_missing_related: bool,
    /// `entityDeletionThreshold`, if the file sets it.
    pub deletion_threshold: Option<f64>,
    /// Whether some expression of a kind reads `.__project` / `.__repository` (else they are
    /// not fetched).
    reads: BTreeMap<Kind, (bool, bool)>,
}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapping")
            .field("resources", &self.resources.len())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileFormat {
    // Off unless asked for, unlike Ocean: on, Port deletes every entity that relates to one
    // deleted here, in any blueprint, whoever made it.
    #[serde(default)]
    delete_dependent_entities: bool,
    #[serde(default = "yes")]
    create_missing_related_entities: bool,
    entity_deletion_threshold: Option<f64>,
    resources: Vec<ResourceFormat>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceFormat {
    kind: String,
    #[serde(default)]
    selector: SelectorFormat,
    port: PortFormat,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SelectorFormat {
    query: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortFormat {
    entity: EntityFormat,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntityFormat {
    mappings: MappingsFormat,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingsFormat {
    identifier: String,
    title: Option<String>,
    blueprint: String,
    #[serde(default)]
    properties: BTreeMap<String, String>,
    #[serde(default)]
    relations: BTreeMap<String, String>,
}

impl Mapping {
    /// Reads and compiles the mapping file at `path`.
    pub fn load(path: &Path) -> Result<Self, MappingError> {
        let text = std::fs::read_to_string(path).map_err(|error| MappingError {
            file: path.display().to_string(),
            message: format!("cannot be read: {error}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The default mapping (`deploy/port/mapping.yaml`, built in).
    pub fn default_mapping() -> Self {
        Self::parse(DEFAULT, "deploy/port/mapping.yaml")
            .unwrap_or_else(|error| unreachable!("the built-in mapping is tested: {error}"))
    }

    /// Compiles a mapping from its text; `file` names it in messages.
    pub fn parse(text: &str, file: &str) -> Result<Self, MappingError> {
        let refuse = |message: String| MappingError {
            file: file.to_owned(),
            message,
        };
        let format: FileFormat = serde_yaml_ng::from_str(text)
            .map_err(|error| refuse(format!("not a port-app-config mapping: {error}")))?;
        if let Some(threshold) = format.entity_deletion_threshold
            && !(0.0..=1.0).contains(&threshold)
        {
            return Err(refuse(format!(
                "entityDeletionThreshold is {threshold}; it is a share, from 0 to 1"
            )));
        }
        let mut resources = Vec::with_capacity(format.resources.len());
        let mut reads: BTreeMap<Kind, (bool, bool)> = BTreeMap::new();
        for (index, resource) in format.resources.into_iter().enumerate() {
            let Some(kind) = Kind::parse(&resource.kind) else {
                return Err(refuse(format!(
                    "resource {index}: unknown kind `{}` (project, repository or artifact)",
                    resource.kind
                )));
            };
            let expression = |field: &str, code: &str| {
                if let Some(reason) = bounded::unbounded(code) {
                    return Err(refuse(format!(
                        "resource {index} ({kind}), {field}: `{code}` {reason}"
                    )));
                }
                compile(code)
                    .map(|filter| Expression { filter })
                    .map_err(|e| {
                        refuse(format!("resource {index} ({kind}), {field}: `{code}` {e}"))
                    })
            };
            let mappings = resource.port.entity.mappings;
            let mut sources = vec![
                resource.selector.query.clone().unwrap_or_default(),
                mappings.identifier.clone(),
                mappings.blueprint.clone(),
            ];
            sources.extend(mappings.title.clone());
            sources.extend(mappings.properties.values().cloned());
            sources.extend(mappings.relations.values().cloned());
            let read = reads.entry(kind).or_default();
            read.0 |= sources.iter().any(|s| s.contains("__project"));
            read.1 |= sources.iter().any(|s| s.contains("__repository"));
            let selector = resource.selector.query.as_deref().unwrap_or("true");
            let mut properties = Vec::with_capacity(mappings.properties.len());
            for (name, code) in &mappings.properties {
                properties.push((
                    name.clone(),
                    expression(&format!("properties.{name}"), code)?,
                ));
            }
            let mut relations = Vec::with_capacity(mappings.relations.len());
            for (name, code) in &mappings.relations {
                relations.push((
                    name.clone(),
                    expression(&format!("relations.{name}"), code)?,
                ));
            }
            resources.push(Resource {
                index,
                kind,
                selector: expression("selector.query", selector)?,
                identifier: expression("identifier", &mappings.identifier)?,
                title: match &mappings.title {
                    Some(code) => Some(expression("title", code)?),
                    None => None,
                },
                blueprint: expression("blueprint", &mappings.blueprint)?,
                properties,
                relations,
            });
        }
        if format.delete_dependent_entities {
            tracing::warn!(
                "The mapping turns deleteDependentEntities on: when this integration deletes an \
                 entity, Port also deletes every entity related to it, in any blueprint"
            );
        }
        Ok(Self {
            resources,
            delete_dependents: format.delete_dependent_entities,
            create_missing_related: format.create_missing_related_entities,
            deletion_threshold: format.entity_deletion_threshold,
            reads,
        })
    }

    /// Whether the expressions of `kind` read `.__project`.
    pub fn reads_project(&self, kind: Kind) -> bool {
        self.reads.get(&kind).is_some_and(|r| r.0)
    }

    /// Whether the expressions of `kind` read `.__repository`.
    pub fn reads_repository(&self, kind: Kind) -> bool {
        self.reads.get(&kind).is_some_and(|r| r.1)
    }

    /// The blueprints the mapping writes, when each resource names its blueprint whatever the
    /// object (a constant, as Ocean's mappings do); `None` when one depends on the object.
    pub fn blueprints(&self) -> Option<std::collections::BTreeSet<String>> {
        let probes = [
            val(&serde_json::json!({})),
            val(&serde_json::json!({"name": "x"})),
        ];
        self.resources
            .iter()
            .map(|resource| {
                let named: Vec<String> = probes
                    .iter()
                    .map(|probe| {
                        resource
                            .string("blueprint", &resource.blueprint, probe)
                            .ok()
                    })
                    .collect::<Option<_>>()?;
                named
                    .windows(2)
                    .all(|w| w[0] == w[1])
                    .then(|| named[0].clone())
            })
            .collect()
    }

    /// Whether any resource maps `kind`.
    pub fn maps(&self, kind: Kind) -> bool {
        self.resources.iter().any(|r| r.kind == kind)
    }

    /// The entities `object` (of `kind`) maps to, with `extra` added to it (its `__` fields).
    pub fn render(
        &self,
        kind: Kind,
        object: &Value,
        extra: &[(&str, &Value)],
    ) -> Result<Rendered, RenderError> {
        let mut rendered = Rendered::default();
        let input = match object {
            Value::Object(fields) => {
                let extra = extra.iter().map(|(k, v)| (*k, *v));
                let fields = fields.iter().map(|(k, v)| (k.as_str(), v)).chain(extra);
                Val::obj(
                    fields
                        .map(|(k, v)| (Rc::new(k.to_owned()), val(v)))
                        .collect(),
                )
            }
            other => val(other),
        };
        for resource in self.resources.iter().filter(|r| r.kind == kind) {
            let selected = resource.eval("selector.query", &resource.selector, &input)?;
            if !truthy(&selected) {
                rendered.excluded = true;
                continue;
            }
            rendered.entities.push(resource.entity(&input)?);
        }
        Ok(rendered)
    }
}

fn truthy(value: &Value) -> bool {
    !matches!(value, Value::Null | Value::Bool(false))
}

impl Resource {
    fn error(&self, field: &str, message: impl Into<String>) -> RenderError {
        RenderError {
            index: self.index,
            kind: self.kind,
            field: field.to_owned(),
            message: message.into(),
        }
    }

    /// The first value the expression yields (`null` when it yields none).
    fn eval(
        &self,
        field: &str,
        expression: &Expression,
        input: &Val,
    ) -> Result<Value, RenderError> {
        jq::first(&expression.filter, input).map_err(|message| self.error(field, clip(&message)))
    }

    fn string(
        &self,
        field: &str,
        expression: &Expression,
        input: &Val,
    ) -> Result<String, RenderError> {
        match self.eval(field, expression, input)? {
            Value::String(s) if !s.is_empty() => Ok(s),
            Value::String(_) => Err(self.error(field, "is an empty string")),
            other => Err(self.error(field, format!("is {}, not a string", describe(&other)))),
        }
    }

    fn entity(&self, input: &Val) -> Result<Mapped, RenderError> {
        let identifier = self.string("identifier", &self.identifier, input)?;
        let blueprint = self.string("blueprint", &self.blueprint, input)?;
        let title = match &self.title {
            None => identifier.clone(),
            Some(title) => match self.eval("title", title, input)? {
                Value::Null => identifier.clone(),
                Value::String(s) => s,
                other => {
                    return Err(
                        self.error("title", format!("is {}, not a string", describe(&other)))
                    );
                }
            },
        };
        let mut properties = Map::new();
        for (name, expression) in &self.properties {
            let field = format!("properties.{name}");
            properties.insert(name.clone(), self.eval(&field, expression, input)?);
        }
        let mut relations = Map::new();
        for (name, expression) in &self.relations {
            let field = format!("relations.{name}");
            let value = self.eval(&field, expression, input)?;
            let valid = match &value {
                Value::Null | Value::String(_) => true,
                Value::Array(items) => items.iter().all(Value::is_string),
                _ => false,
            };
            if !valid {
                return Err(self.error(
                    &field,
                    format!(
                        "is {}, not an identifier or a list of them",
                        describe(&value)
                    ),
                ));
            }
            relations.insert(name.clone(), value);
        }
        Ok(Mapped {
            blueprint,
            entity: Entity {
                identifier,
                title,
                properties,
                relations,
            },
        })
    }
}

/// A value, named for a message, its text clipped.
fn describe(value: &Value) -> String {
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    match value {
        Value::Null => kind.to_owned(),
        _ => format!("{kind} ({})", clip(&value.to_string())),
    }
}

/// At most 80 characters of a text from a payload, for a message.
fn clip(text: &str) -> String {
    const MAX: usize = 80;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests;
