//! The name-bound egress layer: a new TCP connection of the agent to an admitted address must
//! also carry an allowlisted name that cordon's DNS answered with that address (DESIGN.md,
//! "Names, not only addresses"). The kernel redirects the agent's connections on the inspected
//! ports to a root-owned listener; [`proxy::serve`] reads the TLS ClientHello ([`hello`]) or every
//! HTTP/1.x request head ([`http`]) without decrypting anything, asks the [`proxy::Policy`]
//! (normally [`proxy::BoundNamePolicy`], backed by [`bindings::Bindings`]), and only then connects
//! to the original destination and relays bytes unchanged. A refused connection is reset and the
//! server never sees a byte.

pub mod bindings;
pub mod hello;
pub mod http;
pub mod proxy;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Serves the redirected connections of both families on one task, until it is aborted (or
/// the runtime stops). The caller binds the listeners (127.0.0.1 and [::1] on
/// `network.proxy_port`; [::1] may be missing where the container has no IPv6, which leaves
/// nothing of that family to redirect) and owns the task.
pub fn start(v4: TcpListener, v6: Option<TcpListener>, ctx: Arc<proxy::Ctx>) -> JoinHandle<()> {
    tokio::spawn(async move {
        match v6 {
            Some(v6) => {
                tokio::join!(proxy::serve(v4, Arc::clone(&ctx)), proxy::serve(v6, ctx));
            }
            None => proxy::serve(v4, ctx).await,
        }
    })
}
