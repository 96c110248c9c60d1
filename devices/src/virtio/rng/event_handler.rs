use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::Rng;
use crate::virtio::single_queue::{self, ActiveQueue, SingleQueueDevice};

impl SingleQueueDevice for Rng {
    const NAME: &'static str = "virtio-rng";

    fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    fn active(&self) -> Option<&ActiveQueue> {
        self.active.as_ref()
    }

    fn process_queue(&mut self) {
        Rng::process_queue(self);
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        single_queue::init(self, ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        single_queue::process(self, events, ops);
    }
}
