//! Kubernetes Events for last-resort remounts: when a volume had to be mounted afresh, the
//! pods on this node that use it get a Warning event saying so (open files on the old mount
//! were lost). Pods are found from their publish targets — kubelet's target path is
//! `.../pods/<pod uid>/volumes/kubernetes.io~csi/<pv>/mount` — among the pods listed with
//! `spec.nodeName=<this node>`.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, ListParams, PostParams};

pub const REASON: &str = "BerthVolumeRemounted";

/// The pod uid in a kubelet publish target path, if it is one.
pub fn pod_uid_of_target(target: &Path) -> Option<String> {
    let parts: Vec<&str> = target
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect();
    let i = parts.iter().rposition(|p| *p == "pods")?;
    let uid = parts.get(i + 1)?;
    (parts.get(i + 2) == Some(&"volumes") && !uid.is_empty()).then(|| uid.to_string())
}

#[derive(Clone)]
pub struct Recorder {
    client: kube::Client,
    node: String,
}

impl Recorder {
    pub fn new(client: kube::Client, node: String) -> Recorder {
        Recorder { client, node }
    }

    /// The in-cluster (or kubeconfig) client; None outside a cluster.
    pub async fn from_env(node: String) -> Option<Recorder> {
        match kube::Client::try_default().await {
            Ok(client) => Some(Recorder::new(client, node)),
            Err(e) => {
                tracing::info!("no Kubernetes API ({e}); remount events are off");
                None
            }
        }
    }

    /// Records an event on every pod of this node whose target is in `targets`. Returns how
    /// many events were created.
    pub async fn remounted(&self, volume_id: &str, targets: &[PathBuf]) -> kube::Result<usize> {
        let uids: BTreeSet<String> = targets
            .iter()
            .filter_map(|t| pod_uid_of_target(t))
            .collect();
        if uids.is_empty() {
            return Ok(0);
        }
        let pods: Api<Pod> = Api::all(self.client.clone());
        let list = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={}", self.node)))
            .await?;
        let mut created = 0;
        for pod in list.items {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            if !uids.contains(&uid) {
                continue;
            }
            let ns = pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let events: Api<Event> = Api::namespaced(self.client.clone(), &ns);
            events
                .create(
                    &PostParams::default(),
                    &self.event(&pod, &ns, &uid, volume_id),
                )
                .await?;
            created += 1;
        }
        Ok(created)
    }

    fn event(&self, pod: &Pod, ns: &str, uid: &str, volume_id: &str) -> Event {
        let now = Time(k8s_openapi::chrono::Utc::now());
        Event {
            metadata: ObjectMeta {
                generate_name: Some("berth-remount-".into()),
                namespace: Some(ns.to_string()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                namespace: Some(ns.to_string()),
                uid: Some(uid.to_string()),
                ..ObjectReference::default()
            },
            reason: Some(REASON.into()),
            message: Some(format!(
                "berth volume {volume_id} was mounted afresh after its mount process died; \
                 the pod's mount was re-bound, files open before were lost"
            )),
            type_: Some("Warning".into()),
            source: Some(EventSource {
                component: Some("berth-csi".into()),
                host: Some(self.node.clone()),
            }),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_pod_uids_in_kubelet_paths() {
        let t = Path::new("/var/lib/kubelet/pods/1234-abcd/volumes/kubernetes.io~csi/pv-1/mount");
        assert_eq!(pod_uid_of_target(t).as_deref(), Some("1234-abcd"));
        assert_eq!(pod_uid_of_target(Path::new("/tmp/target")), None);
        assert_eq!(pod_uid_of_target(Path::new("/x/pods/uid")), None);
    }
}
