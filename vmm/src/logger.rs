//! Log lines on stderr: `peapod-vmm[<pid>] <level> <target>: <message>`. The shim
//! collects the VMM's stderr, so one line per event with the pid is what it needs.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            // Not eprintln!, which panics when stderr is gone (a reader that went away):
            // a lost log line must not take the VM down. One write per line.
            let line = format!(
                "peapod-vmm[{}] {} {}\n",
                std::process::id(),
                record.level(),
                record.args()
            );
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger once; later calls only change the level.
pub fn init(level: LevelFilter) {
    static LOGGER: StderrLogger = StderrLogger;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
