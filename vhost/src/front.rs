//! The front of a virtio-fs device: the side of the vhost-user connection the VMM talks to.
//! It answers every message itself and records what the VMM set up ([`DeviceState`], its
//! fds, and the [`Inflight`] region of the queues), and passes the device on to whatever ring
//! server is attached ([`RingLink`]). It never reads guest requests, so it does not die of a
//! bad one; a ring server that dies (an engine crash, an upgrade) is only a detached link
//! until the next one is attached, and the VMM never notices: its socket stays open.
//!
//! Offered: VERSION_1, INDIRECT_DESC, EVENT_IDX and protocol features (MQ, REPLY_ACK,
//! CONFIGURE_MEM_SLOTS). Not offered: the VMM's own inflight tracking (this front keeps it),
//! device state migration, DAX, dirty logging.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    BackendReqHandler, Error, GpuBackend, Result, VhostUserBackendReqHandlerMut,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::device::{DeviceFds, DeviceState, Region};
use crate::inflight::Inflight;

/// Most memory regions a VMM may hand over (their fds travel to each ring server).
pub const MAX_MEM_SLOTS: u64 = 32;

/// Answers the VMM on `stream` with `front` until it leaves (its socket closed, or a
/// message the front cannot read); returns why. The front is not detached: the caller decides.
pub fn serve(stream: UnixStream, front: Arc<Mutex<Front>>) -> Error {
    let mut handler = BackendReqHandler::from_stream(stream, front);
    loop {
        if let Err(e) = handler.handle_request() {
            return e;
        }
    }
}

/// How a front reaches the ring server serving its device (an engine, or a thread of its
/// own process). Errors mean the ring server is gone: the front detaches it and goes on.
pub trait RingLink: Send {
    /// Serve the device as `state` says, with copies of the fds in `fds`.
    fn update(&mut self, state: &DeviceState, fds: &DeviceFds) -> io::Result<()>;
    /// Stop serving queue `index` after its current request (the VMM stops the ring).
    fn stop(&mut self, index: usize) -> io::Result<()>;
}

/// The device as a VMM sees it.
#[derive(Clone, Copy, Debug)]
pub struct FrontConfig {
    pub request_queues: usize,
    pub queue_size: u16,
}

pub struct Front {
    config: FrontConfig,
    owned: bool,
    state: DeviceState,
    fds: DeviceFds,
    inflight: Arc<Inflight>,
    link: Option<Box<dyn RingLink>>,
}

impl Front {
    pub fn new(config: FrontConfig) -> io::Result<Front> {
        let queues = 1 + config.request_queues;
        Ok(Front {
            config,
            owned: false,
            state: DeviceState::new(queues),
            fds: DeviceFds::new(queues),
            inflight: Arc::new(Inflight::create(queues, config.queue_size)?),
            link: None,
        })
    }

    pub fn inflight(&self) -> &Arc<Inflight> {
        &self.inflight
    }

    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    /// A copy of every fd of the device, in the order `DeviceFds::from_list` takes.
    pub fn fd_list(&self) -> io::Result<Vec<File>> {
        self.fds.to_list(&self.state)
    }

    /// Attaches a ring server: it gets the device at once. On failure nothing is attached.
    /// A device whose memory file shrank below a region since the VMM offered it is never
    /// handed over: serving it would kill the ring server (SIGBUS), and the next, in a loop.
    pub fn attach(&mut self, mut link: Box<dyn RingLink>) -> io::Result<()> {
        for (i, (r, file)) in self.state.regions.iter().zip(&self.fds.regions).enumerate() {
            let size = file.metadata()?.len();
            if !r.inside(size) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "guest memory region {i} ends past its file ({size} bytes): the VMM shrank it; its device is not served"
                    ),
                ));
            }
        }
        link.update(&self.state, &self.fds)?;
        self.link = Some(link);
        Ok(())
    }

    /// Detaches the ring server (it died, or is being replaced).
    pub fn detach(&mut self) -> Option<Box<dyn RingLink>> {
        self.link.take()
    }

    pub fn attached(&self) -> bool {
        self.link.is_some()
    }

    /// Whether requests are waiting on a running queue (queued and not taken, or taken and
    /// not answered), and how many requests were answered so far: requests waiting with
    /// no answer for long means the ring server is hung.
    pub fn progress(&self) -> (bool, u64) {
        let mut waiting = false;
        let mut finished = 0;
        for (q, v) in self.state.vrings.iter().enumerate() {
            if q >= self.inflight.queues() {
                break;
            }
            finished += self.inflight.finished(q);
            if !v.running() {
                continue;
            }
            let avail = self.read_u16(v.avail.saturating_add(2));
            let queued = avail.is_some_and(|a| a != self.inflight.next_avail(q));
            waiting |= queued || !self.inflight.taken(q).is_empty();
        }
        (waiting, finished)
    }

    /// The state changed: the ring server serves the new one (or is detached if it cannot).
    fn changed(&mut self) {
        if let Some(link) = &mut self.link {
            if let Err(e) = link.update(&self.state, &self.fds) {
                tracing::warn!(error = %e, "the ring server is gone; the next one gets the device");
                self.link = None;
            }
        }
    }

    fn vring(&mut self, index: u32) -> Result<&mut crate::device::Vring> {
        self.state
            .vrings
            .get_mut(index as usize)
            .ok_or(Error::InvalidParam)
    }

    /// The u16 at VMM address `uaddr` of guest memory, read from its region's fd: never
    /// through a mapping, so a VMM that shrinks its memory file under us makes the read
    /// fail (None), not this process die of SIGBUS.
    fn read_u16(&self, uaddr: u64) -> Option<u16> {
        let (r, file) = self
            .state
            .regions
            .iter()
            .zip(&self.fds.regions)
            .find(|(r, _)| {
                uaddr
                    .checked_sub(r.user_addr)
                    .is_some_and(|o| o < r.memory_size)
            })?;
        let at = r.mmap_offset.checked_add(uaddr - r.user_addr)?;
        let mut buf = [0u8; 2];
        file.read_exact_at(&mut buf, at).ok()?;
        Some(u16::from_le_bytes(buf))
    }

    fn protocol_features_acked(&self) -> bool {
        self.state.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn features() -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    /// Stops every ring (VM reset, owner gone).
    fn stop_all(&mut self) {
        for q in 0..self.state.vrings.len() {
            if let Some(link) = &mut self.link {
                if link.stop(q).is_err() {
                    self.link = None;
                }
            }
            self.state.vrings[q].started = false;
        }
    }
}

fn region_of(r: &VhostUserMemoryRegion) -> Region {
    Region {
        guest_phys_addr: r.guest_phys_addr,
        memory_size: r.memory_size,
        user_addr: r.user_addr,
        mmap_offset: r.mmap_offset,
    }
}

/// A region the VMM hands over must lie inside its file: a mapping past the end makes every
/// access there a SIGBUS in whoever touches it (each engine serving the rings), and a
/// hostile VMM must not be able to crash the engine its pods share in a loop. Its addresses
/// must not wrap either.
fn checked_region(r: &VhostUserMemoryRegion, file: &File) -> Result<Region> {
    let region = region_of(r);
    let size = file.metadata().map_err(Error::ReqHandlerError)?.len();
    let inside = region.inside(size);
    let no_wrap = region
        .guest_phys_addr
        .checked_add(region.memory_size)
        .is_some()
        && region.user_addr.checked_add(region.memory_size).is_some();
    if region.memory_size == 0 || !inside || !no_wrap {
        tracing::warn!(
            guest_phys_addr = region.guest_phys_addr,
            memory_size = region.memory_size,
            mmap_offset = region.mmap_offset,
            file_size = size,
            "refused a guest memory region that is not inside its file"
        );
        return Err(Error::InvalidParam);
    }
    Ok(region)
}

impl VhostUserBackendReqHandlerMut for Front {
    fn set_owner(&mut self) -> Result<()> {
        if self.owned {
            return Err(Error::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.stop_all();
        self.owned = false;
        self.state.acked_features = 0;
        self.state.acked_protocol_features = 0;
        self.changed();
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.stop_all();
        for v in &mut self.state.vrings {
            v.enabled = false;
        }
        self.state.acked_features = 0;
        self.changed();
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(Self::features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !Self::features() != 0 {
            return Err(Error::InvalidParam);
        }
        self.state.acked_features = features;
        // Without protocol features every ring is enabled at once (vhost-user "ring states").
        if !self.protocol_features_acked() {
            for v in &mut self.state.vrings {
                v.enabled = true;
            }
        }
        self.changed();
        Ok(())
    }

    fn set_mem_table(&mut self, ctx: &[VhostUserMemoryRegion], files: Vec<File>) -> Result<()> {
        if ctx.len() as u64 > MAX_MEM_SLOTS || ctx.len() != files.len() {
            return Err(Error::InvalidParam);
        }
        let regions = ctx
            .iter()
            .zip(&files)
            .map(|(r, f)| checked_region(r, f))
            .collect::<Result<Vec<_>>>()?;
        self.state.regions = regions;
        self.fds.regions = files;
        self.changed();
        Ok(())
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let max = self.config.queue_size;
        let v = self.vring(index)?;
        if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
            return Err(Error::InvalidParam);
        }
        v.num = num as u16;
        self.changed();
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        let ok = [descriptor, used, available]
            .iter()
            .all(|a| self.state.to_gpa(*a).is_some());
        if !ok {
            return Err(Error::InvalidParam);
        }
        let v = self.vring(index)?;
        v.desc = descriptor;
        v.used = used;
        v.avail = available;
        v.addr_set = true;
        self.changed();
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.vring(index)?;
        self.inflight.rebase(index as usize, base as u16);
        self.changed();
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.vring(index)?;
        if let Some(link) = &mut self.link {
            if let Err(e) = link.stop(index as usize) {
                tracing::warn!(error = %e, "the ring server is gone while stopping a ring");
                self.link = None;
            }
        }
        let v = self.vring(index)?;
        v.started = false;
        v.has_kick = false;
        v.has_call = false;
        self.fds.kicks[index as usize] = None;
        self.fds.calls[index as usize] = None;
        let base = self.inflight.next_avail(index as usize);
        self.changed();
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let has = fd.is_some();
        let v = self.vring(u32::from(index))?;
        v.has_kick = has;
        v.started = has;
        self.fds.kicks[usize::from(index)] = fd;
        self.changed();
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let has = fd.is_some();
        self.vring(u32::from(index))?.has_call = has;
        self.fds.calls[usize::from(index)] = fd;
        self.changed();
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        self.vring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(Self::protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.state.acked_protocol_features = features & Self::protocol_features().bits();
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.state.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        if !self.protocol_features_acked() {
            return Err(Error::InvalidOperation("protocol features not negotiated"));
        }
        self.vring(index)?.enabled = enable;
        self.changed();
        Ok(())
    }

    fn get_config(
        &mut self,
        _offset: u32,
        _size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        Err(Error::InvalidOperation("no device config space"))
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> Result<()> {
        Err(Error::InvalidOperation("no device config space"))
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Err(Error::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(Error::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        Err(Error::InvalidOperation(
            "inflight tracking is kept by the backend itself",
        ))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> Result<()> {
        Err(Error::InvalidOperation(
            "inflight tracking is kept by the backend itself",
        ))
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(&mut self, region: &VhostUserSingleMemoryRegion, fd: File) -> Result<()> {
        if self.state.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(Error::InvalidParam);
        }
        let checked = checked_region(region, &fd)?;
        self.state.regions.push(checked);
        self.fds.regions.push(fd);
        self.changed();
        Ok(())
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        let Some(i) = self.state.regions.iter().position(|r| {
            r.guest_phys_addr == region.guest_phys_addr && r.memory_size == region.memory_size
        }) else {
            return Err(Error::InvalidParam);
        };
        self.state.regions.remove(i);
        self.fds.regions.remove(i);
        self.changed();
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(Error::InvalidOperation("no device state migration"))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(Error::InvalidOperation("no device state migration"))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(Error::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        Err(Error::InvalidOperation("no dirty logging"))
    }
}
