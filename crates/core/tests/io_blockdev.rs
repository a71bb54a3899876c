//! Block devices: geometry from BLKGETSIZE64/BLKSSZGET, O_EXCL exclusion, BLKDISCARD.
//! Runs on a loop device, so it needs root and util-linux's `losetup`; elsewhere it says so
//! and checks nothing.

mod io_common;

use io_common::*;
use std::process::Command;
use std::sync::Arc;
use ubcache_core::io::{AlignedBuf, Device, IoRequest, OpenOptions};
use ubcache_core::ErrorKind;

struct Loop(String);

impl Loop {
    fn attach(file: &std::path::Path) -> Option<Loop> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let out = Command::new("losetup").args(["--find", "--show"]).arg(file).output().ok()?;
        out.status.success().then(|| Loop(String::from_utf8_lossy(&out.stdout).trim().to_string()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn loop_device_geometry_exclusion_io_and_discard() {
    let s = Scratch::new("blk");
    let backing = s.file("backing", 16 << 20, 3);
    let Some(lo) = Loop::attach(&backing) else {
        eprintln!("no loop device available (needs root and losetup): block-device checks not run");
        return;
    };
    let info = ubcache_core::io::device_info(std::path::Path::new(&lo.0)).unwrap();
    let dev = Device::open(&lo.0, &OpenOptions::default()).unwrap();
    assert!(dev.is_block_device());
    assert_eq!(dev.size(), 16 << 20);
    assert_eq!(dev.logical_block_size(), info.logical_block_size);
    assert!(dev.is_direct());
    let err = Device::open(&lo.0, &OpenOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    let dev = Arc::new(dev);
    for choice in ENGINES {
        let mut e = engine(choice);
        let id = e.add_device(dev.clone()).unwrap();
        write(&mut *e, id, 1 << 20, &[0xabu8; 65536]);
        flush(&mut *e, id);
        assert!(read(&mut *e, id, 1 << 20, 65536).iter().all(|&b| b == 0xab));
        let c = sync(&mut *e, IoRequest::discard(id, 1 << 20, 32768, 9));
        assert_eq!(c.result.unwrap(), 32768, "{choice:?}");
        // A loop device discards by punching a hole in its file: zeros.
        let after = read(&mut *e, id, 1 << 20, 65536);
        assert!(after[..32768].iter().all(|&b| b == 0), "{choice:?}");
        assert!(after[32768..].iter().all(|&b| b == 0xab));
        let bad = sync(&mut *e, IoRequest::discard(id, 100, 4096, 1)).result.unwrap_err();
        assert_eq!(bad.kind(), ErrorKind::Misaligned);
        let past = sync(&mut *e, IoRequest::read(id, 16 << 20, AlignedBuf::new(4096), 1)).result.unwrap_err();
        assert_eq!(past.kind(), ErrorKind::OutOfRange);
        e.remove_device(id).unwrap();
    }
}
