//! murmur's search attributes (Keyword): how the Web UI, `temporal workflow list` and the
//! nuke find a tenant's workflows.

use temporalio_common::search_attributes::{SearchAttributeKey, SearchAttributes};

/// The tenant a workflow belongs to.
pub const SA_TENANT: SearchAttributeKey<String> = SearchAttributeKey::keyword("MurmurTenant");
/// The workspace an agent runs in.
pub const SA_WORKSPACE: SearchAttributeKey<String> = SearchAttributeKey::keyword("MurmurWorkspace");
/// `pool`, `agent`, `nuke` or `bake`.
pub const SA_KIND: SearchAttributeKey<String> = SearchAttributeKey::keyword("MurmurKind");

/// Search attributes of a workflow of `kind` for `tenant` (and `workspace`, for agents).
pub fn search_attributes(tenant: &str, kind: &str, workspace: Option<&str>) -> SearchAttributes {
    let mut values = vec![
        SA_TENANT.value_set(tenant.to_string()),
        SA_KIND.value_set(kind.to_string()),
    ];
    if let Some(ws) = workspace {
        values.push(SA_WORKSPACE.value_set(ws.to_string()));
    }
    SearchAttributes::new(values)
}
