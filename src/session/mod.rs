//! The agent's side of the container: the agent user and how commands run as it (`users`), the
//! agent process and its restart policy (`agent`), its tmux session (`tmux`), its credentials
//! (`credentials`) and the repository it works on (`clone`).

pub(crate) mod agent;
pub mod claude;
pub(crate) mod clone;
pub mod credentials;
pub mod devcontainer;
pub mod persist;
pub mod tmux;
pub(crate) mod users;
