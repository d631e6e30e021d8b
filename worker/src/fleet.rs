//! The Harbors one deployment serves, each with its [`Handler`]: an event is planned and
//! refreshed by the handler of the instance it came from (its [`INSTANCE_HEADER`]), and what
//! one refresh covers is scoped to its instance, so that two Harbors' `library/nginx` are two
//! keys, refreshed independently.
//!
//! [`INSTANCE_HEADER`]: harbor_shared::instances::INSTANCE_HEADER

use harbor_shared::instances;

use crate::handler::{Handler, Report};
use crate::plan::{Action, HandleEvent, Key, Plan, Work};
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
                    about: None,
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
            about: plan.about,
            action,
        }
    }

    fn subject(&self, key: &Scoped) -> String {
        self.members[key.instance].handler.subject_of(&key.key)
    }

    fn harbor(&self, instance: Option<&str>) -> &str {
        self.member_of(instance)
            .map_or(instances::NO_INSTANCE, |index| {
                self.members[index].handler.instance()
            })
    }

    fn fleet_size(&self, workers: usize) {
        // One budget for the deployment's Port clients: setting it once does.
        if let Some(member) = self.members.first() {
            member
                .handler
                .catalog()
                .port()
                .budget()
                .set_workers(workers);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::mapping::Mapping;
    use crate::settings::{HarborSettings, PortSettings};

    fn fleet(names: &[Option<&str>]) -> Fleet {
        let harbors: Vec<HarborSettings> = names
            .iter()
            .map(|name| HarborSettings {
                name: name.map(str::to_owned),
                url: "https://harbor.example.com".parse().unwrap(),
                username: "robot".into(),
                password: "pw".into(),
                webhooks: None,
            })
            .collect();
        let port = PortSettings {
            url: "https://api.port.io".parse().unwrap(),
            client_id: "id".into(),
            client_secret: "secret".into(),
            mapping: Arc::new(Mapping::default_mapping()),
            budget: Arc::new(crate::clients::port::PortBudget::new(0.5)),
        };
        let http = crate::clients::Http::new(Duration::from_secs(1), 1024).unwrap();
        crate::startup::fleet(&harbors, &port, http, Duration::ZERO, 4)
    }

    const PUSH: &[u8] = br#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000001","tag":"1"}],"repository":{"name":"nginx","namespace":"library","repo_full_name":"library/nginx"}}}"#;

    fn keys(plan: &Plan<Scoped, Work>) -> Vec<(usize, String)> {
        let Action::Refresh(refreshes) = &plan.action else {
            panic!("not a refresh: {:?}", plan.action);
        };
        refreshes
            .iter()
            .map(|r| (r.key.instance, format!("{:?}", r.key.key)))
            .collect()
    }

    #[test]
    fn an_event_is_planned_by_the_handler_of_its_instance() {
        let named = fleet(&[Some("eu"), Some("us")]);
        let plan = named.plan(PUSH, Some("us"));
        assert!(keys(&plan).iter().all(|(instance, _)| *instance == 1));
        let Action::Refresh(refreshes) = &plan.action else {
            unreachable!()
        };
        assert_eq!(named.subject(&refreshes[0].key), "us/library");
        for (instance, expected) in [(None, "names no Harbor instance"), (Some("ap"), "\"ap\"")] {
            match named.plan(PUSH, instance).action {
                Action::Invalid(reason) => assert!(reason.contains(expected), "{reason}"),
                other => panic!("{instance:?}: {other:?}"),
            }
        }
        // A single Harbor: its events carry no instance, its subjects are the projects.
        let single = fleet(&[None]);
        let plan = single.plan(PUSH, None);
        let Action::Refresh(refreshes) = &plan.action else {
            panic!("{:?}", plan.action)
        };
        assert_eq!(single.subject(&refreshes[0].key), "library");
        assert!(matches!(
            single.plan(PUSH, Some("eu")).action,
            Action::Invalid(_)
        ));
    }
}
