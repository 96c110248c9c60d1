//! What every one-queue device (rng, block) does the same way: take its queue on
//! activation, watch the queue's kick on the event loop, serve the queue on a kick.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{watch, ActivateError, Activation};

/// A one-queue device once its driver has started it.
pub struct ActiveQueue {
    pub memory: GuestMemoryMmap,
    pub queue: Queue,
    pub kick: EventFd,
}

impl ActiveQueue {
    /// Takes the single queue out of `activation`; wakes the device's handler through
    /// `activate_evt` so that it watches the kick from the event loop.
    pub fn activate(activation: Activation, activate_evt: &EventFd) -> Result<Self, ActivateError> {
        let Activation {
            memory,
            queues,
            kicks,
            ..
        } = activation;
        let got = queues.len();
        let (Ok([queue]), Ok([kick])) = (
            <[Queue; 1]>::try_from(queues),
            <[EventFd; 1]>::try_from(kicks),
        ) else {
            return Err(ActivateError::QueueCount { got, wanted: 1 });
        };
        activate_evt.write(1).map_err(ActivateError::Wake)?;
        Ok(Self {
            memory,
            queue,
            kick,
        })
    }
}

/// The event-loop side of a one-queue device.
pub trait SingleQueueDevice {
    /// For log lines: "virtio-rng", "virtio-blk".
    const NAME: &'static str;
    fn activate_evt(&self) -> &EventFd;
    fn active(&self) -> Option<&ActiveQueue>;
    /// Serves every chain the driver made available.
    fn process_queue(&mut self);
}

/// `MutEventSubscriber::init`: before activation, only the activation event counts.
pub fn init<D: SingleQueueDevice>(device: &D, ops: &mut EventOps) {
    watch(
        ops,
        device.activate_evt().as_raw_fd(),
        &format!("{} activation", D::NAME),
    );
}

/// `MutEventSubscriber::process`.
pub fn process<D: SingleQueueDevice>(device: &mut D, events: Events, ops: &mut EventOps) {
    let fd = events.fd();
    if fd == device.activate_evt().as_raw_fd() {
        let _ = device.activate_evt().read();
        if let Some(active) = device.active() {
            watch(ops, active.kick.as_raw_fd(), &format!("{} queue", D::NAME));
        }
        // Chains the driver queued before its kick was watched.
        device.process_queue();
    } else if let Some(active) = device.active() {
        if fd == active.kick.as_raw_fd() {
            let _ = active.kick.read();
            device.process_queue();
        }
    } else {
        let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
    }
}
