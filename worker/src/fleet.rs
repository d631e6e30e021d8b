//! The Harbors one deployment serves, each with its [`Handler`]: an event is planned and
//! refreshed by the handler of the instance it came from (its [`INSTANCE_HEADER`]), and what
//! one refresh covers is scoped to its instance, so that two Harbors' `library/nginx` are two
//! keys, refreshed independently.
//!
//! [`INSTANCE_HEADER`]: harbor_shared::instances::INSTANCE_HEADER

use crate::handler::{Action, HandleEvent, Handler, Key, Plan, Report, Work};
use crate::schedule::{Judgement, Reconcile, Request};
use crate::webhooks::Desired;

/// One Harbor of the deployment.
pub struct Member {
    /// Its events' handler.
    pub handler: Handler,
    /// Our webhook policy in its projects, when kept.
    pub webhooks: Option<Desired>,
}

/// Every Harbor of the deployment.
pub struct Fleet {
    members: Vec<Member>,
}

/// A key of one instance's handler (its index in the fleet).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scoped {
    /// Which member.
    pub instance: usize,
    /// Its handler's key.
    pub key: Key,
}

impl Fleet {
    /// A fleet of these members (at least one).
    pub fn new(members: Vec<Member>) -> Self {
        assert!(!members.is_empty(), "a fleet serves at least one Harbor");
        Self { members }
    }

    /// Every member, in the order of HARBOR_INSTANCES_FILE.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member whose events carry `instance` (none for the single Harbor of HARBOR_URL).
    fn member_of(&self, instance: Option<&str>) -> Result<usize, String> {
        let found = self
            .members
            .iter()
            .position(|m| m.handler.name() == instance);
        found.ok_or_else(|| match instance {
            None => "the event names no Harbor instance, and this worker serves several \
                     (HARBOR_INSTANCES_FILE): was it published by an ingest without the file?"
                .to_owned(),
            Some(name) => format!(
                "the event came from Harbor instance {name:?}, which this worker does not serve \
                 (HARBOR_INSTANCES_FILE)"
            ),
        })
    }
}

impl Reconcile for Fleet {
    type Key = Scoped;
    type Work = Work;
    /// The member's report, with the member.
    type Report = (usize, Report);

    async fn run(&self, key: &Scoped, work: &Work) -> (usize, Report) {
        let handler = &self.members[key.instance].handler;
        (key.instance, handler.run(&key.key, work).await)
    }

    fn judge(&self, report: &(usize, Report), asked: &Work) -> Judgement<Scoped, Work> {
        let (instance, report) = report;
        match self.members[*instance].handler.judge(report, asked) {
            Judgement::After(first) => Judgement::After(
                first
                    .into_iter()
                    .map(|(key, work)| {
                        let key = Scoped {
                            instance: *instance,
                            key,
                        };
                        (key, work)
                    })
                    .collect(),
            ),
            Judgement::Done => Judgement::Done,
            Judgement::Retry { reason, after } => Judgement::Retry { reason, after },
            Judgement::Failed(reason) => Judgement::Failed(reason),
        }
    }
}

impl HandleEvent for Fleet {
    fn plan(&self, body: &[u8], instance: Option<&str>) -> Plan<Scoped, Work> {
        let index = match self.member_of(instance) {
            Ok(index) => index,
            Err(reason) => {
                return Plan {
                    event_type: "invalid".to_owned(),
                    subject: None,
                    action: Action::Invalid(reason),
                };
            }
        };
        let plan = self.members[index].handler.plan(body);
        let action = match plan.action {
            Action::Refresh(refreshes) => Action::Refresh(
                refreshes
                    .into_iter()
                    .map(|r| Request {
                        key: Scoped {
                            instance: index,
                            key: r.key,
                        },
                        work: r.work,
                        delay: r.delay,
                        group: r.group,
                    })
                    .collect(),
            ),
            Action::Ignore => Action::Ignore,
            Action::Skip(reason) => Action::Skip(reason),
            Action::Invalid(reason) => Action::Invalid(reason),
        };
        Plan {
            event_type: plan.event_type,
            subject: plan.subject,
            action,
        }
    }

    fn subject(&self, key: &Scoped) -> String {
        self.members[key.instance].handler.subject_of(&key.key)
    }
}
