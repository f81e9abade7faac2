//! The supervision of `meshd run` as a pure state machine: it is told what happened (a process
//! started, exited, answered its probe; certificates were renewed; shutdown began) with the time as a
//! parameter, and answers with what to do ([`Action`]). No processes, no clocks, no sleeping: the
//! driver does the I/O, the tests move the clock.
//!
//! Rules:
//! * start in dependency order: a component starts once every dependency it has in the set runs and
//!   answered its health probe (etcd → kube-apiserver → the rest);
//! * a component whose binary is missing is never started, stays reported as missing, and keeps its
//!   dependents waiting (they are reported as waiting for it);
//! * on exit: restart after `initial · 2^n`, capped at `max`; a component that ran at least
//!   `reset_after` before exiting starts again from `initial`;
//! * after its certificates are renewed: stop, then start again at once (no backoff);
//! * on shutdown: stop in reverse order, a component only once every component depending on it has
//!   exited.

use std::time::{Duration, Instant};

use super::Component;

/// Restart delays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
    /// A run at least this long resets the delay to `initial`.
    pub reset_after: Duration,
}

impl Backoff {
    /// The delay before restart number `attempt` (0-based) of a series of failures.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// A component's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Its binary is missing (why): never started.
    Missing(String),
    /// Waiting for its dependencies.
    Waiting,
    /// Told to start; not yet confirmed.
    Starting,
    /// Running since, and whether its latest probe passed.
    Running {
        /// Start time.
        since: Instant,
        /// Latest probe result.
        healthy: bool,
    },
    /// Exited; restarts at `until`.
    Backoff {
        /// When it may start again.
        until: Instant,
    },
    /// Told to stop; `restart`: start again once it exited (certificate rotation).
    Stopping {
        /// Start again after the exit.
        restart: bool,
    },
    /// Stopped for good (shutdown).
    Stopped,
}

/// What the driver must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start the component's process (then report `started` or `start_failed`).
    Start(Component),
    /// Stop the component's process (SIGTERM, then SIGKILL after a grace period; then report
    /// `exited`).
    Stop(Component),
}

/// One component's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    /// Which.
    pub component: Component,
    /// Its state.
    pub state: State,
    /// Consecutive failures (the backoff exponent).
    pub failures: u32,
    /// Restarts after an exit so far.
    pub restarts: u32,
    /// How its last run ended.
    pub last_exit: Option<String>,
    restart_pending: bool,
}

/// The machine.
#[derive(Clone, Debug)]
pub struct Supervisor {
    units: Vec<Unit>,
    backoff: Backoff,
    shutting_down: bool,
}

impl Supervisor {
    /// A machine for `components` (each with `Err(why)` when its binary is missing), kept in start
    /// order whatever the order given.
    pub fn new(components: Vec<(Component, Result<(), String>)>, backoff: Backoff) -> Self {
        let mut units: Vec<Unit> = components
            .into_iter()
            .map(|(c, present)| Unit {
                component: c,
                state: match present {
                    Ok(()) => State::Waiting,
                    Err(why) => State::Missing(why),
                },
                failures: 0,
                restarts: 0,
                last_exit: None,
                restart_pending: false,
            })
            .collect();
        units.sort_by_key(|u| u.component);
        units.dedup_by_key(|u| u.component);
        Supervisor {
            units,
            backoff,
            shutting_down: false,
        }
    }

    /// Every component's record, in start order.
    pub fn units(&self) -> &[Unit] {
        &self.units
    }

    /// The record of `c`.
    pub fn unit(&self, c: Component) -> Option<&Unit> {
        self.units.iter().find(|u| u.component == c)
    }

    fn unit_mut(&mut self, c: Component) -> Option<&mut Unit> {
        self.units.iter_mut().find(|u| u.component == c)
    }

    /// Whether `c` runs and answered its latest probe.
    fn healthy(&self, c: Component) -> bool {
        matches!(
            self.unit(c).map(|u| &u.state),
            Some(State::Running { healthy: true, .. })
        )
    }

    /// The dependencies of `c` in the set that are not healthy yet.
    pub fn waiting_for(&self, c: Component) -> Vec<Component> {
        c.depends_on()
            .iter()
            .copied()
            .filter(|d| self.unit(*d).is_some() && !self.healthy(*d))
            .collect()
    }

    /// Whether a process may exist for the unit.
    fn active(s: &State) -> bool {
        matches!(
            s,
            State::Starting | State::Running { .. } | State::Stopping { .. }
        )
    }

    /// Decides what to do at `now`.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.shutting_down {
            // Reverse order: stop a component once nothing that depends on it is active.
            for i in (0..self.units.len()).rev() {
                let c = self.units[i].component;
                let dependents_active = self.units.iter().any(|u| {
                    u.component.depends_on().contains(&c)
                        && (Self::active(&u.state)
                            || matches!(u.state, State::Waiting | State::Backoff { .. }))
                });
                let u = &mut self.units[i];
                match u.state {
                    State::Waiting | State::Backoff { .. } => u.state = State::Stopped,
                    State::Starting | State::Running { .. } if !dependents_active => {
                        u.state = State::Stopping { restart: false };
                        actions.push(Action::Stop(c));
                    }
                    State::Stopping { ref mut restart } => *restart = false,
                    _ => {}
                }
            }
            return actions;
        }
        for i in 0..self.units.len() {
            let c = self.units[i].component;
            let blocked = !self.waiting_for(c).is_empty();
            let u = &mut self.units[i];
            match u.state {
                State::Backoff { until } if now >= until => {
                    u.state = State::Waiting;
                    if !blocked {
                        u.state = State::Starting;
                        actions.push(Action::Start(c));
                    }
                }
                State::Waiting if !blocked => {
                    u.state = State::Starting;
                    actions.push(Action::Start(c));
                }
                State::Starting | State::Running { .. } if u.restart_pending => {
                    u.restart_pending = false;
                    u.state = State::Stopping { restart: true };
                    actions.push(Action::Stop(c));
                }
                _ => {}
            }
        }
        actions
    }

    /// The earliest time `poll` has something to do without an event (a backoff ending).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.units
            .iter()
            .filter_map(|u| match u.state {
                State::Backoff { until } => Some(until),
                _ => None,
            })
            .min()
    }

    /// `c`'s process started at `now`.
    pub fn started(&mut self, c: Component, now: Instant) {
        if let Some(u) = self.unit_mut(c) {
            if u.state == State::Starting {
                u.state = State::Running {
                    since: now,
                    healthy: false,
                };
            }
        }
    }

    /// `c`'s process could not be started (`why`): treated as an immediate exit.
    pub fn start_failed(&mut self, c: Component, now: Instant, why: String) {
        if let Some(u) = self.unit_mut(c) {
            if u.state == State::Starting {
                u.state = State::Running {
                    since: now,
                    healthy: false,
                };
            }
        }
        self.exited(c, now, why);
    }

    /// `c`'s process exited at `now` (`how`: its status).
    pub fn exited(&mut self, c: Component, now: Instant, how: String) {
        let backoff = self.backoff;
        let shutting_down = self.shutting_down;
        let Some(u) = self.unit_mut(c) else { return };
        u.last_exit = Some(how);
        match u.state {
            State::Stopping { restart: true } if !shutting_down => {
                u.state = State::Waiting;
            }
            State::Stopping { .. } => u.state = State::Stopped,
            State::Running { .. } | State::Starting if shutting_down => u.state = State::Stopped,
            State::Running { since, .. } => {
                if now.saturating_duration_since(since) >= backoff.reset_after {
                    u.failures = 0;
                }
                let delay = backoff.delay(u.failures);
                u.failures = u.failures.saturating_add(1);
                u.restarts = u.restarts.saturating_add(1);
                u.restart_pending = false;
                u.state = State::Backoff { until: now + delay };
            }
            State::Starting => {
                let delay = backoff.delay(u.failures);
                u.failures = u.failures.saturating_add(1);
                u.restarts = u.restarts.saturating_add(1);
                u.state = State::Backoff { until: now + delay };
            }
            _ => {}
        }
    }

    /// `c`'s probe passed (`ok`) or failed.
    pub fn probed(&mut self, c: Component, ok: bool) {
        if let Some(u) = self.unit_mut(c) {
            if let State::Running { healthy, .. } = &mut u.state {
                *healthy = ok;
            }
        }
    }

    /// The certificates of `components` were renewed: running ones restart at the next poll.
    pub fn rotated(&mut self, components: &[Component]) {
        for c in components {
            if let Some(u) = self.unit_mut(*c) {
                if matches!(u.state, State::Starting | State::Running { .. }) {
                    u.restart_pending = true;
                }
            }
        }
    }

    /// Begins the shutdown: the next polls stop everything in reverse order.
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// Whether shutdown began and no process is left.
    pub fn finished(&self) -> bool {
        self.shutting_down && self.units.iter().all(|u| !Self::active(&u.state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Component::*;

    const B: Backoff = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(30),
        reset_after: Duration::from_secs(60),
    };

    fn all_present() -> Supervisor {
        Supervisor::new(Component::ALL.iter().map(|c| (*c, Ok(()))).collect(), B)
    }

    /// Starts everything the way the driver would, answering every probe with success.
    fn bring_up(s: &mut Supervisor, now: Instant) -> Vec<Vec<Component>> {
        let mut waves = Vec::new();
        loop {
            let started: Vec<Component> = s
                .poll(now)
                .into_iter()
                .map(|a| match a {
                    Action::Start(c) => c,
                    Action::Stop(c) => panic!("unexpected stop of {c}"),
                })
                .collect();
            if started.is_empty() {
                return waves;
            }
            for c in &started {
                s.started(*c, now);
                s.probed(*c, true);
            }
            waves.push(started);
        }
    }

    #[test]
    fn starts_in_dependency_order() {
        let mut s = all_present();
        let t = Instant::now();
        // etcd alone first; the apiserver waits until etcd is healthy, not merely started.
        assert_eq!(s.poll(t), vec![Action::Start(Etcd)]);
        s.started(Etcd, t);
        assert_eq!(s.poll(t), vec![]);
        assert_eq!(s.waiting_for(KubeApiserver), vec![Etcd]);
        s.probed(Etcd, true);
        assert_eq!(s.poll(t), vec![Action::Start(KubeApiserver)]);
        s.started(KubeApiserver, t);
        s.probed(KubeApiserver, true);
        assert_eq!(
            s.poll(t),
            vec![
                Action::Start(KubeControllerManager),
                Action::Start(KubeScheduler),
                Action::Start(Kubelet),
                Action::Start(KubeProxy)
            ]
        );
    }

    #[test]
    fn a_node_without_control_plane_starts_kubelet_and_proxy_at_once() {
        let mut s = Supervisor::new(vec![(KubeProxy, Ok(())), (Kubelet, Ok(()))], B);
        assert_eq!(
            bring_up(&mut s, Instant::now()),
            vec![vec![Kubelet, KubeProxy]]
        );
    }

    #[test]
    fn restarts_with_exponential_backoff_up_to_the_cap() {
        let mut s = Supervisor::new(vec![(Etcd, Ok(()))], B);
        let mut t = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..8 {
            assert_eq!(s.poll(t), vec![Action::Start(Etcd)]);
            s.started(Etcd, t);
            t += Duration::from_millis(10);
            s.exited(Etcd, t, "exit status 1".into());
            let until = s.next_deadline().expect("a restart is scheduled");
            delays.push(until - t);
            // Nothing happens before the delay is over.
            assert_eq!(s.poll(until - Duration::from_millis(1)), vec![]);
            t = until;
        }
        let secs: Vec<u64> = delays.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(s.unit(Etcd).unwrap().restarts, 8);
        assert_eq!(
            s.unit(Etcd).unwrap().last_exit.as_deref(),
            Some("exit status 1")
        );
    }

    #[test]
    fn a_stable_run_resets_the_backoff() {
        let mut s = Supervisor::new(vec![(Etcd, Ok(()))], B);
        let mut t = Instant::now();
        for _ in 0..4 {
            s.poll(t);
            s.started(Etcd, t);
            s.exited(Etcd, t, "killed".into());
            t = s.next_deadline().unwrap();
        }
        assert_eq!(s.unit(Etcd).unwrap().failures, 4);
        s.poll(t);
        s.started(Etcd, t);
        t += B.reset_after;
        s.exited(Etcd, t, "killed".into());
        assert_eq!(s.next_deadline().unwrap() - t, B.initial);
    }

    #[test]
    fn a_failed_spawn_backs_off_like_an_exit() {
        let mut s = Supervisor::new(vec![(Etcd, Ok(()))], B);
        let t = Instant::now();
        s.poll(t);
        s.start_failed(Etcd, t, "permission denied".into());
        assert_eq!(s.next_deadline(), Some(t + B.initial));
        assert_eq!(s.poll(t), vec![]);
    }

    #[test]
    fn stops_in_reverse_order() {
        let mut s = all_present();
        let t = Instant::now();
        bring_up(&mut s, t);
        s.shutdown();
        // The four leaves first; the apiserver waits for them, etcd for the apiserver.
        let first = s.poll(t);
        assert_eq!(
            first,
            vec![
                Action::Stop(KubeProxy),
                Action::Stop(Kubelet),
                Action::Stop(KubeScheduler),
                Action::Stop(KubeControllerManager)
            ]
        );
        assert_eq!(s.poll(t), vec![]);
        for c in [KubeProxy, Kubelet, KubeScheduler] {
            s.exited(c, t, "signal: 15".into());
        }
        assert_eq!(s.poll(t), vec![], "one dependent still runs");
        s.exited(KubeControllerManager, t, "signal: 15".into());
        assert_eq!(s.poll(t), vec![Action::Stop(KubeApiserver)]);
        s.exited(KubeApiserver, t, "signal: 15".into());
        assert_eq!(s.poll(t), vec![Action::Stop(Etcd)]);
        assert!(!s.finished());
        s.exited(Etcd, t, "signal: 15".into());
        assert!(s.finished());
        // Exits during shutdown are not restarted.
        assert_eq!(s.next_deadline(), None);
        assert!(s.units().iter().all(|u| u.state == State::Stopped));
    }

    #[test]
    fn a_missing_binary_is_reported_and_holds_its_dependents() {
        let mut comps: Vec<_> = Component::ALL.iter().map(|c| (*c, Ok(()))).collect();
        comps[1].1 = Err("kube-apiserver not found on PATH".into());
        let mut s = Supervisor::new(comps, B);
        let t = Instant::now();
        assert_eq!(bring_up(&mut s, t), vec![vec![Etcd]]);
        assert_eq!(
            s.unit(KubeApiserver).unwrap().state,
            State::Missing("kube-apiserver not found on PATH".into())
        );
        assert_eq!(s.unit(KubeScheduler).unwrap().state, State::Waiting);
        assert_eq!(s.waiting_for(KubeScheduler), vec![KubeApiserver]);
        // Shutdown still completes: only etcd ran.
        s.shutdown();
        assert_eq!(s.poll(t), vec![Action::Stop(Etcd)]);
        s.exited(Etcd, t, "signal: 15".into());
        assert!(s.finished());
    }

    #[test]
    fn rotation_restarts_at_once_without_backoff() {
        let mut s = all_present();
        let t = Instant::now();
        bring_up(&mut s, t);
        s.rotated(&[KubeApiserver, Kubelet]);
        assert_eq!(
            s.poll(t),
            vec![Action::Stop(KubeApiserver), Action::Stop(Kubelet)]
        );
        s.exited(KubeApiserver, t, "signal: 15".into());
        s.exited(Kubelet, t, "signal: 15".into());
        // The apiserver at once; kubelet once the apiserver answers again (dependency order holds
        // for restarts too).
        assert_eq!(s.poll(t), vec![Action::Start(KubeApiserver)]);
        s.started(KubeApiserver, t);
        s.probed(KubeApiserver, true);
        assert_eq!(s.poll(t), vec![Action::Start(Kubelet)]);
        let u = s.unit(KubeApiserver).unwrap();
        assert_eq!((u.restarts, u.failures), (0, 0));
        // A component that is not running is left alone: it starts with the new files anyway.
        let mut s = Supervisor::new(vec![(Etcd, Err("missing".into()))], B);
        s.rotated(&[Etcd]);
        assert_eq!(s.poll(t), vec![]);
    }

    #[test]
    fn a_dependency_that_turns_unhealthy_holds_later_starts_only() {
        let mut s = Supervisor::new(vec![(Etcd, Ok(())), (KubeApiserver, Ok(()))], B);
        let t = Instant::now();
        s.poll(t);
        s.started(Etcd, t);
        s.probed(Etcd, true);
        s.probed(Etcd, false);
        assert_eq!(s.poll(t), vec![]);
        s.probed(Etcd, true);
        assert_eq!(s.poll(t), vec![Action::Start(KubeApiserver)]);
    }
}
