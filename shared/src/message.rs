//! The message format on the queues, in one place: the headers, how a webhook, a resync request,
//! a forwarded event, a parked event and a replayed one become a message's properties, and how a
//! header is read back. The ingest, the worker's consumer, resync and `parked` all go through it.
//!
//! | header              | set by                      | what                                    |
//! |---------------------|-----------------------------|-----------------------------------------|
//! | `x-subject`         | ingest, resync, forwarding  | the project (instance-prefixed): the consistent-hash exchange routes on it |
//! | `x-harbor-instance` | ingest, resync              | the Harbor of HARBOR_INSTANCES_FILE it came from |
//! | `x-payload-format`  | ingest                      | `default` or `cloudevents`              |
//! | `x-received-at`     | ingest                      | when the webhook arrived (RFC 3339)     |
//! | `x-request-id`      | ingest                      | the webhook request's id                |
//! | `x-forwarded-from`  | the consumer                | a copy for another project's queue: the project it came from |
//! | `x-failure-reason`, `x-failed-at`, `x-attempts` | parking | why, when, after how many refreshes |
//! | `x-replayed-at`     | `parked replay`             | when it was sent back                   |

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

use crate::event::Envelope;
use crate::instances;

/// The header that names an event's subject; the consistent-hash exchange routes on it.
pub const SUBJECT_HEADER: &str = "x-subject";
/// The header that names the Harbor instance an event came from.
pub const INSTANCE_HEADER: &str = "x-harbor-instance";
/// Marks a copy of an event forwarded to another project's work queue: the project it came from.
pub const FORWARDED_HEADER: &str = "x-forwarded-from";
/// Why an event was parked.
pub const FAILURE_REASON_HEADER: &str = "x-failure-reason";
/// When an event was parked.
pub const FAILED_AT_HEADER: &str = "x-failed-at";
/// How many refreshes a parked event had.
pub const ATTEMPTS_HEADER: &str = "x-attempts";
/// The id of the webhook request an event came in.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The longest failure reason a parked message carries.
const REASON_CHARS: usize = 2000;

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

fn time(at: SystemTime) -> AMQPValue {
    text(&humantime::format_rfc3339_millis(at).to_string())
}

/// A webhook's message, as the ingest publishes it: persistent, the envelope's message id, and
/// the subject (so the work queue) of its project.
pub fn webhook(envelope: &Envelope, instance: Option<&str>, request_id: &str) -> BasicProperties {
    // One clock reading for both the header and the timestamp, as the message was received.
    let now = SystemTime::now();
    let mut headers = FieldTable::default();
    headers.insert("x-payload-format".into(), text(envelope.format.as_str()));
    headers.insert("x-received-at".into(), time(now));
    headers.insert(REQUEST_ID_HEADER.into(), text(request_id));
    if let Some(instance) = instance {
        headers.insert(INSTANCE_HEADER.into(), text(instance));
    }
    // The work queue is chosen by this header, so that one worker at a time handles a project.
    if let Some(project) = &envelope.project {
        let subject = instances::subject(instance, project);
        headers.insert(SUBJECT_HEADER.into(), text(&subject));
    }
    let timestamp = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(envelope.message_id.as_str().into())
        .with_timestamp(timestamp)
        .with_app_id("harbor-ingest".into())
        .with_headers(headers)
}

/// A resync request's message: persistent, a new id, the subject of its project.
pub fn resync_request(subject: &str, instance: Option<&str>, message_id: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(SUBJECT_HEADER.into(), text(subject));
    if let Some(instance) = instance {
        headers.insert(INSTANCE_HEADER.into(), text(instance));
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_app_id("harbor-worker resync".into())
        .with_headers(headers)
}

/// A copy of a message for `subject`'s work queue, marked with the subject it came from so that
/// it is not forwarded again.
pub fn forwarded(original: &BasicProperties, subject: &str) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    let from = header(original, SUBJECT_HEADER).unwrap_or_default();
    headers.insert(SUBJECT_HEADER.into(), text(subject));
    headers.insert(FORWARDED_HEADER.into(), text(&from));
    original.clone().with_headers(headers)
}

/// A message as parked: its own properties, persistent, with why, when and after how many
/// refreshes (the reason cut at 2,000 characters).
pub fn parked(original: &BasicProperties, reason: &str, attempts: u32) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    let reason: String = reason.chars().take(REASON_CHARS).collect();
    headers.insert(FAILURE_REASON_HEADER.into(), text(&reason));
    headers.insert(FAILED_AT_HEADER.into(), time(SystemTime::now()));
    headers.insert(
        ATTEMPTS_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(attempts)),
    );
    original.clone().with_delivery_mode(2).with_headers(headers)
}

/// A parked message sent back: without what parking and the broker's dead-lettering added,
/// marked as replayed.
pub fn replayed(parked: &BasicProperties) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (key, value) in parked.headers().clone().unwrap_or_default().inner() {
        let key_text = key.as_str();
        let added = matches!(
            key_text,
            FAILURE_REASON_HEADER | FAILED_AT_HEADER | ATTEMPTS_HEADER | "x-death"
        ) || key_text.starts_with("x-first-death")
            || key_text.starts_with("x-last-death");
        if !added {
            headers.insert(key.clone(), value.clone());
        }
    }
    headers.insert("x-replayed-at".into(), time(SystemTime::now()));
    parked.clone().with_delivery_mode(2).with_headers(headers)
}

/// A header's text, if it has one.
pub fn header(properties: &BasicProperties, name: &str) -> Option<String> {
    headers_text(properties.headers().as_ref()?, name)
}

/// A header's text in a header table, if it has one.
pub fn headers_text(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(value) => Some(value.to_string()),
        AMQPValue::ShortString(value) => Some(value.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_message_replayed_is_the_original_again_marked_as_replayed() {
        let mut headers = FieldTable::default();
        headers.insert(SUBJECT_HEADER.into(), text("library"));
        let original = BasicProperties::default()
            .with_message_id("m1".into())
            .with_headers(headers);
        let parked = parked(&original, &"x".repeat(5000), 3);
        assert_eq!(
            header(&parked, FAILURE_REASON_HEADER).map(|r| r.len()),
            Some(REASON_CHARS)
        );
        let replayed = replayed(&parked);
        assert_eq!(
            header(&replayed, SUBJECT_HEADER).as_deref(),
            Some("library")
        );
        assert_eq!(header(&replayed, FAILURE_REASON_HEADER), None);
        assert_eq!(header(&replayed, FAILED_AT_HEADER), None);
        assert!(header(&replayed, "x-replayed-at").is_some());
        assert_eq!(replayed.message_id(), original.message_id());
    }

    #[test]
    fn a_forwarded_copy_names_its_new_subject_and_where_it_came_from() {
        let original = resync_request("library", Some("eu"), "m1");
        let copy = forwarded(&original, "team");
        assert_eq!(header(&copy, SUBJECT_HEADER).as_deref(), Some("team"));
        assert_eq!(header(&copy, FORWARDED_HEADER).as_deref(), Some("library"));
        assert_eq!(header(&copy, INSTANCE_HEADER).as_deref(), Some("eu"));
    }
}
