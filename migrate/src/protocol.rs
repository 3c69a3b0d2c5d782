//! The migration of one port, as the controller coordinates it: a sans-IO
//! state machine. Inputs are what the hosts and the VMM report; outputs are
//! what the controller must tell them to do.
//!
//! ```text
//!  VMM / admin     controller (this)            source host        destination host
//!  begin ───────► Preparing ── PrepareDestination ─────────────────► install the port
//!                                                                     from its profile,
//!                 ◄──────────────────────────── Prepared ──────────── standby (policy in
//!                 Syncing ─── StartSync ──────► full snapshot,         place, not forwarding)
//!                                                then deltas ───────► merged
//!                                               (the VM heard there:  forward from
//!  resumed / ───► Switching ◄─────── Resumed, DestinationStarted ───── the pre-copy, at once)
//!  first frame    ─ DeactivateSource ► stop forwarding,
//!                                      last delta
//!                 ◄──────── SourceDeactivated ─┘
//!                 Activating ─ ActivateDestination ─────────────────► merge it (or start
//!                 ◄──────────────────────────── Activated ───────────┘ from it) and forward
//!                 Done ─ MoveMac (every host), Announce (GARP/RARP, when the
//!                        VM has not spoken yet)
//!  abort ───────► Aborted ─ CleanDestination, KeepSource / ReactivateSource
//! ```
//!
//! Safety: the destination forwards only a port it installed with its
//! policy (Prepared), and only once the VM runs there — it heard the VM
//! itself (`DestinationStarted`: the VM's own first frame, or its VMM
//! reading the NIC; it runs from the pre-copy and merges the source's last
//! delta when it comes) or the source said it stopped. The port may so be
//! active on both hosts only while switching after the VM was heard at the
//! destination: the source then serves a VM that no longer runs there
//! (and sends copies of its frames to the destination). A source that is
//! lost after the destination started does not abort the migration: the
//! destination keeps the pre-copy's state. An abort before `Done` leaves
//! the source active and the destination clean — after the destination
//! dropped the port, when it may have forwarded. Inputs that do not fit the
//! phase are refused with the phase named, and change nothing.

use dvs_proto::api;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Preparing,
    Syncing,
    Switching,
    Activating,
    Done,
    Aborted,
}

impl Phase {
    /// Its name in views and logs (`dvs_proto::api::MigrationPhase::name`).
    pub fn as_str(self) -> &'static str {
        api::MigrationPhase::from(self).name()
    }
}

impl From<Phase> for api::MigrationPhase {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Preparing => api::MigrationPhase::Preparing,
            Phase::Syncing => api::MigrationPhase::Syncing,
            Phase::Switching => api::MigrationPhase::Switching,
            Phase::Activating => api::MigrationPhase::Activating,
            Phase::Done => api::MigrationPhase::Done,
            Phase::Aborted => api::MigrationPhase::Aborted,
        }
    }
}

impl From<Trigger> for api::SwitchoverTrigger {
    fn from(t: Trigger) -> Self {
        match t {
            Trigger::VmmResumed => api::SwitchoverTrigger::VmmResumed,
            Trigger::FirstFrame => api::SwitchoverTrigger::FirstFrame,
            Trigger::NicRead => api::SwitchoverTrigger::NicRead,
        }
    }
}

/// What made the switchover start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The VMM said the VM resumed on the destination.
    VmmResumed,
    /// The destination saw the VM's first frame (QEMU's RARP, say).
    FirstFrame,
    /// The destination saw the VMM read the port's interface (a quiet VM
    /// runs there).
    NicRead,
}

/// What hosts and the VMM report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The destination installed the port from its profile, in standby.
    Prepared,
    /// The source sent snapshot `seq` (0: the full one).
    Synced { seq: u32 },
    /// The VM runs on the destination.
    Resumed(Trigger),
    /// The destination heard the VM and forwards from the pre-copy, without
    /// waiting for the source's last delta.
    DestinationStarted,
    /// The source's agent is gone (the reason) before it said it stopped.
    SourceLost(String),
    /// The source stopped forwarding; its last delta is `last_seq`; its
    /// last frames from and to the VM passed at `last_frame`.
    SourceDeactivated { last_seq: u32, last_frame: Frames },
    /// The destination applied everything through the last delta and
    /// forwards; its first frame from the VM at `first_frame`.
    Activated { first_frame: Option<Duration> },
    /// The destination forwarded its first frames from or to the VM
    /// (reported after activation, as each happens).
    FirstFrameForwarded { at: Frames },
    /// Every host has the VM's new location.
    MacMoved,
    /// Stop: the VMM's migration failed, an admin said so, or a party is
    /// gone.
    Abort(String),
}

/// When frames passed a port, each way (the wall clock; `None`: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frames {
    /// A frame from the VM (what its peers receive).
    pub from_vm: Option<Duration>,
    /// A frame to the VM.
    pub to_vm: Option<Duration>,
    /// A unicast frame from the VM — to one peer, not an announcement (a
    /// peer hears from the VM again then).
    #[serde(default)]
    pub to_peer: Option<Duration>,
}

/// What the controller must have done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    PrepareDestination,
    StartSync,
    DeactivateSource,
    /// Apply everything through the source's last delta, then forward
    /// (`handover`: the source's last state is kept; without it, what the
    /// pre-copy had).
    ActivateDestination {
        through_seq: u32,
        handover: bool,
    },
    MoveMac,
    /// Announce the VM (GARP/RARP) from the destination: it has not spoken.
    Announce,
    CleanDestination,
    /// The source never stopped: nothing to do there.
    KeepSource,
    /// The source stopped: it forwards again — once the destination
    /// dropped the port, when it may have forwarded (`after_clean`).
    ReactivateSource {
        after_clean: bool,
    },
}

/// The moments of a migration, on the controller's clock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    pub begin: Duration,
    /// The destination's port had its policy.
    pub policy_ready: Option<Duration>,
    /// The switchover started (resume or first frame).
    pub switchover: Option<Duration>,
    pub trigger: Option<Trigger>,
    /// The last frame the source forwarded from the VM.
    pub last_frame_at_source: Option<Duration>,
    /// The first frame the destination forwarded from the VM.
    pub first_frame_at_destination: Option<Duration>,
    /// The last frame the source sent to the VM.
    #[serde(default)]
    pub last_to_vm_at_source: Option<Duration>,
    /// The first frame the destination sent to the VM.
    #[serde(default)]
    pub first_to_vm_at_destination: Option<Duration>,
    /// The first frame from the VM to one peer at the destination
    /// (unicast: not an announcement).
    #[serde(default)]
    pub first_to_peer_at_destination: Option<Duration>,
    pub done: Option<Duration>,
    pub aborted: Option<(Duration, String)>,
}

impl Timeline {
    /// The blackout each way — from the source's last frame to the
    /// destination's first — as (from the VM, to the VM). Frames "to the
    /// VM" at the source include those written into a paused VM's NIC,
    /// which it never reads.
    pub fn blackouts(&self) -> (Option<Duration>, Option<Duration>) {
        let gap =
            |last: Option<Duration>, first: Option<Duration>| Some(first?.saturating_sub(last?));
        (
            gap(self.last_frame_at_source, self.first_frame_at_destination),
            gap(self.last_to_vm_at_source, self.first_to_vm_at_destination),
        )
    }

    /// What the VM's peers live through: from the VM's last frame at the
    /// source (it paused there) to its first frame to a peer at the
    /// destination (unicast: QEMU's RARP and the guest's gratuitous ARP
    /// announce the VM, they answer no one). A VM that sends no unicast
    /// there yet: until its first frame. Without frames from the VM at the
    /// source, the longer of the two ways.
    pub fn blackout(&self) -> Option<Duration> {
        let first = self
            .first_to_peer_at_destination
            .or(self.first_frame_at_destination);
        match (self.last_frame_at_source, first) {
            (Some(last), Some(first)) => Some(first.saturating_sub(last)),
            _ => {
                let (from, to) = self.blackouts();
                from.max(to)
            }
        }
    }
}

/// An input that does not fit where the migration is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("migration {id}: {input} does not apply while {phase:?}{hint}")]
pub struct ProtocolError {
    pub id: u64,
    pub phase: Phase,
    pub input: String,
    pub hint: &'static str,
}

/// One port's migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    pub id: u64,
    phase: Phase,
    /// Highest snapshot the source sent.
    synced: Option<u32>,
    /// The VM resumed before the destination was ready.
    early_resume: Option<Trigger>,
    /// The destination forwards from the pre-copy (it heard the VM).
    #[serde(default)]
    destination_started: bool,
    timeline: Timeline,
}

impl Migration {
    /// Begin migration `id` at `now`; the first output prepares the
    /// destination.
    pub fn begin(id: u64, now: Duration) -> (Self, Vec<Output>) {
        (
            Migration {
                id,
                phase: Phase::Preparing,
                synced: None,
                early_resume: None,
                destination_started: false,
                timeline: Timeline {
                    begin: now,
                    ..Timeline::default()
                },
            },
            vec![Output::PrepareDestination],
        )
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// Is the port forwarding at the source (in the controller's view)?
    pub fn source_active(&self) -> bool {
        // Asked to stop (Switching), the source forwards until it says
        // it stopped.
        matches!(
            self.phase,
            Phase::Preparing | Phase::Syncing | Phase::Switching | Phase::Aborted
        )
    }

    /// Is the port forwarding at the destination?
    pub fn destination_active(&self) -> bool {
        // Told to forward (activating), or forwarding since it heard the VM.
        matches!(self.phase, Phase::Activating | Phase::Done)
            || self.destination_started && self.phase == Phase::Switching
    }

    /// Did the destination start the port on its own (from the pre-copy)?
    pub fn destination_started(&self) -> bool {
        self.destination_started
    }

    fn refuse(&self, input: &Input, hint: &'static str) -> ProtocolError {
        let name = match input {
            Input::Prepared => "Prepared".to_string(),
            Input::Synced { seq } => format!("Synced({seq})"),
            Input::Resumed(t) => format!("Resumed({t:?})"),
            Input::DestinationStarted => "DestinationStarted".into(),
            Input::SourceLost(r) => format!("SourceLost({r})"),
            Input::SourceDeactivated { .. } => "SourceDeactivated".into(),
            Input::Activated { .. } => "Activated".into(),
            Input::FirstFrameForwarded { .. } => "FirstFrameForwarded".into(),
            Input::MacMoved => "MacMoved".into(),
            Input::Abort(r) => format!("Abort({r})"),
        };
        ProtocolError {
            id: self.id,
            phase: self.phase,
            input: name,
            hint,
        }
    }

    /// Take `input` at `now`; returns what must be done.
    ///
    /// # Errors
    /// [`ProtocolError`] when the input does not fit the phase; nothing
    /// changes then.
    pub fn handle(&mut self, now: Duration, input: Input) -> Result<Vec<Output>, ProtocolError> {
        use Phase::*;
        let out = match (self.phase, &input) {
            (Preparing, Input::Prepared) => {
                self.timeline.policy_ready = Some(now);
                self.phase = Syncing;
                match self.early_resume.take() {
                    // The VM already runs there: switch over at once.
                    Some(t) => {
                        self.switchover(now, t);
                        vec![Output::StartSync, Output::DeactivateSource]
                    }
                    None => vec![Output::StartSync],
                }
            }
            (Preparing, Input::Resumed(t)) => {
                // The destination holds the VM's frames until its port has
                // its policy.
                self.early_resume = Some(*t);
                Vec::new()
            }
            (Syncing | Switching, Input::Synced { seq }) => {
                self.synced = Some(self.synced.map_or(*seq, |s| s.max(*seq)));
                Vec::new()
            }
            (Syncing, Input::Resumed(t)) => {
                self.switchover(now, *t);
                vec![Output::DeactivateSource]
            }
            // A second trigger (the VMM after the first frame, or the
            // reverse) changes nothing.
            (Switching | Activating | Done, Input::Resumed(_)) => Vec::new(),
            (
                Switching,
                Input::SourceDeactivated {
                    last_seq,
                    last_frame,
                },
            ) => {
                self.timeline.last_frame_at_source = last_frame.from_vm;
                self.timeline.last_to_vm_at_source = last_frame.to_vm;
                self.synced = Some(*last_seq);
                self.phase = Activating;
                vec![Output::ActivateDestination {
                    through_seq: *last_seq,
                    handover: true,
                }]
            }
            (Switching | Activating, Input::DestinationStarted) => {
                self.destination_started = true;
                Vec::new()
            }
            // Told again (a destination's report after a reconnection).
            (Done, Input::DestinationStarted) => Vec::new(),
            (Preparing | Syncing, Input::DestinationStarted) => {
                return Err(self.refuse(&input, ": the switchover has not started"))
            }
            (Switching, Input::SourceLost(_)) if self.destination_started => {
                // The VM runs at the destination: it keeps what the
                // pre-copy had.
                self.phase = Activating;
                vec![Output::ActivateDestination {
                    through_seq: self.synced.unwrap_or(0),
                    handover: false,
                }]
            }
            (Preparing | Syncing | Switching, Input::SourceLost(r)) => {
                self.abort(now, r);
                vec![Output::CleanDestination, Output::KeepSource]
            }
            // It stopped already: not needed any more.
            (Activating | Done, Input::SourceLost(_)) => Vec::new(),
            (Activating, Input::Activated { first_frame }) => {
                if first_frame.is_some() {
                    self.timeline.first_frame_at_destination = *first_frame;
                }
                self.timeline.done = Some(now);
                self.phase = Done;
                let mut out = vec![Output::MoveMac];
                if self.timeline.trigger == Some(Trigger::VmmResumed) {
                    out.push(Output::Announce);
                }
                out
            }
            // A destination that started on its own forwards while switching.
            (Switching | Activating | Done, Input::FirstFrameForwarded { at }) => {
                let t = &mut self.timeline;
                t.first_frame_at_destination = t.first_frame_at_destination.or(at.from_vm);
                t.first_to_vm_at_destination = t.first_to_vm_at_destination.or(at.to_vm);
                t.first_to_peer_at_destination = t.first_to_peer_at_destination.or(at.to_peer);
                Vec::new()
            }
            (Done, Input::MacMoved) => Vec::new(),
            (Preparing | Syncing, Input::Abort(r)) => {
                self.abort(now, r);
                vec![Output::CleanDestination, Output::KeepSource]
            }
            (Switching | Activating, Input::Abort(r)) => {
                let after_clean = self.phase == Activating || self.destination_started;
                self.abort(now, r);
                vec![
                    Output::CleanDestination,
                    Output::ReactivateSource { after_clean },
                ]
            }
            (Done, Input::Abort(_)) => {
                return Err(self.refuse(
                    &input,
                    ": the VM runs at the destination; migrate it back instead",
                ))
            }
            (Aborted, _) => return Err(self.refuse(&input, ": the migration was aborted")),
            _ => return Err(self.refuse(&input, "")),
        };
        Ok(out)
    }

    fn switchover(&mut self, now: Duration, t: Trigger) {
        self.timeline.switchover = Some(now);
        self.timeline.trigger = Some(t);
        self.phase = Phase::Switching;
    }

    fn abort(&mut self, now: Duration, reason: &str) {
        self.timeline.aborted = Some((now, reason.to_string()));
        self.phase = Phase::Aborted;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_migration_runs_through_and_keeps_its_timeline() {
        let (mut m, out) = Migration::begin(7, Duration::ZERO);
        assert_eq!(out, vec![Output::PrepareDestination]);
        assert_eq!(
            m.handle(10 * MS, Input::Prepared).unwrap(),
            vec![Output::StartSync]
        );
        m.handle(20 * MS, Input::Synced { seq: 0 }).unwrap();
        m.handle(30 * MS, Input::Synced { seq: 1 }).unwrap();
        assert_eq!(
            m.handle(100 * MS, Input::Resumed(Trigger::FirstFrame))
                .unwrap(),
            vec![Output::DeactivateSource]
        );
        assert!(m.source_active() && !m.destination_active());
        assert_eq!(
            m.handle(
                105 * MS,
                Input::SourceDeactivated {
                    last_seq: 2,
                    last_frame: Frames {
                        from_vm: Some(99 * MS),
                        ..Frames::default()
                    }
                }
            )
            .unwrap(),
            vec![Output::ActivateDestination {
                through_seq: 2,
                handover: true
            }]
        );
        assert!(!m.source_active() && m.destination_active());
        // The VM spoke first (its RARP): no announcement needed.
        assert_eq!(
            m.handle(
                110 * MS,
                Input::Activated {
                    first_frame: Some(108 * MS)
                }
            )
            .unwrap(),
            vec![Output::MoveMac]
        );
        assert!(m.destination_active());
        let t = m.timeline();
        assert_eq!(t.policy_ready, Some(10 * MS));
        assert_eq!(t.switchover, Some(100 * MS));
        assert_eq!(t.blackout(), Some(9 * MS));
    }

    #[test]
    fn a_resume_before_the_policy_is_ready_waits_for_it() {
        let (mut m, _) = Migration::begin(1, Duration::ZERO);
        assert!(m
            .handle(MS, Input::Resumed(Trigger::VmmResumed))
            .unwrap()
            .is_empty());
        assert_eq!(
            m.handle(2 * MS, Input::Prepared).unwrap(),
            vec![Output::StartSync, Output::DeactivateSource]
        );
        m.handle(
            3 * MS,
            Input::SourceDeactivated {
                last_seq: 0,
                last_frame: Frames::default(),
            },
        )
        .unwrap();
        // The VMM said it resumed and the VM has not spoken: announce it.
        assert_eq!(
            m.handle(4 * MS, Input::Activated { first_frame: None })
                .unwrap(),
            vec![Output::MoveMac, Output::Announce]
        );
    }

    #[test]
    fn aborts_leave_the_source_active_and_the_destination_clean() {
        for steps in 0..4 {
            let (mut m, _) = Migration::begin(1, Duration::ZERO);
            let script = [
                Input::Prepared,
                Input::Resumed(Trigger::VmmResumed),
                Input::SourceDeactivated {
                    last_seq: 0,
                    last_frame: Frames::default(),
                },
            ];
            for i in script.into_iter().take(steps) {
                m.handle(MS, i).unwrap();
            }
            let out = m
                .handle(2 * MS, Input::Abort("qemu: migration failed".into()))
                .unwrap();
            assert!(out.contains(&Output::CleanDestination), "{steps}: {out:?}");
            let source = if steps >= 2 {
                Output::ReactivateSource {
                    after_clean: steps == 3,
                }
            } else {
                Output::KeepSource
            };
            assert!(out.contains(&source), "{steps}: {out:?}");
            assert_eq!(m.phase(), Phase::Aborted);
            assert!(m.source_active() && !m.destination_active());
            assert!(m.handle(3 * MS, Input::Prepared).is_err());
        }
    }

    #[test]
    fn inputs_out_of_turn_are_refused_and_change_nothing() {
        let (mut m, _) = Migration::begin(3, Duration::ZERO);
        let before = m.clone();
        let e = m
            .handle(MS, Input::Activated { first_frame: None })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "migration 3: Activated does not apply while Preparing"
        );
        assert_eq!(m, before);
        m.handle(MS, Input::Prepared).unwrap();
        m.handle(MS, Input::Resumed(Trigger::FirstFrame)).unwrap();
        m.handle(
            MS,
            Input::SourceDeactivated {
                last_seq: 0,
                last_frame: Frames::default(),
            },
        )
        .unwrap();
        m.handle(MS, Input::Activated { first_frame: None })
            .unwrap();
        let e = m.handle(MS, Input::Abort("late".into())).unwrap_err();
        assert!(e.to_string().ends_with("migrate it back instead"), "{e}");
    }

    #[test]
    fn a_destination_that_heard_the_vm_forwards_at_once_and_outlives_its_source() {
        let (mut m, _) = Migration::begin(5, Duration::ZERO);
        m.handle(MS, Input::Prepared).unwrap();
        m.handle(2 * MS, Input::Synced { seq: 0 }).unwrap();
        let e = m.handle(3 * MS, Input::DestinationStarted).unwrap_err();
        assert!(
            e.to_string().ends_with("the switchover has not started"),
            "{e}"
        );
        m.handle(4 * MS, Input::Resumed(Trigger::FirstFrame))
            .unwrap();
        assert!(m
            .handle(4 * MS, Input::DestinationStarted)
            .unwrap()
            .is_empty());
        // The window: both forward, the source for a VM that left.
        assert!(m.source_active() && m.destination_active());
        // The source is lost before its delta: the pre-copy is what the
        // destination keeps, and the migration finishes.
        assert_eq!(
            m.handle(5 * MS, Input::SourceLost("gone".into())).unwrap(),
            vec![Output::ActivateDestination {
                through_seq: 0,
                handover: false
            }]
        );
        assert!(!m.source_active() && m.destination_active());
        m.handle(6 * MS, Input::Activated { first_frame: None })
            .unwrap();
        assert_eq!(m.phase(), Phase::Done);
        // Without the destination's start, losing the source aborts.
        let (mut m, _) = Migration::begin(6, Duration::ZERO);
        m.handle(MS, Input::Prepared).unwrap();
        m.handle(MS, Input::Resumed(Trigger::FirstFrame)).unwrap();
        let out = m.handle(MS, Input::SourceLost("gone".into())).unwrap();
        assert_eq!(out, vec![Output::CleanDestination, Output::KeepSource]);
        // An abort after the destination started waits for its cleanup.
        let (mut m, _) = Migration::begin(7, Duration::ZERO);
        m.handle(MS, Input::Prepared).unwrap();
        m.handle(MS, Input::Resumed(Trigger::NicRead)).unwrap();
        m.handle(MS, Input::DestinationStarted).unwrap();
        let out = m.handle(MS, Input::Abort("no".into())).unwrap();
        assert_eq!(
            out,
            vec![
                Output::CleanDestination,
                Output::ReactivateSource { after_clean: true }
            ]
        );
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            Just(Input::Prepared),
            (0u32..4).prop_map(|seq| Input::Synced { seq }),
            Just(Input::Resumed(Trigger::VmmResumed)),
            Just(Input::Resumed(Trigger::FirstFrame)),
            Just(Input::DestinationStarted),
            Just(Input::SourceLost("x".into())),
            (0u32..4).prop_map(|last_seq| Input::SourceDeactivated {
                last_seq,
                last_frame: Frames::default()
            }),
            Just(Input::Activated { first_frame: None }),
            Just(Input::MacMoved),
            Just(Input::FirstFrameForwarded {
                at: Frames::default()
            }),
            Just(Input::Abort("x".into())),
        ]
    }

    proptest! {
        /// Whatever the hosts report, in any order, played against a model
        /// of the two hosts driven only by what they report and what they
        /// are told: the destination forwards only with its policy in place
        /// and once the VM runs there (it heard the VM, or the source
        /// stopped); the port is active on both only in the switching
        /// window after the destination heard the VM; a source's frames
        /// are taken over only once it stopped or is gone; an aborted
        /// migration leaves the source active and the destination clean,
        /// and a source resumes only after a destination that may have
        /// forwarded dropped the port.
        #[test]
        fn the_port_forwards_where_the_vm_runs(inputs in proptest::collection::vec(input(), 0..24)) {
            let (mut m, _) = Migration::begin(1, Duration::ZERO);
            let (mut prepared, mut source_stopped, mut source_lost, mut heard) =
                (false, false, false, false);
            // What each host does, as far as its messages say.
            let (mut src, mut dst) = (true, false);
            for (k, i) in inputs.into_iter().enumerate() {
                let now = MS * k as u32;
                let before = m.phase();
                let is_prepared = i == Input::Prepared;
                let is_stop = matches!(i, Input::SourceDeactivated { .. });
                let is_lost = matches!(i, Input::SourceLost(_));
                let is_started = i == Input::DestinationStarted;
                let Ok(out) = m.handle(now, i) else { continue };
                prepared |= is_prepared;
                source_stopped |= is_stop;
                if is_stop || (is_lost && before != Phase::Done) {
                    src = false;
                    source_lost |= is_lost;
                }
                if is_started && before != Phase::Done {
                    // The destination reported it forwards.
                    prop_assert!(prepared, "started without its policy: {m:?}");
                    heard = true;
                    dst = true;
                }
                for o in &out {
                    match o {
                        Output::ActivateDestination { handover, .. } => {
                            prop_assert!(prepared);
                            prop_assert!(
                                source_stopped || (source_lost && heard && !handover),
                                "activated while the source forwards: {m:?}"
                            );
                            dst = true;
                        }
                        Output::ReactivateSource { after_clean } => {
                            // The model cleans in order: a destination that
                            // may have forwarded is gone first.
                            prop_assert!(!dst, "resumed over the destination: {m:?}");
                            prop_assert!(*after_clean || !heard);
                            src = true;
                        }
                        Output::KeepSource => src = !source_lost,
                        Output::CleanDestination => dst = false,
                        _ => {}
                    }
                }
                if src && dst {
                    prop_assert!(
                        heard && m.phase() == Phase::Switching,
                        "active on both hosts outside the window: {m:?}"
                    );
                }
                prop_assert_eq!(dst, m.destination_active(), "{:?}", m);
                if m.phase() == Phase::Aborted {
                    prop_assert!(!dst && (src || source_lost));
                }
                if m.phase() == Phase::Done {
                    prop_assert!(dst && !src);
                }
            }
        }
    }
}
