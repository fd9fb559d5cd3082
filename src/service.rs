//! Telling the service manager the truth (sd_notify): READY=1 once the daemon serves,
//! WATCHDOG=1 only while every core thread makes progress, STOPPING=1 at a stop.
//!
//! Without systemd (no NOTIFY_SOCKET) every notification is a no-op, and without
//! WATCHDOG_USEC the main thread simply waits for a stop signal.

use std::time::Duration;

use engine::health::{CoreBeats, Liveness};
use engine::server::Server;
use sd_notify::NotifyState;

/// The shortest look interval that means anything: a core ticks every 250 ms, so a shorter
/// look would call a healthy idle core stalled.
const MIN_LOOK: Duration = Duration::from_millis(500);

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and so in every thread spawned later),
/// then returns the set, for `sigtimedwait` in the main thread: a clean stop, and a reload on
/// SIGHUP, without handlers (nothing runs in signal context).
pub fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data that sigemptyset initialises; the calls only touch
    // the set we own and this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Why a notification failed is worth a line in the log, never a stop: the daemon serves
/// initiators whether or not systemd hears it.
fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// READY=1: the iSCSI listeners are bound and the core threads, the replica link and the
/// failover driver (when configured) have started (`Server::start` returned).
pub fn ready(server: &Server) {
    let status = format!(
        "serving iSCSI on {} as {}",
        server.local_addr,
        match server.registry.role() {
            engine::config::Role::Primary => "primary",
            engine::config::Role::Secondary => "secondary",
        }
    );
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// RELOADING=1 (with the monotonic time systemd asks of it) around a SIGHUP reload, then
/// READY=1 again, so systemd shows "reloading" meanwhile. The reply is logged: an invalid
/// file changes nothing and says why.
pub fn reload(server: &Server) {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(e) => tracing::debug!(error = %e, "no monotonic time for RELOADING=1"),
    }
    let reply = engine::admin::reload_reply(&server.registry, false);
    tracing::info!(reply = reply.trim_end(), "SIGHUP: reload");
    notify(&[NotifyState::Ready]);
}

/// STOPPING=1: sent before the drain, so systemd shows "deactivating" while it runs.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// How often the watchdog looks at the cores: three looks per watchdog period, so one
/// slow look (a core in a long fdatasync) does not cost a restart, two in a row do.
fn look_interval(watchdog: Duration) -> Duration {
    (watchdog / 3).max(MIN_LOOK)
}

/// Waits for SIGINT or SIGTERM and returns it; runs `on_hup` for each SIGHUP (a reload).
/// Meanwhile, when systemd asked for a watchdog, pings it after each look that saw every
/// core thread tick.
pub fn wait_for_stop(set: &libc::sigset_t, beats: &CoreBeats, on_hup: &dyn Fn()) -> i32 {
    let Some(period) = sd_notify::watchdog_enabled() else {
        loop {
            match wait_forever(set) {
                libc::SIGHUP => on_hup(),
                sig => return sig,
            }
        }
    };
    let every = look_interval(period);
    if every * 2 > period {
        tracing::warn!(
            watchdog_ms = period.as_millis() as u64,
            "WatchdogSec is too short to judge the core threads (they tick every 250 ms): \
             restarts may follow on a healthy daemon; use a few seconds or more"
        );
    }
    tracing::info!(
        watchdog_ms = period.as_millis() as u64,
        look_ms = every.as_millis() as u64,
        "systemd watchdog kept by the core threads' progress"
    );
    let mut live = Liveness::new(beats);
    let mut was_stalled: Vec<usize> = Vec::new();
    loop {
        match timed_wait(set, every) {
            Some(libc::SIGHUP) => on_hup(),
            Some(sig) => return sig,
            None => {}
        }
        let stalled = live.stalled(beats);
        if stalled.is_empty() {
            notify(&[NotifyState::Watchdog]);
            if !was_stalled.is_empty() {
                tracing::info!("every core thread runs again: watchdog pings resume");
            }
        } else if stalled != was_stalled {
            // Said once per change: a wedged core would otherwise log every look.
            tracing::warn!(cores = ?stalled, "core threads made no progress: watchdog not pinged");
        }
        was_stalled = stalled;
    }
}

fn wait_forever(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: set is initialised and the signals in it are blocked in this thread.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// One of the signals in `set` if it arrived within `d`, else None.
fn timed_wait(set: &libc::sigset_t, d: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    };
    // SAFETY: set is initialised and its signals are blocked in this thread; a null
    // siginfo pointer is allowed; ts lives across the call.
    let r = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    // -1: EAGAIN (the time passed) or EINTR (another signal): either way, look again.
    (r > 0).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_are_a_third_of_the_period_and_never_shorter_than_two_ticks() {
        assert_eq!(
            look_interval(Duration::from_secs(30)),
            Duration::from_secs(10)
        );
        assert_eq!(look_interval(Duration::from_secs(1)), MIN_LOOK);
    }
}
