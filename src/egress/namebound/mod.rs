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

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;

use crate::config::Network;
use crate::egress::Egress;
use crate::fix::Problem;
use crate::service::Service;

/// Part of the boot's `firewall` stage, before the rules that redirect to it: binds the proxy's
/// loopback listeners (127.0.0.1 and [::1] on `network.proxy_port`), builds its policy (the
/// allowlist, ports included, and the DNS answers' bindings) and starts serving, as a service.
/// Fails closed: without the proxy the stage fails, and the agent never starts.
pub fn start(network: &Network, egress: &Egress) -> Result<Service, Problem> {
    let port = network.proxy_port;
    let fix = || {
        format!(
            "another process holds loopback port {port}: set network.proxy_port to a free port (or, for debugging \
             only, network.name_binding = false)"
        )
    };
    let v4 = listen((Ipv4Addr::LOCALHOST, port).into()).map_err(|e| {
        Problem::caused_by(format_args!("cannot bind the name-checking proxy to 127.0.0.1:{port}"), &e).with_fix(fix())
    })?;
    // No ::1 means no IPv6 in this container, so nothing of that family to redirect; had there
    // been, its redirected connections would be refused (fail closed), never let through.
    let v6 = match listen((Ipv6Addr::LOCALHOST, port).into()) {
        Ok(l) => Some(l),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => None,
        Err(e) => {
            return Err(Problem::caused_by(format_args!("cannot bind the name-checking proxy to [::1]:{port}"), &e)
                .with_fix(fix()));
        }
    };
    let policy = egress.policy.clone();
    let ports = network.ports.clone();
    let allowlisted = move |name: &str, dst_port: u16| {
        // Observe mode: a name outside the allowlist is recorded and passes on the default ports.
        let reach = policy.allowlist().lookup(name).or_else(|| policy.observe(name, "proxy", || None));
        reach.is_some_and(|r| {
            (r.default_ports && ports.contains(&dst_port))
                || r.extra_ports.contains(&dst_port)
                || r.raw_ports.contains(&dst_port)
        })
    };
    let names = proxy::BoundNamePolicy::new(Box::new(allowlisted), egress.bindings.clone());
    let ctx = Arc::new(
        proxy::Ctx::new(
            Box::new(names),
            Box::new(proxy::KernelOriginalDestination),
            vec![80],
            proxy::Limits::default(),
        )
        .journal(egress.journal.clone(), egress.bindings.clone()),
    );
    let _ = egress.proxy.set(ctx.clone());
    let serving = egress.proxy_serving.clone();
    Ok(Service::spawn("namebound", move |mut stop| async move {
        // Cleared however the task ends (a stop, a panic): `status` then says the layer is down.
        serving.store(true, Ordering::Relaxed);
        let _serving = Serving(serving);
        tokio::select! {
            _ = stop.requested() => {}
            _ = serve(v4, v6, ctx) => {}
        }
    }))
}

/// Clears the flag when dropped, however the task ends.
struct Serving(Arc<AtomicBool>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// Serves the redirected connections of both families until the future is dropped. `v6` may be
/// missing where the container has no IPv6.
async fn serve(v4: TcpListener, v6: Option<TcpListener>, ctx: Arc<proxy::Ctx>) {
    match v6 {
        Some(v6) => {
            tokio::join!(proxy::serve(v4, Arc::clone(&ctx)), proxy::serve(v6, ctx));
        }
        None => proxy::serve(v4, ctx).await,
    }
}
