//! What a VMM told a virtio-fs device over vhost-user, as the front records it: negotiated
//! features, the guest memory table, and per virtqueue its size, addresses, enable state and
//! eventfds. A ring server (an engine) is handed a copy of this and the fds, and can serve the
//! device from it without ever having seen the VMM's messages.

use std::fs::File;

use serde::{Deserialize, Serialize};

/// One guest memory region (SET_MEM_TABLE / ADD_MEM_REG); its fd travels beside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    /// Where the VMM maps it: vring addresses come in this address space.
    pub user_addr: u64,
    pub mmap_offset: u64,
}

impl Region {
    /// Whether the region lies inside its file of `file_size` bytes: past the end, every
    /// access through a mapping is a SIGBUS.
    pub fn inside(&self, file_size: u64) -> bool {
        self.mmap_offset
            .checked_add(self.memory_size)
            .is_some_and(|end| end <= file_size)
    }
}

/// One virtqueue as the VMM set it up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vring {
    pub num: u16,
    /// Descriptor table, avail and used rings, as VMM virtual addresses.
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub addr_set: bool,
    pub enabled: bool,
    /// Started by a kick fd; stopped by GET_VRING_BASE.
    pub started: bool,
    pub has_kick: bool,
    pub has_call: bool,
}

impl Vring {
    /// Whether a ring server should serve this queue now.
    pub fn running(&self) -> bool {
        self.started && self.enabled && self.addr_set && self.num > 0
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub acked_features: u64,
    pub acked_protocol_features: u64,
    pub regions: Vec<Region>,
    pub vrings: Vec<Vring>,
}

impl DeviceState {
    pub fn new(queues: usize) -> DeviceState {
        DeviceState {
            vrings: vec![Vring::default(); queues],
            ..DeviceState::default()
        }
    }

    /// The guest physical address of VMM virtual address `uaddr` (vring addresses).
    pub fn to_gpa(&self, uaddr: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = uaddr.checked_sub(r.user_addr)?;
            (off < r.memory_size).then(|| r.guest_phys_addr + off)
        })
    }

    pub fn event_idx(&self) -> bool {
        self.acked_features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0
    }
}

/// The fds of a [`DeviceState`]: one per region, and each vring's kick and call.
#[derive(Debug, Default)]
pub struct DeviceFds {
    pub regions: Vec<File>,
    pub kicks: Vec<Option<File>>,
    pub calls: Vec<Option<File>>,
}

impl DeviceFds {
    pub fn new(queues: usize) -> DeviceFds {
        DeviceFds {
            regions: Vec::new(),
            kicks: (0..queues).map(|_| None).collect(),
            calls: (0..queues).map(|_| None).collect(),
        }
    }

    /// Copies of every fd, in the order [`Self::from_list`] takes them back: regions, then
    /// for each vring its kick (if the state says it has one), then its call.
    pub fn to_list(&self, state: &DeviceState) -> std::io::Result<Vec<File>> {
        let mut out = Vec::new();
        for f in &self.regions {
            out.push(f.try_clone()?);
        }
        for (i, v) in state.vrings.iter().enumerate() {
            if v.has_kick {
                if let Some(Some(f)) = self.kicks.get(i) {
                    out.push(f.try_clone()?);
                }
            }
            if v.has_call {
                if let Some(Some(f)) = self.calls.get(i) {
                    out.push(f.try_clone()?);
                }
            }
        }
        Ok(out)
    }

    /// The fds of `state` from a list made by [`Self::to_list`].
    pub fn from_list(state: &DeviceState, files: Vec<File>) -> std::io::Result<DeviceFds> {
        let mut files = files.into_iter();
        let short = || std::io::Error::new(std::io::ErrorKind::InvalidData, "device fds missing");
        let mut fds = DeviceFds::new(state.vrings.len());
        for _ in &state.regions {
            fds.regions.push(files.next().ok_or_else(short)?);
        }
        for (i, v) in state.vrings.iter().enumerate() {
            if v.has_kick {
                fds.kicks[i] = Some(files.next().ok_or_else(short)?);
            }
            if v.has_call {
                fds.calls[i] = Some(files.next().ok_or_else(short)?);
            }
        }
        Ok(fds)
    }
}
