//! A user's devices: each keeps its own acknowledged position in the user's inbox, so an ack from
//! the phone deletes nothing the laptop has not acknowledged yet.
//!
//! The rules, the same in both engines (the Redis engine runs them in its Lua scripts, see
//! `script.rs`):
//! - A device's record holds its position, the epoch that position belongs to, and when it was
//!   last seen (a `hello`, an ack, a position check). A position of another epoch counts as the
//!   floor: after an epoch change the device holds the whole inbox until it acknowledges anew.
//! - A device seen within `device_ttl` *holds* the inbox: the inbox is trimmed up to the lowest
//!   position among holding devices, never further. One silent longer stops holding; its record
//!   stays (until evicted) so that, when it comes back, it is told what it missed.
//! - When an inbox is at `max_inbox`, the oldest messages make room for a new one as long as the
//!   most advanced holding device has fewer than `max_inbox` unacknowledged, or no device holds:
//!   senders are never blocked by a device that lags or went silent. The append is refused with
//!   `inbox_full` only when every holding device is that far behind, or when the user has no
//!   device at all (nobody ever read the inbox: its first device must not find it trimmed).
//! - `floor` is the highest seq trimmed. A device whose position is below it lost what lies
//!   between, and learns it as a `gap`.
//! - At most `max_devices` records per user: a new device beyond it evicts the one seen longest
//!   ago.

use std::collections::BTreeMap;

use crate::engine::{DeviceInfo, DeviceSeen};

/// Where `hello` records a device: a known one keeps its position, even below the floor (it
/// learns of its gap until it acknowledges past it); a new one whose client names a position in
/// this epoch (`claimed`, an evicted device coming back) is recorded there, capped at the floor,
/// so that it too hears of its gap again if it misses it; any other new device starts at the
/// floor.
pub fn opening_position(known: bool, claimed: Option<u64>, floor: u64) -> u64 {
    match (known, claimed) {
        (true, _) => 0,
        (false, Some(last_seq)) => last_seq.min(floor),
        (false, None) => floor,
    }
}

/// One device's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub acked: u64,
    pub epoch: String,
    /// Unix milliseconds.
    pub seen_ms: u64,
}

impl Record {
    /// Its acknowledged position in `epoch`, if the record is of that epoch.
    pub fn acked_in(&self, epoch: &str) -> Option<u64> {
        (self.epoch == epoch).then_some(self.acked)
    }

    /// The device's position in `epoch`, never below `floor`.
    pub fn position(&self, epoch: &str, floor: u64) -> u64 {
        self.acked_in(epoch).map_or(floor, |acked| acked.max(floor))
    }

    pub fn holding(&self, now_ms: u64, ttl_ms: u64) -> bool {
        self.seen_ms.saturating_add(ttl_ms) >= now_ms
    }
}

/// The devices of one user, by name.
#[derive(Debug, Clone, Default)]
pub struct Devices {
    pub records: BTreeMap<String, Record>,
}

impl Devices {
    /// Records `device` as seen at `now_ms` with its position moved up to `acked` (in `epoch`),
    /// evicting the device seen longest ago when a new one would pass `cap`. Returns what was
    /// known of it before.
    pub fn touch(
        &mut self,
        device: &str,
        acked: u64,
        epoch: &str,
        now_ms: u64,
        cap: usize,
    ) -> DeviceSeen {
        let before = match self.records.get(device) {
            None => DeviceSeen::New,
            Some(r) => r
                .acked_in(epoch)
                .map_or(DeviceSeen::OtherEpoch, DeviceSeen::At),
        };
        if before == DeviceSeen::New {
            while self.records.len() >= cap.max(1) {
                let Some(oldest) = self
                    .records
                    .iter()
                    .min_by_key(|(_, r)| r.seen_ms)
                    .map(|(name, _)| name.clone())
                else {
                    break;
                };
                self.records.remove(&oldest);
            }
        }
        self.records.insert(
            device.to_owned(),
            Record {
                acked: match before {
                    DeviceSeen::At(position) => acked.max(position),
                    _ => acked,
                },
                epoch: epoch.to_owned(),
                seen_ms: now_ms,
            },
        );
        before
    }

    /// The lowest position among holding devices: what the inbox may be trimmed up to.
    pub fn low(&self, epoch: &str, floor: u64, now_ms: u64, ttl_ms: u64) -> Option<u64> {
        self.holding(now_ms, ttl_ms)
            .map(|r| r.position(epoch, floor))
            .min()
    }

    /// The highest position among holding devices: an inbox at `max_inbox` makes room as long
    /// as fewer than `max_inbox` messages lie above it.
    pub fn high(&self, epoch: &str, floor: u64, now_ms: u64, ttl_ms: u64) -> Option<u64> {
        self.holding(now_ms, ttl_ms)
            .map(|r| r.position(epoch, floor))
            .max()
    }

    fn holding(&self, now_ms: u64, ttl_ms: u64) -> impl Iterator<Item = &Record> {
        self.records
            .values()
            .filter(move |r| r.holding(now_ms, ttl_ms))
    }

    pub fn info(&self, epoch: &str, now_ms: u64, ttl_ms: u64) -> Vec<DeviceInfo> {
        self.records
            .iter()
            .map(|(name, r)| DeviceInfo {
                device: name.clone(),
                acked: r.acked_in(epoch).unwrap_or(0),
                last_seen_ms: r.seen_ms,
                holding: r.holding(now_ms, ttl_ms),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_hold_until_the_device_goes_silent() {
        let mut devices = Devices::default();
        assert_eq!(devices.touch("phone", 0, "e1", 1_000, 16), DeviceSeen::New);
        assert_eq!(devices.touch("laptop", 0, "e1", 1_000, 16), DeviceSeen::New);
        assert_eq!(
            devices.touch("phone", 7, "e1", 2_000, 16),
            DeviceSeen::At(0)
        );
        assert_eq!(
            devices.low("e1", 0, 2_000, 5_000),
            Some(0),
            "the laptop holds"
        );
        assert_eq!(devices.high("e1", 0, 2_000, 5_000), Some(7));
        // Silent past the ttl: only the phone holds.
        assert_eq!(devices.low("e1", 0, 6_001, 5_000), Some(7));
        // A position never moves back, and another epoch's counts as the floor.
        devices.touch("phone", 3, "e1", 6_002, 16);
        assert_eq!(devices.records["phone"].acked, 7);
        assert_eq!(devices.low("e2", 4, 6_002, 5_000), Some(4));
        assert_eq!(
            devices.touch("phone", 0, "e2", 6_003, 16),
            DeviceSeen::OtherEpoch
        );
    }

    #[test]
    fn a_new_device_beyond_the_cap_evicts_the_one_seen_longest_ago() {
        let mut devices = Devices::default();
        devices.touch("a", 0, "e", 3, 2);
        devices.touch("b", 0, "e", 1, 2);
        devices.touch("a", 1, "e", 4, 2); // known: nothing evicted
        assert_eq!(devices.records.len(), 2);
        devices.touch("c", 0, "e", 5, 2);
        let names: Vec<_> = devices.records.keys().cloned().collect();
        assert_eq!(names, ["a", "c"]);
    }
}
