use super::*;
use serde_json::json;

fn mapping(resources: &str) -> Result<Mapping, MappingError> {
    Mapping::parse(&format!("resources:\n{resources}"), "test.yaml")
}

const ARTIFACT: &str = r#"
  - kind: artifact
    selector:
      query: '.__project.name | startswith("sandbox-") | not'
    port:
      entity:
        mappings:
          identifier: '.__repository.name + "@" + .digest'
          title: '.__repository.name + ":" + ((.tags // [])[0].name // "untagged")'
          blueprint: '"harborArtifact"'
          properties:
            tags: '[.tags[]?.name]'
          relations:
            repository: '.__repository.name'
"#;

fn artifact(project: &str) -> Value {
    json!({
        "digest": "sha256:aa", "tags": [{"name": "v1"}, {"name": "latest"}],
        "__repository": {"name": format!("{project}/web")},
        "__project": {"name": project},
    })
}

#[test]
fn the_blueprints_are_named_when_no_resource_makes_them_of_its_object() {
    let named = Mapping::default_mapping().blueprints().unwrap();
    let named: Vec<&str> = named.iter().map(String::as_str).collect();
    assert_eq!(
        named,
        ["harborArtifact", "harborProject", "harborRepository"]
    );
    let computed = Mapping::parse(
            "resources:\n  - kind: project\n    port: {entity: {mappings: {identifier: '.name', blueprint: '.name + \"x\"'}}}",
            "m.yaml",
        )
        .unwrap();
    assert_eq!(computed.blueprints(), None);
}

#[test]
fn an_artifact_is_mapped_as_the_file_says() {
    let mapping = mapping(ARTIFACT).unwrap();
    assert!(mapping.reads_project(Kind::Artifact));
    assert!(mapping.reads_repository(Kind::Artifact));
    assert!(!mapping.maps(Kind::Project));
    let rendered = mapping
        .render(Kind::Artifact, &artifact("alpha"), &[])
        .unwrap();
    assert!(!rendered.excluded);
    assert_eq!(
        rendered.entities,
        vec![Mapped {
            blueprint: "harborArtifact".into(),
            entity: Entity {
                identifier: "alpha/web@sha256:aa".into(),
                title: "alpha/web:v1".into(),
                properties: json!({"tags": ["v1", "latest"]})
                    .as_object()
                    .unwrap()
                    .clone(),
                relations: json!({"repository": "alpha/web"})
                    .as_object()
                    .unwrap()
                    .clone(),
            },
        }]
    );
}

#[test]
fn an_expression_that_may_run_for_ever_is_refused_naming_where() {
    let looping = ARTIFACT.replace(
        "query: '.__project.name | startswith(\"sandbox-\") | not'",
        "query: 'def f: f; f'",
    );
    assert_ne!(looping, ARTIFACT);
    let error = mapping(&looping).unwrap_err().to_string();
    assert!(
        error.contains("resource 0 (artifact), selector.query") && error.contains("calls itself"),
        "{error}"
    );
}

#[test]
fn deleting_dependents_is_off_unless_the_file_turns_it_on() {
    assert!(!mapping(ARTIFACT).unwrap().delete_dependents);
    let on = format!("deleteDependentEntities: true\nresources:\n{ARTIFACT}");
    assert!(Mapping::parse(&on, "on.yaml").unwrap().delete_dependents);
}

#[test]
fn a_selector_leaves_an_object_out() {
    let mapping = mapping(ARTIFACT).unwrap();
    let rendered = mapping
        .render(Kind::Artifact, &artifact("sandbox-1"), &[])
        .unwrap();
    assert!(rendered.excluded);
    assert!(rendered.entities.is_empty());
    // Kinds the file does not map yield nothing, and leave nothing out.
    let project = mapping
        .render(Kind::Project, &json!({"name": "x"}), &[])
        .unwrap();
    assert_eq!(project, Rendered::default());
}

#[test]
fn a_kind_may_appear_twice() {
    let twice = format!(
        "{ARTIFACT}{}",
        ARTIFACT
            .replace("harborArtifact", "image")
            .replace(" | not'", "'")
    );
    let mapping = mapping(&twice).unwrap();
    let alpha = mapping
        .render(Kind::Artifact, &artifact("alpha"), &[])
        .unwrap();
    assert_eq!(alpha.entities.len(), 1);
    assert!(alpha.excluded);
    let both = mapping
        .render(Kind::Artifact, &artifact("sandbox-1"), &[])
        .unwrap();
    assert_eq!(both.entities[0].blueprint, "image");
}

#[test]
fn files_that_cannot_be_used_are_refused_with_the_resource_and_the_field() {
    let cases = [
        ("resources: [", "test.yaml: not a port-app-config mapping"),
        (
            "resources:\n  - kind: user\n    port: {entity: {mappings: {identifier: '.a', blueprint: '\"b\"'}}}",
            "test.yaml: resource 0: unknown kind `user`",
        ),
        (
            "resources:\n  - kind: project\n    port: {entity: {mappings: {identifier: '.name |', blueprint: '\"b\"'}}}",
            "test.yaml: resource 0 (project), identifier: `.name |` does not parse",
        ),
        (
            "resources:\n  - kind: project\n    port: {entity: {mappings: {identifier: '.name', blueprint: '\"b\"', properties: {x: 'nosuch(1)'}}}}",
            "test.yaml: resource 0 (project), properties.x: `nosuch(1)` does not compile: undefined filter of 1 arguments: `nosuch`",
        ),
        (
            "resources:\n  - kind: project\n    selector: {query: '$x'}\n    port: {entity: {mappings: {identifier: '.name', blueprint: '\"b\"'}}}",
            "test.yaml: resource 0 (project), selector.query: `$x` does not compile: undefined variable",
        ),
        (
            "entityDeletionThreshold: 2\nresources: []",
            "test.yaml: entityDeletionThreshold is 2",
        ),
        (
            "resources:\n  - kind: project\n    port: {entity: {mappings: {identifier: '.name', blueprint: '\"b\"', team: '\"t\"'}}}",
            "unknown field `team`",
        ),
    ];
    for (text, expected) in cases {
        let error = Mapping::parse(text, "test.yaml").unwrap_err().to_string();
        assert!(
            error.contains(expected),
            "{text}\n  gave: {error}\n  expected: {expected}"
        );
    }
}

#[test]
fn a_bad_entity_names_the_resource_and_the_field() {
    let cases = [
        (
            "identifier: '.missing'",
            "identifier: is null, not a string",
        ),
        (
            "identifier: '.id'",
            "identifier: is a number (7), not a string",
        ),
        ("identifier: '.name | error(\"boom\")'", "identifier: boom"),
        (
            "identifier: '.name', properties: {x: '.name | tonumber'}",
            "properties.x:",
        ),
        (
            "identifier: '.name', relations: {r: '{a: 1}'}",
            "relations.r: is an object",
        ),
    ];
    for (fields, expected) in cases {
        let text = format!(
            "resources:\n  - kind: project\n    port: {{entity: {{mappings: {{blueprint: '\"b\"', {fields}}}}}}}"
        );
        let mapping = Mapping::parse(&text, "t").unwrap();
        let error = mapping
            .render(Kind::Project, &json!({"name": "alpha", "id": 7}), &[])
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("mapping resource 0 (project), ") && error.contains(expected),
            "{fields}: {error}"
        );
    }
}

#[test]
fn the_plural_kinds_of_port_oceans_harbor_integration_are_understood() {
    let text = "resources:\n  - kind: repositories\n    port: {entity: {mappings: {identifier: '.name', blueprint: '\"b\"'}}}";
    let mapping = Mapping::parse(text, "t").unwrap();
    assert!(mapping.maps(Kind::Repository));
    assert!(!mapping.reads_project(Kind::Repository));
}
