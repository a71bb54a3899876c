//! The engine thread: requests from many threads, completions in batches, closing with
//! requests in flight.

mod io_common;

use io_common::*;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use ubcache_core::io::fault::{FaultEngine, Latency};
use ubcache_core::io::{AlignedBuf, EngineChoice, EngineKind, IoCompletion, IoRequest, IoThread};
use ubcache_core::ErrorKind;

const SIZE: usize = 4 << 20;

fn spawn(choice: EngineChoice) -> (IoThread, mpsc::Receiver<Vec<IoCompletion>>) {
    let (tx, rx) = mpsc::channel();
    let t = IoThread::spawn(
        engine(choice),
        Box::new(move |batch| {
            let _ = tx.send(batch);
        }),
    )
    .unwrap();
    (t, rx)
}

#[test]
fn many_submitters_get_every_completion_once_in_batches() {
    for choice in ENGINES {
        let s = Scratch::new("thr");
        let p = s.file("f", SIZE, 6);
        let model = Arc::new(pattern(SIZE, 6));
        let (t, rx) = spawn(choice);
        assert_eq!(t.kind(), if choice == EngineChoice::Uring { EngineKind::Uring } else { EngineKind::Psync });
        let t = Arc::new(t);
        let id = t.add_device(open(&p)).unwrap();
        let per = 500u64;
        let hs: Vec<_> = (0..4u64)
            .map(|k| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..per {
                        let tag = k * per + i;
                        t.submit(IoRequest::read(id, (tag * 7 % 1024) * 4096, AlignedBuf::new(4096), tag)).unwrap();
                    }
                })
            })
            .collect();
        hs.into_iter().for_each(|h| h.join().unwrap());
        let mut seen = vec![false; 4 * per as usize];
        let mut got = 0;
        while got < seen.len() {
            for c in rx.recv_timeout(Duration::from_secs(20)).expect("completions keep coming") {
                assert!(!std::mem::replace(&mut seen[c.user_data as usize], true), "completed twice");
                let off = c.offset as usize;
                assert!(c.into_buf().unwrap()[..] == model[off..off + 4096]);
                got += 1;
            }
        }
        let st = t.stats();
        assert!(st.batches >= 1 && st.batches <= got, "{st:?}");
        // A batch submission is one enqueue.
        let reqs = (0..64).map(|i| IoRequest::read(id, i * 4096, AlignedBuf::new(4096), i)).collect();
        t.submit_batch(reqs).unwrap();
        let mut n = 0;
        while n < 64 {
            n += rx.recv_timeout(Duration::from_secs(20)).unwrap().len();
        }
        t.close();
    }
}

#[test]
fn close_completes_requests_in_flight_and_then_refuses() {
    for choice in ENGINES {
        let s = Scratch::new("close");
        let p = s.file("f", SIZE, 2);
        let e = FaultEngine::new(engine(choice));
        // A slow disk keeps the requests in flight while we close.
        e.control().set_latency(Some(Latency { fixed: Duration::from_millis(5), serial: true, ..Default::default() }));
        let (tx, rx) = mpsc::channel();
        let t = IoThread::spawn(
            e,
            Box::new(move |b| {
                let _ = tx.send(b);
            }),
        )
        .unwrap();
        let id = t.add_device(open(&p)).unwrap();
        for i in 0..40u64 {
            t.submit(IoRequest::read(id, i * 4096, AlignedBuf::new(4096), i)).unwrap();
        }
        let start = Instant::now();
        t.close();
        assert!(start.elapsed() >= Duration::from_millis(100), "close waited for the slow requests");
        let done: Vec<IoCompletion> = rx.try_iter().flatten().collect();
        assert_eq!(done.len(), 40);
        assert!(done.iter().all(|c| c.result.is_ok()));
        assert!(t.is_closed());
        let rej = t.submit(IoRequest::read(id, 0, AlignedBuf::new(4096), 99)).unwrap_err();
        assert_eq!(rej.error.kind(), ErrorKind::Closed);
        assert_eq!(rej.request.user_data, 99);
        assert_eq!(t.submit_batch(vec![IoRequest::flush(id, 1)]).unwrap_err().len(), 1);
        assert_eq!(t.add_device(open(&s.file("g", 4096, 0))).unwrap_err().kind(), ErrorKind::Closed);
        t.close();
    }
}

#[test]
fn devices_come_and_go_through_the_thread() {
    let s = Scratch::new("devs");
    let a = s.file("a", 65536, 1);
    let b = s.file("b", 65536, 2);
    let (t, rx) = spawn(EngineChoice::Uring);
    let ia = t.add_device(open(&a)).unwrap();
    let ib = t.add_device(open(&b)).unwrap();
    assert_ne!(ia, ib);
    t.submit(IoRequest::write(ib, 4096, AlignedBuf::from_slice(&[8u8; 4096]), 1)).unwrap();
    t.submit(IoRequest::flush(ib, 2)).unwrap();
    let mut n = 0;
    while n < 2 {
        for c in rx.recv().unwrap() {
            c.result.unwrap();
            n += 1;
        }
    }
    t.remove_device(ia).unwrap();
    assert_eq!(t.remove_device(ia).unwrap_err().kind(), ErrorKind::Closed);
    t.submit(IoRequest::read(ia, 0, AlignedBuf::new(4096), 3)).unwrap();
    let c = rx.recv().unwrap().pop().unwrap();
    assert_eq!(c.result.unwrap_err().kind(), ErrorKind::Closed);
    let in_flight = t.with_engine(|e| e.in_flight()).unwrap();
    assert_eq!(in_flight, 0);
    drop(t);
    assert!(std::fs::read(&b).unwrap()[4096..8192].iter().all(|&x| x == 8));
}

#[test]
fn an_idle_thread_sleeps_and_wakes_for_new_work() {
    let s = Scratch::new("idle");
    let p = s.file("f", 65536, 3);
    let (t, rx) = spawn(EngineChoice::Uring);
    let id = t.add_device(open(&p)).unwrap();
    for round in 0..20u64 {
        std::thread::sleep(Duration::from_millis(2));
        t.submit(IoRequest::read(id, 0, AlignedBuf::new(4096), round)).unwrap();
        let c = rx.recv_timeout(Duration::from_secs(10)).expect("the doorbell wakes the engine").pop().unwrap();
        assert_eq!(c.user_data, round);
    }
    assert!(t.stats().wakeups >= 1);
}

#[test]
fn a_spinning_thread_catches_requests_without_the_doorbell() {
    let s = Scratch::new("spin");
    let p = s.file("f", 65536, 4);
    let (tx, rx) = mpsc::channel();
    let opts = ubcache_core::io::IoThreadOptions { spin: Duration::from_millis(20) };
    let t = IoThread::spawn_with(
        engine(EngineChoice::Psync),
        Box::new(move |b| {
            let _ = tx.send(b);
        }),
        opts,
    )
    .unwrap();
    let id = t.add_device(open(&p)).unwrap();
    let model = pattern(65536, 4);
    for round in 0..50u64 {
        // Submitted right after the previous completion: inside the spin window.
        t.submit(IoRequest::read(id, (round % 16) * 4096, AlignedBuf::new(4096), round)).unwrap();
        let c = rx.recv_timeout(Duration::from_secs(10)).unwrap().pop().unwrap();
        let off = c.offset as usize;
        assert!(c.into_buf().unwrap()[..] == model[off..off + 4096]);
    }
    assert!(t.stats().wakeups < 50, "most requests were caught while spinning: {:?}", t.stats());
    t.close();
}

#[test]
fn stop_accepting_refuses_at_once_and_close_still_finishes() {
    let s = Scratch::new("stop");
    let p = s.file("f", 65536, 5);
    let (t, rx) = spawn(EngineChoice::Uring);
    let id = t.add_device(open(&p)).unwrap();
    for i in 0..8u64 {
        t.submit(IoRequest::read(id, i * 4096, AlignedBuf::new(4096), i)).unwrap();
    }
    t.stop_accepting();
    assert!(t.is_closed());
    assert_eq!(t.submit(IoRequest::flush(id, 99)).unwrap_err().error.kind(), ErrorKind::Closed);
    t.close();
    let n: usize = rx.try_iter().map(|b| b.len()).sum();
    assert_eq!(n, 8, "requests accepted before stop_accepting all completed");
}
