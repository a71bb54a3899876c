//! Both engines against real files: read-back across sizes, offsets and queue depths,
//! vectored I/O, flush and discard, short transfers, bad input, closing, fallback.

mod io_common;

use io_common::*;
use proptest::prelude::*;
use std::sync::Arc;
use ubcache_core::io::psync::PsyncEngine;
use ubcache_core::io::uring::UringEngine;
use ubcache_core::io::{
    open_engine, AlignedBuf, BufPool, BufPoolConfig, DevId, Device, DirectIo, EngineChoice, EngineKind, EngineOptions,
    IoEngine, IoOp, IoRequest, OpenOptions,
};
use ubcache_core::ErrorKind;

const DEV_SIZE: usize = 4 << 20;

#[test]
fn files_open_with_o_direct_and_report_geometry() {
    let s = Scratch::new("geom");
    let p = s.file("f", DEV_SIZE, 0);
    let d = Device::open(&p, &OpenOptions::default()).unwrap();
    assert!(d.is_direct(), "/var/tmp is on a real filesystem");
    assert_eq!(d.size(), DEV_SIZE as u64);
    assert!(!d.is_block_device());
    assert!(d.logical_block_size() >= 512 && d.logical_block_size().is_power_of_two());
    assert_eq!(d.alignment(), d.logical_block_size());
    let b = Device::open(&p, &OpenOptions { direct: DirectIo::Off, exclusive: false, ..Default::default() }).unwrap();
    assert!(!b.is_direct());
    assert_eq!(b.alignment(), 1);
}

#[test]
fn exclusive_open_refuses_a_second_opener() {
    let s = Scratch::new("excl");
    let p = s.file("f", 65536, 0);
    let first = Device::open(&p, &OpenOptions::default()).unwrap();
    let err = Device::open(&p, &OpenOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert_eq!(err.code(), "EBUSY");
    drop(first);
    Device::open(&p, &OpenOptions::default()).expect("free again once the first is closed");
}

#[test]
fn open_errors_are_typed() {
    let s = Scratch::new("openerr");
    assert_eq!(Device::open(s.0.join("missing"), &OpenOptions::default()).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(Device::open(&s.0, &OpenOptions::default()).unwrap_err().kind(), ErrorKind::NotADevice);
    let created =
        Device::open(s.0.join("new"), &OpenOptions { create_size: Some(1 << 20), ..Default::default() }).unwrap();
    assert_eq!(created.size(), 1 << 20);
}

#[test]
fn tmpfs_falls_back_to_buffered_io() {
    // /dev/shm is tmpfs on Linux; O_DIRECT there is served from the page cache.
    let dir = tempdir_in("/dev/shm");
    let p = dir.join("f");
    std::fs::write(&p, pattern(65536, 1)).unwrap();
    let d = Device::open(&p, &OpenOptions::default()).unwrap();
    assert!(!d.is_direct());
    assert!(ubcache_core::io::warned("buffered-io"));
    let err = Device::open(&p, &OpenOptions { direct: DirectIo::Require, exclusive: false, ..Default::default() })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    // Buffered devices take any alignment.
    let mut e = engine(EngineChoice::Uring);
    let id = e.add_device(Arc::new(d)).unwrap();
    write(&mut *e, id, 3, b"abc");
    assert_eq!(read(&mut *e, id, 1, 5), [pattern(65536, 1)[1], pattern(65536, 1)[2], b'a', b'b', b'c']);
    drop(e);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempdir_in(base: &str) -> std::path::PathBuf {
    let d = std::path::Path::new(base).join(format!("ubcache-shm-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn fallback_when_io_uring_setup_is_refused() {
    for errno in [libc::EPERM, libc::ENOSYS, libc::EINVAL] {
        let opts = EngineOptions { simulate_uring_setup_error: Some(errno), ..Default::default() };
        let e = open_engine(&opts).unwrap();
        assert_eq!(e.kind(), EngineKind::Psync, "errno {errno}");
        let forced = EngineOptions { choice: EngineChoice::Uring, ..opts };
        assert!(open_engine(&forced).is_err(), "an explicit io_uring choice does not fall back");
    }
    assert!(ubcache_core::io::warned("io_uring"));
    let other = EngineOptions { simulate_uring_setup_error: Some(libc::ENOMEM), ..Default::default() };
    assert!(open_engine(&other).is_err(), "only refusals fall back, not resource errors");
    assert_eq!(open_engine(&EngineOptions::default()).unwrap().kind(), EngineKind::Uring);
    let p = open_engine(&EngineOptions { choice: EngineChoice::Psync, ..Default::default() }).unwrap();
    assert_eq!(p.kind(), EngineKind::Psync);
}

/// Writes random blocks at random offsets with many requests in flight, then reads them all
/// back the same way, and compares with a model of the file.
fn readback(choice: EngineChoice, ops: &[(u64, usize, u8)], qd: usize, pool: Option<BufPool>) {
    let s = Scratch::new("rb");
    let p = s.file("f", DEV_SIZE, 7);
    let mut model = pattern(DEV_SIZE, 7);
    let mut e = open_engine(&EngineOptions { choice, buf_pool: pool.clone(), ..Default::default() }).unwrap();
    let id = e.add_device(open(&p)).unwrap();
    let get = |len: usize| pool.as_ref().map_or_else(|| AlignedBuf::new(len), |p| p.get(len));
    for chunk in ops.chunks(qd) {
        let mut reqs = Vec::new();
        for (i, &(blk, nblk, seed)) in chunk.iter().enumerate() {
            let (off, len) = (blk as usize * 4096, nblk * 4096);
            let data = pattern(len, seed);
            // Later writes in one batch may overlap earlier ones: order is not defined, so
            // keep one batch free of overlaps by skipping those.
            if chunk[..i].iter().any(|&(b, n, _)| (b as usize) < blk as usize + nblk && (blk as usize) < b as usize + n)
            {
                continue;
            }
            model[off..off + len].copy_from_slice(&data);
            let mut b = get(len);
            b.copy_from_slice(&data);
            reqs.push(IoRequest::write(id, off as u64, b, i as u64));
        }
        for c in run_all(&mut *e, reqs) {
            assert_eq!(*c.result.as_ref().unwrap(), c.op.len());
        }
    }
    let mut reqs = Vec::new();
    for (i, &(blk, nblk, _)) in ops.iter().enumerate() {
        reqs.push(IoRequest::read(id, blk * 4096, get(nblk * 4096), i as u64));
        if reqs.len() == qd || i + 1 == ops.len() {
            for c in run_all(&mut *e, std::mem::take(&mut reqs)) {
                let off = c.offset as usize;
                let b = c.into_buf().unwrap();
                assert!(b[..] == model[off..off + b.len()], "mismatch at {off}");
            }
        }
    }
    flush(&mut *e, id);
    drop(e);
    assert!(std::fs::read(&p).unwrap() == model);
}

fn ops_strategy() -> impl Strategy<Value = Vec<(u64, usize, u8)>> {
    let blocks = (DEV_SIZE / 4096) as u64;
    proptest::collection::vec((0..blocks - 64, 1usize..=64, any::<u8>()), 1..48)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    #[test]
    fn uring_reads_back_what_it_wrote(ops in ops_strategy(), qd in prop::sample::select(vec![1usize, 4, 32])) {
        readback(EngineChoice::Uring, &ops, qd, None);
    }

    #[test]
    fn psync_reads_back_what_it_wrote(ops in ops_strategy(), qd in prop::sample::select(vec![1usize, 4, 32])) {
        readback(EngineChoice::Psync, &ops, qd, None);
    }
}

#[test]
fn registered_arena_buffers_read_back() {
    let pool = BufPool::new(BufPoolConfig { arena_bytes: 8 << 20, ..Default::default() });
    let e = UringEngine::new(&EngineOptions { buf_pool: Some(pool.clone()), ..Default::default() }).unwrap();
    assert!(e.has_fixed_buffers());
    assert!(e.has_fixed_files());
    drop(e);
    let ops: Vec<_> = (0..40u64).map(|i| (i * 17 % 900, 1 + (i as usize * 7) % 64, i as u8)).collect();
    readback(EngineChoice::Uring, &ops, 32, Some(pool.clone()));
    assert!(pool.stats().arena_used > 0);
    readback(EngineChoice::Psync, &ops, 32, Some(pool));
}

#[test]
fn queue_deeper_than_the_ring_goes_through_the_backlog() {
    let s = Scratch::new("deep");
    let p = s.file("f", DEV_SIZE, 3);
    let model = pattern(DEV_SIZE, 3);
    // 8 SQ entries, 16 CQ entries, 700 requests in flight at once.
    let mut e =
        open_engine(&EngineOptions { choice: EngineChoice::Uring, queue_depth: 8, ..Default::default() }).unwrap();
    let id = e.add_device(open(&p)).unwrap();
    let reqs: Vec<_> =
        (0..700u64).map(|i| IoRequest::read(id, (i * 37 % 1000) * 4096, AlignedBuf::new(4096), i)).collect();
    for c in run_all(&mut *e, reqs) {
        let off = c.offset as usize;
        assert!(c.into_buf().unwrap()[..] == model[off..off + 4096]);
    }
}

/// A caller that refills the queue as completions come (as the cache and the bench do):
/// with `submit_batch` at 1, 4 (the default) and 0, every request completes exactly once
/// with its own data, including requests queued on one thread before the engine is moved
/// to the thread that polls it (the ring's single issuer is whoever enters it first).
#[test]
fn refilling_while_completions_arrive_sends_small_batches_early() {
    let s = Scratch::new("refill");
    let p = s.file("f", DEV_SIZE, 5);
    let model = pattern(DEV_SIZE, 5);
    for batch in [1, 4, 0] {
        let opts =
            EngineOptions { choice: EngineChoice::Uring, queue_depth: 16, submit_batch: batch, ..Default::default() };
        let mut e = open_engine(&opts).unwrap();
        let id = e.add_device(open(&p)).unwrap();
        let block = |n: u64| (n * 7919 % (DEV_SIZE as u64 / 4096)) * 4096;
        // 40 in flight against a 16-entry ring: the early submissions meet a full SQ too.
        for n in 0..40u64 {
            e.submit(IoRequest::read(id, block(n), AlignedBuf::new(4096), n));
        }
        let model = model.clone();
        let seen = std::thread::spawn(move || {
            let mut seen = vec![0u8; 2000];
            let (mut next, mut done, mut out) = (40u64, 0, Vec::new());
            while done < 2000 {
                e.poll(&mut out, None).unwrap();
                for c in out.drain(..) {
                    let n = c.user_data;
                    assert_eq!(c.offset, block(n));
                    let off = c.offset as usize;
                    let buf = c.into_buf().unwrap();
                    assert!(buf[..] == model[off..off + 4096], "batch {batch}: request {n} read the wrong data");
                    seen[n as usize] += 1;
                    done += 1;
                    if next < 2000 {
                        e.submit(IoRequest::read(id, block(next), buf, next));
                        next += 1;
                    }
                }
            }
            assert_eq!(e.in_flight(), 0);
            seen
        })
        .join()
        .unwrap();
        assert!(seen.iter().all(|&k| k == 1), "batch {batch}: every request completes exactly once");
    }
}

#[test]
fn short_transfers_are_completed() {
    let s = Scratch::new("short");
    let p = s.file("f", DEV_SIZE, 9);
    let mut model = pattern(DEV_SIZE, 9);
    // Every SQE carries at most 4 KiB, so each larger request completes in pieces, exactly as
    // the kernel's short reads and writes are completed.
    let opts = EngineOptions { choice: EngineChoice::Uring, max_transfer: Some(4096), ..Default::default() };
    let mut e = open_engine(&opts).unwrap();
    let id = e.add_device(open(&p)).unwrap();
    let data = pattern(256 << 10, 42);
    write(&mut *e, id, 8192, &data);
    model[8192..8192 + data.len()].copy_from_slice(&data);
    assert!(read(&mut *e, id, 4096, 300 << 10) == model[4096..4096 + (300 << 10)]);
    let bufs: Vec<_> = [12288usize, 4096, 65536].iter().map(|&n| AlignedBuf::new(n)).collect();
    let c = sync(&mut *e, IoRequest { dev: id, offset: 0, op: IoOp::Readv { bufs }, user_data: 5, fua: false });
    assert_eq!(c.result.unwrap(), 12288 + 4096 + 65536);
    let IoOp::Readv { bufs } = c.op else { panic!("readv comes back as readv") };
    let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
    assert!(joined == model[..joined.len()]);

    // A file that shrank under the device: the read comes up short and the rest is missing,
    // which is an error, not a silent short result.
    let mut ps = engine(EngineChoice::Psync);
    let pid = ps
        .add_device(Arc::new(Device::open(&p, &OpenOptions { exclusive: false, ..Default::default() }).unwrap()))
        .unwrap();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len((DEV_SIZE - 2048) as u64).unwrap();
    for (e, id) in [(&mut e, id), (&mut ps, pid)] {
        let c = sync(&mut **e, IoRequest::read(id, (DEV_SIZE - 8192) as u64, AlignedBuf::new(8192), 6));
        let err = c.result.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    }
}

#[test]
fn vectored_io_flush_and_discard() {
    for choice in ENGINES {
        let s = Scratch::new("vec");
        let p = s.file("f", DEV_SIZE, 5);
        let mut e = engine(choice);
        let id = e.add_device(open(&p)).unwrap();
        let parts = [pattern(4096, 1), pattern(8192, 2), pattern(4096, 3)];
        let bufs = parts.iter().map(|d| AlignedBuf::from_slice(d)).collect();
        let c =
            sync(&mut *e, IoRequest { dev: id, offset: 65536, op: IoOp::Writev { bufs }, user_data: 1, fua: false });
        assert_eq!(c.result.unwrap(), 16384);
        flush(&mut *e, id);
        let all = read(&mut *e, id, 65536, 16384);
        assert!(all == parts.concat(), "{choice:?}");

        let c = sync(&mut *e, IoRequest::discard(id, 65536, 8192, 2));
        assert_eq!(c.result.unwrap(), 8192);
        let after = read(&mut *e, id, 65536, 16384);
        assert!(after[..8192].iter().all(|&b| b == 0), "{choice:?}: a punched hole reads as zeros");
        assert!(after[8192..] == parts.concat()[8192..]);
    }
}

#[test]
fn bad_input_gets_clear_errors() {
    for choice in ENGINES {
        let s = Scratch::new("bad");
        let p = s.file("f", 1 << 20, 0);
        let mut e = engine(choice);
        let id = e.add_device(open(&p)).unwrap();
        let code = |e: &mut dyn IoEngine, req| sync(e, req).result.unwrap_err().kind();
        assert_eq!(code(&mut *e, IoRequest::read(id, 1 << 20, AlignedBuf::new(4096), 1)), ErrorKind::OutOfRange);
        assert_eq!(
            code(&mut *e, IoRequest::write(id, (1 << 20) - 4096, AlignedBuf::new(8192), 1)),
            ErrorKind::OutOfRange
        );
        assert_eq!(code(&mut *e, IoRequest::read(id, u64::MAX - 100, AlignedBuf::new(4096), 1)), ErrorKind::OutOfRange);
        assert_eq!(code(&mut *e, IoRequest::read(id, 100, AlignedBuf::new(4096), 1)), ErrorKind::Misaligned);
        assert_eq!(code(&mut *e, IoRequest::read(id, 0, AlignedBuf::new(1000), 1)), ErrorKind::Misaligned);
        assert_eq!(code(&mut *e, IoRequest::read(id, 0, AlignedBuf::new(0), 1)), ErrorKind::InvalidArgument);
        let err = sync(&mut *e, IoRequest::read(id, 512 * 3, AlignedBuf::new(4096), 1)).result;
        if e.device(id).unwrap().logical_block_size() > 512 {
            assert_eq!(err.unwrap_err().kind(), ErrorKind::Misaligned);
        }
        assert_eq!(code(&mut *e, IoRequest::read(DevId(99), 0, AlignedBuf::new(4096), 1)), ErrorKind::Closed);
        let c = sync(&mut *e, IoRequest::read(id, 4096, AlignedBuf::new(4096), 7));
        assert!(c.result.is_ok(), "the engine still works after bad requests");

        let ro = Device::open(&p, &OpenOptions { write: false, exclusive: false, ..Default::default() }).unwrap();
        let rid = e.add_device(Arc::new(ro)).unwrap();
        assert_eq!(code(&mut *e, IoRequest::write(rid, 0, AlignedBuf::new(4096), 1)), ErrorKind::PermissionDenied);

        e.remove_device(id).unwrap();
        assert!(e.device(id).is_none());
        assert_eq!(code(&mut *e, IoRequest::read(id, 0, AlignedBuf::new(4096), 1)), ErrorKind::Closed);
        assert_eq!(e.remove_device(id).unwrap_err().kind(), ErrorKind::Closed);
    }
}

#[test]
fn removing_a_device_lets_its_requests_in_flight_finish() {
    for choice in ENGINES {
        let s = Scratch::new("rm");
        let p = s.file("f", DEV_SIZE, 4);
        let model = pattern(DEV_SIZE, 4);
        let mut e = engine(choice);
        let id = e.add_device(open(&p)).unwrap();
        for i in 0..64u64 {
            e.submit(IoRequest::read(id, i * 65536, AlignedBuf::new(65536), i));
        }
        e.remove_device(id).unwrap();
        e.submit(IoRequest::read(id, 0, AlignedBuf::new(4096), 1000));
        let mut out = Vec::new();
        while out.len() < 65 {
            e.poll(&mut out, None).unwrap();
        }
        out.sort_by_key(|c| c.user_data);
        assert_eq!(out.pop().unwrap().result.unwrap_err().kind(), ErrorKind::Closed);
        for c in out {
            let off = c.offset as usize;
            let buf = c.into_buf().unwrap();
            assert!(buf[..] == model[off..off + 65536]);
        }
        // The exclusive lock went with the last reference.
        Device::open(&p, &OpenOptions::default()).unwrap();
    }
}

#[test]
fn dropping_an_engine_with_requests_in_flight_does_not_hang() {
    for choice in ENGINES {
        let s = Scratch::new("dropinfl");
        let p = s.file("f", DEV_SIZE, 4);
        let mut e = engine(choice);
        let id = e.add_device(open(&p)).unwrap();
        for i in 0..200u64 {
            e.submit(IoRequest::read(id, (i % 64) * 65536, AlignedBuf::new(65536), i));
        }
        let mut out = Vec::new();
        e.poll(&mut out, Some(std::time::Duration::ZERO)).unwrap();
        drop(e);
    }
}

#[test]
fn poll_with_nothing_outstanding_returns() {
    for choice in ENGINES {
        let mut e = engine(choice);
        let mut out = Vec::new();
        assert_eq!(e.poll(&mut out, None).unwrap(), 0);
        let t = std::time::Instant::now();
        assert_eq!(e.poll(&mut out, Some(std::time::Duration::from_millis(20))).unwrap(), 0);
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }
    let p = PsyncEngine::new(3).unwrap();
    assert_eq!(p.threads(), 3);
}
