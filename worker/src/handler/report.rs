//! What a refresh did, part by part, and what that means for each request folded into it.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::clients::CallError;
use crate::names::Digest;
use crate::plan::{Key, Work};
use crate::schedule::Judgement;

/// What a part of a refresh came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) enum Status {
    #[default]
    Done,
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    Failed(String),
}

impl Status {
    pub(super) fn of<T>(result: &Result<T, CallError>) -> Self {
        match result {
            Ok(_) => Self::Done,
            Err(CallError::Transient {
                reason,
                retry_after,
            }) => Self::Retry {
                reason: reason.clone(),
                after: *retry_after,
            },
            Err(CallError::Permanent { reason }) => Self::Failed(reason.clone()),
        }
    }

    /// The worse of the two: failed over retry over done.
    pub(super) fn and(self, other: &Self) -> Self {
        match (&self, other) {
            (Self::Failed(_), _) => self,
            (_, Self::Failed(_)) => other.clone(),
            (Self::Retry { .. }, _) => self,
            (_, Self::Retry { .. }) => other.clone(),
            _ => Self::Done,
        }
    }

    pub(super) fn all<'a>(statuses: impl IntoIterator<Item = &'a Status>) -> Self {
        statuses.into_iter().fold(Self::Done, |a, b| a.and(b))
    }
}

/// What a refresh did, part by part, so that each request folded into it is told what became of
/// what it asked.
#[derive(Debug, Default)]
pub struct Report {
    /// The project, or the repository's own entity (a gone repository's deletes included).
    pub(super) main: Status,
    pub(super) artifacts: BTreeMap<Digest, Status>,
    pub(super) moved_tags: Status,
    pub(super) every_artifact: Status,
    /// To refresh first; then the key again (a gone project waits for its repositories).
    pub(super) first: Vec<(Key, Work)>,
    pub(super) upserted: usize,
    pub(super) deleted: usize,
}

/// What a refresh's report means for a request that asked `asked`: only the parts it asked for
/// count, so that one artifact Port refuses does not fail the requests for the others.
pub(super) fn verdict(report: &Report, asked: &Work) -> Judgement<Key, Work> {
    if !report.first.is_empty() {
        return Judgement::After(report.first.clone());
    }
    let mut status = Status::Done;
    // A project refresh asks nothing of a repository refresh's parts: its status is `main`.
    if asked.repository || *asked == Work::default() {
        status = status.and(&report.main);
    }
    for digest in &asked.artifacts {
        status = status.and(report.artifacts.get(digest).unwrap_or(&report.main));
    }
    if asked.moved_tags {
        status = status.and(&report.moved_tags);
    }
    if asked.every_artifact {
        status = status.and(&report.every_artifact);
    }
    match status {
        Status::Done => Judgement::Done,
        Status::Retry { reason, after } => Judgement::Retry { reason, after },
        Status::Failed(reason) => Judgement::Failed(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

    #[test]
    fn a_request_is_told_about_the_parts_it_asked_for_only() {
        let d1 = Digest::parse(D1).unwrap();
        let d2 = Digest::parse(&D1.replace("0a1b", "ffff")).unwrap();
        let report = Report {
            artifacts: [
                (d1.clone(), Status::Failed("422".into())),
                (d2.clone(), Status::Done),
            ]
            .into(),
            moved_tags: Status::Retry {
                reason: "429".into(),
                after: None,
            },
            ..Report::default()
        };
        let asked = |d: &Digest, moved_tags| Work {
            artifacts: [d.clone()].into(),
            moved_tags,
            ..Work::default()
        };
        assert_eq!(verdict(&report, &asked(&d2, false)), Judgement::Done);
        assert_eq!(
            verdict(&report, &asked(&d1, false)),
            Judgement::Failed("422".into())
        );
        assert_eq!(
            verdict(&report, &asked(&d2, true)),
            Judgement::Retry {
                reason: "429".into(),
                after: None
            }
        );
        let gone_project = Report {
            first: vec![(Key::Project("x".into()), Work::default())],
            ..Report::default()
        };
        assert!(matches!(
            verdict(&gone_project, &Work::default()),
            Judgement::After(_)
        ));
    }
}
