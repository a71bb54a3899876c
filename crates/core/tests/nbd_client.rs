//! The NBD client against real servers (Debian's nbdkit) and a hostile one: requests of
//! every kind through the engines, a server killed and restarted under a write workload
//! with flushes, timeouts while it is away, injected errors, and protocol violations.

mod io_common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_common::*;
use ubcache_core::io::{
    open_engine, AlignedBuf, DevId, Device, EngineChoice, EngineOptions, IoCompletion, IoEngine, IoRequest,
    OpenOptions, RingDriver,
};
use ubcache_core::nbd::{NbdOptions, NbdUri};
use ubcache_core::ErrorKind;

/// True when nbdkit is installed; under CI its absence is a failure, not a skip.
fn have_nbdkit() -> bool {
    let ok = Command::new("nbdkit").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok && std::env::var_os("CI").is_some() {
        panic!("nbdkit is not installed (apt-get install nbdkit)");
    }
    if !ok {
        eprintln!("skipped: nbdkit is not installed");
    }
    ok
}

/// An nbdkit serving on a Unix socket, killed on drop.
struct Server {
    child: Child,
    sock: PathBuf,
    args: Vec<String>,
}

impl Server {
    fn start(sock: &Path, args: &[&str]) -> Server {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let child = spawn(sock, &args);
        Server { child, sock: sock.to_path_buf(), args }
    }
    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
    fn restart(&mut self) {
        self.kill();
        self.child = spawn(&self.sock, &self.args);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(sock: &Path, args: &[String]) -> Child {
    let _ = std::fs::remove_file(sock);
    let child = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(sock)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nbdkit");
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "nbdkit did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn engine(choice: EngineChoice) -> Box<dyn IoEngine> {
    open_engine(&EngineOptions { choice, ..Default::default() }).unwrap()
}

/// Drives the engine until `n` requests completed.
fn completions(e: &mut dyn IoEngine, n: usize) -> Vec<IoCompletion> {
    let mut out = Vec::new();
    while out.len() < n {
        e.poll(&mut out, Some(Duration::from_secs(1))).unwrap();
    }
    out
}

/// Submits all, drives the engine until every one completed; completions in tag order.
fn run_all(e: &mut dyn IoEngine, reqs: Vec<IoRequest>) -> Vec<IoCompletion> {
    let n = reqs.len();
    for r in reqs {
        e.submit(r);
    }
    let mut out = completions(e, n);
    out.sort_by_key(|c| c.user_data);
    out
}

/// The first `mib` MiB of device `id` read back through the client as `model` holds them,
/// and the served file holds `model` whole.
fn assert_reads_back(e: &mut dyn IoEngine, id: DevId, mib: u64, model: &[u8], img: &Path) {
    let reads: Vec<IoRequest> = (0..mib).map(|i| IoRequest::read(id, i << 20, AlignedBuf::new(1 << 20), i)).collect();
    for c in run_all(e, reads) {
        let off = c.offset as usize;
        assert!(c.into_buf().unwrap()[..] == model[off..off + (1 << 20)]);
    }
    assert!(std::fs::read(img).unwrap() == model);
}

fn remote(uri: &str, nbd: NbdOptions) -> Arc<Device> {
    Arc::new(Device::open_remote(&NbdUri::parse(uri).unwrap(), &OpenOptions::default(), nbd).unwrap())
}

/// `n` writes of 4 KiB to distinct blocks below `blocks`, applied to `model`; tags from
/// `tag`. (Writes in flight together to one block may land in any order, on one
/// connection as on several.)
fn distinct_writes(rng: &mut Rng, n: usize, blocks: u64, id: DevId, model: &mut [u8], tag: &mut u64) -> Vec<IoRequest> {
    let mut seen = std::collections::HashSet::new();
    let mut reqs = Vec::new();
    while reqs.len() < n {
        let off = rng.below(blocks) * 4096;
        if !seen.insert(off) {
            continue;
        }
        let data = pattern(4096, rng.next() as u8);
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
        *tag += 1;
        reqs.push(IoRequest::write(id, off, AlignedBuf::from_slice(&data), *tag));
    }
    reqs
}

#[test]
fn reads_writes_flushes_and_trims_through_every_engine() {
    if !have_nbdkit() {
        return;
    }
    let s = Scratch::new("nbd-rw");
    let srv = Server::start(&s.0.join("sock"), &["memory", "16M"]);
    for choice in ENGINES {
        let mut e = engine(choice);
        let dev = Arc::new(Device::open(srv.uri(), &OpenOptions::default()).unwrap());
        assert_eq!(dev.size(), 16 << 20);
        assert!(dev.remote().is_some());
        let id = e.add_device(dev.clone()).unwrap();
        // 64 writes in flight at once, of different sizes, then read back in one batch.
        let mut rng = Rng(7);
        let mut model = vec![0u8; 16 << 20];
        let writes: Vec<IoRequest> = (0..64u64)
            .map(|i| {
                let len = 4096 * (1 + rng.below(16) as usize);
                let off = i * (128 << 10);
                let data = pattern(len, i as u8 + choice as u8);
                model[off as usize..off as usize + len].copy_from_slice(&data);
                IoRequest { fua: i % 8 == 0, ..IoRequest::write(id, off, AlignedBuf::from_slice(&data), i) }
            })
            .collect();
        assert!(run_all(e.as_mut(), writes).iter().all(|c| c.result.is_ok()));
        assert!(run_all(e.as_mut(), vec![IoRequest::flush(id, 0)])[0].result.is_ok());
        let reads: Vec<IoRequest> =
            (0..64u64).map(|i| IoRequest::read(id, i * (128 << 10), AlignedBuf::new(128 << 10), i)).collect();
        for c in run_all(e.as_mut(), reads) {
            let off = c.offset as usize;
            assert_eq!(&c.into_buf().unwrap()[..], &model[off..off + (128 << 10)], "{choice:?}");
        }
        // A trim reads back as zeros (nbdkit memory), a readv lands in its buffers in order.
        assert!(run_all(e.as_mut(), vec![IoRequest::discard(id, 0, 128 << 10, 0)])[0].result.is_ok());
        let v = run_all(
            e.as_mut(),
            vec![IoRequest {
                dev: id,
                offset: 0,
                op: ubcache_core::io::IoOp::Readv { bufs: vec![AlignedBuf::new(4096), AlignedBuf::new(8192)] },
                user_data: 1,
                fua: false,
            }],
        );
        assert!(v[0].result.is_ok());
        // Bad input is refused before it reaches the server.
        let bad = run_all(e.as_mut(), vec![IoRequest::read(id, 16 << 20, AlignedBuf::new(4096), 2)]);
        assert_eq!(bad[0].result.as_ref().unwrap_err().kind(), ErrorKind::OutOfRange);
        let bad = run_all(e.as_mut(), vec![IoRequest::read(id, 100, AlignedBuf::new(4096), 3)]);
        assert_eq!(bad[0].result.as_ref().unwrap_err().kind(), ErrorKind::Misaligned);
        assert_eq!(e.in_flight(), 0);
        // The synchronous path (superblock reads, tools) goes through the same client.
        let mut b = vec![0u8; 4096];
        dev.read_at(&mut b, 128 << 10).unwrap();
        assert_eq!(&b[..], &model[128 << 10..(128 << 10) + 4096]);
        e.remove_device(id).unwrap();
    }
}

#[test]
fn an_event_loop_hears_of_remote_completions() {
    if !have_nbdkit() {
        return;
    }
    let s = Scratch::new("nbd-loop");
    let srv = Server::start(&s.0.join("sock"), &["--filter=delay", "memory", "8M", "delay-read=30ms"]);
    let mut d = RingDriver::new(engine(EngineChoice::Auto)).unwrap();
    let local = d.add_device(open(&s.file("f", 1 << 20, 1))).unwrap();
    let id = d.add_device(remote(&srv.uri(), NbdOptions::default())).unwrap();
    let mut got = d.submit_batch([IoRequest::read(id, 0, AlignedBuf::new(4096), 1)]).unwrap();
    got.extend(d.submit_batch([IoRequest::read(local, 0, AlignedBuf::new(4096), 2)]).unwrap());
    let t = Instant::now();
    while got.len() < 2 {
        let mut p = libc::pollfd { fd: d.fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        assert!(unsafe { libc::poll(&mut p, 1, 5000) } > 0, "no wakeup");
        got.extend(d.reap().unwrap());
    }
    assert!(got.iter().all(|c| c.result.is_ok()));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(d.in_flight(), 0);
}

#[test]
fn a_killed_server_is_reconnected_and_nothing_acknowledged_is_lost() {
    if !have_nbdkit() {
        return;
    }
    let s = Scratch::new("nbd-kill");
    let img = s.file("img", 8 << 20, 0);
    let mut srv = Server::start(&s.0.join("sock"), &["file", img.to_str().unwrap()]);
    let dev = remote(&srv.uri(), NbdOptions { request_timeout: Duration::from_secs(20), ..Default::default() });
    let client = dev.remote().unwrap().clone();
    let mut e = engine(EngineChoice::Auto);
    let id = e.add_device(dev).unwrap();
    let mut model = std::fs::read(&img).unwrap();
    let mut rng = Rng(99);
    let mut tag = 0u64;
    for round in 0..6 {
        // Writes and a flush in flight when the server dies: they complete once it is back.
        let mut reqs = distinct_writes(&mut rng, 32, 2048, id, &mut model, &mut tag);
        tag += 1;
        reqs.push(IoRequest::flush(id, tag));
        for r in reqs {
            e.submit(r);
        }
        if round % 2 == 1 {
            srv.kill();
            std::thread::sleep(Duration::from_millis(200));
            srv.restart();
        }
        for c in &completions(e.as_mut(), 33) {
            assert!(c.result.is_ok(), "round {round}: {:?}", c.result);
        }
    }
    assert!(client.stats().reconnects >= 3, "{:?}", client.stats());
    // Every acknowledged write reads back, through the client and in the file itself.
    assert_reads_back(e.as_mut(), id, 8, &model, &img);
}

#[test]
fn while_the_server_is_away_requests_wait_then_fail_with_a_timeout_naming_it() {
    if !have_nbdkit() {
        return;
    }
    let s = Scratch::new("nbd-away");
    let mut srv = Server::start(&s.0.join("sock"), &["memory", "8M"]);
    let uri = srv.uri();
    let dev = remote(&uri, NbdOptions { request_timeout: Duration::from_millis(600), ..Default::default() });
    let mut e = engine(EngineChoice::Auto);
    let id = e.add_device(dev).unwrap();
    srv.kill();
    let t = Instant::now();
    let c = run_all(e.as_mut(), vec![IoRequest::read(id, 0, AlignedBuf::new(4096), 1)]);
    let err = c[0].result.as_ref().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    assert!(err.message().starts_with(&uri) && err.message().contains("unreachable"), "{}", err.message());
    assert!(t.elapsed() >= Duration::from_millis(500) && t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Back again: the next request is served.
    srv.restart();
    let c = run_all(e.as_mut(), vec![IoRequest::read(id, 0, AlignedBuf::new(4096), 2)]);
    assert!(c[0].result.is_ok(), "{:?}", c[0].result);
    // An unreachable server at open time is an error at once.
    drop(srv);
    let err = Device::open(&uri, &OpenOptions::default()).unwrap_err();
    assert!(err.message().starts_with(&uri), "{}", err.message());
}

#[test]
fn errors_from_the_server_reach_the_caller() {
    if !have_nbdkit() {
        return;
    }
    let s = Scratch::new("nbd-eio");
    let srv = Server::start(
        &s.0.join("sock"),
        &[
            "--filter=error",
            "memory",
            "8M",
            "error-pread=EIO",
            "error-pread-rate=100%",
            "error-pwrite=ENOSPC",
            "error-pwrite-rate=100%",
        ],
    );
    let mut e = engine(EngineChoice::Auto);
    let id = e.add_device(remote(&srv.uri(), NbdOptions::default())).unwrap();
    let c = run_all(
        e.as_mut(),
        vec![IoRequest::read(id, 0, AlignedBuf::new(4096), 1), IoRequest::write(id, 0, AlignedBuf::new(4096), 2)],
    );
    let r = c[0].result.as_ref().unwrap_err();
    assert_eq!((r.kind(), r.code()), (ErrorKind::Io, "EIO"), "{}", r.message());
    assert!(r.message().contains(&srv.uri()));
    assert_eq!(c[1].result.as_ref().unwrap_err().kind(), ErrorKind::NoSpace);
    // A missing export is refused by name; a read-only export refuses an open for writing.
    let err = Device::open(format!("nbd+unix:///nope?socket={}", srv.sock.display()), &OpenOptions::default());
    // nbdkit serves one export under any name unless told otherwise: this one opens.
    assert!(err.is_ok());
    let ro = Server::start(&s.0.join("ro"), &["-r", "memory", "1M"]);
    let err = Device::open(ro.uri(), &OpenOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert!(Device::open(ro.uri(), &OpenOptions { write: false, ..Default::default() }).is_ok());
}

/// How a hostile server answers a request, given its header.
type Reply = fn(&[u8; 28]) -> Vec<u8>;

/// A server that handshakes properly, then answers each request with `reply(header)`.
fn hostile(sock: &Path, reply: Reply) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming().take(4) {
            let Ok(mut c) = conn else { return };
            let mut greet = Vec::new();
            greet.extend_from_slice(&0x4e42_444d_4147_4943u64.to_be_bytes());
            greet.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
            greet.extend_from_slice(&3u16.to_be_bytes());
            if c.write_all(&greet).is_err() {
                continue;
            }
            let mut flags = [0u8; 4];
            if c.read_exact(&mut flags).is_err() {
                continue;
            }
            // Options: refuse STRUCTURED_REPLY, answer GO with the export's size.
            loop {
                let mut h = [0u8; 16];
                if c.read_exact(&mut h).is_err() {
                    break;
                }
                let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut data = vec![0u8; len as usize];
                let _ = c.read_exact(&mut data);
                let rep = |ty: u32, d: &[u8]| {
                    let mut r = Vec::new();
                    r.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
                    r.extend_from_slice(&opt.to_be_bytes());
                    r.extend_from_slice(&ty.to_be_bytes());
                    r.extend_from_slice(&(d.len() as u32).to_be_bytes());
                    r.extend_from_slice(d);
                    r
                };
                if opt == 8 {
                    let _ = c.write_all(&rep((1 << 31) + 1, &[]));
                } else if opt == 7 {
                    let mut info = vec![0u8, 0];
                    info.extend_from_slice(&(1u64 << 20).to_be_bytes());
                    info.extend_from_slice(&1u16.to_be_bytes());
                    let _ = c.write_all(&rep(3, &info));
                    let _ = c.write_all(&rep(1, &[]));
                    break;
                }
            }
            let mut req = [0u8; 28];
            while c.read_exact(&mut req).is_ok() {
                if c.write_all(&reply(&req)).is_err() {
                    break;
                }
            }
        }
    })
}

#[test]
fn a_hostile_server_gets_clear_errors_and_never_a_crash() {
    let s = Scratch::new("nbd-hostile");
    let cases: [(&str, Reply); 4] = [
        ("reply magic", |_| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        ("which has no request in flight", |r| {
            let mut v = 0x6744_6698u32.to_be_bytes().to_vec();
            v.extend_from_slice(&0u32.to_be_bytes());
            v.extend_from_slice(&(u64::from_be_bytes(r[8..16].try_into().unwrap()) + 1000).to_be_bytes());
            v
        }),
        ("a reply stalled part-way through", |r| {
            // A read's reply cut short: the header and half the data.
            let mut v = 0x6744_6698u32.to_be_bytes().to_vec();
            v.extend_from_slice(&0u32.to_be_bytes());
            v.extend_from_slice(&r[8..16]);
            v.extend_from_slice(&[0u8; 2048]);
            v
        }),
        ("broke the protocol", |r| {
            // A structured chunk that was never negotiated.
            let mut v = 0x668e_33efu32.to_be_bytes().to_vec();
            v.extend_from_slice(&[0, 1, 0, 0]);
            v.extend_from_slice(&r[8..16]);
            v.extend_from_slice(&0u32.to_be_bytes());
            v
        }),
    ];
    for (i, (why, reply)) in cases.into_iter().enumerate() {
        let sock = s.0.join(format!("h{i}"));
        let server = hostile(&sock, reply);
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let dev = remote(&uri, NbdOptions { request_timeout: Duration::from_millis(800), ..Default::default() });
        let mut e = engine(EngineChoice::Auto);
        let id = e.add_device(dev).unwrap();
        let c = run_all(e.as_mut(), vec![IoRequest::read(id, 0, AlignedBuf::new(4096), 1)]);
        let err = c[0].result.as_ref().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{why}: {}", err.message());
        assert!(err.message().starts_with(&uri), "{why}: {}", err.message());
        assert!(
            err.message().contains(why) || err.message().contains("broke the protocol"),
            "{why}: {}",
            err.message()
        );
        drop(e);
        let _ = std::os::unix::net::UnixStream::connect(&sock);
        drop(server);
    }
    // Not an NBD server at all: refused at open, by name.
    let sock = s.0.join("junk");
    let l = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let err = Device::open(format!("nbd+unix:///?socket={}", sock.display()), &OpenOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Protocol, "{}", err.message());
    assert!(err.message().contains("greeting magic"), "{}", err.message());
    t.join().unwrap();
}

/// Runs `openssl` (the command-line tool) in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let st = Command::new("openssl").current_dir(dir).args(args).stderr(Stdio::null()).status().expect("run openssl");
    assert!(st.success(), "openssl {args:?}");
}

/// A CA in `dir`, and a server certificate it signed for localhost (nbdkit's file names).
fn certificates(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-subj", "/CN=ubcache test CA", "-days", "2"],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[&["req"][..], &ec, &["-keyout", "server-key.pem", "-out", "server.csr", "-subj", "/CN=localhost"]].concat(),
    );
    std::fs::write(dir.join("san.cnf"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "server-cert.pem",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
        ],
    );
}

#[test]
fn tls_with_a_pre_shared_key_rides_out_a_restart_and_wrong_keys_are_refused() {
    if !have_nbdkit() {
        return;
    }
    let s = Scratch::new("nbd-tls-psk");
    let img = s.file("img", 4 << 20, 3);
    let psk = s.0.join("keys.psk");
    std::fs::write(&psk, "alice:0123456789abcdef0123456789abcdef\n").unwrap();
    let sock = s.0.join("sock");
    let mut srv = Server::start(
        &sock,
        &["--tls=require", &format!("--tls-psk={}", psk.display()), "file", img.to_str().unwrap()],
    );
    let uri = format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", sock.display(), psk.display());
    let dev = remote(&uri, NbdOptions { request_timeout: Duration::from_secs(20), ..Default::default() });
    let client = dev.remote().unwrap().clone();
    let mut e = engine(EngineChoice::Auto);
    let id = e.add_device(dev).unwrap();
    let mut model = std::fs::read(&img).unwrap();
    let mut rng = Rng(7);
    let mut tag = 0;
    for round in 0..3 {
        let mut reqs = distinct_writes(&mut rng, 32, 1024, id, &mut model, &mut tag);
        tag += 1;
        reqs.push(IoRequest::flush(id, tag));
        for r in reqs {
            e.submit(r);
        }
        if round == 1 {
            srv.restart();
        }
        let out = completions(e.as_mut(), 33);
        assert!(out.iter().all(|c| c.result.is_ok()), "round {round}: {:?}", out.iter().find(|c| c.result.is_err()));
    }
    assert!(client.stats().reconnects >= 1, "{:?}", client.stats());
    // Large reads come back whole through the relay, and the file holds every write.
    assert_reads_back(e.as_mut(), id, 4, &model, &img);

    let refused = |uri: &str| Device::open(uri, &OpenOptions::default()).unwrap_err();
    // A plain client is refused by a server that requires TLS.
    let err = refused(&format!("nbd+unix:///?socket={}", sock.display()));
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert!(err.message().contains("requires TLS"), "{}", err.message());
    // The wrong key, or no key for the user: the TLS handshake fails, naming the URI.
    let wrong = s.0.join("wrong.psk");
    std::fs::write(&wrong, "alice:ffffffffffffffffffffffffffffffff\n").unwrap();
    let u = format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", sock.display(), wrong.display());
    let err = refused(&u);
    assert_eq!(err.kind(), ErrorKind::Tls, "{}", err.message());
    assert!(err.message().starts_with(&u) && err.message().contains("handshake failed"), "{}", err.message());
    let u = format!("nbds+unix://bob@/?socket={}&tls-psk-file={}", sock.display(), psk.display());
    let err = refused(&u);
    assert_eq!(err.kind(), ErrorKind::Tls);
    assert!(err.message().contains("no key for \"bob\""), "{}", err.message());
    let u = format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", sock.display(), s.0.join("none").display());
    assert!(refused(&u).message().contains("cannot read the PSK file"));
    // A key that is not hex (here four bytes, two of them one character) is named, not a panic.
    let odd = s.0.join("odd.psk");
    std::fs::write(&odd, "alice:0\u{e9}0\n").unwrap();
    let u = format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", sock.display(), odd.display());
    let err = refused(&u);
    assert_eq!(err.kind(), ErrorKind::Tls);
    assert!(err.message().contains("is not an even number of hex digits"), "{}", err.message());
    // A server without TLS: an nbds URI is refused rather than sent in the clear.
    let plain = Server::start(&s.0.join("plain"), &["--tls=off", "memory", "1M"]);
    let u = format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", plain.sock.display(), psk.display());
    let err = refused(&u);
    assert_eq!(err.kind(), ErrorKind::Tls, "{}", err.message());
    assert!(err.message().contains("does not offer TLS"), "{}", err.message());
}

#[test]
fn tls_with_certificates_checks_the_server_against_the_ca() {
    if !have_nbdkit() {
        return;
    }
    let s = Scratch::new("nbd-tls-x509");
    let (certs, other) = (s.0.join("certs"), s.0.join("other"));
    certificates(&certs);
    certificates(&other);
    let sock = s.0.join("sock");
    let _srv =
        Server::start(&sock, &["--tls=require", &format!("--tls-certificates={}", certs.display()), "memory", "4M"]);
    let uri = |dir: &Path, extra: &str| {
        format!("nbds+unix:///?socket={}&tls-certificates={}{extra}", sock.display(), dir.display())
    };
    let mut e = engine(EngineChoice::Auto);
    let id = e.add_device(remote(&uri(&certs, ""), NbdOptions::default())).unwrap();
    let data = pattern(65536, 9);
    let c = run_all(e.as_mut(), vec![IoRequest::write(id, 8192, AlignedBuf::from_slice(&data), 1)]);
    assert!(c[0].result.is_ok(), "{:?}", c[0].result);
    let c = run_all(e.as_mut(), vec![IoRequest::read(id, 8192, AlignedBuf::new(65536), 2)]);
    assert!(c.into_iter().next().unwrap().into_buf().unwrap()[..] == data[..]);
    // A CA that did not sign the server's certificate: refused, unless the check is off.
    let err = Device::open(uri(&other, ""), &OpenOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{}", err.message());
    assert!(err.message().contains("certificate"), "{}", err.message());
    assert!(Device::open(uri(&other, "&tls-verify-peer=false"), &OpenOptions::default()).is_ok());
    // The certificate is for localhost: another expected name is refused.
    let err = Device::open(uri(&certs, "&tls-hostname=elsewhere"), &OpenOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{}", err.message());
}

#[test]
fn several_connections_when_the_server_allows_multi_conn_one_otherwise() {
    if !have_nbdkit() {
        return;
    }
    let s = Scratch::new("nbd-multi");
    let img = s.file("img", 8 << 20, 5);
    let mut srv = Server::start(&s.0.join("sock"), &["file", img.to_str().unwrap()]);
    let opts = NbdOptions { request_timeout: Duration::from_secs(20), connections: 3, ..Default::default() };
    let dev = remote(&srv.uri(), opts);
    let client = dev.remote().unwrap().clone();
    let wait_for = |n: u32| {
        let t = Instant::now();
        while client.stats().connections != n {
            assert!(t.elapsed() < Duration::from_secs(10), "{:?}", client.stats());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(3);
    let mut e = engine(EngineChoice::Auto);
    let id = e.add_device(dev).unwrap();
    let mut model = std::fs::read(&img).unwrap();
    let mut rng = Rng(31);
    let mut tag = 0;
    for round in 0..4 {
        // Writes spread over the connections, then a flush once they are answered: the
        // server's multi-conn promise makes it cover every one of them.
        let mut reqs = distinct_writes(&mut rng, 96, 2048, id, &mut model, &mut tag);
        if round == 2 {
            // The server restarts with these in flight: they are sent again.
            for r in reqs.drain(..) {
                e.submit(r);
            }
            srv.restart();
            assert!(completions(e.as_mut(), 96).iter().all(|c| c.result.is_ok()));
        }
        assert!(run_all(e.as_mut(), reqs).iter().all(|c| c.result.is_ok()));
        tag += 1;
        assert!(run_all(e.as_mut(), vec![IoRequest::flush(id, tag)])[0].result.is_ok());
    }
    assert_reads_back(e.as_mut(), id, 8, &model, &img);
    // Every connection came back after the restart.
    wait_for(3);
    assert!(client.stats().reconnects >= 3, "{:?}", client.stats());
    drop(e);

    // A server that does not promise multi-conn gets one connection, whatever is asked.
    let one = Server::start(
        &s.0.join("one"),
        &["--filter=multi-conn", "file", img.to_str().unwrap(), "multi-conn-mode=disable"],
    );
    let dev = remote(&one.uri(), opts);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(dev.remote().unwrap().stats().connections, 1);
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Node's thread gets SIGCHLD from every child process; a handshake on it must not take
/// the `EINTR` of an interrupted read for a failure (OpenSSL does, unless the read is made
/// again). Signals without SA_RESTART hit the opening thread all through 20 TLS opens.
#[test]
fn tls_handshakes_ride_out_signals() {
    if !have_nbdkit() {
        return;
    }
    let s = Scratch::new("nbd-tls-eintr");
    let psk = s.0.join("keys.psk");
    std::fs::write(&psk, "alice:00112233445566778899aabbccddeeff\n").unwrap();
    let sock = s.0.join("sock");
    let _srv = Server::start(&sock, &["--tls=require", &format!("--tls-psk={}", psk.display()), "memory", "1M"]);
    let uri = format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", sock.display(), psk.display());
    // SAFETY: a handler that does nothing, installed without SA_RESTART.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ignore_signal as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = 0;
        assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
    }
    // SAFETY: pthread_self of this thread, signalled while it runs the opens below.
    let me = unsafe { libc::pthread_self() } as usize;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let pester = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: the thread is alive until `stop` is set and this thread joined.
            unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR2) };
            std::thread::sleep(Duration::from_micros(50));
        }
    });
    let mut failures = Vec::new();
    for _ in 0..20 {
        if let Err(e) = Device::open(&uri, &OpenOptions::default()) {
            failures.push(e.message().to_string());
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    pester.join().unwrap();
    assert!(failures.is_empty(), "{failures:?}");
}
