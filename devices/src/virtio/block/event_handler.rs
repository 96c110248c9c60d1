use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::Block;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        crate::virtio::watch(ops, self.activate_evt.as_raw_fd(), "virtio-blk activation");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            if let Some(active) = &self.active {
                crate::virtio::watch(ops, active.kick.as_raw_fd(), "virtio-blk queue");
            }
            // Requests the driver queued before its kick was watched.
            self.process_queue();
        } else if let Some(active) = &self.active {
            if fd == active.kick.as_raw_fd() {
                let _ = active.kick.read();
                self.process_queue();
            }
        } else {
            let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
        }
    }
}
