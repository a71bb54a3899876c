//! The portable engine's thread pool under load: deep queues complete every request exactly
//! once with the right data whichever way it is polled, batched wakeups never strand a
//! completion, and closing with work queued neither hangs nor loses the engine's workers.

mod io_common;

use io_common::*;
use std::collections::HashSet;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ubcache_core::io::psync::PsyncEngine;
use ubcache_core::io::{AlignedBuf, DevId, EventFd, IoCompletion, IoEngine, IoRequest};

const DEV_SIZE: usize = 4 << 20;

/// A read of 4 to 64 KiB at a 4 KiB-aligned offset, or (one in 16) a read past the end that
/// must fail on its own.
fn request(rng: &mut Rng, id: DevId, tag: u64) -> IoRequest {
    if rng.next().is_multiple_of(16) {
        return IoRequest::read(id, DEV_SIZE as u64, AlignedBuf::new(4096), tag);
    }
    let len = 4096 * (1 + rng.next() % 16) as usize;
    let off = (rng.next() % ((DEV_SIZE - len) as u64 / 4096)) * 4096;
    IoRequest::read(id, off, AlignedBuf::new(len), tag)
}

fn check(c: IoCompletion, model: &[u8], seen: &mut HashSet<u64>) {
    assert!(seen.insert(c.user_data), "request {} completed twice", c.user_data);
    if c.offset >= DEV_SIZE as u64 {
        assert!(c.result.is_err(), "read past the end succeeded");
        return;
    }
    let off = c.offset as usize;
    let len = *c.result.as_ref().unwrap() as usize;
    let buf = c.into_buf().unwrap();
    assert_eq!(len, buf.len());
    assert!(buf[..] == model[off..off + len], "wrong data at {off}");
}

/// Keeps `qd` requests in flight until `total` have completed, polling in turn with no
/// limit, without waiting, and with a short timeout.
fn closed_loop(e: &mut PsyncEngine, id: DevId, model: &[u8], qd: u64, total: u64) {
    let mut rng = Rng(0x5eed_1234_abcd_0001 ^ qd);
    let mut seen = HashSet::new();
    let mut next = 0u64;
    while next < qd.min(total) {
        e.submit(request(&mut rng, id, next));
        next += 1;
    }
    let mut out = Vec::new();
    let mut round = 0u32;
    while (seen.len() as u64) < total {
        let timeout = match round % 3 {
            0 => None,
            1 => Some(Duration::ZERO),
            _ => Some(Duration::from_millis(1)),
        };
        round += 1;
        e.poll(&mut out, timeout).unwrap();
        for c in out.drain(..) {
            check(c, model, &mut seen);
            if next < total {
                e.submit(request(&mut rng, id, next));
                next += 1;
            }
        }
    }
    assert_eq!(seen.len() as u64, total);
    assert_eq!(e.in_flight(), 0);
    // Nothing is left over for a later poll.
    assert_eq!(e.poll(&mut out, Some(Duration::from_millis(5))).unwrap(), 0);
}

#[test]
fn deep_queues_complete_every_request_exactly_once() {
    let s = Scratch::new("psync-deep");
    let p = s.file("f", DEV_SIZE, 9);
    let model = pattern(DEV_SIZE, 9);
    for threads in [1, 2, 4, 7] {
        let mut e = PsyncEngine::new(threads).unwrap();
        let id = e.add_device(open(&p)).unwrap();
        for qd in [1, threads as u64, 3 * threads as u64 + 1, 64] {
            closed_loop(&mut e, id, &model, qd, 1500);
        }
    }
}

#[test]
fn writes_under_load_land_and_read_back() {
    let s = Scratch::new("psync-write");
    let p = s.file("f", DEV_SIZE, 0);
    let mut e = PsyncEngine::new(4).unwrap();
    let id = e.add_device(open(&p)).unwrap();
    let data = pattern(DEV_SIZE, 0x5a);
    // Every 16 KiB block written once, 256 requests queued at once.
    let blocks = DEV_SIZE / 16384;
    for b in 0..blocks {
        let o = b * 16384;
        e.submit(IoRequest::write(id, o as u64, AlignedBuf::from_slice(&data[o..o + 16384]), b as u64));
    }
    let mut out = Vec::new();
    while out.len() < blocks {
        e.poll(&mut out, None).unwrap();
    }
    let tags: HashSet<u64> = out.iter().map(|c| c.user_data).collect();
    assert_eq!(tags.len(), blocks);
    assert!(out.iter().all(|c| c.result.as_ref().is_ok_and(|&n| n == 16384)));
    flush(&mut e, id);
    assert!(read(&mut e, id, 0, DEV_SIZE) == data);
}

#[test]
fn a_timed_poll_returns_while_the_queue_is_deep() {
    let s = Scratch::new("psync-timed");
    let p = s.file("f", DEV_SIZE, 3);
    let mut e = PsyncEngine::new(1).unwrap();
    let id = e.add_device(open(&p)).unwrap();
    for i in 0..256u64 {
        e.submit(IoRequest::read(id, (i % 64) * 65536, AlignedBuf::new(65536), i));
    }
    let mut out = Vec::new();
    let t = Instant::now();
    e.poll(&mut out, Some(Duration::from_millis(2))).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "timed poll took {:?}", t.elapsed());
    while out.len() < 256 {
        e.poll(&mut out, None).unwrap();
    }
    assert_eq!(e.in_flight(), 0);
}

#[test]
fn the_waker_ends_a_blocked_poll_and_completions_still_arrive() {
    let s = Scratch::new("psync-waker");
    let p = s.file("f", DEV_SIZE, 5);
    let model = pattern(DEV_SIZE, 5);
    let mut e = PsyncEngine::new(2).unwrap();
    let waker = Arc::new(EventFd::new().unwrap());
    e.set_waker(waker.clone()).unwrap();
    let id = e.add_device(open(&p)).unwrap();
    // Nothing in flight: only the waker can end this poll.
    let w = waker.clone();
    let ringer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        w.notify();
    });
    let mut out = Vec::new();
    assert_eq!(e.poll(&mut out, None).unwrap(), 0);
    ringer.join().unwrap();
    closed_loop(&mut e, id, &model, 48, 1000);
}

fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one live pollfd.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) > 0 }
}

#[test]
fn in_event_loop_mode_the_descriptor_announces_every_batch() {
    let s = Scratch::new("psync-evloop");
    let p = s.file("f", DEV_SIZE, 6);
    let model = pattern(DEV_SIZE, 6);
    let mut e = PsyncEngine::new(4).unwrap();
    let id = e.add_device(open(&p)).unwrap();
    let fd = e.completion_fd().unwrap();
    let mut rng = Rng(77);
    let total = 2000u64;
    let mut next = 0u64;
    while next < 64 {
        e.submit(request(&mut rng, id, next));
        next += 1;
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    while (seen.len() as u64) < total {
        // As an event loop does: sleep on the descriptor, then take what is there.
        assert!(wait_readable(fd, Duration::from_secs(10)), "completion descriptor never turned readable");
        e.poll(&mut out, Some(Duration::ZERO)).unwrap();
        for c in out.drain(..) {
            check(c, &model, &mut seen);
            if next < total {
                e.submit(request(&mut rng, id, next));
                next += 1;
            }
        }
    }
    assert_eq!(e.in_flight(), 0);
}

#[test]
fn closing_with_a_deep_queue_finishes_the_queued_work() {
    let s = Scratch::new("psync-close");
    let p = s.file("f", DEV_SIZE, 8);
    for threads in [1, 4] {
        let mut e = PsyncEngine::new(threads).unwrap();
        let dev = open(&p);
        let id = e.add_device(dev.clone()).unwrap();
        for i in 0..300u64 {
            e.submit(IoRequest::read(id, (i % 64) * 65536, AlignedBuf::new(65536), i));
        }
        // Take a few, then close with the rest queued or running.
        let mut out = Vec::new();
        e.poll(&mut out, None).unwrap();
        e.remove_device(id).unwrap();
        let t = Instant::now();
        drop(e);
        assert!(t.elapsed() < Duration::from_secs(30));
        // The workers let go of every reference to the device they held.
        assert_eq!(Arc::strong_count(&dev), 1);
    }
}
