use serde_json::json;
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use super::*;

/// A Harbor, as a robot account sees it, where `kept` exists (the account has no
/// permission in it) and `gone` does not: both answer reads in them 403, and only
/// `HEAD /projects` tells them apart.
async fn harbor() -> (MockServer, HarborClient) {
    let server = MockServer::start().await;
    let forbidden = json!({"errors": [{"code": "FORBIDDEN", "message": "forbidden"}]});
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(403).set_body_json(forbidden))
        .mount(&server)
        .await;
    let head = |name: &str| {
        Mock::given(method("HEAD"))
            .and(path("/api/v2.0/projects"))
            .and(query_param("project_name", name))
    };
    head("kept")
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    head("gone")
        .respond_with(|request: &Request| {
            let id = request.headers.get(REQUEST_ID).cloned();
            let answer = ResponseTemplate::new(404);
            match id {
                Some(id) => answer.insert_header(REQUEST_ID, id),
                None => answer,
            }
        })
        .mount(&server)
        .await;
    // A proxy's own 404, which names no request.
    head("proxied")
        .respond_with(ResponseTemplate::new(404).insert_header(REQUEST_ID, "another"))
        .mount(&server)
        .await;
    let client = client_of(&server);
    (server, client)
}

/// A client of a Harbor faked by `server`, as a robot account.
pub fn client_of(server: &MockServer) -> HarborClient {
    HarborClient::new(
        Http::new(std::time::Duration::from_secs(5), 1 << 20).unwrap(),
        Url::parse(&server.uri()).unwrap(),
        "robot$sync".into(),
        SecretString::from("password"),
    )
}

fn repository(full: &str) -> RepositoryName {
    RepositoryName::parse(full).unwrap()
}

#[tokio::test]
async fn a_list_whose_pages_never_end_fails_instead_of_growing() {
    let server = MockServer::start().await;
    let page: Vec<Value> = (0..100)
        .map(|i| json!({"name": format!("p{i}"), "project_id": i}))
        .collect();
    // A proxy that drops the query: the first page, whatever page is asked.
    Mock::given(method("GET"))
        .and(path("/api/v2.0/projects"))
        .respond_with(ResponseTemplate::new(200).set_body_json(&page))
        .mount(&server)
        .await;
    let error = client_of(&server).projects().await.unwrap_err();
    assert!(
        matches!(&error, CallError::Permanent { reason } if reason.contains("(page 2): the same page")),
        "{error:?}"
    );

    // A server that sends new items on every page.
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2.0/projects"))
        .respond_with(|request: &wiremock::Request| {
            let page: usize = request
                .url
                .query_pairs()
                .find(|(k, _)| k == "page")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(1);
            let items: Vec<Value> = (0..100)
                .map(|i| json!({"name": format!("p{page}-{i}"), "project_id": page * 100 + i}))
                .collect();
            ResponseTemplate::new(200).set_body_json(items)
        })
        .mount(&server)
        .await;
    let error = client_of(&server).projects().await.unwrap_err();
    assert!(
        matches!(&error, CallError::Permanent { reason } if reason.contains("more than 100000 items")),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_403_in_a_project_that_is_gone_means_gone() {
    let (_server, client) = harbor().await;
    let digest = Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap();

    assert_eq!(client.project("gone").await.unwrap(), None);
    assert_eq!(
        client.repository(&repository("gone/app")).await.unwrap(),
        None
    );
    let artifact = client.artifact(&repository("gone/app"), &digest).await;
    assert_eq!(artifact.unwrap(), None);
    assert!(client.repositories("gone").await.unwrap().is_empty());
    assert!(
        client
            .artifacts(&repository("gone/app"))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_403_in_a_project_that_exists_stands_and_an_unproven_404_is_transient() {
    let (_server, client) = harbor().await;

    match client.repository(&repository("kept/app")).await {
        Err(CallError::Permanent { reason }) => {
            assert!(
                reason.contains("GET repository kept/app answered 403"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    match client.project("proxied").await {
        Err(CallError::Transient { reason, .. }) => {
            let expected = "Harbor GET project proxied answered 403; then Harbor HEAD \
                                project proxied answered 404 without";
            assert!(reason.starts_with(expected), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Outside a project, a 403 is only a 403.
    assert!(matches!(
        client.projects().await,
        Err(CallError::Permanent { .. })
    ));
}
