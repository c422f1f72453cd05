use super::accepted as accepted_job;
use super::*;

const T: Timing = Timing { health_timeout_secs: 60, boot_when_inhibited: false };
const NEW: &str = "/nix/store/00000000000000000000000000000000-nixos-system-new";
const OLD: &str = "/nix/store/11111111111111111111111111111111-nixos-system-old";

fn accepted(seq: u64, action: Action) -> Event {
    Event::Accepted {
        seq,
        action,
        system: NEW.into(),
        previous: Some(OLD.into()),
        boot_id: Some("boot-1".into()),
        origin: Origin::Deploy,
    }
}

fn run(events: Vec<Event>) -> (State, Vec<Vec<Effect>>) {
    let mut s = State::default();
    let mut all = Vec::new();
    for (i, ev) in events.into_iter().enumerate() {
        let (n, e) = step(&s, ev, 1000 + i as u64, T);
        s = n;
        all.push(e);
    }
    (s, all)
}

fn result(id: u64, code: i32) -> Event {
    Event::SwitchResult { id, code: Some(code), tail: String::new() }
}

fn happy_switch() -> Vec<Event> {
    vec![accepted(5, Action::Switch), Event::FetchOk, result(1, 0), Event::Healthy, Event::CommitOk, result(2, 0)]
}

#[test]
fn happy_switch_commits() {
    let (s, effects) = run(happy_switch());
    assert_eq!(
        effects,
        vec![
            vec![Effect::Fetch],
            vec![Effect::RequestSwitch { id: 1, step: Step::Test, system: NEW.into() }],
            vec![Effect::CheckHealth],
            vec![Effect::Commit],
            vec![Effect::RequestSwitch { id: 2, step: Step::Boot, system: NEW.into() }],
            vec![],
        ]
    );
    assert_eq!(s.phase, Phase::Idle);
    assert_eq!(s.highest_seq, 5);
    let last = s.last.unwrap();
    assert_eq!((last.outcome, last.seq, last.system.as_str()), (Outcome::Committed, 5, NEW));
    assert_eq!(s.outcomes[0], 1);
    assert!(s.job.is_none());
}

#[test]
fn boot_deploy_without_one_time_entries_commits_at_once() {
    let (s, effects) = run(vec![accepted(1, Action::Boot), Event::FetchOk, Event::CommitOk, result(1, NO_ONE_SHOT)]);
    assert_eq!(effects[1], vec![Effect::Commit]);
    assert_eq!(effects[2], vec![Effect::RequestSwitch { id: 1, step: Step::BootOnce, system: NEW.into() }]);
    let last = s.last.unwrap();
    assert_eq!(last.outcome, Outcome::Committed);
    assert!(last.reason.unwrap().contains("not systemd-boot"));
}

fn resumed(boot: &str, booted: &str) -> Event {
    Event::Resumed { boot_id: Some(boot.into()), booted: Some(booted.into()) }
}

#[test]
fn one_time_boot_that_comes_up_healthy_commits() {
    let (s, _) = run(vec![accepted(1, Action::Boot), Event::FetchOk, Event::CommitOk, result(1, 0)]);
    assert_eq!(s.phase, Phase::AwaitingReboot);
    // A restart without a reboot changes nothing.
    let (s, e) = step(&s, resumed("boot-1", OLD), 1, T);
    assert!(e.is_empty());
    assert_eq!(s.phase, Phase::AwaitingReboot);
    let (s, e) = step(&s, resumed("boot-2", NEW), 2, T);
    assert_eq!(e, vec![Effect::CheckHealth]);
    let (s, e) = step(&s, Event::Healthy, 3, T);
    assert_eq!(e, vec![Effect::RequestSwitch { id: 2, step: Step::BootConfirm, system: NEW.into() }]);
    let (s, _) = step(&s, result(2, 0), 4, T);
    assert_eq!(s.last.unwrap().outcome, Outcome::Committed);
}

#[test]
fn one_time_boot_that_fails_goes_back() {
    let base = run(vec![accepted(1, Action::Boot), Event::FetchOk, Event::CommitOk, result(1, 0)]).0;
    // The old default came up (the new one hung and the watchdog reset it).
    let (s, e) = step(&base, resumed("boot-2", OLD), 1, T);
    assert_eq!(
        e,
        vec![Effect::RestoreProfile, Effect::RequestSwitch { id: 2, step: Step::BootRevert, system: OLD.into() }]
    );
    let (s, _) = step(&s, result(2, 0), 2, T);
    let last = s.last.unwrap();
    assert_eq!(last.outcome, Outcome::Failed);
    assert!(last.reason.unwrap().contains("did not come up"));
    // It came up but is unhealthy: rolled back.
    let (s, _) = step(&base, resumed("boot-2", NEW), 1, T);
    let (s, e) = step(&s, Event::Unhealthy("kiosk.service inactive".into()), 2, T);
    assert_eq!(e[0], Effect::RestoreProfile);
    let (s, _) = step(&s, result(2, 0), 3, T);
    assert_eq!(s.last.unwrap().outcome, Outcome::RolledBack);
}

#[test]
fn failed_one_time_boot_goes_back_to_the_previous_default() {
    // switch-to-configuration boot (or bootctl set-oneshot after it) failed:
    // loader.conf may name the new generation already, with the running one
    // pinned over it; `switch` of the previous system undoes both.
    let base = run(vec![accepted(1, Action::Boot), Event::FetchOk, Event::CommitOk]).0;
    let (s, e) = step(&base, result(1, 1), 1, T);
    assert_eq!(
        e,
        vec![Effect::RestoreProfile, Effect::RequestSwitch { id: 2, step: Step::BootRevert, system: OLD.into() }]
    );
    let (s, e) = step(&s, result(2, 0), 2, T);
    assert!(e.is_empty());
    let last = s.last.unwrap();
    assert_eq!(last.outcome, Outcome::Failed, "the new generation never ran");
    assert!(last.reason.unwrap().contains("switch-to-configuration boot: exit"), "the first failure is the reason");
    assert_eq!(s.phase, Phase::Idle);
}

#[test]
fn failed_switch_rolls_back_with_the_reason() {
    for (code, needle) in [
        (Some(2), "activation failed"),
        (Some(4), "units failed"),
        (Some(100), "reboot"),
        (Some(crate::switch::protocol::REFUSED), "helper refused"),
        (None, "no result"),
    ] {
        let (s, effects) = run(vec![
            accepted(1, Action::Switch),
            Event::FetchOk,
            Event::SwitchResult { id: 1, code, tail: "line one\nthe last line\n".into() },
            result(2, 0),
        ]);
        assert_eq!(effects[2], vec![Effect::RequestSwitch { id: 2, step: Step::RollbackTest, system: OLD.into() }]);
        let last = s.last.unwrap();
        assert_eq!(last.outcome, Outcome::RolledBack, "{code:?}");
        let reason = last.reason.unwrap();
        assert!(reason.contains(needle) && reason.contains("the last line"), "{reason}");
    }
}

#[test]
fn failed_rollback_is_reported_as_such() {
    let (s, _) = run(vec![accepted(1, Action::Switch), Event::FetchOk, result(1, 2), result(2, 2)]);
    let last = s.last.unwrap();
    assert_eq!(last.outcome, Outcome::RollbackFailed);
    assert!(last.reason.unwrap().contains("rollback failed"));
}

#[test]
fn no_previous_system_means_rollback_failed() {
    let ev = Event::Accepted {
        seq: 1,
        action: Action::Switch,
        system: NEW.into(),
        previous: None,
        boot_id: None,
        origin: Origin::Deploy,
    };
    let (s, _) = run(vec![ev, Event::FetchOk, result(1, 2)]);
    assert_eq!(s.last.unwrap().outcome, Outcome::RollbackFailed);
}

#[test]
fn unhealthy_rolls_back_and_fetch_failure_fails() {
    let (s, effects) = run(vec![
        accepted(1, Action::Switch),
        Event::FetchOk,
        result(1, 0),
        Event::Unhealthy("cache unreachable".into()),
        result(2, 0),
    ]);
    assert_eq!(effects[3], vec![Effect::RequestSwitch { id: 2, step: Step::RollbackTest, system: OLD.into() }]);
    let last = s.last.unwrap();
    assert_eq!(last.outcome, Outcome::RolledBack);
    assert!(last.reason.unwrap().contains("cache unreachable"));

    let (s, _) = run(vec![accepted(1, Action::Switch), Event::FetchFailed("404".into())]);
    assert_eq!(s.last.as_ref().unwrap().outcome, Outcome::Failed);
    assert_eq!(s.highest_seq, 1, "a failed sequence is still used up");
}

#[test]
fn stale_results_and_foreign_events_change_nothing() {
    let (s, effects) =
        run(vec![accepted(1, Action::Switch), Event::FetchOk, result(7, 2), Event::Healthy, Event::CommitOk]);
    assert_eq!(s.phase, Phase::Switching { step: Step::Test, id: 1 });
    assert!(effects[2..].iter().all(Vec::is_empty));
}

#[test]
fn rollback_and_gc_actions() {
    let ev = Event::Accepted {
        seq: 9,
        action: Action::Rollback,
        system: OLD.into(),
        previous: Some(NEW.into()),
        boot_id: None,
        origin: Origin::Deploy,
    };
    let (s, effects) = run(vec![ev, result(1, 0), Event::Healthy, Event::CommitOk, result(2, 0)]);
    assert_eq!(effects[0], vec![Effect::RequestSwitch { id: 1, step: Step::Test, system: OLD.into() }]);
    assert_eq!(s.last.unwrap().outcome, Outcome::Committed);
    let (s, effects) = run(vec![accepted(3, Action::Gc), Event::GcDone(Ok("freed 3 paths".into()))]);
    assert_eq!(effects[0], vec![Effect::CollectGarbage]);
    assert_eq!(s.last.unwrap().outcome, Outcome::Collected);
}

#[test]
fn reboot_before_commit_fails_the_update_for_good() {
    for events in [
        vec![accepted(1, Action::Switch), Event::FetchOk],
        vec![accepted(1, Action::Switch), Event::FetchOk, result(1, 0)],
    ] {
        let (s, _) = run(events);
        let (s, effects) = step(&s, Event::Resumed { boot_id: Some("boot-2".into()), booted: None }, 5000, T);
        assert!(effects.is_empty());
        let last = s.last.unwrap();
        assert_eq!(last.outcome, Outcome::Failed);
        assert!(last.reason.unwrap().contains("rebooted"));
        assert_eq!(s.phase, Phase::Idle);
    }
}

/// Kill -9 after every transition (the state was persisted, its effects
/// maybe not performed): a restart (`Resumed`) re-issues exactly what is
/// still needed, with the same switch ids, and the deploy still commits.
#[test]
fn every_crash_point_resumes_to_the_same_end() {
    let events = happy_switch();
    for crash_after in 0..=events.len() {
        let mut s = State::default();
        let mut issued: Vec<(u64, Step, String)> = Vec::new();
        let record = |effects: &[Effect], issued: &mut Vec<(u64, Step, String)>| {
            for e in effects {
                if let Effect::RequestSwitch { id, step, system } = e {
                    let same = issued.iter().find(|(i, _, _)| i == id);
                    match same {
                        Some(prev) => {
                            assert_eq!(prev, &(*id, *step, system.clone()), "id {id} reused for another switch")
                        }
                        None => issued.push((*id, *step, system.clone())),
                    }
                }
            }
        };
        for (i, ev) in events.iter().enumerate() {
            if i == crash_after {
                let (n, effects) = step(&s, Event::Resumed { boot_id: Some("boot-1".into()), booted: None }, 2000, T);
                record(&effects, &mut issued);
                s = n;
            }
            let (n, effects) = step(&s, ev.clone(), 3000, T);
            record(&effects, &mut issued);
            s = n;
        }
        assert_eq!(s.last.as_ref().unwrap().outcome, Outcome::Committed, "crash after {crash_after}");
        assert_eq!(issued.len(), 2, "one test switch and one boot switch, whatever the crash point");
    }
}

#[test]
fn restart_loops_are_bounded() {
    let (mut s, _) = run(vec![accepted(1, Action::Switch)]);
    for _ in 0..=MAX_TRANSITIONS {
        s = step(&s, Event::Resumed { boot_id: Some("boot-1".into()), booted: None }, 1, T).0;
    }
    let last = s.last.clone().unwrap();
    assert_eq!(last.outcome, Outcome::Failed);
    assert!(last.reason.unwrap().contains("transitions"));
    assert_eq!(s.phase, Phase::Idle);
}

#[test]
fn a_second_accepted_while_a_job_runs_changes_nothing() {
    let t = Timing { health_timeout_secs: 30, boot_when_inhibited: false };
    let (first, effects) = step(&State::default(), accepted(5, Action::Switch), 10, t);
    assert!(accepted_job(&State::default(), &first));
    assert_eq!(effects, vec![Effect::Fetch]);
    for action in [Action::Switch, Action::Boot, Action::Rollback, Action::Gc] {
        let (second, effects) = step(&first, accepted(6, action), 11, t);
        assert_eq!(second, first, "{action:?}: the running job, its seq and its counts stay");
        assert!(effects.is_empty());
        assert!(!accepted_job(&first, &second));
    }
}

fn inhibited_result(id: u64) -> Event {
    // As the helper reports switch-to-configuration's refusal.
    let tail =
        "Checking switch inhibitors...\nPre-switch checks failed\nswitch inhibitors changed: systemd : 256 -> 257";
    Event::SwitchResult { id, code: Some(INHIBITED), tail: tail.into() }
}

#[test]
fn test_refused_by_switch_inhibitors_fails_with_the_advice_and_no_rollback() {
    let (s, effects) = run(vec![accepted(1, Action::Switch), Event::FetchOk, inhibited_result(1)]);
    // Nothing was switched: no rollback `test` of the running system.
    assert_eq!(effects[2], vec![]);
    assert_eq!(s.phase, Phase::Idle);
    let last = s.last.unwrap();
    assert_eq!(last.outcome, Outcome::Failed);
    let reason = last.reason.unwrap();
    assert!(reason.contains("needs a reboot: deploy with action boot"), "{reason}");
    assert!(reason.contains("systemd : 256 -> 257"), "{reason}");
    // A signed rollback refused the same way fails the same way, even when
    // inhibited switches are to become boot deploys (only `switch` does).
    let ev = Event::Accepted {
        seq: 2,
        action: Action::Rollback,
        system: OLD.into(),
        previous: None,
        boot_id: None,
        origin: Origin::Deploy,
    };
    let t = Timing { boot_when_inhibited: true, ..T };
    let (s, _) = step(&State::default(), ev, 1, t);
    let (s, effects) = step(&s, inhibited_result(1), 2, t);
    assert!(effects.is_empty());
    assert_eq!(s.last.unwrap().outcome, Outcome::Failed);
}

#[test]
fn inhibited_switch_becomes_a_boot_deploy_when_configured() {
    let t = Timing { boot_when_inhibited: true, ..T };
    let mut s = State::default();
    let mut effects = Vec::new();
    for ev in [accepted(1, Action::Switch), Event::FetchOk, inhibited_result(1), Event::CommitOk, result(2, 0)] {
        let (n, e) = step(&s, ev, 1, t);
        s = n;
        effects.push(e);
    }
    assert_eq!(effects[2], vec![Effect::Commit], "committed as a boot deploy, no rollback");
    assert_eq!(effects[3], vec![Effect::RequestSwitch { id: 2, step: Step::BootOnce, system: NEW.into() }]);
    assert_eq!(s.phase, Phase::AwaitingReboot);
    assert_eq!(s.job.as_ref().unwrap().action, Action::Boot);
    // The next boot, into the new system, healthy: committed.
    let (s, _) = step(&s, resumed("boot-2", NEW), 2, t);
    let (s, _) = step(&s, Event::Healthy, 3, t);
    let (s, _) = step(&s, result(3, 0), 4, t);
    let last = s.last.unwrap();
    assert_eq!((last.outcome, last.action), (Outcome::Committed, Action::Boot));
}

#[test]
fn going_back_refused_by_switch_inhibitors_says_to_reboot() {
    let base = run(vec![accepted(1, Action::Boot), Event::FetchOk, Event::CommitOk, result(1, 0)]).0;
    let (s, _) = step(&base, resumed("boot-2", NEW), 1, T);
    let (s, e) = step(&s, Event::Unhealthy("kiosk.service inactive".into()), 2, T);
    assert_eq!(e[1], Effect::RequestSwitch { id: 2, step: Step::BootRevert, system: OLD.into() });
    // The helper could only make the previous system the boot default.
    let (s, _) = step(&s, inhibited_result(2), 3, T);
    let last = s.last.unwrap();
    assert_eq!(last.outcome, Outcome::RollbackFailed, "the new system still runs");
    let reason = last.reason.unwrap();
    assert!(reason.contains("kiosk.service inactive") && reason.contains("reboot to run it"), "{reason}");
    assert!(!reason.contains("deploy with action boot"), "that advice is for the way in: {reason}");
}

fn from_channel(seq: u64, action: Action) -> Event {
    match accepted(seq, action) {
        Event::Accepted { seq, action, system, previous, boot_id, .. } => {
            Event::Accepted { seq, action, system, previous, boot_id, origin: Origin::Channel }
        }
        _ => unreachable!(),
    }
}

/// A channel job lives in the channel's sequence space: it never raises
/// the deploy documents' highest_seq (a channel at seq 900 would otherwise
/// lock out per-device deploys below 900), and its last result says where
/// it came from.
#[test]
fn a_channel_job_does_not_raise_highest_seq() {
    let (s, _) = run(vec![accepted(5, Action::Switch), Event::FetchFailed("x".into())]);
    assert_eq!((s.highest_seq, s.last.as_ref().unwrap().origin), (5, Origin::Deploy));
    let (s2, _) = step(&s, from_channel(900, Action::Switch), 2000, T);
    assert_eq!(s2.highest_seq, 5);
    assert_eq!(s2.job.as_ref().map(|j| (j.seq, j.origin)), Some((900, Origin::Channel)));
}

/// A channel job that does not commit marks its system failed in the same
/// step (so the device never retries it); one that commits clears it; a
/// deploy document's failure leaves the channel record alone.
#[test]
fn a_failed_channel_job_is_recorded_in_the_channel_record() {
    for (events, failed) in [
        (vec![from_channel(3, Action::Switch), Event::FetchFailed("gone".into())], Some(NEW)),
        (
            vec![
                from_channel(3, Action::Switch),
                Event::FetchOk,
                result(1, 0),
                Event::Unhealthy("x".into()),
                result(2, 0),
            ],
            Some(NEW),
        ),
        (vec![from_channel(3, Action::Switch), Event::Refused("disk".into())], Some(NEW)),
        (vec![accepted(3, Action::Switch), Event::FetchFailed("gone".into())], None),
    ] {
        let (s, _) = run(events.clone());
        assert_eq!(s.channel.failed.as_deref(), failed, "{events:?}");
        assert!(s.phase == Phase::Idle, "{events:?}");
    }
    let mut s = State::default();
    s.channel.failed = Some(OLD.into());
    let (s, _) = step(&s, from_channel(4, Action::Switch), 1, T);
    let (s, _) = step(&s, Event::FetchOk, 2, T);
    let (s, _) = step(&s, result(1, 0), 3, T);
    let (s, _) = step(&s, Event::Healthy, 4, T);
    let (s, _) = step(&s, Event::CommitOk, 5, T);
    let (s, _) = step(&s, result(2, 0), 6, T);
    assert_eq!((s.last.as_ref().unwrap().outcome, s.channel.failed.clone()), (Outcome::Committed, None));
}
