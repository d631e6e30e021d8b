use clap::Parser as _;

use super::*;

fn parse(args: &[&str]) -> anyhow::Result<Settings> {
    let mut argv = vec!["harbor-worker"];
    argv.extend_from_slice(args);
    Cli::try_parse_from(argv)?.into_settings()
}

#[test]
fn credentials_are_refused_as_flags_with_a_subcommand_or_without() {
    for args in [
        &["harbor-worker", "--harbor-password", "pw"][..],
        &["harbor-worker", "--port-client-secret", "pw", "resync"],
        &[
            "harbor-worker",
            "--webhook-secret",
            "pw",
            "webhooks",
            "sync",
        ],
        &[
            "harbor-worker",
            "backlog",
            "--management-url",
            "http://admin:pw@rabbitmq:15672",
        ],
    ] {
        let err = harbor_shared::config::try_parse_cli::<Cli>(args).unwrap_err();
        assert!(
            err.to_string().contains("in the environment instead"),
            "{err}"
        );
    }
    let id = ["harbor-worker", "--port-client-id", "id", "resync"];
    harbor_shared::config::try_parse_cli::<Cli>(id).unwrap();
}

#[test]
fn an_answer_bound_below_a_kibibyte_is_refused() {
    let mut args = COMPLETE.to_vec();
    args.extend(["--http-max-response-bytes", "100"]);
    let err = parse(&args).unwrap_err().to_string();
    assert!(
        err.contains("HTTP_MAX_RESPONSE_BYTES must be at least 1024"),
        "{err}"
    );
}

#[test]
fn a_duration_past_a_week_is_refused_with_its_variable() {
    let mut args = COMPLETE.to_vec();
    args.extend(["--consumer-timeout", "1000000000years"]);
    let err = parse(&args).unwrap_err().to_string();
    assert!(
        err.contains("consumer-timeout") && err.contains("at most 7days"),
        "{err}"
    );
    let mut args = COMPLETE.to_vec();
    args.extend(["--retry-max-elapsed", "7days"]);
    assert!(
        parse(&args).is_err(),
        "past the consumer timeout, not a week"
    );
}

const COMPLETE: [&str; 10] = [
    "--harbor-url",
    "https://harbor.example.com/",
    "--harbor-username",
    "robot$ci",
    "--harbor-password",
    "pw",
    "--port-client-id",
    "id",
    "--port-client-secret",
    "secret",
];

#[test]
fn plain_http_is_flagged_only_off_this_machine() {
    let flagged = |raw: &str| plain_http_off_this_machine(&base_url(raw, "X").unwrap());
    assert!(flagged("http://harbor.example.com"));
    assert!(flagged("http://10.0.0.5:8080"));
    for quiet in [
        "https://harbor.example.com",
        "http://127.0.0.1:8090",
        "http://localhost:8090",
        "http://[::1]:8090",
    ] {
        assert!(!flagged(quiet), "{quiet}");
    }
}

#[test]
fn complete_options_give_settings_with_the_documented_defaults() {
    let settings = parse(&COMPLETE).unwrap();
    assert_eq!(
        settings.harbors[0].url.as_str(),
        "https://harbor.example.com/"
    );
    assert_eq!(settings.harbors[0].name, None);
    assert_eq!(settings.port.url.as_str(), "https://api.port.io/");
    assert_eq!(settings.concurrency, 100);
    assert_eq!(settings.retry.max_elapsed, Duration::from_secs(60));
    assert_eq!(settings.metrics_addr.port(), 9090);
    assert_eq!(
        settings.amqp.topology.parked_queue(),
        "harbor.events.parked"
    );
}

#[test]
fn each_missing_option_is_named() {
    for (i, var) in [
        (1, "HARBOR_URL"),
        (3, "HARBOR_USERNAME"),
        (5, "HARBOR_PASSWORD"),
        (7, "PORT_CLIENT_ID"),
        (9, "PORT_CLIENT_SECRET"),
    ] {
        let mut args = COMPLETE.to_vec();
        args.drain(i - 1..=i);
        let err = format!("{:#}", parse(&args).unwrap_err());
        assert!(err.contains(var), "{var}: {err}");
    }
}

#[test]
fn the_instances_file_replaces_the_single_harbor_variables() {
    let dir = std::env::temp_dir().join(format!("worker-instances-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("instances.yaml");
    let file = path.to_str().unwrap().to_owned();
    let port = ["--port-client-id", "id", "--port-client-secret", "secret"];
    let with = |text: &str, more: &[&str]| {
        std::fs::write(&path, text).unwrap();
        let mut args = vec!["--harbor-instances-file", file.as_str()];
        args.extend_from_slice(&port);
        args.extend_from_slice(more);
        parse(&args)
    };
    let two = "instances:\n  - {name: eu, url: 'https://eu.example.com', username: r, password: p, webhook_secret: eu-secret-0123456789}\n  - {name: us, url: 'https://us.example.com', username: r, password: p, webhook_secret: us-secret-0123456789}\n";
    let public = ["--webhook-public-url", "https://sync.example.com"];
    let settings = with(two, &public).unwrap();
    let missing = with(
        "instances:\n  - {name: eu, url: 'https://eu.example.com', username: r}\n",
        &[],
    );
    let mixed = with(two, &["--harbor-url", "https://harbor.example.com"]);
    let no_secret = with(
        "instances:\n  - {name: eu, url: 'https://eu.example.com', username: r, password: p}\n",
        &public,
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let harbors: Vec<(Option<&str>, &str, &str)> = settings
        .harbors
        .iter()
        .map(|h| {
            let address = h.webhooks.as_ref().unwrap().address.as_str();
            (h.name.as_deref(), h.url.as_str(), address)
        })
        .collect();
    assert_eq!(
        harbors,
        [
            (
                Some("eu"),
                "https://eu.example.com/",
                "https://sync.example.com/webhook/eu"
            ),
            (
                Some("us"),
                "https://us.example.com/",
                "https://sync.example.com/webhook/us"
            ),
        ]
    );
    let error = format!("{:#}", missing.unwrap_err());
    assert!(
        error.contains("instance eu: password (or password_file) is required"),
        "{error}"
    );
    let error = mixed.unwrap_err().to_string();
    assert!(
        error.contains("HARBOR_URL is not used with HARBOR_INSTANCES_FILE"),
        "{error}"
    );
    let error = no_secret.unwrap_err().to_string();
    assert!(error.contains("instance eu: webhook_secret"), "{error}");
    assert_eq!(select(&settings.harbors, Some("us")).unwrap(), [1]);
    assert_eq!(select(&settings.harbors, None).unwrap(), [0, 1]);
    let error = select(&settings.harbors, Some("ap"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("it has: eu, us"), "{error}");
}

#[test]
fn unsafe_values_are_refused() {
    for (flag, value) in [
        ("--retry-max-elapsed", "29m"),
        ("--pull-coalesce-window", "6m"),
        ("--consumer-timeout", "1m"),
    ] {
        let mut args = COMPLETE.to_vec();
        args.extend([flag, value]);
        let err = parse(&args).unwrap_err().to_string();
        assert!(err.contains("CONSUMER_TIMEOUT"), "{flag}: {err}");
    }
    let mut args = COMPLETE.to_vec();
    args.extend(["--consumer-timeout", "10m", "--retry-max-elapsed", "7m"]);
    assert!(
        parse(&args).is_ok(),
        "7m of retries and 5 pull windows fit in a 10m timeout"
    );
    let mut args = COMPLETE.to_vec();
    args[1] = "https://admin:pw@harbor.example.com";
    assert!(
        parse(&args)
            .unwrap_err()
            .to_string()
            .contains("credentials")
    );
    let mut args = COMPLETE.to_vec();
    args.extend(["--worker-concurrency", "0"]);
    assert!(parse(&args).is_err());
}
