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
