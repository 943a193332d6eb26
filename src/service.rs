//! Long-running tasks with an owner: the DNS server, the refresh, the control socket, the
//! metrics listener and the name-bound proxy are each a [`Service`], started by the boot stage
//! that binds their sockets and held in [`Services`], which the supervisor stops in reverse
//! order of start when it stops (mini-redis' shutdown shape: the caller owns the handle).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Resolves when the service is asked to stop: what its task selects on.
#[derive(Clone)]
pub struct StopRequest(watch::Receiver<bool>);

impl StopRequest {
    /// Waits until a stop is requested (at once if it already was, or if the owner is gone).
    pub async fn requested(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// One running task and the means to stop it.
pub struct Service {
    name: &'static str,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Service {
    /// Spawns `run` on the current runtime, handing it the [`StopRequest`] it must honour.
    pub fn spawn<F>(name: &'static str, run: impl FnOnce(StopRequest) -> F) -> Service
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop, requested) = watch::channel(false);
        let task = tokio::spawn(run(StopRequest(requested)));
        Service { name, stop, task }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Asks the task to stop and waits for it up to `within`; then aborts it. True when it
    /// stopped by itself.
    pub async fn stop(self, within: Duration) -> bool {
        let _ = self.stop.send(true);
        let mut task = self.task;
        match tokio::time::timeout(within, &mut task).await {
            Ok(_) => true,
            Err(_) => {
                task.abort();
                false
            }
        }
    }
}

/// The services in the order they started. Shared: the boot adds to it from its thread, the
/// supervisor stops them all at the end.
#[derive(Clone, Default)]
pub struct Services(Arc<Mutex<Vec<Service>>>);

impl Services {
    pub fn add(&self, service: Service) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(service);
    }

    /// The names, in start order.
    pub fn names(&self) -> Vec<&'static str> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).iter().map(Service::name).collect()
    }

    /// Stops every service, the last started first, each given up to `each`.
    pub async fn stop_all(&self, each: Duration) {
        let services = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for service in services.into_iter().rev() {
            let name = service.name();
            if !service.stop(each).await {
                tracing::warn!(service = name, "did not stop within {each:?}; aborted");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn services_stop_in_reverse_order_and_a_stuck_one_is_aborted() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let services = Services::default();
        for name in ["control", "dns", "refresh"] {
            let order = order.clone();
            services.add(Service::spawn(name, move |mut stop| async move {
                stop.requested().await;
                order.lock().unwrap().push(name);
            }));
        }
        services.add(Service::spawn("stuck", |_| std::future::pending()));
        assert_eq!(services.names(), ["control", "dns", "refresh", "stuck"]);
        let t0 = std::time::Instant::now();
        services.stop_all(Duration::from_millis(200)).await;
        assert_eq!(*order.lock().unwrap(), ["refresh", "dns", "control"]);
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(services.names().is_empty());
    }
}
