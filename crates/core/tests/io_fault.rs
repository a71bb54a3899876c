//! The fault engine does what it claims: rules fail the chosen requests, latency delays
//! completions like a slow disk, and a crash loses or tears exactly the writes not yet
//! flushed.

mod io_common;

use io_common::*;
use proptest::prelude::*;
use std::time::{Duration, Instant};
use ubcache_core::io::fault::{CrashMode, FaultEngine, FaultRule, Latency, SeekModel};
use ubcache_core::io::{AlignedBuf, EngineChoice, EngineKind, IoEngine, IoRequest, OpKind};
use ubcache_core::ErrorKind;

const SIZE: usize = 256 << 10;

fn fault_engine(choice: EngineChoice) -> FaultEngine<Box<dyn IoEngine>> {
    FaultEngine::new(engine(choice))
}

#[test]
fn rules_fail_the_chosen_requests() {
    for choice in ENGINES {
        let s = Scratch::new("rules");
        let p = s.file("f", SIZE, 1);
        let mut e = fault_engine(choice);
        assert_eq!(e.kind(), EngineKind::Fault);
        let ctl = e.control();
        let id = e.add_device(open(&p)).unwrap();
        // The 3rd and 4th writes into [64K, 128K) fail; reads there and other writes pass.
        ctl.add_rule(FaultRule::eio().op(OpKind::Write).range(65536, 131072).skip(2).times(2));
        let w = |e: &mut FaultEngine<_>, off: u64| sync(e, IoRequest::write(id, off, AlignedBuf::new(4096), 0)).result;
        assert!(w(&mut e, 65536).is_ok());
        assert!(w(&mut e, 0).is_ok(), "outside the range");
        assert!(w(&mut e, 61440 + 4096).is_ok());
        let err = w(&mut e, 126976).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io);
        assert_eq!(err.code(), "EIO");
        assert!(sync(&mut e, IoRequest::read(id, 65536, AlignedBuf::new(4096), 0)).result.is_ok());
        assert!(w(&mut e, 65536).is_err());
        assert!(w(&mut e, 65536).is_ok(), "the rule retired after two failures");
        assert_eq!(ctl.injected(), 2);

        ctl.add_rule(FaultRule::eio().op(OpKind::Flush).errno(libc::ENOSPC));
        let err = sync(&mut e, IoRequest::flush(id, 0)).result.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoSpace);
        ctl.clear_rules();
        assert!(sync(&mut e, IoRequest::flush(id, 0)).result.is_ok());
        // Bad input is reported as such, not as an injected fault.
        ctl.add_rule(FaultRule::eio());
        let err = sync(&mut e, IoRequest::read(id, SIZE as u64, AlignedBuf::new(4096), 0)).result.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::OutOfRange);
    }
}

#[test]
fn fixed_latency_delays_each_request() {
    let s = Scratch::new("lat");
    let p = s.file("f", SIZE, 1);
    let mut e = fault_engine(EngineChoice::Uring);
    let id = e.add_device(open(&p)).unwrap();
    e.control().set_latency(Some(Latency { fixed: Duration::from_millis(30), ..Default::default() }));
    // In parallel: 8 requests take about one latency, not eight.
    let t = Instant::now();
    let reqs = (0..8).map(|i| IoRequest::read(id, i * 4096, AlignedBuf::new(4096), i)).collect();
    run_all(&mut e, reqs);
    let el = t.elapsed();
    // Serially they would take 240 ms; anything below shows they overlapped.
    assert!(el >= Duration::from_millis(30) && el < Duration::from_millis(8 * 30), "{el:?}");
    // Serial (one disk arm): 8 requests take eight latencies.
    e.control().set_latency(Some(Latency { fixed: Duration::from_millis(10), serial: true, ..Default::default() }));
    let t = Instant::now();
    let reqs = (0..8).map(|i| IoRequest::read(id, i * 4096, AlignedBuf::new(4096), i)).collect();
    run_all(&mut e, reqs);
    assert!(t.elapsed() >= Duration::from_millis(80), "{:?}", t.elapsed());
}

#[test]
fn transfer_rate_and_seeks_cost_time() {
    let s = Scratch::new("seek");
    let p = s.file("f", SIZE, 1);
    let mut e = fault_engine(EngineChoice::Psync);
    let id = e.add_device(open(&p)).unwrap();
    // 4 MB/s: 64 KiB costs ~16 ms.
    e.control().set_latency(Some(Latency { bytes_per_sec: 4_000_000, serial: true, ..Default::default() }));
    let t = Instant::now();
    sync(&mut e, IoRequest::read(id, 0, AlignedBuf::new(65536), 0));
    assert!(t.elapsed() >= Duration::from_millis(16), "{:?}", t.elapsed());

    let seek = SeekModel { track_to_track: Duration::from_millis(2), full_stroke: Duration::from_millis(20) };
    e.control().set_latency(Some(Latency { seek: Some(seek), serial: true, ..Default::default() }));
    let timed = |e: &mut FaultEngine<_>, offs: &[u64]| {
        let t = Instant::now();
        for &o in offs {
            sync(e, IoRequest::read(id, o, AlignedBuf::new(4096), 0));
        }
        t.elapsed()
    };
    timed(&mut e, &[0]);
    let sequential = timed(&mut e, &[4096, 8192, 12288, 16384]);
    let far = timed(&mut e, &[(SIZE - 4096) as u64, 0, (SIZE - 4096) as u64, 0]);
    assert!(far >= Duration::from_millis(4 * 19), "full-stroke seeks: {far:?}");
    // Lower bounds are exact (the model sleeps at least that long); an upper bound in wall
    // time is not, on a loaded machine, so sequential reads are compared with seeking ones.
    assert!(sequential * 4 < far, "sequential reads do not seek: {sequential:?} vs {far:?} for full strokes");
}

#[test]
fn crash_drops_exactly_the_unflushed_writes() {
    for choice in ENGINES {
        let s = Scratch::new("crash");
        let p = s.file("f", SIZE, 0);
        let mut e = fault_engine(choice);
        let ctl = e.control();
        ctl.set_volatile(true);
        let id = e.add_device(open(&p)).unwrap();
        write(&mut e, id, 0, &[1u8; 8192]);
        flush(&mut e, id);
        write(&mut e, id, 4096, &[2u8; 8192]);
        write(&mut e, id, 65536, &[3u8; 4096]);
        assert_eq!(ctl.unflushed_writes(), 2);
        let before = pattern(SIZE, 0);
        let r = e.crash(CrashMode::DropUnflushed).unwrap();
        assert_eq!(r.unflushed_writes, 2);
        assert_eq!(r.sectors_kept, 0);
        let now = read(&mut e, id, 0, SIZE);
        assert!(now[..8192].iter().all(|&b| b == 1), "flushed data survives");
        assert!(now[8192..] == before[8192..], "unflushed writes are gone");
        // After the crash the device works as a reopened one.
        write(&mut e, id, 65536, &[4u8; 4096]);
        flush(&mut e, id);
        e.crash(CrashMode::DropUnflushed).unwrap();
        assert!(read(&mut e, id, 65536, 4096).iter().all(|&b| b == 4));
    }
}

#[test]
fn crash_through_the_control_with_an_engine_thread() {
    use std::sync::{mpsc, Arc};
    let s = Scratch::new("crashthr");
    let p = s.file("f", SIZE, 0);
    let e = fault_engine(EngineChoice::Uring);
    let ctl = e.control();
    ctl.set_volatile(true);
    ctl.set_latency(Some(Latency { fixed: Duration::from_millis(20), ..Default::default() }));
    let (tx, rx) = mpsc::channel();
    let t = ubcache_core::io::IoThread::spawn(
        e,
        Box::new(move |batch| {
            for c in batch {
                let _ = tx.send(c);
            }
        }),
    )
    .unwrap();
    let id = t.add_device(Arc::new(ubcache_core::io::Device::open(&p, &Default::default()).unwrap())).unwrap();
    t.submit(IoRequest::write(id, 0, AlignedBuf::from_slice(&[9u8; 4096]), 1)).unwrap();
    assert!(rx.recv().unwrap().result.is_ok());
    t.submit(IoRequest::flush(id, 2)).unwrap();
    assert!(rx.recv().unwrap().result.is_ok());
    // Writes still in flight when the power goes fail, and their data is lost.
    for i in 0..4u64 {
        t.submit(IoRequest::write(id, 8192 + i * 4096, AlignedBuf::from_slice(&[7u8; 4096]), 10 + i)).unwrap();
    }
    // The crash must come after the engine thread has taken all four writes.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ctl.unflushed_writes() < 4 {
        assert!(std::time::Instant::now() < deadline, "the engine thread never took the writes");
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = ctl.crash(CrashMode::DropUnflushed).unwrap();
    assert_eq!(r.unflushed_writes, 4);
    for _ in 0..4 {
        let c = rx.recv().unwrap();
        assert_eq!(c.result.unwrap_err().kind(), ErrorKind::Io);
    }
    t.close();
    let data = std::fs::read(&p).unwrap();
    assert!(data[..4096].iter().all(|&b| b == 9));
    assert!(data[8192..8192 + 16384] == pattern(SIZE, 0)[8192..8192 + 16384]);
}

#[derive(Debug, Clone)]
enum Step {
    Write { blk: usize, nblk: usize, val: u8 },
    Flush,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let blocks = SIZE / 4096;
    proptest::collection::vec(
        prop_oneof![
            4 => (0..blocks - 4, 1usize..=4, 1u8..=255).prop_map(|(blk, nblk, val)| Step::Write { blk, nblk, val }),
            1 => Just(Step::Flush),
        ],
        1..24,
    )
}

/// Runs the steps, crashes, and checks every 512-byte sector against a model: it must hold
/// the durable value, or (tearing) a value some unflushed write put there.
fn crash_model(choice: EngineChoice, steps: &[Step], mode: CrashMode) -> Result<(), TestCaseError> {
    let s = Scratch::new("crashprop");
    let p = s.file("f", SIZE, 0);
    let mut e = fault_engine(choice);
    e.control().set_volatile(true);
    let id = e.add_device(open(&p)).unwrap();
    let sectors = SIZE / 512;
    let mut durable: Vec<u8> = vec![0; sectors]; // 0 stands for "original pattern"
    let mut current = durable.clone();
    let mut pending: Vec<Vec<u8>> = vec![Vec::new(); sectors];
    for st in steps {
        match *st {
            Step::Write { blk, nblk, val } => {
                write(&mut e, id, (blk * 4096) as u64, &vec![val; nblk * 4096]);
                for sec in blk * 8..(blk + nblk) * 8 {
                    current[sec] = val;
                    pending[sec].push(val);
                }
            }
            Step::Flush => {
                flush(&mut e, id);
                durable.clone_from(&current);
                pending.iter_mut().for_each(Vec::clear);
            }
        }
    }
    let r = e.crash(mode).unwrap();
    let data = read(&mut e, id, 0, SIZE);
    let orig = pattern(SIZE, 0);
    let mut kept = 0u64;
    for sec in 0..sectors {
        let got = &data[sec * 512..(sec + 1) * 512];
        let is = |v: u8| if v == 0 { got == &orig[sec * 512..(sec + 1) * 512] } else { got.iter().all(|&b| b == v) };
        match mode {
            CrashMode::DropUnflushed => prop_assert!(is(durable[sec]), "sector {sec}"),
            CrashMode::TearUnflushed { .. } => {
                let ok = is(durable[sec]) || pending[sec].iter().any(|&v| is(v));
                prop_assert!(ok, "sector {sec} holds neither its durable value nor an unflushed write");
                if !is(durable[sec]) {
                    kept += 1;
                }
            }
        }
    }
    prop_assert!(kept <= r.sectors_kept);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn crash_drop_matches_model(steps in steps(), uring in any::<bool>()) {
        let choice = if uring { EngineChoice::Uring } else { EngineChoice::Psync };
        crash_model(choice, &steps, CrashMode::DropUnflushed)?;
    }

    #[test]
    fn crash_tear_matches_model(steps in steps(), seed in any::<u64>(), uring in any::<bool>()) {
        let choice = if uring { EngineChoice::Uring } else { EngineChoice::Psync };
        crash_model(choice, &steps, CrashMode::TearUnflushed { seed })?;
    }
}

#[test]
fn tearing_keeps_some_sectors_and_reverts_others() {
    let s = Scratch::new("tear");
    let p = s.file("f", SIZE, 0);
    let mut e = fault_engine(EngineChoice::Uring);
    e.control().set_volatile(true);
    let id = e.add_device(open(&p)).unwrap();
    write(&mut e, id, 0, &vec![5u8; 128 << 10]);
    let r = e.crash(CrashMode::TearUnflushed { seed: 42 }).unwrap();
    assert_eq!(r.sectors_kept + r.sectors_reverted, 256);
    assert!(r.sectors_kept > 64 && r.sectors_reverted > 64, "{r:?}");
    let data = read(&mut e, id, 0, 128 << 10);
    let kept = data.chunks(512).filter(|c| c.iter().all(|&b| b == 5)).count() as u64;
    assert_eq!(kept, r.sectors_kept);
}

/// Waits until `fd` is readable, up to `ms`; true if it became readable.
fn readable(fd: std::os::fd::RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

#[test]
fn an_event_loop_is_woken_when_held_back_completions_fall_due() {
    use ubcache_core::io::RingDriver;
    for choice in ENGINES {
        let s = Scratch::new("lat-fd");
        let p = s.file("f", SIZE, 1);
        let slow = s.file("slow", SIZE, 2);
        let e = fault_engine(choice);
        let ctl = e.control();
        ctl.set_latency(Some(Latency { fixed: Duration::from_millis(40), ..Default::default() }));
        ctl.add_latency_path(&slow);
        let mut d = RingDriver::new(Box::new(e)).unwrap();
        let fast = d.add_device(open(&p)).unwrap();
        let slow_id = d.add_device(open(&slow)).unwrap();
        let t = Instant::now();
        let mut got = d.submit_batch([IoRequest::read(slow_id, 0, AlignedBuf::new(4096), 1)]).unwrap();
        got.extend(d.submit_batch([IoRequest::read(fast, 0, AlignedBuf::new(4096), 2)]).unwrap());
        // The fast device's read completes at once; the slow one's only once its 40 ms are up,
        // and the descriptor says so without anyone polling the engine meanwhile.
        while !got.iter().any(|c| c.user_data == 2) {
            assert!(readable(d.fd(), 5000), "{choice:?}: no wakeup for the fast read");
            got.extend(d.reap().unwrap());
        }
        assert!(t.elapsed() < Duration::from_millis(40), "{choice:?}: the fast device was slowed");
        while !got.iter().any(|c| c.user_data == 1) {
            assert!(readable(d.fd(), 5000), "{choice:?}: no wakeup for the held-back read");
            got.extend(d.reap().unwrap());
        }
        assert!(t.elapsed() >= Duration::from_millis(40), "{choice:?}: {:?}", t.elapsed());
        assert!(got.iter().all(|c| c.result.is_ok()));
        // Idle again: the descriptor stays quiet.
        assert!(!readable(d.fd(), 60), "{choice:?}: a spurious wakeup with nothing in flight");
        // An injected error completes at submission and wakes the loop too.
        ctl.add_rule(FaultRule::eio().times(1));
        let mut got = d.submit_batch([IoRequest::read(fast, 0, AlignedBuf::new(4096), 3)]).unwrap();
        while got.is_empty() {
            assert!(readable(d.fd(), 5000), "{choice:?}: no wakeup for the injected error");
            got.extend(d.reap().unwrap());
        }
        assert!(got[0].result.is_err());
    }
}
