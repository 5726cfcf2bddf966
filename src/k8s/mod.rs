//! What the controller and the agent share to talk to Kubernetes: watchers as a source of
//! world events ([`source`]), leader election on a Lease ([`lease`]), and server-side
//! apply of status subresources ([`apply_status`]).

pub mod gateway_source;
pub mod lease;
pub mod source;

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Applies `status` to the `/status` subresource of `name` with server-side apply as
/// `field_manager`, forcing ownership of the fields it sets (Portico is the only writer of
/// those fields). The body names `apiVersion`, `kind` and the object, as apply requires.
///
/// # Errors
/// The API server refused the patch.
pub async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    namespace: Option<&str>,
    field_manager: &str,
    status: impl Serialize,
) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut metadata = serde_json::json!({ "name": name });
    if let Some(ns) = namespace {
        metadata["namespace"] = ns.into();
    }
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": metadata,
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(field_manager).force(),
        &Patch::Apply(&body),
    )
    .await
}
